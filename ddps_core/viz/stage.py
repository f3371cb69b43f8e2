"""Stage ``report``: the pictures and plot tables of the scores, and nothing else, so that
changing how many pictures to draw reruns this stage alone.

It reads what ``evaluate`` and ``refine`` wrote (their Parquet reports and the label PNGs of
every method; either report may be missing, and then its part is not drawn) and writes,
under ``evaluate.reports``::

    plots/per_class_iou.csv     class_name, then one column per method: IoU in percent (the
                                refiner's at its last refinement step, from the refine report)
    plots/per_class_biou.csv    the same with Boundary IoU
    plots/refine_steps.csv      step, then one column per method: mIoU in percent at that
                                refinement step (the student, which has no step, on every row)
    plots/refine_steps_mbiou.csv  the same with mBIoU
    figures/per_class_iou.png   the per-class table as grouped bars, one colour per method
    figures/refine_steps.png    mIoU and mBIoU per refinement step, one line per method
    figures/overlays/<method>_<id>.png  image | truth | prediction [| uncertainty]
    figures/refinement.png      image | student | step i ... | truth, one row per image

One column per method, in a fixed set of columns (a method that did not run is an empty
column), so that DVC draws every method of a table as one series of one chart.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddps_core import storage
from ddps_core.config import Settings
from ddps_core.datasets import DDPMSegFolder, load_image, to_square
from ddps_core.datasets.common import png_bytes
from ddps_core.errors import DataError
from ddps_core.progress import Reporter
from ddps_core.stages import Stage

__all__ = ["METHODS", "REPORT", "locations", "per_class_tables", "refine_step_tables"]

#: Every method a report can hold, in the order of the columns.
METHODS = ("teacher", "random_unet", "rgbxy", "student", "refiner", "refiner-gt")


def locations(settings: Settings) -> dict[str, Any]:
    """Where stage ``report`` writes, under ``evaluate.reports`` (a folder or a URL)."""
    base = settings.evaluate.reports
    return {"per_class_iou": storage.join(base, "plots", "per_class_iou.csv"),
            "per_class_biou": storage.join(base, "plots", "per_class_biou.csv"),
            "refine_steps": storage.join(base, "plots", "refine_steps.csv"),
            "refine_steps_mbiou": storage.join(base, "plots", "refine_steps_mbiou.csv"),
            "per_class_chart": storage.join(base, "figures", "per_class_iou.png"),
            "steps_chart": storage.join(base, "figures", "refine_steps.png"),
            "overlays": storage.join(base, "figures", "overlays"),
            "refinement": storage.join(base, "figures", "refinement.png")}


def _read(path: Any, options: dict[str, Any]) -> pd.DataFrame | None:
    if not storage.exists(path, options):
        return None
    return pd.read_parquet(io.BytesIO(storage.read_bytes(path, options)))


def _columns(frame: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """``frame`` with exactly the columns of :data:`METHODS` (in order) after ``methods``'
    leading key columns; a method that did not run is an empty column."""
    for m in METHODS:
        if m not in frame.columns:
            frame[m] = np.nan
    return frame[[*methods, *METHODS]]


def per_class_tables(evaluate_report: pd.DataFrame,
                     refine_report: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """``{"iou": ..., "biou": ...}``: one row per class (``class_id``, ``class_name``), one
    column per method, in percent, from an evaluate report; the refiner's columns from a
    refine report, at each refiner's last step (what it outputs)."""
    parts = [evaluate_report[evaluate_report["scope"] == "class"]]
    if refine_report is not None:
        stepped = refine_report[(refine_report["scope"] == "class") & refine_report["step"].notna()]
        last = stepped.groupby("method")["step"].transform("max")
        parts.append(stepped[stepped["step"] == last].drop(columns="step"))
    rows = pd.concat(parts, ignore_index=True)
    out = {}
    for metric in ("iou", "biou"):
        wide = rows.pivot(index=["class_id", "class_name"], columns="method", values=metric) * 100
        wide = wide.reset_index().sort_values("class_id").reset_index(drop=True)
        wide.columns.name = None
        out[metric] = _columns(wide, ["class_id", "class_name"])
    return out


def refine_step_tables(refine_report: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{"miou": ..., "mbiou": ...}``: one row per refinement step, one column per method,
    in percent, from a refine report; the student (no step) is repeated on every row, the
    line the refinement starts from."""
    rows = refine_report[refine_report["scope"] == "summary"]
    stepped, flat = rows[rows["step"].notna()], rows[rows["step"].isna()]
    out = {}
    for metric in ("miou", "mbiou"):
        wide = stepped.assign(step=stepped["step"].astype("int64")).pivot(index="step", columns="method",
                                                                          values=metric) * 100
        wide = wide.reset_index()
        wide.columns.name = None
        for r in flat.itertuples():
            wide[r.method] = 100 * float(getattr(r, metric))
        out[metric] = _columns(wide, ["step"])
    return out


def _chart_png(draw: Any, size: tuple[float, float]) -> bytes:
    """A matplotlib chart (drawn by ``draw(axes)``) as PNG bytes, with the Agg backend and
    without pyplot, so no display or global figure state is involved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def per_class_chart(table: pd.DataFrame) -> bytes:
    """The per-class IoU table as horizontal grouped bars (PNG)."""
    methods = [m for m in METHODS if table[m].notna().any()]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        n, height = len(table), 0.8 / max(len(methods), 1)
        for j, m in enumerate(methods):
            ax.barh(np.arange(n) + j * height, table[m].fillna(0), height=height, label=m)
        ax.set_yticks(np.arange(n) + 0.4 - height / 2, table["class_name"])
        ax.invert_yaxis()
        ax.set_xlabel("IoU (%)")
        ax.set_xlim(0, 100)
        ax.legend(loc="lower right", fontsize="small")

    return _chart_png(draw, (7, 1.2 + 0.25 * len(table) * max(len(methods), 1) / 2))


def steps_chart(tables: dict[str, pd.DataFrame]) -> bytes:
    """mIoU and mBIoU per refinement step, one line per method (PNG)."""
    def draw(fig: Any) -> None:
        for k, (metric, label) in enumerate((("miou", "mIoU"), ("mbiou", "mBIoU"))):
            ax = fig.add_subplot(1, 2, k + 1)
            table = tables[metric]
            for m in METHODS:
                if table[m].notna().any():
                    ax.plot(table["step"], table[m], marker="o", label=m)
            ax.set_xlabel("refinement step")
            ax.set_ylabel(f"{label} (%)")
            ax.legend(fontsize="small")

    return _chart_png(draw, (9, 3.5))


def _write_csv(path: Any, table: pd.DataFrame, options: dict[str, Any]) -> None:
    storage.write_text(path, table.to_csv(index=False, float_format="%.4f"), options)


def overlays(settings: Settings, method: str, folder: Path, out: Any, limit: int) -> int:
    """``image | truth | prediction [| uncertainty]`` PNGs of the first ``limit`` test images
    predicted in ``folder`` (the uncertainty panel, when ``<id>_uncertainty.png`` exists,
    stretched to the image's own maximum)."""
    from ddps_core.viz import grid, overlay

    reader = DDPMSegFolder(settings.data.out, "test", ignore_index=settings.data.ignore_index)
    ign = settings.data.ignore_index
    for k in range(min(limit, len(reader))):
        sample = reader[k]
        pred = np.asarray(load_image(folder / f"{sample.id}.png"))[..., 0]
        image, gt, pred = _on_square(sample.image, sample.label, pred)
        row = [image, overlay(image, gt, ignore_index=ign), overlay(image, pred, ignore_index=ign)]
        heat_path = folder / f"{sample.id}_uncertainty.png"
        if heat_path.is_file():
            heat = _on_square(sample.image, None, np.asarray(load_image(heat_path)), image.shape[0])[2]
            heat = heat.astype(np.float32)
            row.append((heat * (255.0 / max(float(heat.max()), 1.0))).astype(np.uint8))
        storage.write_bytes(storage.join(out, f"{method}_{sample.id}.png"),
                            png_bytes(grid([row], scale=max(1, 128 // pred.shape[0]))), settings.storage.options)
    return min(limit, len(reader))


def _on_square(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray,
               size: int | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The image, its label and a prediction on one square picture (:func:`to_square`): a
    prediction at the image's own size is squared like the label; a square one (squared
    before) is the picture's size. ``size``: default the prediction's, or for one at the
    image's size its short side, at most 256."""
    pred = np.asarray(pred)
    if pred.shape[:2] == image.shape[:2]:
        size = size or min(256, *pred.shape[:2])
        img, lab = to_square(image, label, size)
        return img, lab, to_square(image, pred if pred.ndim == 2 else pred[..., 0], size)[1]
    size = size or pred.shape[0]
    img, lab = to_square(image, label, size)
    if pred.shape[:2] != (size, size):
        from ddps_core.geometry import resize_label

        pred = resize_label(pred, size, size)
    return img, lab, pred


def refinement_figure(settings: Settings, steps: list[int], limit: int) -> np.ndarray | None:
    """``image | student | step i ... | truth`` of the first ``limit`` test images, from the
    label PNGs stage ``refine`` wrote; None when there is nothing to draw."""
    from ddps_core.metrics.files import load_label_map
    from ddps_core.refiner.sample import refinement_picture

    refined = Path(settings.refiner.refined_out)
    if limit == 0 or not steps or not (refined / "student").is_dir():
        return None
    reader = DDPMSegFolder(settings.data.out, "test", ignore_index=settings.data.ignore_index)
    ids = [reader.ids[k] for k in range(min(limit, len(reader)))]
    samples = [reader[k] for k in range(len(ids))]
    # predictions at each image's size (or squared, from an older run): one square picture size
    first = load_label_map(refined / "student" / f"{ids[0]}.png")
    size = min(256, *(min(x.image.shape[:2]) for x in samples)) if first.shape == samples[0].image.shape[:2] \
        else first.shape[0]

    def squared(folder: Path) -> np.ndarray:
        return np.stack([_on_square(x.image, None, load_label_map(folder / f"{x.id}.png"), size)[2] for x in samples])

    pairs = [to_square(x.image, x.label, size) for x in samples]
    masks = {s: squared(refined / "refiner" / f"step_{s}") for s in steps}
    return refinement_picture(np.stack([p[0] for p in pairs]), masks, gt=np.stack([p[1] for p in pairs]),
                              base=squared(refined / "student"), ignore_index=settings.data.ignore_index)


def report(settings: Settings, report: Reporter) -> dict[str, Any]:
    """Stage ``report``: the plot tables and the pictures (see the module text)."""
    from ddps_core.metrics.stage import prediction_folders, report_locations

    where, options, cfg = locations(settings), settings.storage.options, settings.report
    scores = _read(report_locations(settings)["report"], options)
    refined = _read(report_locations(settings, "refine")["report"], options)
    if scores is None and refined is None:
        raise DataError(f"{report_locations(settings)['report']}: no report to draw; run the evaluate stage "
                        "(and the refine stage) first")
    if scores is not None:
        tables = per_class_tables(scores, refined)
        _write_csv(where["per_class_iou"], tables["iou"], options)
        _write_csv(where["per_class_biou"], tables["biou"], options)
        storage.write_bytes(where["per_class_chart"], per_class_chart(tables["iou"]), options)
    steps: list[int] = []
    if refined is not None:
        step_tables = refine_step_tables(refined)
        _write_csv(where["refine_steps"], step_tables["miou"], options)
        _write_csv(where["refine_steps_mbiou"], step_tables["mbiou"], options)
        storage.write_bytes(where["steps_chart"], steps_chart(step_tables), options)
        steps = [int(s) for s in step_tables["miou"]["step"]]
    folders = prediction_folders(settings) if scores is not None else {}
    drawn = 0
    for k, (method, folder) in enumerate(folders.items()):
        report.progress("overlays", k, len(folders))
        drawn += overlays(settings, method, folder, where["overlays"], cfg.overlays)
    report.progress("overlays", len(folders), len(folders))
    picture = refinement_figure(settings, steps, cfg.refinement)
    if picture is not None:
        storage.write_bytes(where["refinement"], png_bytes(picture), options)
    report.log(f"{drawn} overlays, {'a' if picture is not None else 'no'} refinement picture and the charts and plot "
               f"tables of the {' and '.join(n for n, r in (('evaluate', scores), ('refine', refined)) if r is not None)} "
               f"report in {settings.evaluate.reports}")
    return {"overlays": drawn, "refinement_picture": picture is not None}


REPORT = Stage("report", main=report, device="cpu",
               products=lambda s: [str(v) for v in locations(s).values()])
