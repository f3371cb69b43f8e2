"""Prefect tasks: the units of a stage's work that an orchestrator schedules, retries and
routes (:mod:`tasks.stage`). They hold no method code; each calls ``ddps_core``."""
