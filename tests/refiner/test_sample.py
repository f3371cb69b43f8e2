"""Free-Re-noising: the step lists, step 0 from a uniformly random mask, each later step
re-noises the previous argmax from the marginal with s = T - 1 - i, guidance in closed form,
collected logits at the output size, and the refinement picture."""

import numpy as np
import pytest
import torch

from ddps_core.refiner.denoiser import DenoiserConfig
from ddps_core.refiner.multinomial import MultinomialDiffusion, uniform_mask
from ddps_core.refiner.sample import RefineResult, free_renoising, refinement_picture, refinement_steps

pytestmark = pytest.mark.usefixtures("one_thread")

K, C, T = 4, 6, 20


@pytest.mark.parametrize("n,expected", [
    (1, [0, 19]),
    (2, [0, 10, 19]),
    (3, [0, 6, 12, 18, 19]),
    (4, [0, 5, 10, 15, 19]),
    (5, [0, 4, 8, 12, 16, 19]),
    (7, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19]),
    (10, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19]),
    (11, list(range(20))),  # 20 // 11 = 1: T-1 is already there, not repeated
    (20, list(range(20))),
])
def test_refinement_steps(n, expected):
    assert refinement_steps(T, n) == expected


def test_refinement_steps_other_T_and_errors():
    assert refinement_steps(10, 3) == [0, 3, 6, 9]  # T-1 already present
    for bad in (0, 21):
        with pytest.raises(ValueError):
            refinement_steps(T, bad)


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    m = DenoiserConfig(K, C, width=8, channel_mult=(1, 2), num_res_blocks=1).build().eval()
    with torch.no_grad():  # perturb the zero-initialised layers so time and guidance matter
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def schedule():
    return MultinomialDiffusion(K, T)


@pytest.fixture(scope="module")
def features():
    return torch.randn(3, C, 6, 5, generator=torch.Generator().manual_seed(1))


class Recorder(torch.nn.Module):
    """Wraps the denoiser and keeps every call's inputs and output."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, f):
        out = self.inner(x, t, f)
        self.calls.append((x.clone(), t.clone(), f.clone(), out.clone()))
        return out


def test_step0_uniform_mask_then_renoise_previous_argmax(denoiser, schedule, features, monkeypatch):
    rec = Recorder(denoiser)
    noised = []
    real = schedule.q_sample

    def q_sample(x0, s, generator=None):
        out = real(x0, s, generator)
        noised.append((x0.clone(), int(s), out.clone()))
        return out

    monkeypatch.setattr(schedule, "q_sample", q_sample)
    result = free_renoising(rec, schedule, features, n=2, generator=torch.Generator().manual_seed(7))
    assert result.steps == [0, 10, 19] and [int(c[1][0]) for c in rec.calls] == [0, 10, 19]
    # step 0: exactly the uniformly random mask of the generator's first draw
    x0_input = rec.calls[0][0]
    assert torch.equal(x0_input, uniform_mask((3, 6, 5), K, torch.Generator().manual_seed(7)))
    assert all((c[1] == c[1][0]).all() for c in rec.calls)  # one step per call, whole batch
    # steps 10 and 19: the previous argmax, re-noised from the marginal at s = T - 1 - i
    assert [s for _, s, _ in noised] == [T - 1 - 10, T - 1 - 19]
    for j, (x0, _, out) in enumerate(noised):
        assert torch.equal(x0, rec.calls[j][3].argmax(1))
        assert torch.equal(rec.calls[j + 1][0], out)


def test_step0_mask_is_uniform(schedule):
    """The initial mask does not depend on the features: with an identity-like model the
    step-0 input class frequencies are uniform."""
    seen = []

    def model(x, t, f):
        seen.append(x.clone())
        return torch.zeros(x.shape[0], K, *x.shape[1:])

    free_renoising(model, schedule, torch.zeros(8, C, 16, 16), n=1, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(seen[0].reshape(-1), minlength=K).double()
    expected = seen[0].numel() / K
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.27  # chi-square 3 dof, p = 0.001


def test_same_generator_same_result(denoiser, schedule, features):
    a = free_renoising(denoiser, schedule, features, n=3, generator=torch.Generator().manual_seed(3))
    b = free_renoising(denoiser, schedule, features, n=3, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a.logits[i], b.logits[i]) for i in a.logits)


def _manual(denoiser, schedule, features, steps, w, seed, first=False):
    """Free re-noising with guidance written out with two separate calls per step; ``first``:
    the feature-less prediction of step 0 is the one subtracted at every step."""
    gen = torch.Generator().manual_seed(seed)
    x = uniform_mask(features.shape[:1] + features.shape[2:], K, gen)
    out, x0, prior = {}, None, None
    with torch.no_grad():
        for i in steps:
            if i != 0:
                x = schedule.q_sample(x0, T - 1 - i, gen)
            t = torch.full((features.shape[0],), i)
            cond = denoiser(x, t, features)
            if w:
                uncond = denoiser(x, t, torch.zeros_like(features))
                if first:
                    prior = uncond if prior is None else prior
                    uncond = prior
                logits = (1 + w) * cond - w * uncond
            else:
                logits = cond
            x0 = logits.argmax(1)
            out[i] = logits
    return out


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_guidance_is_the_closed_form_combination(denoiser, schedule, features, w):
    steps = refinement_steps(T, 2)
    got = free_renoising(denoiser, schedule, features, steps=steps, guidance=w, generator=torch.Generator().manual_seed(4))
    want = _manual(denoiser, schedule, features, steps, w, 4)
    for i in steps:
        assert torch.allclose(got.logits[i], want[i], atol=1e-4), i
    if w == 0.0:
        plain = free_renoising(denoiser, schedule, features, steps=steps, generator=torch.Generator().manual_seed(4))
        assert all(torch.equal(plain.logits[i], got.logits[i]) for i in steps)
    else:
        plain = _manual(denoiser, schedule, features, steps, 0.0, 4)
        assert not torch.allclose(plain[0], got.logits[0], atol=1e-3)  # guidance changes something


def test_guidance_from_the_first_step_subtracts_the_class_prior_of_step_0(denoiser, schedule, features):
    steps = refinement_steps(T, 2)
    got = free_renoising(denoiser, schedule, features, steps=steps, guidance=0.5, guidance_from="first",
                         generator=torch.Generator().manual_seed(4))
    want = _manual(denoiser, schedule, features, steps, 0.5, 4, first=True)
    every = _manual(denoiser, schedule, features, steps, 0.5, 4)
    for i in steps:
        assert torch.allclose(got.logits[i], want[i], atol=1e-4), i
    assert torch.allclose(got.logits[0], every[0], atol=1e-4)  # step 0 is the same either way
    assert not torch.allclose(got.logits[steps[-1]], every[steps[-1]], atol=1e-3)
    with pytest.raises(ValueError, match="guidance_from"):
        free_renoising(denoiser, schedule, features, n=2, guidance=0.5, guidance_from="last")


def test_collect_and_output_size(denoiser, schedule, features):
    res = free_renoising(denoiser, schedule, features, n=4, collect=[0, 19], output_size=(24, 20),
                 generator=torch.Generator().manual_seed(0))
    assert isinstance(res, RefineResult) and res.steps == [0, 5, 10, 15, 19]
    assert set(res.logits) == {0, 19}
    assert all(v.shape == (3, K, 24, 20) and v.dtype == torch.float32 for v in res.logits.values())
    masks = res.masks()
    assert masks[19].shape == (3, 24, 20) and masks[19].max() < K
    with pytest.raises(ValueError, match="not run"):
        free_renoising(denoiser, schedule, features, n=1, collect=[5])
    with pytest.raises(ValueError, match="start at 0"):
        free_renoising(denoiser, schedule, features, steps=[3, 19])


def test_refinement_picture():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    masks = {i: rng.integers(0, K, (2, 8, 8)) for i in (19, 0, 10)}
    gt = rng.integers(0, K, (2, 8, 8))
    gt[0, 0, 0] = 255
    pic = refinement_picture(images, masks, gt=gt, base=masks[0], scale=4)
    cols = 1 + 1 + 3 + 1
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
    assert pic.shape[1] == cols * 32 + (cols - 1) * 2
    assert pic.shape[0] == 12 + 2 + 2 * 32 + 2
    plain = refinement_picture(images, masks, captions=False, scale=1)
    assert plain.shape == (2 * 8 + 2, 4 * 8 + 3 * 2, 3)
    # the first panel is the image itself, the step columns are in step order (0, 10, 19)
    assert np.array_equal(plain[:8, :8], images[0])
    from ddps_core.viz import overlay
    assert np.array_equal(plain[:8, 10:18], overlay(images[0], masks[0][0]))
    assert np.array_equal(plain[:8, 30:38], overlay(images[0], masks[19][0]))


def test_changes_count_the_steps_whose_upsampled_mask_changed(denoiser, schedule, features):
    steps = refinement_steps(T, 3)
    kw = dict(steps=steps, output_size=(12, 10), guidance=0.5)
    full = free_renoising(denoiser, schedule, features, generator=torch.Generator().manual_seed(4), **kw)
    assert full.changes is None
    some = free_renoising(denoiser, schedule, features, collect=[19], changes=True,
                          generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(some.logits[19], full.logits[19])  # the same draws
    masks = full.masks()
    expected = sum((masks[b] != masks[a]).float() for a, b in zip(steps, steps[1:]))
    assert some.changes.shape == (3, 12, 10) and torch.equal(some.changes, expected)
    assert 0 < float(some.changes.max()) <= len(steps) - 1
