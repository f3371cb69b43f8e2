"""Export of the filtered, teacher-labelled dataset as ordinary files (docs/method.md).

Layout of ``<out>/`` (readable by :class:`~ddps_core.datasets.GenericFolder` on ``<out>``)::

    images/<id>.png             kept images (RGB; sampled ones at the model size, real and pool
                                ones at the size their labels have)
    masks/<id>.png              their labels (uint8 class ids; the ignore index where a real
                                label has it)
    soft/<id>.npy               with the teacher's soft labels (``teacher.soft_labels``): the
    soft/<id>_uncertainty.png   kept teacher-labelled images' mean softmax (float16 [K, H, W]) and
                                Jensen-Shannon map (0..255 for 0..ln M), at the mask's size
    rejected/images|masks/      the candidates the filter dropped, for inspection
    manifest.parquet            one row per candidate, kept or not (see MANIFEST_COLUMNS)
    classes.yaml                {classes: [...], num_classes: K}
    contact_sheet.png           the most and least certain candidates of each source
    ddpm-seg/                   with format ddpm-seg: real/train/<id>.png + <id>.npy, classes.yaml

Exported ids are prefixed by source (``pool_<id>``, ``real_<id>``; generated images are
already ``gen_<index>``), so ids of different sources never collide.

The folder is built next to ``out`` (``.<name>.partial``) and put in place with two renames
once complete, so ``out`` is always either the previous export or the new one, never a mix.
The files inside the build folder are written plainly and made durable by one ``os.sync``
before the swap (fsyncing thousands of small files one by one costs more than the export).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ddps_core.datasets.common import npy_bytes, png_bytes
from ddps_core.errors import DataError
from ddps_core.io import atomic_path, partial_folder, swap_folder

__all__ = ["MANIFEST_COLUMNS", "Candidate", "contact_sheet", "export_dataset", "soft_files"]

MANIFEST_COLUMNS = [
    "image_id", "source", "source_id", "score", "rank", "kept", "reason", "image", "mask", "soft",
    "sampler_method", "sampler_steps", "sampler_seed", "teacher",
]


@dataclass
class Candidate:
    """One labelled image offered to the filter (or a real labelled image).

    ``load`` returns ``(image uint8 [S, S, 3], mask [S, S])`` when the image is exported, so
    that nothing is held in memory for the whole set.
    """

    image_id: str
    source: str  # generated | pool | real
    source_id: str
    score: float | None
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    sampler: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    soft: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    """Its soft labels, when it has them: ``(mean softmax float16 [K, H, W], uncertainty uint8
    [H, W])`` at the mask's size."""


def soft_files(image_id: str) -> tuple[str, str]:
    """Where an image's soft labels and its uncertainty map lie in the export (relative)."""
    return f"soft/{image_id}.npy", f"soft/{image_id}_uncertainty.png"


def _class_fractions(mask: np.ndarray, k: int) -> dict[str, float]:
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=k)
    return {f"frac_{c}": float(counts[c]) / mask.size for c in range(k)}


def export_dataset(out: str | Path, candidates: Sequence[Candidate], decisions: pd.DataFrame,
                   class_names: Sequence[str], *, ignore_index: int = 255,
                   ddpm_seg: bool = False, contact: int = 8, settings_text: str = "",
                   progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Write the export (see the module doc); returns the manifest.

    :param decisions: ``image_id, rank, kept, reason`` for every candidate with a score
        (e.g. :func:`~ddps_core.generate.filter.filter_scores` per source); candidates
        without a score (real images) are always kept, with reason ``real``.
    :param settings_text: identifies the export: a build folder left by a killed export with
        the same text is reused, one with another is discarded.
    """
    out = Path(out)
    k = len(class_names)
    if k > 255:
        raise DataError(f"{out}: {k} classes do not fit the uint8 masks of the export")
    dec = decisions.set_index("image_id") if len(decisions) else None
    build = partial_folder(out, settings_text)
    for sub in ("images", "masks", "soft", "rejected/images", "rejected/masks"):
        (build / sub).mkdir(parents=True, exist_ok=True)
    if ddpm_seg:
        (build / "ddpm-seg/real/train").mkdir(parents=True, exist_ok=True)
    rows = []
    seen: set[str] = set()
    for n, cand in enumerate(candidates, 1):
        if cand.image_id in seen:
            raise DataError(f"{out}: two candidates export as {cand.image_id!r}")
        seen.add(cand.image_id)
        if cand.score is None:
            rank, kept, reason = None, True, "real"
        else:
            if dec is None or cand.image_id not in dec.index:
                raise ValueError(f"no filter decision for {cand.image_id!r}")
            d = dec.loc[cand.image_id]
            rank, kept, reason = int(d["rank"]), bool(d["kept"]), str(d["reason"])
        image, mask = cand.load()
        if image.shape[:2] != mask.shape:
            raise DataError(f"{cand.image_id}: image {image.shape[:2]} and mask {mask.shape} differ")
        top = "" if kept else "rejected/"
        (build / f"{top}images/{cand.image_id}.png").write_bytes(png_bytes(image))
        (build / f"{top}masks/{cand.image_id}.png").write_bytes(png_bytes(mask.astype(np.uint8)))
        soft = None
        if kept and cand.soft is not None:
            probs, heat = cand.soft()
            if probs.shape != (k, *mask.shape) or heat.shape != mask.shape:
                raise DataError(f"{cand.image_id}: soft labels {probs.shape} / {heat.shape} do not match "
                                f"{k} classes of its {mask.shape} mask; rerun the label stage")
            soft, heat_file = soft_files(cand.image_id)
            (build / soft).write_bytes(npy_bytes(probs.astype(np.float16)))
            (build / heat_file).write_bytes(png_bytes(heat.astype(np.uint8)))
        if kept and ddpm_seg:
            (build / f"ddpm-seg/real/train/{cand.image_id}.png").write_bytes(png_bytes(image))
            (build / f"ddpm-seg/real/train/{cand.image_id}.npy").write_bytes(npy_bytes(mask.astype(np.uint8)))
        rows.append({
            "image_id": cand.image_id, "source": cand.source, "source_id": cand.source_id,
            "score": np.nan if cand.score is None else float(cand.score), "rank": rank,
            "kept": kept, "reason": reason,
            "image": f"{top}images/{cand.image_id}.png", "mask": f"{top}masks/{cand.image_id}.png", "soft": soft,
            "sampler_method": cand.sampler.get("method"), "sampler_steps": cand.sampler.get("steps"),
            "sampler_seed": cand.sampler.get("seed"), "teacher": cand.teacher,
            **_class_fractions(np.where(mask == ignore_index, k, mask), k),
        })
        if progress is not None:
            progress(n, len(candidates))
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *(f"frac_{c}" for c in range(k))])
    manifest["rank"] = manifest["rank"].astype("Int64")
    manifest["sampler_steps"] = manifest["sampler_steps"].astype("Int64")
    manifest["sampler_seed"] = manifest["sampler_seed"].astype("Int64")
    if not manifest["kept"].any():
        raise DataError(f"{out}: the filter kept no image; lower generate.drop_certain / "
                        "generate.drop_uncertain or raise generate.max_score")
    with atomic_path(build / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    classes = yaml.safe_dump({"classes": list(class_names), "num_classes": k}, sort_keys=False)
    (build / "classes.yaml").write_text(classes)
    if ddpm_seg:
        (build / "ddpm-seg/classes.yaml").write_text(classes)
    if contact:
        sheet = contact_sheet(build, manifest, contact, ignore_index)
        if sheet is not None:
            from ddps_core.viz import save_png

            save_png(sheet, build / "contact_sheet.png")
    stats = summary(manifest)
    (build / "summary.json").write_text(json.dumps(stats, indent=2))
    os.sync()
    swap_folder(build, out)
    return manifest


def summary(manifest: pd.DataFrame) -> dict[str, Any]:
    """Filtering statistics per source: candidates, kept, dropped per reason, score range."""
    stats: dict[str, Any] = {}
    for source, part in manifest.groupby("source", sort=False):
        reasons = part["reason"].value_counts().to_dict()
        kept = part[part["kept"]]
        entry = {"candidates": int(len(part)), "kept": int(len(kept)),
                 "dropped": {r: int(v) for r, v in reasons.items() if r not in ("kept", "real")}}
        if part["score"].notna().any():
            entry.update(score_min=float(part["score"].min()), score_max=float(part["score"].max()),
                         kept_score_max=float(kept["score"].max()) if len(kept) else None)
        stats[str(source)] = entry
    stats["total_kept"] = int(manifest["kept"].sum())
    return stats


def _load_pair(root: Path, row: Any) -> tuple[np.ndarray, np.ndarray]:
    from ddps_core.datasets import load_image
    from ddps_core.datasets.common import path_inside
    from ddps_core.metrics.files import load_label_map

    where = f"{root / 'manifest.parquet'}: image {row.image_id!r}"
    return (load_image(path_inside(root, row.image, where)),
            load_label_map(path_inside(root, row.mask, where)))


def contact_sheet(root: str | Path, manifest: pd.DataFrame, n: int = 8,
                  ignore_index: int = 255) -> np.ndarray | None:
    """Per scored source, two blocks: the ``n`` most certain candidates and the ``n`` least
    certain, each as a row of images over a row of mask overlays, with their scores."""
    from ddps_core.geometry import resize_image, resize_label
    from ddps_core.viz import caption, grid, overlay

    root = Path(root)
    blocks: list[np.ndarray] = []
    for source, part in manifest[manifest["score"].notna()].groupby("source", sort=False):
        part = part.sort_values(["rank"])
        for title, rows in (("most certain", part.head(n)), ("least certain", part.tail(n).iloc[::-1])):
            pairs = [_load_pair(root, r) for r in rows.itertuples()]
            if not pairs:
                continue
            h, w = pairs[0][0].shape[:2]  # images of any size: shown at the first one's
            pairs = [(resize_image(a, h, w), resize_label(b, h, w)) for a, b in pairs]
            size = pairs[0][0].shape[0]
            scale = max(1, -(-64 // size))
            pic = grid([[p[0] for p in pairs], [overlay(p[0], p[1], ignore_index=ignore_index) for p in pairs]],
                       scale=scale)
            scores = ", ".join(f"{s:.3f}" for s in rows["score"])
            kept = int(rows["kept"].sum())
            head = caption(f"{source}: {title} ({kept}/{len(rows)} kept) scores {scores}", pic.shape[1])
            blocks.append(np.concatenate([head, pic], axis=0))
    if not blocks:
        return None
    width = max(b.shape[1] for b in blocks)
    padded = [np.pad(b, ((0, 6), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    return np.concatenate(padded, axis=0)


def iter_kept(root: str | Path) -> Iterable[str]:
    """Ids of the kept images of an export, in manifest order."""
    m = pd.read_parquet(Path(root) / "manifest.parquet", columns=["image_id", "kept"])
    return list(m.loc[m["kept"], "image_id"])
