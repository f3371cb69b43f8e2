"""SIGKILL at random points of four stages (feature extraction, teacher training,
generation, refiner training) on tiny projects; each stage is killed at >= 5 points chosen by a
seeded RNG over the progress markers of an uninterrupted reference run (plus a random delay),
the kills following each other on one output folder, and then rerun to completion.

Checked after every kill: every file under a final name parses, feature stores read cleanly
and their done markers are per shard. Checked at the end: the outputs equal the reference
run's bit for bit (feature stores, generated images / masks / manifest, and every file of the
trainers' folders: weights, checkpoints, loss logs, records), so DVC sees the same outputs
whether or not a run was interrupted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ddps_core.config import parse_settings
from tests.faults.killing import (
    check_final_files_parse,
    choose_kills,
    digest,
    kill_then_finish,
    reference,
    temporaries,
)
from tests.helpers import tiny_project

N_KILLS = 5


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    raw = tiny_project(
        root, {"n_unlabeled": 12, "n_labeled": 4, "n_test": 3},
        features={"steps": [10], "blocks": [1, 2], "shard_images": 2, "batch_size": 2,
                  "out": str(root / "features"), "splits": ["train", "test", "unlabeled"]},  # more shards to kill
        teacher={"baselines": [], "members": 2, "max_epochs": 8, "patience": 100, "checkpoint_every": 3,
                 "out": str(root / "ens"), "labels_out": str(root / "labels"), "min_class_pixels": 1},
        generate={"source": "both", "n_samples": 8, "sample_steps": 2, "batch_size": 1, "filter": "drop_both",
                  "drop_certain": 2, "drop_uncertain": 0.2, "out": str(root / "generated"),
                  "work": str(root / "work"), "contact_sheet": 2})
    return root, raw


def _with(raw, **sections):
    out = dict(raw)
    for name, over in sections.items():
        out[name] = {**raw[name], **over}
    return parse_settings(out)


def _store_check(folder: Path) -> int:
    """Every image of each (possibly interrupted) store under ``folder`` reads; completion is
    per shard. Returns the number of done images."""
    from ddps_core.features import FeatureStore

    total = 0
    for zj in sorted(folder.rglob("zarr.json")):
        path = zj.parent
        if not path.name.endswith(".zarr") or not (path / "done").exists():
            continue
        store = FeatureStore.open(path, read_only=True)
        done = store.done_mask()
        for i in np.flatnonzero(done):
            store.native(int(i))
            if store.has_labels:
                store.label(int(i))
        for k in range(store.num_shards):
            a, b = store.shard_range(k)
            assert done[a:b].all() or not done[a:b].any(), f"{path}: shard {k} half done"
        total += int(done.sum())
    return total


def _assert_same(ref: dict[str, str], got: dict[str, str], ignore=()):
    keep = lambda d: {k: v for k, v in d.items() if not any(k.endswith(x) for x in ignore)}  # noqa: E731
    ref_k, got_k = keep(ref), keep(got)
    assert sorted(ref_k) == sorted(got_k), (
        f"files differ: only in reference {sorted(set(ref_k) - set(got_k))[:5]}, "
        f"only after kills {sorted(set(got_k) - set(ref_k))[:5]}")
    diff = [k for k in ref_k if ref_k[k] != got_k[k]]
    assert not diff, f"{len(diff)} files differ from the uninterrupted run: {diff[:5]}"


def _renamed(ref: dict[str, str], old: str, new: str) -> dict[str, str]:
    return {k.replace(old, new, 1) if k.startswith(old + "/") else k: v for k, v in ref.items()}


@pytest.fixture(scope="module")
def extracted(project):
    root, raw = project
    s = parse_settings(raw)
    markers, seconds, _ = reference("extract", s)
    return markers, seconds, digest([root / "features"])


@pytest.fixture(scope="module")
def trained(project, extracted):
    root, raw = project
    s = parse_settings(raw)
    markers, seconds, summary = reference("train_teacher", s)
    return markers, seconds, digest([root / "ens"]), summary


@pytest.fixture(scope="module")
def generated(project, trained):
    from ddps_core import stages

    root, raw = project
    s = parse_settings(raw)
    stages.get("label").run(s)
    markers, seconds, summary = reference("generate", s)
    return markers, seconds, digest([root / "generated"]), summary


@pytest.mark.slow
def test_extraction_killed_five_times_resumes_bit_identical(project, extracted, tmp_path):
    root, raw = project
    markers, seconds, ref = extracted
    out = root / "features-killed"
    s = _with(raw, features={"out": str(out)})
    kills = choose_kills(markers, seconds, N_KILLS, seed=101)
    done = []

    def after(kill):
        check_final_files_parse([out])
        done.append(_store_check(out))

    run = kill_then_finish("extract", s, tmp_path, markers, kills, after)
    assert len({k.target for k in run.kills}) == len({(k.seen, k.delay) for k in run.kills}) == N_KILLS and all(k.killed for k in run.kills)
    assert done == sorted(done)  # finished shards are never lost
    assert _store_check(out) == 12 + 4 + 3
    # every file bit-identical but the stores' writer locks (they name their last holder)
    _assert_same(_renamed(ref, "features", out.name), digest([out]), ignore=("writer.lock",))
    print("leftover temporaries:", temporaries([out]))


@pytest.mark.slow
def test_ensemble_training_killed_five_times_resumes_to_the_same_weights(project, trained, tmp_path):
    from ddps_core.teacher.train import load_checkpoint

    root, raw = project
    markers, seconds, ref, _ = trained
    out = root / "ens-killed"
    s = _with(raw, teacher={"out": str(out)})
    kills = choose_kills(markers, seconds, N_KILLS, seed=202)
    run = kill_then_finish("train_teacher", s, tmp_path, markers, kills, lambda _k: check_final_files_parse([out]))
    assert len({k.target for k in run.kills}) == len({(k.seen, k.delay) for k in run.kills}) == N_KILLS
    # every file bit-identical: weights, checkpoint, train.json (no timing or resume record)
    _assert_same(_renamed(ref, "ens", out.name), digest([out]))
    assert load_checkpoint(out / "checkpoint.pt")["state"]["finished"]
    assert run.final_markers[1] != "teacher 0"  # the last run resumed (its first report is past 0)
    # a kill during a checkpoint write leaves its temporary; the next run removes it
    assert temporaries([out]) == []


@pytest.mark.slow
def test_generation_killed_five_times_resumes_to_the_same_dataset(project, generated, tmp_path):
    root, raw = project
    markers, seconds, ref, summary = generated
    out, work = root / "gen-killed", root / "work-killed"
    s = _with(raw, generate={"out": str(out), "work": str(work)})
    kills = choose_kills(markers, seconds, N_KILLS, seed=303)
    done = []

    def after(kill):
        check_final_files_parse([out, work])
        done.append(_store_check(work))

    run = kill_then_finish("generate", s, tmp_path, markers, kills, after)
    assert len({k.target for k in run.kills}) == len({(k.seen, k.delay) for k in run.kills}) == N_KILLS
    _assert_same(_renamed(ref, "generated", out.name), digest([out]))
    assert not (work / "features.zarr").exists()
    print("leftover temporaries:", temporaries([out, work]))


@pytest.fixture(scope="module")
def ddps_trained(tmp_path_factory):
    from tests.refiner.test_stage import _project, _settings

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults-ddps")
    _project(root)
    kw = dict(steps=6, checkpoint_every=2, log_every=1, ablation=True)
    s = _settings(root, out=str(root / "ddps"), **kw)
    markers, seconds, summary = reference("train_refiner", s)
    return root, kw, markers, seconds, digest([root / "ddps"])


@pytest.mark.slow
def test_ddps_training_killed_five_times_resumes_to_the_same_weights(ddps_trained, tmp_path):
    from tests.refiner.test_stage import _settings

    root, kw, markers, seconds, ref = ddps_trained
    out = root / "ddps-killed"
    s = _settings(root, out=str(out), **kw)
    kills = choose_kills(markers, seconds, N_KILLS, seed=404)
    run = kill_then_finish("train_refiner", s, tmp_path, markers, kills, lambda _k: check_final_files_parse([out]))
    assert len({k.target for k in run.kills}) == len({(k.seen, k.delay) for k in run.kills}) == N_KILLS
    # every file equals the uninterrupted run's bit for bit: EMA weights, checkpoints, loss
    # logs and model.json of both denoisers (none holds timing or its own folder's path)
    _assert_same(_renamed(ref, "ddps", out.name), digest([out]))
    for name in ("loss.csv", "ablation-gt/loss.csv"):
        assert len(pd.read_csv(out / name)) == kw["steps"]
    assert temporaries([out]) == []  # a killed write's temporary is cleared by the next run
