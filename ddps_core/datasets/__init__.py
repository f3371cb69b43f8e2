"""Dataset readers (DDPM-Seg folders, ADE20K, Cityscapes, generic image/mask folders), the
non-square handling :func:`to_square`, and the embedded synthetic face-parts domain.

Every reader yields :class:`Sample` ``(image uint8 HxWx3 RGB, label uint8/uint16 HxW or None,
id)``, sorted by id and read lazily; bad input raises :class:`~ddps_core.errors.DataError`
naming the offending file.
"""

from ddps_core.datasets.common import Sample, load_image, load_label, read_classes_yaml, to_square
from ddps_core.datasets.readers import (
    ADE20K,
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    DATASET_KINDS,
    Cityscapes,
    DDPMSegFolder,
    GenericFolder,
    cityscapes_label_ids_to_train_ids,
    open_dataset,
)
from ddps_core.datasets.synthetic import SYNTHETIC_CLASSES, make_synthetic, synthetic_sample

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASET_KINDS",
    "SYNTHETIC_CLASSES",
    "Cityscapes",
    "DDPMSegFolder",
    "GenericFolder",
    "Sample",
    "cityscapes_label_ids_to_train_ids",
    "load_image",
    "load_label",
    "make_synthetic",
    "open_dataset",
    "read_classes_yaml",
    "synthetic_sample",
    "to_square",
]
