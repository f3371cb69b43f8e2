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
        "data": {"out": str(root / "dataset"), "added": str(root / "added"), "synthetic": dict(synthetic)},
        "ddpm": {"preset": "small32-spec", "checkpoint": str(root / "ckpt.pt"), "out": str(root / "ddpm")},
        **sections,
    }
    s = parse_settings(raw)
    prepare_dataset(s.data)
    use_checkpoint(s.ddpm)
    return raw


def pool_workspace(root: Path) -> dict[str, Any]:
    """A tiny workspace with a trained (tiny) teacher whose pool holds 5 distinct images, each
    3 times under other ids: the dataset is imported from a folder in the DDPM-Seg layout, so
    a rebuild of it keeps the copies. Writes ``root/params.yaml``; returns the raw settings."""
    import shutil

    import yaml

    from ddps_core import stages
    from ddps_core.config import parse_settings
    from ddps_core.datasets.stage import prepare_dataset

    raw = tiny_project(root, {"n_unlabeled": 5, "n_labeled": 4, "n_test": 2},
                       features={"steps": [10], "blocks": [1, 2], "shard_images": 4, "batch_size": 4,
                                 "out": str(root / "f")},
                       teacher={"baselines": [], "members": 2, "max_epochs": 1, "out": str(root / "teacher"),
                                "labels_out": str(root / "labels"), "min_class_pixels": 1})
    source = root / "source"
    shutil.copytree(root / "dataset", source)
    for p in sorted((source / "unlabeled").glob("*.png")):
        for copy in ("b", "c"):
            shutil.copy(p, source / "unlabeled" / f"{copy}_{p.name}")
    raw["data"].update(source="ddpm-seg", root=str(source), out=str(root / "imported"))
    s = parse_settings(raw)
    prepare_dataset(s.data)
    stages.get("extract").run(s)
    stages.get("train_teacher").run(s)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return raw
