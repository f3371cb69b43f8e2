"""Benchmark: streaming teacher labels (no feature store) against bare UNet forwards.

(a) ours: :func:`~ddps_core.teacher.labels.label_images` with a
    :class:`~ddps_core.inference.teacher.TeacherPredictor` (the ``label`` stage's path): read
    each image, the hooked UNet forwards at every feature step, the 10-member pixel-MLP vote and
    Jensen-Shannon uncertainty on every pixel's on-demand upsampled features, merge at the
    image's size, write ``<id>.png``, ``<id>_uncertainty.png``, the part files and
    ``scores.parquet``;
(b) the baseline: the bare :class:`~ddps_core.features.FeatureExtractor` calls on the same
    images in the same batches (``features.batch_size``), nothing else (the batches are built
    outside the timed region).
Target: (a) / (b) <= 1.25. Where the rest of (a) goes is recorded too (``breakdown_s``).

Memory and disk: each N runs in its own process, which reports its peak RSS (``VmHWM``) after
labelling, and the bytes left under the labels folder; nothing else may be written (no
``.zarr``): the work folder holds only the input images and the labels. Target: peak RSS of
N = 2,000 / N = 200 <= 1.15.

For comparison, what the stored path would have written first: the feature store's footprint
(native float16 features, :func:`~ddps_core.features.store.footprint`) for N images at this
preset and at the official 256 configuration (``adm-256-lsun``, steps 50/150/250, blocks
5/6/7/8/12).

The settings are ``params.yaml``'s (``ddpm.preset``, ``features.*``, ``teacher.members``,
the synthetic domain); weights are random (speed and memory do not depend on training). The
pool is ``n_distinct`` synthetic images read from disk in a cycle under N distinct ids, so that
making the data set does not dominate the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.config import Settings, load_settings  # noqa: E402
from ddps_core.datasets import DDPMSegFolder, make_synthetic  # noqa: E402
from ddps_core.diffusion.gaussian import GaussianDiffusion  # noqa: E402
from ddps_core.diffusion.presets import get_preset  # noqa: E402
from ddps_core.features import FeatureExtractor, preprocess  # noqa: E402
from ddps_core.features.store import footprint  # noqa: E402
from ddps_core.inference.teacher import TeacherPredictor, ddpm_window_features  # noqa: E402
from ddps_core.teacher.ensemble import PixelEnsemble  # noqa: E402
from ddps_core.teacher.labels import ReaderImages, label_images, label_parts_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {"preset": "adm-256-lsun", "steps": (50, 150, 250), "blocks": (5, 6, 7, 8, 12)}


def _settings() -> Settings:
    return load_settings(REPO / "params.yaml" if (REPO / "params.yaml").exists() else None)


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB (``VmHWM``; see :func:`benchmarks.bench_ensemble.peak_rss_mb`)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            total += os.stat(os.path.join(root, name)).st_size
            files += 1
    return total, files


def zarr_paths(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*.zarr"))


class CycledImages(ReaderImages):
    """The first ``n`` images of a pool of ``len(reader)`` images read in a cycle, under ``n``
    distinct ids (every image is read from disk when asked for)."""

    def __init__(self, reader: Any, n: int):
        super().__init__(reader)
        self.distinct = len(self.image_ids)
        self.image_ids = [f"img_{i:05d}" for i in range(n)]

    def image(self, i: int) -> np.ndarray:
        return self.reader[i % self.distinct].image

    def content_id(self) -> str:
        return f"cycled-{self.reader.content_id()}-{len(self.image_ids)}"


class _Timers:
    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[key] += time.perf_counter() - t0
        return timed


class _TimedExtractor:
    """The extractor with its calls timed (the forwards inside the labelling)."""

    def __init__(self, ext: FeatureExtractor, timers: _Timers):
        self._ext, self._call = ext, timers.wrap("forward", ext.__call__)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ext, name)

    def __call__(self, x):
        return self._call(x)


class _TimedPredictor(TeacherPredictor):
    """The predictor with its whole call and its window maps (features, vote) timed."""

    def __init__(self, timers: _Timers, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._timers = timers

    def _window_maps(self, windows):
        return self._timers.wrap("window_maps", super()._window_maps)(windows)

    def __call__(self, images):
        return self._timers.wrap("predict", super().__call__)(images)


def build(settings: Settings, timers: _Timers | None = None) -> tuple[FeatureExtractor, TeacherPredictor]:
    """A random ``ddpm.preset`` UNet's extractor and a random ensemble of its ``feature_dim`` as a
    :class:`TeacherPredictor` (``whole`` mode, ``features.batch_size`` windows per forward).
    With ``timers``, the predictor's parts are timed (forwards, float16 natives, upsampling
    taps, ensemble vote, merge)."""
    s = settings
    cfg = get_preset(s.ddpm.preset)
    torch.manual_seed(s.seed)
    ext = FeatureExtractor(cfg.build().eval(), GaussianDiffusion.from_name(s.ddpm.schedule, s.ddpm.num_timesteps),
                           s.features.steps, s.features.blocks, noise_seed=s.features.noise_seed, model_id="bench")
    ensemble = PixelEnsemble(ext.feature_dim, 7, members=s.teacher.members, seed=s.teacher.seed)
    if timers is None:
        features = ddpm_window_features(ext)
    else:
        inner = ddpm_window_features(_TimedExtractor(ext, timers))

        def features(windows):
            return [timers.wrap("upsample", tap) for tap in timers.wrap("features", inner)(windows)]

    if timers is None:
        return ext, TeacherPredictor(ensemble, features, cfg.image_size, mode="whole", batch=s.features.batch_size)
    return ext, _TimedPredictor(timers, ensemble, features, cfg.image_size, mode="whole", batch=s.features.batch_size)


def make_pool(root: Path, n_distinct: int, settings: Settings) -> Path:
    syn = settings.data.synthetic
    make_synthetic(root, image_size=syn.image_size, n_unlabeled=n_distinct, n_labeled=1, n_test=1, seed=syn.seed)
    return root


def child(work: str, dataset: str, n_images: int, repeats: int = 1, keep: bool = True) -> dict[str, Any]:
    """One N, in its own process: ``repeats`` (labelling, bare forwards) pairs in alternating
    order after a warm-up of each; peak RSS after the first labelling; the first labels folder
    kept (``keep``) and measured. Prints and returns a JSON record."""
    work_dir = Path(work)
    s = _settings()
    timers = _Timers()
    ext, predictor = build(s, timers)
    source = CycledImages(DDPMSegFolder(dataset, "unlabeled"), n_images)
    B, S = predictor.batch, predictor.size
    warm = [source.image(i) for i in range(min(B, n_images))]
    with torch.inference_mode():
        predictor(warm), ext(torch.stack([preprocess(im, S) for im in warm]))
    timers.s.clear()
    rss_start = peak_rss_mb()

    def label(folder: Path) -> float:
        t0 = time.perf_counter()
        label_images(predictor, source, folder, "unlabeled", "bench")
        return time.perf_counter() - t0

    def forwards() -> float:  # the same batches as label_parts's (its parts, B images at a time)
        seconds = 0.0
        with torch.inference_mode():
            for a, b in label_parts_of(n_images):
                for c in range(a, b, B):
                    x = torch.stack([preprocess(source.image(i), S) for i in range(c, min(b, c + B))])
                    t0 = time.perf_counter()
                    ext(x)
                    seconds += time.perf_counter() - t0
        return seconds

    pairs, cpu, breakdowns, record = [], [], [], {}
    for r in range(repeats):
        folder = work_dir / f"labels-{n_images}-{r}"
        timers.s.clear()
        c0 = time.process_time()
        if r % 2:
            base = forwards()
            c1 = time.process_time()
            ours = label(folder)
            cpu.append((time.process_time() - c1, c1 - c0))
        else:
            ours = label(folder)
            c1 = time.process_time()
            base = forwards()
            cpu.append((c1 - c0, time.process_time() - c1))
        pairs.append((ours, base))
        breakdowns.append(_breakdown(dict(timers.s), ours))
        if r == 0:
            out_bytes, out_files = tree_bytes(folder)
            pngs = sorted(p.name for p in folder.glob("*.png"))
            record.update(peak_rss_mb=peak_rss_mb(), output_bytes=out_bytes, output_files=out_files,
                          label_pngs=sum(not p.endswith("_uncertainty.png") for p in pngs),
                          uncertainty_pngs=sum(p.endswith("_uncertainty.png") for p in pngs),
                          scores_rows=len(pd.read_parquet(folder / "scores.parquet")),
                          leftover_parts=(folder / ".parts").exists())
        if not (keep and r == 0):
            shutil.rmtree(folder)
    record.update(n_images=n_images, repeats=repeats, batch=B, rss_after_warmup_mb=rss_start,
                  label_s=[p[0] for p in pairs], forward_s=[p[1] for p in pairs],
                  label_cpu_s=[c[0] for c in cpu], forward_cpu_s=[c[1] for c in cpu],
                  breakdown_s=breakdowns[int(np.argsort([p[0] for p in pairs])[len(pairs) // 2])],
                  zarr=zarr_paths(work_dir), feature_dim=ext.feature_dim,
                  shapes={k: list(v) for k, v in ext.shapes().items()}, image_size=S,
                  threads=torch.get_num_threads())
    print(json.dumps(record))
    return record


def _breakdown(t: dict[str, float], total: float) -> dict[str, float]:
    """Where a labelling's seconds went, from the nested timers."""
    return {
        "unet_forwards": t["forward"],
        "float16_natives": t["features"] - t["forward"],
        "upsample_taps": t["upsample"],
        "ensemble_vote_js": t["window_maps"] - t["features"] - t["upsample"],
        "merge_resize_argmax_score": t["predict"] - t["window_maps"],
        "read_write_png_parquet": total - t["predict"],
    }


def _child_process(work: Path, dataset: Path, n_images: int, repeats: int) -> dict[str, Any]:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench_label_stream import child; "
            f"child({str(work)!r}, {str(dataset)!r}, {n_images}, {repeats})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"label_stream child (N={n_images}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_store(n_images: int) -> dict[str, Any]:
    """The 256 configuration's store footprint for ``n_images`` (shapes from a meta-device UNet)."""
    cfg = get_preset(REFERENCE["preset"], use_fp16=False)
    with torch.device("meta"):
        model = cfg.build()
    ext = FeatureExtractor(model, GaussianDiffusion.from_name("linear", 1000), list(REFERENCE["steps"]),
                           list(REFERENCE["blocks"]), device="meta", model_id="shape-only")
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in REFERENCE.items()},
            **footprint(ext.shapes(), cfg.image_size, n_images)}


def measure(sizes: tuple[int, ...] = (200, 2000), repeats: dict[int, int] | None = None, n_distinct: int = 200,
            work: Path | None = None) -> dict[int, dict[str, Any]]:
    """The child records of each N (one process each) in a work folder (a temporary one,
    removed afterwards, unless ``work`` is given: then it is left for the caller)."""
    s = _settings()
    tmp = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="bench-label-stream-"))
    try:
        dataset = make_pool(tmp / "dataset", min(n_distinct, max(sizes)), s)
        out = {}
        for n in sizes:
            rec = _child_process(tmp / f"n{n}", dataset, n, (repeats or {}).get(n, 1))
            rec["work_zarr"] = zarr_paths(tmp)
            rec["work_bytes_outside_dataset_and_labels"] = sum(
                tree_bytes(p)[0] for p in (tmp / f"n{n}").iterdir() if not p.name.startswith("labels-"))
            out[n] = rec
        return out
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)


def rows(records: dict[int, dict[str, Any]]) -> list[dict]:
    import statistics

    s = _settings()
    out = []
    for n, r in records.items():
        ours, base = statistics.median(r["label_s"]), statistics.median(r["forward_s"])
        ratios = [a / b for a, b in zip(r["label_s"], r["forward_s"])]
        cpu_ratios = [a / b for a, b in zip(r["label_cpu_s"], r["forward_cpu_s"])]
        here = footprint(r["shapes"], r["image_size"], n)
        out.append({
            "name": f"label_stream/{s.ddpm.preset}-{n}",
            "figure": f"seconds to label {n} images (streaming, no store)", "value": ours, "unit": "s",
            "baseline": "bare FeatureExtractor forwards, same images and batches", "baseline_value": base,
            "ratio": statistics.median(ratios), "target": "<= 1.25x",
            "settings": {"n_images": n, "images_per_s": n / ours, "forward_images_per_s": n / base,
                         "pair_ratios": [round(x, 3) for x in ratios],
                         "cpu_ratio": statistics.median(cpu_ratios), "breakdown_s": r["breakdown_s"],
                         "steps": list(s.features.steps), "blocks": s.features.blocks or "all",
                         "members": s.teacher.members, "feature_dim": r["feature_dim"], "batch": r["batch"],
                         "repeats": r["repeats"], "threads": r["threads"], "peak_rss_mb": r["peak_rss_mb"],
                         "output_bytes": r["output_bytes"], "output_bytes_per_image": r["output_bytes"] / n,
                         "zarr_written": r["work_zarr"],
                         "store_native_float16_bytes_here": here["native_float16_bytes"]},
        })
    if len(records) >= 2:
        small, large = min(records), max(records)
        rs, rl = records[small], records[large]
        ref = reference_store(large)
        here = footprint(rl["shapes"], rl["image_size"], large)
        common = {"n_small": small, "n_large": large, "image_size": rl["image_size"]}
        out += [{
            "name": f"label_stream/peak_rss_{large}_vs_{small}", "figure": f"peak RSS, labelling {large} images",
            "value": rl["peak_rss_mb"], "unit": "MB", "baseline": f"peak RSS, labelling {small} images",
            "baseline_value": rs["peak_rss_mb"], "ratio": rl["peak_rss_mb"] / rs["peak_rss_mb"],
            "target": "<= 1.15x",
            "settings": {**common, "rss_after_warmup_mb": [rs["rss_after_warmup_mb"], rl["rss_after_warmup_mb"]],
                         # what labelling added on top of the loaded models (imports, UNet, ensemble)
                         "growth_mb": [rs["peak_rss_mb"] - rs["rss_after_warmup_mb"],
                                       rl["peak_rss_mb"] - rl["rss_after_warmup_mb"]]},
        }, {
            "name": f"label_stream/disk_{large}_vs_{small}", "figure": f"bytes left by labelling {large} images",
            "value": rl["output_bytes"], "unit": "B", "baseline": f"bytes left by labelling {small} images",
            "baseline_value": rs["output_bytes"], "ratio": rl["output_bytes"] / rs["output_bytes"],
            "target": None,
            "settings": {**common, "output_bytes_per_image": [rs["output_bytes"] / small, rl["output_bytes"] / large],
                         "output_files": [rs["output_files"], rl["output_files"]],
                         "bytes_outside_labels": [rs["work_bytes_outside_dataset_and_labels"],
                                                  rl["work_bytes_outside_dataset_and_labels"]],
                         "zarr_written": rl["work_zarr"]},
        }, {
            "name": f"label_stream/store_avoided_{large}", "figure": f"feature store the stored path writes first, "
            f"{large} images, {s.ddpm.preset} (native float16)",
            "value": here["native_float16_bytes"], "unit": "B",
            "baseline": f"bytes the streaming labels leave ({large} images)", "baseline_value": rl["output_bytes"],
            "ratio": here["native_float16_bytes"] / rl["output_bytes"], "target": None,
            "settings": {**common, "here": here, "reference_256": ref,
                         "reference_256_gb": ref["native_float16_bytes"] / 1e9,
                         "reference_256_mb_per_image": ref["native_float16_bytes_per_image"] / 1e6},
        }]
    return out


def run(sizes: tuple[int, ...] = (200, 2000), repeats: dict[int, int] | None = None) -> list[dict]:
    return rows(measure(sizes, repeats if repeats is not None else {200: 2, 2000: 1}))


if __name__ == "__main__":
    for row in run():
        print(row)
