"""Process-wide runtime settings that the pipeline's entry points apply (the library itself
changes nothing on import).

:func:`tune_malloc` — glibc's allocator and torch's CPU tensors
---------------------------------------------------------------
torch's CPU allocator takes every tensor from ``malloc``. glibc serves a request of at least
``M_MMAP_THRESHOLD`` bytes (128 KiB at start) with a fresh ``mmap`` and gives it back to the
kernel on ``free``; a heap whose free top exceeds ``M_TRIM_THRESHOLD`` is trimmed. Both limits
adapt: each freed mmapped block raises the threshold to its size (at most 32 MiB on 64-bit)
and the trim threshold to twice that. A UNet forward allocates and frees activations of a few
MiB each, many times over, so whenever the heuristic has not caught up, or a mixed pattern of
allocations (the feature buffers of extraction, say) makes it trim again, those pages are
handed back and faulted in anew, zero-filled, on the next forward. On this project's CPU
machine that cost the hooked extraction forwards 400 000 page faults and 1 s of system time
per 128 ``tiny32`` images, and the bare forwards up to 11 % of their wall time
(``benchmarks/bench_extract.py`` records the effect; README, "Benchmarks").

:func:`tune_malloc` sets the two limits at the values the heuristic would end at: requests
below 32 MiB come from the heap, and up to 64 MiB of free heap top is kept rather than
returned. Peak memory is unchanged (the pages were in use a moment before); a process may
hold up to 64 MiB more than it uses between two allocations.

It is called by the pipeline's entry points (``flows`` and ``tasks`` packages, the ``ddps``
command, the benchmarks). It does nothing when

* the C library is not glibc (musl, macOS, Windows),
* ``DDPS_MALLOC_TUNING=0`` is set, or
* the user already set glibc's own malloc tunables (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, or ``glibc.malloc``
  in ``GLIBC_TUNABLES``): their choice wins.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

#: Requests below this many bytes are served from the heap (glibc's 64-bit maximum).
MMAP_THRESHOLD = 32 << 20
#: Free heap top kept before glibc returns memory to the kernel (twice the threshold, as
#: glibc's own heuristic sets it).
TRIM_THRESHOLD = 64 << 20

# mallopt parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied: bool | None = None  # the outcome of the first call (the call is idempotent)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has mallopt too)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's mmap and trim thresholds for torch's CPU work (see the module text).

    Returns whether the thresholds are set (now or by an earlier call). Idempotent; safe to
    call from any thread before or after torch has allocated.
    """
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if environ is None else environ
    if env.get("DDPS_MALLOC_TUNING", "1").strip() in ("0", "false", "no", "off"):
        _applied = False
        return False
    if any(k in env for k in _USER_ENV) or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        _applied = False
        return False
    libc = _glibc()
    if libc is None:
        _applied = False
        return False
    # Setting either one turns glibc's adaptive heuristic off, so both are set.
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
