"""Is ``ddpm.compile`` worth it on this machine? The DDPM's training at the ``make run``
profile (``params.yaml``'s ``ddpm`` section: preset, batch), eager against ``torch.compile``,
each for ``--steps`` steps on random images, in one process::

    python -m benchmarks.ddpm_compile [--steps 120]

Three runs: eager; compiled with an empty kernel cache (what a fresh clone pays: the compile
itself is in the wall time); compiled again with that cache warm. Prints each run's wall
seconds and images/s over the run's last half (after the compile), and the steps at which the
cold compiled run breaks even with eager.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before torch reads it: an empty cache

    import torch

    from ddps_core.config import load_settings
    from ddps_core.diffusion.presets import get_preset
    from ddps_core.diffusion.train import train_ddpm
    from ddps_core.progress import CallbackReporter

    repo = Path(__file__).resolve().parents[1]
    cfg = load_settings(repo / "params.yaml").ddpm
    size = get_preset(cfg.preset).image_size
    images = torch.randint(0, 256, (256, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, compiled in (("eager", False), ("compiled, cold cache", True), ("compiled, warm cache", True)):
            marks: list[tuple[int, float]] = []

            def progress(task, done, total=None, **_):
                marks.append((int(done), time.perf_counter()))

            run = cfg.model_copy(update={"steps": args.steps, "compile": compiled, "sample_count": 0,
                                         "log_every": 1, "checkpoint_every": 10 ** 6,
                                         "out": str(Path(tmp) / name.replace(" ", "_").replace(",", ""))})
            t0 = time.perf_counter()
            train_ddpm(run, images, torch.device("cpu"), inputs={"images": "random"}, seed=0,
                       report=CallbackReporter(progress=progress))
            wall = time.perf_counter() - t0
            half = [(d, t) for d, t in marks if d >= args.steps // 2]
            rate = (half[-1][0] - half[0][0]) * cfg.batch_size / (half[-1][1] - half[0][1])
            results[name] = (wall, rate)
            print(f"{name}: {wall:.1f} s for {args.steps} steps, {rate:.1f} images/s after the first half", flush=True)
    e_rate, (c_wall, c_rate) = results["eager"][1], results["compiled, cold cache"]
    if c_rate > e_rate:
        step_e, step_c = cfg.batch_size / e_rate, cfg.batch_size / c_rate
        overhead = c_wall - args.steps * step_c
        print(f"the cold compiled run breaks even after {overhead / (step_e - step_c):.0f} steps "
              f"(ddpm.steps: {cfg.steps})")
    else:
        print("compiled is not faster than eager per step on this machine")


if __name__ == "__main__":
    main()
