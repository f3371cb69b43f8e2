"""Tune the diffusion model for its features on validation images of the embedded domain
(never its test split): what the teacher gains from a DDPM setting at the same budget.

Given a workspace where stage ``data`` has run (``params.yaml``'s profile), this trains a
DDPM with the given settings, extracts the training split's features, trains the teacher
(each with its stage's own function, into ``WORKSPACE/tune-teacher/<tag>/``) and scores the
teacher on a validation split, the synthetic generator's ``test`` images of another seed than
``data.synthetic.seed``::

    python -m benchmarks.teacher_tune --ws WORKSPACE --tag NAME [--set ddpm.t_focus=0.5 ...]
        [--seed 0] [--val-seed 1] [--n-val 300]

``--seed`` is the DDPM's and the teacher's seed (``seed``, ``teacher.seed``). A finished
training of the same tag is reused (each trainer returns at once). Each result is printed and
appended as a JSON line to ``WORKSPACE/tune-teacher/results.jsonl``: tag, settings, seed, the
DDPM's training seconds and images/s, mIoU and mBIoU in percent and IoU per class.
"""

from __future__ import annotations

import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from benchmarks.tuning import append_result, open_workspace, percent, score_predictor, tune_parser

    args = tune_parser(__doc__, "tune-teacher", "the DDPM's and the teacher's seed", "stage data has run").parse_args(argv)

    from ddps_core import stages
    from ddps_core.inference import load_predictor
    from ddps_core.progress import CallbackReporter

    run = Path("tune-teacher") / args.tag
    settings, overrides, val = open_workspace(args, {
        "seed": args.seed, "teacher.seed": args.seed, "ddpm.out": str(run / "ddpm"),
        "features.out": str(run / "features"), "features.splits": ["train"], "teacher.out": str(run / "teacher"),
        "teacher.baselines": [], "ddpm.sample_count": 0})
    quiet = CallbackReporter()
    t0 = time.perf_counter()
    ddpm = stages.get("train_ddpm").run(settings, quiet)
    ddpm_s = time.perf_counter() - t0
    stages.get("extract").run(settings, quiet)
    stages.get("train_teacher").run(settings, quiet)
    scores = percent(score_predictor(load_predictor(settings, "teacher"), val, settings))
    record = {"tag": args.tag, "set": overrides, "seed": args.seed, "ddpm_steps": ddpm.get("steps"),
              "ddpm_s": round(ddpm_s, 1) if ddpm.get("steps_this_run") else None,
              "ddpm_images_per_s": ddpm.get("images_per_s"), "val": str(val), **scores}
    print(f"[{args.tag}] seed {args.seed}: mIoU {record['miou']:.2f} mBIoU {record['mbiou']:.2f} "
          f"per class {record['iou']} (DDPM {record['ddpm_s']} s)", flush=True)
    append_result("tune-teacher", record)

if __name__ == "__main__":
    main()
