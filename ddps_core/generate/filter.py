"""Filtering labelled candidates by their image uncertainty score (METHODS.md §5).

``reference`` (DatasetDDPM): sort the candidates by score, ascending (most certain first; ties
broken by image id so the result does not depend on the input order), drop the
``drop_certain`` most certain, then drop the ``ceil(drop_uncertain * N)`` most uncertain, where
N is the number of candidates. The most certain images are dropped because they are mostly
trivial (e.g. nearly all background); the most uncertain because their labels are likely
wrong.

``threshold``: keep the candidates whose score is at most ``max_score``.

Both return one decision per candidate (``kept``, ``reason``, ``rank``) so that the export
can record every decision in its manifest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ddps_core.errors import ConfigError

__all__ = ["REASONS", "filter_scores", "reference_filter", "threshold_filter"]

REASONS = ("kept", "most_certain", "most_uncertain", "above_threshold")


def _order(scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids for {len(scores)} scores")
    if not np.isfinite(scores).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(scores))[:3]]
        raise ValueError(f"non-finite uncertainty scores for {bad}")
    return np.lexsort((np.asarray(ids, dtype=object).astype(str), scores))


def reference_filter(scores: Sequence[float], ids: Sequence[str], drop_certain: int = 30,
                     drop_uncertain: float = 0.1) -> pd.DataFrame:
    """The reference rule; a frame with ``image_id, score, rank, kept, reason`` in input order
    (``rank`` 0 = most certain)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if drop_certain < 0 or not 0 <= drop_uncertain < 1:
        raise ConfigError(f"drop_certain must be >= 0 and drop_uncertain in [0, 1), got {drop_certain}, {drop_uncertain}")
    order = _order(scores, ids)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    n_uncertain = math.ceil(drop_uncertain * n - 1e-9)
    reason = np.full(n, "kept", dtype=object)
    reason[rank >= n - n_uncertain] = "most_uncertain"
    reason[rank < drop_certain] = "most_certain"
    return pd.DataFrame({"image_id": list(ids), "score": scores, "rank": rank,
                         "kept": reason == "kept", "reason": reason})


def threshold_filter(scores: Sequence[float], ids: Sequence[str], max_score: float) -> pd.DataFrame:
    """Keep ``score <= max_score``; the same frame as :func:`reference_filter`."""
    scores = np.asarray(scores, dtype=np.float64)
    order = _order(scores, ids)
    rank = np.empty(scores.size, dtype=np.int64)
    rank[order] = np.arange(scores.size)
    kept = scores <= max_score
    return pd.DataFrame({"image_id": list(ids), "score": scores, "rank": rank, "kept": kept,
                         "reason": np.where(kept, "kept", "above_threshold").astype(object)})


def filter_scores(scores: Sequence[float], ids: Sequence[str], cfg) -> pd.DataFrame:
    """Apply the rule a :class:`~ddps_core.config.GenerateSettings` names."""
    if cfg.filter == "reference":
        return reference_filter(scores, ids, cfg.drop_certain, cfg.drop_uncertain)
    if cfg.filter == "threshold":
        return threshold_filter(scores, ids, cfg.max_score)
    raise ConfigError(f"generate.filter: unknown rule {cfg.filter!r}")
