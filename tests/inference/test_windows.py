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


def by_hand(image: np.ndarray, mode: str, stride: int, short: int = S) -> torch.Tensor:
    """The image scaled to a short side of ``short`` (slide), zero-padded to at least S x S,
    S x S windows every ``stride`` (the last one moved back to the border), their maps summed
    and counted per pixel, the padding cut off, then resized to the image's size."""
    H, W = image.shape[:2]
    if mode == "whole":
        small = np.asarray(Image.fromarray(image).resize((S, S), Image.Resampling.BILINEAR))
        canvas = window_model(small[None])[0]
    else:
        h, w = (short, round(W * short / H)) if H <= W else (round(H * short / W), short)
        scaled = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
        ph, pw = max(h, S), max(w, S)
        padded = np.zeros((ph, pw, 3), np.uint8)
        padded[:h, :w] = scaled
        ys = sorted({min(y, ph - S) for y in range(0, ph - S + stride, stride)})
        xs = sorted({min(x, pw - S) for x in range(0, pw - S + stride, stride)})
        total, count = torch.zeros(4, ph, pw), torch.zeros(1, ph, pw)
        for y in ys:
            for x in xs:
                total[:, y:y + S, x:x + S] += window_model(padded[None, y:y + S, x:x + S])[0]
                count[:, y:y + S, x:x + S] += 1
        assert count.min() >= 1 and (count.max() > 1 or len(ys) * len(xs) == 1)
        canvas = (total / count)[:, :h, :w]
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


def test_a_scale_slides_over_the_image_at_that_scale_and_comes_back_at_its_size():
    image = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    for scale, short in [(1.5, 24), (0.5, 8)]:  # 0.5: a 8 x 13 canvas, padded to one 16 x 16 window
        got = next(image_maps([image], window_model, S, "slide", stride=8, scales=[scale]))
        torch.testing.assert_close(got, by_hand(image, "slide", 8, short), atol=1e-5, rtol=1e-5)
    two = next(image_maps([image], window_model, S, "slide", stride=8, scales=[1.0, 1.5]))
    torch.testing.assert_close(two, (by_hand(image, "slide", 8) + by_hand(image, "slide", 8, 24)) / 2,
                               atol=1e-5, rtol=1e-5)
    whole = next(image_maps([image], window_model, S, "whole", scales=[0.5, 2.0]))
    torch.testing.assert_close(whole, by_hand(image, "whole", 8))  # whole: a scale changes nothing
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
