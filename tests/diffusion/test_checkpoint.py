"""Weights files are byte-identical when the tensors and metadata are (DVC hashes them)."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save

from ddps_core.io import canonical_safetensors


def test_header_order_no_longer_depends_on_metadata_order(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(5, dtype=torch.int64)}
    meta = {f"k{i}": str(i) for i in range(12)}
    one = canonical_safetensors(save(tensors, metadata=meta))
    two = canonical_safetensors(save(tensors, metadata=dict(reversed(list(meta.items())))))
    assert one == two
    path = tmp_path / "w.safetensors"
    path.write_bytes(one)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("b"), tensors["b"]) and torch.equal(f.get_tensor("a"), tensors["a"])
    assert int.from_bytes(one[:8], "little") % 8 == 0


def test_ensemble_files_of_two_processes_are_identical(tmp_path):
    code = (
        "import sys, torch; from ddps_core.teacher.ensemble import PixelEnsemble;"
        "torch.manual_seed(0); PixelEnsemble(feature_dim=4, num_classes=3, members=2, source_id='x')"
        ".save(sys.argv[1])"
    )
    files = []
    for k in range(2):
        out = tmp_path / f"e{k}.safetensors"
        # a different hash seed per process: the order a hash map yields changes with it
        subprocess.run([sys.executable, "-c", code, str(out)], check=True,
                       env={"PYTHONHASHSEED": str(k + 1), "PATH": "/usr/bin:/bin"})
        files.append(out.read_bytes())
    assert files[0] == files[1]
