"""Ensemble prediction: majority vote, Jensen-Shannon uncertainty, image score (DDPM-Seg).

For every pixel, each member's argmax is taken and the label is the per-pixel majority vote
(the mode of the ``M`` member labels). Ties go to the SMALLEST class id among the most voted
classes (``torch.argmax`` over the vote counts returns the first maximum). This makes the vote
deterministic; the reference's mode does not document its tie-breaking.

The uncertainty of a pixel is the Jensen-Shannon divergence of the members' softmax
distributions: ``JS = H(mean_m p_m) - mean_m H(p_m)`` with ``H(p) = -sum_k p_k ln p_k``
(natural log, ``0 ln 0 = 0``), in ``[0, ln M]``; tiny negative values from rounding are
clipped to 0. The image score is, as in the reference, the mean of the image's
``int(n / 10)`` largest pixel uncertainties (its top 10 %, rounded down); an image of fewer
than 10 pixels scores the mean of all of them (see :func:`image_score`).

Pixels are processed in chunks (``chunk`` pixels at a time, by default sized from ``D`` and
``M * K`` to a few tens of MB), so memory stays bounded for any image size; a feature source
can be a ``[D, S, S]`` array or a callable ``(ys, xs) -> [n, D]`` (e.g. a feature store's
on-demand bilinear taps), so the ``D x S x S`` float32 map never has to exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .ensemble import PixelEnsemble

__all__ = [
    "image_score",
    "js_divergence",
    "majority_vote",
    "predict_image",
    "predict_store",
    "vote_and_uncertainty",
    "vote_maps",
]

CHUNK_BYTES = 32 * 2**20
FeatureFn = Callable[[np.ndarray, np.ndarray], Any]


def majority_vote(member_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-pixel mode of ``member_labels [M, n]`` (int); ties go to the smallest class id."""
    M, n = member_labels.shape
    counts = torch.zeros(n, num_classes, dtype=torch.int32, device=member_labels.device)
    counts.scatter_add_(1, member_labels.t().long(), torch.ones(n, M, dtype=torch.int32, device=member_labels.device))
    return counts.argmax(dim=1)


def js_divergence(probs: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence ``[n]`` of member distributions ``probs [M, n, K]``:
    ``H(mean_m p_m) - mean_m H(p_m)``, natural log, clipped at 0."""
    probs = probs.double() if probs.dtype != torch.float64 else probs
    h_mean = torch.special.entr(probs.mean(dim=0)).sum(dim=-1)
    mean_h = torch.special.entr(probs).sum(dim=-1).mean(dim=0)
    return (h_mean - mean_h).clamp_min(0.0)


def vote_and_uncertainty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [n], js [n] float32)`` from member logits ``[M, n, K]``."""
    K = logits.shape[-1]
    labels = majority_vote(logits.argmax(dim=-1), K)
    js = js_divergence(torch.softmax(logits.double(), dim=-1)).float()
    return labels, js


def image_score(uncertainty: np.ndarray | torch.Tensor) -> float:
    """Mean of the ``int(n / 10)`` largest values of an uncertainty map of ``n`` pixels.

    The reference takes the sorted map's slice ``[-int(n / 10):]``; below 10 pixels that is
    ``[-0:]``, the whole map, so such an image scores the mean of all its pixels. That is
    kept: it is what the slice gives, and a mean of some pixels is a sensible score where
    10 % is less than one.
    """
    u = np.asarray(uncertainty.detach().cpu() if isinstance(uncertainty, torch.Tensor) else uncertainty,
                   dtype=np.float64).ravel()
    if u.size == 0:
        raise ValueError("image_score of an empty uncertainty map")
    k = u.size // 10 or u.size
    top = np.partition(u, u.size - k)[u.size - k:]
    return float(top.mean())


def _default_chunk(ensemble: PixelEnsemble) -> int:
    per_row = 4 * ensemble.feature_dim + 8 * 3 * ensemble.members * ensemble.num_classes
    return max(256, CHUNK_BYTES // per_row)


@torch.no_grad()
def vote_maps(
    ensemble: PixelEnsemble,
    features: np.ndarray | torch.Tensor | FeatureFn,
    chunk: int | None = None,
    image_size: int | None = None,
    mean_probs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The members' votes of one ``S x S`` input: ``(shares float32 [K, S, S], js float32 [S, S])``,
    and with ``mean_probs`` a third map, the members' mean softmax ``float32 [K, S, S]`` (the
    soft labels a student can distil from).

    ``shares[k]`` is the fraction of members whose argmax is class ``k``: its argmax over
    ``k`` is the majority vote (ties to the smallest id), and, unlike the vote, it can be
    averaged over overlapping windows and resized (:mod:`ddps_core.inference.windows`).

    :param features: float32 ``[D, S, S]`` (array or tensor), or a callable
        ``(ys, xs) -> [n, D]`` giving the features of pixels ``(ys, xs)`` (then ``image_size``
        is required).
    :param chunk: pixels evaluated at once (default: sized from ``D`` and ``M * K``).
    """
    was_training = ensemble.training
    ensemble.eval()
    try:
        device = next(ensemble.parameters()).device
        D, K, M = ensemble.feature_dim, ensemble.num_classes, ensemble.members
        chunk = int(chunk) if chunk else _default_chunk(ensemble)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if callable(features):
            if image_size is None:
                raise ValueError("image_size is required when features is a callable")
            S = int(image_size)
            flat = None
        else:
            arr = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
            if arr.dim() != 3 or arr.shape[0] != D or arr.shape[1] != arr.shape[2]:
                raise ValueError(f"features must be [{D}, S, S], got {tuple(arr.shape)}")
            S = int(arr.shape[1])
            flat = arr.reshape(D, S * S)
        n = S * S
        shares = torch.empty(K, n, dtype=torch.float32)
        unc = torch.empty(n, dtype=torch.float32)
        mean = torch.empty(K, n, dtype=torch.float32) if mean_probs else None
        for p0 in range(0, n, chunk):
            p1 = min(n, p0 + chunk)
            if flat is None:
                idx = np.arange(p0, p1)
                x = features(idx // S, idx % S)
                x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
                if tuple(x.shape) != (p1 - p0, D):
                    raise ValueError(f"feature callable returned {tuple(x.shape)}, expected {(p1 - p0, D)}")
            else:
                x = flat[:, p0:p1].t()
            logits = ensemble(x.to(device=device, dtype=torch.float32))
            votes = logits.argmax(dim=-1)  # [M, n]
            counts = torch.zeros(p1 - p0, K, dtype=torch.float32, device=votes.device)
            counts.scatter_add_(1, votes.t(), torch.ones(p1 - p0, M, dtype=torch.float32, device=votes.device))
            shares[:, p0:p1] = (counts / M).t().cpu()
            probs = torch.softmax(logits.double(), dim=-1)  # [M, n, K]
            unc[p0:p1] = js_divergence(probs).float().cpu()
            if mean is not None:
                mean[:, p0:p1] = probs.mean(dim=0).t().float().cpu()
        maps = (shares.reshape(K, S, S), unc.reshape(S, S))
        return maps if mean is None else (*maps, mean.reshape(K, S, S))
    finally:
        ensemble.train(was_training)


def predict_image(
    ensemble: PixelEnsemble,
    features: np.ndarray | torch.Tensor | FeatureFn,
    chunk: int | None = None,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Predict one ``S x S`` input: ``(labels [S, S], uncertainty float32 [S, S], score)``: the
    majority vote of :func:`vote_maps`, the Jensen-Shannon map, the top-10 % score. Labels are
    uint8 (uint16 when ``K > 256``)."""
    shares, unc = vote_maps(ensemble, features, chunk, image_size)
    K = ensemble.num_classes
    labels = shares.argmax(dim=0).numpy().astype(np.uint8 if K <= 256 else np.uint16)
    unc_map = unc.numpy()
    return labels, unc_map, image_score(unc_map)


#: Upper bound of the native maps read ahead at once by :func:`predict_store`.
PREFETCH_BYTES = 256 * 2**20


def _prefetched(store: Any, indices: list[int]) -> Iterator[tuple[int, Any]]:
    """``(i, store.native(i))`` for ``indices`` in order; a feature store's maps are read a
    run of images at a time (:meth:`FeatureStore.natives`), at most :data:`PREFETCH_BYTES`."""
    natives = getattr(store, "natives", None)
    if natives is None:
        for i in indices:
            yield i, store.native(i)
        return
    run = max(1, min(64, PREFETCH_BYTES // max(1, int(store.native_bytes))))
    for a in range(0, len(indices), run):
        batch = indices[a : a + run]
        yield from zip(batch, natives(batch))


def predict_store(
    ensemble: PixelEnsemble,
    store: Any,
    progress: Callable[[int, int, str], Any] | None = None,
    chunk: int | None = None,
    image_indices: list[int] | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, float]]:
    """Yield ``(image_id, labels, uncertainty, score)`` for every image of ``store`` (a
    feature store or any source with ``native`` / ``pixels`` / ``image_ids`` /
    ``image_size``), computing features chunk by chunk from the native maps.
    ``progress(done, total, image_id)`` is called after each image."""
    if store.feature_dim != ensemble.feature_dim:
        raise ValueError(f"store feature_dim {store.feature_dim} != ensemble feature_dim {ensemble.feature_dim}")
    indices = list(range(len(store))) if image_indices is None else [int(i) for i in image_indices]
    total = len(indices)
    for done, (i, native) in enumerate(_prefetched(store, indices), start=1):

        def feats(ys: np.ndarray, xs: np.ndarray, _i: int = i, _native: Any = native) -> np.ndarray:
            return store.pixels(_i, ys, xs, native=_native)

        labels, unc, score = predict_image(ensemble, feats, chunk=chunk, image_size=store.image_size)
        image_id = store.image_ids[i]
        if progress is not None:
            progress(done, total, image_id)
        yield image_id, labels, unc, score
