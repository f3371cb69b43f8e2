"""Any image size in, the image's own size out: whole and slide tilings of a 96x64 and a
64x160 image, the overlap average against an independent per-pixel computation, labels
resampled nearest, and windows that cover every pixel."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddps_core.errors import ConfigError
from ddps_core.geometry import resize_label, tiling

S = 32


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_whole_resizes_to_the_model_and_back(shape):
    t = tiling(shape, S, "whole")
    crops = t.crops(_image(*shape))
    assert crops.shape == (1, S, S, 3) and crops.dtype == np.uint8
    probs = torch.rand(1, 4, S, S)
    out = t.merge(probs)
    assert out.shape == (4, *shape)
    expected = F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_slide_averages_overlapping_windows_and_comes_back_at_the_image_size(shape):
    t = tiling(shape, S, "slide", stride=20)
    H, W = shape
    short = min(H, W)
    h, w = round(H * S / short), round(W * S / short)
    assert t.scaled == (h, w) and min(t.scaled) == S  # short side to S, aspect kept
    assert len(t.crops(_image(*shape))) == len(t)
    # windows cover the canvas; starts every 20 px, the last one ending at the border
    long = max(h, w)
    starts = sorted({o[0] if h > w else o[1] for o in t.origins})
    assert starts[0] == 0 and starts[-1] == long - S and all(b - a <= 20 for a, b in zip(starts, starts[1:]))
    probs = torch.rand(len(t), 3, S, S, dtype=torch.float64)
    merged = t.merge(probs)
    assert merged.shape == (3, H, W)
    # independently: each canvas pixel is the mean of the windows that contain it
    canvas = np.zeros((3, h, w))
    for yy in range(h):
        for xx in range(w):
            seen = [probs[i, :, yy - y, xx - x].numpy() for i, (y, x) in enumerate(t.origins)
                    if y <= yy < y + S and x <= xx < x + S]
            assert seen, (yy, xx)
            canvas[:, yy, xx] = np.mean(seen, axis=0)
    expected = F.interpolate(torch.from_numpy(canvas)[None], size=shape, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(merged, expected)


def test_slide_of_a_square_image_at_the_model_size_is_one_window():
    t = tiling((S, S), S, "slide")
    probs = torch.rand(1, 2, S, S)
    assert len(t) == 1 and torch.equal(t.merge(probs), probs[0])


def test_a_label_is_resampled_nearest_on_the_same_grid():
    label = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)
    # 6x4 -> 3x2: pixel centres (0.5, 0.5)*2 -> rows 1, 3, 5; cols 1, 3
    assert resize_label(label, 3, 2).tolist() == [[5, 7], [13, 15], [21, 23]]
    t = tiling((6, 4), 4, "slide", stride=1)  # canvas 6x4: windows at rows 0, 1, 2
    crops = t.label_crops(label)
    assert crops.shape == (3, 4, 4) and np.array_equal(crops[1], label[1:5])
    assert set(np.unique(tiling((6, 4), 3, "whole").label_crops(label))) <= set(label.ravel())


def test_bad_modes_and_strides_are_config_errors():
    with pytest.raises(ConfigError, match="valid modes"):
        tiling((10, 10), 8, "crop")
    with pytest.raises(ConfigError, match="stride"):
        tiling((10, 20), 8, "slide", stride=9)
    with pytest.raises(ValueError, match="merge"):
        tiling((10, 20), 8, "slide").merge(torch.zeros(1, 2, 8, 8))
