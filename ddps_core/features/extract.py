"""DDPM-Seg pixel features: hooked activations of a diffusion UNet's decoder blocks.

:class:`FeatureExtractor` noises an image batch to each configured timestep with ONE fixed
noise tensor (``share_noise`` of the reference), runs the UNet and returns the outputs of the
chosen ``output_blocks`` at their native resolution, in float32 on the CPU. Upsampling to the
image size happens later, on demand (:mod:`ddps_core.features.store`).

Early stop: a forward hook on the last (highest-index) hooked output block raises a private
exception once it has recorded its output; :meth:`FeatureExtractor.__call__` catches it. The
remaining output blocks and the ``out`` head are therefore never computed (their results
would be thrown away). The hooks only read activations, so the model is otherwise untouched
and keeps working normally outside the extractor (hooks are registered only during a call).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddps_core.datasets import to_square
from ddps_core.device import autocast, memory_format
from ddps_core.errors import ConfigError

__all__ = ["NOISE_DEVICES", "FeatureExtractor", "array_name", "preprocess", "shared_noise"]


def array_name(t: int, block: int) -> str:
    """The store array / feature name of timestep ``t`` and output block ``block``."""
    return f"t{int(t)}_b{int(block)}"


NOISE_DEVICES = ("cpu", "model")


def shared_noise(image_size: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """The shared noise ``randn(1, 3, S, S)``, drawn on ``device`` by a generator on that
    device seeded ``seed`` (the reference's draw, with its ``dev()`` as ``device``), returned
    on the CPU.

    CPU and CUDA generators are different algorithms, so the same seed gives different noise
    on each; on the CPU, ``device="cpu"`` is exactly the reference's draw on a machine
    without a GPU.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    noise = torch.randn((1, 3, int(image_size), int(image_size)), generator=gen, device=device)
    return noise.cpu()


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``HxWx3`` -> float32 ``[3, size, size]`` in [-1, 1] (resize short side, centre
    crop: :func:`~ddps_core.datasets.to_square`)."""
    img, _ = to_square(np.asarray(image), None, int(size))
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(torch.float32)
    return x / 127.5 - 1.0


class _StopForward(Exception):
    """Raised by the last feature hook to skip the rest of the UNet."""


def _check_int_list(values: Sequence[int], what: str, lo: int, hi: int) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"features.{what}: {v!r} is not an integer (valid range {lo}..{hi})")
        if not lo <= int(v) <= hi:
            raise ConfigError(f"features.{what}: {int(v)} is out of range (valid range {lo}..{hi})")
        out.append(int(v))
    if not out:
        raise ConfigError(f"features.{what}: must not be empty (valid range {lo}..{hi})")
    if len(set(out)) != len(out):
        raise ConfigError(f"features.{what}: duplicate entries in {out}")
    return out


class FeatureExtractor:
    """Hook the UNet's decoder blocks and return DDPM-Seg features.

    :param model: a guided-diffusion :class:`~ddps_core.diffusion.UNetModel` (eval mode is set).
    :param diffusion: the Gaussian schedule whose ``q_sample`` noises the input.
    :param steps: timesteps, in the order the features are concatenated.
    :param blocks: indices into ``model.output_blocks`` (None: all of them); stored ascending.
    :param noise_seed: seed of the shared noise (ignored when ``noise`` is given).
    :param noise: an explicit ``(1, 3, S, S)`` (or ``(3, S, S)``) noise tensor.
    :param device: where the UNet runs; on CUDA it runs under bf16 autocast (see the next two).
    :param mixed_precision: bf16 autocast on CUDA (default); False computes in float32.
    :param channels_last: the UNet's memory layout on CUDA (None: the default of
        :func:`~ddps_core.device.memory_format`, contiguous, which measured faster).
    :param model_id: the checkpoint's id recorded in feature stores (default: the
        :func:`~ddps_core.diffusion.state_dict_hash` of the model's weights as float32; pass
        the hash of the checkpoint file's state dict for fp16 models).
    :param noise_device: where the shared noise is drawn: ``"cpu"`` (the same noise on any
        machine) or ``"model"`` (on ``device``, as the reference does, so the features match
        a CUDA reference run; on a CPU model the same as ``"cpu"``). A meta-device extractor
        (shapes only) draws on the CPU. Ignored when ``noise`` is given.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion,
        steps: Sequence[int],
        blocks: Sequence[int] | None = None,
        noise_seed: int = 0,
        noise: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        model_id: str | None = None,
        mixed_precision: bool = True,
        channels_last: bool | None = None,
        noise_device: str = "cpu",
    ):
        self.device = torch.device(device)
        self.mixed_precision = bool(mixed_precision)
        self.memory_format = memory_format(channels_last)
        n_blocks = len(model.output_blocks)
        if blocks is None:
            blocks = list(range(n_blocks))
        self.blocks = sorted(_check_int_list(list(blocks), "blocks", 0, n_blocks - 1))
        self.steps = _check_int_list(list(steps), "steps", 0, int(diffusion.num_timesteps) - 1)
        self.image_size = int(model.image_size)
        S = self.image_size
        if noise_device not in NOISE_DEVICES:
            raise ConfigError(f"features.noise_device: expected one of {list(NOISE_DEVICES)}, got {noise_device!r}")
        self.noise_device = noise_device
        # the device type the noise was drawn on (None: given); part of noise_id
        self.noise_drawn_on: str | None = None
        if noise is None:
            self.noise_seed: int | None = int(noise_seed)
            draw = self.device if noise_device == "model" and self.device.type != "meta" else torch.device("cpu")
            eps = shared_noise(S, self.noise_seed, draw)
            self.noise_drawn_on = draw.type
        else:
            eps = torch.as_tensor(noise).detach().to("cpu", torch.float32)
            if eps.dim() == 3:
                eps = eps.unsqueeze(0)
            if tuple(eps.shape) != (1, 3, S, S):
                raise ConfigError(f"features.noise: expected shape (1, 3, {S}, {S}), got {tuple(eps.shape)}")
            self.noise_seed = None
        self.noise = eps.contiguous()
        self.diffusion = diffusion
        self.model = model.eval()
        if self.device.type == "cuda":
            self.model.to(self.device, memory_format=self.memory_format)
        else:
            self.model.to(self.device)
        self._model_id: str | None = model_id
        self._shapes: dict[str, tuple[int, int, int]] | None = None
        self._copy_stream = None  # CUDA side stream of extract_into's copies (made on first use)

    # -- names, shapes, identity --------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Feature names in canonical order: timestep-major, then block ascending."""
        return [array_name(t, b) for t in self.steps for b in self.blocks]

    @property
    def model_id(self) -> str:
        """:func:`~ddps_core.diffusion.state_dict_hash` of the model (computed once)."""
        if self._model_id is None:
            from ddps_core.diffusion import state_dict_hash

            sd = {k: (v.float() if v.is_floating_point() else v) for k, v in self.model.state_dict().items()}
            self._model_id = state_dict_hash(sd)
        return self._model_id

    @property
    def noise_id(self) -> str:
        """sha256 (16 hex digits) of the shared noise's float32 bytes, followed by
        ``@<device type>`` when the noise was drawn elsewhere than on the CPU (``@cuda``).

        The tag records in the store which generator made the noise. Noise drawn on the CPU
        (with either ``noise_device``) or given keeps the bare hash, so a CPU draw has one id
        whichever setting asked for it, and stores made before the setting existed stay valid.
        """
        digest = hashlib.sha256(self.noise.numpy().tobytes()).hexdigest()[:16]
        drawn = self.noise_drawn_on
        return digest if drawn in (None, "cpu") else f"{digest}@{drawn}"

    @property
    def schedule_id(self) -> str:
        """sha256 (16 hex digits) of the schedule's float64 betas."""
        betas = np.ascontiguousarray(np.asarray(self.diffusion.betas, dtype=np.float64))
        return hashlib.sha256(betas.tobytes()).hexdigest()[:16]

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """``{name: (C, h, w)}`` of every feature, from one forward on the meta device (no
        compute, no copy of the weights); falls back to a real one-image forward."""
        if self._shapes is None:
            per_block = self._block_shapes()
            self._shapes = {array_name(t, b): per_block[b] for t in self.steps for b in self.blocks}
        return dict(self._shapes)

    def _block_shapes(self) -> dict[int, tuple[int, int, int]]:
        S = self.image_size
        shapes: dict[int, tuple[int, int, int]] = {}

        def sink(b: int, out: torch.Tensor) -> None:
            shapes[b] = tuple(int(s) for s in out.shape[1:])

        try:
            from torch.func import functional_call

            params = {k: torch.empty_like(v, device="meta") for k, v in self.model.named_parameters()}
            params.update({k: torch.empty_like(v, device="meta") for k, v in self.model.named_buffers()})
            x = torch.empty((1, 3, S, S), device="meta")
            t = torch.zeros((1,), dtype=torch.long, device="meta")
            self._hooked(lambda: functional_call(self.model, params, (x, t)), sink)
        except Exception:  # meta not supported by some op: run the real thing on one image
            x = torch.zeros((1, 3, S, S), device=self.device)
            t = torch.zeros((1,), dtype=torch.long, device=self.device)
            with torch.inference_mode():
                self._hooked(lambda: self.model(x, t), sink)
        return shapes

    @property
    def feature_dim(self) -> int:
        """Total channel count D of the concatenated features."""
        return sum(c for c, _, _ in self.shapes().values())

    def store_settings(self) -> dict:
        """The settings a :class:`~ddps_core.features.store.FeatureStore` records for these
        features (pass as keyword arguments to ``FeatureStore.create`` / ``open_or_create``)."""
        return {
            "model_id": self.model_id,
            "steps": list(self.steps),
            "blocks": list(self.blocks),
            "noise_seed": self.noise_seed,
            "noise_id": self.noise_id,
            "schedule_id": self.schedule_id,
            "image_size": self.image_size,
            "shapes": self.shapes(),
        }

    # -- forward ------------------------------------------------------------------------------

    def _hooked(self, run, sink: Callable[[int, torch.Tensor], None]) -> None:
        """Run ``run()`` with forward hooks on the chosen blocks, handing each block's output
        to ``sink(block, output)`` as soon as it exists (nothing is held for the whole
        forward); the forward stops after the last chosen block."""
        seen: set[int] = set()
        last = self.blocks[-1]

        def make_hook(idx: int):
            def hook(_module, _inputs, output):
                sink(idx, output)
                seen.add(idx)
                if idx == last:
                    raise _StopForward

            return hook

        handles = [self.model.output_blocks[b].register_forward_hook(make_hook(b)) for b in self.blocks]
        try:
            run()
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [b for b in self.blocks if b not in seen]
        if missing:  # pragma: no cover - every output block runs before the head
            raise RuntimeError(f"output blocks {missing} did not run")

    def _run_steps(self, x: torch.Tensor, sink: Callable[[int, int, torch.Tensor], None]) -> None:
        """For each step t: ``q_sample`` with the shared noise, the hooked forward, and
        ``sink(t, block, output)`` for every chosen block."""
        S = self.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S):
            raise ValueError(f"expected a [B, 3, {S}, {S}] batch, got {tuple(x.shape)}")
        dev = self.device
        with torch.inference_mode():
            x = x.to(dev, torch.float32)
            eps = self.noise.to(dev).expand_as(x)
            for t in self.steps:
                tt = torch.full((x.shape[0],), t, dtype=torch.long, device=dev)
                xt = self.diffusion.q_sample(x, tt, noise=eps)
                if dev.type == "cuda":
                    xt = xt.contiguous(memory_format=self.memory_format)
                with autocast(dev, enabled=self.mixed_precision):
                    self._hooked(lambda: self.model(xt, tt), lambda b, out, t=t: sink(t, b, out))

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of a batch ``x`` (float ``[B, 3, S, S]`` in [-1, 1]): ``{name: [B, C, h, w]}``
        float32 on the CPU, in canonical order."""
        got: dict[str, torch.Tensor] = {}
        self._run_steps(x, lambda t, b, out: got.__setitem__(
            array_name(t, b), out.to("cpu", torch.float32).contiguous()))
        return {name: got[name] for name in self.names}

    def shard_buffers(self, shapes: dict[str, tuple[int, int, int]], n: int) -> dict[str, np.ndarray]:
        """Uninitialised float16 buffers ``{name: [n, C, h, w]}`` for :meth:`extract_into`.

        On the CPU they are views of ONE ``(n, V)`` block, the maps of an image side by side
        in the order of ``shapes``: the feature store's layout, so the store writes the block
        as it is (:meth:`~ddps_core.features.store.FeatureStore.write_shard`). On CUDA each is
        a contiguous block carved from one pinned (page-locked) allocation, so that
        :meth:`extract_into` copies the features off the GPU asynchronously while the forward
        goes on (a copy into a strided destination would not be asynchronous); the store then
        gathers them into its layout. Where pinning fails (not enough lockable memory), they
        are ordinary memory and the copies are synchronous.
        """
        sizes = {name: n * math.prod(shape) for name, shape in shapes.items()}
        if self.device.type == "cuda":
            try:
                block = torch.empty(sum(sizes.values()), dtype=torch.float16, pin_memory=True).numpy()
            except RuntimeError:  # page-locked memory exhausted: ordinary (pageable) buffers
                return {name: np.empty((n, *shape), np.float16) for name, shape in shapes.items()}
            out, at = {}, 0
            for name, shape in shapes.items():
                out[name] = block[at:at + sizes[name]].reshape(n, *shape)
                at += sizes[name]
            return out
        width = sum(sizes.values()) // max(n, 1)
        block = np.empty((n, width), np.float16)
        out, at = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            out[name] = block[:, at:at + size].reshape(n, *shape)
            at += size
        return out

    def extract_into(self, x: torch.Tensor, buffers: dict[str, np.ndarray], offset: int) -> None:
        """Features of batch ``x`` written as float16 into ``buffers[name][offset:offset+B]``
        (the store's shard buffers) while the forward runs: the same values as
        ``__call__`` followed by a float16 cast, without holding float32 copies.

        On CUDA each block's output is cast on the GPU; into pinned buffers
        (:meth:`shard_buffers`) it is then copied on a side stream, overlapping the rest of
        the forward, and the call returns once every copy has landed. Into ordinary memory
        each copy waits for the GPU."""
        n = x.shape[0]
        stream = None
        if self.device.type == "cuda" and buffers:
            if torch.from_numpy(next(iter(buffers.values()))).is_pinned():
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream(device=self.device)
                stream = self._copy_stream

        def sink(t: int, b: int, out: torch.Tensor) -> None:
            dst = torch.from_numpy(buffers[array_name(t, b)][offset:offset + n])
            if out.device.type == "cpu":
                dst.copy_(out)
                return
            half = out.to(torch.float16, memory_format=torch.contiguous_format)
            if stream is None:
                dst.copy_(half)
                return
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                dst.copy_(half, non_blocking=True)
            half.record_stream(stream)  # not reused by the forward before the copy is done

        try:
            self._run_steps(x, sink)
        finally:
            if stream is not None:
                stream.synchronize()

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        """The reference layout: every feature upsampled to S x S (bilinear, align_corners
        False) and concatenated, ``[B, D, S, S]`` float32. Memory-hungry; for checks."""
        S = self.image_size
        feats = self(x)
        return torch.cat(
            [F.interpolate(f, size=(S, S), mode="bilinear", align_corners=False) for f in feats.values()], dim=1
        )
