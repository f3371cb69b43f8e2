"""End to end, marked slow: `dvc repro` of the pipeline in a fresh copy of the repository,
on a tiny configuration, then the CLI on its outputs."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sh(cmd, cwd, env, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["synthetic"].update(n_unlabeled=64, n_labeled=4, n_test=4)
    params["ddpm"].update(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=3,
                          sample_count=4, sample_steps=5, log_every=1)
    params["features"].update(shard_images=4, batch_size=4, steps=[10, 50])
    params["teacher"].update(members=2, max_epochs=2)
    params["report"].update(overlays=2, refinement=2)
    params["generate"].update(filter="drop_both", drop_certain=4, contact_sheet=2)
    params["student"].update(epochs=2, batch_size=8, warmup_steps=2)
    params["refiner"].update(steps=6, single_step_steps=2, batch_size=4, warmup_steps=2, checkpoint_every=3,
                             log_every=1, ablation=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PREFECT_HOME": str(work / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "OMP_NUM_THREADS": "1",
           # the test session logs Prefect at WARNING; the run's flow-run lines are INFO
           "PREFECT_LOGGING_LEVEL": "INFO", "XDG_CACHE_HOME": str(work.parent / "cache")}
    env.pop("PREFECT_API_URL", None)
    env.update(GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.invalid",
               GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.invalid")
    _sh(["git", "init", "-q"], work, env)
    # what `make run` runs: a local Prefect server on loopback, dvc repro, the final table
    run = _sh([sys.executable, "-m", "flows.run", "--port", "0"], work, env)
    return work, env, run.stdout


def test_make_run_shows_flow_runs_on_its_own_server_and_stops_it(pipeline):
    work, env, out = pipeline
    match = re.search(r"Prefect UI: (http://127\.0\.0\.1:(\d+))", out)
    assert match, out[-2000:]
    ui, port = match.group(1), int(match.group(2))
    # every stage's flow run (and sub-flow run) reported to that server, not to a temporary
    # server of its own (which would show another port)
    views = re.findall(r"View at (http://[^/\s]+)/runs/flow-run/", out)
    assert len(views) >= 11 and set(views) == {ui}
    stages = re.findall(r"Beginning flow run '[^']+' for flow '([^']+)'", out)
    assert stages == list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]), stages
    assert "Test split: final metrics" in out and "Pipeline wall time" in out
    for line in ("teacher", "student", "refiner (step 4)"):
        assert line in out
    assert "reports/evaluate.parquet" in out and "reports/figures/refinement.png" in out
    # a default DVC remote outside the checkout, in the git-ignored local config
    assert "DVC remote 'local' ->" in out and "url" in (work / ".dvc/config.local").read_text()
    # the server is gone: nothing listens on its port any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_dvc_repro_builds_every_stage(pipeline):
    work, env, _ = pipeline
    assert (work / "data/dataset/classes.yaml").is_file()
    assert len(list((work / "data/dataset/unlabeled").glob("*.png"))) == 64
    info = yaml.safe_load((work / "data/models/ddpm/model.json").read_text())
    assert info["steps"] == 6 and info["source"] == "trained"
    assert (work / "data/models/ddpm/samples.png").is_file()
    loss = pd.read_csv(work / "data/models/ddpm/loss.csv")
    assert list(loss["step"]) == [1, 2, 3, 4, 5, 6]
    assert (work / "data/features/train.zarr/zarr.json").is_file()  # test split and pool: streaming
    # teacher per method, labels of the test split and of the pool, one report
    assert (work / "data/models/teacher/ensemble.safetensors").is_file()
    for method in ("random_unet", "rgbxy"):
        assert (work / f"data/models/baselines/{method}/ensemble.safetensors").is_file()
    for method in ("teacher", "random_unet", "rgbxy"):
        assert len(list((work / f"data/labels/{method}/test").glob("test_*_uncertainty.png"))) == 4
    pool = pd.read_parquet(work / "data/labels/teacher/unlabeled/scores.parquet")
    assert len(pool) == 64 and pool["score"].notna().all()
    report = pd.read_parquet(work / "reports/evaluate.parquet")
    assert sorted(report["method"].unique()) == ["random_unet", "rgbxy", "student", "teacher"]
    assert (report["scope"] == "summary").sum() == 4
    metrics = yaml.safe_load((work / "reports/metrics/evaluate.json").read_text())
    assert set(metrics) == {"teacher", "random_unet", "rgbxy", "student"} and 0 <= metrics["teacher"]["miou"] <= 100
    # the generated dataset: 64 pool candidates - 4 most certain - ceil(0.1 * 64) = 7, + 4 real
    manifest = pd.read_parquet(work / "data/generated/manifest.parquet")
    assert int(manifest["kept"].sum()) == 64 - 4 - 7 + 4
    assert (work / "data/generated/contact_sheet.png").is_file()
    # the student, scored next to the teacher; the refiner per step, with the ablation
    student = yaml.safe_load((work / "data/models/student/model.json").read_text())
    assert student["epochs"] == 2 and student["n_train"] == 57
    assert (report["method"] == "student").any()
    refined = pd.read_parquet(work / "reports/refine.parquet")
    summary = refined[refined["scope"] == "summary"]
    assert list(summary["method"]) == ["student", *["refiner"] * 3, *["refiner-gt"] * 3]
    assert summary["step"].dropna().astype(int).tolist() == [0, 2, 4, 0, 2, 4]  # T = 5, n = 2
    # the student's own row in both reports is the same prediction
    assert 100 * summary.iloc[0]["miou"] == pytest.approx(metrics["student"]["miou"], abs=1e-4)
    assert (work / "reports/figures/refinement.png").is_file()
    assert len(list((work / "reports/figures/overlays").glob("*.png"))) == 8
    # nothing changed: a second repro runs no stage
    again = _sh(["dvc", "repro"], work, env)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout.lower()


def test_one_chart_compares_the_methods_and_every_stage_published_its_table(pipeline):
    work, env, _ = pipeline
    per_class = pd.read_csv(work / "reports/plots/per_class_iou.csv")
    assert len(per_class) == 7 and list(per_class.columns)[:6] == ["class_id", "class_name", "teacher",
                                                                  "random_unet", "rgbxy", "student"]
    steps = pd.read_csv(work / "reports/plots/refine_steps.csv")
    assert steps["step"].tolist() == [0, 2, 4] and steps["refiner-gt"].notna().all()
    # the refiners' per-class IoU is their last step's
    refine = pd.read_parquet(work / "reports/refine.parquet")
    last = refine[(refine["scope"] == "class") & (refine["method"] == "refiner") & (refine["step"] == 4)]
    want = (100 * last.sort_values("class_id")["iou"]).tolist()
    assert per_class["refiner"].tolist() == pytest.approx(want, abs=1e-4)
    # dvc renders every declared plot offline; one chart holds every method
    shown = json.loads(_sh(["dvc", "plots", "show", "--json"], work, env).stdout)["data"]
    for plot, methods in (("refine_steps", {"student", "refiner", "refiner-gt"}),
                          ("per_class_iou", {"teacher", "random_unet", "rgbxy", "student", "refiner", "refiner-gt"})):
        (chart,) = shown[plot]
        assert chart["type"] == "vega"
        series = {v["field"] for v in chart["content"]["data"]["values"] if v["dvc_inferred_y_value"] != ""}
        assert series == methods, plot
    assert shown["data/models/ddpm/loss.csv"][0]["type"] == "vega"
    assert shown["data/models/ddpm/samples.png"][0]["type"] == "image"
    assert sum(k.startswith("reports/figures/overlays/") for k in shown) == 8
    # the Prefect runs' artifacts, in the database the run's server kept under PREFECT_HOME
    listed = _sh([sys.executable, "-m", "prefect", "artifact", "ls"], work,
                 {**env, "COLUMNS": "400"}).stdout
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]:
        assert f"{stage.replace('_', '-')}-summary" in listed, stage


def test_a_rerun_gives_the_same_lock_and_a_picture_setting_reruns_only_the_pictures(pipeline):
    work, env, _ = pipeline
    first = (work / "dvc.lock").read_text()
    _sh([sys.executable, "-m", "flows.run", "--port", "0", "--", "--force"], work, env)  # dvc repro --force
    assert (work / "dvc.lock").read_text() == first  # no timing or host facts in any output
    # a presentation setting: only stage report is stale
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["report"]["overlays"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_sh(["dvc", "status", "--json"], work, env).stdout)
    # stage data is always_changed by design: it re-reads data.root and rewrites its outputs only when
    # their content changed, so nothing below it reruns
    assert status.pop("data", None) in (None, ["always changed"]), status
    assert set(status) == {"report"}, status
    params["report"]["overlays"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the cache links to the workspace: data is not stored twice
    def du(*paths):
        return int(subprocess.run(["du", "-sck", *map(str, paths)], capture_output=True, text=True,
                                  check=True).stdout.split()[-2])
    assert du(work / "data", work / "reports", work / ".dvc/cache") <= 1.1 * du(work / "data", work / "reports")


def test_an_experiment_with_a_changed_param_shows_in_the_metrics(pipeline):
    work, env, _ = pipeline
    _sh(["git", "add", "-A"], work, env)
    _sh(["git", "commit", "-qm", "baseline"], work, env)
    _sh(["dvc", "exp", "run", "-S", "teacher.members=3"], work, env)
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert params["teacher"]["members"] == 3
    diff = json.loads(_sh(["dvc", "metrics", "diff", "--json"], work, env).stdout)
    changed = diff["reports/metrics/evaluate.json"]
    assert "teacher.miou" in changed and changed["teacher.miou"]["old"] != changed["teacher.miou"]["new"]
    exps = _sh(["dvc", "exp", "show", "--json"], work, env).stdout
    assert "teacher.members" in exps or '"members": 3' in exps


def test_cli_reads_pipeline_outputs(pipeline):
    work, env, _ = pipeline
    out = _sh([sys.executable, "-m", "ddps", "features", "info", "data/features/train.zarr"], work, env)
    assert "4 / 4" in out.stdout and "ratio" in out.stdout
    assert sorted(p.name for p in (work / "data/features").glob("*.zarr")) == ["train.zarr"]  # the rest streams
    gt = work / "data/dataset/real/test"
    pred = work / "pred"
    pred.mkdir()
    for npy in gt.glob("*.npy"):
        shutil.copy(npy, pred / npy.name)
    out = _sh([sys.executable, "-m", "ddps", "score", "--pred", str(pred), "--gt", str(gt),
               "--num-classes", "7", "--names", str(work / "data/dataset/classes.yaml"),
               "--out", str(work / "reports/self.parquet")], work, env)
    summary = pd.read_parquet(work / "reports/self.parquet").query("scope == 'summary'").iloc[0]
    assert summary["miou"] == 1.0 and summary["mbiou"] == 1.0


def test_suggest_then_add_labels_makes_the_training_split_stale_and_reuses_the_ddpm(pipeline):
    # last: it adds labels to the workspace
    work, env, _ = pipeline
    _sh([sys.executable, "-m", "ddps", "suggest", "--n", "3", "--out", "data/suggested"], work, env)
    batch = work / "data/suggested"
    picks = pd.read_parquet(batch / "suggestions.parquet")
    assert len(picks) == 3 and len(list((batch / "prelabels").glob("*.png"))) == 3
    ddpm_before = yaml.safe_load((work / "data/models/ddpm/model.json").read_text())["model_id"]
    _sh([sys.executable, "-m", "ddps", "data", "add-labels", "data/suggested"], work, env)
    assert len(list((work / "data/dataset/real/train").glob("*.npy"))) == 4 + 3
    assert len(list((work / "data/dataset/unlabeled").glob("*.png"))) == 64 - 3
    status = json.loads(_sh(["dvc", "status", "--json"], work, env).stdout)
    stale = {stage for stage, changes in status.items()
             if any(isinstance(c, dict) and "changed deps" in c for c in changes)}
    assert {"train_ddpm", "extract", "train_teacher", "label"} <= stale, status
    # the diffusion model's images are the same set in the same (content) order: it is reused
    _sh(["dvc", "repro", "train_ddpm"], work, env)
    info = yaml.safe_load((work / "data/models/ddpm/model.json").read_text())
    assert info["model_id"] == ddpm_before
