"""The diffusion model's own training images stay guided-diffusion's centre crops (whatever
data.resize says): box halvings while the short side is at least 2S, a bicubic resize to short
side S, the central square. Values by hand."""

from __future__ import annotations

import numpy as np

from ddps_core.diffusion.stage import center_crop_like_guided_diffusion


def test_box_halving_then_the_central_square():
    # 4 x 8, S = 2: the short side 4 >= 2 S, so one box halving to 2 x 4 (each 2 x 2 block is
    # constant here, so its mean is its value), then no resize (short side 2), then columns 1-2
    blocks = np.array([[0, 10, 20, 30], [100, 110, 120, 130]], np.uint8)
    image = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)[:, :, None].repeat(3, axis=2)
    out = center_crop_like_guided_diffusion(image, 2)
    assert out[:, :, 0].tolist() == [[10, 20], [110, 120]] and (out == out[:, :, :1]).all()


def test_an_image_of_the_model_size_is_unchanged_and_a_long_side_is_cut():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_like_guided_diffusion(square, 32), square)
    wide = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)  # short side 3 = S: offset (5 - 3) // 2 = 1
    np.testing.assert_array_equal(center_crop_like_guided_diffusion(wide, 3), wide[:, 1:4])
