"""``make run``: the whole pipeline through ``dvc repro``, with its flow runs in a Prefect UI.

It starts a local Prefect server on 127.0.0.1 (SQLite under ``$PREFECT_HOME``, ``.prefect/``
by default), prints the UI address, runs ``dvc repro`` with ``PREFECT_API_URL`` pointing at
that server (so every stage's flow run shows in the UI, and no stage starts a temporary
server of its own), prints the final metrics table and where the reports and figures are, and
stops the server: at the end, on failure, or on Ctrl-C.

    python -m flows.run [--port N] [--host 127.0.0.1] [--no-server] [--keep-server]
                        [-- DVC_REPRO_ARGS...]

The exit status is ``dvc repro``'s (130 after Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ddps_core.io import atomic_write_text

console = Console(highlight=False)

#: What `make run` leaves, shown at the end (globs relative to the repository root).
OUTPUTS = [
    ("reports", ["reports/*.parquet"]),
    ("metrics", ["reports/metrics/*.json"]),
    ("figures", ["reports/figures/*.png", "data/models/ddpm/samples.png",
                 "data/generated/contact_sheet.png"]),
    ("overlays", ["reports/figures/overlays"]),
    ("models", ["data/models/*/"]),
]


#: Where each run's stage timings go (git-ignored).
TIMES = "reports/run_times.json"

#: The methods of the reports, in words.
WHAT = {
    "teacher": "pixel-MLP ensemble on DDPM-Seg features",
    "random_unet": "baseline: the same on random-UNet features",
    "rgbxy": "baseline: the same on RGB + xy",
    "student": "the segmentor distilled from the generated set",
    "refiner": "student + DDPS refinement",
    "refiner-gt": "ablation: refiner trained with x0 = truth",
}


def free_port(host: str, preferred: int) -> int:
    """``preferred`` when nothing listens there, otherwise a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port on {host}")


class LocalServer:
    """``prefect server start`` as a child process in its own session (a Ctrl-C meant for the
    pipeline does not reach it, so the stages can still report their final state), stopped
    with SIGINT, then SIGTERM, then SIGKILL."""

    def __init__(self, host: str, port: int, home: Path):
        self.host, self.port, self.home = host, port, home
        self.api_url = f"http://{host}:{port}/api"
        self.ui_url = f"http://{host}:{port}"
        self.log_path = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        # The UI the server serves asks the API at PREFECT_UI_API_URL, which defaults to port
        # 4200 whatever port the server listens on.
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_UI_API_URL": self.api_url}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "prefect", "server", "start",
               "--host", self.host, "--port", str(self.port)]
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child writes to it until it stops)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with status {self.proc.returncode}; "
                                   f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Prefect server did not answer on {self.api_url}/health within "
                           f"{timeout_s:.0f} s; its log ({self.log_path}) ends with:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _score(entry: Any) -> tuple[float, float] | None:
    if isinstance(entry, dict) and "miou" in entry:
        return float(entry["miou"]), float(entry.get("mbiou", float("nan")))
    return None


def metrics_rows(root: Path) -> list[tuple[str, str, float, float]]:
    """(source, method, mIoU, mBIoU) from the stages' summary JSONs, test split."""
    rows: list[tuple[str, str, float, float]] = []
    seg = root / "reports/metrics/evaluate.json"
    if seg.is_file():
        for method, entry in json.loads(seg.read_text()).items():
            if (s := _score(entry)) is not None:
                rows.append(("evaluate", method, *s))
    refine = root / "reports/metrics/refine.json"
    if refine.is_file():
        for model, entry in json.loads(refine.read_text()).items():
            if model == "student" or not isinstance(entry, dict):
                continue
            steps = sorted((k for k in entry if k.startswith("step_")), key=lambda k: int(k[5:]))
            for key in steps[-1:]:
                if (s := _score(entry[key])) is not None:
                    rows.append(("refine", f"{model} ({key.replace('_', ' ')})", *s))
    return rows


def per_class_table(root: Path) -> Table | None:
    """IoU per class and method (stage report's ``reports/plots/per_class_iou.csv``): a small
    class that collapses shows here, where the means hide it."""
    import pandas as pd

    path = root / "reports/plots/per_class_iou.csv"
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    methods = [c for c in frame.columns if c not in ("class_id", "class_name") and frame[c].notna().any()]
    table = Table(title="Test split: IoU per class (%)")
    table.add_column("class")
    for m in methods:
        table.add_column(m, justify="right")
    for _, row in frame.iterrows():
        table.add_row(str(row["class_name"]), *("" if pd.isna(row[m]) else f"{row[m]:.1f}" for m in methods))
    return table


def print_summary(root: Path, elapsed_s: float) -> None:
    rows = metrics_rows(root)
    if rows:
        table = Table(title="Test split: final metrics (%)")
        table.add_column("method")
        table.add_column("what it is")
        table.add_column("mIoU", justify="right")
        table.add_column("mBIoU", justify="right")
        for _, method, miou, mbiou in rows:
            what = WHAT.get(method.split(" ")[0], "")
            table.add_row(method, what, f"{miou:.2f}", f"{mbiou:.2f}")
        console.print(table)
    per_class = per_class_table(root)
    if per_class is not None:
        console.print(per_class)
    console.print("Outputs:")
    for label, patterns in OUTPUTS:
        found = sorted({p.relative_to(root).as_posix() + ("/" if p.is_dir() else "")
                        for pat in patterns for p in Path(root).glob(pat)})
        for k, path in enumerate(found):
            console.print(f"  {label if k == 0 else '':<9} {path}", soft_wrap=True)
    minutes, seconds = divmod(int(round(elapsed_s)), 60)
    console.print(f"Pipeline wall time: {minutes} min {seconds:02d} s")


class StageClock:
    """Wall time of each stage, from the lines ``dvc repro`` prints (``Running stage 'x':``,
    ``Stage 'x' didn't change, skipping``), which it echoes as they come."""

    START = re.compile(r"^Running stage '([^']+)'")
    SKIP = re.compile(r"^Stage '([^']+)' didn't change, skipping")

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._open: tuple[str, float] | None = None

    def _close(self, now: float) -> None:
        if self._open is not None:
            stage, t0 = self._open
            self.rows.append({"stage": stage, "seconds": round(now - t0, 1), "ran": True})
            self._open = None

    def feed(self, line: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if m := self.START.match(line):
            self._close(now)
            self._open = (m.group(1), now)
        elif m := self.SKIP.match(line):
            self._close(now)
            self.rows.append({"stage": m.group(1), "seconds": 0.0, "ran": False})

    def finish(self, now: float | None = None) -> list[dict[str, Any]]:
        self._close(time.monotonic() if now is None else now)
        return self.rows


def run_dvc(args: Sequence[str], env: dict[str, str], clock: StageClock | None = None) -> int:
    """``dvc repro ARGS``, its output echoed line by line (and fed to ``clock``).

    dvc runs in a session of its own, so the stage it runs is stopped the same way whether
    this process gets Ctrl-C from a terminal or SIGINT / SIGTERM from a scheduler: the signal
    is passed to dvc's whole process group (dvc and the stage's flow), dvc gets 60 s to
    record the failure, then the group is killed. Returns dvc's status, 130 after SIGINT."""
    proc = subprocess.Popen(["dvc", "repro", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if clock is not None:
                clock.feed(line)

    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    old = signal.signal(signal.SIGTERM, lambda signum, _frame: signal_group(signum))
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            console.print("[yellow]Interrupted: stopping the running stage ...[/]")
            signal_group(signal.SIGINT)
            try:
                proc.wait(60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                signal_group(signal.SIGKILL)
                proc.wait()
            code = 130
        reader.join(10)
        return code
    finally:
        signal.signal(signal.SIGTERM, old)


def write_times(root: Path, rows: list[dict[str, Any]], total_s: float, server_s: float | None) -> Path:
    """``reports/run_times.json``: the wall time of each stage of this run, the server's
    start-up, the total, and the machine."""
    path = root / TIMES
    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "total_s": round(total_s, 1),
        "server_start_s": None if server_s is None else round(server_s, 1),
        "stages": rows,
    }
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


def print_times(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table(title="Stage wall times")
    table.add_column("stage")
    table.add_column("minutes", justify="right")
    for r in rows:
        table.add_row(r["stage"], f"{r['seconds'] / 60:.1f}" if r["ran"] else "skipped (up to date)")
    console.print(table)


def default_remote() -> Path:
    """The local DVC remote ``make run`` sets up when a project has none: outside the
    checkout, so that a fresh clone can ``dvc pull`` what an earlier run pushed here."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ddps" / "dvc-remote"


def ensure_remote(root: Path, env: dict[str, str]) -> str | None:
    """A default DVC remote when none is configured: ``dvc remote add --local -d local
    <default_remote()>`` (``.dvc/config.local``, not committed). Returns the remote's path
    when one was added."""
    listed = subprocess.run(["dvc", "remote", "list"], cwd=root, env=env, capture_output=True, text=True)
    if listed.returncode != 0 or listed.stdout.strip():
        return None
    where = default_remote()
    where.mkdir(parents=True, exist_ok=True)
    added = subprocess.run(["dvc", "remote", "add", "--local", "-d", "local", str(where)], cwd=root, env=env,
                           capture_output=True, text=True)
    return str(where) if added.returncode == 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address the Prefect server binds to (default: loopback only).")
    parser.add_argument("--port", type=int, default=4200,
                        help="Prefect server port (another free one when it is taken).")
    parser.add_argument("--no-server", action="store_true",
                        help="Use PREFECT_API_URL as set (or Prefect's temporary server per stage).")
    parser.add_argument("--keep-server", action="store_true",
                        help="After a successful run keep the UI up until Ctrl-C.")
    parser.add_argument("dvc_args", nargs="*", help="Passed to `dvc repro` (after --).")
    args = parser.parse_args(argv)
    # Ctrl-C / SIGINT stops the run even when this process was started with SIGINT ignored (a
    # shell does that to a job it puts in the background): the stages it starts then get the
    # default disposition back, since exec resets a handled signal
    signal.signal(signal.SIGINT, signal.default_int_handler)

    root = Path.cwd()
    env = dict(os.environ)
    started = time.monotonic()
    server: LocalServer | None = None
    server_s: float | None = None
    try:
        if not args.no_server:
            home = Path(env.get("PREFECT_HOME") or root / ".prefect").resolve()
            server = LocalServer(args.host, free_port(args.host, args.port), home)
            console.print(f"Starting the Prefect server (state in {home}) ...")
            t0 = time.monotonic()
            try:
                server.start()
                server_s = time.monotonic() - t0
            except RuntimeError as exc:
                console.print(f"[red]error:[/] {exc}")
                return 1
            env["PREFECT_API_URL"] = server.api_url
            console.print(f"Prefect UI: [bold]{server.ui_url}[/]  (flow runs of every stage show there)")
        remote = ensure_remote(root, env)
        if remote:
            console.print(f"DVC remote 'local' -> {remote} (`dvc push` keeps this run's data and models there)")
        clock = StageClock()
        code = run_dvc(args.dvc_args, env, clock)
        rows = clock.finish()
        if code == 0:
            # dvc repro copies new outputs into the cache; relinking makes the workspace and
            # the cache share their files (cache.type), so nothing is stored twice
            subprocess.run(["dvc", "checkout", "--relink", "-q"], cwd=root, env=env, check=False)
            print_times(rows)
            write_times(root, rows, time.monotonic() - started, server_s)
            print_summary(root, time.monotonic() - started)
            if server is not None and args.keep_server:
                console.print(f"Prefect UI stays up at [bold]{server.ui_url}[/]; Ctrl-C stops it.")
                try:
                    while server.proc is not None and server.proc.poll() is None:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        else:
            console.print(f"[red]dvc repro failed (exit {code})[/]; outputs of finished stages are kept.")
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            console.print("Stopping the Prefect server ...")
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
