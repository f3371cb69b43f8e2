"""Flow ``predict``: masks for any images with a trained model of the project, the same run
as ``ddps predict`` (:func:`ddps_core.predict.predict_images`) as one task on the ``gpu``
pool; its summary and pictures are the run's artifacts (``predict-summary``,
``predict-outputs``). Images that cannot be read fail the run after the others are written
and the artifacts published, with a message naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from ddps_core.errors import DataError
from flows.artifacts import publish
from flows.common import settings_for
from tasks.predict import predict_task

__all__ = ["predict"]


@flow(name="predict", log_prints=True)
def predict(inputs: list[str], out: str = "predictions", model: str = "student", overlay: bool = False,
            uncertainty: bool = False, batch_size: int = 16, device: str | None = None, num_classes: int | None = None,
            overrides: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Predict ``inputs`` (image files, folders, fsspec URLs) with ``model`` (teacher, student,
    refiner) into ``out``: masks/, overlays/ (``overlay``), uncertainty/ (``uncertainty``),
    predictions.parquet. ``device`` and ``num_classes`` set the ``device`` and
    ``data.num_classes`` settings; ``overrides`` any other, as ``ddps --set`` takes them."""
    extra = {"device": device, "data.num_classes": num_classes}
    settings = settings_for(params_path, {**(overrides or {}), **{k: v for k, v in extra.items() if v is not None}})
    summary = predict_task(settings, list(inputs), model, out, overlay, uncertainty, batch_size)
    outputs = [summary[k] for k in ("table", "masks", "overlays", "uncertainty") if summary.get(k)]
    try:
        publish("predict", summary, [Path(p) for p in summary["pictures"]], outputs)
    except Exception as exc:  # the artifacts are a courtesy: the masks are written
        get_run_logger().warning("predict: artifacts not published: %s", exc)
    if summary["failed"]:
        named = "; ".join(f["error"] for f in summary["failures"][:3])
        raise DataError(f"{summary['failed']} of {summary['images']} images could not be read (the others are "
                        f"written): {named}" + (" ..." if summary["failed"] > 3 else ""))
    return summary
