"""The student: a standalone segmentor built with segmentation-models-pytorch.

:class:`Student` wraps an smp model together with its input normalisation, so that callers
hand it images as float ``[B, 3, H, W]`` in [0, 1] and never need to know the encoder's
statistics. It exposes what DDPS conditions on:

* :meth:`Student.decoder_features` -> ``[B, C, ceil(H/4), ceil(W/4)]``, the decoder's output
  at stride 4 (DeepLabV3+: 256 channels after the low-level fusion; SegFormer: the all-MLP
  head's fused 256 channels), i.e. the input of the segmentation head;
* :meth:`Student.features_and_logits` -> both, with one encoder pass;
* ``forward`` -> logits ``[B, K, H, W]``.

Any ``H, W`` works: smp needs multiples of 32, so the input is padded on the bottom / right
(edge replication) and the outputs are cropped back.

Encoder weights: ``None`` (random initialisation: nothing is downloaded), smp's name of a
weight set (``imagenet``; smp downloads it, which fails without internet), or the path of a
``.safetensors`` / ``.pth`` file holding the encoder's state dict (loaded weights-only,
strictly: a mismatch lists the missing and unexpected keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddps_core.errors import CheckpointError, ConfigError, DataError

__all__ = ["ARCHS", "INFO_FILE", "WEIGHTS_FILE", "Student", "build_student", "load_student", "weights_id"]

ARCHS = {"deeplabv3plus": "DeepLabV3Plus", "segformer": "Segformer"}
WEIGHTS_FILE = "student.safetensors"
INFO_FILE = "model.json"
# ImageNet statistics: the encoders' pretrained weights expect them; harmless from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_MULTIPLE = 32


class Student(nn.Module):
    """An smp segmentation model with its normalisation; see the module doc."""

    feature_stride = 4

    def __init__(self, arch: str, encoder: str, num_classes: int, encoder_weights: str | None = None):
        super().__init__()
        import segmentation_models_pytorch as smp

        if arch not in ARCHS:
            raise ConfigError(f"student.arch: {arch!r} is not one of {sorted(ARCHS)}")
        self.config = {"arch": arch, "encoder": encoder, "num_classes": int(num_classes)}
        smp_weights = None
        weight_file = None
        if encoder_weights is not None:
            p = Path(encoder_weights)
            if p.suffix in (".safetensors", ".pth", ".pt", ".bin") or p.exists():
                weight_file = p
            else:
                smp_weights = encoder_weights
        try:
            self.net = getattr(smp, ARCHS[arch])(encoder_name=encoder, encoder_weights=smp_weights,
                                                 classes=int(num_classes))
        except (OSError, ConnectionError, RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"student: cannot build {arch} with encoder {encoder!r} and encoder_weights "
                              f"{encoder_weights!r}: {exc}") from None
        if weight_file is not None:
            self.load_encoder(weight_file)
        self.register_buffer("mean", torch.tensor(MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).reshape(1, 3, 1, 1), persistent=False)
        self.feature_channels = int(self.net.segmentation_head[0].in_channels)

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def load_encoder(self, path: str | Path) -> None:
        """Load encoder weights from a file (weights only; strict)."""
        from ddps_core.diffusion.checkpoint import load_state_dict

        sd = load_state_dict(path)
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
        # an ImageNet classifier's head is not part of the encoder (smp drops it the same way)
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
        # smp's encoders override load_state_dict without ``strict``: call nn.Module's
        missing, unexpected = nn.Module.load_state_dict(self.net.encoder, sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path}: does not fit the {self.config['encoder']} encoder: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")

    def _prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        x = (images.float() - self.mean) / self.std
        ph, pw = (-h) % _MULTIPLE, (-w) % _MULTIPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, h, w

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(self.net.encoder(x))

    def decoder_features(self, images: torch.Tensor) -> torch.Tensor:
        """The decoder output at stride 4 (the segmentation head's input): ``[B, C, h, w]``
        with ``h = ceil(H / 4)``, ``w = ceil(W / 4)``."""
        x, h, w = self._prepare(images)
        s = self.feature_stride
        return self._decode(x)[..., : -(-h // s), : -(-w // s)]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decoder_features, logits [B, K, H, W])`` with one encoder pass."""
        x, h, w = self._prepare(images)
        feats = self._decode(x)
        logits = self.net.segmentation_head(feats)[..., :h, :w]
        s = self.feature_stride
        return feats[..., : -(-h // s), : -(-w // s)], logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def build_student(cfg: Any, num_classes: int) -> Student:
    """The :class:`Student` a :class:`~ddps_core.config.StudentSettings` describes."""
    return Student(cfg.arch, cfg.encoder, num_classes, cfg.encoder_weights)


def load_student(out: str | Path, device: torch.device | str = "cpu") -> tuple[Student, dict[str, Any]]:
    """The selected student of a ``train_student`` run (eval mode) and its ``model.json``."""
    from safetensors.torch import load_file

    from ddps_core.training import read_record

    out = Path(out)
    info = read_record(out / INFO_FILE, "no student here; run the train_student stage (`ddps student train`) first",
                       rerun="train_student")
    model = Student(info["arch"], info["encoder"], info["num_classes"])
    path = out / WEIGHTS_FILE
    try:
        sd = load_file(str(path), device="cpu")
        model.net.load_state_dict(sd)
    except FileNotFoundError:
        raise DataError(f"{path}: the student's weights are missing; rerun train_student") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: does not fit the student of {out / INFO_FILE}: {exc}") from None
    return model.to(device).eval(), info


def weights_id(out: str | Path) -> str:
    """sha256 (16 hex digits) of the student's weights file in ``out``: the content id the
    student's predictions and the denoisers trained on it are tied to."""
    import hashlib

    path = Path(out) / WEIGHTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no student weights; run the train_student stage (`ddps student train`) first")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
