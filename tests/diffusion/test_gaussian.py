"""The Gaussian diffusion schedule: reference values, closed forms, respacing, samplers, losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddps_core.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    get_preset,
    normal_kl,
    space_timesteps,
)



class Recorder(torch.nn.Module):
    """Dummy model: records the timesteps it is called with; eps = 0.1 x (+ a variance channel)."""

    def __init__(self, learn_sigma: bool = False):
        super().__init__()
        self.calls: list[list[int]] = []
        self.learn_sigma = learn_sigma

    def forward(self, x, t):
        self.calls.append(t.tolist())
        eps = 0.1 * x
        return torch.cat([eps, torch.tanh(x)], 1) if self.learn_sigma else eps


class Oracle(torch.nn.Module):
    """The exact eps predictor for a data distribution that is a single point ``x0``, given the
    ORIGINAL schedule ``base`` (so it is only right if it receives original timesteps)."""

    def __init__(self, base: GaussianDiffusion, x0: torch.Tensor):
        super().__init__()
        self.abar = torch.from_numpy(base.alphas_cumprod)
        self.x0 = x0

    def forward(self, x, t):
        a = self.abar[t].reshape(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * self.x0) / (1 - a).sqrt()).float()


def test_linear_schedule_reference_values():
    d = GaussianDiffusion.from_name("linear", 1000)
    assert d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    for t, want in [(50, 0.96995), (150, 0.78589), (250, 0.52142)]:
        assert round(d.alphas_cumprod[t], 5) == want
    b100 = get_named_beta_schedule("linear", 100)
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_cosine_schedule():
    T = 50
    betas = get_named_beta_schedule("cosine", T)
    assert betas.max() <= 0.999 and (betas > 0).all()
    abar = np.cumprod(1 - betas)

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 30):  # unclipped steps follow alpha_bar exactly
        assert abar[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10)
    with pytest.raises(ValueError):
        get_named_beta_schedule("quadratic", 10)


def test_q_sample_closed_form():
    d = GaussianDiffusion.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 4, 4, generator=g)
    eps = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 150, 999])
    got = d.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ab = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[: ti + 1])
        want = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_posterior_closed_form_by_bayes():
    betas = np.array([0.1, 0.2, 0.3, 0.4])
    d = GaussianDiffusion(betas)
    x0 = torch.tensor([[0.5, -0.3]]).reshape(1, 2, 1, 1).repeat(4, 1, 1, 1)
    xt = torch.tensor([[0.2, 0.9]]).reshape(1, 2, 1, 1).repeat(4, 1, 1, 1)
    t = torch.arange(4)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    abar = np.cumprod(1 - betas)
    for s in range(4):
        if s == 0:  # x_{-1} is x0 itself
            torch.testing.assert_close(mean[0], x0[0])
            assert var[0].item() == 0.0
            continue
        a_prev, alpha, beta = abar[s - 1], 1 - betas[s], betas[s]
        # q(x_{s-1} | x0) = N(sqrt(a_prev) x0, 1 - a_prev); q(x_s | x_{s-1}) = N(sqrt(alpha) x_{s-1}, beta)
        prec = 1 / (1 - a_prev) + alpha / beta
        v = 1 / prec
        m = v * (math.sqrt(a_prev) * x0[s] / (1 - a_prev) + math.sqrt(alpha) * xt[s] / beta)
        torch.testing.assert_close(mean[s], m.float(), rtol=1e-6, atol=1e-7)
        assert var[s].item() == pytest.approx(v, rel=1e-6)
        assert logvar[s].item() == pytest.approx(math.log(v), rel=1e-6)
    assert logvar[0].item() == pytest.approx(math.log(d.posterior_variance[1]), rel=1e-6)


def test_p_mean_variance_variance_modes():
    d = GaussianDiffusion.from_name("linear", 100)
    x = torch.zeros(2, 3, 2, 2)
    t = torch.tensor([0, 40])

    def const(v):
        return lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)

    hi = d.p_mean_variance(const(1.0), x, t)["log_variance"]
    lo = d.p_mean_variance(const(-1.0), x, t)["log_variance"]
    mid = d.p_mean_variance(const(0.0), x, t)["log_variance"]
    for i, ti in enumerate(t.tolist()):
        assert hi[i].flatten()[0].item() == pytest.approx(math.log(d.betas[ti]), rel=1e-6)
        assert lo[i].flatten()[0].item() == pytest.approx(d.posterior_log_variance_clipped[ti], rel=1e-6)
    torch.testing.assert_close(mid, (hi + lo) / 2)
    large = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)["log_variance"]
    assert large[1].flatten()[0].item() == pytest.approx(math.log(d.betas[40]), rel=1e-6)
    small = GaussianDiffusion(d.betas, fixed_variance="small").p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    assert small["log_variance"][1].flatten()[0].item() == pytest.approx(d.posterior_log_variance_clipped[40], rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(lambda x, t: x[:, :2], x, t)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    ten = space_timesteps(1000, "10")
    assert len(ten) == 10 and ten[0] == 0 and ten[-1] == 999
    assert space_timesteps(100, 10) == space_timesteps(100, "10")
    assert len(space_timesteps(300, [10, 5, 1])) == 16
    assert space_timesteps(300, [10, 5, 1])[-1] == 200
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")  # no integer stride gives exactly 600 steps
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_respaced_schedule_keeps_alphas_and_passes_original_t():
    base = GaussianDiffusion.from_name("linear", 1000)
    keep = space_timesteps(1000, "10")
    sp = base.respace(keep)
    assert sp.num_timesteps == 10
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12)
    # nested respacing still maps to the original steps
    sp2 = sp.respace([0, 5, 9])
    np.testing.assert_allclose(sp2.alphas_cumprod, base.alphas_cumprod[[keep[0], keep[5], keep[9]]], rtol=1e-12)
    assert sp2.timestep_map.tolist() == [keep[0], keep[5], keep[9]]

    for loop in ("p_sample_loop", "ddim_sample_loop"):
        rec = Recorder(learn_sigma=True)
        getattr(sp, loop)(rec, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
        assert [c[0] for c in rec.calls] == keep[::-1]
        assert all(c[0] == c[1] for c in rec.calls)

    rec = Recorder()
    sp.training_losses(rec, torch.zeros(2, 3, 4, 4), torch.tensor([0, 9]))
    assert rec.calls == [[keep[0], keep[9]]]
    # q_sample on the spaced schedule uses the spaced index
    x0, eps = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    assert sp.q_sample(x0, torch.tensor([3]), eps).item() == pytest.approx(math.sqrt(base.alphas_cumprod[keep[3]]), rel=1e-6)


@pytest.mark.parametrize("method", ["ancestral", "ddim"])
def test_samplers_recover_a_point_mass_through_respacing(method):
    base = GaussianDiffusion.from_name("linear", 1000)
    x0 = torch.tensor([0.5, -0.25, 0.8]).reshape(1, 3, 1, 1).expand(1, 3, 4, 4).double()
    oracle = Oracle(base, x0)
    out = base.sample(oracle, 2, steps=25, method=method, image_size=4, channels=3,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, x0.float().expand(2, -1, -1, -1), rtol=0, atol=1e-4)


def test_sampling_is_deterministic_by_generator():
    d = GaussianDiffusion.from_name("linear", 1000).respace(space_timesteps(1000, "20"))
    rec = Recorder(learn_sigma=True)
    shape = (2, 3, 8, 8)

    def run(loop, seed, **kw):
        return getattr(d, loop)(rec, shape, generator=torch.Generator().manual_seed(seed), **kw)

    for loop, kw in (("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 0.0}), ("ddim_sample_loop", {"eta": 1.0})):
        a, b, c = run(loop, 1, **kw), run(loop, 1, **kw), run(loop, 2, **kw)
        assert a.shape == shape and torch.isfinite(a).all()
        assert torch.equal(a, b) and not torch.equal(a, c)
    # explicit noise replaces the generator's initial draw
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    a = d.ddim_sample_loop(rec, shape, noise=noise)
    b = d.ddim_sample_loop(rec, shape, noise=noise.clone())
    assert torch.equal(a, b)
    seen = []
    d.p_sample_loop(rec, shape, generator=torch.Generator().manual_seed(0), progress=lambda i, n: seen.append((i, n)))
    assert seen[0] == (1, 20) and seen[-1] == (20, 20)


def test_sample_with_a_real_unet():
    torch.manual_seed(0)
    model = get_preset("small32-spec").build().train()
    d = GaussianDiffusion.from_name("linear", 1000)
    a = d.sample(model, 1, steps=3, method="ddim", generator=torch.Generator().manual_seed(0))
    b = d.sample(model, 1, steps=3, method="ddim", generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
    assert model.training  # mode restored
    assert not a.requires_grad


def test_training_losses_fixed_variance_mse():
    d = GaussianDiffusion.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    model = Recorder()
    losses = d.training_losses(model, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    assert losses["mse"].shape == (4,)
    torch.testing.assert_close(losses["mse"].mean(), F.mse_loss(0.1 * x_t, noise))
    assert torch.equal(losses["loss"], losses["mse"]) and (losses["vb"] == 0).all()


def test_training_losses_hybrid_vb_trains_only_the_variance():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.3))
            self.b = torch.nn.Parameter(torch.tensor(0.2))

        def forward(self, x, t):
            return torch.cat([self.a * x, torch.tanh(self.b * x)], 1)

    d = GaussianDiffusion.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 300, 999])
    model = Lin()
    losses = d.training_losses(model, x0, t, generator=g)
    assert all(torch.isfinite(v).all() and v.shape == (4,) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()
    losses["vb"].sum().backward()
    assert model.a.grad is None or model.a.grad.item() == 0.0
    assert model.b.grad is not None and model.b.grad.item() != 0.0


def test_vb_is_decoder_nll_at_t0_and_kl_elsewhere():
    d = GaussianDiffusion.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    x_t = d.q_sample(x0, torch.tensor([0, 0]), torch.randn(2, 3, 4, 4, generator=g))
    out = torch.cat([torch.zeros_like(x0), torch.zeros_like(x0)], 1)
    vb = d._vb_terms_bpd(x0, x_t, torch.tensor([0, 5]), out)
    p = d.p_mean_variance(None, x_t, torch.tensor([0, 5]), clip=False, model_output=out)
    nll0 = -discretized_gaussian_log_likelihood(x0[:1], p["mean"][:1], 0.5 * p["log_variance"][:1]).mean() / math.log(2)
    assert vb[0].item() == pytest.approx(nll0.item(), rel=1e-6)
    tm, _, tlv = d.q_posterior_mean_variance(x0[1:], x_t[1:], torch.tensor([5]))
    kl1 = normal_kl(tm, tlv, p["mean"][1:], p["log_variance"][1:]).mean() / math.log(2)
    assert vb[1].item() == pytest.approx(kl1.item(), rel=1e-6)


def test_normal_kl_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    lv1, lv2 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-6
    torch.testing.assert_close(normal_kl(m1, 0.0, m2, 0.0), 0.5 * (m1 - m2) ** 2)


def test_discretized_likelihood_sums_to_one_over_bins():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.01, math.log(0.1)), (0.7, math.log(0.01)), (-0.95, math.log(0.5))]:
        lp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        if log_scale < math.log(0.2):  # narrow: the most likely bin is the nearest level
            assert lp.argmax().item() == int(torch.argmin((levels - mean).abs()))
        else:  # wide, near the edge: the end bin collects the whole tail below -1
            assert lp.argmax().item() == 0


def test_sample_timesteps_uniform_and_seeded():
    d = GaussianDiffusion.from_name("linear", 50)
    a = d.sample_timesteps(1000, torch.Generator().manual_seed(3))
    b = d.sample_timesteps(1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() == 49 and len(a.unique()) == 50
