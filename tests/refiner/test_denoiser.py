"""DDPS denoiser: output shapes at small and odd feature sizes, every input matters, presets."""

import pytest
import torch

from ddps_core.refiner.denoiser import (
    DENOISER_PRESETS,
    DenoiserConfig,
    MaskDenoiser,
    count_parameters,
    denoiser_preset,
    describe,
    parameter_counts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

K, C = 5, 6


def _build():
    return DenoiserConfig(K, C, width=16, channel_mult=(1, 2, 2), num_res_blocks=1).build().eval()


@pytest.fixture(scope="module")
def model():
    """A denoiser whose zero-initialised layers are perturbed, like a trained one: at
    initialisation the time embedding has no effect yet (every FiLM-ed branch ends in a
    zero convolution), by design."""
    torch.manual_seed(0)
    m = _build()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 12), (13, 9), (5, 7), (1, 1)])
def test_output_shape_at_feature_resolution(model, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, K, (2, *size), generator=g)
    f = torch.randn(2, C, *size, generator=g)
    out = model(x, torch.tensor([0, 7]), f)
    assert out.shape == (2, K, *size) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_padding_does_not_mix_samples(model):
    """Replicate padding and cropping act per sample: a sample's output does not depend on
    what else is in the batch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, K, (3, 13, 9), generator=g)
    f = torch.randn(3, C, 13, 9, generator=g)
    t = torch.tensor([0, 3, 9])
    both = model(x, t, f)
    one = model(x[1:2], t[1:2], f[1:2])
    assert torch.allclose(both[1:2], one, atol=1e-5)


def test_mask_time_and_features_all_affect_the_output(model):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, K, (2, 8, 8), generator=g)
    f = torch.randn(2, C, 8, 8, generator=g)
    t = torch.tensor([0, 0])
    ref = model(x, t, f)
    other_mask = (x + 1) % K
    assert (model(other_mask, t, f) - ref).abs().max() > 1e-3
    assert (model(x, torch.tensor([9, 9]), f) - ref).abs().max() > 1e-4
    assert (model(x, t, torch.zeros_like(f)) - ref).abs().max() > 1e-3
    # the mask changes the output through the embedding: zeroing the embedding removes the
    # difference between two masks
    zeroed = _build()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        zeroed.mask_embed.weight.zero_()
    assert torch.allclose(zeroed(other_mask, t, f), zeroed(x, t, f))


def test_mask_matters_already_at_initialisation():
    torch.manual_seed(3)
    m = _build()
    x = torch.randint(0, K, (1, 8, 8))
    f = torch.randn(1, C, 8, 8)
    assert (m((x + 1) % K, torch.tensor([0]), f) - m(x, torch.tensor([0]), f)).abs().max() > 1e-3


def test_gradients_reach_every_parameter(model):
    m = DenoiserConfig(K, C, width=16, channel_mult=(1, 2), num_res_blocks=1).build()
    x = torch.randint(0, K, (2, 8, 8))
    f = torch.randn(2, C, 8, 8)
    # one step so the zero-initialised convolutions are no longer zero, then all get gradients
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        m(x, torch.tensor([1, 4]), f).square().mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 8, 8, dtype=torch.long), torch.tensor([0]), torch.zeros(1, C + 1, 8, 8))
    with pytest.raises(ValueError, match="do not match"):
        model(torch.zeros(1, 8, 8, dtype=torch.long), torch.tensor([0]), torch.zeros(1, C, 4, 4))


def test_presets_and_parameter_counts():
    cfg = denoiser_preset("ddps-segformer-b2")
    assert (cfg.num_classes, cfg.feature_channels, cfg.embed_dim) == (150, 256, 16)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["mask_embed"] == 150 * 16
    assert counts["input_conv"] == (256 + 16) * 64 * 9 + 64
    assert 5e6 < counts["total"] < 5e7
    assert "M" in describe(cfg)
    tiny = denoiser_preset("tiny", num_classes=3, feature_channels=8, width=8)
    assert tiny.width == 8 and tiny.num_classes == 3
    assert parameter_counts(tiny)["total"] == count_parameters(MaskDenoiser(tiny))
    assert set(DENOISER_PRESETS) >= {"ddps-segformer-b2", "tiny"}
    with pytest.raises(ValueError, match="unknown denoiser preset"):
        denoiser_preset("nope")
    assert DenoiserConfig.from_dict(cfg.to_dict()) == cfg
