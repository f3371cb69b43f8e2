"""Images of any size through a window model and back (ddps_core.inference.windows), checked
against the merge done by hand: the windows cut from the scaled image with numpy slicing,
their maps summed and counted per pixel, F.interpolate back to the image's size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddps_core.inference.windows import augmentations, image_groups, image_maps, labels_of

S = 16


def window_model(windows: np.ndarray) -> torch.Tensor:
    """A deterministic 'model': 3 class probabilities per pixel from the window's colours,
    plus a fourth map that depends on the position inside the window (so overlaps matter)."""
    x = torch.from_numpy(np.array(windows)).float().permute(0, 3, 1, 2) / 255.0
    probs = torch.softmax(4 * x, dim=1)
    ramp = torch.linspace(0, 1, S).expand(len(windows), 1, S, S)
    return torch.cat([probs, ramp], dim=1)


def by_hand(image: np.ndarray, mode: str, stride: int) -> torch.Tensor:
    H, W = image.shape[:2]
    if mode == "whole":
        small = np.asarray(Image.fromarray(image).resize((S, S), Image.Resampling.BILINEAR))
        canvas = window_model(small[None])[0]
    else:
        h, w = (S, round(W * S / H)) if H <= W else (round(H * S / W), S)
        scaled = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
        ys = sorted({min(y, h - S) for y in range(0, h - S + stride, stride)})
        xs = sorted({min(x, w - S) for x in range(0, w - S + stride, stride)})
        total, count = torch.zeros(4, h, w), torch.zeros(1, h, w)
        for y in ys:
            for x in xs:
                total[:, y:y + S, x:x + S] += window_model(scaled[None, y:y + S, x:x + S])[0]
                count[:, y:y + S, x:x + S] += 1
        assert count.min() >= 1 and (count.max() > 1 or len(ys) * len(xs) == 1)
        canvas = total / count
    return F.interpolate(canvas[None], size=(H, W), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_images_of_two_shapes_come_back_at_their_sizes_with_the_windows_mean(mode):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), rng.integers(0, 256, (160, 64, 3), dtype=np.uint8)]
    got = list(image_maps(images, window_model, S, mode, stride=10, batch=3))  # batches across the two images
    for image, maps in zip(images, got):
        assert tuple(maps.shape) == (4, *image.shape[:2])
        torch.testing.assert_close(maps, by_hand(image, mode, 10), atol=1e-5, rtol=1e-5)
        labels = labels_of(maps, 3)
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8 and labels.max() <= 2


def test_flip_averages_the_flipped_prediction_flipped_back():
    image = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    plain = next(image_maps([image], window_model, S, "slide", stride=8))
    mirrored = next(image_maps([np.ascontiguousarray(image[:, ::-1])], window_model, S, "slide", stride=8))
    both = next(image_maps([image], window_model, S, "slide", stride=8, flip=True))
    torch.testing.assert_close(both, (plain + mirrored.flip(-1)) / 2)


def test_a_scale_tiles_the_rescaled_image_and_comes_back_at_the_image_size():
    image = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(image).resize((60, 36), Image.Resampling.BILINEAR))
    at_big = next(image_maps([big], window_model, S, "slide", stride=8))
    expect = F.interpolate(at_big[None], size=(24, 40), mode="bilinear", align_corners=False)[0]
    got = next(image_maps([image], window_model, S, "slide", stride=8, scales=[1.5]))
    torch.testing.assert_close(got, expect)
    assert augmentations(True, [0.5, 1.0]) == [(0.5, False), (0.5, True), (1.0, False), (1.0, True)]
    with pytest.raises(ValueError, match="positive"):
        augmentations(False, [0.0])


def test_groups_count_windows_and_views():
    """image_groups: consecutive images cut so that each group holds at most the given number
    of model inputs (every test-time view counted), an image with more alone."""
    shapes = [(96, 64), (64, 160), (32, 32), (32, 32), (64, 160)]
    # whole: one input per image
    assert image_groups(shapes, 32, "whole", windows=2) == [[0, 1], [2, 3], [4]]
    # slide at S = 32, stride 22: 2, 4, 1, 1, 4 windows
    assert image_groups(shapes, 32, "slide", windows=4) == [[0], [1], [2, 3], [4]]
    assert image_groups(shapes, 32, "slide", windows=6) == [[0, 1], [2, 3, 4]]
    assert image_groups(shapes, 32, "slide", windows=1) == [[0], [1], [2], [3], [4]]
    # each test-time view counts: flip doubles an image's inputs; at scale 2 a 32 x 32 image is a
    # 64 x 64 canvas, 3 x 3 windows at stride 22
    assert image_groups(shapes[:3], 32, "whole", windows=2, flip=True) == [[0], [1], [2]]
    assert image_groups([(32, 32)] * 3, 32, "slide", windows=10, scales=[1.0, 2.0]) == [[0], [1], [2]]
    assert image_groups([(32, 32)] * 3, 32, "slide", windows=4, scales=[0.5, 1.0]) == [[0, 1], [2]]
    assert image_groups([], 32) == []
