"""Prefect tasks of the pipeline stages (thin wrappers of ``ddps_core`` functions)."""
