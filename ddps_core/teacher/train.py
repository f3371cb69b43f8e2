"""Training the pixel classifier ensemble: all members in one pass over the data.

:func:`train_ensemble` reads every batch ONCE for all ``M`` members (one wide matmul for the
first layer of all of them, see :class:`~ddps_core.teacher.ensemble.PixelEnsemble`) and trains
each member with Adam (lr 1e-3) on the cross-entropy, with the reference stopping rule applied
to each member separately (METHODS §4).

How the members differ
----------------------
The reference trains its 10 members one after another on the same shuffled data; they differ
only by their random state (init and shuffle order). Here they see the same batches in the
same order, so besides their own initialisation (member ``m`` from seed ``seed + m``) each
member gets its own data weighting: every pixel of every batch gets a Poisson(1) weight per
member, drawn from a seeded generator, and member ``m``'s loss is the weighted mean
cross-entropy ``sum(w * ce) / max(sum(w), 1)``. Poisson(1) weights are the streaming,
one-pass approximation of bagging (the online bootstrap of Oza & Russell): a bootstrap sample
of ``n`` items contains each item Binomial(n, 1/n) ~ Poisson(1) times, and the weights can be
drawn per pixel as the data streams by without materialising resampled datasets. The weights
of all members are drawn for every batch (also for members that have stopped), so a member's
weights never depend on when the others stop. BatchNorm batch statistics are computed over the
whole (unweighted) batch; only the loss is weighted.

Stopping (reference rule, per member)
-------------------------------------
Each member tracks its own batch loss. From epoch index ``min_epoch`` (4, the reference's
``epoch > 3``) on, a batch whose loss is below the member's best so far resets its counter,
any other batch increments it; when the counter exceeds ``patience`` (50) the member stops
(after that batch's update, as in the reference). Losses are only tracked from ``min_epoch``
on (the best starts at +inf there). A member whose bootstrap weights of a batch are all zero
has no loss on that batch, which is then not counted for it (otherwise a tiny last batch with
loss 0 would become an unbeatable "best"). Batches of fewer than 2 pixels are skipped
(BatchNorm batch statistics need 2). Training ends when every member has stopped, or after
``max_epochs`` epochs.

Frozen members
--------------
A stopped member must not change: Adam's momentum would otherwise keep moving it even with a
zero gradient. The optimiser (:class:`MemberAdam`) treats member ``m``'s row of every stacked
parameter (a contiguous view) as a separate Adam tensor with its own moment estimates and step
count, and each step hands PyTorch's functional Adam only the rows of the active members; a
frozen member's parameters, moments and step count are never written, so they stay
bit-identical. Its BatchNorm running statistics and ``num_batches_tracked`` are likewise only
updated for active members (``update_stats`` of the ensemble's forward: the new statistics are
selected with ``torch.where`` on the member axis). Frozen members are still evaluated in the
forward pass (their outputs are simply not part of the loss).

Checkpoints and resume
----------------------
With ``checkpoint_path``, a checkpoint (ensemble, optimiser, per-member best / counter /
stopped, epoch, position in the epoch, bootstrap RNG state, settings) is written atomically
every ``checkpoint_every`` updates and at the end of every epoch, and a run that finds one
resumes from it: the sampler is set to the saved epoch (``set_epoch``) and the batches of that
epoch already trained on are skipped (read, not trained on), so a resumed run gives the same
final weights as an uninterrupted one. A non-finite loss raises :class:`NonFiniteLossError`
before any update, leaving the last good checkpoint untouched.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.adam import adam

from ddps_core.device import nonfinite_tensors
from ddps_core.errors import CheckpointError, ConfigError, DataError, DDPSError
from ddps_core.io import atomic_path

from .ensemble import PixelEnsemble

__all__ = [
    "MemberAdam",
    "NonFiniteLossError",
    "TrainSummary",
    "load_checkpoint",
    "member_losses",
    "train_ensemble",
]

CHECKPOINT_FORMAT = "ddps-pixel-train"
CHECKPOINT_VERSION = 1

Batch = tuple[torch.Tensor, torch.Tensor]
ProgressFn = Callable[[int, int, int, float], Any]


class NonFiniteLossError(DDPSError):
    """A member's training loss became NaN or infinite (the last good checkpoint is kept)."""


# --------------------------------------------------------------------------------------------
# Member-masked Adam
# --------------------------------------------------------------------------------------------


class MemberAdam:
    """Adam over the stacked parameters of a :class:`PixelEnsemble`, per member.

    Every parameter is ``[M, ...]`` after ``.view(M, -1)``; member ``m``'s row of a parameter
    (a contiguous view), of its gradient and of both moment estimates form one "tensor" of
    PyTorch's functional Adam (``torch.optim.adam.adam``, fused kernel where available), with
    a step count per member. A step passes only the rows of the ``active`` members, so a
    frozen member's parameters, moments and step count are never written (bit-identical), and
    each active member gets exactly PyTorch's Adam update (no weight decay, no amsgrad).
    """

    def __init__(self, ensemble: PixelEnsemble, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.ensemble = ensemble
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.M = ensemble.members
        self.params = dict(ensemble.named_parameters())
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        device = next(iter(self.params.values())).device
        # one step tensor per (parameter, member): the Adam kernels increment each one given
        self._steps = {k: [torch.zeros((), dtype=torch.float32, device=device) for _ in range(self.M)]
                       for k in self.params}
        self.fused = device.type in ("cpu", "cuda")

    @property
    def steps(self) -> torch.Tensor:
        """Adam steps taken by each member, int64 ``[M]``."""
        first = next(iter(self._steps.values()))
        return torch.tensor([int(t.item()) for t in first], dtype=torch.long)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One Adam step for the members where ``active`` (bool ``[M]``) is true."""
        members = [m for m, a in enumerate(active.to(torch.bool).cpu().tolist()) if a]
        if not members:
            return
        P, G, EA, ES, ST = [], [], [], [], []
        for name, p in self.params.items():
            if p.grad is None:
                continue
            rows = (p.view(self.M, -1), p.grad.view(self.M, -1), self.exp_avg[name].view(self.M, -1),
                    self.exp_avg_sq[name].view(self.M, -1))
            for m in members:
                P.append(rows[0][m])
                G.append(rows[1][m])
                EA.append(rows[2][m])
                ES.append(rows[3][m])
                ST.append(self._steps[name][m])
        adam(
            P, G, EA, ES, [], ST, fused=self.fused or None, foreach=False if not self.fused else None,
            amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr, weight_decay=0.0,
            eps=self.eps, maximize=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "steps": self.steps,
            "exp_avg": {k: v.detach().cpu().clone() for k, v in self.exp_avg.items()},
            "exp_avg_sq": {k: v.detach().cpu().clone() for k, v in self.exp_avg_sq.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("exp_avg", "exp_avg_sq"):
            got = state[key]
            if set(got) != set(self.params):
                raise KeyError(f"optimiser {key} has tensors {sorted(got)}, expected {sorted(self.params)}")
            for k, p in self.params.items():
                if tuple(got[k].shape) != tuple(p.shape):
                    raise ValueError(f"optimiser {key}[{k}] has shape {tuple(got[k].shape)}, expected {tuple(p.shape)}")
                getattr(self, key)[k].copy_(got[k].to(p.device))
        steps = state["steps"]
        if tuple(steps.shape) != (self.M,):
            raise ValueError(f"optimiser steps has shape {tuple(steps.shape)}, expected ({self.M},)")
        for ts in self._steps.values():
            for m, t in enumerate(ts):
                t.fill_(float(steps[m]))


# --------------------------------------------------------------------------------------------
# Losses, summary
# --------------------------------------------------------------------------------------------


def member_losses(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member loss ``[M]`` = ``sum(w * ce) / max(sum(w), 1)`` over the batch (plain mean
    without weights) and the per-member weight sums ``[M]``."""
    M, B, K = logits.shape
    ce = F.cross_entropy(logits.reshape(M * B, K), labels.repeat(M), reduction="none").view(M, B)
    if weights is None:
        return ce.mean(dim=1), torch.full((M,), float(B), device=logits.device)
    wsum = weights.sum(dim=1)
    return (weights * ce).sum(dim=1) / wsum.clamp_min(1.0), wsum


@dataclass
class TrainSummary:
    """What :func:`train_ensemble` did."""

    epochs: int  # epochs started (the last one may have ended early when all members stopped)
    updates: int  # optimiser steps
    batches: int  # batches trained on (skipped tiny batches excluded)
    reason: str  # "all_stopped" or "max_epochs"
    stopped: list[bool]
    stop_epoch: list[int]  # -1: never stopped
    stop_update: list[int]  # update index (1-based) after which the member stopped; -1: never
    best_loss: list[float]
    epoch_losses: list[float]  # mean active-member loss of each epoch
    resumed_from: int | None = None  # the update count of the checkpoint resumed from
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _settings(ensemble: PixelEnsemble, lr: float, patience: int, min_epoch: int, bootstrap: bool, seed: int) -> dict[str, Any]:
    return {
        "feature_dim": ensemble.feature_dim,
        "num_classes": ensemble.num_classes,
        "members": ensemble.members,
        "widths": list(ensemble.widths),
        "init_seed": ensemble.seed,
        "source_id": ensemble.source_id,
        "lr": float(lr),
        "patience": int(patience),
        "min_epoch": int(min_epoch),
        "bootstrap": bool(bootstrap),
        "seed": int(seed),
    }


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint (``torch.load(weights_only=True)``); ``CheckpointError``
    naming the file when it is unreadable or not one."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"pixel training checkpoint {path}: file not found") from None
    except Exception as exc:
        raise CheckpointError(f"pixel training checkpoint {path}: unreadable (truncated, corrupt or unsafe): {exc}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"pixel training checkpoint {path}: not a pixel training checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"pixel training checkpoint {path}: version {ck.get('version')!r} is not supported")
    return ck


class _State:
    """Mutable training state (everything a checkpoint holds besides weights/optimiser)."""

    def __init__(self, M: int):
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed
        self.updates = 0
        self.batches = 0
        self.best = [math.inf] * M
        self.count = [0] * M
        self.stopped = [False] * M
        self.stop_epoch = [-1] * M
        self.stop_update = [-1] * M
        self.epoch_losses: list[float] = []
        self.epoch_loss_sum = 0.0
        self.epoch_loss_n = 0
        self.finished = False
        self.reason = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, d: dict[str, Any]) -> None:
        for k in vars(self):
            if k not in d:
                raise KeyError(k)
            setattr(self, k, d[k])


def _save_checkpoint(path: Path, ensemble: PixelEnsemble, opt: MemberAdam, state: _State, rng: torch.Generator,
                     settings: dict[str, Any]) -> None:
    ck = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "settings": settings,
        "model": {k: v.detach().cpu().clone() for k, v in ensemble.state_dict().items()},
        "optimizer": opt.state_dict(),
        "state": state.to_dict(),
        "rng": rng.get_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


class CheckpointSettingsChanged(CheckpointError):
    """The checkpoint to resume from was made with other settings (the caller may start over)."""


def _restore(path: Path, ensemble: PixelEnsemble, opt: MemberAdam, state: _State, rng: torch.Generator,
             settings: dict[str, Any]) -> None:
    ck = load_checkpoint(path)
    have = ck.get("settings", {})
    diffs = [f"{k}: checkpoint {have.get(k)!r}, now {v!r}" for k, v in settings.items() if have.get(k) != v]
    if diffs:
        raise CheckpointSettingsChanged(
            f"pixel training checkpoint {path}: made with other settings ({'; '.join(diffs)}); "
            "delete it to start over"
        )
    try:
        ensemble.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state.load(ck["state"])
        rng.set_state(ck["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"pixel training checkpoint {path}: inconsistent content ({exc})") from None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _remove_stale_temporaries(ck_path: Path) -> None:
    """Delete the temporaries (``.checkpoint.pt.*.tmp``) of checkpoint writes that a killed run
    left behind: only this trainer writes its checkpoint, and they would otherwise stay in the
    stage's output folder."""
    for stale in ck_path.parent.glob(f".{ck_path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _epoch_batches(sampler: Any, epoch: int) -> Iterator[Batch]:
    """The batches of epoch ``epoch``: ``sampler.set_epoch(epoch)`` then iterate (a
    :class:`~ddps_core.features.sampler.PixelSampler`), or ``sampler(epoch)`` (a factory)."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
        return iter(sampler)
    if callable(sampler):
        return iter(sampler(epoch))
    if isinstance(sampler, Iterable):
        return iter(sampler)
    raise ConfigError(f"sampler must be an iterable with set_epoch or a callable epoch -> batches, got {type(sampler).__name__}")


def train_ensemble(
    sampler: Any,
    ensemble: PixelEnsemble,
    *,
    lr: float = 1e-3,
    max_epochs: int = 100,
    patience: int = 50,
    min_epoch: int = 4,
    bootstrap: bool = True,
    seed: int = 0,
    progress: ProgressFn | None = None,
    progress_every: int = 100,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
) -> TrainSummary:
    """Train ``ensemble`` in place on the batches of ``sampler`` (see the module docstring).

    :param sampler: a :class:`~ddps_core.features.sampler.PixelSampler` (or anything with
        ``set_epoch`` that iterates ``(features [B, D], labels [B])``), or a callable
        ``epoch -> iterable of batches``. For exact resumption its batches must be a function
        of the epoch.
    :param lr: Adam learning rate.
    :param max_epochs: at most this many epochs.
    :param patience: a member stops when its batch loss has not improved on its best for more
        than ``patience`` consecutive batches...
    :param min_epoch: ...counted from epoch index ``min_epoch`` on.
    :param bootstrap: Poisson(1) per-member pixel weights (False: plain mean cross-entropy,
        members then differ by their initialisation only).
    :param seed: seed of the bootstrap weights.
    :param progress: called as ``progress(epoch, batches_done, active_members, mean_loss)``
        every ``progress_every`` updates and at the end of each epoch (``mean_loss``: mean over
        the updates since the last call of the active members' mean loss); an exception from
        it aborts training (the checkpoint written before stays).
    :param checkpoint_path: training checkpoint file (written atomically; resumed from when it
        exists and ``resume``).
    :param checkpoint_every: also checkpoint every this many updates (0: only at epoch ends).
    :return: a :class:`TrainSummary`.
    """
    if max_epochs < 0 or patience < 0 or min_epoch < 0 or progress_every < 1 or checkpoint_every < 0:
        raise ConfigError(
            "max_epochs, patience, min_epoch and checkpoint_every must be >= 0 and progress_every >= 1, got "
            f"{max_epochs}, {patience}, {min_epoch}, {checkpoint_every}, {progress_every}"
        )
    t0 = time.perf_counter()
    M, K = ensemble.members, ensemble.num_classes
    device = next(ensemble.parameters()).device
    settings = _settings(ensemble, lr, patience, min_epoch, bootstrap, seed)
    opt = MemberAdam(ensemble, lr=lr)
    rng = torch.Generator().manual_seed(int(seed))
    state = _State(M)
    ck_path = None if checkpoint_path is None else Path(checkpoint_path)
    resumed_from = None
    if ck_path is not None:
        _remove_stale_temporaries(ck_path)
    if ck_path is not None and resume and ck_path.exists():
        _restore(ck_path, ensemble, opt, state, rng, settings)
        resumed_from = state.updates
        if state.finished and state.reason == "max_epochs" and state.epoch < max_epochs:
            state.finished, state.reason = False, ""  # continue a run stopped by a smaller max_epochs

    def checkpoint() -> None:
        bad = nonfinite_tensors(ensemble)
        if bad:
            raise NonFiniteLossError(
                f"non-finite ensemble weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) "
                f"after update {state.updates}; "
                + (f"last good checkpoint kept at {ck_path}" if ck_path is not None else "no checkpoint"))
        if ck_path is not None:
            _save_checkpoint(ck_path, ensemble, opt, state, rng, settings)

    rep_sum, rep_n = 0.0, 0

    def report(epoch: int) -> None:
        nonlocal rep_sum, rep_n
        if progress is None or rep_n == 0:
            return
        mean = rep_sum / rep_n
        rep_sum, rep_n = 0.0, 0
        progress(epoch, state.updates, M - sum(state.stopped), mean)

    ensemble.train()
    try:
        while not state.finished:
            if all(state.stopped) or state.epoch >= max_epochs:
                state.finished, state.reason = True, "all_stopped" if all(state.stopped) else "max_epochs"
                checkpoint()
                break
            skip = state.batch_in_epoch
            for bi, (x, y) in enumerate(_epoch_batches(sampler, state.epoch)):
                if bi < skip:
                    continue
                state.batch_in_epoch = bi + 1
                B = int(y.shape[0])
                # Poisson weights of every member for every batch (even skipped / frozen ones),
                # so the random stream never depends on which members are still training.
                w = torch.poisson(torch.ones(M, B), generator=rng) if bootstrap else None
                if B < 2:
                    continue
                if x.dim() != 2 or x.shape[1] != ensemble.feature_dim or x.shape[0] != B:
                    raise DataError(f"batch {bi} of epoch {state.epoch}: features {tuple(x.shape)} do not fit "
                                    f"labels {tuple(y.shape)} and feature_dim {ensemble.feature_dim}")
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= K:
                    raise DataError(f"batch {bi} of epoch {state.epoch}: label values {lo}..{hi} outside 0..{K - 1}")
                active = torch.tensor([not s for s in state.stopped])
                x = x.to(device=device, dtype=torch.float32, non_blocking=True)
                y = y.to(device=device, dtype=torch.long, non_blocking=True)
                wd = None if w is None else w.to(device)
                opt.zero_grad()
                logits = ensemble(x, update_stats=active.to(device))
                losses, wsum = member_losses(logits, y, wd)
                loss_list, wsum_list = losses.detach().cpu().tolist(), wsum.detach().cpu().tolist()
                bad = [m for m in range(M) if not state.stopped[m] and not math.isfinite(loss_list[m])]
                if bad:
                    raise NonFiniteLossError(
                        f"non-finite training loss of member(s) {bad} at epoch {state.epoch}, batch {bi} "
                        f"(update {state.updates + 1}); "
                        + (f"last good checkpoint kept at {ck_path}" if ck_path is not None else "no checkpoint")
                    )
                losses[active.to(device)].sum().backward()  # frozen members: not in the loss
                opt.step(active)
                state.updates += 1
                state.batches += 1
                act = [m for m in range(M) if not state.stopped[m]]
                mean_active = sum(loss_list[m] for m in act) / len(act)
                state.epoch_loss_sum += mean_active
                state.epoch_loss_n += 1
                rep_sum += mean_active
                rep_n += 1
                if state.epoch >= min_epoch:
                    for m in act:
                        if wsum_list[m] <= 0:
                            continue  # no data for this member in this batch
                        if loss_list[m] < state.best[m]:
                            state.best[m], state.count[m] = loss_list[m], 0
                        else:
                            state.count[m] += 1
                        if state.count[m] > patience:
                            state.stopped[m] = True
                            state.stop_epoch[m], state.stop_update[m] = state.epoch, state.updates
                if all(state.stopped):
                    break
                if checkpoint_every and state.updates % checkpoint_every == 0:
                    checkpoint()
                if state.updates % progress_every == 0:
                    report(state.epoch)
            # end of the epoch (or every member stopped)
            done_epoch = state.epoch
            state.epoch_losses.append(state.epoch_loss_sum / state.epoch_loss_n if state.epoch_loss_n else float("nan"))
            state.epoch_loss_sum, state.epoch_loss_n = 0.0, 0
            state.epoch += 1
            state.batch_in_epoch = 0
            if all(state.stopped):
                state.finished, state.reason = True, "all_stopped"
            elif state.epoch >= max_epochs:
                state.finished, state.reason = True, "max_epochs"
            checkpoint()
            report(done_epoch)
    finally:
        ensemble.eval()
    return TrainSummary(
        epochs=state.epoch,
        updates=state.updates,
        batches=state.batches,
        reason=state.reason,
        stopped=list(state.stopped),
        stop_epoch=list(state.stop_epoch),
        stop_update=list(state.stop_update),
        best_loss=[float(b) for b in state.best],
        epoch_losses=list(state.epoch_losses),
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t0,
    )
