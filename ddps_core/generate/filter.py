"""Filtering labelled candidates by their image uncertainty score.

Every rule sorts the N candidates by score, ascending (rank 0 = most certain; ties broken by
image id so the result does not depend on the input order), and returns one decision per
candidate (``kept``, ``reason``, ``rank``) so that the export can record every decision in
its manifest. The most certain images are dropped because they are mostly trivial (e.g.
nearly all background), the most uncertain because their labels are likely wrong.

``reference`` -- the rule of DDPM-Seg's dataset generation (DatasetDDPM). With
``c = drop_certain`` (30 in the reference, where it is a constant) and
``f = int(N * drop_uncertain)`` (the reference's ``uncertainty_portion``, 0.1), the kept
ranks are the Python slice ``[c : -f + c]`` of the ranks. When ``f > c`` that keeps exactly
``N - f`` images: ``f`` are dropped in all, the ``c`` most certain and the ``f - c`` most
uncertain (1,800 of 2,000 with the defaults). The slice is taken as written, so its edge
cases are the reference's too:

- ``f <= c`` (N < 310 with the defaults): the stop ``c - f`` is not negative and not past
  the start, so the slice is empty and nothing is kept: the ``c`` most certain are dropped
  as ``most_certain``, every other candidate as ``empty_slice``. Fewer than ``c`` candidates
  are all ``most_certain``.
- ``drop_uncertain == 0``: the reference filters only when its portion is positive, so every
  candidate is kept (``drop_certain`` is then not applied either).
- ``f`` is ``int`` of the float product, as in the reference: ``int(100 * 0.29)`` is 28.

``drop_both`` -- a rule of ours: drop the ``drop_certain`` most certain, then, on top of
them, the ``ceil(drop_uncertain * N)`` most uncertain (with the defaults 230 of 2,000, where
the reference drops 200). It keeps something whenever ``N > drop_certain + ceil(...)``.

``threshold`` -- keep the candidates whose score is at most ``max_score``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ddps_core.errors import ConfigError

__all__ = ["REASONS", "drop_both_filter", "filter_scores", "reference_filter", "threshold_filter"]

REASONS = ("kept", "most_certain", "most_uncertain", "empty_slice", "above_threshold")


def _order(scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids for {len(scores)} scores")
    if not np.isfinite(scores).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(scores))[:3]]
        raise ValueError(f"non-finite uncertainty scores for {bad}")
    return np.lexsort((np.asarray(ids, dtype=object).astype(str), scores))


def _ranks(scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    order = _order(scores, ids)
    rank = np.empty(scores.size, dtype=np.int64)
    rank[order] = np.arange(scores.size)
    return rank


def _check_drops(drop_certain: int, drop_uncertain: float) -> None:
    if drop_certain < 0 or not 0 <= drop_uncertain < 1:
        raise ConfigError(f"drop_certain must be >= 0 and drop_uncertain in [0, 1), got {drop_certain}, {drop_uncertain}")


def _frame(ids: Sequence[str], scores: np.ndarray, rank: np.ndarray, reason: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ids), "score": scores, "rank": rank,
                         "kept": reason == "kept", "reason": reason})


def reference_filter(scores: Sequence[float], ids: Sequence[str], drop_certain: int = 30,
                     drop_uncertain: float = 0.1) -> pd.DataFrame:
    """DDPM-Seg's rule (see the module docstring, edge cases included); a frame with
    ``image_id, score, rank, kept, reason`` in input order (``rank`` 0 = most certain)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    _check_drops(drop_certain, drop_uncertain)
    rank = _ranks(scores, ids)
    if drop_uncertain == 0:
        return _frame(ids, scores, rank, np.full(n, "kept", dtype=object))
    c = int(drop_certain)
    f = int(n * drop_uncertain)
    kept = range(n)[c:-f + c]  # the reference's slice, Python's negative-stop semantics included
    reason = np.full(n, "most_uncertain" if len(kept) else "empty_slice", dtype=object)
    reason[rank < c] = "most_certain"
    if len(kept):
        reason[(rank >= kept.start) & (rank < kept.stop)] = "kept"
    return _frame(ids, scores, rank, reason)


def drop_both_filter(scores: Sequence[float], ids: Sequence[str], drop_certain: int = 30,
                     drop_uncertain: float = 0.1) -> pd.DataFrame:
    """Our rule: drop the ``drop_certain`` most certain and the ``ceil(drop_uncertain * N)``
    most uncertain; the same frame as :func:`reference_filter`."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    _check_drops(drop_certain, drop_uncertain)
    rank = _ranks(scores, ids)
    # the tolerance makes ceil(0.1 * 30) 3, not 4 (the float product is 3.0000000000000004)
    n_uncertain = math.ceil(drop_uncertain * n - 1e-9)
    reason = np.full(n, "kept", dtype=object)
    reason[rank >= n - n_uncertain] = "most_uncertain"
    reason[rank < drop_certain] = "most_certain"
    return _frame(ids, scores, rank, reason)


def threshold_filter(scores: Sequence[float], ids: Sequence[str], max_score: float) -> pd.DataFrame:
    """Keep ``score <= max_score``; the same frame as :func:`reference_filter`."""
    scores = np.asarray(scores, dtype=np.float64)
    rank = _ranks(scores, ids)
    return _frame(ids, scores, rank, np.where(scores <= max_score, "kept", "above_threshold").astype(object))


def filter_scores(scores: Sequence[float], ids: Sequence[str], cfg) -> pd.DataFrame:
    """Apply the rule a :class:`~ddps_core.config.GenerateSettings` names."""
    if cfg.filter == "reference":
        return reference_filter(scores, ids, cfg.drop_certain, cfg.drop_uncertain)
    if cfg.filter == "drop_both":
        return drop_both_filter(scores, ids, cfg.drop_certain, cfg.drop_uncertain)
    if cfg.filter == "threshold":
        return threshold_filter(scores, ids, cfg.max_score)
    raise ConfigError(f"generate.filter: unknown rule {cfg.filter!r}")
