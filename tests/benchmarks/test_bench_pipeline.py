"""The end-to-end benchmark reads make run's stage times (reports/run_times.json)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_pipeline


def _write(path, stages, total):
    path.write_text(json.dumps({"date": "2026-12-03T11:00:00Z", "machine": "x86_64, 2 CPUs, Linux",
                                "total_s": total, "server_start_s": 4.0, "stages": stages}))
    return path


def test_rows_are_the_stages_that_ran_with_their_share(tmp_path):
    path = _write(tmp_path / "run_times.json", [
        {"stage": "data", "seconds": 30.0, "ran": True},
        {"stage": "train_ddpm", "seconds": 210.0, "ran": True},
        {"stage": "extract", "seconds": 0.0, "ran": False},
    ], 300.0)
    rows = bench_pipeline.rows(path)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"pipeline/data", "pipeline/train_ddpm", "pipeline/total"}
    assert by_name["pipeline/train_ddpm"]["ratio"] == pytest.approx(0.7)
    assert by_name["pipeline/data"]["baseline_value"] == 300.0
    total = by_name["pipeline/total"]
    assert total["ratio"] == pytest.approx(300.0 / 900.0)
    assert "skipped" in total["figure"]
    assert total["settings"]["skipped"] == ["extract"]


def test_every_stage_ran_is_said_in_the_total_row(tmp_path):
    path = _write(tmp_path / "t.json", [{"stage": "data", "seconds": 950.0, "ran": True}], 1000.0)
    total = bench_pipeline.rows(path)[-1]
    assert total["figure"].startswith("make run wall time after the install")
    assert total["ratio"] > 1


def test_reads_what_make_run_writes(tmp_path):
    from flows.run import write_times

    stages = [{"stage": "data", "seconds": 12.0, "ran": True}, {"stage": "train_ddpm", "seconds": 0.0, "ran": False}]
    path = write_times(tmp_path, stages, total_s=20.0, server_s=3.0)
    rows = bench_pipeline.rows(path)
    assert [r["name"] for r in rows] == ["pipeline/data", "pipeline/total"]
    assert rows[0]["ratio"] == pytest.approx(0.6) and rows[-1]["settings"]["server_start_s"] == 3.0


def test_missing_file_names_the_command_to_run(tmp_path):
    with pytest.raises(bench_pipeline.NoRunTimes, match="make run"):
        bench_pipeline.rows(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["{", json.dumps({"stages": []}), json.dumps({"stages": "x", "total_s": 3})])
def test_malformed_file_is_one_clear_error(tmp_path, text):
    path = tmp_path / "run_times.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="run_times.json"):
        bench_pipeline.rows(path)
