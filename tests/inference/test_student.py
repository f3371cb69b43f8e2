"""The student predictor on images of any size: its probabilities are the softmax of a tiny
deterministic model on the windows, merged as computed here by hand (PIL resize, the window
origins written out, the mean where they overlap, bilinear back), and its labels are their
argmax at each image's own size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddps_core.inference import Predictor
from ddps_core.inference.student import StudentPredictor

pytestmark = pytest.mark.usefixtures("one_thread")

K, S = 3, 32


class Tiny(torch.nn.Module):
    """A 3x3 convolution: its output depends on where a window's borders are."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, K, 3, padding=1)

    def forward(self, x):
        return 4 * self.conv(x)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / h, 255 * xx / w, 128 + 0 * xx], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _softmax(model, canvas):
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        return torch.softmax(model(x), 1)[0]


def _by_hand(model, image, scaled, origins):
    """Resize to ``scaled`` (PIL bilinear), softmax per window, mean where they overlap,
    bilinear to the image's size."""
    H, W = image.shape[:2]
    h, w = scaled
    canvas = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    total, count = torch.zeros(K, h, w), torch.zeros(1, h, w)
    for y, x in origins:
        total[:, y:y + S, x:x + S] += _softmax(model, canvas[y:y + S, x:x + S])
        count[:, y:y + S, x:x + S] += 1
    assert (count > 0).all()
    return F.interpolate((total / count)[None], size=(H, W), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_probabilities_are_the_merged_window_softmax(mode):
    model = Tiny().eval()
    images = [_image(96, 64, 0), _image(64, 160, 1), _image(S, S, 2)]
    pred = StudentPredictor(model, model_id="x", num_classes=K, size=S, mode=mode, batch=3)
    assert isinstance(pred, Predictor)
    got = list(pred.probabilities(images))
    if mode == "whole":
        layouts = [((S, S), [(0, 0)])] * 3
    else:  # short side to 32; stride 22 (two thirds of 32); the last window moved back to the border
        layouts = [((48, 32), [(0, 0), (16, 0)]), ((32, 80), [(0, 0), (0, 22), (0, 44), (0, 48)]),
                   ((S, S), [(0, 0)])]
    for image, probs, (scaled, origins) in zip(images, got, layouts, strict=True):
        expected = _by_hand(model, image, scaled, origins)
        assert probs.shape == (K, *image.shape[:2])
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    out = pred(images)
    for image, p, probs in zip(images, out, got, strict=True):
        assert p.labels.shape == image.shape[:2] and p.labels.dtype == np.uint8
        assert np.array_equal(p.labels, probs.argmax(0).numpy())
        assert p.uncertainty is None and np.isnan(p.score)


def test_flip_averages_the_mirrored_prediction():
    model = Tiny().eval()
    image = _image(64, 160, 3)
    plain = StudentPredictor(model, model_id="x", num_classes=K, size=S, mode="slide")
    flipped = StudentPredictor(model, model_id="x", num_classes=K, size=S, mode="slide", flip=True)
    a = next(plain.probabilities([image]))
    b = next(plain.probabilities([np.ascontiguousarray(image[:, ::-1])])).flip(-1)
    torch.testing.assert_close(next(flipped.probabilities([image])), (a + b) / 2, atol=1e-5, rtol=1e-5)
