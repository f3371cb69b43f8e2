"""Predictions for any images with a trained model of a workspace: ``ddps predict``, the
``predict`` flow and :func:`ddps.load` all run :func:`~ddps_core.predict.run.predict_images`
or its pieces (docs/predict.md)."""

from ddps_core.predict.inputs import IMAGE_SUFFIXES, ImageInput, collect_inputs
from ddps_core.predict.run import TABLE, predict_images, read_table, require_trained, workspace_settings

__all__ = ["IMAGE_SUFFIXES", "TABLE", "ImageInput", "collect_inputs", "predict_images", "read_table",
           "require_trained", "workspace_settings"]
