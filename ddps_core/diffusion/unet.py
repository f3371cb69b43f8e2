"""A UNet with exactly the module layout and function of OpenAI guided-diffusion's ``UNetModel``.

Written from the architecture description in docs/method.md so that the official
checkpoints (ffhq.pt, lsun_*.pt) load with ``strict=True`` and compute the same outputs.
State-dict key names are part of the contract:

- ``time_embed.{0,2}`` (Linear, SiLU, Linear) and, when class-conditional, ``label_emb``;
- ``input_blocks.N.M``, ``middle_block.{0,1,2}``, ``output_blocks.N.M``: each block is a
  :class:`TimestepEmbedSequential` of :class:`ResBlock` / :class:`AttentionBlock` /
  :class:`Downsample` / :class:`Upsample`;
- ``out.{0,2}`` (GroupNorm32, SiLU, Conv).

Hooks on ``output_blocks[i]`` see the output of the whole block (including a trailing
up-sampling block), which is what DDPM-Seg's feature extractor uses.

:class:`UNetConfig` / :func:`create_model` mirror guided-diffusion's ``create_model`` flags:
``attention_resolutions`` is a comma string of *resolutions* ("32,16,8") converted to
down-sampling factors ``ds = image_size // res``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _grad_checkpoint

from ddps_core.errors import ConfigError

from .nn import (
    avg_pool_nd,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "AttentionBlock",
    "Downsample",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetConfig",
    "UNetModel",
    "Upsample",
    "create_model",
    "default_channel_mult",
    "make_config",
    "randomize_zero_init_",
]


# --------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential container that passes ``emb`` to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 up-sampling, optionally followed by a 3x3 convolution ``conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expected {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:  # 3-D signals are resampled in their two inner dimensions only
            x = F.interpolate(x, size=(x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 down-sampling: a stride-2 3x3 convolution ``op``, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    ``in_layers`` = [GroupNorm32, SiLU, conv3x3]; ``emb_layers`` = [SiLU, Linear(emb, Co or
    2*Co)]; ``out_layers`` = [GroupNorm32, SiLU, Dropout, conv3x3 (zero-initialised)];
    ``skip_connection`` = Identity, conv3x3 (``use_conv``) or conv1x1. With ``up``/``down``, h
    and x are resampled (parameter-free) between in_layers' SiLU and its convolution.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _grad_checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a packed qkv tensor, heads split first (legacy order).

    ``qkv`` (B, 3*H*ch, T) is viewed as (B*H, 3*ch, T), i.e. the channels of each head are
    grouped as [q, k, v].
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)
        return _attend(q, k, v, ch).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Multi-head attention on a packed qkv tensor, q/k/v split first (new order).

    ``qkv`` (B, 3*H*ch, T) is chunked into q, k, v along channels, each then viewed as
    (B*H, ch, T).
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _attend(q, k, v, ch).reshape(bs, -1, length)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ch: int) -> torch.Tensor:
    """Scaled dot-product attention over the last axis; (B', ch, T) layout in and out.

    q and k are each scaled by ch^(-1/4) (more stable in fp16 than scaling the product);
    the softmax runs in float32 and is cast back to the input dtype.
    """
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


class AttentionBlock(nn.Module):
    """Spatial self-attention: ``norm``, ``qkv`` (Conv1d C->3C), ``attention``, ``proj_out``.

    heads = ``channels // num_head_channels`` if ``num_head_channels != -1`` else
    ``num_heads``. ``proj_out`` is zero-initialised; output = x + proj_out(attention).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _grad_checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.attention(self.qkv(self.norm(x)))
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """guided-diffusion's UNet (same constructor flags, same state-dict keys, same function).

    :param attention_resolutions: the down-sampling factors ``ds`` (1, 2, 4, ...) at which
        attention is used — *not* pixel resolutions (see :class:`UNetConfig` for those).
    :param use_checkpoint: gradient checkpointing of every block while training.
    :param use_fp16: build, then call :meth:`convert_to_fp16` (conv weights of the
        input/middle/output blocks become half; everything else stays float32).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = tuple(int(a) for a in attention_resolutions)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
            return ResBlock(
                ch_in,
                emb_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [res(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

        self.use_fp16 = False
        if use_fp16:
            self.convert_to_fp16()

    # -- precision ---------------------------------------------------------------------------

    def _blocks(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def convert_to_fp16(self) -> None:
        """Cast the convolutions of the input/middle/output blocks to float16."""
        for block in self._blocks():
            block.apply(convert_module_to_f16)
        self.use_fp16 = True

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        for block in self._blocks():
            block.apply(convert_module_to_f32)
        self.use_fp16 = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the blocks compute in (float16 after :meth:`convert_to_fp16`)."""
        return next(self.input_blocks.parameters()).dtype

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: (N, C, H, W) input; :param timesteps: (N,) raw timesteps; :param y: (N,)
        class labels when class-conditional. Returns (N, out_channels, H, W) in x's dtype."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def randomize_zero_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give the layers guided-diffusion zero-initialises (the last conv of every ResBlock,
    every attention ``proj_out`` and the output conv) PyTorch's default random init instead.

    A "random UNet" feature baseline otherwise passes its input mostly through the skips
    (docs/method.md). ``generator`` makes the draw reproducible.
    """
    targets: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, ResBlock):
            targets.append(m.out_layers[-1])
        elif isinstance(m, AttentionBlock):
            targets.append(m.proj_out)
    if isinstance(model, UNetModel):
        targets.append(model.out[-1])
    with torch.no_grad():
        for conv in targets:
            fan_in = conv.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            for p in (conv.weight, conv.bias):
                if p is None:
                    continue
                device = generator.device if generator is not None else p.device
                r = torch.rand(p.shape, generator=generator, dtype=torch.float32, device=device)
                p.copy_((r * 2 - 1) * bound)
    return model


# --------------------------------------------------------------------------------------------
# guided-diffusion style flags
# --------------------------------------------------------------------------------------------

_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's channel multipliers by image size (32 is this project's addition)."""
    try:
        return _DEFAULT_CHANNEL_MULT[image_size]
    except KeyError:
        raise ConfigError(
            f"no default channel_mult for image_size {image_size} "
            f"(known: {sorted(_DEFAULT_CHANNEL_MULT)}); set channel_mult explicitly"
        ) from None


def _parse_number(text: str) -> float:
    v = float(text)
    return int(v) if v.is_integer() else v


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """guided-diffusion's ``create_model`` flags (same names, same meaning, same defaults).

    ``channel_mult``: "" (default for ``image_size``), a comma string "1,1,2,2,4,4" or a
    tuple. ``attention_resolutions``: comma string of pixel resolutions ("32,16,8"), each
    converted to ``ds = image_size // res``; a tuple of ints is read the same way.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: str | tuple[float, ...] = ""
    learn_sigma: bool = False
    class_cond: bool = False
    use_checkpoint: bool = False
    attention_resolutions: str | tuple[int, ...] = "16,8"
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    dropout: float = 0.0
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    in_channels: int = 3
    num_classes: int = 1000  # only used when class_cond

    def resolved_channel_mult(self) -> tuple[float, ...]:
        cm = self.channel_mult
        if cm == "" or cm is None or cm == ():
            return default_channel_mult(self.image_size)
        if isinstance(cm, str):
            try:
                return tuple(_parse_number(c) for c in cm.split(",") if c.strip())
            except ValueError:
                raise ConfigError(f"channel_mult {cm!r} is not a comma list of numbers") from None
        return tuple(cm)

    def attention_ds(self) -> tuple[int, ...]:
        """Down-sampling factors at which attention is used (``image_size // res``)."""
        ar = self.attention_resolutions
        if isinstance(ar, str):
            try:
                res = [int(r) for r in ar.split(",") if r.strip()]
            except ValueError:
                raise ConfigError(f"attention_resolutions {ar!r} is not a comma list of integers") from None
        else:
            res = [int(r) for r in ar]
        for r in res:
            if r <= 0 or self.image_size % r:
                raise ConfigError(f"attention resolution {r} does not divide image_size {self.image_size}")
        return tuple(self.image_size // r for r in res)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self) -> UNetModel:
        """Construct the :class:`UNetModel` these flags describe."""
        return UNetModel(
            image_size=self.image_size,
            in_channels=self.in_channels,
            model_channels=self.num_channels,
            out_channels=self.out_channels,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_ds(),
            dropout=self.dropout,
            channel_mult=self.resolved_channel_mult(),
            num_classes=self.num_classes if self.class_cond else None,
            use_checkpoint=self.use_checkpoint,
            use_fp16=self.use_fp16,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            use_new_attention_order=self.use_new_attention_order,
        )


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(UNetConfig)}


def make_config(base: UNetConfig | None = None, **flags: Any) -> UNetConfig:
    """``base`` (or the defaults) with ``flags`` replaced; unknown flags -> ConfigError."""
    unknown = sorted(set(flags) - _CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"unknown UNet flag(s) {unknown}; valid flags: {sorted(_CONFIG_FIELDS)}")
    return dataclasses.replace(base or UNetConfig(), **flags)


def create_model(**flags: Any) -> UNetModel:
    """Build a UNet from guided-diffusion style flags (see :class:`UNetConfig`)."""
    return make_config(**flags).build()
