"""What a stage's flow run publishes in the Prefect UI (the Artifacts tab): a table of its
summary, and a markdown page of its pictures and outputs.

Both are built from the summary the stage returns, so that no flow needs to know what a
stage computes: a summary is a mapping whose values are numbers and strings, mappings of
them (one row each: a method, a split), or lists of such mappings (the refine step table).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

__all__ = ["PICTURE_BYTES", "publish", "summary_rows"]

#: Pictures up to this size are embedded in the markdown page; larger ones are linked by path.
PICTURE_BYTES = 400_000


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # the table artifact is JSON: NaN is not a value there
    return round(value, 4) if isinstance(value, float) else value


def summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a stage's summary: its scalars as one row, each mapping of scalars as a
    row named by its key, each list of mappings as its rows; deeper values are left out."""
    scalars = {k: _cell(v) for k, v in summary.items() if _scalar(v)}
    rows = [{"name": "summary", **scalars}] if scalars else []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            flat = {k: _cell(v) for k, v in value.items() if _scalar(v)}
            if flat:
                rows.append({"name": str(key), **flat})
            for sub, inner in value.items():
                if isinstance(inner, Mapping) and any(_scalar(v) for v in inner.values()):
                    rows.append({"name": f"{key}/{sub}", **{k: _cell(v) for k, v in inner.items() if _scalar(v)}})
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            rows.extend({k: _cell(v) for k, v in row.items() if _scalar(v)} for row in value)
    return rows


def _picture(path: Path) -> str:
    if path.stat().st_size <= PICTURE_BYTES:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{path.name}](data:image/png;base64,{data})"
    return f"`{path}` ({path.stat().st_size // 1000} kB)"


def publish(stage: str, summary: Mapping[str, Any], pictures: list[Path], outputs: list[str]) -> None:
    """The table and the markdown page of ``stage``'s run (keys ``<stage>-summary`` and
    ``<stage>-outputs``: the UI keeps each key's history across runs)."""
    key = stage.replace("_", "-")
    rows = summary_rows(summary)
    if rows:
        create_table_artifact(rows, key=f"{key}-summary", description=f"Stage {stage}: its summary")
    lines = [f"# Stage {stage}", ""]
    if outputs:
        lines += ["## Outputs", "", *(f"- `{o}`" for o in outputs), ""]
    shown = [p for p in pictures if p.is_file() and p.suffix.lower() == ".png"]
    if shown:
        lines += ["## Pictures", ""]
        for path in shown:
            lines += [f"**{path.name}**", "", _picture(path), ""]
    create_markdown_artifact("\n".join(lines), key=f"{key}-outputs", description=f"Stage {stage}: pictures and outputs")
