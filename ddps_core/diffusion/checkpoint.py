"""Loading and saving UNet weights safely.

Accepted files:

- ``.safetensors`` (read with ``safetensors.torch.load_file``);
- ``.pt`` / ``.pth`` / anything else, read with ``torch.load(..., weights_only=True)`` only:
  a pickle that would construct arbitrary objects or run code is refused, never executed.

The content is either a bare state dict (the official guided-diffusion checkpoints) or a dict
wrapping one under ``"state_dict"`` or ``"model"``. A leading ``module.`` (DataParallel /
DDP) prefix is stripped from every key. Every problem raises
:class:`~ddps_core.errors.CheckpointError` with a message naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddps_core.errors import CheckpointError
from ddps_core.io import atomic_write_bytes

from .presets import get_preset
from .unet import UNetConfig, UNetModel, make_config

__all__ = ["load_state_dict", "load_unet", "save_unet", "state_dict_hash"]

_WRAPPER_KEYS = ("state_dict", "model")
_SHOW = 5


def _read_file(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...
            raise CheckpointError(
                f"checkpoint {path}: unreadable safetensors file (truncated or corrupt?): {exc}"
            ) from exc
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "weights only" in msg.lower() or "weights_only" in msg.lower():
            first = msg.strip().splitlines()
            detail = next((line for line in first if "Unsupported" in line or "global" in line.lower()), "")
            raise CheckpointError(
                f"checkpoint {path}: not a plain weights file - it contains pickled objects or code, "
                f"which are refused for safety (only tensors and plain containers are loaded)"
                + (f"; {detail.strip()}" if detail else "")
            ) from exc
        raise CheckpointError(f"checkpoint {path}: unreadable (truncated or not a checkpoint): {exc}") from exc
    except Exception as exc:  # RuntimeError (bad zip), EOFError, ValueError, OSError, ...
        raise CheckpointError(f"checkpoint {path}: unreadable (truncated or not a checkpoint): {exc}") from exc


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (see the module doc for the accepted layouts)."""
    path = Path(path)
    obj = _read_file(path)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a state dict, found a {type(obj).__name__}")
    sd: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path}: not a state dict - entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        sd[key.removeprefix("module.")] = value
    if not sd:
        raise CheckpointError(f"checkpoint {path}: the state dict is empty")
    return sd


def _describe(config: UNetConfig, preset: str | None, flags: Mapping[str, Any]) -> str:
    if preset is not None:
        return f"preset {preset!r}" + (f" with flags {dict(flags)}" if flags else "")
    return f"flags {config.to_dict()}"


def _check_keys(path: Path, model: UNetModel, sd: Mapping[str, torch.Tensor], what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and expected[k] != got[k]]
    if not (missing or unexpected or shapes):
        return
    parts = [f"checkpoint {path} does not match the UNet built from {what}:"]

    def fmt(title: str, keys: list[str], show) -> None:
        if keys:
            more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            parts.append(f"  {len(keys)} {title}: " + ", ".join(show(k) for k in keys[:_SHOW]) + more)

    fmt("missing key(s)", missing, lambda k: k)
    fmt("unexpected key(s)", unexpected, lambda k: k)
    fmt(
        "mis-shaped key(s)",
        shapes,
        lambda k: f"{k} (expected {list(expected[k])}, got {list(got[k])})",
    )
    raise CheckpointError("\n".join(parts))


def load_unet(
    path: str | os.PathLike[str],
    preset: str | UNetConfig | None = None,
    device: str | torch.device = "cpu",
    **flags: Any,
) -> UNetModel:
    """Build the UNet of ``preset`` (a name, a :class:`UNetConfig` or None for the defaults)
    with ``flags`` overriding its fields, and load the weights at ``path`` strictly.

    An unknown preset or flag raises :class:`~ddps_core.errors.ConfigError`. Key or shape
    mismatches raise :class:`CheckpointError` listing (up to 5 of each) missing,
    unexpected and mis-shaped keys. The returned model is in eval mode on ``device``; when
    the config says ``use_fp16`` its block convolutions are converted to half after loading.
    """
    path = Path(path)
    # an unknown preset name or flag is a configuration error (ConfigError), not a file problem
    config = get_preset(preset, **flags) if isinstance(preset, str) else make_config(preset, **flags)
    sd = load_state_dict(path)
    what = _describe(config, preset if isinstance(preset, str) else None, flags)
    model = config.build()
    _check_keys(path, model, sd, what)
    if model.use_fp16:
        model.convert_to_fp32()  # load the float32 master weights, convert afterwards
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. dtype that cannot be copied
        raise CheckpointError(f"checkpoint {path}: cannot be loaded into the UNet built from {what}: {exc}") from exc
    if config.use_fp16:
        model.convert_to_fp16()
    return model.to(device).eval()


def save_unet(model: torch.nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s state dict atomically: safetensors for a ``.safetensors`` suffix,
    otherwise a bare state dict via ``torch.save``. Floating tensors are stored as float32
    (the official format, also after :meth:`UNetModel.convert_to_fp16`)."""
    path = Path(path)
    sd = {
        k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    # Serialised in memory, then written: the writers of safetensors and torch, given a file
    # name, turn a full disk into a SafetensorError or a RuntimeError that names neither the
    # file nor the fault; a plain write raises the OSError that says both.
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        blob = save(sd)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        blob = buf.getvalue()
    atomic_write_bytes(path, blob)
    return path


def state_dict_hash(sd: Mapping[str, torch.Tensor], length: int = 16) -> str:
    """A short, stable id of a state dict: sha256 over the sorted key names, shapes, dtypes
    and raw bytes; the first ``length`` hex digits."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{list(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]
