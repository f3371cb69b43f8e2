"""Benchmark: does ``ddps suggest``'s pick rule beat random picks? A learning curve.

The question: with the same labelling budget, is a teacher trained on the images
:func:`~ddps_core.active.select.diverse_uncertain` suggests better on the test split than one
trained on images picked uniformly at random?

Protocol (the embedded synthetic domain, 32 px, 7 classes):

* Data: one :func:`~ddps_core.datasets.synthetic.make_synthetic` dataset. Its labelled
  ``real/train`` split (``pool`` images) is the pool to pick from: every pool image has a
  ground-truth label, which the benchmark reads only once the image is "labelled" (and, for
  the diagnostics below, to measure how wrong the teacher is on the rest of the pool). Its
  ``real/test`` split (100 images) is the test set. The generator seeds each image from
  ``(seed, split, index)``, so pool and test images are disjoint by construction. The
  ``unlabeled`` images only widen the diffusion model's training set.
* Computed once and cached under the work folder (a rerun reuses them): the diffusion model
  (the project's trainer, :func:`ddps_core.diffusion.stage.train_ddpm`, with ``params.yaml``'s
  ``ddpm`` section and ``ddpm_steps`` steps, trained on the pool and unlabelled images as the
  pipeline would), and the DDPM features of the pool and test images in two feature stores
  (:func:`ddps_core.features.stage.fill_store`, ``params.yaml``'s ``features`` section).
  The pooled descriptors the pick rule measures diversity in come from the same pool store.
* Per seed (the seed draws the first ``rounds[0]`` images, the random picks, and seeds the
  teacher): round 0 is the same random set for both strategies (one teacher, shared). Each
  round trains the teacher on the labelled images (:func:`~ddps_core.teacher.train.train_ensemble`
  with ``params.yaml``'s ``teacher`` settings, ``members`` and ``max_epochs`` as given), scores
  the test split (mIoU, :func:`~ddps_core.metrics.evaluate_arrays` with the ignore index), and,
  unless it is the last round, predicts the unlabelled pool (per-image score
  :func:`~ddps_core.teacher.predict.image_score` of the Jensen-Shannon map) and picks the
  next batch, up to the next round's size:

  - ``suggested``: :func:`~ddps_core.active.select.diverse_uncertain` on those scores, with
    descriptors made as ``ddps suggest`` makes them (pooled DDPM features of the candidates,
    standardised over the candidates, :func:`~ddps_core.active.select.pooled_descriptors`);
  - ``random``: uniform among the unlabelled pool (seeded).

Outputs (``out``, by default ``reports/active/``): ``learning_curve.parquet`` (one row per
strategy x labels x seed: test mIoU in percent, per-class IoU, the labelled set's class pixel
fractions, its image ids and the batch added that round, training time, and, for the batch
added, the previous teacher's score and error on it and on the pool it came from),
``learning_curve.csv`` (per labels x strategy: ``mIoU_mean``, ``mIoU_min``, ``mIoU_max``,
``mIoU_std``, ``seeds``), ``learning_curve_dvc.csv`` (labels and each strategy's mean: the DVC
plot ``active_learning_curve``) and ``learning_curve.png`` (mean line, min-max band).

Diagnostics, to explain a result either way: ``pool_spearman_before`` is the rank correlation,
over the unlabelled pool, between the previous teacher's image score and its pixel error rate
on that image (does uncertainty point at the mistakes?); ``batch_error_before`` against
``pool_error_before`` says whether a strategy's batch held images that teacher got wrong more
often than the pool at large; ``frac_<class>`` shows whether a strategy buys more of the rare
classes (eyes, brows, mouth, nose).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.active.select import diverse_uncertain, pooled_descriptors
from ddps_core.config import Settings, load_settings
from ddps_core.datasets import DDPMSegFolder, make_synthetic
from ddps_core.datasets.synthetic import SYNTHETIC_CLASSES
from ddps_core.features.sampler import PixelSampler
from ddps_core.features.store import FeatureStore
from ddps_core.io import atomic_path
from ddps_core.metrics import evaluate_arrays
from ddps_core.progress import LineReporter, Reporter
from ddps_core.teacher.ensemble import PixelEnsemble
from ddps_core.teacher.predict import predict_store
from ddps_core.teacher.train import train_ensemble

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "data" / "work" / "benchmarks" / "active"  # git-ignored scratch (/data/work/)
OUT = REPO / "reports" / "active"
STRATEGIES = ("suggested", "random")
NUM_CLASSES = len(SYNTHETIC_CLASSES)
IMAGE_SIZE = 32


def _say(message: str) -> None:
    print(f"[active] {message}", file=sys.stderr, flush=True)


class Resident:
    """A feature store's native maps and labels held in RAM (the float32 maps its reads
    return), with the store's interface for :class:`PixelSampler` and :func:`predict_store`:
    every round and seed reads the same few hundred images again (a zarr read and float16
    decode is tens of ms per image here), and at 32 px they take about 2 MB each."""

    def __init__(self, store: FeatureStore):
        self._store = store
        self._natives = store.natives(range(len(store)))
        self._labels = np.stack([store.label(i) for i in range(len(store))])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._store)

    def native(self, i: int) -> dict[str, np.ndarray]:
        return self._natives[int(i)]

    def natives(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self._natives[int(i)] for i in indices]

    def label(self, i: int) -> np.ndarray:
        return self._labels[int(i)]

    def labels(self) -> np.ndarray:
        return self._labels

    def pixels(self, i: int, ys: np.ndarray, xs: np.ndarray, native: dict[str, np.ndarray] | None = None) -> np.ndarray:
        return self._store.pixels(i, ys, xs, native=self._natives[int(i)] if native is None else native)


@dataclass
class Domain:
    """What every round and seed shares: the settings, the pool's and the test split's
    feature stores (with their labels), and the pool's spatially pooled feature maps."""

    settings: Settings
    pool: Resident
    test: Resident
    pool_ids: list[str]
    pooled: list[np.ndarray]  # per feature map: [P, C], the map's spatial mean per image
    pool_labels: np.ndarray  # [P, S, S]
    test_labels: np.ndarray  # [T, S, S]
    prepare_s: dict[str, float]


def settings_for(work: Path, pool: int, n_test: int, n_unlabeled: int, ddpm_steps: int,
                 data_seed: int = 0) -> Settings:
    """``params.yaml`` with the benchmark's data, model and store locations in ``work`` and
    its sizes; every other knob (DDPM, features, teacher) stays the file's."""
    params = REPO / "params.yaml"
    return load_settings(params if params.exists() else None, {
        "device": "cpu",
        "data.source": "synthetic",
        "data.out": str(work / "dataset"),
        "data.synthetic.image_size": IMAGE_SIZE,
        "data.synthetic.n_labeled": pool,
        "data.synthetic.n_test": n_test,
        "data.synthetic.n_unlabeled": n_unlabeled,
        "data.synthetic.seed": data_seed,
        "ddpm.out": str(work / "ddpm"),
        "ddpm.steps": ddpm_steps,
        "ddpm.sample_count": 0,  # no sample grid: nothing here looks at it
        "features.out": str(work / "features"),
    })


def prepare(work: Path, pool: int, n_test: int, n_unlabeled: int, ddpm_steps: int,
            data_seed: int = 0, report: Reporter | None = None) -> Domain:
    """The dataset, the diffusion model and the two feature stores, each made only when the
    work folder does not hold it already (the project's own resume rules decide)."""
    from ddps_core.diffusion.presets import get_preset
    from ddps_core.diffusion.stage import train_ddpm
    from ddps_core.features.stage import fill_store

    report = report or LineReporter(_say, every_s=60.0)  # a minutes-long DDPM run shows signs of life
    s = settings_for(work, pool, n_test, n_unlabeled, ddpm_steps, data_seed)
    if get_preset(s.ddpm.preset).image_size != IMAGE_SIZE:
        raise SystemExit(f"bench_active: ddpm.preset {s.ddpm.preset!r} is not a {IMAGE_SIZE} px model")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    syn = s.data.synthetic
    make_synthetic(s.data.out, image_size=IMAGE_SIZE, n_unlabeled=syn.n_unlabeled, n_labeled=syn.n_labeled,
                   n_test=syn.n_test, seed=syn.seed)
    times["data_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # resumes a checkpoint of the same run identity (settings, seed, images): a finished
    # model of a previous run is reused as it is, anything else is trained again
    ddpm = train_ddpm(s, report)
    times["ddpm_s"] = time.perf_counter() - t0
    _say(f"diffusion model: {ddpm['steps']} steps ({ddpm['steps_this_run']} this run, {times['ddpm_s']:.0f} s)")
    stores = {}
    for split in ("train", "test"):
        t0 = time.perf_counter()
        reader = DDPMSegFolder(s.data.out, split, ignore_index=s.data.ignore_index)
        stores[split] = fill_store(s, reader, Path(s.features.out) / f"{split}.zarr", f"extract {split}",
                                   report, labelled=True)
        times[f"extract_{split}_s"] = time.perf_counter() - t0
    _say(f"features: pool {len(stores['train'])} and test {len(stores['test'])} images, "
         f"D = {stores['train'].feature_dim} ({times['extract_train_s'] + times['extract_test_s']:.0f} s)")
    pool_store, test_store = Resident(stores["train"]), Resident(stores["test"])
    pooled = [np.stack([pool_store.native(i)[name].mean(axis=(1, 2)) for i in range(len(pool_store))])
              for name in pool_store.names]
    return Domain(settings=s, pool=pool_store, test=test_store, pool_ids=list(pool_store.image_ids),
                  pooled=pooled, pool_labels=pool_store.labels(), test_labels=test_store.labels(), prepare_s=times)


# --------------------------------------------------------------------------- one round's parts
def train_teacher(d: Domain, indices: Sequence[int], seed: int, members: int, max_epochs: int) -> tuple[PixelEnsemble, Any]:
    """The teacher on the pool images ``indices``, with ``params.yaml``'s teacher settings
    but ``members`` / ``max_epochs``; every random choice seeded by ``teacher.seed + seed``."""
    cfg = d.settings.teacher
    tseed = cfg.seed + seed
    # sorted: the sampler's shuffle then depends on the set, not on the order it was built in
    sampler = PixelSampler(d.pool, batch_size=cfg.batch_size, buffer_images=cfg.buffer_images, seed=tseed,
                           ignore_index=d.settings.data.ignore_index, min_class_pixels=cfg.min_class_pixels,
                           image_indices=sorted(int(i) for i in indices))
    torch.manual_seed(tseed)
    ensemble = PixelEnsemble(d.pool.feature_dim, NUM_CLASSES, members=members, seed=tseed)
    summary = train_ensemble(sampler, ensemble, lr=cfg.lr, max_epochs=max_epochs, patience=cfg.patience,
                             min_epoch=cfg.min_epoch, bootstrap=cfg.bootstrap, seed=tseed)
    return ensemble, summary


def test_scores(d: Domain, ensemble: PixelEnsemble) -> dict[str, Any]:
    """Test-split mIoU / aAcc / mAcc in percent and the per-class IoU."""
    preds = [labels for _, labels, _, _ in predict_store(ensemble, d.test)]
    res = evaluate_arrays(((d.test.image_ids[i], p, d.test_labels[i]) for i, p in enumerate(preds)),
                          NUM_CLASSES, d.settings.data.ignore_index, d.settings.evaluate.boundary_ratio)
    out = {"miou": 100 * res.miou, "aacc": 100 * res.aacc, "macc": 100 * res.macc}
    out.update({f"iou_{name}": 100 * float(v) for name, v in zip(SYNTHETIC_CLASSES, res.iou, strict=True)})
    return out


def pool_scores(d: Domain, ensemble: PixelEnsemble, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (top-10 % mean Jensen-Shannon) of the pool images ``indices``, and the
    teacher's pixel error rate on each (from the hidden labels: diagnostics only, never
    seen by the pick rule)."""
    ignore = d.settings.data.ignore_index
    scores, errors = [], []
    for (_, labels, _, score), i in zip(predict_store(ensemble, d.pool, image_indices=list(indices)), indices,
                                        strict=True):
        gt = d.pool_labels[i]
        valid = gt != ignore
        scores.append(score)
        errors.append(float((labels[valid] != gt[valid]).mean()) if valid.any() else 0.0)
    return np.asarray(scores), np.asarray(errors)


def pick_suggested(d: Domain, unlabelled: np.ndarray, scores: np.ndarray, n: int) -> list[int]:
    """``n`` pool indices by :func:`diverse_uncertain`, its descriptors made as ``ddps suggest``
    makes them: from the candidates alone (each channel standardised over them)."""

    def describe(local: np.ndarray) -> np.ndarray:
        rows = unlabelled[local]
        return pooled_descriptors([m[rows][:, :, None, None] for m in d.pooled])

    picks = [unlabelled[p.index] for p in diverse_uncertain(scores, describe, n)]
    if len(picks) < n:  # near-copies among the 4n candidates: look down the whole ranking
        picks = [unlabelled[p.index] for p in diverse_uncertain(scores, describe, n, candidates=len(scores))]
    if len(picks) < n:  # still short: the round sizes are the protocol, fill by uncertainty
        taken = set(picks)
        picks += [int(unlabelled[j]) for j in np.argsort(-scores, kind="stable")
                  if int(unlabelled[j]) not in taken][: n - len(picks)]
    return [int(i) for i in picks]


def pick_random(rng: np.random.Generator, unlabelled: np.ndarray, n: int) -> list[int]:
    return [int(i) for i in rng.choice(unlabelled, size=n, replace=False)]


def class_fractions(labels: np.ndarray, ignore: int) -> dict[str, float]:
    valid = labels[labels != ignore]
    counts = np.bincount(valid.ravel().astype(np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
    return {f"frac_{name}": float(c / max(valid.size, 1)) for name, c in zip(SYNTHETIC_CLASSES, counts, strict=True)}


# --------------------------------------------------------------------------- the curve
def learning_curve(d: Domain, rounds: Sequence[int], seeds: Sequence[int], members: int, max_epochs: int,
                   strategies: Sequence[str] = STRATEGIES) -> pd.DataFrame:
    """One row per strategy x labels x seed (see the module text for the columns)."""
    rounds = [int(r) for r in rounds]
    P = len(d.pool_ids)
    if rounds != sorted(set(rounds)) or rounds[0] < 1 or rounds[-1] > P:
        raise ValueError(f"rounds must increase within 1..{P} (the pool), got {rounds}")
    ignore = d.settings.data.ignore_index
    rows: list[dict[str, Any]] = []

    def fit(labelled: list[int], seed: int) -> tuple[PixelEnsemble, dict[str, Any]]:
        t0 = time.perf_counter()
        ensemble, summary = train_teacher(d, labelled, seed, members, max_epochs)
        train_s = time.perf_counter() - t0
        row = {"train_s": train_s, "epochs": summary.epochs, "updates": summary.updates, "stop": summary.reason}
        row.update(test_scores(d, ensemble))
        row.update(class_fractions(d.pool_labels[labelled], ignore))
        return ensemble, row

    for seed in seeds:
        first = sorted(int(i) for i in np.random.default_rng([seed, 0]).choice(P, size=rounds[0], replace=False))
        ensemble0, row0 = fit(first, seed)
        _say(f"seed {seed}: {rounds[0]} labels, test mIoU {row0['miou']:.1f} ({row0['train_s']:.0f} s)")
        for strategy in strategies:
            rng = np.random.default_rng([seed, 1])  # the random picks of this seed
            labelled, ensemble, row, before = list(first), ensemble0, dict(row0), {}
            for k, size in enumerate(rounds):
                if k:
                    ensemble, row = fit(labelled, seed)
                    _say(f"seed {seed}, {strategy}: {size} labels, test mIoU {row['miou']:.1f} ({row['train_s']:.0f} s)")
                new = labelled[-(size - rounds[k - 1]):] if k else labelled
                rows.append({"strategy": strategy, "seed": int(seed), "round": k, "labels": size, **row,
                             "labelled_ids": [d.pool_ids[i] for i in labelled],
                             "batch_ids": [d.pool_ids[i] for i in new], **before})
                if k + 1 == len(rounds):
                    break
                unlabelled = np.setdiff1d(np.arange(P), labelled)
                scores, errors = pool_scores(d, ensemble, unlabelled)
                n = rounds[k + 1] - size
                picks = (pick_suggested(d, unlabelled, scores, n) if strategy == "suggested"
                         else pick_random(rng, unlabelled, n))
                at = np.searchsorted(unlabelled, picks)
                before = {"pool_score_before": float(scores.mean()), "pool_error_before": float(errors.mean()),
                          "batch_score_before": float(scores[at].mean()), "batch_error_before": float(errors[at].mean()),
                          "pool_spearman_before": float(pd.Series(scores).corr(pd.Series(errors), method="spearman"))}
                labelled = labelled + picks
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per labels x strategy: mean, min, max and standard deviation of test mIoU over seeds."""
    g = df.groupby(["labels", "strategy"], sort=True)["miou"]
    out = pd.DataFrame({"mIoU_mean": g.mean(), "mIoU_min": g.min(), "mIoU_max": g.max(),
                        "mIoU_std": g.std(ddof=1).fillna(0.0), "seeds": g.size()}).reset_index()
    return out.round({"mIoU_mean": 2, "mIoU_min": 2, "mIoU_max": 2, "mIoU_std": 2})


def plot(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Mean test mIoU against labels, one line per strategy with its min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for strategy, colour in zip(STRATEGIES, ("tab:red", "tab:blue"), strict=True):
        s = summary[summary["strategy"] == strategy].sort_values("labels")
        if s.empty:
            continue
        ax.plot(s["labels"], s["mIoU_mean"], marker="o", color=colour, label=f"{strategy} (mean)")
        ax.fill_between(s["labels"], s["mIoU_min"], s["mIoU_max"], color=colour, alpha=0.18,
                        label=f"{strategy} (min-max over seeds)")
    ax.set_xscale("log", base=2)
    ticks = sorted(summary["labels"].unique())
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("labelled pool images")
    ax.set_ylabel("test mIoU (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_outputs(df: pd.DataFrame, summary: pd.DataFrame, out: Path, title: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "learning_curve.parquet", "csv": out / "learning_curve.csv",
             "dvc_plot": out / "learning_curve_dvc.csv", "plot": out / "learning_curve.png"}
    with atomic_path(paths["table"]) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(paths["csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    # one column per strategy (the mean over seeds), as DVC's line plots take them (dvc.yaml's plots)
    wide = summary.pivot(index="labels", columns="strategy", values="mIoU_mean").reset_index()
    with atomic_path(paths["dvc_plot"]) as tmp:
        wide[["labels", *[s for s in STRATEGIES if s in wide.columns]]].to_csv(tmp, index=False)
    plot(summary, paths["plot"], title)
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- entry point
def measure(pool: int = 200, n_test: int = 100, n_unlabeled: int = 400, rounds: Sequence[int] = (10, 20, 40),
            seeds: Sequence[int] = (0, 1, 2), ddpm_steps: int = 300, members: int = 5, max_epochs: int = 5,
            work: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """The whole benchmark: prepare (cached), the curve, the outputs. Returns the per-row
    table, the summary, the settings and the output paths.

    The defaults fit the 2-core budget: 15 teacher trainings (5 per seed) dominate, so the
    teacher has 5 members instead of ``params.yaml``'s 10, and ``max_epochs`` 5: with
    ``min_epoch`` 4 the stopping rule is first checked in the fifth epoch, where a member
    stops within a few hundred batches anyway, so the cap only bounds the slowest runs."""
    t_start = time.perf_counter()
    work, out = Path(work or WORK), Path(out or OUT)
    d = prepare(work, pool, n_test, n_unlabeled, ddpm_steps)
    t0 = time.perf_counter()
    df = learning_curve(d, rounds, seeds, members, max_epochs)
    curve_s = time.perf_counter() - t0
    summary = summarise(df)
    t = d.settings.teacher
    settings = {
        "pool": pool, "n_test": n_test, "n_unlabeled_ddpm_only": n_unlabeled, "rounds": list(rounds),
        "seeds": list(seeds), "ddpm_preset": d.settings.ddpm.preset, "ddpm_steps": ddpm_steps,
        "ddpm_batch_size": d.settings.ddpm.batch_size, "feature_steps": list(d.settings.features.steps),
        "feature_blocks": d.settings.features.blocks or "all", "feature_dim": d.pool.feature_dim,
        "teacher_members": members, "teacher_max_epochs": max_epochs,
        "teacher_members_params_yaml": t.members, "teacher_max_epochs_params_yaml": t.max_epochs,
        "teacher_patience": t.patience, "teacher_min_epoch": t.min_epoch, "teacher_batch_size": t.batch_size,
        "teacher_min_class_pixels": t.min_class_pixels, "select": "diverse_uncertain(candidates=4n, near_copy=0.05)",
        "prepare_s": {k: round(v, 1) for k, v in d.prepare_s.items()}, "curve_s": round(curve_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads(),
    }
    title = (f"{d.settings.ddpm.preset}, {ddpm_steps} DDPM steps, pool {pool}, {len(seeds)} seeds, "
             f"{members}-member teacher")
    paths = write_outputs(df, summary, out, title)
    _say(f"done in {settings['wall_s']:.0f} s; {paths['csv']}")
    return {"table": df, "summary": summary, "settings": settings, "paths": paths}


def rows(result: dict[str, Any]) -> list[dict]:
    """The runner's rows: at every round after the first, suggested's mean test mIoU against
    random's, with both spreads in the settings."""
    summary, settings = result["summary"], result["settings"]
    by = summary.set_index(["labels", "strategy"])
    out = []
    for labels in sorted(summary["labels"].unique())[1:]:
        sug, rnd = by.loc[(labels, "suggested")], by.loc[(labels, "random")]
        out.append({
            "name": f"active/miou_at_{labels}", "figure": f"test mIoU at {labels} labels, suggested picks (mean over seeds)",
            "value": float(sug["mIoU_mean"]), "unit": "% mIoU", "baseline": "random picks, same rounds and seeds",
            "baseline_value": float(rnd["mIoU_mean"]), "ratio": float(sug["mIoU_mean"] / rnd["mIoU_mean"]),
            "target": "> 1x, gap beyond the spread over seeds",
            "settings": {**settings, "suggested_min_max": [float(sug["mIoU_min"]), float(sug["mIoU_max"])],
                         "random_min_max": [float(rnd["mIoU_min"]), float(rnd["mIoU_max"])],
                         "suggested_std": float(sug["mIoU_std"]), "random_std": float(rnd["mIoU_std"]),
                         "outputs": result["paths"]},
        })
    return out


def run(**kwargs: Any) -> list[dict]:
    return rows(measure(**kwargs))


if __name__ == "__main__":
    for row in run():
        print(json.dumps(row, default=str))
