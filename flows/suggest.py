"""Flow ``suggest``: the next pool images to label, the same run as ``ddps suggest``
(:func:`ddps_core.active.suggest`) as one task on the ``gpu`` pool. The batch is published as
the run's artifacts: ``suggest-batch``, a markdown table of the picked images with their
pre-labels and uncertainty maps (thumbnails) and why each was picked, and
``suggest-summary``. A team picks the batch folder up from the UI's Artifacts tab, corrects
the pre-labels and runs ``ddps data add-labels`` on it."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.common import settings_for
from tasks.suggest import suggest_task

__all__ = ["batch_markdown", "suggest"]

THUMB = 96  # pixels of the longer side of a thumbnail in the artifact


def _thumb(path: Path) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return f"![{path.name}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')})"


def batch_markdown(summary: dict[str, Any]) -> str:
    """The ``suggest-batch`` page: where the batch is, what to do with it, and one table row
    per pick (rank, image, pre-label, uncertainty, score, why)."""
    out = Path(summary["out"])
    lines = [f"# {summary['picked']} images to label", "",
             f"Batch folder `{out}` (pool of {summary['pool']}, teacher `{summary['teacher']}`): correct "
             f"`prelabels/` (or import `{Path(summary['cvat']).name}` into CVAT as *Segmentation mask 1.1*), then "
             f"run `ddps data add-labels {out}` and `dvc repro`.", "",
             "| rank | image | pre-label | uncertainty | score | why |", "|---|---|---|---|---|---|"]
    for row in summary["picks"]:
        name = f"{row['image_id']}.png"
        cells = [_thumb(out / sub / name) for sub in ("images", "prelabels", "uncertainty")]
        lines.append(f"| {row['rank']} | {cells[0]}<br>`{row['image_id']}` | {cells[1]} | {cells[2]} | "
                     f"{row['score']:.4f} | {row['why']} |")
    return "\n".join(lines) + "\n"


@flow(name="suggest", log_prints=True)
def suggest(n: int = 10, out: str = "data/suggested", candidates: int | None = None, near_copy: float = 0.05,
            overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Pick ``n`` pool images to label into the batch folder ``out`` (images/, prelabels/,
    uncertainty/, suggestions.parquet, a CVAT import zip) and publish the batch as artifacts.
    ``overrides``: other settings, as ``ddps --set`` takes them."""
    settings = settings_for(params_path, overrides)
    summary = suggest_task(settings, n, out, candidates, near_copy)
    try:
        create_markdown_artifact(batch_markdown(summary), key="suggest-batch",
                                 description=f"The {summary['picked']} pool images to label next")
        create_table_artifact([{k: v for k, v in row.items()} for row in summary["picks"]], key="suggest-summary",
                              description="The picks: rank, image, score, why")
    except Exception as exc:  # the artifacts are a courtesy: the batch folder is written
        get_run_logger().warning("suggest: artifacts not published: %s", exc)
    return summary
