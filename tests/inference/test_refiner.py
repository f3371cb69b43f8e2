"""The refiner predictor on images of any size: labels and uncertainty at each image's own
size, the prediction is the last run step, the uncertainty is the merged share of steps that
changed the pixel, and the draws are a function of the seed and the images."""

import numpy as np
import pytest
import torch

from ddps_core.inference import Predictor
from ddps_core.inference.refiner import RefinerPredictor, image_seed
from ddps_core.refiner.denoiser import DenoiserConfig
from ddps_core.refiner.multinomial import MultinomialDiffusion
from ddps_core.refiner.sample import refinement_steps

pytestmark = pytest.mark.usefixtures("one_thread")

K, C, T, S = 3, 5, 10, 32


class Base(torch.nn.Module):
    """A student stand-in: features at stride 4 and logits (what the refiner reads)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = torch.nn.Conv2d(3, C, 4, stride=4)

    def features_and_logits(self, x):
        f = self.feat(x)
        return f, f[:, :K].repeat_interleave(4, -1).repeat_interleave(4, -2)


def _predictor(mode, seed=0, **kw):
    torch.manual_seed(1)
    den = DenoiserConfig(K, C, width=8, channel_mult=(1, 2), num_res_blocks=1).build().eval()
    with torch.no_grad():
        for p in den.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return RefinerPredictor(Base().eval(), den, MultinomialDiffusion(K, T), model_id="x", num_classes=K, size=S,
                            steps=refinement_steps(T, 3), seed=seed, mode=mode, **kw)


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((96, 64), (64, 160), (S, S))]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_labels_and_uncertainty_at_each_images_size(mode):
    images = _images()
    pred = _predictor(mode)
    assert isinstance(pred, Predictor) and pred.steps == [0, 3, 6, 9] and pred.report_steps == [0, 3, 6, 9]
    out = pred(images)
    again = _predictor(mode)
    steps = list(again.step_maps(images))
    for image, p, (labels, unc) in zip(images, out, steps, strict=True):
        assert p.labels.shape == image.shape[:2] == p.uncertainty.shape == unc.shape
        assert p.uncertainty.dtype == np.float32 and 0 <= p.uncertainty.min() and p.uncertainty.max() <= 1
        assert p.score == pytest.approx(float(p.uncertainty.mean()))
        assert sorted(labels) == [0, 3, 6, 9]
        np.testing.assert_array_equal(labels[9], p.labels)  # same seed, same draws: the last step
        np.testing.assert_allclose(unc, p.uncertainty, atol=1e-6)
    assert any(p.uncertainty.max() > 0 for p in out)
    other = _predictor(mode, seed=5)(images)
    assert any(not np.array_equal(a.labels, b.labels) for a, b in zip(out, other))


def test_report_steps_and_whole_mode_by_hand():
    """In whole mode a 32 x 32 image is one window: its labels are the window's masks."""
    from ddps_core.refiner.sample import free_renoising

    image = _images()[2]
    pred = _predictor("whole", report_steps=[0, 9])
    (labels, unc), = pred.step_maps([image])
    assert sorted(labels) == [0, 9]
    ref = _predictor("whole")
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    feats, _ = ref.student.features_and_logits(x)
    res = free_renoising(ref.denoiser, ref.schedule, feats, steps=ref.steps, output_size=(S, S),
                         generator=torch.Generator().manual_seed(image_seed(0, image)), changes=True)
    masks = res.masks()
    for i in (0, 9):
        np.testing.assert_array_equal(labels[i], masks[i][0].numpy())
    np.testing.assert_allclose(unc, res.changes[0].numpy() / 3, atol=1e-6)
    with pytest.raises(ValueError, match="not run steps"):
        list(pred.step_maps([image], [0, 5]))


def test_an_images_labels_do_not_depend_on_the_other_images_or_their_order():
    """`ddps predict` (any batch) and stage refine (its own batches) give an image the same
    labels: its draws are seeded by refiner.seed and its pixels."""
    a, b, c = _images()
    together = _predictor("slide")([a, b, c])
    alone = _predictor("slide")([b])
    reordered = _predictor("slide")([c, b, a])
    np.testing.assert_array_equal(together[1].labels, alone[0].labels)
    np.testing.assert_array_equal(together[0].labels, reordered[2].labels)
    np.testing.assert_array_equal(together[2].uncertainty, reordered[0].uncertainty)
    assert image_seed(0, a) != image_seed(1, a) != image_seed(0, b)
