"""Prefect flows of the pipeline stages (orchestration only: the math is in ``ddps_core``)."""
