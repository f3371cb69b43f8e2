"""The pieces every trainer's loop is made of; the loop itself stays in the trainer.

Each trainer (:func:`~ddps_core.diffusion.train.train_ddpm`,
:func:`~ddps_core.teacher.train.train_ensemble`, :func:`~ddps_core.student.train.train_student`,
:func:`~ddps_core.refiner.train.train_denoiser`) writes its loop as one readable function, top
to bottom, and takes from here what would otherwise be copied four times:

* learning-rate schedules, pure functions of the step: :func:`warmup_cosine`,
  :func:`warmup_poly`;
* the EMA whose decay ramps with the step count: :func:`ema_decay`, :func:`ema_update`;
* one optimiser step (:func:`backward_step`), :func:`set_lr`, :func:`optimizer_to`, and
  :class:`EmaTrainState`, the model + EMA + AdamW + generator of the step-based trainers;
* :func:`epoch_data`: the batches of one epoch of whatever a trainer is given;
* the run identity: :func:`run_id` of the settings that change what is trained and of the
  *content* ids of the inputs (:func:`content_id` hashes files, arrays or tensors);
* :class:`Checkpoint`: the resume file, written atomically and resumed only under the same run
  id (otherwise the run starts over and says so), and the non-finite loss / weights checks
  whose :class:`TrainingError` names the last good checkpoint of this run, if there is one;
* :class:`LossLog`: the training curve, written as CSV and kept in the checkpoint;
* :class:`TimeBudget`: stop early after so many seconds;
* :func:`read_record`: the JSON record (``model.json``) a later stage reads back.

Determinism: a trainer's output folder is a DVC output, so identical runs must write
identical bytes. Nothing here puts wall-clock time into a file: the checkpoint, the loss log
and the run id hold no timing, and :func:`save_checkpoint` writes the same bytes for the same
state (see there). Timing lives only in :attr:`TimeBudget.elapsed`, for the summary a trainer
returns.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddps_core.device import nonfinite_tensors
from ddps_core.errors import CheckpointError, ConfigError, DataError, DDPSError
from ddps_core.io import atomic_path, atomic_write_text
from ddps_core.progress import Reporter

__all__ = [
    "Checkpoint",
    "EmaTrainState",
    "LossLog",
    "TimeBudget",
    "TrainingError",
    "backward_step",
    "clear_temporaries",
    "content_id",
    "ema_decay",
    "ema_update",
    "epoch_data",
    "load_checkpoint",
    "optimizer_to",
    "Record",
    "read_record",
    "run_id",
    "save_checkpoint",
    "set_lr",
    "warmup_cosine",
    "warmup_poly",
]


class TrainingError(DDPSError):
    """Training cannot go on (a non-finite loss or weights); the last good checkpoint is kept."""


# --------------------------------------------------------------------------- schedules
def _decayed(step: int, total: int, warmup: int) -> float:
    """How far ``step`` is through the decay from ``warmup`` to ``total``, in [0, 1]."""
    return min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)


def warmup_cosine(step: int, *, lr: float, total: int, warmup: int = 0, floor: float = 0.1) -> float:
    """The learning rate of (0-based) ``step``: a linear warm-up over the first ``warmup``
    steps (``lr * (step + 1) / warmup``), then a half cosine from ``lr`` down to
    ``floor * lr`` at step ``total``, and ``floor * lr`` after it."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * _decayed(step, total, warmup))))


def warmup_poly(step: int, *, lr: float, total: int, warmup: int = 0, power: float = 0.9) -> float:
    """The learning rate of (0-based) ``step``: the same linear warm-up, then the poly decay
    ``lr * (1 - p) ** power`` with ``p`` going from 0 after the warm-up to 1 at ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return lr * (1.0 - _decayed(step, total, warmup)) ** power


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``opt`` the learning rate ``lr``."""
    for group in opt.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- EMA, optimiser
def ema_decay(rate: float, step: int) -> float:
    """``min(rate, (1 + step) / (10 + step))``: a short run's EMA follows the weights instead of
    staying near the random initialisation."""
    return min(rate, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float, step: int) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter (buffers untouched),
    with :func:`ema_decay` of the optimiser step just taken (0-based)."""
    decay = ema_decay(rate, step)
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                  grad_clip: float | None = None) -> None:
    """One optimiser step on ``loss``: fresh gradients, the global norm of ``params`` clipped
    to ``grad_clip`` (None or 0: no clipping), then ``opt.step()``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Move the state of ``opt`` (moment estimates, loaded on the CPU) to ``device``; the step
    counts stay where the optimiser keeps them, on the CPU, unless its kernel is fused (or
    capturable): those read the counts on the parameters' device."""
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    for group in opt.state.values():
        for k, v in group.items():
            if torch.is_tensor(v) and (k != "step" or on_device):
                group[k] = v.to(device)


class EmaTrainState:
    """What a step-based trainer with an EMA of its weights (the DDPM's, the refiner's) trains
    and resumes: ``model``, its EMA copy ``ema`` (no gradients), AdamW ``opt`` over the model,
    and the generator ``gen`` that every random draw of training comes from (with torch's
    global RNG, which the model's own randomness, dropout, uses). Call ``torch.manual_seed``
    before building ``model``: its initialisation is part of the run."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, seed: int):
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    def to(self, device: torch.device) -> None:
        """Everything on ``device``; the model in training mode, the EMA in eval mode."""
        self.model.to(device).train()
        self.ema.to(device).eval()
        optimizer_to(self.opt, device)

    def step(self, loss: torch.Tensor, step: int, *, lr: float, grad_clip: float | None, ema_rate: float) -> None:
        """Optimiser step ``step`` (0-based) on ``loss`` at learning rate ``lr``, then the EMA."""
        set_lr(self.opt, lr)
        backward_step(loss, self.opt, self.model.parameters(), grad_clip)
        ema_update(self.ema, self.model, ema_rate, step)


def epoch_data(data: Any, epoch: int) -> Iterator:
    """The batches of epoch ``epoch`` of ``data``: an object with ``set_epoch`` (a
    :class:`~ddps_core.features.sampler.PixelSampler`) is set to it and iterated, a callable is
    called as ``data(epoch)``, any other iterable is iterated again (it must be re-iterable).
    A resumed run sees the batches of an uninterrupted one only when they are a function of
    the epoch."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
        return iter(data)
    if callable(data):
        return iter(data(epoch))
    if isinstance(data, Iterable):
        return iter(data)
    raise ConfigError(f"training data must be iterable, have set_epoch, or be a callable epoch -> batches; "
                      f"got {type(data).__name__}")


# --------------------------------------------------------------------------- identity
def run_id(settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The identity of a training run: 16 hex digits of the sha256 of ``settings`` (the values
    that change what is trained; not its length, logging or checkpoint interval) and
    ``inputs`` (name -> content id of each input, e.g. ``{"images": content_id([images])}``).

    A checkpoint is resumed only by a run with the same id. Tuples and lists hash alike."""
    text = json.dumps({"settings": dict(settings), "inputs": dict(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


Hashable = str | os.PathLike | bytes | np.ndarray | torch.Tensor


def content_id(items: Iterable[Hashable]) -> str:
    """16 hex digits of the sha256 of the *content* of ``items``, in order: files (a path: its
    bytes, read in 1 MiB chunks, not its name), arrays and tensors (dtype, shape and bytes), raw
    bytes. Two inputs with the same names but other content get other ids."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, torch.Tensor):
            t = item.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {list(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(item, np.ndarray):
            a = np.ascontiguousarray(item)
            h.update(f"array {a.dtype.str} {list(a.shape)}\n".encode())
            h.update(a.reshape(-1).view(np.uint8))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            h.update(f"bytes {len(item)}\n".encode())
            h.update(item)
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            h.update(f"file {path.stat().st_size}\n".encode())
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        else:
            raise TypeError(f"content_id: cannot hash a {type(item).__name__}")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- checkpoint files
def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` atomically: into a temporary file in the same folder, fsync, then
    rename over ``path`` (:func:`ddps_core.io.atomic_path`).

    The same state gives the same bytes, which DVC needs of an output: ``torch.save`` is
    handed a file object, not the temporary's name (given a name, it records the name's stem,
    random here, inside the archive), and the state is pickled in a canonical form
    (:func:`_canonical`), so a state loaded from a checkpoint saves as the state it was.

    The archive is made in memory and then written: torch's own writer turns a failed write
    (a full disk) into ``RuntimeError: basic_ios::clear``, which names neither the file nor
    the fault; a plain write raises the ``OSError`` that says both."""
    buf = io.BytesIO()
    torch.save(_canonical(dict(state)), buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())


def _canonical(obj: Any) -> Any:
    """``obj`` with every string interned and every container rebuilt (tensors as they are).

    Pickle writes an object it has seen before as a reference to the first copy, so the bytes
    depend on which equal values are the same object: a state built in this process shares
    its key strings (``"step"``), one loaded from a checkpoint holds fresh copies of them. With
    equal strings one object and no container shared, the bytes depend on the values only."""
    if type(obj) is str:
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((_canonical(k), _canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state dict's per-module versions
            out._metadata = _canonical(obj._metadata)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``torch.load(weights_only=True)``
    (tensors and plain data only: a pickle with code in it is refused). A missing, truncated,
    foreign or unsafe file is a :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: training checkpoint not found") from None
    except Exception as exc:  # noqa: BLE001 (a truncated zip, a foreign pickle, a refused global: one answer)
        # torch's own message advises weights_only=False, which would run the file's code
        raise CheckpointError(f"{path}: cannot read the training checkpoint (truncated, corrupt or not "
                              f"weights-only: {type(exc).__name__}); delete it to start over") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (a {type(state).__name__}); delete it "
                              "to start over")
    return state


def clear_temporaries(*paths: str | os.PathLike[str]) -> None:
    """Delete what killed atomic writes of ``paths`` left behind (``.<name>.*.tmp`` beside each):
    only the trainer writes these files, and the temporaries would stay in its output folder."""
    for path in map(Path, paths):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


class Checkpoint:
    """A trainer's resume file, and the checks that guard it.

    ``path`` holds ``{"run_id": ..., <unit>: position, **state}``. :meth:`resume` returns the
    saved state when its run id is this run's, and otherwise ``None`` (the run starts over; the
    reporter is told why). :meth:`save` refuses non-finite weights, so the file always holds
    the last good state. Errors raised through :meth:`error` say which checkpoint of this run
    is kept, or that none was written yet.

    :param path: the file; None for a run that keeps no checkpoint (it still gets the checks).
    :param unit: what the position counts (``step``, ``update``, ``epoch``), in messages too.
    :param hint: the advice that ends a :class:`TrainingError` (``Lower ddpm.lr.``).
    """

    def __init__(self, path: str | os.PathLike[str] | None, run: str, *, unit: str = "step",
                 report: Reporter | None = None, hint: str = ""):
        self.path, self.run_id, self.unit = None if path is None else Path(path), run, unit
        self.report, self.hint = report or Reporter(), hint
        self.at: int | None = None  # position of this run's last good checkpoint
        if self.path is not None:
            clear_temporaries(self.path)

    def resume(self) -> dict[str, Any] | None:
        """The saved state of this run (its position in ``state[unit]``), or None."""
        if self.path is None or not self.path.exists():
            return None
        state = load_checkpoint(self.path)
        if state.get("run_id") != self.run_id:
            self.report.log(f"{self.path} was trained with other settings or inputs: starting over")
            return None
        self.at = int(state[self.unit])
        self.report.log(f"resuming from {self.unit} {self.at} ({self.path})")
        return state

    def save(self, at: int, state: Mapping[str, Any], *modules: torch.nn.Module) -> None:
        """Write ``state`` as position ``at``, after checking that ``modules`` are finite (only
        the check without a file)."""
        self.check_weights(*modules, at=at)
        if self.path is not None:
            save_checkpoint(self.path, {"run_id": self.run_id, self.unit: int(at), **state})
            self.at = int(at)

    def kept(self) -> str:
        if self.path is None:
            return "this run keeps no checkpoint"
        if self.at is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint ({self.path}, {self.unit} {self.at}) is kept"

    def error(self, what: str) -> TrainingError:
        """``what`` went wrong: a :class:`TrainingError` that says what is kept and what to do."""
        return TrainingError(f"{what}; {self.kept()}." + (f" {self.hint}" if self.hint else ""))

    def check_loss(self, loss: torch.Tensor | float, at: int) -> float:
        """``loss`` as a float; a :class:`TrainingError` when it is NaN or infinite."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise self.error(f"non-finite loss ({value}) at {self.unit} {at}")
        return value

    def check_weights(self, *modules: torch.nn.Module, at: int) -> None:
        """A :class:`TrainingError` when a parameter or buffer of ``modules`` is not finite (a
        finite loss does not prove finite weights: NaN gradients give NaN weights)."""
        bad = nonfinite_tensors(*modules)
        if bad:
            names = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise self.error(f"non-finite weights ({names}) after {self.unit} {at}")


# --------------------------------------------------------------------------- loss log
class LossLog:
    """The training curve: rows of ``columns``, written as CSV (ints as they are, floats with 6
    significant digits, None as an empty cell) and kept in the checkpoint as JSON text, which
    round-trips every float exactly and pickles to the same bytes for the same rows."""

    def __init__(self, columns: Sequence[str]):
        self.columns = tuple(columns)
        self.rows: list[list[Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, *values: Any) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"a loss-log row has {len(self.columns)} values {self.columns}, got {len(values)}")
        self.rows.append(list(values))

    def last(self, column: str) -> Any:
        """The latest value of ``column`` (None before the first row)."""
        return self.rows[-1][self.columns.index(column)] if self.rows else None

    def state(self) -> str:
        return json.dumps(self.rows)

    def restore(self, state: str) -> None:
        self.rows = [list(r) for r in json.loads(state)]

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row])
        return buf.getvalue()

    def write(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.csv_text())


# --------------------------------------------------------------------------- time budget
class TimeBudget:
    """Wall-clock time since the trainer started, and an optional limit on it."""

    def __init__(self, seconds: float | None, report: Reporter | None = None):
        self.seconds, self.report = seconds, report or Reporter()
        self._start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def reached(self, where: str) -> bool:
        """True (and the reporter is told) once more than ``seconds`` have passed."""
        if self.seconds is None or self.elapsed <= self.seconds:
            return False
        self.report.log(f"time budget of {self.seconds:.0f} s reached at {where}")
        return True


class Record(dict):
    """A JSON record read from a file: a key it lacks is a :class:`DataError` naming the file
    and the key (an incomplete ``model.json``), not a bare ``KeyError``. Nested mappings are
    records too."""

    def __init__(self, data: Mapping[str, Any], path: Path, advice: str, where: str = ""):
        super().__init__({k: Record(v, path, advice, f"{where}{k}.") if isinstance(v, dict) else v
                          for k, v in data.items()})
        self._path, self._advice, self._where = path, advice, where

    def __missing__(self, key: str) -> Any:
        raise DataError(f"{self._path}: incomplete record: no '{self._where}{key}' entry{self._advice}")


def read_record(path: str | os.PathLike[str], missing: str, rerun: str = "") -> Record:
    """The JSON record a trainer wrote at ``path`` (its ``model.json``); a missing one is a
    :class:`~ddps_core.errors.DataError` ``"<path>: <missing>"`` (say which stage to run), and
    so are a truncated or corrupt file and, when read, a key the record lacks (``rerun``
    names the stage that writes it, for the advice)."""
    path = Path(path)
    advice = f"; rerun the {rerun} stage to write it again" if rerun else "; rerun the stage that wrote it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable record (truncated or corrupt JSON: {exc}){advice}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a record (a JSON {type(data).__name__}, expected an object){advice}")
    return Record(data, path, advice)
