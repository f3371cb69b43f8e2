"""``ddps``: the command (:mod:`ddps.cli`) and the Python API (:mod:`ddps.api`):

```python
import ddps

seg = ddps.load("path/to/workspace", model="refiner", device="cpu")
mask = seg(image)
```

The method library is ``ddps_core``; the Prefect flows and tasks are ``flows`` and ``tasks``.
``import ddps`` stays cheap: :func:`load` and :class:`Segmenter` are imported on first use
(torch only when a model is loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ddps.api import Segmenter, load

__all__ = ["Segmenter", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ddps import api

        return getattr(api, name)
    raise AttributeError(f"module 'ddps' has no attribute {name!r}")
