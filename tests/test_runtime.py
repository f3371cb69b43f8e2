"""glibc allocator tuning (ddps_core.runtime): it stops torch-style allocation cycles from
re-faulting their pages, respects the user's own settings, and the entry points apply it
while the library alone does not."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from ddps_core import runtime

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Six 4 MiB blocks allocated, written and freed, over and over: the activations of a forward.
# glibc's default heuristic (threshold raised to 8 MiB by the first block, trim at 16 MiB)
# returns the 24 MiB heap top to the kernel after every cycle, so each cycle faults it in again.
_CYCLES = textwrap.dedent("""
    import ctypes, resource, sys
    from ddps_core.runtime import tune_malloc
    tuned = tune_malloc() if sys.argv[1] == "tune" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    MB = 1 << 20
    def cycle(sizes):
        ps = [libc.malloc(s) for s in sizes]
        for p, s in zip(ps, sizes):
            libc.memset(p, 1, s)
        for p in ps:
            libc.free(p)
    cycle([8 * MB])
    cycle([4 * MB] * 6)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        cycle([4 * MB] * 6)
    print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
""")


def _faults(mode: str, **env: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds exist in glibc only")
def test_tuning_stops_the_refaults():
    _, default = _faults("default")
    tuned, after = _faults("tune")
    pages = 6 * 4 * 1024 * 1024 / 4096
    assert default > 0.9 * pages  # glibc's default gives the pages back every cycle
    assert tuned == "True"
    assert after < 0.01 * pages  # tuned: the heap keeps them


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds exist in glibc only")
def test_opt_out_and_users_own_tunables_are_respected():
    for env in ({"DDPS_MALLOC_TUNING": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        tuned, _ = _faults("tune", **env)
        assert tuned == "False", env


def test_decision_is_taken_once(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    assert runtime.tune_malloc({"DDPS_MALLOC_TUNING": "off"}) is False
    assert runtime.tune_malloc({}) is False  # the first decision stands
    monkeypatch.setattr(runtime, "_applied", None)
    assert runtime.tune_malloc({"MALLOC_MMAP_THRESHOLD_": "1"}) is False


@pytest.mark.parametrize(("module", "expected"), [("ddps_core.features", "None"), ("flows", str(GLIBC)),
                                                  ("tasks", str(GLIBC))])
def test_entry_points_tune_and_the_library_does_not(module, expected):
    code = f"import {module}, ddps_core.runtime as r; print(r._applied)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
