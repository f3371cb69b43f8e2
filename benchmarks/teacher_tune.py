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

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ddps_core.config import load_settings, parse_assignment


def score_predictor(predictor, folder: Path, settings):
    """The :class:`~ddps_core.metrics.SegmentationResult` of ``predictor`` on the labelled
    ``test`` split of the dataset in ``folder``."""
    from ddps_core.datasets import DDPMSegFolder
    from ddps_core.metrics import evaluate_arrays

    reader = DDPMSegFolder(folder, "test")
    pairs = []
    for a in range(0, len(reader), 32):
        samples = [reader[i] for i in range(a, min(len(reader), a + 32))]
        for sample, pred in zip(samples, predictor([s.image for s in samples]), strict=True):
            pairs.append((sample.id, pred.labels, sample.label))
    return evaluate_arrays(pairs, predictor.num_classes, settings.data.ignore_index,
                           settings.evaluate.boundary_ratio)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ws", required=True, help="workspace where stage data has run (params.yaml inside)")
    ap.add_argument("--tag", required=True, help="name of this training (its folder under WS/tune-teacher)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings override")
    ap.add_argument("--val-seed", type=int, default=1)
    ap.add_argument("--n-val", type=int, default=300)
    args = ap.parse_args(argv)

    from benchmarks.refine_tune import validation_split
    from ddps_core import stages
    from ddps_core.inference import load_predictor
    from ddps_core.progress import CallbackReporter

    os.chdir(args.ws)
    run = Path("tune-teacher") / args.tag
    overrides = dict(parse_assignment(a) for a in args.set)
    settings = load_settings("params.yaml", {
        **overrides, "seed": args.seed, "teacher.seed": args.seed, "ddpm.out": str(run / "ddpm"),
        "features.out": str(run / "features"), "features.splits": ["train"], "teacher.out": str(run / "teacher"),
        "teacher.baselines": [], "ddpm.sample_count": 0})
    val = validation_split(settings, Path("tune") / f"val-seed{args.val_seed}-n{args.n_val}", args.val_seed,
                           args.n_val)
    quiet = CallbackReporter()
    t0 = time.perf_counter()
    ddpm = stages.get("train_ddpm").run(settings, quiet)
    ddpm_s = time.perf_counter() - t0
    stages.get("extract").run(settings, quiet)
    stages.get("train_teacher").run(settings, quiet)
    result = score_predictor(load_predictor(settings, "teacher"), val, settings)
    record = {"tag": args.tag, "set": overrides, "seed": args.seed, "ddpm_steps": ddpm.get("steps"),
              "ddpm_s": round(ddpm_s, 1) if ddpm.get("steps_this_run") else None,
              "ddpm_images_per_s": ddpm.get("images_per_s"), "val": str(val),
              "miou": round(100 * result.miou, 2), "mbiou": round(100 * result.mbiou, 2),
              "iou": [None if np.isnan(v) else round(100 * float(v), 2) for v in result.iou]}
    print(f"[{args.tag}] seed {args.seed}: mIoU {record['miou']:.2f} mBIoU {record['mbiou']:.2f} "
          f"per class {record['iou']} (DDPM {record['ddpm_s']} s)", flush=True)
    with open(Path("tune-teacher") / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
