"""Prefect tasks of the ``train_ensemble``, ``label`` and ``evaluate`` stages."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ddps_core.config import Settings
from ddps_core.teacher.stage import (finish_label_split, label_split, label_split_parts, plan_label_split,
                                   run_evaluate, train_method)
from tasks.common import every, retry_unless_user_error


@task(name="train-ensemble", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def train_ensemble_task(settings: Settings, method: str) -> dict[str, Any]:
    """Train ``method``'s ensemble (a retry resumes from its checkpoint)."""
    rec = train_method(settings, method)
    get_run_logger().info("%s: %d epochs (%s) in %.0f s", method, rec["epochs"], rec["reason"], rec["seconds"])
    return {k: rec[k] for k in ("epochs", "reason", "seconds", "feature_dim")}


@task(name="label-split", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def label_split_task(settings: Settings, method: str, split: str) -> int:
    """Majority-vote labels, uncertainty maps and scores of ``split`` with ``method``;
    returns the number of images labelled."""
    done = {"n": 0}
    label_split(settings, method, split, settings.teacher.labels_out,
                progress=lambda d, _n: done.__setitem__("n", d))
    get_run_logger().info("%s/%s: %d images labelled", method, split, done["n"])
    return done["n"]


@task(name="plan-labelling", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def plan_label_task(settings: Settings, method: str, split: str, n_tasks: int) -> list[list[int]]:
    """Start labelling ``split`` with ``method``; its unfinished parts, one group per task."""
    groups = plan_label_split(settings, method, split, n_tasks)
    get_run_logger().info("%s/%s: %d parts to label in %d tasks", method, split,
                          sum(map(len, groups)), len(groups))
    return groups


@task(name="label-parts", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error, tags=["gpu"])
def label_parts_task(settings: Settings, method: str, split: str, parts: list[int]) -> int:
    """Label ``parts`` of ``split`` (this task owns them; a retry keeps finished parts)."""
    logger = get_run_logger()

    def progress(done: int, total: int) -> None:
        if done == total or done % every(total) == 0:
            logger.info("%s/%s parts %s: %d/%d images", method, split, parts, done, total)

    return label_split_parts(settings, method, split, parts, progress)


@task(name="finish-labelling", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def finish_label_task(settings: Settings, method: str, split: str) -> int:
    """Join the parts' scores of ``split`` into ``scores.parquet``; its image count."""
    n = finish_label_split(settings, method, split)
    get_run_logger().info("%s/%s: %d images labelled", method, split, n)
    return n


@task(name="evaluate-methods", retries=1, retry_condition_fn=retry_unless_user_error, tags=["cpu"])
def evaluate_task(settings: Settings) -> dict[str, Any]:
    df = run_evaluate(settings)
    rows = df[df["scope"] == "summary"]
    return {r.method: {"miou": r.miou, "mbiou": r.mbiou} for r in rows.itertuples()}
