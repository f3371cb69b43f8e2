"""Flow of the ``generate`` stage: the label-efficient generated dataset (METHODS.md §5)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.generate import generate_task


@flow(name="generate", log_prints=True)
def generate_flow(generate: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``generate``. ``generate`` holds partial overrides of its section."""
    settings = settings_for(params_path, {"generate": generate})
    stats = generate_task(settings)
    for source, s in stats.items():
        if isinstance(s, dict):
            print(f"{source}: {s['kept']}/{s['candidates']} kept, dropped {s['dropped']}")
    print(f"exported {stats['total_kept']} labelled images to {settings.generate.out}")
    return stats


if __name__ == "__main__":
    generate_flow()
