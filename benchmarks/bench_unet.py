"""Benchmark: UNet forward images/s (random weights) against the machine's attainable FLOP rate.

For each preset the forward FLOPs are counted with ``torch.utils.flop_counter`` (a
multiply-add = 2 FLOPs). The baseline is a dense matrix multiply with the same dtype on the
same device, so ``ratio`` = the fraction of the attainable matmul rate the UNet achieves. On
CUDA the model runs in bf16 autocast in the pipeline's layout (``ddps_core.device.memory_format``);
the GPU's dense bf16 peak (when known for the device) is reported too.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.device import autocast, memory_format  # noqa: E402
from ddps_core.diffusion.presets import get_preset  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) of known GPUs, from their data sheets.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _times(fn, device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after one warm-up call, the device
    synchronised around each."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _median_time(fn, device, repeats: int, min_repeats: int = 5) -> float:
    return statistics.median(_times(fn, device, max(repeats, min_repeats)))


def forward_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return int(counter.get_total_flops())


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 5, n: int | None = None) -> float:
    """Attainable dense matmul FLOP/s on ``device`` (the baseline), from n x n products
    (default n: 8192 on CUDA, 4096 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 4096)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    dt = _median_time(lambda: a @ b, device, repeats)
    return 2 * n**3 / dt


def run(presets=("small32-spec", "tiny32", "adm-256-lsun"), batch: int = 1, repeats: int = 5,
        device: str = "cpu") -> list[dict]:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = matmul_rate(dev, dtype)
    rows = []
    for name in presets:
        cfg = get_preset(name, use_fp16=False)
        torch.manual_seed(0)
        fmt = memory_format()  # the pipeline's layout
        model = cfg.build().eval().to(dev, memory_format=fmt)
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=dev).contiguous(memory_format=fmt)
        t = torch.full((batch,), 100, device=dev, dtype=torch.long)
        flops = forward_flops(model, x, t)

        def fwd():
            with torch.inference_mode(), autocast(dev):
                model(x, t)

        # the 256 model takes tens of seconds per forward on a 2-core CPU: fewer repeats there
        n_rep = repeats if flops < 1e11 or dev.type == "cuda" else 1
        dt = _median_time(fwd, dev, n_rep, min_repeats=n_rep)
        achieved = flops / dt
        rows.append({
            "name": f"unet_forward/{name}",
            "figure": "images_per_s", "value": batch / dt, "unit": "img/s",
            "baseline": f"dense {str(dtype).removeprefix('torch.')} matmul rate",
            "baseline_value": peak, "ratio": achieved / peak,
            "settings": {"preset": name, "batch": batch, "gflops_per_image": flops / batch / 1e9,
                         "achieved_tflops": achieved / 1e12, "repeats": n_rep,
                         "gpu_bf16_peak": next((v for k, v in GPU_BF16_PEAK.items()
                                                if dev.type == "cuda" and k in torch.cuda.get_device_name()), None)},
        })
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
