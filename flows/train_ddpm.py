"""Flow of the ``train_ddpm`` stage: the diffusion model every feature comes from."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.ddpm import train_ddpm_task


@flow(name="train_ddpm", log_prints=True)
def train_ddpm_flow(ddpm: dict[str, Any] | None = None,
                    params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``train_ddpm``. ``ddpm`` holds partial overrides of the ``ddpm`` section."""
    settings = settings_for(params_path, {"ddpm": ddpm})
    summary = train_ddpm_task(settings)
    print(f"diffusion model ready in {settings.ddpm.out}: {summary}")
    return summary


if __name__ == "__main__":
    train_ddpm_flow()
