"""Device selection: ``auto`` picks CUDA when present; everything also runs on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ddps_core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (bf16 autocast is slower than fp32 on CPU)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool | None = None) -> torch.memory_format:
    """The diffusion UNet's memory layout: contiguous (NCHW) on every device unless
    ``channels_last`` asks otherwise (None: the default; True / False: that layout).

    channels-last was the CUDA default until measured: on an H200 (torch 2.11, bf16
    autocast, batch 64) the ``adm-256-lsun`` forward ran at 63.7 img/s channels-last and
    84.8 img/s contiguous. PyTorch's CUDA GroupNorm works on NCHW, so channels-last
    activations were converted to NCHW and back around each of the forward's 101 group
    norms (``aten::contiguous``: 352 of 1015 ms of GPU time); in NCHW, cuDNN's own layout
    transposes around the convolutions cost 101 of 765 ms (``benchmarks/profile_unet.py``).
    The extractor's ``channels_last=True`` keeps the other layout available.
    """
    return torch.channels_last if channels_last else torch.contiguous_format


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def nonfinite_tensors(*modules: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``modules`` that hold a NaN or an infinity.

    Trainers call it before writing a checkpoint: a finite loss does not prove finite weights
    (an overflowing backward pass gives NaN gradients), and a checkpoint of NaN weights would
    replace the last good one.
    """
    bad = [name for module in modules
           for name, t in (*module.named_parameters(), *module.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return list(dict.fromkeys(bad))  # a model and its EMA copy share the names
