"""The DDPM-Seg pixel classifier ensemble (docs/method.md), evaluated as ONE batched module.

Reference member (``pixel_classifier`` of DDPM-Seg)::

    Linear(D, h1), ReLU, BatchNorm1d(h1), Linear(h1, h2), ReLU, BatchNorm1d(h2), Linear(h2, K)

with ``(h1, h2) = (128, 32)`` when ``K < 30`` and ``(256, 128)`` otherwise; BatchNorm after
the ReLU; Linear weights ``N(0, 0.02)``, biases 0; BatchNorm affine parameters at PyTorch's
defaults (weight 1, bias 0: the reference's init only touches ``BatchNorm2d``).

:class:`PixelEnsemble` holds the ``M`` members' weights stacked along a leading member axis:

* layer 1 of all members is ONE wide matmul: ``w1`` is ``[M*h1, D]`` (``F.linear`` layout;
  rows ``m*h1 : (m+1)*h1`` belong to member ``m``), so a batch ``[B, D]`` is read once;
* layers 2 and 3 are batched matmuls (``torch.baddbmm``) with ``w2 [M, h2, h1]`` and
  ``w3 [M, K, h2]`` (each member's ``nn.Linear`` weight, stacked);
* BatchNorm is per member and per channel (statistics over the batch axis only), with its own
  running statistics and a per-member ``num_batches_tracked``; in training mode the running
  statistics of a member are updated only when it is in ``update_stats`` (frozen members keep
  theirs bit for bit).

Every parameter and buffer has the member axis first after ``.view(M, -1)``, which is what the
member-masked optimiser of :mod:`ddps_core.teacher.train` relies on.

:func:`reference_mlp` builds one member with the reference's module layout (state-dict keys
``layers.0.*`` ... ``layers.6.*``); :meth:`PixelEnsemble.export_member` /
:meth:`PixelEnsemble.load_member` convert between the two.

The whole ensemble is saved as ONE ``.safetensors`` file whose metadata records the format,
``feature_dim``, ``num_classes``, ``members``, ``widths``, the init ``seed`` and the feature
source id; :meth:`PixelEnsemble.load` refuses (``CheckpointError`` naming the file) a file
that is unreadable, of another format, inconsistent, or that does not match what the caller
expects.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddps_core.errors import CheckpointError, ConfigError
from ddps_core.io import atomic_write_bytes, canonical_safetensors

__all__ = [
    "ENSEMBLE_FORMAT",
    "PixelEnsemble",
    "ReferenceMLP",
    "default_widths",
    "init_reference_",
    "reference_mlp",
    "features_id",
    "source_id_of",
]

ENSEMBLE_FORMAT = "ddps-pixel-ensemble"
ENSEMBLE_VERSION = 1
INIT_STD = 0.02
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

# Attributes of a FeatureStore that define what its features are (image ids excluded: the
# same extractor applied to another split gives features of the same kind).
_SOURCE_KEYS = ("format_version", "model_id", "schedule_id", "steps", "blocks", "noise_seed", "noise_id",
                "image_size", "shapes")


def default_widths(num_classes: int) -> tuple[int, int]:
    """The reference hidden widths: (128, 32) below 30 classes, else (256, 128)."""
    return (128, 32) if int(num_classes) < 30 else (256, 128)


def features_id(settings: Mapping[str, Any]) -> str:
    """The id of DDPM features made with a feature store's ``settings`` (only the keys that
    define the features count): what an ensemble trained on them records as its source."""
    text = json.dumps({k: settings.get(k) for k in _SOURCE_KEYS}, sort_keys=True, default=str)
    return "features-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def source_id_of(source: Any) -> str:
    """A short id of a feature source: its ``source_id`` attribute when it has one, else (a
    :class:`~ddps_core.features.store.FeatureStore`) a hash of the settings that define its
    features (model, schedule, steps, blocks, noise, image size, shapes)."""
    sid = getattr(source, "source_id", None)
    if sid is not None:
        return str(sid)
    settings = getattr(source, "settings", None)
    if callable(settings):
        return features_id(settings())
    raise ConfigError(f"cannot tell the feature source id of {type(source).__name__} (no source_id / settings())")


# --------------------------------------------------------------------------------------------
# The reference member
# --------------------------------------------------------------------------------------------


class ReferenceMLP(nn.Module):
    """One reference pixel classifier; ``layers`` has the reference's state-dict keys."""

    def __init__(self, feature_dim: int, num_classes: int, widths: tuple[int, int] | None = None):
        super().__init__()
        h1, h2 = widths or default_widths(num_classes)
        self.layers = nn.Sequential(
            nn.Linear(feature_dim, h1),
            nn.ReLU(),
            nn.BatchNorm1d(h1),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def init_reference_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """The reference init, in module order: every Linear weight ``N(0, 0.02)``, bias 0."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, INIT_STD, generator=generator)
                if layer.bias is not None:
                    layer.bias.zero_()
    return module


def reference_mlp(
    feature_dim: int, num_classes: int, widths: tuple[int, int] | None = None, seed: int | None = None
) -> ReferenceMLP:
    """A reference member. With ``seed``, initialised like :class:`PixelEnsemble` member ``m``
    of an ensemble seeded ``seed - m`` (the three Linear weights drawn in order from
    ``torch.Generator().manual_seed(seed)``); without, from the global RNG."""
    mlp = ReferenceMLP(feature_dim, num_classes, widths)
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return init_reference_(mlp, gen)


# --------------------------------------------------------------------------------------------
# The batched ensemble
# --------------------------------------------------------------------------------------------


def _member_bn(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    tracked: torch.Tensor,
    training: bool,
    update: torch.Tensor | None,
) -> torch.Tensor:
    """BatchNorm1d of ``h [M, B, c]`` per member and channel (weights etc. are ``[M*c]``);
    in training mode the running statistics of the members in ``update`` (bool ``[M]``, None:
    all) are updated like ``nn.BatchNorm1d`` (momentum 0.1, unbiased running variance)."""
    M, B, c = h.shape
    w, b = weight.view(M, 1, c), bias.view(M, 1, c)
    if not training:
        mean, var = running_mean.view(M, 1, c), running_var.view(M, 1, c)
        return (h - mean) * torch.rsqrt(var + BN_EPS) * w + b
    if B < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 pixel per batch, got {B}")
    mean = h.mean(dim=1, keepdim=True)
    var = h.var(dim=1, unbiased=False, keepdim=True)
    out = (h - mean) * torch.rsqrt(var + BN_EPS) * w + b
    with torch.no_grad():
        rm, rv = running_mean.view(M, c), running_var.view(M, c)
        new_m = rm * (1 - BN_MOMENTUM) + mean.view(M, c) * BN_MOMENTUM
        new_v = rv * (1 - BN_MOMENTUM) + var.view(M, c) * (B / (B - 1)) * BN_MOMENTUM
        if update is None:
            rm.copy_(new_m)
            rv.copy_(new_v)
            tracked.add_(1)
        else:
            u = update.to(device=h.device, dtype=torch.bool).view(M, 1)
            rm.copy_(torch.where(u, new_m, rm))
            rv.copy_(torch.where(u, new_v, rv))
            tracked.add_(u.view(M).to(tracked.dtype))
    return out


class PixelEnsemble(nn.Module):
    """``members`` reference MLPs evaluated together; ``forward(x [B, D]) -> logits [M, B, K]``.

    :param feature_dim: ``D``.
    :param num_classes: ``K``.
    :param members: ``M`` (10 in the reference).
    :param widths: hidden widths ``(h1, h2)`` (default :func:`default_widths`).
    :param seed: member ``m`` is initialised from ``torch.Generator().manual_seed(seed + m)``.
    :param source_id: id of the feature source the ensemble is (to be) trained on, recorded
        in the saved file (see :func:`source_id_of`).
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        members: int = 10,
        widths: tuple[int, int] | None = None,
        seed: int = 0,
        source_id: str | None = None,
    ):
        super().__init__()
        D, K, M = int(feature_dim), int(num_classes), int(members)
        if D < 1 or K < 1 or M < 1:
            raise ConfigError(f"feature_dim, num_classes and members must be >= 1, got {D}, {K}, {M}")
        h1, h2 = (int(v) for v in (widths or default_widths(K)))
        if h1 < 1 or h2 < 1:
            raise ConfigError(f"hidden widths must be >= 1, got {(h1, h2)}")
        self.feature_dim, self.num_classes, self.members = D, K, M
        self.widths = (h1, h2)
        self.seed = int(seed)
        self.source_id = None if source_id is None else str(source_id)

        self.w1 = nn.Parameter(torch.empty(M * h1, D))
        self.b1 = nn.Parameter(torch.zeros(M * h1))
        self.bn1_weight = nn.Parameter(torch.ones(M * h1))
        self.bn1_bias = nn.Parameter(torch.zeros(M * h1))
        self.w2 = nn.Parameter(torch.empty(M, h2, h1))
        self.b2 = nn.Parameter(torch.zeros(M, h2))
        self.bn2_weight = nn.Parameter(torch.ones(M * h2))
        self.bn2_bias = nn.Parameter(torch.zeros(M * h2))
        self.w3 = nn.Parameter(torch.empty(M, K, h2))
        self.b3 = nn.Parameter(torch.zeros(M, K))
        self.register_buffer("bn1_mean", torch.zeros(M * h1))
        self.register_buffer("bn1_var", torch.ones(M * h1))
        self.register_buffer("bn1_tracked", torch.zeros(M, dtype=torch.long))
        self.register_buffer("bn2_mean", torch.zeros(M * h2))
        self.register_buffer("bn2_var", torch.ones(M * h2))
        self.register_buffer("bn2_tracked", torch.zeros(M, dtype=torch.long))
        self.reset_parameters()

    # -- init -----------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """The reference init, member ``m`` drawn from ``Generator().manual_seed(seed + m)``
        (same draw order as :func:`init_reference_`: w1, w2, w3); biases 0, BN at defaults."""
        M, (h1, h2), K, D = self.members, self.widths, self.num_classes, self.feature_dim
        with torch.no_grad():
            w1 = self.w1.view(M, h1, D)
            for m in range(M):
                g = torch.Generator().manual_seed(self.seed + m)
                w1[m].copy_(torch.empty(h1, D).normal_(0.0, INIT_STD, generator=g))
                self.w2[m].copy_(torch.empty(h2, h1).normal_(0.0, INIT_STD, generator=g))
                self.w3[m].copy_(torch.empty(K, h2).normal_(0.0, INIT_STD, generator=g))
            for p in (self.b1, self.b2, self.b3, self.bn1_bias, self.bn2_bias):
                p.zero_()
            self.bn1_weight.fill_(1.0)
            self.bn2_weight.fill_(1.0)
            self.bn1_mean.zero_()
            self.bn1_var.fill_(1.0)
            self.bn1_tracked.zero_()
            self.bn2_mean.zero_()
            self.bn2_var.fill_(1.0)
            self.bn2_tracked.zero_()

    # -- evaluation -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, update_stats: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[M, B, K]`` of ``x`` ``[B, D]`` (one input for all members) or ``[M, B, D]``
        (one input per member). ``update_stats`` (bool ``[M]``): in training mode, the members
        whose BatchNorm running statistics are updated (default: all)."""
        M, (h1, _), D = self.members, self.widths, self.feature_dim
        if x.dim() == 2:
            if x.shape[1] != D:
                raise ValueError(f"expected features [B, {D}], got {tuple(x.shape)}")
            B = x.shape[0]
            h = F.linear(x, self.w1, self.b1)  # [B, M*h1]: one wide matmul
            h = h.view(B, M, h1).transpose(0, 1)  # [M, B, h1]
        elif x.dim() == 3:
            if x.shape[0] != M or x.shape[2] != D:
                raise ValueError(f"expected features [{M}, B, {D}], got {tuple(x.shape)}")
            h = torch.baddbmm(self.b1.view(M, 1, h1), x, self.w1.view(M, h1, D).transpose(1, 2))
        else:
            raise ValueError(f"expected features [B, D] or [M, B, D], got {tuple(x.shape)}")
        h = _member_bn(
            F.relu(h), self.bn1_weight, self.bn1_bias, self.bn1_mean, self.bn1_var, self.bn1_tracked,
            self.training, update_stats,
        )
        h = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2.transpose(1, 2))  # [M, B, h2]
        h = _member_bn(
            F.relu(h), self.bn2_weight, self.bn2_bias, self.bn2_mean, self.bn2_var, self.bn2_tracked,
            self.training, update_stats,
        )
        return torch.baddbmm(self.b3.unsqueeze(1), h, self.w3.transpose(1, 2))  # [M, B, K]

    # -- member views ---------------------------------------------------------------------------

    def member_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by name; each is ``[M, ...]`` after ``.view(M, -1)``."""
        out = dict(self.named_parameters())
        out.update(dict(self.named_buffers()))
        return out

    def export_member(self, m: int) -> OrderedDict[str, torch.Tensor]:
        """Member ``m``'s weights as a :class:`ReferenceMLP` state dict (copies)."""
        m = self._check_member(m)
        M, (h1, h2), D = self.members, self.widths, self.feature_dim
        s1, s2 = slice(m * h1, (m + 1) * h1), slice(m * h2, (m + 1) * h2)
        with torch.no_grad():
            items = [
                ("layers.0.weight", self.w1.view(M, h1, D)[m]),
                ("layers.0.bias", self.b1[s1]),
                ("layers.2.weight", self.bn1_weight[s1]),
                ("layers.2.bias", self.bn1_bias[s1]),
                ("layers.2.running_mean", self.bn1_mean[s1]),
                ("layers.2.running_var", self.bn1_var[s1]),
                ("layers.2.num_batches_tracked", self.bn1_tracked[m]),
                ("layers.3.weight", self.w2[m]),
                ("layers.3.bias", self.b2[m]),
                ("layers.5.weight", self.bn2_weight[s2]),
                ("layers.5.bias", self.bn2_bias[s2]),
                ("layers.5.running_mean", self.bn2_mean[s2]),
                ("layers.5.running_var", self.bn2_var[s2]),
                ("layers.5.num_batches_tracked", self.bn2_tracked[m]),
                ("layers.6.weight", self.w3[m]),
                ("layers.6.bias", self.b3[m]),
            ]
            return OrderedDict((k, v.detach().clone()) for k, v in items)

    def load_member(self, m: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Set member ``m`` from a :class:`ReferenceMLP` state dict (keys and shapes must match
        exactly; a leading ``module.`` is accepted)."""
        m = self._check_member(m)
        sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
        target = self.export_member(m)
        missing, extra = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
        if missing or extra:
            raise CheckpointError(f"member state dict: missing keys {missing}, unexpected keys {extra}")
        for k, v in target.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise CheckpointError(f"member state dict: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        M, (h1, h2), D = self.members, self.widths, self.feature_dim
        s1, s2 = slice(m * h1, (m + 1) * h1), slice(m * h2, (m + 1) * h2)
        dests = {
            "layers.0.weight": self.w1.view(M, h1, D)[m],
            "layers.0.bias": self.b1[s1],
            "layers.2.weight": self.bn1_weight[s1],
            "layers.2.bias": self.bn1_bias[s1],
            "layers.2.running_mean": self.bn1_mean[s1],
            "layers.2.running_var": self.bn1_var[s1],
            "layers.2.num_batches_tracked": self.bn1_tracked[m],
            "layers.3.weight": self.w2[m],
            "layers.3.bias": self.b2[m],
            "layers.5.weight": self.bn2_weight[s2],
            "layers.5.bias": self.bn2_bias[s2],
            "layers.5.running_mean": self.bn2_mean[s2],
            "layers.5.running_var": self.bn2_var[s2],
            "layers.5.num_batches_tracked": self.bn2_tracked[m],
            "layers.6.weight": self.w3[m],
            "layers.6.bias": self.b3[m],
        }
        with torch.no_grad():
            for k, dst in dests.items():
                dst.copy_(sd[k].to(device=dst.device, dtype=dst.dtype))

    def member_module(self, m: int) -> ReferenceMLP:
        """Member ``m`` as a separate :class:`ReferenceMLP` (on the CPU, in eval mode)."""
        mlp = ReferenceMLP(self.feature_dim, self.num_classes, self.widths)
        mlp.load_state_dict(self.export_member(m))
        return mlp.eval()

    def _check_member(self, m: int) -> int:
        if not 0 <= int(m) < self.members:
            raise IndexError(f"member {m} out of range 0..{self.members - 1}")
        return int(m)

    # -- save / load ----------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "format": ENSEMBLE_FORMAT,
            "format_version": str(ENSEMBLE_VERSION),
            "feature_dim": str(self.feature_dim),
            "num_classes": str(self.num_classes),
            "members": str(self.members),
            "widths": json.dumps(list(self.widths)),
            "seed": str(self.seed),
            "source_id": json.dumps(self.source_id),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole ensemble atomically as ONE safetensors file (with metadata)."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=self.metadata())))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        feature_dim: int | None = None,
        num_classes: int | None = None,
        members: int | None = None,
        source_id: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> PixelEnsemble:
        """Read an ensemble written by :meth:`save`. The keyword arguments that are given
        must equal the file's metadata; any problem raises ``CheckpointError`` naming ``path``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"pixel ensemble {path}: file not found")
        try:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = dict(fh.metadata() or {})
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
        except Exception as exc:  # SafetensorError, OSError, ...
            raise CheckpointError(f"pixel ensemble {path}: unreadable (truncated or not a safetensors file): {exc}") from None
        if meta.get("format") != ENSEMBLE_FORMAT:
            raise CheckpointError(f"pixel ensemble {path}: not a pixel ensemble file (format={meta.get('format')!r})")
        if meta.get("format_version") != str(ENSEMBLE_VERSION):
            raise CheckpointError(
                f"pixel ensemble {path}: format_version {meta.get('format_version')!r} is not supported "
                f"(expected {ENSEMBLE_VERSION})"
            )
        try:
            D, K, M = int(meta["feature_dim"]), int(meta["num_classes"]), int(meta["members"])
            widths = tuple(int(v) for v in json.loads(meta["widths"]))
            seed = int(meta["seed"])
            sid = json.loads(meta["source_id"])
            if len(widths) != 2:
                raise ValueError(f"widths {widths}")
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"pixel ensemble {path}: bad metadata ({exc})") from None
        wanted = {"feature_dim": (feature_dim, D), "num_classes": (num_classes, K), "members": (members, M),
                  "source_id": (source_id, sid)}
        diffs = [f"{k}: file has {have!r}, expected {want!r}" for k, (want, have) in wanted.items()
                 if want is not None and want != have]
        if diffs:
            raise CheckpointError(f"pixel ensemble {path}: does not match ({'; '.join(diffs)})")
        try:
            ens = cls(D, K, M, widths, seed=seed, source_id=sid)
        except ConfigError as exc:
            raise CheckpointError(f"pixel ensemble {path}: bad metadata ({exc})") from None
        expected = ens.state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise CheckpointError(f"pixel ensemble {path}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
        for k, v in expected.items():
            if tuple(tensors[k].shape) != tuple(v.shape) or tensors[k].dtype != v.dtype:
                raise CheckpointError(
                    f"pixel ensemble {path}: tensor {k} is {tensors[k].dtype} {tuple(tensors[k].shape)}, "
                    f"expected {v.dtype} {tuple(v.shape)}"
                )
        ens.load_state_dict(tensors)
        return ens.to(map_location)

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, num_classes={self.num_classes}, members={self.members}, "
                f"widths={self.widths}, seed={self.seed}, source_id={self.source_id!r}")
