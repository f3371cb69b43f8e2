"""Prefect flows of the pipeline stages (orchestration only: the math is in ``ddps_core``).

Importing the package applies the process-wide runtime settings of the pipeline
(:func:`ddps_core.runtime.tune_malloc`); ``tasks`` does the same for Dask workers.
"""

from ddps_core.runtime import tune_malloc

tune_malloc()
