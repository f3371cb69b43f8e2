"""Stages ``train_refiner`` (the DDPS mask prior on the frozen student) and ``refine``
(Free-Re-noising on the real test split, scored per step).

``train_refiner`` (:func:`train_refiner`):

- the base is the trained student (:func:`~ddps_core.student.model.load_student`), frozen;
- the training pairs are the generated export (``refiner.data: generated``: teacher labels
  plus the real labelled images, ``<generate.out>``) or the real labelled images only
  (``refiner.data: real``), each image an entry of the student's image size under
  ``data.resize`` (resized whole, or its ``slide`` windows:
  :class:`~ddps_core.datasets.training.TrainingView`);
- an epoch is a permutation of the pairs drawn from ``(refiner.seed, epoch)``, cut into
  batches of ``refiner.batch_size`` (the last partial batch is dropped; a set smaller than one
  batch is one batch), with random horizontal flips (``refiner.hflip``) drawn from the same
  generator, so a resumed run sees exactly the batches of an uninterrupted one;
- the denoiser is trained with :func:`~ddps_core.refiner.train.train_denoiser` into
  ``<refiner.out>`` with ``refiner.x0_source``; with ``refiner.ablation`` the same budget (same
  seed, same batches) is trained with ``x0_source="gt"`` into ``<refiner.out>/ablation-gt``.

The ``data_id`` given to the trainer as its ``data`` input (part of its run identity, stored
in ``model.json``'s ``inputs``) is
``student=<weights hash>;data=<kind>:<hash>;n=..;size=..;batch=..;hflip=..``: a state
trained on another student, other pairs or another batching is not resumed, and ``refine``
refuses a denoiser whose student is not the current one.

``refine`` (:func:`refine`): the real test split, every image at its own size: the models see
its ``S x S`` inputs (``S``: the student's ``image_size``; ``data.resize`` ``whole`` or
``slide`` windows at ``data.stride``), their maps are merged back to the image's ``H x W``
(:mod:`ddps_core.inference.windows`), and the labels are scored against the dataset's own
labels at their original resolution. ``evaluate.flip`` / ``evaluate.scales`` add test-time
augmentation. Images are read ``REFINE_IMAGES`` at a time (each image's draws are its own:
:func:`~ddps_core.inference.refiner.image_seed`):

- ``student``: the student alone (:class:`~ddps_core.inference.student.StudentPredictor`: the
  argmax of its merged softmax probabilities);
- ``refiner``: Free-Re-noising with the first-prediction denoiser, ``refiner.refine_steps``
  (n) and ``refiner.guidance`` (w) (:class:`~ddps_core.inference.refiner.RefinerPredictor`:
  each step's one-hot masks merged over the windows); the steps of ``refiner.report_steps``
  (default: every run step) are written and scored;
- ``refiner-gt``: the same with the ablation's denoiser, when ``refiner.ablation`` and it
  exists.

Each method's re-noising draws come from its own generator seeded with ``refiner.seed``, on
the device the masks live on, in fixed batches of windows (a CPU run is reproducible; a GPU
run differs from it anyway, through bf16 and cuDNN). Outputs, the reports under
``evaluate.reports``::

    <refined_out>/student/<id>.png                  the student's labels (the image's size)
    <refined_out>/<method>/step_<i>/<id>.png        labels after network step i
    <reports>/refine.parquet                        the ``ddps score`` schema + method, step,
                                                    then mode (data.resize) and size (S)
    <reports>/metrics/refine.json                   {method: {step_<i>: {miou, mbiou}}}, student flat (%)

Its picture and plot tables are stage ``report``'s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, GenericFolder
from ddps_core.datasets.common import png_bytes
from ddps_core.device import resolve_device, torch_threads
from ddps_core.errors import ConfigError, DataError
from ddps_core.training import read_record
from ddps_core.io import atomic_write_bytes, partial_folder, swap_folder
from ddps_core.progress import Reporter
from ddps_core.stages import Stage
from ddps_core.metrics import REPORT_COLUMNS, ConfusionAccumulator, report_frame, write_report
from ddps_core.refiner.base import freeze
from ddps_core.refiner.denoiser import DENOISER_PRESETS, DenoiserConfig, denoiser_preset, describe, parameter_counts
from ddps_core.refiner.sample import refinement_steps
from ddps_core.refiner.train import INFO_FILE, DDPSTrainConfig, build_config, load_denoiser, train_denoiser

__all__ = [
    "ABLATION_DIR",
    "PROTOCOL_COLUMNS",
    "REFINE_IMAGES",
    "REFERENCE_PRESET",
    "TrainBatches",
    "denoiser_folders",
    "format_step_table",
    "info",
    "info_text",
    "REFINE",
    "TRAIN_REFINER",
    "step_table",
    "student_id",
    "train_config",
]

ABLATION_DIR = "ablation-gt"
REFINE_IMAGES = 8  # test images read and reported (progress) at a time
#: The columns stage ``refine`` adds after the ``ddps score`` schema: how the images met the
#: models (``data.resize``) and the models' input size S.
PROTOCOL_COLUMNS = ["mode", "size"]
REFERENCE_PRESET = "ddps-segformer-b2"
REFINER = "refiner"


def report_locations(settings: Settings) -> dict[str, Any]:
    """Where stage ``refine`` writes its reports, under ``evaluate.reports``."""
    from ddps_core.metrics.stage import report_locations as locations

    return locations(settings, "refine")


_TRAIN_FIELDS = ("preset", "width", "channel_mult", "num_res_blocks", "embed_dim", "dropout", "num_timesteps",
                 "schedule", "x0_source", "steps", "single_step_steps", "feature_drop", "train_guidance", "lr",
                 "warmup_steps", "weight_decay", "ema_rate", "grad_clip", "checkpoint_every", "log_every", "time_budget_s")


# --------------------------------------------------------------------------- configuration
def train_config(settings: Settings, x0_source: str | None = None, out: str | Path | None = None) -> DDPSTrainConfig:
    """The :class:`DDPSTrainConfig` of ``settings.refiner`` (plus ``data.ignore_index``), with
    ``x0_source`` / ``out`` replaced when given."""
    cfg = settings.refiner
    fields = {k: getattr(cfg, k) for k in _TRAIN_FIELDS}
    fields["channel_mult"] = list(cfg.channel_mult) if cfg.channel_mult else None
    if x0_source is not None:
        fields["x0_source"] = x0_source
    return DDPSTrainConfig(out=str(out if out is not None else cfg.out), ignore_index=settings.data.ignore_index,
                           **fields)


def _denoiser_config(cfg: DDPSTrainConfig, num_classes: int, feature_channels: int) -> DenoiserConfig:
    try:
        return build_config(cfg, num_classes, feature_channels)
    except ValueError as exc:
        raise ConfigError(f"refiner: {exc}") from None


def denoiser_folders(settings: Settings) -> dict[str, Path]:
    """Method -> folder of its denoiser: ``refiner`` (``refiner.x0_source``, first prediction
    by default) and, with ``refiner.ablation``, ``refiner-gt`` (``<out>/ablation-gt``)."""
    folders = {REFINER: Path(settings.refiner.out)}
    if settings.refiner.ablation and settings.refiner.x0_source != "gt":
        folders["refiner-gt"] = Path(settings.refiner.out) / ABLATION_DIR
    return folders


def student_id(settings: Settings) -> str:
    """sha256 (16 hex digits) of the student's weights file: the base a denoiser belongs to."""
    from ddps_core.student.model import weights_id

    return weights_id(settings.student.out)


def _id_part(data_id: str, key: str) -> str | None:
    for part in str(data_id).split(";"):
        if part.startswith(f"{key}="):
            return part[len(key) + 1:]
    return None


# --------------------------------------------------------------------------- training data
class TrainBatches:
    """``epoch -> iterator of (images float [B, 3, S, S] in [0, 1], labels long [B, S, S])``
    over an :class:`~ddps_core.student.train.ImageSet`, a function of ``(seed, epoch)`` only:
    the permutation and the flips come from one generator seeded with
    ``seed * 1_000_003 + epoch`` (the contract of :func:`~ddps_core.refiner.train.epoch_batches`)."""

    def __init__(self, data: Any, batch_size: int, seed: int = 0, hflip: bool = True, ignore_index: int = 255):
        if len(data) < 1:
            raise DataError("the DDPS training set is empty")
        self.data, self.seed, self.hflip, self.ignore_index = data, int(seed), bool(hflip), int(ignore_index)
        self.batch_size = min(int(batch_size), len(data))
        self.batches_per_epoch = len(data) // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from ddps_core.student.train import augment

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        order = torch.randperm(len(self.data), generator=gen).tolist()
        bs = self.batch_size
        for j in range(self.batches_per_epoch):
            images, labels = self.data.batch(order[j * bs:(j + 1) * bs])
            if self.hflip:
                images, labels = augment(images, labels, gen, True, 1.0, 1.0, self.ignore_index)
            yield images, labels


def _training_set(settings: Settings, size: int) -> tuple[Any, str]:
    """The :class:`ImageSet` of ``refiner.data`` at ``size`` and a hash identifying its pairs:
    each image an ``S x S`` entry (or its windows) under ``data.resize``, as the student's."""
    from ddps_core.datasets.training import TrainingView
    from ddps_core.student.train import ImageSet

    ign, d = settings.data.ignore_index, settings.data
    if settings.refiner.data == "generated":
        root = Path(settings.generate.out)
        manifest = root / "manifest.parquet"
        if not manifest.is_file():
            raise DataError(f"{manifest}: no generated dataset; run the generate stage first "
                            "(or set refiner.data: real)")
        data = ImageSet(TrainingView(GenericFolder(root, ignore_index=ign), size, d.resize, d.stride), size)
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
        if d.resize != "whole" or d.stride is not None:
            digest += f"/{d.resize}/{d.stride}"
    else:
        data = ImageSet(TrainingView(DDPMSegFolder(d.out, "train", ignore_index=ign), size, d.resize, d.stride), size)
        h = hashlib.sha256()
        for i, image_id in enumerate(data.ids):  # a few labelled images: hash what is trained on
            image, label = data[i]
            h.update(f"{image_id}|{label.dtype}\n".encode())
            h.update(image.tobytes())
            h.update(label.tobytes())
        digest = h.hexdigest()[:16]
    return data, digest


# --------------------------------------------------------------------------- train_refiner
def train_refiner(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``train_refiner``: the denoiser (and, with ``refiner.ablation``, its
    ``x0_source="gt"`` twin) on the frozen student; resumes where it stopped (see the module
    text). Returns ``{"data", "n_images", "image_size", "data_id", "models": {method: summary}}``.
    """
    from ddps_core.student.model import load_student

    say = report.log
    cfg = settings.refiner
    device = resolve_device(settings.device)
    student, sinfo = load_student(settings.student.out, device)
    freeze(student)
    size = int(sinfo["image_size"])
    num_classes = int(sinfo["num_classes"])
    data, digest = _training_set(settings, size)
    if data.reader.num_classes != num_classes:
        raise DataError(f"{data.reader.root}: has {data.reader.num_classes} classes, the student "
                        f"({settings.student.out}) {num_classes}; retrain the student on this data")
    batches = TrainBatches(data, cfg.batch_size, cfg.seed, cfg.hflip, settings.data.ignore_index)
    data_id = (f"student={student_id(settings)};data={cfg.data}:{digest};n={len(data)};size={size};"
               f"batch={batches.batch_size};hflip={int(cfg.hflip)}")
    channels = int(sinfo.get("feature_channels") or student.feature_channels)
    say(f"refiner training data: {cfg.data}, {len(data)} images at {size} px, "
        f"{len(batches)} batches of {batches.batch_size} per epoch")
    runs = {REFINER: train_config(settings)}
    if cfg.ablation:
        if cfg.x0_source == "gt":
            say("refiner.x0_source is already 'gt': no separate ablation")
        else:
            runs["refiner-gt"] = train_config(settings, x0_source="gt", out=Path(cfg.out) / ABLATION_DIR)
    for tc in runs.values():
        _denoiser_config(tc, num_classes, channels)  # a bad preset fails before any training
    models: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        for method, tc in runs.items():
            summary = train_denoiser(tc, student, batches, num_classes=num_classes, device=device,
                                     feature_channels=channels, seed=cfg.seed, inputs={"data": data_id},
                                     task=method, report=report)
            say(f"{method}: {summary['steps']} steps ({summary['steps_this_run']} this run), "
                f"final loss {summary['final_loss']}, {summary['wall_s']:.1f} s -> {tc.out}")
            models[method] = {**summary, "out": str(tc.out), "x0_source": tc.x0_source}
    return {"data": cfg.data, "n_images": len(data), "image_size": size, "data_id": data_id, "models": models}


# --------------------------------------------------------------------------- refine
def _load_denoisers(settings: Settings, sid: str, device: torch.device,
                    say: Callable[[str], None]) -> dict[str, tuple[Any, Any, dict]]:
    models = {}
    expected = train_config(settings)
    for method, folder in denoiser_folders(settings).items():
        if method != REFINER and not (folder / INFO_FILE).is_file():
            say(f"{method}: no ablation denoiser in {folder}; skipped (run train_refiner with refiner.ablation)")
            continue
        model, schedule, info = load_denoiser(folder, device)
        trained_on = _id_part(info.get("inputs", {}).get("data", ""), "student")
        if trained_on != sid:
            raise DataError(f"{folder / INFO_FILE}: the denoiser was trained on another student "
                            f"({trained_on} != {sid}); rerun the train_refiner stage")
        stale = [k for k in ("preset", "width", "channel_mult", "num_res_blocks", "embed_dim", "num_timesteps",
                             "schedule", "steps") if info.get("train", {}).get(k) != getattr(expected, k)]
        if stale:
            say(f"{method}: {folder} was trained with other refiner settings ({', '.join(stale)}); "
                "refining with it as it is")
        models[method] = (freeze(model), schedule, info)
    return models


def _png(mask: np.ndarray, num_classes: int) -> bytes:
    return png_bytes(mask.astype(np.uint8 if num_classes <= 256 else np.uint16))


def refine(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``refine``: the student alone and the refiner (its ``refiner.report_steps``) on
    the real test split, each image at its own size; label PNGs, the report and its metrics
    (see the module text). Returns the step table's records (:func:`step_table`)."""
    from ddps_core import storage
    from ddps_core.inference.refiner import refiner_predictors
    from ddps_core.metrics.stage import percent

    say = report.log
    where = report_locations(settings)
    options = settings.storage.options
    cfg, ev = settings.refiner, settings.evaluate
    ign = settings.data.ignore_index
    device = resolve_device(settings.device)
    student, predictors = refiner_predictors(settings, device, flip=ev.flip, scales=ev.scales, say=say)
    num_classes = student.num_classes
    steps = {method: p.report_steps for method, p in predictors.items()}
    reader = DDPMSegFolder(settings.data.out, "test", ignore_index=ign)
    if reader.num_classes != num_classes:
        raise DataError(f"{settings.data.out}: the test split has {reader.num_classes} classes, "
                        f"the student {num_classes}")
    if not reader.has_labels:
        raise DataError(f"{settings.data.out}: the test split has no labels to score the refinement against")
    names = reader.class_names if reader.class_names and len(reader.class_names) == num_classes else None
    # written beside the old labels and swapped in at the end: a failed run keeps them, and
    # the new folder holds nothing the settings no longer make (a step, a method, an image)
    final = Path(cfg.refined_out)
    out = partial_folder(final, json.dumps(steps, sort_keys=True), resume=False)

    def accumulator() -> ConfusionAccumulator:
        return ConfusionAccumulator(num_classes, ignore_index=ign, boundary_ratio=ev.boundary_ratio)

    blocks: dict[tuple[str, int | None], ConfusionAccumulator] = {("student", None): accumulator()}
    for method in predictors:
        for i in steps[method]:
            blocks[(method, i)] = accumulator()
    n = len(reader)
    say(f"refine: {n} test images at their own size, {settings.data.resize} mode on the student's "
        f"{student.size} px inputs" + (f", test-time flip {ev.flip} scales {ev.scales}" if ev.flip or ev.scales else ""))
    report.progress("refine", 0, n)
    with torch_threads(cfg.threads):
        for a in range(0, n, REFINE_IMAGES):
            samples = [reader[k] for k in range(a, min(n, a + REFINE_IMAGES))]
            images = [sample.image for sample in samples]
            preds: dict[tuple[str, int | None], list[np.ndarray]] = {("student", None): list(student.labels(images))}
            for method, predictor in predictors.items():
                per_image = [labels for labels, _ in predictor.step_maps(images)]
                for i in steps[method]:
                    preds[(method, i)] = [labels[i] for labels in per_image]
            for key, pred in preds.items():
                method, i = key
                folder = out / method if i is None else out / method / f"step_{i}"
                for sample, labels in zip(samples, pred, strict=True):
                    atomic_write_bytes(folder / f"{sample.id}.png", _png(labels, num_classes))
                    blocks[key].update(labels, sample.label, sample.id)
            report.progress("refine", a + len(samples), n)

    frames, summary = [], {}
    for (method, i), acc in blocks.items():
        result = acc.result()
        frame = report_frame(result, names)
        frame.insert(0, "step", pd.array([i] * len(frame), dtype="Int64"))
        frame.insert(0, "method", method)
        frame["mode"] = settings.data.resize
        frame["size"] = pd.array([student.size] * len(frame), dtype="Int64")
        frames.append(frame)
        scores = {"miou": percent(result.miou), "mbiou": percent(result.mbiou)}
        if i is None:
            summary[method] = scores
        else:
            summary.setdefault(method, {})[f"step_{i}"] = scores
        say(f"{method}{'' if i is None else f' step {i}'}: mIoU {scores['miou']:.2f}  mBIoU {scores['mbiou']:.2f}")
    df = pd.concat(frames, ignore_index=True)[["method", "step", *REPORT_COLUMNS, *PROTOCOL_COLUMNS]]
    write_report(df, where["report"], options)
    storage.write_text(where["metrics"], json.dumps(summary, indent=2), options)
    swap_folder(out, final)
    table = step_table(df)
    report.log("\n" + format_step_table(table))
    return {"steps": table.to_dict("records")}


# --------------------------------------------------------------------------- step table
def step_table(report: pd.DataFrame) -> pd.DataFrame:
    """One row per method of a ``refine`` report: ``method``, ``mIoU`` / ``mBIoU`` (the
    student's, or a DDPS model's at its last step), then ``mIoU <i>`` and ``mBIoU <i>`` for
    every collected step i (NaN for the student), in percent."""
    s = report[report["scope"] == "summary"]
    all_steps = sorted({int(v) for v in s["step"].dropna()})
    rows = []
    for method in pd.unique(s["method"]):
        block = s[s["method"] == method]
        row: dict[str, Any] = {"method": method}
        stepped = block[block["step"].notna()]
        last = block.iloc[-1] if stepped.empty else stepped.loc[stepped["step"].astype(int).idxmax()]
        row["mIoU"], row["mBIoU"] = 100 * float(last["miou"]), 100 * float(last["mbiou"])
        by_step = {int(r.step): r for r in stepped.itertuples()}
        for metric, col in (("mIoU", "miou"), ("mBIoU", "mbiou")):
            for i in all_steps:
                row[f"{metric} {i}"] = 100 * float(getattr(by_step[i], col)) if i in by_step else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def format_step_table(table: pd.DataFrame | Sequence[dict]) -> str:
    """The reference's style, one line per method: ``ddps  mIoU 0,10,19 = 49.35, 49.55, 49.66
    mBIoU 0,10,19 = ...``; the student as ``mIoU = .. mBIoU = ..``."""
    table = pd.DataFrame(table)
    width = max([len(str(m)) for m in table["method"]] + [7])
    lines = []
    for row in table.to_dict("records"):
        parts = []
        for metric in ("mIoU", "mBIoU"):
            cols = [c for c in table.columns if c.startswith(f"{metric} ") and row[c] == row[c]]
            if cols:
                steps = ",".join(c.split(" ", 1)[1] for c in cols)
                parts.append(f"{metric} {steps} = " + ", ".join(f"{row[c]:.2f}" for c in cols))
            else:
                parts.append(f"{metric} = {row[metric]:.2f}")
        lines.append(f"{str(row['method']):{width}s}  " + "   ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------- info
def _data_shape(settings: Settings) -> tuple[int, int, str]:
    """(K, C, where they come from) for the configured denoiser."""
    from ddps_core.student.model import INFO_FILE as STUDENT_INFO

    path = Path(settings.student.out) / STUDENT_INFO
    preset = DENOISER_PRESETS.get(settings.refiner.preset)
    if path.is_file():
        sinfo = read_record(path, "no student here", rerun="train_student")
        return int(sinfo["num_classes"]), int(sinfo["feature_channels"]), f"the student ({path})"
    channels = preset.feature_channels if preset is not None else 256
    try:
        k = DDPMSegFolder(settings.data.out, "train").num_classes
        return int(k), channels, f"the dataset ({settings.data.out}); C = the preset's"
    except DataError:
        pass
    if preset is None:
        raise ConfigError(f"refiner.preset: unknown denoiser preset {settings.refiner.preset!r} "
                          f"(known: {', '.join(DENOISER_PRESETS)})")
    return preset.num_classes, preset.feature_channels, "the preset's defaults (no student or dataset yet)"


TRAIN_REFINER = Stage("train_refiner", main=train_refiner, products=lambda s: [s.refiner.out])
REFINE = Stage("refine", main=refine, products=lambda s: [
    s.refiner.refined_out, *(str(v) for v in report_locations(s).values())])


def info(settings: Settings) -> list[dict[str, Any]]:
    """The configured denoiser on our data and the ``ddps-segformer-b2`` reference preset
    (K = 150, C = 256): name, what K / C come from, config, parameter counts by part, one-line
    description; plus the refinement steps of the configured schedule."""
    k, c, source = _data_shape(settings)
    cfg = settings.refiner
    configured = _denoiser_config(train_config(settings), k, c)
    reference = denoiser_preset(REFERENCE_PRESET)
    refine_at = refinement_steps(cfg.num_timesteps, cfg.refine_steps)
    out = []
    for name, conf, src in ((f"configured ({cfg.preset})", configured, source),
                            (REFERENCE_PRESET, reference, DENOISER_PRESETS[REFERENCE_PRESET].description)):
        out.append({"name": name, "source": src, "config": conf.to_dict(), "parameters": parameter_counts(conf),
                    "description": describe(conf), "num_timesteps": cfg.num_timesteps, "schedule": cfg.schedule,
                    "refine_steps": refine_at, "guidance": cfg.guidance})
    return out


def info_text(settings: Settings) -> str:
    """:func:`info` as text (``ddps ddps info``)."""
    entries = info(settings)
    lines = []
    for entry in entries:
        p = entry["parameters"]
        lines.append(f"{entry['name']}: {entry['description']}")
        lines.append(f"  K, C from {entry['source']}")
        lines.append("  parameters: " + ", ".join(f"{part} {n:,}" for part, n in p.items()))
    first = entries[0]
    lines.append(f"schedule: {first['schedule']}, T = {first['num_timesteps']}; refinement steps "
                 f"{first['refine_steps']}, guidance w = {first['guidance']}")
    return "\n".join(lines)
