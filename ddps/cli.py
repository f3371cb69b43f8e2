"""The ``ddps`` command.

Every pipeline stage has a command here (``ddps ddpm train`` runs stage ``train_ddpm``), and
each calls the stage's one implementation, :meth:`ddps_core.stages.Stage.run`, the same
function the stage's Prefect flow and DVC stage run. Settings come from ``params.yaml``
(``--params FILE``, or ``--defaults`` for the embedded defaults), then ``--set KEY=VALUE``,
then the command's own options, each of which names the settings key it overrides and shows
its current value in ``--help``.

Commands are listed in pipeline order. Bad input ends with one ``error:`` line that names
the file or key, and a non-zero exit (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperGroup
from rich.table import Table

from ddps.console import RichReporter, console, err_console, percent, run_guarded
from ddps_core.config import Settings, load_settings, parse_assignment
from ddps_core.errors import ConfigError, DDPSError

#: Commands in the order of the pipeline, then the tools that stand beside it.
ORDER = ("config", "data", "ddpm", "features", "teacher", "generate", "student", "refiner", "evaluate", "report",
         "predict", "suggest", "score", "deploy")


class _PipelineOrder(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


app = typer.Typer(
    name="ddps", cls=_PipelineOrder,
    help="Diffusion-prior semantic segmentation: DDPM-Seg features, a pixel-MLP teacher, a "
    "generated dataset, a distilled student and the DDPS refiner.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
)


def _group(name: str, text: str) -> typer.Typer:
    group = typer.Typer(help=text, no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(group, name=name)
    return group


# ----------------------------------------------------------------------------- settings
def _file_values(path: Path = Path("params.yaml")) -> dict[str, Any]:
    """``params.yaml`` of the current folder as dotted keys (for ``--help``); {} if unreadable."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (tree or {}).items() if isinstance(tree, dict) else []:
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    return flat(raw)


_IN_FILE = _file_values()


def _default(key: str) -> Any:
    node: Any = Settings()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def key_help(key: str, text: str) -> str:
    """``text`` with the settings ``key`` it overrides and that key's current value."""
    if key in _IN_FILE:
        return f"{text} ({key}; params.yaml: {_IN_FILE[key]!r})"
    return f"{text} ({key}; default {_default(key)!r})"


def Key(key: str, text: str, *names: str, metavar: str | None = None) -> Any:  # noqa: N802 (a typer.Option factory)
    """A command option that overrides settings ``key``."""
    return typer.Option(*names, help=key_help(key, text), metavar=metavar, show_default=False)


ParamsOpt = Annotated[Path, typer.Option("--params", metavar="FILE",
                                         help="Settings file; it must exist (see --defaults).")]
DefaultsOpt = Annotated[bool, typer.Option("--defaults", help="Start from the embedded defaults, not a settings file.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE", help="Override a setting: a dotted key and a YAML value (repeatable).")]


def settings_from(params: Path, defaults: bool, sets: list[str] | None, **options: Any) -> Settings:
    """The settings file (or the embedded defaults), then ``--set``, then typed options."""
    overrides: dict[str, Any] = dict(parse_assignment(s) for s in sets or [])
    overrides.update({k: v for k, v in options.items() if v is not None})
    if defaults:
        return load_settings(None, overrides)
    if not params.is_file():
        raise ConfigError(f"{params}: settings file not found (run in the project folder, pass --params FILE, "
                          "or --defaults for the embedded defaults)")
    return load_settings(params, overrides)


def run_stage(name: str, settings: Settings) -> dict[str, Any]:
    """Stage ``name`` in this process, with progress bars; its summary."""
    from ddps_core import stages

    with RichReporter() as report:
        return stages.get(name).run(settings, report)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    """Diffusion-prior semantic segmentation pipeline."""


# ----------------------------------------------------------------------------- config
config_app = _group("config", "Show the effective settings and the recipes.")


@config_app.command("show")
def config_show(params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None) -> None:
    """Print the effective settings (a recipe's values, then the settings file and the
    overrides over them, validated): every key, so the output is a complete params.yaml."""
    s = settings_from(params, defaults, set_)
    console.print(yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False), end="", markup=False)


@config_app.command("recipes")
def config_recipes() -> None:
    """List the recipes (recipe: NAME) and the values each sets."""
    from ddps_core.recipes import RECIPES

    console.print(yaml.safe_dump(RECIPES, sort_keys=False, width=1000), end="", markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------- data
data_app = _group("data", "Stage data: make, import and check datasets.")


@data_app.command("prepare")
def data_prepare(params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None) -> None:
    """Run stage data: make or import the dataset the settings describe, into data.out."""
    s = settings_from(params, defaults, set_)
    _print_counts(s.data.out, run_stage("data", s))


@data_app.command("synthetic")
def data_synthetic(
    out: Annotated[Path | None, Key("data.out", "Output folder.", metavar="DIR")] = None,
    image_size: Annotated[int | None, Key("data.synthetic.image_size", "32, 64 or 128.", metavar="PIXELS")] = None,
    n_unlabeled: Annotated[int | None, Key("data.synthetic.n_unlabeled", "Unlabelled images.", metavar="N")] = None,
    n_labeled: Annotated[int | None, Key("data.synthetic.n_labeled", "Labelled training images.", metavar="N")] = None,
    n_test: Annotated[int | None, Key("data.synthetic.n_test", "Labelled test images.", metavar="N")] = None,
    seed: Annotated[int | None, Key("data.synthetic.seed", "Random seed.", metavar="N")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage data with the embedded synthetic face-parts domain (DDPM-Seg folder layout)."""
    s = settings_from(params, defaults, set_, **{
        "data.source": "synthetic", "data.out": str(out) if out else None, "data.synthetic.image_size": image_size,
        "data.synthetic.n_unlabeled": n_unlabeled, "data.synthetic.n_labeled": n_labeled,
        "data.synthetic.n_test": n_test, "data.synthetic.seed": seed})
    _print_counts(s.data.out, run_stage("data", s))


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Dataset folder.", metavar="DIR")],
    format_: Annotated[str, typer.Option("--format", metavar="FORMAT",
                                         help="ddpm-seg, ade20k, cityscapes or folder.")] = "ddpm-seg",
    split: Annotated[list[str] | None, typer.Option(metavar="SPLIT", help="Split(s) to read (repeatable); "
                                                                    "default: every split folder present.")] = None,
    num_classes: Annotated[int | None, typer.Option(metavar="K", help="Classes; from classes.yaml if omitted.")] = None,
    ignore_index: Annotated[int, typer.Option(metavar="ID", help="Ignore label value.")] = 255,
) -> None:
    """Read and validate every file of a dataset; print counts per split."""
    from ddps_core.datasets import open_dataset
    from ddps_core.datasets.readers import split_folders
    from ddps_core.datasets.stage import samples_reporting

    splits = split or list(split_folders(format_, root)) or ["train"]
    table = Table(title=f"{root} ({format_})")
    for col in ("split", "images", "labelled", "sizes", "classes seen"):
        table.add_column(col)
    with RichReporter() as report:
        for name in splits:
            ds = open_dataset(format_, root, name, num_classes=num_classes, ignore_index=ignore_index)
            sizes: set[tuple[int, int]] = set()
            seen: set[int] = set()
            labelled = 0
            for i, sample in enumerate(samples_reporting(ds, report.log), 1):
                sizes.add(sample.image.shape[:2])
                if sample.label is not None:
                    labelled += 1
                    seen.update(int(v) for v in set(sample.label.ravel().tolist()))
                report.progress(f"check {name}", i, len(ds))
            seen.discard(ignore_index)
            size_txt = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4]) + (" ..." if len(sizes) > 4 else "")
            table.add_row(name, str(len(ds)), str(labelled), size_txt, str(len(seen)))
    console.print(table)
    console.print("all files valid")


@data_app.command("add-labels")
def data_add_labels(
    folder: Annotated[Path, typer.Argument(
        metavar="FOLDER", help="A `ddps suggest` batch folder (its corrected prelabels/ and images/), or a folder "
                               "of masks named by image id (palette or colour PNGs in the class colours, grey PNGs or "
                               ".npy of class ids).")],
    images: Annotated[Path | None, typer.Option(metavar="DIR", help="The masks' images, by file name (default: the "
                                                                    "batch's images/, else the pool).")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Check corrected masks (size, colours, class range) and add them to the training split:
    they are kept in data.added and stage data joins them to data.out. Nothing is added when a
    mask is wrong. `dvc repro` (make run) then rebuilds what depends on the training split."""
    from ddps_core.active import add_labels

    s = settings_from(params, defaults, set_)
    with RichReporter() as report:
        summary = add_labels(s, folder, report, images)
    console.print(f"{summary['added']} labels added to {summary['folder']} ({summary['replaced']} replaced); "
                  f"the dataset now has {summary['counts'].get('train', 0)} training images and "
                  f"{summary['counts'].get('unlabeled', 0)} in the pool")
    console.print("next: `dvc repro` (or `make run`) retrains what depends on the training split")


def _print_counts(out: str | Path, summary: dict[str, Any]) -> None:
    table = Table(title=f"dataset in {out}")
    table.add_column("split")
    table.add_column("images", justify="right")
    for split, n in summary.get("counts", {}).items():
        table.add_row(split, str(n))
    console.print(table)


# ----------------------------------------------------------------------------- ddpm
ddpm_app = _group("ddpm", "Stage train_ddpm: train, sample and inspect the diffusion model.")


@ddpm_app.command("train")
def ddpm_train(
    steps: Annotated[int | None, Key("ddpm.steps", "Optimiser steps, in total across resumes.", metavar="N")] = None,
    preset: Annotated[str | None, Key("ddpm.preset", "UNet preset (ddps ddpm presets).", metavar="NAME")] = None,
    time_budget: Annotated[float | None, Key("ddpm.time_budget_s", "Stop after this many seconds.", metavar="SECONDS")] = None,
    out: Annotated[Path | None, Key("ddpm.out", "Output folder.", metavar="DIR")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage train_ddpm: train on the dataset's unlabelled and training images (resuming
    where it stopped), or adopt ddpm.checkpoint; then draw samples.png."""
    s = settings_from(params, defaults, set_, **{"ddpm.steps": steps, "ddpm.preset": preset,
                                                 "ddpm.time_budget_s": time_budget, "ddpm.out": str(out) if out else None})
    summary = run_stage("train_ddpm", s)
    if "steps" in summary:
        console.print(f"diffusion model: {summary['steps']} steps ({summary['steps_this_run']} this run), "
                      f"final loss {summary['final_loss']:.4f} -> {s.ddpm.out}")
    else:
        console.print(f"diffusion model: {s.ddpm.checkpoint} ({s.ddpm.preset}) recorded in {s.ddpm.out}")


@ddpm_app.command("sample")
def ddpm_sample(
    out: Annotated[Path, typer.Option(metavar="FILE", help="PNG grid to write.")] = Path("samples.png"),
    n: Annotated[int, typer.Option("--n", min=1, metavar="N", help="Number of samples.")] = 16,
    steps: Annotated[int | None, Key("ddpm.sample_steps", "Sampling steps.", "--steps", metavar="N")] = None,
    method: Annotated[str | None, Key("ddpm.sample_method", "ancestral or ddim.", "--method", metavar="METHOD")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Sampling seed.")] = 0,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Draw samples from the trained (or adopted) diffusion model as a PNG grid."""
    from ddps_core.device import resolve_device
    from ddps_core.diffusion.gaussian import GaussianDiffusion
    from ddps_core.diffusion.stage import load_trained, sample_grid
    from ddps_core.viz import save_png

    s = settings_from(params, defaults, set_, **{"ddpm.sample_steps": steps, "ddpm.sample_method": method})
    device = resolve_device(s.device)
    model, info = load_trained(s.ddpm.out, device)
    diffusion = GaussianDiffusion.from_name(info["schedule"], info["num_timesteps"])
    if s.ddpm.sample_steps > diffusion.num_timesteps:
        raise ConfigError(f"ddpm.sample_steps: {s.ddpm.sample_steps} is more than the model's "
                          f"{diffusion.num_timesteps} diffusion steps")
    with RichReporter() as report:
        picture = sample_grid(model, diffusion, n, s.ddpm.sample_steps, s.ddpm.sample_method, seed, device,
                              lambda d, total: report.progress("samples", d, total))
    save_png(picture, out)
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
        table.add_row(name, str(cfg.image_size), str(cfg.num_channels), str(cfg.resolved_channel_mult()),
                      str(cfg.attention_resolutions), f"{n_params:,}")
    console.print(table)


# ----------------------------------------------------------------------------- features
features_app = _group("features", "Stage extract: DDPM-Seg feature stores.")


@features_app.command("extract")
def features_extract(
    split: Annotated[list[str] | None, Key("features.splits", "Split(s) (repeatable).", "--split", metavar="SPLIT")] = None,
    out: Annotated[str | None, Key("features.out", "Store folder or fsspec URL.", metavar="DIR")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage extract: each split's features into a Zarr store, resuming shard by shard."""
    s = settings_from(params, defaults, set_, **{"features.splits": split, "features.out": out})
    for name, info in run_stage("extract", s).items():
        _print_store_info(info, title=f"{name}: {info['n_done']}/{info['n_images']} images")


@features_app.command("info")
def features_info(
    store: Annotated[str, typer.Argument(metavar="STORE", help="A feature store (.zarr folder or fsspec URL).")],
    verify: Annotated[bool, typer.Option("--verify", help="Read every done shard and compare its CRC32C with the one recorded when it was written.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="With --verify: mark damaged shards not done, so the next extraction redoes them.")] = False,
) -> None:
    """Layout, size on disk and the ratio to upsampled float32 of a feature store; with
    --verify, whether every done shard reads back as written."""
    from ddps_core.features.stage import reference_footprint
    from ddps_core.features.store import FeatureStore

    here = Path("params.yaml")
    options = settings_from(here, not here.is_file(), None).storage.options  # credentials of a URL
    if not FeatureStore.exists(store, options):
        raise DDPSError(f"{store}: not a feature store (no zarr.json)")
    if repair and not verify:
        raise ConfigError("--repair: only with --verify")
    fs = FeatureStore.open(store, read_only=not repair, storage_options=options, check=False)
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
                  f"{ref['upsampled_float32_bytes_per_image'] / 1e9:.2f} GB upsampled float32 = {ref['ratio']:.1f}x")
    if verify:
        with fs:
            damaged = fs.verify(repair=repair)
        for d in damaged:
            err_console.print(f"{store}: {d}")
        if damaged:
            then = "marked not done: `ddps features extract` redoes them" if repair else \
                "rerun with --repair, then `ddps features extract`, to redo them"
            err_console.print(f"{store}: {len(damaged)} damaged shard(s); {then}")
            raise typer.Exit(1)
        console.print(f"{store}: every done shard reads back as written (CRC32C)")


def _print_store_info(info: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("images done", f"{info['n_done']} / {info['n_images']}")
    table.add_row("feature dim D", str(info["feature_dim"]))
    table.add_row("bytes on disk", f"{info['bytes_on_disk'] / 1e6:.2f} MB")
    table.add_row("per image", f"{info['bytes_per_image'] / 1e6:.3f} MB")
    table.add_row("upsampled float32 per image", f"{info['upsampled_float32_bytes_per_image'] / 1e6:.3f} MB")
    ratio = info.get("ratio")
    table.add_row("ratio", f"{ratio:.2f}x" if ratio else "-")
    console.print(table)


# ----------------------------------------------------------------------------- teacher
teacher_app = _group("teacher", "Stages train_teacher and label: the pixel-MLP teacher and its baselines.")
BaselinesOpt = Annotated[list[str] | None, Key("teacher.baselines", "random_unet or rgbxy (repeatable).",
                                              "--baseline", metavar="NAME")]


@teacher_app.command("train")
def teacher_train(
    baseline: BaselinesOpt = None,
    members: Annotated[int | None, Key("teacher.members", "Ensemble size.", metavar="N")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage train_teacher: the teacher on DDPM-Seg features, then each baseline
    (resuming where it stopped)."""
    s = settings_from(params, defaults, set_, **{"teacher.baselines": baseline, "teacher.members": members})
    table = Table(title="teacher and baselines")
    for col in ("method", "epochs", "stopped because", "feature dim"):
        table.add_column(col)
    for method, rec in run_stage("train_teacher", s).items():
        table.add_row(method, str(rec["epochs"]), str(rec["reason"]).replace("_", " "), str(rec["feature_dim"]))
    console.print(table)


@teacher_app.command("label")
def teacher_label(
    baseline: BaselinesOpt = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage label: the test split with every method, the unlabelled pool with the teacher
    (label PNGs, uncertainty maps and scores.parquet under teacher.labels_out)."""
    s = settings_from(params, defaults, set_, **{"teacher.baselines": baseline})
    table = Table(title=f"labels in {s.teacher.labels_out}")
    for col in ("method/split", "images", "mean uncertainty score"):
        table.add_column(col)
    for name, rec in run_stage("label", s).items():
        table.add_row(name, str(rec["images"]), f"{rec['mean_score']:.4f}")
    console.print(table)


# ----------------------------------------------------------------------------- generate
@app.command("generate")
def generate(
    source: Annotated[str | None, Key("generate.source", "pool, generated or both.", metavar="SOURCE")] = None,
    n: Annotated[int | None, Key("generate.n_samples", "Images to sample.", "--n", metavar="N")] = None,
    steps: Annotated[int | None, Key("generate.sample_steps", "Respaced sampling steps.", metavar="N")] = None,
    method: Annotated[str | None, Key("generate.sample_method", "ancestral or ddim.", metavar="METHOD")] = None,
    format_: Annotated[str | None, Key("generate.format", "folder or ddpm-seg.", "--format", metavar="FORMAT")] = None,
    out: Annotated[Path | None, Key("generate.out", "Export folder.", metavar="DIR")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage generate: sample and / or take the pool, label with the teacher, filter by
    uncertainty, export images, masks and a Parquet manifest."""
    s = settings_from(params, defaults, set_, **{
        "generate.source": source, "generate.n_samples": n, "generate.sample_steps": steps,
        "generate.sample_method": method, "generate.format": format_, "generate.out": str(out) if out else None})
    stats = run_stage("generate", s)
    table = Table(title=f"filtering ({s.generate.filter}) -> {s.generate.out}")
    for col in ("source", "candidates", "kept", "dropped", "scores"):
        table.add_column(col)
    for src, st in stats.items():
        if isinstance(st, dict):
            scores = f"{st['score_min']:.4f} .. {st['score_max']:.4f}" if "score_min" in st else "-"
            table.add_row(src, str(st["candidates"]), str(st["kept"]),
                          ", ".join(f"{k} {v}" for k, v in st["dropped"].items()) or "-", scores)
    console.print(table)
    console.print(f"{stats['total_kept']} labelled images; manifest {Path(s.generate.out) / 'manifest.parquet'}")


# ----------------------------------------------------------------------------- student
student_app = _group("student", "Stage train_student: the distilled segmentor.")


@student_app.command("train")
def student_train(
    arch: Annotated[str | None, Key("student.arch", "deeplabv3plus or segformer.", metavar="ARCH")] = None,
    encoder: Annotated[str | None, Key("student.encoder", "Encoder of the architecture.", metavar="NAME")] = None,
    epochs: Annotated[int | None, Key("student.epochs", "Epochs.", metavar="N")] = None,
    source: Annotated[str | None, Key("student.source", "generated or labelled.", metavar="SOURCE")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage train_student: train on the generated dataset (student.source: generated,
    selected by mIoU on the real labelled images) or on the dataset's labelled training split
    (labelled: random crops at its own resolution, the last weights), resuming after the last
    finished epoch; then predict the test split."""
    overrides: dict[str, Any] = {"student.arch": arch, "student.encoder": encoder, "student.epochs": epochs}
    if source is not None:  # student.train_data (the folder DVC tracks) follows the source
        first = settings_from(params, defaults, set_)
        overrides.update({"student.source": source, "student.train_data": first.generate.out
                          if source == "generated" else str(Path(first.data.out) / "real" / "train")})
    s = settings_from(params, defaults, set_, **overrides)
    info = run_stage("train_student", s)
    console.print(f"student {info['arch']}/{info['encoder']}: epoch {info['best_epoch']} selected; test mIoU "
                  f"{percent(info['test_miou'])}, mBIoU {percent(info['test_mbiou'])} -> {s.student.out}")


# ----------------------------------------------------------------------------- refiner
refiner_app = _group("refiner", "Stages train_refiner and refine: the DDPS mask-prior refiner.")


@refiner_app.command("train")
def refiner_train(
    steps: Annotated[int | None, Key("refiner.steps", "Optimiser steps.", metavar="N")] = None,
    preset: Annotated[str | None, Key("refiner.preset", "Denoiser preset.", metavar="NAME")] = None,
    timesteps: Annotated[int | None, Key("refiner.num_timesteps", "T, the diffusion steps.", "--timesteps", metavar="T")] = None,
    data: Annotated[str | None, Key("refiner.data", "generated or real.", metavar="DATA")] = None,
    ablation: Annotated[bool | None, typer.Option("--ablation/--no-ablation", show_default=False, help=key_help(
        "refiner.ablation", "Also train the x0 = ground-truth ablation."))] = None,
    time_budget: Annotated[float | None, Key("refiner.time_budget_s", "Stop each model after this many seconds.",
                                             metavar="SECONDS")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage train_refiner: the denoiser on the frozen student (Diffusion-on-First-
    Prediction), resuming from its last checkpoint."""
    s = settings_from(params, defaults, set_, **{
        "refiner.steps": steps, "refiner.preset": preset, "refiner.num_timesteps": timesteps, "refiner.data": data,
        "refiner.ablation": ablation, "refiner.time_budget_s": time_budget})
    summary = run_stage("train_refiner", s)
    table = Table(title=f"refiner ({summary['data']}: {summary['n_images']} images, {summary['image_size']} px)")
    for col in ("model", "x0", "steps", "this run", "final loss", "folder"):
        table.add_column(col)
    for method, m in summary["models"].items():
        loss = "-" if m["final_loss"] is None else f"{m['final_loss']:.4f}"
        table.add_row(method, m["x0_source"], str(m["steps"]), str(m["steps_this_run"]), loss, m["out"])
    console.print(table)


@refiner_app.command("refine")
def refiner_refine(
    steps: Annotated[int | None, Key("refiner.refine_steps", "n, the refinement steps.", "--steps", metavar="N")] = None,
    guidance: Annotated[float | None, Key("refiner.guidance", "w, the guidance weight.", metavar="W")] = None,
    report_steps: Annotated[str | None, Key("refiner.report_steps", "The run steps to write and score, "
                                            "e.g. \"0, 10, 19\" (default: every run step).",
                                            metavar="STEPS")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage refine: refine the test split (Free-Re-noising) and score the student and the
    reported steps of each refiner."""
    s = settings_from(params, defaults, set_, **{"refiner.refine_steps": steps, "refiner.guidance": guidance,
                                                 "refiner.report_steps": report_steps})
    rows = run_stage("refine", s)["steps"]
    table = Table(title=f"refinement (n = {s.refiner.refine_steps}, w = {s.refiner.guidance})")
    columns = list(rows[0]) if rows else []
    for col in columns:
        table.add_column(str(col), justify="left" if col == "method" else "right")
    for row in rows:
        table.add_row(*(str(v) if k == "method" else "-" if v != v else f"{v:.2f}" for k, v in row.items()))
    console.print(table)


@refiner_app.command("info")
def refiner_info(
    preset: Annotated[str | None, Key("refiner.preset", "Denoiser preset.", metavar="NAME")] = None,
    timesteps: Annotated[int | None, Key("refiner.num_timesteps", "T, the diffusion steps.", "--timesteps", metavar="T")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Describe the configured denoiser and the reference DDPS-SegFormer-B2 one (K = 150,
    C = 256): shape and parameter counts by part."""
    from ddps_core.refiner.stage import info

    s = settings_from(params, defaults, set_, **{"refiner.preset": preset, "refiner.num_timesteps": timesteps})
    entries = info(s)
    table = Table(title="denoisers")
    for col in ("denoiser", "K", "C", "width", "mult", "blocks", "parameters"):
        table.add_column(col, justify="left" if col == "denoiser" else "right")
    for e in entries:
        c = e["config"]
        table.add_row(e["name"], str(c["num_classes"]), str(c["feature_channels"]), str(c["width"]),
                      ",".join(str(m) for m in c["channel_mult"]), str(c["num_res_blocks"]),
                      f"{e['parameters']['total']:,}")
    console.print(table)
    for e in entries:
        parts = ", ".join(f"{p} {n:,}" for p, n in e["parameters"].items() if p != "total")
        console.print(f"{e['name']}: {e['description']}\n  by part: {parts}\n  K, C from {e['source']}")
    first = entries[0]
    console.print(f"schedule {first['schedule']}, T = {first['num_timesteps']}; refinement steps "
                  f"{first['refine_steps']}, guidance w = {first['guidance']}")


# ----------------------------------------------------------------------------- evaluate
@app.command("evaluate")
def evaluate(
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage evaluate: score the teacher, the baselines and the student on the test split
    (evaluate.parquet, metrics, per-class plot tables, overlays under evaluate.reports)."""
    s = settings_from(params, defaults, set_)
    summary = run_stage("evaluate", s)
    table = Table(title="test split (%)")
    for col in ("method", "mIoU", "mBIoU", "aAcc", "mAcc"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, m in summary.items():
        table.add_row(method, *(f"{m[k]:.2f}" for k in ("miou", "mbiou", "aacc", "macc")))
    console.print(table)


@app.command("report")
def report_command(
    overlays: Annotated[int | None, Key("report.overlays", "Overlay pictures per method.", metavar="N")] = None,
    refinement: Annotated[int | None, Key("report.refinement", "Test images in the refinement picture.",
                                          metavar="N")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Run stage report: the plot tables (one column per method) and the pictures (overlays,
    the refinement picture) of the evaluate and refine reports."""
    s = settings_from(params, defaults, set_, **{"report.overlays": overlays, "report.refinement": refinement})
    run_stage("report", s)


@app.command("predict")
def predict(
    inputs: Annotated[list[str], typer.Argument(
        metavar="INPUT", show_default=False,
        help="Image files (png, jpg, jpeg, webp, tif, tiff), folders (searched recursively) or fsspec URLs "
             "(s3://bucket/photos/, s3://bucket/*.jpg, file:///...).")],
    out: Annotated[str, typer.Option(metavar="DIR", help="Output folder or URL: masks/, overlays/, uncertainty/, "
                                                         "predictions.parquet.")],
    model: Annotated[str, typer.Option(metavar="MODEL", help="teacher, student or refiner.")] = "student",
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write overlays/: the image in the class colours, "
                                                            "with a legend.")] = False,
    uncertainty: Annotated[bool, typer.Option("--uncertainty", help="Also write uncertainty/: heat maps, when the "
                                                                    "model gives them (teacher, refiner).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="Images handed to the model at once.")] = 16,
    device: Annotated[str | None, Key("device", "auto, cpu or cuda.", metavar="DEVICE")] = None,
    num_classes: Annotated[int | None, Key("data.num_classes", "The class count the model must have.",
                                           metavar="K")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Masks for any images with a trained model of this project, at each image's own size:
    masks/<name>.png (palette PNG of class ids), optional overlays and uncertainty maps, and
    predictions.parquet. A rerun reuses the masks of unchanged images and the same model;
    an unreadable image is one error line, and the exit status is 1 after the others are
    written."""
    from ddps_core.predict import predict_images

    s = settings_from(params, defaults, set_, **{"device": device, "data.num_classes": num_classes})
    with RichReporter() as report:
        summary = predict_images(s, inputs, model, out, overlay=overlay, uncertainty=uncertainty,
                                 batch_size=batch_size, report=report)
    console.print(f"{summary['model']} ({summary['model_id']}, {summary['num_classes']} classes): "
                  f"{summary['predicted']} predicted, {summary['reused']} reused of {summary['images']} images")
    for key in ("masks", "overlays", "uncertainty", "table"):
        if summary.get(key):
            console.print(f"  {key:<12}{summary[key]}")
    if summary["failed"]:
        err_console.print(f"[bold red]error:[/bold red] {summary['failed']} of {summary['images']} images could not "
                          "be read (named above); the other images' outputs are written", soft_wrap=True)
        raise typer.Exit(1)


@app.command("suggest")
def suggest(
    n: Annotated[int, typer.Option("--n", min=1, metavar="K", help="Images to pick.")] = 10,
    out: Annotated[Path, typer.Option(metavar="DIR", help="The batch folder: images/, prelabels/, uncertainty/, "
                                                          "suggestions.parquet, a CVAT import zip.")] = Path("data/suggested"),
    candidates: Annotated[int | None, typer.Option(min=1, metavar="M", help="Pick among the M most uncertain "
                                                                            "pool images (default 4 K).")] = None,
    near_copy: Annotated[float, typer.Option(min=0.0, metavar="D", help="Descriptor distance under which an image "
                                                                        "is a near-copy of a pick.")] = 0.05,
    device: Annotated[str | None, Key("device", "auto, cpu or cuda.", metavar="DEVICE")] = None,
    params: ParamsOpt = Path("params.yaml"), defaults: DefaultsOpt = False, set_: SetOpt = None,
) -> None:
    """Which pool images to label next: the teacher's most uncertain images, diverse in their
    DDPM features, with its pre-labels to correct. Then `ddps data add-labels DIR`."""
    from ddps_core.active import suggest as run_suggest

    s = settings_from(params, defaults, set_, device=device)
    with RichReporter() as report:
        summary = run_suggest(s, n, out, report, candidates=candidates, near_copy=near_copy)
    table = Table(title=f"{summary['picked']} of {summary['pool']} pool images to label ({out})")
    for col in ("rank", "image", "score", "why"):
        table.add_column(col)
    for row in summary["picks"]:
        table.add_row(str(row["rank"]), row["image_id"], f"{row['score']:.4f}", row["why"])
    console.print(table)
    console.print(f"correct {out}/prelabels/ (or import {summary['cvat']} into CVAT), then `ddps data add-labels {out}`")


@app.command("score")
def score(
    pred: Annotated[Path, typer.Option(metavar="DIR", help="Predictions: PNG or .npy label maps, matched by stem.")],
    gt: Annotated[Path, typer.Option(metavar="DIR", help="Ground truth: PNG or .npy label maps.")],
    num_classes: Annotated[int, typer.Option(min=1, metavar="K", help="Number of classes.")],
    out: Annotated[Path, typer.Option(metavar="FILE", help="Parquet report to write.")],
    ignore_index: Annotated[int | None, Key("data.ignore_index", "Ignore label.", metavar="ID")] = None,
    names: Annotated[Path | None, typer.Option(metavar="FILE", help="classes.yaml with class names.")] = None,
    boundary_ratio: Annotated[float | None, Key("evaluate.boundary_ratio", "Band width / image diagonal.",
                                                metavar="RATIO")] = None,
    figures: Annotated[Path | None, typer.Option(metavar="DIR", help="Write image | truth | prediction PNGs here.")] = None,
    images: Annotated[Path | None, typer.Option(metavar="DIR", help="Images for --figures (default: the --gt folder).")] = None,
    max_figures: Annotated[int, typer.Option(metavar="N", help="At most this many figures.")] = 16,
) -> None:
    """Score any predictions against any labels: mIoU, mBIoU, aAcc, mAcc, per class and image.
    The metric conventions are those of params.yaml when there is one, else the defaults. An
    ignore index below --num-classes ignores that class id (bedroom_28: --ignore-index 0)."""
    from ddps_core.metrics import evaluate_dirs, load_class_names, report_frame, write_report

    here = Path("params.yaml")
    s = settings_from(here, not here.is_file(), None, **{
        "data.ignore_index": ignore_index, "evaluate.boundary_ratio": boundary_ratio})
    # an ignore index below --num-classes is that class ignored: never scored (docs/method.md)
    class_names = load_class_names(names) if names else None
    if class_names is not None and len(class_names) != num_classes:
        raise DDPSError(f"{names}: lists {len(class_names)} class names, --num-classes is {num_classes}")
    with RichReporter() as report:
        result = evaluate_dirs(pred, gt, num_classes, ignore_index=s.data.ignore_index,
                               boundary_ratio=s.evaluate.boundary_ratio,
                               progress=lambda done, total: report.progress("score", done, total))
    frame = report_frame(result, class_names)
    write_report(frame, out)
    print_report(frame)
    console.print(f"report: {out}")
    if figures is not None:
        from ddps_core.viz.pictures import write_overlays

        paths = write_overlays(pred, gt, images or gt, figures, max_figures, s.data.ignore_index)
        console.print(f"{len(paths)} overlay figures in {figures}")


def print_report(frame: Any, title: str = "segmentation report") -> None:
    """Per-class and summary tables of a report frame (percent)."""
    classes = frame[frame["scope"] == "class"]
    table = Table(title=title)
    for col in ("id", "class", "IoU", "bIoU", "Acc"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for row in classes.itertuples():
        table.add_row(str(row.class_id), str(row.class_name), percent(row.iou), percent(row.biou), percent(row.acc))
    summary = frame[frame["scope"] == "summary"].iloc[0]
    table.add_section()
    table.add_row("", "mean", percent(summary["miou"]), percent(summary["mbiou"]), percent(summary["macc"]))
    console.print(table)
    console.print(f"mIoU {percent(summary['miou'])}  mBIoU {percent(summary['mbiou'])}  "
                  f"aAcc {percent(summary['aacc'])}  mAcc {percent(summary['macc'])}")


# ----------------------------------------------------------------------------- deploy
@app.command("deploy")
def deploy(
    gpu_limit: Annotated[int, typer.Option("--gpu-limit", min=1, metavar="N",
                                           help="Concurrent task runs tagged gpu (server-wide).")] = 1,
    pools: Annotated[bool, typer.Option("--pools/--no-pools", help="Create the cpu and gpu work pools.")] = True,
    name: Annotated[list[str] | None, typer.Option("--name", "-n", metavar="NAME",
                                                   help="Deploy only this deployment (repeatable).")] = None,
    project: Annotated[Path, typer.Option(metavar="DIR", help="The deployments' working_dir: the project "
                                                              "folder (params.yaml, data/).")] = Path("."),
) -> None:
    """Create the work pools, the gpu concurrency limit and the deployments of prefect.yaml on
    the Prefect server at PREFECT_API_URL (idempotent)."""
    from flows.deploy import GPU_TAG, POOL_TYPE, deploy as make

    result = make(project, gpu_limit=gpu_limit, pools=pools, names=name)
    console.print(f"Prefect API {result.api_url}")
    for pool, what in result.pools.items():
        console.print(f"work pool {pool} ({POOL_TYPE}): {what}")
    console.print(f"concurrency limit on tag {GPU_TAG!r}: {result.gpu_limit}")
    for line in result.deployments:
        console.print(f"deployment {line}")
    console.print(f"working_dir {Path(project).resolve()}; start workers with "
                  "`prefect worker start --pool cpu` and `--pool gpu`")


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Usage errors (a bad option value, a missing option), bad
    input and file-system faults print one ``error:`` line (see
    :func:`ddps.console.run_guarded`); usage errors exit with status 2."""
    args = sys.argv[1:] if argv is None else argv
    sys.exit(run_guarded(lambda: app(args=args, prog_name="ddps", standalone_mode=False), debug="--debug" in args))


__all__ = ["app", "err_console", "main", "settings_from"]
