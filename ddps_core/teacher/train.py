"""Training the pixel classifier ensemble: all members in one pass over the data.

:func:`train_ensemble` reads every batch ONCE for all ``M`` members (one wide matmul for the
first layer of all of them, see :class:`~ddps_core.teacher.ensemble.PixelEnsemble`) and trains
each member with Adam (lr 1e-3) on the cross-entropy, with the reference stopping rule applied
to each member separately.

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
stopped, epoch, position in the epoch, bootstrap RNG state) is written atomically every
``checkpoint_every`` updates and at the end of every epoch, and a run with the same identity
resumes from it: the sampler is set to the saved epoch (``set_epoch``) and the batches of that
epoch already trained on are skipped (read, not trained on), so a resumed run gives the same
final weights, and the same checkpoint bytes, as an uninterrupted one. The identity is the
settings that change what is trained (the ensemble's shape and init seed, lr, patience,
min_epoch, bootstrap, seed, a :class:`~ddps_core.features.sampler.PixelSampler`'s batching)
and the content ids of the inputs the caller passes; a checkpoint of another run is not
resumed (the run starts over and says so). A non-finite loss raises
:class:`~ddps_core.training.TrainingError` before any update, and non-finite weights are never
checkpointed, so the last good checkpoint stays. The loop's pieces are
:mod:`ddps_core.training`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.adam import adam

from ddps_core.errors import CheckpointError, ConfigError, DataError
from ddps_core.progress import Reporter
from ddps_core.training import Checkpoint, TimeBudget, TrainingError, epoch_data, load_checkpoint, run_id

from .ensemble import PixelEnsemble

__all__ = [
    "MemberAdam",
    "TrainSummary",
    "TrainingError",
    "load_checkpoint",
    "member_losses",
    "train_ensemble",
]


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
    seconds: float = 0.0  # this process's training time
    extra: dict[str, Any] = field(default_factory=dict)

    #: What this process did rather than what was trained: an interrupted and resumed run
    #: differs from an uninterrupted one here only.
    RUN_FIELDS = ("resumed_from", "seconds")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """Everything but :attr:`RUN_FIELDS`: what an output file (``train.json``) may hold,
        the same for identical runs."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUN_FIELDS}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _identity(ensemble: PixelEnsemble, sampler: Any, lr: float, patience: int, min_epoch: int,
              bootstrap: bool, seed: int) -> dict[str, Any]:
    """The settings that change what is trained (the run identity, with the inputs' ids)."""
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
        "sampler": _sampler_settings(sampler),
    }


def _sampler_settings(sampler: Any) -> dict[str, Any] | None:
    """How a :class:`~ddps_core.features.sampler.PixelSampler` cuts its store into batches: a
    checkpoint's position in an epoch means nothing under another batching. None for other
    samplers (a callable's batches are the caller's to identify, in ``inputs``)."""
    keys = ("batch_size", "buffer_images", "seed", "ignore_index", "min_class_pixels")
    if not all(hasattr(sampler, k) for k in (*keys, "image_indices")):
        return None
    return {**{k: getattr(sampler, k) for k in keys},
            "image_indices": [int(i) for i in getattr(sampler, "image_indices")]}


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


def _restore(ck: dict[str, Any], path: Path, ensemble: PixelEnsemble, opt: MemberAdam, state: _State,
             rng: torch.Generator) -> None:
    try:
        ensemble.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state.load(ck["state"])
        rng.set_state(ck["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: inconsistent pixel training checkpoint ({exc}); delete it to "
                              "start over") from None


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


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
    inputs: Mapping[str, str] | None = None,
    report: Reporter | None = None,
    task: str = "teacher",
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
    :param inputs: content ids of what is trained on (name -> id, e.g. the feature store's
        checksum); part of the run identity. Needed with ``checkpoint_path``.
    :param report: gets ``progress(task, updates, total, epoch=, active=, loss=)`` before the
        first batch (without a loss or a total), every ``progress_every`` updates and at the end
        of each epoch (``total``: ``max_epochs`` epochs of ``len(sampler)`` batches, None
        without a length; ``active``: members still training; ``loss``: the mean over the
        updates since the last report of the active members' mean loss), and the resume /
        start-over lines. An exception from it aborts training (the checkpoint written before
        stays).
    :param task: the name progress is reported under (a stage training one ensemble per feature
        method names each).
    :param checkpoint_path: training checkpoint file (written atomically; resumed from when it
        exists, belongs to this run and ``resume``).
    :param checkpoint_every: also checkpoint every this many updates (0: only at epoch ends).
    :return: a :class:`TrainSummary`.
    """
    if max_epochs < 0 or patience < 0 or min_epoch < 0 or progress_every < 1 or checkpoint_every < 0:
        raise ConfigError(
            "max_epochs, patience, min_epoch and checkpoint_every must be >= 0 and progress_every >= 1, got "
            f"{max_epochs}, {patience}, {min_epoch}, {checkpoint_every}, {progress_every}"
        )
    if checkpoint_path is not None and inputs is None:
        raise ConfigError("train_ensemble: a checkpoint_path needs the inputs' content ids (inputs=), "
                          "or a checkpoint of other data would be resumed")
    report = report or Reporter()
    clock = TimeBudget(None)  # no limit: this run's time, for the summary
    M, K = ensemble.members, ensemble.num_classes
    device = next(ensemble.parameters()).device
    identity = run_id(_identity(ensemble, sampler, lr, patience, min_epoch, bootstrap, seed), inputs or {})
    ckpt = Checkpoint(checkpoint_path, identity, unit="update", report=report,
                      hint="Lower teacher.lr or check the features.")
    opt = MemberAdam(ensemble, lr=lr)
    rng = torch.Generator().manual_seed(int(seed))
    state = _State(M)
    resumed_from = None
    if resume and (ck := ckpt.resume()) is not None:
        _restore(ck, ckpt.path, ensemble, opt, state, rng)
        resumed_from = state.updates
        if state.finished and state.reason == "max_epochs" and state.epoch < max_epochs:
            state.finished, state.reason = False, ""  # continue a run stopped by a smaller max_epochs

    def checkpoint() -> None:
        ckpt.save(state.updates, {"model": {k: v.detach().cpu().clone() for k, v in ensemble.state_dict().items()},
                                  "optimizer": opt.state_dict(), "state": state.to_dict(), "rng": rng.get_state()},
                  ensemble)

    rep_sum, rep_n = 0.0, 0

    def progress(epoch: int) -> None:
        nonlocal rep_sum, rep_n
        if rep_n == 0:
            return
        mean = rep_sum / rep_n
        rep_sum, rep_n = 0.0, 0
        report.progress(task, state.updates, total, epoch=epoch, active=M - sum(state.stopped), loss=mean)

    # the first report comes before len(sampler), which reads every label of the store once
    report.progress(task, state.updates, None, epoch=state.epoch, active=M - sum(state.stopped))
    total = max_epochs * len(sampler) if hasattr(sampler, "__len__") else None
    ensemble.train()
    try:
        while not state.finished:
            if all(state.stopped) or state.epoch >= max_epochs:
                state.finished, state.reason = True, "all_stopped" if all(state.stopped) else "max_epochs"
                checkpoint()
                break
            skip = state.batch_in_epoch
            for bi, (x, y) in enumerate(epoch_data(sampler, state.epoch)):
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
                    raise ckpt.error(f"non-finite training loss of member(s) {bad} at epoch {state.epoch}, "
                                     f"batch {bi} (update {state.updates + 1})")
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
                    progress(state.epoch)
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
            progress(done_epoch)
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
        seconds=clock.elapsed,
    )
