"""The ``ddps`` command (:mod:`ddps.cli`). The method library is ``ddps_core``; the Prefect
flows and tasks are ``flows`` and ``tasks``."""
