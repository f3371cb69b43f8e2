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

import time
from pathlib import Path

from ddps_core.config import load_settings


def main(argv: list[str] | None = None) -> None:
    from benchmarks.tuning import append_result, open_workspace, tune_parser

    ap = tune_parser(__doc__, "tune", "refiner.seed of the training", "the pipeline has run up to train_student")
    ap.add_argument("--guidance", type=float, nargs="+", default=None, help="w values (default: the settings')")
    ap.add_argument("--n", type=int, nargs="+", default=None, help="refine_steps values (default: the settings')")
    ap.add_argument("--infer-seed", type=int, nargs="+", default=None,
                    help="seeds of the re-noising draws (default: the training seed)")
    args = ap.parse_args(argv)

    from ddps_core.progress import CallbackReporter
    from ddps_core.refiner.stage import refine, train_refiner

    run = Path("tune") / args.tag
    settings, overrides, val = open_workspace(args, {"refiner.out": str(run / "model"), "refiner.seed": args.seed})
    base = {**overrides, "refiner.out": str(run / "model"), "refiner.seed": args.seed}
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
                append_result("tune", record)


if __name__ == "__main__":
    main()
