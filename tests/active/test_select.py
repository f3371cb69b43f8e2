"""The selection rule of `ddps suggest`: the most uncertain first, then farthest-first among
the uncertain candidates, never a near-copy of a pick."""

import numpy as np
import pytest

from ddps_core.active import diverse_uncertain, pooled_descriptors


def test_a_pool_of_duplicated_uncertain_images_yields_one_of_each():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(4, 8))
    # 4 uncertain images, 3 copies each (pool order interleaved), then 6 certain distinct images
    uncertain = np.repeat(distinct, 3, axis=0)[[0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]]
    certain = rng.normal(size=(6, 8))
    desc = pooled_descriptors([np.concatenate([uncertain, certain])[:, :, None, None]])
    scores = np.r_[np.full(12, 0.9) - np.arange(12) * 1e-3, np.full(6, 0.1)]
    picks = diverse_uncertain(scores, desc, n=4)  # candidates: the 12 copies
    originals = {int(np.flatnonzero((distinct == uncertain[p.index]).all(axis=1))[0]) for p in picks}
    assert len(picks) == 4 and originals == {0, 1, 2, 3}
    # asking for more than the distinct candidates hold stops at the near-copies ...
    assert len(diverse_uncertain(scores, desc, n=6)) == 6  # (candidates 24: the certain ones join)
    assert len(diverse_uncertain(scores, desc, n=6, candidates=12)) == 4
    # ... and a pick is never a copy of an earlier one
    rows = [tuple(np.round(desc[p.index], 5)) for p in diverse_uncertain(scores, desc, n=10)]
    assert len(rows) == len(set(rows)) == 10


def test_farthest_first_by_hand():
    # five points on a line, uncertainty decreasing left to right: the most uncertain (x = 0)
    # first, then the farthest (x = 10), then the one farthest from both (x = 4 is 4 from 0 and
    # 6 from 10; x = 5 is 5 and 5: x = 5 wins with 5 > 4)
    x = np.array([[0.0], [1.0], [4.0], [5.0], [10.0]])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    picks = diverse_uncertain(scores, x, n=3, candidates=5, near_copy=0.0)
    assert [p.index for p in picks] == [0, 4, 3]
    assert [p.uncertainty_rank for p in picks] == [0, 4, 3]
    assert picks[0].distance == np.inf and picks[1].distance == pytest.approx(10.0)
    assert picks[2].distance == pytest.approx(5.0)
    assert "most uncertain" in picks[0].why(5) and "rank 5 of 5" in picks[1].why(5)
    # only the candidates are described, once
    seen = []

    def describe(idx):
        seen.append(list(idx))
        return x[idx]

    assert [p.index for p in diverse_uncertain(scores, describe, n=2, candidates=3, near_copy=0.0)] == [0, 2]
    assert seen == [[0, 1, 2]]


def test_pooled_descriptors_are_unit_rows_and_ignore_constant_channels():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 3, 4, 4))
    a[:, 1] = 7.0  # constant over the images: says nothing about them
    d = pooled_descriptors({"b0": a})
    assert d.shape == (5, 3) and np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    assert np.allclose(d[:, 1], 0.0)
    means = a.mean(axis=(2, 3))
    z = (means - means.mean(0)) / np.where(means.std(0) > 0, means.std(0), 1)
    assert np.allclose(d, z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)
