"""Named UNet configurations.

=============== ============================================================================
``adm-256-lsun`` The official guided-diffusion 256x256 unconditional config used by the
                 released ffhq.pt / lsun_{bedroom,cat,horse}.pt checkpoints: 256 channels, 2
                 res blocks, channel_mult (1,1,2,2,4,4), attention at 32,16,8 with 64-channel
                 heads, learn_sigma, resblock_updown, scale-shift norm, dropout 0.1,
                 use_fp16 (552,814,086 parameters). Pass ``use_fp16=False`` to compute in
                 float32 (e.g. on CPU).
``small32-spec`` The tiny reference config of ``guided_diffusion_small32_keys.txt``: 32x32,
                 32 channels, 1 res block, channel_mult (1,2), attention at 16 (ds 2),
                 16-channel heads, learn_sigma, resblock_updown, scale-shift (828,358
                 parameters). Used to test checkpoint compatibility.
``tiny32``       This project's CPU default for the 32x32 synthetic domain (docs/method.md): 32
                 channels, 1 res block per level, channel_mult (1,2,2), attention at 16 and 8
                 with 32-channel heads, learn_sigma, resblock_updown, scale-shift, no dropout
                 (~1.4 M parameters).
``tiny64``       The same recipe for 64x64 images: channel_mult (1,2,2,2), attention at 16
                 and 8 (~1.9 M parameters).
=============== ============================================================================
"""

from __future__ import annotations

from typing import Any

from ddps_core.errors import ConfigError

from .unet import UNetConfig, make_config

__all__ = ["PRESETS", "get_preset", "list_presets"]

PRESETS: dict[str, UNetConfig] = {
    "adm-256-lsun": UNetConfig(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions="32,16,8",
        num_heads=4,
        num_head_channels=64,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=0.1,
        use_fp16=True,
    ),
    "small32-spec": UNetConfig(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions="16",
        num_head_channels=16,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=0.0,
    ),
    "tiny32": UNetConfig(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2, 2),
        attention_resolutions="16,8",
        num_head_channels=32,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=0.0,
    ),
    "tiny64": UNetConfig(
        image_size=64,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2, 2, 2),
        attention_resolutions="16,8",
        num_head_channels=32,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=0.0,
    ),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> UNetConfig:
    """The named :class:`UNetConfig` with ``overrides`` applied.

    Unknown names or override keys raise :class:`~ddps_core.errors.ConfigError`.
    """
    try:
        base = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown UNet preset {name!r}; valid presets: {', '.join(list_presets())}") from None
    return make_config(base, **overrides)
