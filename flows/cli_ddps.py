"""``ddps ddps ...``: train the DDPS mask prior, refine the test split, describe the denoiser.

Registered on the main app at the end of :mod:`flows.cli` (``app.add_typer(ddps_app,
name="ddps")``), whose shared helpers (settings, progress bars, consoles) it uses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

ddps_app = typer.Typer(help="Train the DDPS mask prior on the student, refine, describe.", no_args_is_help=True)

# After ddps_app exists: flows.cli imports this module at its end, in either import order.
from flows.cli import ParamsOpt, SetOpt, _pct, console, err_console, progress_bar, settings_from  # noqa: E402


def _shape_options(preset: str | None, width: int | None, timesteps: int | None) -> dict[str, Any]:
    return {"refiner.preset": preset, "refiner.width": width, "refiner.num_timesteps": timesteps}


@ddps_app.command("train")
def ddps_train(
    steps: Annotated[int | None, typer.Option(help="Optimiser steps [params: refiner.steps].")] = None,
    preset: Annotated[str | None, typer.Option(help="Denoiser preset [params: refiner.preset].")] = None,
    width: Annotated[int | None, typer.Option(help="Denoiser width [params: refiner.width].")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", help="T [params: refiner.num_timesteps].")] = None,
    data: Annotated[str | None, typer.Option(help="generated | real [params: refiner.data].")] = None,
    x0_source: Annotated[str | None, typer.Option(help="first_prediction | gt [params: refiner.x0_source].")] = None,
    ablation: Annotated[bool | None, typer.Option("--ablation/--no-ablation",
                                                  help="Also train x0 = gt [params: refiner.ablation].")] = None,
    time_budget: Annotated[float | None, typer.Option(help="Stop after this many seconds per model.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder [params: refiner.out].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train the DDPS denoiser on the frozen student (Diffusion-on-First-Prediction) and, with
    the ablation, its x0 = ground-truth twin; resumes from the last checkpoint."""
    from ddps_core.refiner.stage import run_train

    s = settings_from(params, set_, **_shape_options(preset, width, timesteps),
                      **{"refiner.steps": steps, "refiner.data": data, "refiner.x0_source": x0_source,
                         "refiner.ablation": ablation, "refiner.time_budget_s": time_budget,
                         "refiner.out": str(out) if out else None})
    bars: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        def on_step(method: str, info: Any) -> None:
            if method not in bars:
                bars[method] = stack.enter_context(progress_bar(method, info.total))
            bars[method](info.step)
            if info.step % (s.refiner.log_every * 10) == 0 or info.step == info.total:
                err_console.print(f"{method} step {info.step} ({info.stage}): loss {info.loss:.4f} "
                                  f"lr {info.lr:.2e} {info.images_per_s:.1f} img/s")

        summary = run_train(s, on_step=on_step, log=err_console.print)
    table = Table(title=f"DDPS denoisers ({summary['data']}: {summary['n_images']} images, "
                        f"{summary['image_size']} px)")
    for col in ("method", "x0", "steps", "this run", "final loss", "seconds", "folder"):
        table.add_column(col)
    for method, m in summary["models"].items():
        loss = "-" if m["final_loss"] is None else f"{m['final_loss']:.4f}"
        table.add_row(method, m["x0_source"], str(m["steps"]), str(m["steps_this_run"]), loss,
                      f"{m['wall_s']:.1f}", m["out"])
    console.print(table)


@ddps_app.command("refine")
def ddps_refine(
    steps: Annotated[int | None,
                     typer.Option("--steps", help="n refinement steps [params: refiner.refine_steps].")] = None,
    guidance: Annotated[float | None, typer.Option(help="w [params: refiner.guidance].")] = None,
    out: Annotated[Path | None, typer.Option(help="Label PNG folder [params: refiner.refined_out].")] = None,
    report: Annotated[Path, typer.Option(help="Parquet report to write.")] = Path("reports/ddps.parquet"),
    metrics: Annotated[Path, typer.Option(help="DVC metrics JSON to write.")] = Path("reports/metrics/ddps.json"),
    figures: Annotated[Path, typer.Option(help="Folder of the refinement picture.")] = Path("reports/figures"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Refine the real test split with Free-Re-noising and score the student alone and every
    step of each DDPS model: label PNGs, the report, metrics and the refinement picture."""
    from ddps_core.refiner.stage import run_refine, step_table

    s = settings_from(params, set_, **{"refiner.refine_steps": steps, "refiner.guidance": guidance,
                                       "refiner.refined_out": str(out) if out else None})
    with progress_bar("refine", None) as update:
        df = run_refine(s, progress=lambda d, _n: update(d), log=err_console.print, report=report,
                        metrics=metrics, figures=figures)
    print_step_table(step_table(df), title=f"DDPS refinement (n = {s.refiner.refine_steps}, w = {s.refiner.guidance})")
    console.print(f"report: {report}; labels: {s.refiner.refined_out}")


def print_step_table(table: Any, title: str = "DDPS refinement") -> None:
    """The step table (:func:`ddps_core.refiner.stage.step_table`) as a rich table."""

    t = Table(title=title)
    for col in table.columns:
        t.add_column(str(col), justify="left" if col == "method" else "right")
    for row in table.to_dict("records"):
        t.add_row(*(str(v) if k == "method" else _pct(v / 100.0) if v == v else "-" for k, v in row.items()))
    console.print(t)


@ddps_app.command("info")
def ddps_info(
    preset: Annotated[str | None, typer.Option(help="Denoiser preset [params: refiner.preset].")] = None,
    width: Annotated[int | None, typer.Option(help="Denoiser width [params: refiner.width].")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", help="T [params: refiner.num_timesteps].")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Describe the configured denoiser on our data and the DDPS-SegFormer-B2 reference
    preset (K = 150, C = 256): shape and parameter counts by part."""
    from ddps_core.refiner.stage import info

    s = settings_from(params, set_, **_shape_options(preset, width, timesteps))
    entries = info(s)
    table = Table(title="DDPS denoisers")
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
