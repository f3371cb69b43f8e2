"""Labels added to the training split after the dataset was made (``ddps data add-labels``).

``data.added`` (default ``data/added``) holds them in the canonical layout, ``<id>.png`` (the
image) and ``<id>.npy`` (its class ids, already checked by ``add-labels``). The ``data``
stage joins them to whatever it makes or imports: each goes into ``real/train/``, and an
image of the same id leaves ``unlabeled/`` (it was picked from the pool). Their content is
part of the stage's identity, so a new, changed or removed added label rebuilds the dataset,
and an unchanged folder changes nothing.

A label for an id of the test split is refused: test labels belong to the source, and an
image scored as test must not also be trained on.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddps_core.errors import DataError

__all__ = ["AddedLabels", "added_labels", "count_files"]


@dataclass(frozen=True)
class AddedLabels:
    """The added labels of a folder: their ids and the identity of their content."""

    folder: Path
    ids: tuple[str, ...]
    identity: str

    def record(self) -> dict[str, object]:
        """What the dataset's identity records of them: their content, not where they are."""
        return {"images": len(self.ids), "content": self.identity}

    def apply(self, root: Path, pixels: Callable[[np.ndarray], None] | None = None) -> None:
        """Write them into the dataset folder ``root`` (being built): ``real/train/<id>.png`` and
        ``.npy``, and remove ``unlabeled/<id>.png``. ``pixels`` sees each label (class counts)."""
        from ddps_core.io import atomic_write_bytes

        train = root / "real" / "train"
        train.mkdir(parents=True, exist_ok=True)
        for sid in self.ids:
            if (root / "real" / "test" / f"{sid}.png").is_file():
                raise DataError(f"{self.folder / (sid + '.png')}: {sid!r} is an image of the test split; an added "
                                "label must be a training or pool image (remove it from data.added)")
            label = (self.folder / f"{sid}.npy").read_bytes()
            atomic_write_bytes(train / f"{sid}.png", (self.folder / f"{sid}.png").read_bytes())
            atomic_write_bytes(train / f"{sid}.npy", label)
            (root / "unlabeled" / f"{sid}.png").unlink(missing_ok=True)
            if pixels is not None:
                pixels(np.load(io.BytesIO(label), allow_pickle=False))


def added_labels(folder: str | Path | None) -> AddedLabels | None:
    """The added labels in ``folder``; None when it is unset, absent or holds none. An image
    without its label (or the reverse) is an error naming the file."""
    if folder is None:
        return None
    folder = Path(folder)
    if not folder.is_dir():
        return None
    from ddps_core.datasets.stage import content_identity

    pngs = {p.stem for p in folder.glob("*.png") if not p.name.startswith(".")}
    npys = {p.stem for p in folder.glob("*.npy") if not p.name.startswith(".")}
    for sid in sorted(pngs ^ npys):
        have, missing = (f"{sid}.png", f"{sid}.npy") if sid in pngs else (f"{sid}.npy", f"{sid}.png")
        raise DataError(f"{folder / have}: added label without its {missing} (data.added holds <id>.png and "
                        "<id>.npy pairs, as `ddps data add-labels` writes them)")
    if not pngs:
        return None
    ids = tuple(sorted(pngs))
    files = [folder / f"{sid}{ext}" for sid in ids for ext in (".png", ".npy")]
    return AddedLabels(folder, ids, content_identity(files, folder))


def count_files(folder: Path, suffix: str = ".png") -> int:
    """Files ending in ``suffix`` in ``folder`` (0 when it is absent), hidden ones aside."""
    try:
        return sum(1 for name in folder.iterdir() if name.name.endswith(suffix) and not name.name.startswith("."))
    except OSError:
        return 0
