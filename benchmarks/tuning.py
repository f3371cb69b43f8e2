"""What the ``*_tune`` scripts share: their command line (a workspace, a tag, a seed, settings
overrides, the validation split), the validation split itself (the synthetic generator's
``test`` images of another seed than ``data.synthetic.seed``, so none is a test image), the
scoring of a predictor on it and the results file."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ddps_core.config import load_settings, parse_assignment

__all__ = ["append_result", "open_workspace", "percent", "score_predictor", "tune_parser", "validation_split"]


def tune_parser(doc: str, folder: str, seed_help: str, needs: str) -> argparse.ArgumentParser:
    """``--ws --tag --seed --set --val-seed --n-val``; ``folder`` names ``WS/<folder>/<tag>``,
    ``needs`` what the workspace must have run."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--ws", required=True, help=f"workspace where {needs} (params.yaml inside)")
    ap.add_argument("--tag", required=True, help=f"name of this training (its folder under WS/{folder})")
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings override")
    ap.add_argument("--val-seed", type=int, default=1)
    ap.add_argument("--n-val", type=int, default=300)
    return ap


def open_workspace(args: argparse.Namespace, fixed: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], Path]:
    """Enter ``args.ws``; its settings with ``defaults`` under and ``fixed`` over the
    ``--set`` overrides; the overrides; the validation split (made once)."""
    os.chdir(args.ws)
    overrides = dict(parse_assignment(a) for a in args.set)
    settings = load_settings("params.yaml", {**(defaults or {}), **overrides, **fixed})
    val = validation_split(settings, Path("tune") / f"val-seed{args.val_seed}-n{args.n_val}", args.val_seed,
                           args.n_val)
    return settings, overrides, val


def validation_split(settings: Any, out: Path, seed: int, n: int) -> Path:
    """The synthetic domain's ``test`` images of generator seed ``seed`` in ``out``."""
    from ddps_core.datasets.synthetic import make_synthetic

    syn = settings.data.synthetic
    if settings.data.source != "synthetic":
        raise SystemExit("the validation split is the synthetic domain's (data.source: synthetic)")
    if seed == syn.seed:
        raise SystemExit(f"--val-seed {seed} is data.synthetic.seed: those are the test images")
    make_synthetic(out, image_size=syn.image_size, n_unlabeled=0, n_labeled=0, n_test=n, seed=seed)
    return out


def score_predictor(predictor: Any, folder: Path, settings: Any) -> Any:
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


def percent(result: Any) -> dict[str, Any]:
    """mIoU, mBIoU and IoU per class of a result, in percent."""
    return {"miou": round(100 * result.miou, 2), "mbiou": round(100 * result.mbiou, 2),
            "iou": [None if np.isnan(v) else round(100 * float(v), 2) for v in result.iou]}


def append_result(folder: str, record: dict[str, Any]) -> None:
    """One JSON line in ``<folder>/results.jsonl`` (in the workspace)."""
    with open(Path(folder) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
