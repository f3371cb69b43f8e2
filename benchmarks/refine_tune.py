"""Tune the refiner on validation images of the embedded domain (never its test split).

Given a workspace where the pipeline has run up to ``train_student`` (``params.yaml``'s
profile), this trains the refiner with the given settings (stage ``train_refiner``'s own
function) and scores Free-Re-noising step by step (stage ``refine``'s own function) on a
validation split: the synthetic generator's ``test`` images drawn with another seed than
``data.synthetic.seed`` (so no image of the test split is among them)::

    python -m benchmarks.refine_tune --ws WORKSPACE --tag NAME [--seed 0]
        [--set refiner.steps=600 ...] [--guidance 0.5 ...] [--n 2 ...] [--infer-seed 0 ...]
        [--val-seed 1] [--n-val 300]

Each training goes to ``WORKSPACE/tune/<tag>/model`` (an existing finished one is reused:
the trainer resumes or returns at once), each score is printed and appended as a JSON line
to ``WORKSPACE/tune/results.jsonl``: tag, settings, seeds, training seconds, w, n and the
per-step mIoU / mBIoU in percent (docs/method.md, "The steps at the `make run` budget,
on validation images").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ddps_core.config import load_settings, parse_assignment


def validation_split(settings, out: Path, seed: int, n: int) -> Path:
    """The synthetic domain's ``test`` images of generator seed ``seed`` in ``out``."""
    from ddps_core.datasets.synthetic import make_synthetic

    syn = settings.data.synthetic
    if settings.data.source != "synthetic":
        raise SystemExit("refine_tune: the validation split is the synthetic domain's (data.source: synthetic)")
    if seed == syn.seed:
        raise SystemExit(f"refine_tune: --val-seed {seed} is data.synthetic.seed: those are the test images")
    make_synthetic(out, image_size=syn.image_size, n_unlabeled=0, n_labeled=0, n_test=n, seed=seed)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ws", required=True, help="workspace run up to train_student (params.yaml inside)")
    ap.add_argument("--tag", required=True, help="name of this training (its folder under WS/tune)")
    ap.add_argument("--seed", type=int, default=0, help="refiner.seed of the training")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings override")
    ap.add_argument("--guidance", type=float, nargs="+", default=None, help="w values (default: the settings')")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="refine_steps values (default: the settings')")
    ap.add_argument("--infer-seed", type=int, nargs="+", default=None,
                    help="seeds of the re-noising draws (default: the training seed)")
    ap.add_argument("--val-seed", type=int, default=1)
    ap.add_argument("--n-val", type=int, default=300)
    args = ap.parse_args(argv)

    from ddps_core.progress import CallbackReporter
    from ddps_core.refiner.stage import refine, train_refiner

    os.chdir(args.ws)
    overrides = dict(parse_assignment(a) for a in args.set)
    run = Path("tune") / args.tag
    base = {**overrides, "refiner.out": str(run / "model"), "refiner.seed": args.seed}
    settings = load_settings("params.yaml", base)
    val = validation_split(settings, Path("tune") / f"val-seed{args.val_seed}-n{args.n_val}", args.val_seed, args.n_val)
    quiet = CallbackReporter()

    t0 = time.perf_counter()
    summary = train_refiner(settings, quiet)
    train_s = time.perf_counter() - t0
    this_run = summary["models"]["refiner"]["steps_this_run"]
    print(f"[{args.tag}] trained {summary['models']['refiner']['steps']} steps ({this_run} this run) "
          f"in {train_s:.0f} s", flush=True)

    cfg = settings.refiner
    for w in args.guidance if args.guidance is not None else [cfg.guidance]:
        for n in args.n if args.n is not None else [cfg.refine_steps]:
            for iseed in args.infer_seed if args.infer_seed is not None else [args.seed]:
                s = load_settings("params.yaml", {
                    **base, "data.out": str(val), "refiner.guidance": w, "refiner.refine_steps": n,
                    "refiner.seed": iseed, "refiner.refined_out": str(run / "refined"),
                    "evaluate.reports": str(run / "reports")})
                rows = refine(s, quiet)["steps"]
                row = next(r for r in rows if r["method"] == "refiner")
                student = next(r for r in rows if r["method"] == "student")
                steps = sorted(int(k.split(" ")[1]) for k in row if k.startswith("mIoU "))
                record = {"tag": args.tag, "set": overrides, "seed": args.seed, "infer_seed": iseed,
                          "train_s": round(train_s, 1) if this_run else None, "w": w, "n": n,
                          "val": str(val), "student": [round(student["mIoU"], 2), round(student["mBIoU"], 2)],
                          "miou": {i: round(row[f"mIoU {i}"], 2) for i in steps},
                          "mbiou": {i: round(row[f"mBIoU {i}"], 2) for i in steps}}
                first, last = steps[0], steps[-1]
                print(f"[{args.tag}] seed {args.seed} infer {iseed} w {w} n {n}: "
                      f"mIoU {record['miou'][first]:.2f} -> {record['miou'][last]:.2f} "
                      f"({record['miou'][last] - record['miou'][first]:+.2f})  "
                      f"mBIoU {record['mbiou'][first]:.2f} -> {record['mbiou'][last]:.2f} "
                      f"({record['mbiou'][last] - record['mbiou'][first]:+.2f})  "
                      f"steps {steps}: mIoU {list(record['miou'].values())} mBIoU {list(record['mbiou'].values())}",
                      flush=True)
                with open(Path("tune") / "results.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
