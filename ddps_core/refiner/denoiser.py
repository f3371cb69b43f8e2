"""The DDPS denoiser: a time-embedded U-Net that predicts x_0 logits from a noisy mask and the
base segmentor's decoder features (docs/method.md).

Input: the noisy mask ``x [B, h, w]`` (long, K classes) enters through a learned embedding
(K -> ``embed_dim`` = 16 channels) and is concatenated with the base features
``F [B, C, h, w]`` (stride 4 of the image); the network step ``t [B]`` (0 = noisiest) is
embedded sinusoidally and fed to every residual block as a FiLM scale and shift
(``norm(h) * (1 + scale) + shift``). The output is x_0 logits ``[B, K, h, w]`` at the feature
resolution; callers upsample them to the label size.

Why a learned embedding and not a one-hot: with K = 150 (ADE20K) a one-hot input would be a
150-channel sparse tensor next to 256 feature channels; the 16-channel embedding is what the
reference uses and keeps the mask a small part of the input.

Sizes: the U-Net halves the resolution ``len(channel_mult) - 1`` times. Any ``h, w`` works:
the input is padded on the bottom/right (replicate) to a multiple of ``2**(levels-1)`` and the
output is cropped back, so feature maps of odd sizes (an image of 52 px gives 13) need no
special handling by the caller.

Zero initialisation: the second convolution of every residual block and the attention
projection start at zero, so every block starts as the identity and the initial network is a
shallow map of its input (stable early training, the guided-diffusion convention). The output
convolution is *not* zeroed, so the untrained network already depends on its inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ddps_core.diffusion.nn import timestep_embedding

__all__ = [
    "DENOISER_PRESETS",
    "DenoiserConfig",
    "MaskDenoiser",
    "count_parameters",
    "denoiser_preset",
    "describe",
    "parameter_counts",
]


def _groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is <= ``max_groups`` (GroupNorm needs one)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM from the time embedding, GroupNorm-SiLU-dropout-conv, skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = _norm(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions (used at the lowest resolution only,
    where h*w is small: it lets far-apart regions of the mask agree on their classes)."""

    def __init__(self, channels: int, head_channels: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


@dataclass(frozen=True)
class DenoiserConfig:
    """Everything needed to rebuild a :class:`MaskDenoiser` (stored in ``model.json``).

    :param num_classes: K.
    :param feature_channels: C of the base features F.
    :param width: channels at the first level.
    :param channel_mult: width multiplier per level; ``len - 1`` downsamplings.
    :param num_res_blocks: residual blocks per level (encoder; the decoder has one more).
    :param embed_dim: mask embedding channels (16 in the reference).
    :param head_channels: channels per attention head at the lowest level.
    :param dropout: dropout inside residual blocks.
    """

    num_classes: int
    feature_channels: int
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    embed_dim: int = 16
    head_channels: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.num_classes < 2 or self.feature_channels < 0 or self.width < 1 or self.embed_dim < 1:
            raise ValueError(f"invalid denoiser config {self}")
        if not self.channel_mult or min(self.channel_mult) < 1 or self.num_res_blocks < 1:
            raise ValueError(f"channel_mult must be non-empty and positive, num_res_blocks >= 1: {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DenoiserConfig:
        return cls(**{**d, "channel_mult": tuple(d["channel_mult"])})

    def build(self) -> MaskDenoiser:
        return MaskDenoiser(self)


class MaskDenoiser(nn.Module):
    """``forward(x, t, features) -> logits``: x long ``[B, h, w]``, t long ``[B]`` (network
    step, 0 = noisiest), features ``[B, C, h, w]`` -> x_0 logits ``[B, K, h, w]``.

    Guidance calls it with ``features`` zeroed (the unconditional branch); nothing else is
    needed for that, the same weights serve both.
    """

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = cfg = config
        self.num_classes = cfg.num_classes
        self.feature_channels = cfg.feature_channels
        self.levels = len(cfg.channel_mult)
        emb_dim = 4 * cfg.width
        self.mask_embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
        self.time_embed = nn.Sequential(nn.Linear(cfg.width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(cfg.feature_channels + cfg.embed_dim, cfg.width, 3, padding=1)

        chans = [cfg.width]
        ch = cfg.width
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, cfg.width * mult, emb_dim, cfg.dropout))
                ch = cfg.width * mult
                chans.append(ch)
            down = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if level < self.levels - 1 else None
            if down is not None:
                chans.append(ch)
            self.down.append(nn.ModuleDict({"blocks": blocks, **({"down": down} if down is not None else {})}))

        self.mid1 = ResBlock(ch, ch, emb_dim, cfg.dropout)
        self.mid_attn = AttentionBlock(ch, cfg.head_channels)
        self.mid2 = ResBlock(ch, ch, emb_dim, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch + chans.pop(), cfg.width * mult, emb_dim, cfg.dropout))
                ch = cfg.width * mult
            up = nn.Conv2d(ch, ch, 3, padding=1) if level > 0 else None
            self.up.append(nn.ModuleDict({"blocks": blocks, **({"up": up} if up is not None else {})}))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.num_classes, 3, padding=1))

    @property
    def multiple(self) -> int:
        """Input sizes are padded internally to a multiple of this."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or features.dim() != 4 or features.shape[0] != x.shape[0] or features.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"mask {tuple(x.shape)} and features {tuple(features.shape)} do not match "
                             "(expected [B, h, w] and [B, C, h, w])")
        if features.shape[1] != self.feature_channels:
            raise ValueError(f"features have {features.shape[1]} channels, the denoiser expects {self.feature_channels}")
        h, w = x.shape[-2:]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.width).to(features.dtype))
        inp = torch.cat([self.mask_embed(x.long()).permute(0, 3, 1, 2).to(features.dtype), features], dim=1)
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            inp = F.pad(inp, (0, pw, 0, ph), mode="replicate")

        hs = [self.input_conv(inp)]
        hcur = hs[-1]
        for level in self.down:
            for block in level["blocks"]:
                hcur = block(hcur, emb)
                hs.append(hcur)
            if "down" in level:
                hcur = level["down"](hcur)
                hs.append(hcur)
        hcur = self.mid2(self.mid_attn(self.mid1(hcur, emb)), emb)
        for level in self.up:
            for block in level["blocks"]:
                hcur = block(torch.cat([hcur, hs.pop()], dim=1), emb)
            if "up" in level:
                hcur = level["up"](F.interpolate(hcur, scale_factor=2.0, mode="nearest"))
        out = self.out(hcur)
        return out[..., :h, :w]


# --------------------------------------------------------------------------------------------
# presets and parameter counts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Preset:
    """A denoiser shape; ``num_classes`` and ``feature_channels`` come from the data and the
    base (the defaults here are what ``ddps ddps info`` prints counts for)."""

    description: str
    width: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    num_classes: int
    feature_channels: int
    extra: dict = field(default_factory=dict)


DENOISER_PRESETS: dict[str, _Preset] = {
    # Our choice for the paper's headline configuration: SegFormer-B2's MLP decode head has
    # 256 channels at stride 4 (mmseg's ``channels=256``), ADE20K has 150 classes. The
    # paper does not fix the denoiser's size; width 64 / (1, 2, 4) / 2 blocks gives 15.4 M
    # parameters, about half of SegFormer-B2 itself (27 M), and its lowest level (stride 16
    # of the image, 32 x 32 positions at 512 px) is cheap for attention.
    "ddps-segformer-b2": _Preset("DDPS-SegFormer-B2-like: ADE20K (K=150), F = 256 ch at stride 4",
                                 width=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                                 num_classes=150, feature_channels=256),
    # The embedded synthetic domain (7 classes, 32 px images -> 8 x 8 features): two levels,
    # one block each, a few hundred thousand parameters; trains in minutes on CPU.
    "tiny": _Preset("synthetic 32 px domain: K=7, 8 x 8 features", width=32, channel_mult=(1, 2),
                    num_res_blocks=1, num_classes=7, feature_channels=256),
    "small": _Preset("64-128 px domains on CPU / small GPU", width=64, channel_mult=(1, 2, 2),
                     num_res_blocks=2, num_classes=7, feature_channels=256),
}


def denoiser_preset(name: str, num_classes: int | None = None, feature_channels: int | None = None,
                    **overrides) -> DenoiserConfig:
    """The :class:`DenoiserConfig` of preset ``name`` for a given K and C (preset defaults
    when None); ``overrides`` replace any field (e.g. ``width=48``)."""
    try:
        p = DENOISER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown denoiser preset {name!r} (known: {', '.join(DENOISER_PRESETS)})") from None
    base = {"num_classes": num_classes or p.num_classes,
            "feature_channels": p.feature_channels if feature_channels is None else feature_channels,
            "width": p.width, "channel_mult": p.channel_mult, "num_res_blocks": p.num_res_blocks, **p.extra}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return DenoiserConfig(**base)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(config: DenoiserConfig) -> dict[str, int]:
    """Parameter counts of a denoiser by part, built on the meta device (no memory, instant
    even for the large preset): ``mask_embed``, ``time_embed``, ``input_conv``, ``unet``
    (every other block), ``total``."""
    with torch.device("meta"):
        model = MaskDenoiser(config)
    parts = {name: count_parameters(getattr(model, name)) for name in ("mask_embed", "time_embed", "input_conv")}
    total = count_parameters(model)
    parts["unet"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def describe(config: DenoiserConfig) -> str:
    """One line for ``ddps ddps info``: the shape and the parameter count."""
    c = parameter_counts(config)
    return (f"K={config.num_classes} C={config.feature_channels} width={config.width} "
            f"mult={config.channel_mult} blocks={config.num_res_blocks}: {c['total'] / 1e6:.2f} M "
            f"(~{math.ceil(c['total'] * 4 / 2**20)} MiB fp32)")
