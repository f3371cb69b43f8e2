"""The ``ddps`` command line.

Each command parses ``params.yaml`` into typed settings, applies its own options as overrides
of the same fields, and calls ``ddps_core``. A bad input ends with one message that names the
file and the fault and a non-zero exit; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ddps_core.config import Settings, load_settings, parse_assignment
from ddps_core.errors import DDPSError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="ddps",
    help="Diffusion-prior semantic segmentation: DDPM-Seg features, label-efficient "
    "dataset generation, distilled students and DDPS refinement.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Show and check the settings (params.yaml).", no_args_is_help=True)
data_app = typer.Typer(help="Make, import and check datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
ddpm_app = typer.Typer(help="Train, sample and inspect the diffusion model.", no_args_is_help=True)
app.add_typer(data_app, name="data")
features_app = typer.Typer(help="Extract and inspect DDPM-Seg feature stores.", no_args_is_help=True)
app.add_typer(ddpm_app, name="ddpm")
app.add_typer(features_app, name="features")
ensemble_app = typer.Typer(help="Train the pixel-MLP teacher, label, report.", no_args_is_help=True)
app.add_typer(ensemble_app, name="ensemble")
student_app = typer.Typer(help="Train and run the distilled segmentor (the student).", no_args_is_help=True)
app.add_typer(student_app, name="student")

ParamsOpt = Annotated[
    Path, typer.Option("--params", help="Settings file; missing = embedded defaults.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting: KEY=VALUE (dotted key; repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Diffusion-prior semantic segmentation pipeline."""


def settings_from(params: Path, sets: list[str] | None, **options: Any) -> Settings:
    """Settings from ``params`` (defaults if it is missing) + ``--set`` + typed options."""
    overrides: dict[str, Any] = dict(parse_assignment(s) for s in sets or [])
    overrides.update({k: v for k, v in options.items() if v is not None})
    return load_settings(params if params.exists() else None, overrides)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar; yields ``update(n_done)`` taking the absolute count done."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    # Drawn only on a terminal: logs and pipes get the summary lines, not bar frames.
    with Progress(*columns, console=err_console, disable=not err_console.is_terminal) as prog:
        task_id = prog.add_task(description, total=total, rate="")

        def update(n_done: int) -> None:
            elapsed = prog.tasks[0].elapsed or 0.0
            rate = f"{n_done / elapsed:.1f} it/s" if elapsed > 0 else ""
            prog.update(task_id, completed=n_done, rate=rate)

        yield update


# --------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the effective settings (params.yaml + overrides, validated)."""
    settings = settings_from(params, set_)
    console.print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), end="")


# --------------------------------------------------------------------------- data
@data_app.command("synthetic")
def data_synthetic(
    out: Annotated[Path | None, typer.Option(help="Output folder [params: data.out].")] = None,
    image_size: Annotated[int | None, typer.Option(help="32, 64 or 128.")] = None,
    n_unlabeled: Annotated[int | None, typer.Option(help="Unlabelled images.")] = None,
    n_labeled: Annotated[int | None, typer.Option(help="Labelled training images.")] = None,
    n_test: Annotated[int | None, typer.Option(help="Labelled test images.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Generate the embedded synthetic face-parts domain (DDPM-Seg folder layout)."""
    s = settings_from(
        params, set_,
        **{"data.out": str(out) if out else None, "data.synthetic.image_size": image_size,
           "data.synthetic.n_unlabeled": n_unlabeled, "data.synthetic.n_labeled": n_labeled,
           "data.synthetic.n_test": n_test, "data.synthetic.seed": seed},
    )
    from ddps_core.datasets.synthetic import make_synthetic

    syn = s.data.synthetic
    total = syn.n_unlabeled + syn.n_labeled + syn.n_test
    with progress_bar("synthetic images", total) as update:
        summary = make_synthetic(s.data.out, progress=update, **syn.model_dump())
    _print_dataset_summary(s.data.out, summary)


@data_app.command("prepare")
def data_prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the ``data`` stage: make or import the dataset that ``params.yaml`` describes."""
    from ddps_core.datasets.prepare import prepare_dataset

    s = settings_from(params, set_)
    with progress_bar(f"data ({s.data.source})", None) as update:
        summary = prepare_dataset(s.data, progress=update)
    _print_dataset_summary(s.data.out, summary)


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    format_: Annotated[str, typer.Option("--format", help="ddpm-seg | ade20k | cityscapes | folder")] = "ddpm-seg",
    split: Annotated[list[str] | None, typer.Option(help="Split(s) to read (repeatable).")] = None,
    num_classes: Annotated[int | None, typer.Option(help="K; from classes.yaml if omitted.")] = None,
    ignore_index: Annotated[int, typer.Option(help="Ignore label value.")] = 255,
) -> None:
    """Read and validate every file of a dataset; print counts per split."""
    from ddps_core.datasets import open_dataset

    splits = split or {"ddpm-seg": ["train", "test"], "ade20k": ["training", "validation"],
                       "cityscapes": ["train", "val"], "folder": ["train"]}.get(format_, ["train"])
    table = Table(title=f"{root} ({format_})")
    for col in ("split", "images", "labelled", "sizes", "classes seen"):
        table.add_column(col)
    for name in splits:
        ds = open_dataset(format_, root, name, num_classes=num_classes, ignore_index=ignore_index)
        sizes: set[tuple[int, int]] = set()
        seen: set[int] = set()
        labelled = 0
        with progress_bar(f"check {name}", len(ds)) as update:
            for i, sample in enumerate(ds, 1):
                sizes.add(sample.image.shape[:2])
                if sample.label is not None:
                    labelled += 1
                    seen.update(int(v) for v in set(sample.label.ravel().tolist()))
                update(i)
        seen.discard(ignore_index)
        size_txt = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4]) + (" ..." if len(sizes) > 4 else "")
        table.add_row(name, str(len(ds)), str(labelled), size_txt, str(len(seen)))
    console.print(table)
    console.print("[green]all files valid[/green]")


def _print_dataset_summary(out: str | Path, summary: dict[str, Any]) -> None:
    table = Table(title=f"dataset in {out}")
    table.add_column("split")
    table.add_column("images", justify="right")
    for split, n in summary.get("counts", {}).items():
        table.add_row(split, str(n))
    console.print(table)


# --------------------------------------------------------------------------- ddpm
@ddpm_app.command("train")
def ddpm_train(
    steps: Annotated[int | None, typer.Option(help="Optimiser steps [params: ddpm.steps].")] = None,
    preset: Annotated[str | None, typer.Option(help="UNet preset [params: ddpm.preset].")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder [params: ddpm.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train the DDPM on the dataset's unlabelled + training images (resumes when it can)."""
    from ddps_core.diffusion.train import run_stage

    s = settings_from(params, set_, **{"ddpm.steps": steps, "ddpm.preset": preset,
                                       "ddpm.time_budget_s": time_budget,
                                       "ddpm.out": str(out) if out else None})
    summary = _train_with_progress(s, run_stage)
    console.print(summary)


def _train_with_progress(s: Settings, run_stage: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    with progress_bar("ddpm", s.ddpm.steps) as update_bar:
        def on_step(info: Any) -> None:
            update_bar(info.step)
            if info.step % (s.ddpm.log_every * 10) == 0 or info.step == info.total:
                err_console.print(f"step {info.step}: loss {info.loss:.4f} (mse {info.mse:.4f}, "
                                  f"vb {info.vb:.4f}) lr {info.lr:.2e} {info.images_per_s:.1f} img/s")
        return run_stage(s, on_step=on_step, log=err_console.print)


@ddpm_app.command("sample")
def ddpm_sample(
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("samples.png"),
    n: Annotated[int, typer.Option(help="Number of samples.")] = 16,
    steps: Annotated[int | None, typer.Option(help="Sampling steps [params: ddpm.sample_steps].")] = None,
    method: Annotated[str | None, typer.Option(help="ddim | ancestral [params: ddpm.sample_method].")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Draw samples from the trained (or configured) diffusion model as a PNG grid."""
    from ddps_core.device import resolve_device
    from ddps_core.diffusion.gaussian import GaussianDiffusion
    from ddps_core.diffusion.train import load_trained, sample_grid
    from ddps_core.viz import save_png

    s = settings_from(params, set_, **{"ddpm.sample_steps": steps, "ddpm.sample_method": method})
    device = resolve_device(s.device)
    model, info = load_trained(s.ddpm.out, device)
    diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
    save_png(sample_grid(model, diffusion, n, s.ddpm.sample_steps, s.ddpm.sample_method, seed, device), out)
    console.print(f"{n} samples ({s.ddpm.sample_method}, {s.ddpm.sample_steps} steps) -> {out}")


@ddpm_app.command("presets")
def ddpm_presets() -> None:
    """List the UNet presets with their sizes."""
    import torch

    from ddps_core.diffusion.presets import PRESETS

    table = Table(title="UNet presets")
    for col in ("name", "image", "channels", "mult", "attention", "parameters"):
        table.add_column(col)
    for name, cfg in sorted(PRESETS.items()):
        with torch.device("meta"):
            n_params = sum(p.numel() for p in cfg.build().parameters())
        table.add_row(name, str(cfg.image_size), str(cfg.num_channels),
                      str(cfg.resolved_channel_mult()), str(cfg.attention_resolutions), f"{n_params:,}")
    console.print(table)


# --------------------------------------------------------------------------- features
@features_app.command("extract")
def features_extract(
    split: Annotated[list[str] | None, typer.Option(help="Split(s) [params: features.splits].")] = None,
    out: Annotated[Path | None, typer.Option(help="Store folder [params: features.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Extract DDPM-Seg features of each split into a Zarr store (resumes where it stopped)."""
    from ddps_core.features.stage import run_stage

    s = settings_from(params, set_, **{"features.splits": split, "features.out": str(out) if out else None})
    bars: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        def progress(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = stack.enter_context(progress_bar(f"features {name}", total))
            bars[name](done)

        summary = run_stage(s, progress=progress, log=err_console.print)
    for name, info in summary.items():
        _print_store_info(info, title=f"{name}: {info['images_written']} images extracted")


@features_app.command("info")
def features_info(store: Annotated[str, typer.Argument(help="A feature store (.zarr folder or fsspec URL).")]) -> None:
    """Layout, size on disk and the ratio to upsampled float32 of a feature store."""
    from ddps_core.features.stage import reference_footprint
    from ddps_core.features.store import FeatureStore

    if not FeatureStore.exists(store):
        raise DDPSError(f"{store}: not a feature store (no zarr.json)")
    fs = FeatureStore.open(store, read_only=True)
    table = Table(title=f"{store}: arrays (native resolution, float16)")
    for col in ("array", "C", "h x w"):
        table.add_column(col)
    for name in fs.names:
        c, h, w = fs.shapes[name]
        table.add_row(name, str(c), f"{h} x {w}")
    console.print(table)
    attrs = fs.settings()
    console.print(f"steps {attrs['steps']}  blocks {attrs['blocks']}  noise seed {attrs['noise_seed']}  "
                  f"model {attrs['model_id']}  image size {fs.image_size}  shard {attrs['shard_images']} images")
    _print_store_info(fs.info(), title="footprint")
    ref = reference_footprint()
    console.print(f"reference 256 config (blocks {ref['blocks']}, steps {ref['steps']}, D={ref['feature_dim']}): "
                  f"{ref['native_float16_bytes_per_image'] / 1e6:.1f} MB/image native float16 vs "
                  f"{ref['upsampled_float32_bytes_per_image'] / 1e9:.2f} GB upsampled float32 = "
                  f"{ref['ratio']:.1f}x")


def _print_store_info(info: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("images done", f"{info['n_done']} / {info['n_images']}")
    table.add_row("feature dim D", str(info["feature_dim"]))
    table.add_row("on disk", f"{info['bytes_on_disk'] / 1e6:.2f} MB")
    table.add_row("per image", f"{info['bytes_per_image'] / 1e6:.3f} MB")
    table.add_row("upsampled float32 per image", f"{info['upsampled_float32_bytes_per_image'] / 1e6:.3f} MB")
    ratio = info.get("ratio")
    table.add_row("ratio", f"{ratio:.2f}x" if ratio else "-")
    console.print(table)


# --------------------------------------------------------------------------- ensemble
MethodOpt = Annotated[list[str] | None, typer.Option("--method", help="ddpm | random_unet | rgbxy (repeatable) [params: teacher.methods].")]


@ensemble_app.command("train")
def ensemble_train(
    method: MethodOpt = None,
    members: Annotated[int | None, typer.Option(help="Ensemble size [params: teacher.members].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train the pixel-MLP ensemble on each method's features (resumes when it can)."""
    from ddps_core.teacher.stage import run_train

    s = settings_from(params, set_, **{"teacher.methods": method, "teacher.members": members})

    def progress(epoch: int, batches: int, active: int, loss: float) -> None:
        err_console.print(f"epoch {epoch} batch {batches}: {active} members active, loss {loss:.4f}")

    summary = run_train(s, progress=progress, log=err_console.print)
    console.print(summary)


@ensemble_app.command("predict")
def ensemble_predict(method: MethodOpt = None, params: ParamsOpt = Path("params.yaml"),
                     set_: SetOpt = None) -> None:
    """Label the test split (every method) and the unlabelled pool (ddpm): label PNGs,
    uncertainty maps, scores.parquet under teacher.labels_out."""
    from ddps_core.teacher.stage import run_label

    s = settings_from(params, set_, **{"teacher.methods": method})
    bars: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        def progress(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = stack.enter_context(progress_bar(f"label {name}", total))
            bars[name](done)

        summary = run_label(s, progress)
    console.print(summary)


@ensemble_app.command("report")
def ensemble_report(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Score every method's test labels: reports/ddpm_seg.parquet, metrics JSON, figures."""
    from ddps_core.teacher.stage import run_evaluate

    df = run_evaluate(settings_from(params, set_), student=False)
    for method in df["method"].unique():
        print_report(df[df["method"] == method], title=f"method: {method}")


# --------------------------------------------------------------------------- generate
@app.command("generate")
def generate(
    source: Annotated[str | None, typer.Option(help="pool | generated | both [params: generate.source].")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Images to sample [params: generate.n_samples].")] = None,
    steps: Annotated[int | None, typer.Option(help="Respaced sampling steps [params: generate.sample_steps].")] = None,
    method: Annotated[str | None, typer.Option(help="ancestral | ddim [params: generate.sample_method].")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="folder | ddpm-seg [params: generate.format].")] = None,
    out: Annotated[Path | None, typer.Option(help="Export folder [params: generate.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Label-efficient dataset generation: sample and / or take the pool, label with the
    teacher, filter by uncertainty, export images, masks and a Parquet manifest."""
    from ddps_core.generate.stage import run_stage

    s = settings_from(params, set_, **{"generate.source": source, "generate.n_samples": n,
                                       "generate.sample_steps": steps, "generate.sample_method": method,
                                       "generate.format": format_, "generate.out": str(out) if out else None})
    bars: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        def progress(step: str, done: int, total: int) -> None:
            if step not in bars:
                bars[step] = stack.enter_context(progress_bar(step, total))
            bars[step](done)

        stats = run_stage(s, progress=progress, log=err_console.print)
    table = Table(title=f"filtering ({s.generate.filter}) -> {s.generate.out}")
    for col in ("source", "candidates", "kept", "dropped", "scores"):
        table.add_column(col)
    for src, st in stats.items():
        if not isinstance(st, dict):
            continue
        scores = f"{st['score_min']:.4f} .. {st['score_max']:.4f}" if "score_min" in st else "-"
        table.add_row(src, str(st["candidates"]), str(st["kept"]),
                      ", ".join(f"{k} {v}" for k, v in st["dropped"].items()) or "-", scores)
    console.print(table)
    console.print(f"{stats['total_kept']} labelled images; manifest {Path(s.generate.out) / 'manifest.parquet'}")


# --------------------------------------------------------------------------- student
@student_app.command("train")
def student_train(
    arch: Annotated[str | None, typer.Option(help="deeplabv3plus | segformer [params: student.arch].")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder [params: student.encoder].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs [params: student.epochs].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train the student on the generated dataset (resumes after the last finished epoch),
    select it by mIoU on the real labelled images, and label the test split."""
    from ddps_core.student.stage import run_stage

    s = settings_from(params, set_, **{"student.arch": arch, "student.encoder": encoder,
                                       "student.epochs": epochs})

    def on_epoch(row: dict[str, Any]) -> None:
        val = "-" if row["val_miou"] is None else f"{100 * row['val_miou']:.2f}"
        err_console.print(f"epoch {row['epoch']}/{s.student.epochs}: loss {row['loss']:.4f}, "
                          f"real-image mIoU {val}, {row['seconds']:.1f} s")

    with contextlib.ExitStack() as stack:
        bar: list[Callable[[int], None]] = []

        def on_batch(it: int, total: int) -> None:
            if not bar:
                bar.append(stack.enter_context(progress_bar("student batches", total)))
            bar[0](it)

        info = run_stage(s, on_epoch=on_epoch, on_batch=on_batch, log=err_console.print)
    console.print(f"student {info['arch']}/{info['encoder']}: epoch {info['best_epoch']} selected; "
                  f"test mIoU {_pct(info['test_miou'])}  mBIoU {_pct(info['test_mbiou'])} -> {s.student.out}")


@student_app.command("predict")
def student_predict(
    out: Annotated[Path, typer.Option(help="Folder for the label PNGs.")],
    split: Annotated[str, typer.Option(help="train | test | unlabeled (of data.out).")] = "test",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Label a split of the dataset with the trained student (PNG class ids at the model
    size); prints the scores when the split has labels."""
    from ddps_core.generate.stage import image_size
    from ddps_core.student.stage import predict_split

    s = settings_from(params, set_)
    with progress_bar(f"student {split}", None) as update:
        result = predict_split(s, split, out, image_size(s), progress=lambda d, _n: update(d))
    if result is not None:
        from ddps_core.metrics import report_frame

        print_report(report_frame(result), title=f"student on {split}")
    console.print(f"labels -> {out}")


# --------------------------------------------------------------------------- evaluate
@app.command("evaluate")
def evaluate(
    pred: Annotated[Path, typer.Option(help="Predictions: PNG or .npy label maps, matched by stem.")],
    gt: Annotated[Path, typer.Option(help="Ground truth: PNG or .npy label maps.")],
    num_classes: Annotated[int, typer.Option(help="Number of classes K.")],
    out: Annotated[Path, typer.Option(help="Parquet report to write.")],
    ignore_index: Annotated[int | None, typer.Option(help="Ignore label [params: evaluate.ignore_index].")] = None,
    names: Annotated[Path | None, typer.Option(help="classes.yaml with class names.")] = None,
    boundary_ratio: Annotated[float | None, typer.Option(help="Band width / diagonal [params: evaluate.boundary_ratio].")] = None,
    figures: Annotated[Path | None, typer.Option(help="Write image | truth | prediction PNGs here.")] = None,
    images: Annotated[Path | None, typer.Option(help="Images for --figures (default: the --gt folder).")] = None,
    max_figures: Annotated[int, typer.Option(help="At most this many figures.")] = 16,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Score predictions against ground truth: mIoU, mBIoU, aAcc, mAcc, per class and image."""
    from ddps_core.metrics import evaluate_dirs, load_class_names, report_frame, write_report

    s = settings_from(params, set_, **{"evaluate.ignore_index": ignore_index,
                                       "evaluate.boundary_ratio": boundary_ratio})
    class_names = load_class_names(names) if names else None
    if class_names is not None and len(class_names) != num_classes:
        raise DDPSError(f"{names}: lists {len(class_names)} class names, --num-classes is {num_classes}")
    with progress_bar("evaluate", None) as update:
        result = evaluate_dirs(pred, gt, num_classes, ignore_index=s.evaluate.ignore_index,
                               boundary_ratio=s.evaluate.boundary_ratio,
                               progress=lambda done, _total: update(done))
    frame = report_frame(result, class_names)
    write_report(frame, out)
    print_report(frame)
    console.print(f"report: {out}")
    if figures is not None:
        from ddps_core.viz.pictures import write_overlays

        paths = write_overlays(pred, gt, images or gt, figures, max_figures, s.evaluate.ignore_index)
        console.print(f"{len(paths)} overlay figures in {figures}")


def print_report(frame: Any, title: str = "segmentation report") -> None:
    """Per-class and summary rich tables of a report frame."""
    classes = frame[frame["scope"] == "class"]
    table = Table(title=title)
    for col in ("id", "class", "IoU", "bIoU", "Acc"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for row in classes.itertuples():
        table.add_row(str(row.class_id), str(row.class_name), _pct(row.iou), _pct(row.biou), _pct(row.acc))
    summary = frame[frame["scope"] == "summary"].iloc[0]
    table.add_section()
    table.add_row("", "[bold]mean[/bold]", _pct(summary["miou"]), _pct(summary["mbiou"]), _pct(summary["macc"]))
    console.print(table)
    console.print(f"mIoU {_pct(summary['miou'])}  mBIoU {_pct(summary['mbiou'])}  "
                  f"aAcc {_pct(summary['aacc'])}  mAcc {_pct(summary['macc'])}")


def _pct(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "nan" if v != v else f"{100 * v:.2f}"


# --------------------------------------------------------------------------- entry point
from flows.cli_ddps import ddps_app  # noqa: E402
app.add_typer(ddps_app, name="ddps")
from flows.deploy import deploy_command  # noqa: E402
app.command("deploy")(deploy_command)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one clear message and a non-zero exit on bad input.

    Usage errors are click's (exit 2, with the usage line); bad input raised by the library
    (:class:`DDPSError`) and file-system faults print one line without a traceback unless
    ``--debug`` is given.
    """
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="ddps")
    except DDPSError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{_OS_FAULTS.get(exc.errno) or exc.strerror or exc}", 1)


# File-system faults in plain words (the path comes first in the message).
_OS_FAULTS = {
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded (the disk is full for this user)",
    errno.EROFS: "read-only file system: cannot write here",
    errno.EACCES: "permission denied",
}


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False,
                      soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
