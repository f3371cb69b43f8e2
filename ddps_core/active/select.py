"""Which pool images to label next: the uncertain ones, and among those diverse ones.

The rule (:func:`diverse_uncertain`): rank the pool by the teacher's image score (the mean of
the top ``int(n/10)`` pixel Jensen-Shannon divergences, the score DDPM-Seg's filter ranks by),
keep the ``candidates`` most uncertain, and pick among them by greedy k-center (farthest-first
traversal; Sener and Savarese's core-set selection): first the most uncertain image, then,
each time, the candidate farthest from every image picked so far, in a descriptor space of
pooled DDPM features (:func:`pooled_descriptors`). Ties go to the more uncertain image. A
candidate closer than ``near_copy`` to a picked image is a near-copy and is never picked, so a
pool holding the same uncertain image ten times yields it once.

Plain uncertainty ranking returns near-copies side by side (an uncertain pose or lighting
appears in many pool images); plain k-center picks outliers whatever the teacher knows about
them. Restricting k-center to the uncertain candidates keeps both properties.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Pick", "diverse_uncertain", "pooled_descriptors"]


@dataclass(frozen=True)
class Pick:
    """One picked image: its index in the pool, its uncertainty rank (0: the most uncertain)
    and its distance to the nearest earlier pick (inf for the first)."""

    index: int
    uncertainty_rank: int
    distance: float

    def why(self, pool: int) -> str:
        head = f"uncertainty rank {self.uncertainty_rank + 1} of {pool}"
        if not np.isfinite(self.distance):
            return f"{head}; the most uncertain image"
        return f"{head}; farthest from the images picked before it (descriptor distance {self.distance:.3f})"


def pooled_descriptors(maps: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
    """One descriptor per image from feature maps ``[N, C, h, w]`` (per block and step): each
    map averaged over space, each channel standardised over the ``N`` images (a channel
    constant over them counts for nothing), the maps concatenated, and each row scaled to unit
    length, so distances lie in ``[0, 2]`` whatever the feature sizes."""
    arrays = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not arrays:
        raise ValueError("pooled_descriptors: no feature maps")
    parts = []
    for a in arrays:
        pooled = np.asarray(a, dtype=np.float64).mean(axis=(2, 3))
        sd = pooled.std(axis=0)
        parts.append((pooled - pooled.mean(axis=0)) / np.where(sd > 0, sd, 1.0))
    d = np.concatenate(parts, axis=1)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return (d / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def diverse_uncertain(scores: Sequence[float], descriptors: np.ndarray | Callable[[np.ndarray], np.ndarray], n: int,
                      candidates: int | None = None, near_copy: float = 0.05) -> list[Pick]:
    """Up to ``n`` picks among the ``candidates`` most uncertain images (default ``4 n``), by
    the rule of the module text. ``descriptors``: one row per pool image, or a function from
    pool indices to their rows (called once, with the candidates only). Fewer than ``n`` picks
    come back when every remaining candidate is a near-copy of a pick."""
    scores = np.asarray(scores, dtype=np.float64)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not callable(descriptors) and len(descriptors) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(descriptors)} descriptors")
    order = np.argsort(-scores, kind="stable")  # most uncertain first; equal scores by pool order
    m = min(len(scores), max(n, 4 * n if candidates is None else int(candidates)))
    cand = order[:m]
    if m == 0:
        return []
    x = np.asarray(descriptors(cand) if callable(descriptors) else np.asarray(descriptors)[cand], dtype=np.float64)
    nearest = np.full(m, np.inf)  # distance of each candidate to its nearest pick
    taken = np.zeros(m, dtype=bool)
    picks: list[Pick] = []
    j = 0  # the most uncertain candidate first
    while True:
        picks.append(Pick(int(cand[j]), int(j), float(nearest[j])))
        taken[j] = True
        nearest = np.minimum(nearest, np.linalg.norm(x - x[j], axis=1))
        if len(picks) == n:
            break
        free = np.where(taken | (nearest < near_copy), -np.inf, nearest)
        j = int(np.argmax(free))  # first maximum: the more uncertain of equally far candidates
        if not np.isfinite(free[j]):
            break
    return picks
