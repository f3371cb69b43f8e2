"""Flow of the ``train_student`` stage: the segmentor distilled from the generated dataset."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import settings_for
from tasks.student import train_student_task


@flow(name="train_student", log_prints=True)
def train_student_flow(student: dict[str, Any] | None = None, params_path: str = "params.yaml") -> dict[str, Any]:
    """Stage ``train_student``. ``student`` holds partial overrides of its section."""
    settings = settings_for(params_path, {"student": student})
    info = train_student_task(settings)
    val = "-" if info["val_miou"] is None else f"{100 * info['val_miou']:.2f}"
    print(f"student {info['arch']}/{info['encoder']}: epoch {info['best_epoch']} selected "
          f"(real-image mIoU {val}); test mIoU {100 * info['test_miou']:.2f}, "
          f"mBIoU {100 * info['test_mbiou']:.2f} -> {settings.student.out}")
    return info


if __name__ == "__main__":
    train_student_flow()
