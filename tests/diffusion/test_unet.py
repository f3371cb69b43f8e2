"""The guided-diffusion compatible UNet: key layout, function, checkpoint I/O and errors."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddps_core.diffusion import (
    UNetConfig,
    get_preset,
    list_presets,
    load_state_dict,
    load_unet,
    save_unet,
    state_dict_hash,
    timestep_embedding,
)
from ddps_core.diffusion.unet import QKVAttention, QKVAttentionLegacy, randomize_zero_init_
from ddps_core.errors import CheckpointError, ConfigError



# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def spec_dir() -> Path:
    """The official checkpoints' state-dict keys and shapes (``name [shape]`` per line), read
    from guided-diffusion's released ``ffhq.pt`` layout: the fixture the UNet must load."""
    return Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys"


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (spec_dir() / name).read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split(" ", 1)
        out[key] = tuple(int(s) for s in shape.strip().strip("[]").split(",") if s.strip())
    return out


def randomize_all_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (including the zero-initialised ones), activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def small32(**flags) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_all_(get_preset("small32-spec", **flags).build()).eval()


# --------------------------------------------------------------------------------------------
# key layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "keyfile", "n_keys", "n_params"),
    [
        ("adm-256-lsun", "guided_diffusion_256_keys.txt", 566, 552_814_086),
        ("small32-spec", "guided_diffusion_small32_keys.txt", 144, 828_358),
    ],
)
def test_state_dict_matches_official_layout(preset, keyfile, n_keys, n_params):
    expected = read_keys(keyfile)
    assert len(expected) == n_keys
    with torch.device("meta"):
        model = get_preset(preset).build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not bad
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sum(math.prod(s) for s in expected.values()) == n_params


def test_presets_and_config_flags():
    assert set(list_presets()) >= {"adm-256-lsun", "small32-spec", "tiny32", "tiny64"}
    with torch.device("meta"):
        tiny = get_preset("tiny32").build()
    n = sum(p.numel() for p in tiny.parameters())
    assert 1.3e6 < n < 1.5e6
    assert UNetConfig(image_size=256, attention_resolutions="32,16,8").attention_ds() == (8, 16, 32)
    assert UNetConfig(image_size=256).resolved_channel_mult() == (1, 1, 2, 2, 4, 4)
    assert UNetConfig(image_size=64, channel_mult="1,2,3,4").resolved_channel_mult() == (1, 2, 3, 4)
    assert get_preset("tiny32", dropout=0.1).dropout == 0.1
    with pytest.raises(ConfigError, match="tiny32"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="unknown UNet flag"):
        get_preset("tiny32", bogus=1)
    with pytest.raises(ConfigError):
        UNetConfig(image_size=48).resolved_channel_mult()


def test_plain_resample_and_class_cond_layout():
    cfg = get_preset("small32-spec", resblock_updown=False, class_cond=True, num_classes=10)
    model = cfg.build()
    sd = model.state_dict()
    assert sd["input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert sd["output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)
    assert sd["label_emb.weight"].shape == (10, 128)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([3, 7]), y=torch.tensor([1, 2]))
    assert out.shape == (2, 6, 32, 32)
    with pytest.raises(ValueError):
        model(x, torch.tensor([3, 7]))


# --------------------------------------------------------------------------------------------
# function: an independent functional re-implementation of the small32 forward pass
# --------------------------------------------------------------------------------------------


def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    j = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * j / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def ref_forward(sd, x, t, *, head_ch=16, updown=True, scale_shift=True, legacy=True):
    def gn(h, p):  # GroupNorm(32) in float32
        return F.group_norm(h.float(), 32, sd[p + ".weight"], sd[p + ".bias"]).type(h.dtype)

    def conv(h, p, **kw):
        return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def res(h, emb, p, mode=None):
        co = sd[p + ".in_layers.2.weight"].shape[0]
        a = F.silu(gn(h, p + ".in_layers.0"))
        if mode == "down":
            a, h = F.avg_pool2d(a, 2), F.avg_pool2d(h, 2)
        elif mode == "up":
            a, h = F.interpolate(a, scale_factor=2.0, mode="nearest"), F.interpolate(h, scale_factor=2.0, mode="nearest")
        a = conv(a, p + ".in_layers.2", padding=1)
        e = F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])[:, :, None, None]
        if scale_shift:
            scale, shift = e[:, :co], e[:, co:]
            a = gn(a, p + ".out_layers.0") * (1 + scale) + shift
        else:
            a = gn(a + e, p + ".out_layers.0")
        a = conv(F.silu(a), p + ".out_layers.3", padding=1)
        skip = conv(h, p + ".skip_connection") if p + ".skip_connection.weight" in sd else h
        return skip + a

    def attn(h, p):
        b, c, hh, ww = h.shape
        xs = h.reshape(b, c, hh * ww)
        n = F.group_norm(xs, 32, sd[p + ".norm.weight"], sd[p + ".norm.bias"])
        qkv = F.conv1d(n, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"])
        heads = c // head_ch
        if legacy:  # per head: [q, k, v]
            q, k, v = qkv.reshape(b, heads, 3, head_ch, -1).unbind(2)
        else:  # q for all heads, then k, then v
            q, k, v = qkv.reshape(b, 3, heads, head_ch, -1).unbind(1)
        w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(head_ch), dim=-1)
        a = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, c, -1)
        return (xs + F.conv1d(a, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])).reshape(b, c, hh, ww)

    def down(h, emb, p):
        return res(h, emb, p, "down") if updown else conv(h, p + ".op", stride=2, padding=1)

    def up(h, emb, p):
        if updown:
            return res(h, emb, p, "up")
        return conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), p + ".conv", padding=1)

    emb = ref_timestep_embedding(t, 32)
    emb = F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])

    hs = []
    h = conv(x, "input_blocks.0.0", padding=1)
    hs.append(h)
    h = res(h, emb, "input_blocks.1.0")
    hs.append(h)
    h = down(h, emb, "input_blocks.2.0")
    hs.append(h)
    h = attn(res(h, emb, "input_blocks.3.0"), "input_blocks.3.1")
    hs.append(h)

    h = res(h, emb, "middle_block.0")
    h = attn(h, "middle_block.1")
    h = res(h, emb, "middle_block.2")

    h = torch.cat([h, hs.pop()], 1)
    h = attn(res(h, emb, "output_blocks.0.0"), "output_blocks.0.1")
    h = torch.cat([h, hs.pop()], 1)
    h = attn(res(h, emb, "output_blocks.1.0"), "output_blocks.1.1")
    h = up(h, emb, "output_blocks.1.2")
    h = torch.cat([h, hs.pop()], 1)
    h = res(h, emb, "output_blocks.2.0")
    h = torch.cat([h, hs.pop()], 1)
    h = res(h, emb, "output_blocks.3.0")
    assert not hs

    h = F.silu(gn(h, "out.0"))
    return conv(h, "out.2", padding=1)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"resblock_updown": False, "use_scale_shift_norm": False, "use_new_attention_order": True},
    ],
    ids=["official", "plain-resample-addnorm-neworder"],
)
def test_forward_matches_functional_reference(flags):
    model = small32(**flags)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 3, 250, 999])
    with torch.no_grad():
        got = model(x, t)
        want = ref_forward(
            sd,
            x,
            t,
            updown=flags.get("resblock_updown", True),
            scale_shift=flags.get("use_scale_shift_norm", True),
            legacy=not flags.get("use_new_attention_order", False),
        )
    assert got.shape == (4, 6, 32, 32)
    assert want.abs().mean() > 0.1  # a meaningful, non-degenerate output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 7.5, 999.0])
    dim = 10
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for i, tv in enumerate(t.tolist()):
        for j in range(dim // 2):
            f = 10000.0 ** (-j / (dim // 2))
            assert emb[i, j].item() == pytest.approx(math.cos(tv * f), abs=1e-4)
            assert emb[i, j + dim // 2].item() == pytest.approx(math.sin(tv * f), abs=1e-4)
    assert timestep_embedding(t, 7)[:, -1].abs().max() == 0  # odd dim: zero pad


def test_attention_orders_on_hand_built_qkv():
    heads, ch, T = 2, 2, 3
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 3 * heads * ch, T, generator=g)
    rows = qkv[0]

    def attend(q, k, v):  # (ch, T) each, explicit loops
        out = torch.zeros(ch, T)
        for ti in range(T):
            logits = torch.tensor([sum(q[c, ti] * k[c, s] for c in range(ch)) / math.sqrt(ch) for s in range(T)])
            w = torch.softmax(logits, 0)
            for c in range(ch):
                out[c, ti] = sum(w[s] * v[c, s] for s in range(T))
        return out

    # legacy: channel blocks [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1]
    legacy = torch.cat([attend(*(rows[(3 * h + i) * ch : (3 * h + i + 1) * ch] for i in range(3))) for h in range(heads)])
    # new: [q_h0, q_h1, k_h0, k_h1, v_h0, v_h1]
    new = torch.cat([attend(*(rows[(i * heads + h) * ch : (i * heads + h + 1) * ch] for i in range(3))) for h in range(heads)])
    torch.testing.assert_close(QKVAttentionLegacy(heads)(qkv)[0], legacy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(QKVAttention(heads)(qkv)[0], new, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(legacy, new)


def test_fp16_conversion_is_structural():
    model = small32()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([5, 500])
    with torch.no_grad():
        ref = model(x, t)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    for name, p in model.named_parameters():
        is_block_conv = name.startswith(("input_blocks", "middle_block", "output_blocks")) and (
            p.dim() >= 3 or any(s in name for s in (".qkv.", ".proj_out.", ".op.", ".conv.", "in_layers.2", "out_layers.3", "skip_connection", "input_blocks.0.0"))
        )
        assert p.dtype == (torch.float16 if is_block_conv else torch.float32), name
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    assert model.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    try:
        with torch.no_grad():
            half = model(x, t)
    except RuntimeError as exc:  # half kernels missing on this CPU build
        pytest.skip(f"half forward unsupported here: {exc}")
    assert half.dtype == torch.float32
    assert (half - ref).abs().mean() < 0.05 * ref.abs().mean()
    model.convert_to_fp32()
    assert model.dtype == torch.float32


def test_randomize_zero_init():
    model = get_preset("small32-spec").build()
    assert model.out[2].weight.abs().max() == 0
    assert model.input_blocks[1][0].out_layers[3].weight.abs().max() == 0
    randomize_zero_init_(model, torch.Generator().manual_seed(0))
    assert model.out[2].weight.abs().max() > 0
    assert model.input_blocks[3][1].proj_out.weight.abs().max() > 0
    assert model.input_blocks[1][0].out_layers[3].weight.abs().max() > 0


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    model = small32()
    path = save_unet(model, tmp_path / f"m{suffix}")
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
    loaded = load_unet(path, "small32-spec")
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))
    assert state_dict_hash(model.state_dict()) == state_dict_hash(loaded.state_dict())


def test_wrapped_and_prefixed_state_dicts(tmp_path):
    model = small32()
    sd = model.state_dict()
    torch.save({"model": sd}, tmp_path / "a.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "step": 3}, tmp_path / "b.pth")
    for name in ("a.pt", "b.pth"):
        loaded = load_unet(tmp_path / name, "small32-spec")
        assert state_dict_hash(loaded.state_dict()) == state_dict_hash(sd)


def test_fp16_config_loads_float32_weights(tmp_path):
    model = small32()
    save_unet(model, tmp_path / "m.pt")
    loaded = load_unet(tmp_path / "m.pt", "small32-spec", use_fp16=True)
    assert loaded.dtype == torch.float16
    assert loaded.out[2].weight.dtype == torch.float32
    # saving an fp16 model writes float32 again
    save_unet(loaded, tmp_path / "h.safetensors")
    assert all(v.dtype == torch.float32 for v in load_state_dict(tmp_path / "h.safetensors").values())


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    sd = dict(small32().state_dict())
    del sd["middle_block.1.qkv.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, "small32-spec")
    msg = str(info.value)
    assert str(path) in msg and "small32-spec" in msg
    assert "1 missing key(s): middle_block.1.qkv.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "out.2.weight (expected [6, 32, 3, 3], got [3, 32, 3, 3])" in msg


def test_mismatch_with_wrong_preset_truncates_lists(tmp_path):
    path = save_unet(small32(), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*\(\+\d+ more\)") as info:
        load_unet(path, "tiny32")
    assert "tiny32" in str(info.value)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    # control: the payload is armed (a plain unpickle runs it)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()

    zipped = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, zipped)
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match="not a plain weights file") as info:
            load_unet(path, "small32-spec")
        assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_or_garbage_file(tmp_path, suffix):
    path = save_unet(small32(), tmp_path / f"m{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable") as info:
        load_unet(path, "small32-spec")
    assert str(path) in str(info.value)

    garbage = tmp_path / f"g{suffix}"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=str(garbage)):
        load_unet(garbage, "small32-spec")
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tmp_path / f"missing{suffix}", "small32-spec")


def test_non_state_dict_content(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_unet(path, "small32-spec")
    path2 = tmp_path / "mixed.pt"
    torch.save({"a": torch.zeros(1), "b": 3}, path2)
    with pytest.raises(CheckpointError, match="'b' is a int"):
        load_unet(path2, "small32-spec")


def test_state_dict_hash_is_stable_and_sensitive():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2, dtype=torch.bfloat16)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert state_dict_hash(a) == state_dict_hash(b)
    b["x"][0] = 1e-7
    assert state_dict_hash(a) != state_dict_hash(b)
    assert state_dict_hash(a) != state_dict_hash({"x": a["x"].double(), "y": a["y"]})
    assert len(state_dict_hash(a)) == 16


def test_load_unet_unknown_preset_is_a_config_error(tmp_path):
    path = save_unet(small32(), tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="valid presets"):
        load_unet(path, "no-such-preset")
    with pytest.raises(ConfigError, match="unknown UNet flag"):
        load_unet(path, "small32-spec", num_chanels=32)
