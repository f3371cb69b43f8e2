"""Prefect tasks of the pipeline stages (thin wrappers of ``ddps_core`` functions).

Importing the package applies the process-wide runtime settings of the pipeline
(:func:`ddps_core.runtime.tune_malloc`), in the flow's process and in Dask workers alike.
"""

from ddps_core.runtime import tune_malloc

tune_malloc()
