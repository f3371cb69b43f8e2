"""Shared builders of tiny on-disk projects for stage tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_project(root: Path, synthetic: dict[str, int], **sections: dict[str, Any]) -> dict[str, Any]:
    """A synthetic dataset and a random ``small32-spec`` checkpoint adopted as the DDPM, under
    ``root``; returns the raw settings (``sections`` are merged over the defaults)."""
    from ddps_core.config import parse_settings
    from ddps_core.datasets.stage import prepare_dataset
    from ddps_core.diffusion.presets import get_preset
    from ddps_core.diffusion.stage import use_checkpoint
    from ddps_core.diffusion.unet import randomize_zero_init_

    torch.manual_seed(0)
    model = get_preset("small32-spec").build()
    randomize_zero_init_(model, torch.Generator().manual_seed(1))
    torch.save(model.state_dict(), root / "ckpt.pt")
    raw: dict[str, Any] = {
        "device": "cpu",
        "data": {"out": str(root / "dataset"), "synthetic": dict(synthetic)},
        "ddpm": {"preset": "small32-spec", "checkpoint": str(root / "ckpt.pt"), "out": str(root / "ddpm")},
        **sections,
    }
    s = parse_settings(raw)
    prepare_dataset(s.data)
    use_checkpoint(s.ddpm)
    return raw
