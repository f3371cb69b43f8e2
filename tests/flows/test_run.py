"""The `make run` wrapper's pieces: the metrics summary, the port, the stage clock, and an
interrupt that stops the running stage."""

from __future__ import annotations

import json
import socket

from flows.run import free_port, metrics_rows, per_class_table


def test_metrics_rows_read_the_summary_jsons(tmp_path):
    (tmp_path / "reports/metrics").mkdir(parents=True)
    (tmp_path / "reports/metrics/evaluate.json").write_text(json.dumps(
        {"teacher": {"miou": 0.5, "mbiou": 0.4, "aacc": 0.9, "macc": 0.6}}))
    (tmp_path / "reports/metrics/refine.json").write_text(json.dumps(
        {"student": {"miou": 0.3, "mbiou": 0.2},
         "refiner": {"step_0": {"miou": 0.6, "mbiou": 0.5}, "step_10": {"miou": 0.7, "mbiou": 0.55},
                  "step_9": {"miou": 0.65, "mbiou": 0.52}}}))
    rows = metrics_rows(tmp_path)
    assert rows[0] == ("evaluate", "teacher", 0.5, 0.4)
    # the last step by number (10, not 9 as text order would say)
    assert rows[1][1].endswith("step 10)") and rows[1][2] == 0.7
    assert len(rows) == 2


def test_the_summary_shows_iou_per_class_of_every_scored_method(tmp_path):
    from rich.console import Console

    assert per_class_table(tmp_path) is None  # no report yet: no table
    (tmp_path / "reports/plots").mkdir(parents=True)
    (tmp_path / "reports/plots/per_class_iou.csv").write_text(
        "class_id,class_name,teacher,student,refiner\n0,background,86.19,88.5,\n1,nose,38.23,19.61,\n")
    console = Console(width=120, record=True)
    console.print(per_class_table(tmp_path))
    text = console.export_text()
    assert "nose" in text and "38.2" in text and "19.6" in text
    assert "refiner" not in text  # a method without per-class scores gets no column


def test_free_port_falls_back_when_the_preferred_one_is_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        port = free_port("127.0.0.1", taken)
        assert port != taken and port > 0


def test_stage_clock_times_each_stage_from_dvc_output():
    from flows.run import StageClock

    clock = StageClock()
    lines = [(0.0, "Running stage 'data':\n"), (1.0, "> python -m flows data\n"),
             (12.5, "Stage 'train_ddpm' didn't change, skipping\n"),
             (13.0, "Running stage 'extract':\n"), (20.0, "Updating lock file 'dvc.lock'\n")]
    for t, line in lines:
        clock.feed(line, now=t)
    rows = clock.finish(now=30.0)
    assert rows == [{"stage": "data", "seconds": 12.5, "ran": True},
                    {"stage": "train_ddpm", "seconds": 0.0, "ran": False},
                    {"stage": "extract", "seconds": 17.0, "ran": True}]


def test_interrupting_make_run_stops_the_running_stage(tmp_path):
    """SIGINT to the runner (as a scheduler or a terminal sends it) reaches the stage that
    dvc runs: the stage exits, the runner reports 130 and leaves nothing running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    stage = tmp_path / "stage.py"
    stage.write_text(
        "import pathlib, signal, sys, time\n"
        f"out = pathlib.Path({str(tmp_path)!r})\n"
        "def stop(*_):\n"
        "    (out / 'stage-got-sigint').write_text('yes'); sys.exit(1)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "(out / 'stage-started').write_text(str(__import__('os').getpid()))\n"
        "time.sleep(120)\n")
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = repro ] || exit 0\necho \"Running stage 'slow':\"\n"
                    f"{sys.executable} {stage}\nexit $?\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    # started with SIGINT ignored, as a shell starts a background job: the runner restores it
    proc = subprocess.Popen([sys.executable, "-m", "flows.run", "--no-server"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "stage-started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        # the runner gives dvc 60 s before it kills the group: wait longer than that, so that a
        # slow stop shows in the assertions below rather than as a timeout here
        out, _ = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert (tmp_path / "stage-got-sigint").read_text() == "yes"
    pid = int((tmp_path / "stage-started").read_text())
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_the_local_server_tells_its_ui_the_api_on_its_own_port(tmp_path, monkeypatch):
    """Prefect's UI asks the API at PREFECT_UI_API_URL, which defaults to port 4200: the
    server `make run` starts on another port must be given its own address."""
    import subprocess

    from flows.run import LocalServer

    seen = {}

    class Started(Exception):
        pass

    def popen(cmd, env, **_kw):
        seen.update(cmd=cmd, env=env)
        raise Started

    monkeypatch.setattr(subprocess, "Popen", popen)
    server = LocalServer("127.0.0.1", 4711, tmp_path)
    try:
        server.start(timeout_s=1)
    except Started:
        pass
    assert seen["cmd"][-4:] == ["--host", "127.0.0.1", "--port", "4711"]
    assert seen["env"]["PREFECT_UI_API_URL"] == "http://127.0.0.1:4711/api"
    assert "PREFECT_API_URL" not in seen["env"]
