"""Diffusion models: a guided-diffusion compatible UNet, its presets and safe checkpoint
I/O, and the Gaussian diffusion schedule (forward process, losses, samplers)."""

from .checkpoint import load_state_dict, load_unet, save_unet, state_dict_hash
from .gaussian import (
    GaussianDiffusion,
    SpacedDiffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)
from .nn import timestep_embedding
from .presets import PRESETS, get_preset, list_presets
from .unet import UNetConfig, UNetModel, create_model, make_config, randomize_zero_init_

__all__ = [
    "PRESETS",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "UNetConfig",
    "UNetModel",
    "create_model",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "get_preset",
    "list_presets",
    "load_state_dict",
    "load_unet",
    "make_config",
    "normal_kl",
    "randomize_zero_init_",
    "save_unet",
    "space_timesteps",
    "state_dict_hash",
    "timestep_embedding",
]
