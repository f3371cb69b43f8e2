"""The learning-curve benchmark runs end to end at a tiny size and writes the table it promises."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import bench_active

ROUNDS = (4, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    # a DDPM of a few steps: the features are poor, but every part of the protocol runs
    result = bench_active.measure(pool=40, n_test=10, n_unlabeled=4, rounds=ROUNDS, seeds=(0,), ddpm_steps=3,
                                  members=2, max_epochs=1, work=root / "work", out=root / "out")
    return result, root / "out"


@pytest.mark.slow
def test_table_has_one_row_per_strategy_labels_and_seed(tiny):
    _, out = tiny
    df = pd.read_parquet(out / "learning_curve.parquet")
    assert len(df) == len(bench_active.STRATEGIES) * len(ROUNDS)
    assert {"strategy", "seed", "round", "labels", "miou", "labelled_ids", "batch_ids", "train_s",
            "pool_spearman_before", "batch_error_before"} <= set(df.columns)
    assert {f"iou_{c}" for c in bench_active.SYNTHETIC_CLASSES} <= set(df.columns)
    assert df["miou"].between(0, 100).all()
    csv = pd.read_csv(out / "learning_curve.csv")
    assert list(csv.columns[:5]) == ["labels", "strategy", "mIoU_mean", "mIoU_min", "mIoU_max"]
    assert len(csv) == len(bench_active.STRATEGIES) * len(ROUNDS)
    assert (out / "learning_curve.png").stat().st_size > 0
    wide = pd.read_csv(out / "learning_curve_dvc.csv")  # dvc.yaml's plot active_learning_curve
    assert list(wide.columns) == ["labels", "suggested", "random"] and list(wide["labels"]) == list(ROUNDS)


@pytest.mark.slow
def test_rounds_have_their_sizes_and_share_round_zero(tiny):
    result, _ = tiny
    df = result["table"]
    for _, r in df.iterrows():
        assert len(r["labelled_ids"]) == r["labels"] == ROUNDS[r["round"]]
        assert len(set(r["labelled_ids"])) == r["labels"]
    first = df[df["round"] == 0].set_index("strategy")
    assert list(first.loc["suggested", "labelled_ids"]) == list(first.loc["random", "labelled_ids"])
    assert first.loc["suggested", "miou"] == first.loc["random", "miou"]  # one teacher for both


@pytest.mark.slow
def test_suggested_picks_never_repeat_a_labelled_image(tiny):
    result, _ = tiny
    df = result["table"]
    for (strategy, seed), runs in df.sort_values("round").groupby(["strategy", "seed"]):
        labelled: list[str] = []
        for _, r in runs.iterrows():
            batch = list(r["batch_ids"])
            assert not set(batch) & set(labelled), f"{strategy}: a batch repeats a labelled image"
            labelled += batch
            assert sorted(labelled) == sorted(r["labelled_ids"])


@pytest.mark.slow
def test_runner_rows_compare_suggested_with_random(tiny):
    result, _ = tiny
    (row,) = bench_active.rows(result)
    assert row["name"] == f"active/miou_at_{ROUNDS[-1]}"
    assert row["baseline"].startswith("random")
    assert row["settings"]["teacher_members"] == 2 and row["settings"]["rounds"] == list(ROUNDS)
