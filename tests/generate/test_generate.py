"""Dataset generation: the filter keeps exactly the expected ids, the export round-trips
losslessly through the generic folder reader (and the DDPM-Seg layout), a failed export
leaves the previous one in place, and sampling resumes per batch to the same files."""

import numpy as np
import pandas as pd
import pytest
import torch

from ddps_core.config import GenerateSettings
from ddps_core.datasets import DDPMSegFolder, GenericFolder
from ddps_core.errors import DataError
from ddps_core.generate.export import Candidate, export_dataset
from ddps_core.generate.filter import drop_both_filter, filter_scores, reference_filter, threshold_filter
from ddps_core.generate.sample import sample_to_folder, to_uint8


def _shuffled(n, seed=0):
    """``n`` candidates named so that sorting the names sorts the scores (im0000 the most
    certain), handed over in a random order."""
    ids = [f"im{i:04d}" for i in range(n)]
    perm = np.random.default_rng(seed).permutation(n)
    return [i / n for i in perm], [ids[i] for i in perm]


def _kept(out):
    return sorted(out.loc[out["kept"], "image_id"])


def test_reference_filter_keeps_exactly_the_expected_ids():
    # N = 400: int(0.1 * 400) = 40 dropped in all, the 30 most certain and 10 most uncertain
    scores, ids = _shuffled(400)
    out = reference_filter(scores, ids)  # the reference's 30 and 0.1
    assert out["kept"].sum() == 400 - 40
    assert _kept(out) == [f"im{i:04d}" for i in range(30, 390)]
    assert sorted(out.loc[out["reason"] == "most_certain", "image_id"]) == [f"im{i:04d}" for i in range(30)]
    assert sorted(out.loc[out["reason"] == "most_uncertain", "image_id"]) == [f"im{i:04d}" for i in range(390, 400)]
    assert list(out["image_id"]) == ids  # input order kept
    assert sorted(out["rank"]) == list(range(400))
    assert out.set_index("image_id").loc["im0123", "rank"] == 123
    # the reference's generated set: 1,800 of 2,000
    scores, ids = _shuffled(2000, seed=1)
    out = reference_filter(scores, ids)
    assert out["kept"].sum() == 1800 and (out["reason"] == "most_uncertain").sum() == 170
    # a small drop_certain: N = 50, int(0.1 * 50) = 5 dropped, 3 certain and 2 uncertain
    scores, ids = _shuffled(50, seed=2)
    out = reference_filter(scores, ids, drop_certain=3, drop_uncertain=0.1)
    assert _kept(out) == [f"im{i:04d}" for i in range(3, 48)]


def test_reference_filter_small_sets_follow_the_slice():
    # int(0.1 * N) <= 30: the slice [30 : 30 - int(0.1 N)] is empty, nothing is kept
    for n, f in [(309, 30), (300, 30), (100, 10), (9, 0)]:
        scores, ids = _shuffled(n)
        out = reference_filter(scores, ids)
        assert not out["kept"].any(), n
        assert (out["reason"] == "most_certain").sum() == min(n, 30)
        assert (out["reason"] == "empty_slice").sum() == max(n - 30, 0)
    # the first N that keeps anything: int(31.0) = 31, 279 kept, one most uncertain
    scores, ids = _shuffled(310)
    out = reference_filter(scores, ids)
    assert _kept(out) == [f"im{i:04d}" for i in range(30, 309)]
    assert list(out.loc[out["reason"] == "most_uncertain", "image_id"]) == ["im0309"]
    # a portion of 0: the reference does not filter at all
    assert reference_filter(*_shuffled(20), drop_uncertain=0.0)["kept"].all()
    # int() of the float product, as the reference: 100 * 0.29 = 28.999999999999996 -> 28
    out = reference_filter(*_shuffled(100), drop_certain=3, drop_uncertain=0.29)
    assert _kept(out) == [f"im{i:04d}" for i in range(3, 75)]
    # ties: ranks follow the ids
    out = reference_filter([0.5] * 50, [f"x{i:02d}" for i in range(50)][::-1], drop_certain=2, drop_uncertain=0.1)
    assert _kept(out) == [f"x{i:02d}" for i in range(2, 47)]
    with pytest.raises(ValueError, match="non-finite"):
        reference_filter([0.1, float("nan")], ["a", "b"])


def test_drop_both_filter_keeps_exactly_the_expected_ids():
    # 20 candidates; drop the 3 most certain, then ceil(0.1 * 20) = 2 most uncertain
    scores, ids = _shuffled(20)
    out = drop_both_filter(scores, ids, drop_certain=3, drop_uncertain=0.1)
    assert _kept(out) == [f"im{i:04d}" for i in range(3, 18)]
    assert sorted(out.loc[out["reason"] == "most_certain", "image_id"]) == ["im0000", "im0001", "im0002"]
    assert sorted(out.loc[out["reason"] == "most_uncertain", "image_id"]) == ["im0018", "im0019"]
    assert list(out["image_id"]) == ids
    # the defaults on 2,000: 30 + 200 dropped
    assert drop_both_filter(*_shuffled(2000))["kept"].sum() == 1770


def test_drop_both_filter_ties_and_fraction_rounding():
    # 30 equal scores: ranks follow the ids; 0.1 * 30 = 3 exactly (not 4 from float error)
    ids = [f"x{i:02d}" for i in range(30)][::-1]
    out = drop_both_filter([0.5] * 30, ids, drop_certain=2, drop_uncertain=0.1)
    assert set(out.loc[out["reason"] == "most_certain", "image_id"]) == {"x00", "x01"}
    assert set(out.loc[out["reason"] == "most_uncertain", "image_id"]) == {"x27", "x28", "x29"}
    assert out["kept"].sum() == 25
    # a candidate set smaller than drop_certain keeps nothing (the export then refuses)
    assert not drop_both_filter([0.1, 0.2], ["a", "b"], drop_certain=30).kept.any()


def test_filter_scores_dispatches_on_the_setting():
    scores, ids = _shuffled(50)
    ref = filter_scores(scores, ids, GenerateSettings(filter="reference", drop_certain=3))
    both = filter_scores(scores, ids, GenerateSettings(filter="drop_both", drop_certain=3))
    assert ref["kept"].sum() == 45 and both["kept"].sum() == 42


def test_threshold_filter():
    out = threshold_filter([0.3, 0.1, 0.5, 0.2], ["a", "b", "c", "d"], max_score=0.25)
    assert list(out["kept"]) == [False, True, False, True]
    assert list(out["reason"]) == ["above_threshold", "kept", "above_threshold", "kept"]
    assert list(out["rank"]) == [2, 0, 3, 1]


def _candidates(n_gen=6, n_real=2, size=8, k=4, seed=0):
    rng = np.random.default_rng(seed)
    cands, truth = [], {}
    for i in range(n_gen + n_real):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = rng.integers(0, k, (size, size)).astype(np.uint8)
        real = i >= n_gen
        if real:
            mask[0, :3] = 255  # real labels may carry the ignore index
        image_id = f"real_{i}" if real else f"gen_{i:06d}"
        truth[image_id] = (image, mask)
        cands.append(Candidate(image_id, "real" if real else "generated", str(i), None if real else float(i),
                               load=lambda im=image, m=mask: (im, m),
                               sampler={} if real else {"method": "ddim", "steps": 10, "seed": 3},
                               teacher=None if real else "abc"))
    return cands, truth


def test_export_round_trips_through_the_generic_reader(tmp_path):
    k = 4
    cands, truth = _candidates(k=k)
    scored = [c for c in cands if c.score is not None]
    decisions = drop_both_filter([c.score for c in scored], [c.image_id for c in scored], 1, 0.2)
    manifest = export_dataset(tmp_path / "gen", cands, decisions, ["a", "b", "c", "d"], ddpm_seg=True, contact=2)
    kept = set(manifest.loc[manifest["kept"], "image_id"])
    # gen_0 is the most certain, gen_5 (ceil(0.2 * 6) = 2: gen_4, gen_5) the most uncertain
    assert kept == {"gen_000001", "gen_000002", "gen_000003", "real_6", "real_7"}
    reader = GenericFolder(tmp_path / "gen")
    assert set(reader.ids) == kept and reader.num_classes == k and reader.class_names == ["a", "b", "c", "d"]
    for sample in reader:
        image, mask = truth[sample.id]
        assert np.array_equal(sample.image, image) and np.array_equal(sample.label, mask)
    ddpm = DDPMSegFolder(tmp_path / "gen" / "ddpm-seg", "train")
    for sample in ddpm:
        assert np.array_equal(sample.image, truth[sample.id][0]) and np.array_equal(sample.label, truth[sample.id][1])
    # every decision is in the manifest, rejected files are kept apart
    m = pd.read_parquet(tmp_path / "gen" / "manifest.parquet")
    assert len(m) == 8 and set(m["reason"]) == {"kept", "most_certain", "most_uncertain", "real"}
    rejected = m[~m["kept"]]
    assert all((tmp_path / "gen" / p).is_file() and p.startswith("rejected/") for p in rejected["image"])
    row = m.set_index("image_id").loc["gen_000002"]
    assert row["sampler_method"] == "ddim" and row["sampler_steps"] == 10 and row["teacher"] == "abc"
    mask = truth["gen_000002"][1]
    for c in range(k):
        assert row[f"frac_{c}"] == pytest.approx((mask == c).mean())
    real = m.set_index("image_id").loc["real_6"]
    assert np.isnan(real["score"]) and pd.isna(real["rank"])
    # fractions exclude ignore pixels of real labels
    assert sum(real[f"frac_{c}"] for c in range(k)) == pytest.approx(1 - 3 / 64)
    assert (tmp_path / "gen" / "contact_sheet.png").is_file()


def test_failed_export_leaves_the_previous_one(tmp_path):
    cands, _ = _candidates()
    scored = [c for c in cands if c.score is not None]
    dec = drop_both_filter([c.score for c in scored], [c.image_id for c in scored], 0, 0.0)
    export_dataset(tmp_path / "gen", cands, dec, ["a", "b", "c", "d"], contact=0)
    before = sorted(p.name for p in (tmp_path / "gen" / "images").iterdir())

    def boom():
        raise DataError("x.png: corrupt")

    bad = cands[:3] + [Candidate("gen_000099", "generated", "99", 0.5, load=boom)] + cands[3:]
    dec2 = pd.concat([dec, pd.DataFrame([{"image_id": "gen_000099", "rank": 9, "kept": True, "reason": "kept"}])])
    with pytest.raises(DataError, match="corrupt"):
        export_dataset(tmp_path / "gen", bad, dec2, ["a", "b", "c", "d"], contact=0)
    assert sorted(p.name for p in (tmp_path / "gen" / "images").iterdir()) == before
    # nothing kept is refused with a message, and the previous export stays
    none = drop_both_filter([c.score for c in scored], [c.image_id for c in scored], 30, 0.1)
    with pytest.raises(DataError, match="kept no image"):
        export_dataset(tmp_path / "gen", scored, none, ["a", "b", "c", "d"], contact=0)
    assert sorted(p.name for p in (tmp_path / "gen" / "images").iterdir()) == before


class _Schedule:
    """A stand-in sampler: 'samples' are a function of the generator's draws only."""

    calls = 0

    def sample(self, model, n, steps, method, generator=None, device=None, clip=True):
        type(self).calls += 1
        return torch.rand((n, 3, 4, 4), generator=generator) * 2 - 1


def test_sampling_resumes_per_batch_to_the_same_files(tmp_path):
    ids = sample_to_folder(None, _Schedule(), tmp_path / "a", 10, batch_size=4, seed=1)
    assert ids == [f"gen_{i:06d}" for i in range(10)] and _Schedule.calls == 3
    # a run killed after its first batch: marker of batch 1 and 2 missing, a file of batch 2 too
    full = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.png")}
    (tmp_path / "a" / ".batches" / "000001.done").unlink()
    (tmp_path / "a" / "gen_000009.png").unlink()
    _Schedule.calls = 0
    sample_to_folder(None, _Schedule(), tmp_path / "a", 10, batch_size=4, seed=1)
    assert _Schedule.calls == 2  # batches 1 and 2 redone, batch 0 kept
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").glob("*.png")} == full


def test_to_uint8_maps_the_range():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]  # 63.75 -> 64; 127.5 -> 128 (half to even)
