"""The frozen base segmentor DDPS refines, as far as this package needs it.

DDPS only needs two things from the base: its decoder features F (stride 4 of the image; the
denoiser is conditioned on them) and its own logits (the "base alone" row of the evaluation).
:class:`SegmentationBase` names that contract; :class:`SmpBase` adapts any
``segmentation_models_pytorch`` model whose decoder output is at stride 4 (DeepLabV3+, FPN,
SegFormer's decoder in smp, ...). For a Unet-style decoder (stride 1) F is at full
resolution, which works but makes the denoiser expensive.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["SegmentationBase", "SmpBase", "freeze", "probe_features"]


@runtime_checkable
class SegmentationBase(Protocol):
    """``decoder_features(images) -> [B, C, h, w]`` and ``forward(images) -> [B, K, H, W]``."""

    def decoder_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class SmpBase(nn.Module):
    """Wrap an smp model: ``decoder_features`` is ``decoder(encoder(x))``, ``forward`` the model.

    Both run the encoder; callers that need both (evaluation of the base and refinement)
    should call :meth:`features_and_logits`, which runs it once.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in ("encoder", "decoder", "segmentation_head"):
            if not hasattr(model, name):
                raise TypeError(f"{type(model).__name__} has no {name!r}: not an smp segmentation model")
        self.model = model

    def decoder_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(self.model.encoder(images))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.decoder_features(images)
        return feats, self.model.segmentation_head(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def freeze(base: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm running statistics, no dropout) and no gradients, in place.

    DDPS trains only the denoiser; a base left in train mode would keep updating its
    BatchNorm statistics from the denoiser's batches and drift away from the model that was
    evaluated.
    """
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


@torch.no_grad()
def probe_features(base: SegmentationBase, image_size: int | tuple[int, int],
                   device: torch.device | str = "cpu") -> tuple[int, int]:
    """(channels, stride) of ``base.decoder_features`` for a zero image of ``image_size``:
    what a denoiser must be built for. Runs in eval mode (a batch of one would break
    BatchNorm in train mode) and restores the base's mode."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    was_training = getattr(base, "training", False)
    if isinstance(base, nn.Module):
        base.eval()
    try:
        feats = base.decoder_features(torch.zeros(1, 3, h, w, device=device))
    finally:
        if isinstance(base, nn.Module):
            base.train(was_training)
    return int(feats.shape[1]), int(round(h / feats.shape[-2]))
