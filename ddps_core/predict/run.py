"""``ddps predict``, the ``predict`` flow and :func:`ddps.load` in one implementation: masks
(and overlays, uncertainty maps) of any images with a trained model of a workspace, and a
Parquet table of them (docs/predict.md).

:func:`predict_images` is the run: it lists the inputs (:mod:`ddps_core.predict.inputs`),
loads the model through :func:`_load` (the one place that calls
:func:`ddps_core.inference.load_predictor`), and goes through the images in batches. For each
image it reads the bytes and their sha256; an image whose mask exists and whose table row
has the same sha256 and model id is *reused* (not predicted again); the others are decoded,
predicted, and written. A file that cannot be read or decoded is one error line naming it;
the run goes on, and its summary counts the failures (the CLI then exits 1). The table
``predictions.parquet`` is rewritten atomically every few seconds and at the end, also when
the run stops early, so it always describes the masks on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ddps_core import storage
from ddps_core.errors import ConfigError, DataError, DDPSError
from ddps_core.inference import MODELS, Prediction, Predictor
from ddps_core.predict.inputs import ImageInput, collect_inputs
from ddps_core.predict.outputs import heat_png, mask_png, overlay_png
from ddps_core.progress import Reporter

if TYPE_CHECKING:
    from ddps_core.config import Settings

__all__ = ["COLUMNS", "MODEL_FILES", "TABLE", "predict_images", "require_trained", "workspace_settings"]

#: The table of a run's outputs, in ``out``.
TABLE = "predictions.parquet"
#: Its columns, in order (docs/predict.md#the-table).
COLUMNS = ("image", "height", "width", "model", "model_id", "num_classes", "score", "seconds", "mask", "overlay",
           "uncertainty", "has_uncertainty", "sha256")
#: Seconds between two rewrites of the table during a run.
TABLE_EVERY_S = 5.0

#: What each model needs on disk: (settings key of the folder, file in it, the stage that
#: writes it, its command). The file names are those of the trainers (WEIGHTS_FILE / INFO_FILE
#: of ddps_core.diffusion.train, ddps_core.teacher.stage.WEIGHTS,
#: ddps_core.student.model.WEIGHTS_FILE, ddps_core.refiner.train.WEIGHTS_FILE); they are not
#: imported here so that checking them does not import torch (a test keeps them equal).
MODEL_FILES: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "teacher": (("ddpm.out", "model.json", "train_ddpm", "ddps ddpm train"),
                ("teacher.out", "ensemble.safetensors", "train_teacher", "ddps teacher train")),
    "student": (("student.out", "student.safetensors", "train_student", "ddps student train"),),
    "refiner": (("student.out", "student.safetensors", "train_student", "ddps student train"),
                ("refiner.out", "ema.safetensors", "train_refiner", "ddps refiner train")),
}

#: Settings keys that hold paths: relative ones are relative to the workspace
#: (:func:`workspace_settings`).
PATH_KEYS = ("data.root", "data.out", "ddpm.checkpoint", "ddpm.out", "features.out", "teacher.out",
             "teacher.baselines_out", "teacher.labels_out", "generate.out", "generate.work", "student.out",
             "refiner.out", "refiner.refined_out", "evaluate.reports")


def _get(settings: Any, key: str) -> Any:
    for part in key.split("."):
        settings = getattr(settings, part)
    return settings


def check_model(model: str) -> None:
    if model not in MODELS:
        raise ConfigError(f"--model {model!r}: expected one of {', '.join(MODELS)}")


def require_trained(settings: Settings, model: str) -> None:
    """Raise one line naming the stage to run when ``model``'s files are missing."""
    check_model(model)
    for key, name, stage, command in MODEL_FILES[model]:
        path = Path(_get(settings, key)) / name
        if not path.is_file():
            raise DataError(f"{path}: not found: the {model} needs stage {stage} (run `{command}`, or `dvc repro "
                            f"{stage}`; {key} names the folder)")


def _load(settings: Settings, model: str, device: str | None = None) -> Predictor:
    """The trained ``model`` of the workspace ``settings`` describe, as a
    :class:`~ddps_core.inference.Predictor` (the loader seam the tests replace)."""
    from ddps_core.inference import load_predictor

    require_trained(settings, model)
    return load_predictor(settings, model, device=device)


def workspace_settings(workspace: str | os.PathLike[str] = ".", params: str | os.PathLike[str] | None = None,
                       overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings of a workspace (a project folder: ``params.yaml`` and the trained models):
    ``params`` (default ``<workspace>/params.yaml``) with ``overrides``; every relative path
    of :data:`PATH_KEYS` is taken relative to ``workspace``."""
    from ddps_core.config import load_settings

    root = Path(workspace)
    if not root.is_dir():
        raise ConfigError(f"{root}: workspace folder not found")
    file = Path(params) if params is not None else root / "params.yaml"
    if not file.is_file():
        raise ConfigError(f"{file}: settings file not found (a workspace has a params.yaml; pass params= for "
                          "another file)")
    settings = load_settings(file, overrides)
    for key in PATH_KEYS:
        section, field = key.rsplit(".", 1)
        node = _get(settings, section)
        value = getattr(node, field)
        if value and not storage.is_remote(value) and not Path(storage.local_path(value)).is_absolute():
            setattr(node, field, str(root / storage.local_path(value)))
    return settings


# --------------------------------------------------------------------------- the table
def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("image", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
                      ("model", pa.string()), ("model_id", pa.string()), ("num_classes", pa.int32()),
                      ("score", pa.float64()), ("seconds", pa.float64()), ("mask", pa.string()),
                      ("overlay", pa.string()), ("uncertainty", pa.string()), ("has_uncertainty", pa.bool_()),
                      ("sha256", pa.string())])


def read_table(out: storage.Location, options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The rows of ``out``'s table by mask path ({} when there is none)."""
    import pyarrow.parquet as pq

    location = storage.join(out, TABLE)
    if not storage.exists(location, options):
        return {}
    try:
        rows = pq.read_table(io.BytesIO(storage.read_bytes(location, options))).to_pylist()
    except DDPSError:
        raise
    except Exception as exc:
        raise DataError(f"{location}: cannot read the predictions table ({type(exc).__name__}: {exc}); delete it "
                        "to predict every image again") from None
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{location}: not a ddps predictions table (no column {', '.join(missing)}); predict into "
                        "another --out folder")
    return {row["mask"]: row for row in rows}


def write_table(out: storage.Location, rows: Mapping[str, Mapping[str, Any]],
                options: Mapping[str, Any] | None = None) -> None:
    """Write ``rows`` (by mask path, sorted) as ``out``'s table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: rows[k].get(c) for c in COLUMNS} for k in sorted(rows)], schema=_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(out, TABLE), buf.getvalue(), options)


# --------------------------------------------------------------------------- the run
def _remove(location: storage.Location, options: Mapping[str, Any] | None) -> None:
    if not storage.is_remote(location):
        storage.local_path(location).unlink(missing_ok=True)
        return
    fs, path = storage.filesystem(location, options)
    with storage.remote_errors(location, "delete it"):
        if fs.exists(path):
            fs.rm_file(path)


def _read_mask(location: storage.Location, options: Mapping[str, Any] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(location, options))) as im:
        return np.asarray(im)


def _current(row: Mapping[str, Any] | None, sha: str, model_id: str, out: str, picture: str | None,
             options: Mapping[str, Any] | None) -> bool:
    """Whether ``row`` is this input's (``sha``) prediction by this model and its mask exists,
    and its ``picture`` (``overlay``, ``uncertainty`` or None) too when there is one to have."""
    if row is None or row["sha256"] != sha or row["model_id"] != model_id:
        return False
    if not storage.exists(storage.join(out, *row["mask"].split("/")), options):
        return False
    if picture is None or (picture == "uncertainty" and not row["has_uncertainty"]):
        return True
    return bool(row[picture]) and storage.exists(storage.join(out, *row[picture].split("/")), options)


def _check_prediction(pred: Any, image: np.ndarray, source: str) -> None:
    if not isinstance(pred, Prediction) or np.shape(pred.labels) != image.shape[:2]:
        got = np.shape(pred.labels) if isinstance(pred, Prediction) else type(pred).__name__
        raise RuntimeError(f"{source}: the predictor returned {got} for an image of {image.shape[:2]}")


def predict_images(settings: Settings, inputs: Sequence[str], model: str, out: str | os.PathLike[str], *,
                   overlay: bool = False, uncertainty: bool = False, batch_size: int = 16,
                   report: Reporter | None = None, predictor: Predictor | None = None) -> dict[str, Any]:
    """Predict every image of ``inputs`` with ``model`` into ``out`` (the module text);
    ``settings.device`` picks the device and ``settings.data.num_classes``, when set, is the
    class count the model must have. Returns the run's summary (JSON-able): counts, the
    model, the output locations, up to six ``pictures`` and the ``failures`` (image, error)."""
    report = report or Reporter()
    check_model(model)
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1 (got {batch_size})")
    out = os.fspath(out)
    options = settings.storage.options
    storage.check_protocol(out)
    report.progress("predict", 0, None)
    found = collect_inputs(inputs, options, exclude=out)
    if found.ignored:
        shown = ", ".join(found.ignored[:3]) + (", ..." if len(found.ignored) > 3 else "")
        report.log(f"{len(found.ignored)} file(s) ignored, not images by suffix: {shown}")
    total = len(found.images)
    report.progress("predict", 0, total)
    rows = read_table(out, options)
    report.log(f"{total} image(s); loading the {model}")
    if predictor is None:
        predictor = _load(settings, model, device=settings.device)
    k = int(predictor.num_classes)
    expected = settings.data.num_classes
    if expected is not None and expected != k:
        raise ConfigError(f"data.num_classes (--num-classes) is {expected}, but the {model} ({predictor.model_id}) "
                          f"predicts {k} classes")
    others = sorted({int(r["num_classes"]) for r in rows.values()} - {k})
    if others:
        raise DataError(f"{storage.join(out, TABLE)}: holds masks of {others[0]} classes, but the {model} predicts {k}: "
                        "predict into another --out folder")
    top = float(getattr(predictor, "uncertainty_max", None) or 1.0)
    names = list(predictor.class_names) if predictor.class_names else None

    started = time.perf_counter()
    counts = {"predicted": 0, "reused": 0}
    failures: list[dict[str, str]] = []
    pictures: list[str] = []
    done = 0
    last_write = time.monotonic()

    def where(kind: str, name: str) -> tuple[str, storage.Location]:
        rel = f"{kind}/{name}.png"
        return rel, storage.join(out, *rel.split("/"))

    def fail(image: ImageInput, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, DDPSError) else f"{image.source}: {type(exc).__name__}: {exc}"
        failures.append({"image": image.source, "error": message})
        report.log(f"error: {message}")

    def write_overlay(row: dict[str, Any], name: str, image: np.ndarray, labels: np.ndarray) -> None:
        rel, loc = where("overlays", name)
        storage.write_bytes(loc, overlay_png(image, labels, names), options)
        row["overlay"] = rel
        if len(pictures) < 6:
            pictures.append(os.fspath(loc))

    try:
        for first in range(0, total, batch_size):
            todo: list[tuple[ImageInput, np.ndarray, str, float]] = []
            for item in found.images[first:first + batch_size]:
                t0 = time.perf_counter()
                try:
                    data = storage.read_bytes(item.source, options)
                except (DDPSError, OSError) as exc:
                    fail(item, exc)
                    continue
                sha = hashlib.sha256(data).hexdigest()
                mask_rel, mask_loc = where("masks", item.name)
                row = rows.get(mask_rel)
                if _current(row, sha, predictor.model_id, out, "uncertainty" if uncertainty else None, options):
                    if overlay and not _current(row, sha, predictor.model_id, out, "overlay", options):
                        try:  # the mask is current: draw its overlay without the model
                            write_overlay(row, item.name, _decode(data, item.source), _read_mask(mask_loc, options))
                        except DDPSError as exc:
                            fail(item, exc)
                            continue
                    row["image"] = item.source
                    counts["reused"] += 1
                    continue
                try:
                    image = _decode(data, item.source)
                except DDPSError as exc:
                    fail(item, exc)
                    continue
                todo.append((item, image, sha, time.perf_counter() - t0))
            if todo:
                t0 = time.perf_counter()
                predictions = predictor([image for _, image, _, _ in todo])
                share = (time.perf_counter() - t0) / len(todo)
                if len(predictions) != len(todo):
                    raise RuntimeError(f"the predictor returned {len(predictions)} predictions for {len(todo)} images")
                for (item, image, sha, read_s), pred in zip(todo, predictions):
                    _check_prediction(pred, image, item.source)
                    t1 = time.perf_counter()
                    labels = np.asarray(pred.labels)
                    mask_rel, mask_loc = where("masks", item.name)
                    old = rows.get(mask_rel)
                    storage.write_bytes(mask_loc, mask_png(labels, k), options)
                    row = {"image": item.source, "height": int(image.shape[0]), "width": int(image.shape[1]),
                           "model": model, "model_id": predictor.model_id, "num_classes": k,
                           "score": float(pred.score), "mask": mask_rel, "overlay": None, "uncertainty": None,
                           "has_uncertainty": pred.uncertainty is not None, "sha256": sha}
                    if overlay:
                        write_overlay(row, item.name, image, labels)
                    if uncertainty and pred.uncertainty is not None:
                        rel, loc = where("uncertainty", item.name)
                        storage.write_bytes(loc, heat_png(pred.uncertainty, top), options)
                        row["uncertainty"] = rel
                    for kind in ("overlay", "uncertainty"):  # an earlier model's pictures of it go
                        if old is not None and old.get(kind) and not row[kind]:
                            _remove(storage.join(out, *old[kind].split("/")), options)
                    if not overlay and len(pictures) < 6:
                        pictures.append(os.fspath(mask_loc))
                    row["seconds"] = read_s + share + (time.perf_counter() - t1)
                    rows[mask_rel] = row
                    counts["predicted"] += 1
            done = min(first + batch_size, total)
            report.progress("predict", done, total)
            if time.monotonic() - last_write >= TABLE_EVERY_S:
                write_table(out, rows, options)
                last_write = time.monotonic()
    except BaseException:
        with contextlib.suppress(Exception):  # keep what was done; the run's own error is the one to see
            write_table(out, rows, options)
        raise
    write_table(out, rows, options)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "model": model, "model_id": predictor.model_id, "num_classes": k, "images": total, **counts,
        "failed": len(failures), "ignored": len(found.ignored), "seconds": round(seconds, 3),
        "out": out, "table": os.fspath(storage.join(out, TABLE)), "masks": os.fspath(storage.join(out, "masks")),
        "overlays": os.fspath(storage.join(out, "overlays")) if overlay else None,
        "uncertainty": os.fspath(storage.join(out, "uncertainty")) if uncertainty else None,
        "pictures": pictures, "failures": failures,
    }
    report.log(f"{total} image(s): {counts['predicted']} predicted, {counts['reused']} reused"
               + (f", {len(failures)} failed" if failures else "") + f" in {seconds:.1f} s")
    return summary


def _decode(data: bytes, source: str) -> np.ndarray:
    from ddps_core.datasets.common import decode_image

    return decode_image(data, source)

