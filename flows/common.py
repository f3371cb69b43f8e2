"""What every stage flow shares: reading its section of ``params.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddps_core.config import Settings, load_settings


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dotted override keys)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def settings_for(params_path: str | Path = "params.yaml",
                 overrides: dict[str, dict[str, Any] | None] | None = None) -> Settings:
    """Validated settings: ``params.yaml`` (or the embedded defaults when it is missing),
    with each section's partial ``overrides`` (a deployment's parameters) applied on top."""
    path = Path(params_path)
    dotted: dict[str, Any] = {}
    for section, values in (overrides or {}).items():
        dotted.update(flatten(values or {}, f"{section}."))
    return load_settings(path if path.exists() else None, dotted)
