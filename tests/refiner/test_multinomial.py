"""DDPS multinomial schedule: closed forms of the marginal, Gumbel-max sampling, the posterior
against Bayes' rule by hand, and the step axes (t = T - 1 - s)."""

import math

import numpy as np
import pytest
import torch

from ddps_core.refiner.multinomial import (
    A1,
    AT,
    MultinomialDiffusion,
    alpha_bar_schedule,
    gumbel_max,
    index_to_log_onehot,
    uniform_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# The DDPS reference's constants and its two abar formulas, written out here with numpy so
# the schedule is checked against the reference's definition, not against itself.
REF_A1, REF_AT = 0.99999, 0.000009


def _reference_abar(T: int, schedule: str) -> np.ndarray:
    s = np.arange(T, dtype=np.float64)
    if schedule == "linear":
        return REF_A1 + s / (T - 1) * (REF_AT - REF_A1)
    return REF_AT + (REF_A1 - REF_AT) * (np.cos((s + T) * np.pi / (2 * T)) + 1) ** 2


def test_reference_constants():
    assert (A1, AT) == (REF_A1, REF_AT)


@pytest.mark.parametrize("T", [10, 20])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_is_the_reference_formula(schedule, T):
    abar = alpha_bar_schedule(T, schedule)
    assert abar.dtype == np.float64 and abar.shape == (T,)
    np.testing.assert_allclose(abar, _reference_abar(T, schedule), rtol=1e-13, atol=0)
    assert np.all(np.diff(abar) < 0)
    assert abar[0] == pytest.approx(REF_A1, abs=1e-15)
    # abar at s = T-1: exactly aT for linear; for cosine the bracket is (1 - cos(pi / 2T))^2
    last = REF_AT if schedule == "linear" else REF_AT + (REF_A1 - REF_AT) * (1 - math.cos(math.pi / (2 * T))) ** 2
    assert abar[-1] == pytest.approx(last, rel=1e-12)


def test_cosine_schedule_hand_values():
    # cos((s + T) pi / 2T) = -sin(s pi / 2T); at T = 10, s = 5 the bracket is (1 - sin(pi/4))^2
    abar = alpha_bar_schedule(10, "cosine")
    assert abar[5] == pytest.approx(9e-6 + 0.999981 * (1 - 2 ** -0.5) ** 2, rel=1e-12)  # 0.0857938...
    assert abar[5] == pytest.approx(0.08579381, abs=5e-9)
    assert abar[-1] == pytest.approx(1.6058e-4, rel=1e-4)  # the cosine schedule stops above aT
    assert alpha_bar_schedule(20, "cosine")[-1] == pytest.approx(1.851e-5, rel=1e-3)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_round_trips_through_to_dict(schedule):
    sch = MultinomialDiffusion(5, 10, schedule)
    d = sch.to_dict()
    assert (d["a1"], d["aT"]) == (REF_A1, REF_AT)
    again = MultinomialDiffusion(d["num_classes"], d["num_timesteps"], d["schedule"], d["a1"], d["aT"])
    np.testing.assert_array_equal(again.alphas_cumprod, sch.alphas_cumprod)


def test_one_step_alphas_compose_to_the_marginal():
    sch = MultinomialDiffusion(4, 10)
    assert np.allclose(np.cumprod(sch.alphas), sch.alphas_cumprod, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("K", [2, 7, 150])
def test_marginals_sum_to_one_and_end_points(schedule, K):
    T = 20
    sch = MultinomialDiffusion(K, T, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (T, 5, 3), generator=g)
    s = torch.arange(T)
    probs = sch.marginal_probs(x0, s).double()
    assert probs.shape == (T, K, 5, 3)
    assert torch.allclose(probs.sum(1), torch.ones(()).double(), atol=1e-5)
    # network step t = 0 (s = T-1): uniform to abar_{T-1} (9e-6 linear, 1.85e-5 cosine)
    t0 = probs[sch.s_from_t(0)]
    assert (t0 - 1.0 / K).abs().max() < (1e-5 if schedule == "linear" else 2e-5)
    # network step t = T-1 (s = 0): one-hot of x0 to 1e-4
    tl = probs[sch.s_from_t(T - 1)]
    onehot = torch.nn.functional.one_hot(x0[0], K).movedim(-1, 0).double()
    assert (tl - onehot).abs().max() < 1e-4
    # every step: exactly abar * onehot + (1 - abar) / K
    expect = sch.alphas_cumprod[:, None, None, None] * torch.nn.functional.one_hot(x0, K).movedim(-1, 1).double().numpy() \
        + (1 - sch.alphas_cumprod[:, None, None, None]) / K
    assert np.allclose(probs.numpy(), expect, atol=2e-6)


def test_step_axes():
    sch = MultinomialDiffusion(3, 20)
    assert sch.s_from_t(0) == 19 and sch.s_from_t(19) == 0 and sch.t_from_s(5) == 14
    assert sch.timesteps == list(range(20))
    assert torch.equal(sch.s_from_t(torch.tensor([0, 3])), torch.tensor([19, 16]))
    with pytest.raises(ValueError):
        sch.q_pred(index_to_log_onehot(torch.zeros(1, 2, 2, dtype=torch.long), 3), 20)


def test_gumbel_max_frequencies_match_probs():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    n = 20000
    g = torch.Generator().manual_seed(1)
    logp = probs.log()[None].expand(n, -1) + 3.7  # unnormalised is fine for Gumbel-max
    draws = gumbel_max(logp, g, dim=1)
    counts = torch.bincount(draws, minlength=5).double()
    expected = probs.double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_q_sample_frequencies_and_determinism():
    K, T = 4, 10
    sch = MultinomialDiffusion(K, T)
    x0 = torch.full((1, 100, 100), 2, dtype=torch.long)
    s = 6
    a = sch.q_sample(x0, s, torch.Generator().manual_seed(3))
    b = sch.q_sample(x0, s, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == x0.shape
    keep = sch.alphas_cumprod[s] + (1 - sch.alphas_cumprod[s]) / K
    expected = np.array([(1 - keep) / (K - 1)] * K)
    expected[2] = keep
    counts = torch.bincount(a.reshape(-1), minlength=K).double().numpy()
    chi2 = float(((counts - expected * a.numel()) ** 2 / (expected * a.numel())).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_q_sample_is_gumbel_max_of_q_pred():
    sch = MultinomialDiffusion(6, 20)
    x0 = torch.randint(0, 6, (3, 9, 7), generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0, 11, 19])
    fast = sch.q_sample(x0, s, torch.Generator().manual_seed(2))
    slow = gumbel_max(sch.q_pred(index_to_log_onehot(x0, 6), s), torch.Generator().manual_seed(2))
    assert torch.equal(fast, slow)
    assert (fast[0] == x0[0]).all()  # s = 0: abar = 0.99999, nothing flips in 63 pixels


def test_uniform_mask_is_uniform():
    m = uniform_mask((4, 50, 50), 5, torch.Generator().manual_seed(0))
    counts = torch.bincount(m.reshape(-1), minlength=5).double()
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert m.min() >= 0 and m.max() < 5 and chi2 < 18.47


def _bayes_posterior(sch, x0, x_s, s):
    """q(x_{s-1} = i | x_s, x_0) by hand: transition matrices and Bayes' rule in float64."""
    K = sch.num_classes
    eye = np.eye(K)
    q_step = sch.alphas[s] * eye + (1 - sch.alphas[s]) / K  # Q_s[i, j] = q(x_s = j | x_{s-1} = i)
    q_bar_prev = sch.alphas_cumprod[s - 1] * eye + (1 - sch.alphas_cumprod[s - 1]) / K  # q(x_{s-1} = i | x_0)
    unnorm = np.array([q_step[i, x_s] * q_bar_prev[x0, i] for i in range(K)])
    # q(x_s | x_0) computed independently as the normaliser
    q_bar = sch.alphas_cumprod[s] * eye + (1 - sch.alphas_cumprod[s]) / K
    assert math.isclose(unnorm.sum(), q_bar[x0, x_s], rel_tol=1e-10)
    return unnorm / q_bar[x0, x_s]


@pytest.mark.parametrize("x0,x_s,s", [(0, 1, 2), (2, 2, 4), (1, 0, 1), (0, 0, 5)])
def test_posterior_matches_bayes_by_hand(x0, x_s, s):
    sch = MultinomialDiffusion(3, 6)
    log_post = sch.q_posterior(
        index_to_log_onehot(torch.tensor([[[x0]]]), 3), torch.tensor([[[x_s]]]), torch.tensor([s]))
    got = log_post.exp()[0, :, 0, 0].double().numpy()
    assert np.allclose(got, _bayes_posterior(sch, x0, x_s, s), atol=1e-6)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_posterior_at_s0_is_x0():
    sch = MultinomialDiffusion(3, 6)
    log_post = sch.q_posterior(index_to_log_onehot(torch.tensor([[[2]]]), 3), torch.tensor([[[0]]]), 0)
    assert torch.allclose(log_post.exp()[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
