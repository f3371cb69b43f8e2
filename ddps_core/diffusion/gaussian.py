"""Gaussian diffusion (DDPM / improved DDPM) as a schedule object, independent of the network.

The model is passed in as an argument wherever it is needed and is called as
``model(x_t, t, **model_kwargs)`` with the *raw integer timestep of the original schedule*
(docs/method.md): a respaced schedule maps its own step index back through ``timestep_map``;
nothing is rescaled to 0..1000.

Model outputs with twice the input channels (``learn_sigma``) are read as [eps, v] where v in
[-1, 1] interpolates the log variance between the clipped posterior variance and beta;
outputs with the input's channel count are eps with a fixed variance (``fixed_variance``:
"large" = betas as in guided-diffusion's default, "small" = the posterior variance).

Schedule arrays are float64 numpy; per-step values are gathered and returned as float32
tensors. All randomness comes from an optional ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]

Model = Callable[..., torch.Tensor]
Progress = Callable[[int, int], Any]


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas that reproduce the continuous ``alpha_bar`` at t = i / T, each capped at ``max_beta``."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """``"linear"``: linspace(s*1e-4, s*0.02, T) with s = 1000/T (T=1000 gives 1e-4..0.02);
    ``"cosine"``: improved DDPM, alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r} (expected 'linear' or 'cosine')")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Which steps of a ``num_timesteps`` schedule to keep (sorted list), guided-diffusion style.

    - ``"ddimN"``: the strided ``range(0, T, stride)`` with exactly N steps (DDIM paper);
    - ``"N"`` / ``N`` / ``"a,b,c"`` / ``[a, b, c]``: split the T steps into equal sections
      (the first ``T % len`` one step longer) and keep ``count`` evenly spaced steps
      (rounded, both ends included) in each section.

    For an explicit list of steps use :meth:`GaussianDiffusion.respace` directly.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            want = int(text[len("ddim") :])
            for stride in range(1, num_timesteps + 1):
                steps = list(range(0, num_timesteps, stride))
                if len(steps) == want:
                    return steps
            raise ValueError(f"cannot create exactly {want} steps with an integer stride from {num_timesteps}")
        counts = [int(c) for c in text.split(",") if c.strip()]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("no section counts given")

    size, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if count < 1 or count > length:
            raise ValueError(f"cannot take {count} steps from a section of {length} steps")
        if count == 1:
            kept.append(start)
        else:
            stride = (length - 1) / (count - 1)
            kept.extend(start + round(j * stride) for j in range(count))
        start += length
    return sorted(set(kept))


# --------------------------------------------------------------------------------------------
# distributions
# --------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), element-wise, in nats."""
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (a if isinstance(a, torch.Tensor) else torch.tensor(a).to(tensor) for a in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the reference decoder NLL."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, element-wise) of images in [-1, 1] quantised to 256 levels under a
    Gaussian discretised into bins of width 2/255; the end bins extend to +-infinity."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------------------------
# the schedule object
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A DDPM schedule with forward noising, posterior, model-based reverse steps, training
    losses and samplers.

    :param betas: 1-D float64 betas in (0, 1].
    :param fixed_variance: "large" or "small", used for models whose output has the input's
        channel count (no learned variance).
    :param timestep_map: ``timestep_map[i]`` is the original timestep of step i, passed to
        the model (identity when None).
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray,
        *,
        fixed_variance: str = "large",
        timestep_map: Sequence[int] | None = None,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        self.betas = betas
        self.num_timesteps = T = len(betas)
        self.fixed_variance = fixed_variance
        self.timestep_map = np.arange(T, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != (T,):
            raise ValueError("timestep_map must have one entry per step")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0: use the t = 1 value for the log
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_name(cls, schedule: str = "linear", num_timesteps: int = 1000, **kwargs: Any) -> GaussianDiffusion:
        return cls(get_named_beta_schedule(schedule, num_timesteps), **kwargs)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``arr[t]`` as a float32 tensor on ``like``'s device, broadcastable to ``like``."""
        idx = t.detach().to("cpu", torch.long).numpy()
        out = torch.from_numpy(np.asarray(arr[idx], dtype=np.float32)).to(like.device)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original-schedule timesteps the model is called with for step indices ``t``."""
        return torch.from_numpy(self.timestep_map[t.detach().to("cpu", torch.long).numpy()]).to(t.device)

    def _call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> torch.Tensor:
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    @staticmethod
    def _randn(
        shape: Sequence[int],
        generator: torch.Generator | None,
        like: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Standard normal noise drawn on the generator's device, then moved to the target
        device (so a CPU generator gives the same numbers whatever device the model is on)."""
        if like is not None:
            shape, device, dtype = like.shape, like.device, like.dtype
        draw_device = generator.device if generator is not None else device
        noise = torch.randn(tuple(shape), generator=generator, device=draw_device)
        return noise.to(device=device, dtype=dtype or noise.dtype)

    # -- forward process ---------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, generator=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with per-sample step indices ``t``."""
        if noise is None:
            noise = self._randn(x_start.shape, generator, like=x_start)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # -- reverse process ---------------------------------------------------------------------

    def _split_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """(eps, log_variance) from a raw model output (learned-range or fixed variance)."""
        c = x.shape[1]
        if out.shape[1] == 2 * c:
            eps, v = out[:, :c], out[:, c:]
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(np.log(self.betas), t, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif out.shape[1] == c:
            eps = out
            if self.fixed_variance == "large":
                first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
                log_var_arr = np.log(np.append(first, self.betas[1:]))
            else:
                log_var_arr = self.posterior_log_variance_clipped
            log_variance = self._extract(log_var_arr, t, x).expand_as(x)
        else:
            raise ValueError(f"model output has {out.shape[1]} channels; expected {c} or {2 * c}")
        return eps, log_variance

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip: bool = True,
        model_kwargs: dict | None = None,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): dict with ``mean``, ``variance``, ``log_variance``,
        ``pred_xstart`` (clamped to [-1, 1] when ``clip``), ``eps`` and ``model_output``.
        ``model_output`` skips the model call (used for the frozen-mean VLB)."""
        out = self._call_model(model, x, t, model_kwargs) if model_output is None else model_output
        eps, log_variance = self._split_output(out, x, t)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
            "model_output": out,
        }

    def p_sample(self, model: Model, x, t, clip: bool = True, generator=None, model_kwargs=None):
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0). Returns (sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, clip=clip, model_kwargs=model_kwargs)
        noise = self._randn(x.shape, generator, like=x)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.dim() - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]

    def ddim_step(self, model: Model, x, t, clip: bool = True, eta: float = 0.0, generator=None, model_kwargs=None):
        """One DDIM step (Song et al. 2021, eq. 12). Returns (sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, clip=clip, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract(self.alphas_cumprod, t, x)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        sample = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta > 0:
            nonzero = (t != 0).float().reshape(-1, *([1] * (x.dim() - 1)))
            sample = sample + nonzero * sigma * self._randn(x.shape, generator, like=x)
        return sample, out["pred_xstart"]

    def _loop(self, step, model, shape, noise, generator, progress, device, **kw) -> torch.Tensor:
        if noise is not None:
            img = noise.to(device) if device is not None else noise
        else:
            if device is None:
                device = _model_device(model)
            img = self._randn(shape, generator, device=device)
        n = img.shape[0]
        total = self.num_timesteps
        for k, i in enumerate(reversed(range(total))):
            t = torch.full((n,), i, dtype=torch.long, device=img.device)
            img, _ = step(model, img, t, generator=generator, **kw)
            if progress is not None:
                progress(k + 1, total)
        return img

    @torch.inference_mode()
    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        progress: Progress | None = None,
        clip: bool = True,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or ``noise``) through every step of this
        schedule. ``progress(done, total)`` is called after each step."""
        return self._loop(self.p_sample, model, shape, noise, generator, progress, device, clip=clip, model_kwargs=model_kwargs)

    @torch.inference_mode()
    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        progress: Progress | None = None,
        clip: bool = True,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """DDIM sampling through every step of this schedule (deterministic for eta = 0)."""
        return self._loop(
            self.ddim_step, model, shape, noise, generator, progress, device, clip=clip, eta=eta, model_kwargs=model_kwargs
        )

    # -- respacing ---------------------------------------------------------------------------

    def respace(self, use_timesteps: Iterable[int]) -> SpacedDiffusion:
        """A schedule over a subset of this one's steps (same alphas_cumprod at kept steps);
        the model is still called with the original timesteps."""
        return SpacedDiffusion(self, use_timesteps)

    def sample(
        self,
        model: Model,
        n: int,
        steps: int | None = None,
        method: str = "ancestral",
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        clip: bool = True,
        progress: Progress | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` samples with ``steps`` evenly respaced steps (None: all steps) by
        ``method`` "ancestral" or "ddim". ``image_size``/``channels`` default to the model's
        ``image_size``/``in_channels`` attributes. The model is put in eval mode for the call
        and restored afterwards."""
        if method not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampling method {method!r} (expected 'ancestral' or 'ddim')")
        image_size = image_size or getattr(model, "image_size", None)
        channels = channels or getattr(model, "in_channels", 3)
        if image_size is None:
            raise ValueError("image_size is required for a model without an image_size attribute")
        diffusion: GaussianDiffusion = self
        if steps is not None and steps != self.num_timesteps:
            spacing: list[int] | None = None
            if method == "ddim":
                try:
                    spacing = space_timesteps(self.num_timesteps, f"ddim{steps}")
                except ValueError:
                    spacing = None
            diffusion = self.respace(spacing or space_timesteps(self.num_timesteps, str(steps)))
        shape = (n, channels, image_size, image_size)
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            if method == "ddim":
                return diffusion.ddim_sample_loop(
                    model, shape, eta=eta, generator=generator, progress=progress, clip=clip,
                    model_kwargs=model_kwargs, device=device,
                )
            return diffusion.p_sample_loop(
                model, shape, generator=generator, progress=progress, clip=clip, model_kwargs=model_kwargs, device=device
            )
        finally:
            if was_training:
                model.train()

    # -- training ----------------------------------------------------------------------------

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``n`` step indices drawn uniformly from [0, num_timesteps)."""
        draw_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=draw_device).to(device)

    def _vb_terms_bpd(self, x_start, x_t, t, model_output: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, the
        discretised Gaussian decoder NLL for t = 0. The model mean is not clipped."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip=False, model_output=model_output)  # type: ignore[arg-type]
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (shape (N,)): ``mse`` = mean_flat((eps - eps_hat)^2); for a
        learned-variance output also ``vb`` (bits/dim, computed on the detached eps so it
        only trains the variance; improved DDPM's hybrid objective without rescaling) and
        ``loss = mse + vb``. Without learned variance ``vb`` is zero and ``loss = mse``."""
        if noise is None:
            noise = self._randn(x_start.shape, generator, like=x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = self._call_model(model, x_t, t, model_kwargs)
        c = x_start.shape[1]
        if out.shape[1] == 2 * c:
            eps_hat = out[:, :c]
            frozen = torch.cat([eps_hat.detach(), out[:, c:]], dim=1)
            vb = self._vb_terms_bpd(x_start, x_t, t, frozen)
        elif out.shape[1] == c:
            eps_hat = out
            vb = torch.zeros(x_start.shape[0], device=x_start.device, dtype=out.dtype)
        else:
            raise ValueError(f"model output has {out.shape[1]} channels; expected {c} or {2 * c}")
        mse = mean_flat((noise - eps_hat) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


class SpacedDiffusion(GaussianDiffusion):
    """``base`` restricted to ``use_timesteps``: betas are recomputed so that the kept steps
    have the same alphas_cumprod; ``timestep_map`` sends step i to the original timestep."""

    def __init__(self, base: GaussianDiffusion, use_timesteps: Iterable[int]):
        keep = sorted({int(s) for s in use_timesteps})
        if not keep:
            raise ValueError("use_timesteps is empty")
        if keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {base.num_timesteps}), got {keep[0]}..{keep[-1]}")
        abar = base.alphas_cumprod[keep]
        prev = np.append(1.0, abar[:-1])
        betas = 1.0 - abar / prev
        super().__init__(betas, fixed_variance=base.fixed_variance, timestep_map=base.timestep_map[keep])
        self.base_num_timesteps = base.num_timesteps
        self.use_timesteps = keep


def _model_device(model: Model) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[union-attr]
    except (AttributeError, StopIteration):
        return torch.device("cpu")

