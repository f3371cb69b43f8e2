"""``ddps suggest``: the next pool images to label, with the teacher's pre-labels to correct.

The pool (``<data.out>/unlabeled``) is labelled by the teacher (the ``label`` stage's pool
labelling is reused when it was made by the same teacher for the same images; otherwise the
pool is labelled here, resumably, beside the batch folder), ranked and picked by
:func:`~ddps_core.active.select.diverse_uncertain` on pooled DDPM features of the most
uncertain images. The batch folder ``out`` (replaced as a whole, atomically)::

    images/<id>.png          the picked images, as the pool holds them
    prelabels/<id>.png       the teacher's labels: 8-bit palette PNGs, pixel value = class id
    uncertainty/<id>.png     the teacher's Jensen-Shannon map (inferno heat map)
    cvat_segmentation_mask.zip   the pre-labels in CVAT's "Segmentation mask 1.1" import
                             format (labelmap.txt, ImageSets/Segmentation/default.txt,
                             SegmentationClass/<id>.png in the class colours)
    suggestions.parquet      rank, image_id, score, uncertainty_rank, distance, why
    batch.png                a contact sheet: image, pre-label, uncertainty per row

After correcting the pre-labels (in place, in any paint program or in CVAT),
``ddps data add-labels <out>`` checks them and adds them to the training split.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from ddps_core.active.select import diverse_uncertain, pooled_descriptors
from ddps_core.config import Settings
from ddps_core.errors import DataError
from ddps_core.io import atomic_path, atomic_write_bytes, atomic_write_text, partial_folder, swap_folder
from ddps_core.progress import Reporter

__all__ = ["SUGGESTIONS", "describe_images", "edited_prelabels", "guard_batch", "suggest"]

SUGGESTIONS = "suggestions.parquet"
CVAT_ZIP = "cvat_segmentation_mask.zip"
SHEET = "batch.png"
BATCH_RECORD = ".batch.json"  # the teacher and the sha256 of each pre-label as written


def describe_images(extractor: Any, images: list[np.ndarray], batch: int = 16,
                    progress: Any = None) -> np.ndarray:
    """Pooled DDPM-feature descriptors (:func:`pooled_descriptors`) of ``images``, each
    resized whole to the model's ``S x S``."""
    import torch

    from ddps_core.geometry import resize_image

    S = extractor.image_size
    pooled: dict[str, list[np.ndarray]] = {}
    for a in range(0, len(images), batch):
        chunk = np.stack([resize_image(im, S, S) for im in images[a:a + batch]])
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
        with torch.inference_mode():
            maps = extractor(x)
        for name, m in maps.items():
            pooled.setdefault(name, []).append(m.float().mean(dim=(2, 3)).cpu().numpy())
        if progress is not None:
            progress(min(len(images), a + batch), len(images))
    return pooled_descriptors([np.concatenate(v)[:, :, None, None] for v in pooled.values()])


def prelabel_sha(path: Path) -> str:
    """The sha256 a batch record keeps of a pre-label file (edits show as another)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edited_prelabels(batch: Path) -> list[Path]:
    """The pre-labels of a batch folder that differ from what ``suggest`` wrote."""
    record = json.loads((batch / BATCH_RECORD).read_text(encoding="utf-8"))
    files = {sid: batch / "prelabels" / f"{sid}.png" for sid in record["prelabels"]}
    return [f for sid, f in files.items() if not f.is_file() or prelabel_sha(f) != record["prelabels"][sid]]


def guard_batch(out: Path) -> None:
    """Refuse to replace ``out`` when it is not a batch folder of ``suggest`` or when its
    pre-labels were edited: corrections are the user's work."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / BATCH_RECORD).is_file():
        raise DataError(f"{out}: exists and is not a batch folder of `ddps suggest`; refusing to replace it "
                        "(choose another --out)")
    try:
        edited = edited_prelabels(out)
    except (OSError, ValueError, KeyError, AttributeError):
        raise DataError(f"{out / BATCH_RECORD}: unreadable batch record; refusing to replace {out} "
                        "(choose another --out)") from None
    if edited:
        raise DataError(f"{edited[0]}: pre-label edited since `ddps suggest` wrote it ({len(edited)} edited in {out}); "
                        f"add them first (`ddps data add-labels {out}`) or choose another --out")


def _pool_labels(settings: Settings, predictor: Any, source: Any, work: Path,
                 report: Reporter) -> tuple[Path, pd.DataFrame, bool]:
    """The folder of the pool's teacher labels and their scores; True when reused from the
    label stage."""
    from ddps_core.teacher.labels import finished_labels, label_images
    from ddps_core.teacher.stage import TEACHER, label_folder, labels_id

    ids = list(source.image_ids)
    # the label stage's own record: the teacher's file, the images' content and the geometry
    made = labels_id(settings, TEACHER, "unlabeled", source)
    staged = label_folder(settings, TEACHER, "unlabeled")
    scores = finished_labels(staged, made, ids)
    if scores is not None:
        report.log(f"suggest: the pool's teacher labels of stage label are reused ({staged})")
        return staged, scores, True
    scores = finished_labels(work, made, ids)
    if scores is not None:
        return work, scores, False
    report.progress("suggest: label the pool", 0, len(ids))
    scores = label_images(predictor, source, work, "unlabeled", made,
                          progress=lambda d, t: report.progress("suggest: label the pool", d, t))
    return work, scores, False


def _cvat_zip(ids: list[str], labels: dict[str, np.ndarray], names: list[str], colours: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        lines = ["# label:color_rgb:parts:actions"]
        lines += [f"{name}:{r},{g},{b}::" for name, (r, g, b) in zip(names, colours.tolist(), strict=True)]
        z.writestr("labelmap.txt", "\n".join(lines) + "\n")
        z.writestr("ImageSets/Segmentation/default.txt", "\n".join(ids) + "\n")
        for sid in ids:
            png = io.BytesIO()
            Image.fromarray(colours[labels[sid]]).save(png, format="PNG")
            z.writestr(f"SegmentationClass/{sid}.png", png.getvalue())
    return buf.getvalue()


def _sheet(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int = 96) -> bytes:
    """A contact sheet: per picked image its picture, pre-label colours and uncertainty."""
    tiles = []
    for image, colour, heat in rows:
        tiles.append(np.concatenate([np.asarray(Image.fromarray(a).convert("RGB").resize((size, size), Image.NEAREST))
                                     for a in (image, colour, heat)], axis=1))
    sheet = np.concatenate(tiles, axis=0)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    return buf.getvalue()


def suggest(settings: Settings, n: int, out: str | Path, report: Reporter | None = None,
            candidates: int | None = None, near_copy: float = 0.05) -> dict[str, Any]:
    """Pick ``n`` pool images to label into the batch folder ``out`` (see the module text);
    a summary with the picks."""
    from ddps_core.datasets import DDPMSegFolder
    from ddps_core.features.stage import extractor
    from ddps_core.inference import load_predictor
    from ddps_core.metrics.files import load_label_map
    from ddps_core.predict.outputs import heat_png, mask_png
    from ddps_core.predict.run import require_trained
    from ddps_core.teacher.labels import ReaderImages
    from ddps_core.viz.palette import palette

    report = report or Reporter()
    out = Path(out)
    guard_batch(out)
    if n < 1:
        raise DataError(f"--n {n}: the batch must hold at least one image")
    pool_dir = Path(settings.data.out) / "unlabeled"
    if not pool_dir.is_dir():
        raise DataError(f"{pool_dir}: no unlabelled pool to pick from (the dataset has no unlabeled split; "
                        "put the images to choose from in the source's unlabeled folder and rerun stage data)")
    require_trained(settings, "teacher")
    work = out.parent / f".{out.name}.pool"
    source = ReaderImages(DDPMSegFolder(settings.data.out, "unlabeled", require_labels=False))
    predictor = load_predictor(settings, "teacher")
    labels_dir, scores, reused = _pool_labels(settings, predictor, source, work, report)
    ids = list(source.image_ids)
    pool_scores = scores.set_index("image_id").loc[ids, "score"].to_numpy(dtype=np.float64)

    ext = extractor(settings, None, "ddpm")

    def describe(indices: np.ndarray) -> np.ndarray:
        return describe_images(ext, [source.image(int(i)) for i in indices], settings.features.batch_size,
                               lambda d, t: report.progress("suggest: describe candidates", d, t))

    picks = diverse_uncertain(pool_scores, describe, n, candidates, near_copy)
    if len(picks) < n:
        report.log(f"suggest: {len(picks)} of {n} picked: every other candidate is a near-copy of a pick "
                   f"(descriptor distance < {near_copy}); raise --candidates to look further down the ranking")

    k = predictor.num_classes
    names = list(predictor.class_names or [f"class_{c}" for c in range(k)])
    colours = palette(max(k, 1))
    chosen = [ids[p.index] for p in picks]
    partial = partial_folder(out, json.dumps({"n": n, "teacher": predictor.model_id, "ids": chosen}), resume=False)
    picked_ids, picked_labels, sheet_rows, rows = [], {}, [], []
    for rank, p in enumerate(picks):
        sid = ids[p.index]
        image = source.image(p.index)
        labels = load_label_map(labels_dir / f"{sid}.png")
        heat = np.asarray(Image.open(labels_dir / f"{sid}_uncertainty.png"), dtype=np.float64) / 255.0
        atomic_write_bytes(partial / "images" / f"{sid}.png", (pool_dir / f"{sid}.png").read_bytes())
        atomic_write_bytes(partial / "prelabels" / f"{sid}.png", mask_png(labels, k))
        heat_bytes = heat_png(heat)
        atomic_write_bytes(partial / "uncertainty" / f"{sid}.png", heat_bytes)
        picked_ids.append(sid)
        picked_labels[sid] = labels
        sheet_rows.append((image, colours[np.minimum(labels, k - 1)],
                           np.asarray(Image.open(io.BytesIO(heat_bytes)).convert("RGB"))))
        rows.append({"rank": rank + 1, "image_id": sid, "score": float(pool_scores[p.index]),
                     "uncertainty_rank": p.uncertainty_rank + 1,
                     "distance": None if not np.isfinite(p.distance) else round(p.distance, 6),
                     "why": p.why(len(ids)), "image": f"images/{sid}.png", "prelabel": f"prelabels/{sid}.png"})
    atomic_write_bytes(partial / CVAT_ZIP, _cvat_zip(picked_ids, picked_labels, names, colours))
    atomic_write_bytes(partial / SHEET, _sheet(sheet_rows))
    with atomic_path(partial / SUGGESTIONS) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    atomic_write_text(partial / "classes.txt", "".join(f"{c} {name}\n" for c, name in enumerate(names)))
    atomic_write_text(partial / BATCH_RECORD, json.dumps(
        {"teacher": predictor.model_id, "prelabels": {sid: prelabel_sha(partial / "prelabels" / f"{sid}.png")
                                                      for sid in picked_ids}}, indent=1))
    guard_batch(out)  # a prelabel may have been edited while the pool was labelled
    swap_folder(partial, out)
    report.log(f"suggest: {len(picks)} images to label in {out} (pool of {len(ids)}, teacher {predictor.model_id})")
    return {"picked": len(picks), "requested": n, "pool": len(ids), "teacher": predictor.model_id,
            "pool_labels_reused": reused, "out": str(out), "table": str(out / SUGGESTIONS),
            "cvat": str(out / CVAT_ZIP), "sheet": str(out / SHEET),
            "picks": [{k2: r[k2] for k2 in ("rank", "image_id", "score", "uncertainty_rank", "why")} for r in rows]}
