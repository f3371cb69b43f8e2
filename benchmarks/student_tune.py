"""Tune the student on validation images of the embedded domain (never its test split): its
gap to the teacher it distils, at the same epochs, for a student setting.

Given a workspace where the stages up to ``train_teacher`` have run (``params.yaml``'s
profile), this labels the pool with the teacher's soft labels kept (``teacher.soft_labels``:
stage ``label``, once), exports it (stage ``generate``, once), trains the student with the given
settings into ``WORKSPACE/tune-student/<tag>/`` (the stage's own function) and scores the
teacher and the student on a validation split, the synthetic generator's ``test`` images of
another seed than ``data.synthetic.seed``::

    python -m benchmarks.student_tune --ws WORKSPACE --tag NAME [--set student.distill=soft ...]
        [--seed 0] [--val-seed 1] [--n-val 300]

``--seed`` is ``student.seed``. Each result is printed and appended as a JSON line to
``WORKSPACE/tune-student/results.jsonl``: tag, settings, seed, training seconds, the teacher's
and the student's mIoU / mBIoU in percent, the gap, and IoU per class.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from benchmarks.tuning import append_result, open_workspace, percent, score_predictor, tune_parser

    args = tune_parser(__doc__, "tune-student", "student.seed", "the stages up to train_teacher have run").parse_args(argv)

    from ddps_core import stages
    from ddps_core.inference import load_predictor
    from ddps_core.progress import CallbackReporter

    run = Path("tune-student") / args.tag
    settings, overrides, val = open_workspace(args, {"student.seed": args.seed, "student.out": str(run / "student")},
                                              defaults={"teacher.soft_labels": True})
    quiet = CallbackReporter()
    stages.get("label").run(settings, quiet)
    stages.get("generate").run(settings, quiet)
    cached = Path("tune-student") / f"teacher-val-seed{args.val_seed}-n{args.n_val}.json"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(percent(score_predictor(load_predictor(settings, "teacher"), val, settings))))
    teacher = json.loads(cached.read_text())
    t0 = time.perf_counter()
    stages.get("train_student").run(settings, quiet)
    seconds = time.perf_counter() - t0
    student = percent(score_predictor(load_predictor(settings, "student"), val, settings))
    record = {"tag": args.tag, "set": overrides, "seed": args.seed, "seconds": round(seconds, 1), "val": str(val),
              "teacher": teacher, "student": student, "gap": round(student["miou"] - teacher["miou"], 2)}
    print(f"[{args.tag}] seed {args.seed}: student mIoU {student['miou']:.2f} mBIoU {student['mbiou']:.2f}, "
          f"teacher {teacher['miou']:.2f}: gap {record['gap']:+.2f}; per class {student['iou']} ({seconds:.0f} s)",
          flush=True)
    append_result("tune-student", record)

if __name__ == "__main__":
    main()
