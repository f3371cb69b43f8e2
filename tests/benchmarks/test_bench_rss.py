"""The ensemble benchmark's peak-RSS figure is the child's own, not its parent's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def test_child_peak_rss_does_not_inherit_the_parents_high_water_mark():
    big = np.ones(768 * 1024**2 // 8)  # the parent touches 768 MB, then lets it go
    big[::512] = 2.0
    del big
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            "from benchmarks.bench_ensemble import peak_rss_mb; print(peak_rss_mb())")
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.strip())
    assert 5 < child < 700  # the child imports torch (~300-500 MB), never 768 MB
