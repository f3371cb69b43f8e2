"""Uniform multinomial (discrete) diffusion over K-class masks, as a schedule object apart
from the denoiser network (the DDPS mask prior).

State: every pixel holds one of K class labels; there is no absorbing [MASK] token, so noise
is the uniform distribution over the K classes. The forward marginal is closed form::

    q(x_s | x_0) = Cat(abar_s * onehot(x_0) + (1 - abar_s) / K)

Two step axes, on purpose kept apart by name:

- ``s`` (schedule step, 0..T-1) indexes the *forward* process: ``abar_0 = a1 = 0.99999``
  (nearly clean); ``abar_{T-1}`` is ``aT = 9e-6`` under the linear schedule and a little
  above it under the cosine one (nearly uniform either way, see :func:`alpha_bar_schedule`).
- ``t`` (network step) is what the denoiser is conditioned on and what the samplers iterate:
  ``t = T - 1 - s``. So t = 0 is the noisiest input (the first prediction is made there) and
  t = T-1 is nearly clean. Every method of :class:`MultinomialDiffusion` takes ``s``;
  :meth:`MultinomialDiffusion.s_from_t` converts.

Computations are in log space (log-probabilities, ``logaddexp``), because the one-hot input
has exact zeros and the schedule reaches abar ~ 1e-5: products of tiny probabilities lose
precision, sums of logs do not. Sampling is Gumbel-max on the log-probabilities. All
randomness comes from an optional :class:`torch.Generator`; noise is drawn on the generator's
device and then moved, so a CPU generator gives the same numbers whatever device the tensors
live on (the convention of :mod:`ddps_core.diffusion.gaussian`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "A1",
    "AT",
    "MultinomialDiffusion",
    "alpha_bar_schedule",
    "gumbel_max",
    "index_to_log_onehot",
    "uniform_mask",
]

A1 = 0.99999  # abar at s = 0 (the DDPS reference's att_1)
AT = 9e-6  # the reference's att_T: abar at s = T - 1 (linear), the floor (cosine)
_LOG_ZERO_CLAMP = 1e-30  # log(0) stand-in: exp(log(1e-30)) underflows to 0 in any product


def alpha_bar_schedule(num_timesteps: int, schedule: str = "linear", a1: float = A1, aT: float = AT) -> np.ndarray:
    """``abar_s`` for s = 0..T-1 as float64: the two schedules of the DDPS reference.

    - ``"linear"``: ``abar_s = a1 + s / (T-1) * (aT - a1)``; exactly ``a1`` at s = 0 and
      ``aT`` at s = T-1.
    - ``"cosine"`` (the reference calls it ``cos``):
      ``abar_s = aT + (a1 - aT) * (cos((s + T) * pi / (2T)) + 1) ** 2``. Since
      ``cos((s + T) pi / (2T)) = -sin(s pi / (2T))`` this is ``(1 - sin(s pi / (2T)))^2``
      mapped onto ``[aT, a1]``: it starts at ``a1`` and falls fastest at the start. It does
      not reach ``aT``: at s = T-1 the bracket is ``(1 - cos(pi / (2T)))^2``, so
      ``abar_{T-1}`` is about 1.9e-5 at T = 20 and 1.6e-4 at T = 10. The t = 0 input of
      training and sampling is exact uniform noise (:func:`uniform_mask`) under either
      schedule, so this gap only enters through ``q_sample`` at s = T-1.

    The reference evaluates both in float32 (torch's default dtype); the float64 values here
    agree with its numbers to float32 rounding (relative 3e-6 at most, at the smallest cosine
    values, where ``cos + 1`` cancels). Its numpy twin of the cosine schedule uses the
    exponent 3; the torch one, which its segmentation heads use, the exponent 2, as here.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if not 0.0 < aT < a1 <= 1.0:
        raise ValueError(f"need 0 < aT < a1 <= 1, got a1={a1}, aT={aT}")
    T = int(num_timesteps)
    s = np.arange(T, dtype=np.float64)
    if schedule == "linear":
        return a1 + s / (T - 1) * (aT - a1)
    if schedule == "cosine":
        return aT + (a1 - aT) * (np.cos((s + T) * math.pi / (2 * T)) + 1.0) ** 2
    raise ValueError(f"unknown multinomial schedule {schedule!r} (expected 'linear' or 'cosine')")


def index_to_log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Long labels ``[B, *spatial]`` -> float32 log one-hot ``[B, K, *spatial]`` (log 0 -> -69)."""
    if x.dtype != torch.long:
        x = x.long()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(x.min())}..{int(x.max())}")
    onehot = F.one_hot(x, num_classes).movedim(-1, 1).float()
    return torch.log(onehot.clamp(min=_LOG_ZERO_CLAMP))


def _draw_uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=draw_device).to(device)


def gumbel_max(log_probs: torch.Tensor, generator: torch.Generator | None = None, dim: int = 1) -> torch.Tensor:
    """One categorical sample per position: ``argmax(log_probs + Gumbel noise)`` along ``dim``.

    Gumbel-max needs no normalisation, so un-normalised log-probabilities are fine; it is exact
    (not a relaxation) and works on the log scale where the probabilities live.
    """
    u = _draw_uniform(log_probs.shape, generator, log_probs.device)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-30, max=1.0 - 1e-7)))
    return (log_probs.float() + gumbel).argmax(dim=dim)


def uniform_mask(shape: Sequence[int], num_classes: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly random mask (long, ``shape``): the exact t = 0 input of training and sampling.

    ``q(x_{T-1} | x_0)`` is uniform only to within ``aT``; the reference starts from exact
    uniform noise, which also does not depend on any x_0.
    """
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randint(0, num_classes, tuple(shape), generator=generator, device=draw_device).to(device)


class MultinomialDiffusion:
    """The uniform multinomial forward process with ``T`` steps over ``K`` classes.

    :param num_classes: K.
    :param num_timesteps: T.
    :param schedule: ``"linear"`` (the reference's default) or ``"cosine"``, see
        :func:`alpha_bar_schedule`.
    :param a1, aT: the schedule's parameters: abar at s = 0, and abar at s = T-1 (linear) or
        the value the cosine schedule falls towards.

    Arrays (float64 numpy, indexed by s): ``alphas_cumprod`` (abar_s) and ``alphas`` (the
    one-step keep probabilities ``alpha_s = abar_s / abar_{s-1}``, ``alpha_0 = abar_0``),
    which define ``q(x_s | x_{s-1}) = Cat(alpha_s onehot(x_{s-1}) + (1 - alpha_s) / K)`` and
    therefore the posterior.
    """

    def __init__(self, num_classes: int, num_timesteps: int = 20, schedule: str = "linear",
                 a1: float = A1, aT: float = AT):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_timesteps = int(num_timesteps)
        self.schedule = schedule
        self.a1, self.aT = float(a1), float(aT)
        self.alphas_cumprod = alpha_bar_schedule(num_timesteps, schedule, a1, aT)
        self.alphas = self.alphas_cumprod / np.append(1.0, self.alphas_cumprod[:-1])
        self.log_alphas_cumprod = np.log(self.alphas_cumprod)
        self.log_1_min_alphas_cumprod = np.log1p(-self.alphas_cumprod)
        self.log_alphas = np.log(self.alphas)
        self.log_1_min_alphas = np.log1p(-self.alphas)
        # log q(x_s = k | x_0) for k == x_0 and k != x_0 (what q_sample selects between)
        self.log_other = self.log_1_min_alphas_cumprod - math.log(self.num_classes)
        self.log_keep = np.logaddexp(self.log_alphas_cumprod, self.log_other)

    # -- step axes ---------------------------------------------------------------------------

    @property
    def timesteps(self) -> list[int]:
        """Network steps 0..T-1 in sampling order (noisiest first)."""
        return list(range(self.num_timesteps))

    def s_from_t(self, t: torch.Tensor | int) -> torch.Tensor | int:
        """Schedule step of network step ``t``: ``s = T - 1 - t`` (the map is its own inverse)."""
        return self.num_timesteps - 1 - t

    t_from_s = s_from_t

    # -- helpers -----------------------------------------------------------------------------

    def _check_s(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s).long()
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= self.num_timesteps):
            raise ValueError(f"schedule steps must be in 0..{self.num_timesteps - 1}, got {s.tolist()}")
        return s

    @staticmethod
    def _extract(arr: np.ndarray, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``arr[s]`` as float32 on ``like``'s device, broadcastable to ``like`` ([B, 1, 1, ...])."""
        idx = s.detach().to("cpu", torch.long).reshape(-1).numpy()
        out = torch.from_numpy(np.asarray(arr[idx], dtype=np.float32)).to(like.device)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def _per_sample(self, s: torch.Tensor | int, batch: int) -> torch.Tensor:
        s = self._check_s(s)
        return s.expand(batch) if s.dim() == 0 else s

    # -- forward process ---------------------------------------------------------------------

    def q_pred(self, log_x0: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
        """log q(x_s | x_0) = log(abar_s * x_0 + (1 - abar_s) / K), ``[B, K, ...]``.

        ``log_x0`` may be a log one-hot or any log-distribution over the K classes (the
        marginal is linear in x_0's probabilities). ``s``: per-sample long ``[B]`` or a scalar.
        """
        s = self._per_sample(s, log_x0.shape[0])
        log_x0 = log_x0.float()
        return torch.logaddexp(
            log_x0 + self._extract(self.log_alphas_cumprod, s, log_x0),
            self._extract(self.log_1_min_alphas_cumprod, s, log_x0) - math.log(self.num_classes),
        )

    def q_pred_one_step(self, log_x_prev: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
        """log q(x_s | x_{s-1}) = log(alpha_s * x_{s-1} + (1 - alpha_s) / K).

        The transition matrix is symmetric, so the same expression read as a function of
        x_{s-1} with x_s plugged in gives the likelihood term of the posterior.
        """
        s = self._per_sample(s, log_x_prev.shape[0])
        log_x_prev = log_x_prev.float()
        return torch.logaddexp(
            log_x_prev + self._extract(self.log_alphas, s, log_x_prev),
            self._extract(self.log_1_min_alphas, s, log_x_prev) - math.log(self.num_classes),
        )

    def q_sample(self, x0: torch.Tensor, s: torch.Tensor | int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_s ~ q(x_s | x_0) for long labels ``x0 [B, ...]``; returns long ``[B, ...]``.

        Free re-noising and Diffusion-on-First-Prediction both noise an argmax straight from
        this marginal (never through the posterior). The log-probabilities of a one-hot x_0
        take two values per step, ``log(abar + (1 - abar) / K)`` at x_0 and
        ``log((1 - abar) / K)`` elsewhere, so they are selected by comparison instead of
        building a one-hot: no validation pass over x0 and no host sync on the sampler's hot
        path (labels outside 0..K-1 would be sampled as pure noise; callers pass argmaxes or
        validated labels). Same distribution as ``gumbel_max(q_pred(log_onehot(x0), s))``.
        """
        s = self._per_sample(s, x0.shape[0])
        x0 = x0.long()
        shape = (x0.shape[0], 1, *x0.shape[1:])
        like = x0.new_empty(shape, dtype=torch.float32)
        log_keep = self._extract(self.log_keep, s, like)
        log_other = self._extract(self.log_other, s, like)
        classes = torch.arange(self.num_classes, device=x0.device).reshape(1, -1, *([1] * (x0.dim() - 1)))
        log_probs = torch.where(x0[:, None] == classes, log_keep, log_other)
        return gumbel_max(log_probs, generator, dim=1)

    def q_posterior(self, log_x0: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
        """log q(x_{s-1} | x_s, x_0), normalised over the K classes, ``[B, K, ...]``.

        Bayes: ``q(x_{s-1} | x_s, x_0) ∝ q(x_s | x_{s-1}) q(x_{s-1} | x_0)``. For a predicted
        distribution over x_0 (``log_x0`` not one-hot), x_0 is plugged in through its
        probabilities, as multinomial diffusion does (the marginal is linear in them).
        At s = 0 there is no earlier state; the result is ``log_x0`` normalised.

        Not used by the DDPS samplers (they re-noise from the marginal); an option for
        experiments with ancestral sampling.
        """
        s = self._per_sample(s, log_x0.shape[0])
        log_x0 = log_x0.float()
        if x_s.dtype == torch.long:
            log_x_s = index_to_log_onehot(x_s, self.num_classes)
        else:
            log_x_s = x_s.float()
        prev = (s - 1).clamp(min=0)
        log_prior = self.q_pred(log_x0, prev)
        first = (s == 0).to(log_x0.device).reshape(-1, *([1] * (log_x0.dim() - 1)))
        log_prior = torch.where(first, log_x0, log_prior)
        log_like = self.q_pred_one_step(log_x_s, s)
        log_like = torch.where(first, torch.zeros_like(log_like), log_like)
        unnorm = log_prior + log_like
        return unnorm - torch.logsumexp(unnorm, dim=1, keepdim=True)

    def marginal_probs(self, x0: torch.Tensor, s: torch.Tensor | int) -> torch.Tensor:
        """``q(x_s | x_0)`` as probabilities (for inspection and tests)."""
        return self.q_pred(index_to_log_onehot(x0, self.num_classes), s).exp()

    def to_dict(self) -> dict:
        """What identifies the schedule (stored with a trained denoiser).

        ``a1`` / ``aT`` are the parameters, not ``abar`` at the end points: the cosine
        schedule ends above ``aT``, and rebuilding it from its last value would shift it.
        """
        return {"num_classes": self.num_classes, "num_timesteps": self.num_timesteps,
                "schedule": self.schedule, "a1": self.a1, "aT": self.aT}
