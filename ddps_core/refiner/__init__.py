"""DDPS (Lai et al. 2023): a discrete-diffusion mask prior that refines a frozen base
segmentor's first prediction (docs/method.md).

* :mod:`ddps_core.refiner.multinomial` -- the uniform multinomial schedule (apart from the
  network): marginals, Gumbel-max sampling, posterior; network step t = T - 1 - s.
* :mod:`ddps_core.refiner.denoiser` -- the mask-embedding, time-conditioned U-Net and presets.
* :mod:`ddps_core.refiner.base` -- the base contract and an adapter for smp models.
* :mod:`ddps_core.refiner.train` -- Diffusion-on-First-Prediction training (resumable).
* :mod:`ddps_core.refiner.sample` -- Free-Re-noising inference and the refinement picture.
"""

from ddps_core.refiner.base import SegmentationBase, SmpBase, freeze, probe_features
from ddps_core.refiner.denoiser import (
    DENOISER_PRESETS,
    DenoiserConfig,
    MaskDenoiser,
    count_parameters,
    denoiser_preset,
    describe,
    parameter_counts,
)
from ddps_core.refiner.multinomial import MultinomialDiffusion, alpha_bar_schedule, gumbel_max, uniform_mask
from ddps_core.refiner.sample import RefineResult, free_renoising, refine_images, refinement_picture, refinement_steps
from ddps_core.refiner.train import DDPSTrainConfig, epoch_batches, load_denoiser, train_denoiser

__all__ = [
    "DENOISER_PRESETS",
    "DDPSTrainConfig",
    "DenoiserConfig",
    "MaskDenoiser",
    "MultinomialDiffusion",
    "RefineResult",
    "SegmentationBase",
    "SmpBase",
    "alpha_bar_schedule",
    "count_parameters",
    "denoiser_preset",
    "describe",
    "epoch_batches",
    "freeze",
    "gumbel_max",
    "load_denoiser",
    "parameter_counts",
    "probe_features",
    "free_renoising",
    "refine_images",
    "refinement_picture",
    "refinement_steps",
    "train_denoiser",
    "uniform_mask",
]
