"""Where a UNet forward spends its time, and what two settings change:
``python -m benchmarks.profile_unet [--preset adm-256-lsun] [--batch 64] [--device cuda]
[--memory-format default|channels_last|contiguous|both] [--out F.json]``.

1. ``torch.profiler``: one forward (bf16 autocast on CUDA, in the pipeline's layout unless
   ``--memory-format`` says otherwise) after a warm-up; the operators by device time, top
   ``--top``.
2. Forward time (median of 3 after a warm-up) with:
   - ``default``: the settings the pipeline uses;
   - ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark = True`` (cuDNN times its
     convolution algorithms per shape);
   - ``sdpa``: attention through ``F.scaled_dot_product_attention`` instead of the
     reference's einsum + float32 softmax (``ddps_core.diffusion.unet._attend``, patched for
     this run only), with the largest difference of the outputs against ``default``;
   - both.
Random weights (the zero-initialised layers randomised too): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddps_core.device import autocast, memory_format  # noqa: E402
from ddps_core.diffusion import unet as unet_module  # noqa: E402
from ddps_core.diffusion.presets import get_preset  # noqa: E402
from ddps_core.diffusion.unet import randomize_zero_init_  # noqa: E402

from benchmarks.bench_unet import _sync, _times  # noqa: E402


def _sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    # (B', ch, T) in and out, like unet._attend; SDPA's default scale is ch^-1/2
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@contextlib.contextmanager
def _settings(cudnn_benchmark: bool, sdpa: bool):
    old_bench, old_attend = torch.backends.cudnn.benchmark, unet_module._attend
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if sdpa:
        unet_module._attend = _sdpa_attend
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, unet_module._attend = old_bench, old_attend


def run(preset: str = "adm-256-lsun", batch: int = 64, device: str = "cuda", top: int = 25,
        channels_last: bool | None = None) -> dict:
    """``channels_last``: the layout of the model and input (None: the device default)."""
    dev = torch.device(device)
    fmt = memory_format(channels_last)
    torch.manual_seed(0)
    with torch.device(dev):
        model = get_preset(preset, use_fp16=False).build()
    randomize_zero_init_(model)  # a non-zero output, so that the variants' outputs compare
    model = model.eval().to(memory_format=fmt)
    S = model.image_size
    x = torch.randn(batch, 3, S, S, device=dev).contiguous(memory_format=fmt)
    t = torch.full((batch,), 50, device=dev, dtype=torch.long)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), autocast(dev):
            return model(x, t)

    forward()
    _sync(dev)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        forward()
        _sync(dev)
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=top)

    ref = forward().float()
    timings: dict[str, dict] = {}
    for name, bench, sdpa in (("default", False, False), ("cudnn_benchmark", True, False),
                              ("sdpa", False, True), ("both", True, True)):
        with _settings(bench, sdpa):
            out = forward().float()  # cuDNN's search happens here
            sec = statistics.median(_times(forward, dev, 3))
        timings[name] = {"seconds": sec, "images_per_s": batch / sec,
                         "max_abs_diff_vs_default": float((out - ref).abs().max()),
                         "rel_rms_diff_vs_default": float((out - ref).norm() / ref.norm())}
    return {"preset": preset, "batch": batch, "device": str(dev), "profile_table": table,
            "memory_format": "channels_last" if fmt == torch.channels_last else "contiguous",
            "timings": timings,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_unet")
    p.add_argument("--preset", default="adm-256-lsun")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--memory-format", choices=["default", "channels_last", "contiguous", "both"],
                   default="default", help="both: channels-last, then contiguous")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    layouts = {"default": [None], "channels_last": [True], "contiguous": [False],
               "both": [True, False]}[args.memory_format]
    results = []
    for cl in layouts:
        res = run(args.preset, args.batch, args.device, args.top, channels_last=cl)
        print(f"== {res['memory_format']}")
        print(res["profile_table"])
        for name, r in res["timings"].items():
            print(f"{res['memory_format']:>14} {name:>16}: {r['images_per_s']:8.2f} img/s  ({r['seconds']:.3f} s; "
                  f"max |diff| {r['max_abs_diff_vs_default']:.3g}, rel RMS {r['rel_rms_diff_vs_default']:.3g})")
        results.append(res)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results if len(results) > 1 else results[0], indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
