"""ddps_core: the method library (pure Python + torch; no Prefect, no DVC, no global state)."""

__version__ = "0.1.0"
