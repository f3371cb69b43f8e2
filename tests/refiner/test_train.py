"""DDPS training (Diffusion-on-First-Prediction): the loss falls on a tiny task, t != 0 inputs
are the model's own no-grad argmax noised to t (the ground truth in the ablation), resume is
bit-identical, and an smp model works as the frozen base."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ddps_core.progress import CallbackReporter
from ddps_core.refiner import multinomial as mn
from ddps_core.refiner.base import SmpBase, probe_features
from ddps_core.refiner.denoiser import MaskDenoiser
from ddps_core.refiner.sample import refine_images
from ddps_core.refiner.train import (
    DDPSTrainConfig,
    TrainingError,
    downsample_labels,
    epoch_batches,
    load_denoiser,
    masked_cross_entropy,
    train_denoiser,
)
from tests.test_training import assert_same_files

pytestmark = pytest.mark.usefixtures("one_thread")

K, T, IGNORE = 3, 10, 255


class OracleBase(nn.Module):
    """A frozen 'segmentor' whose stride-4 features are the 4 x 4 mean of the image; the
    synthetic images below carry their label's one-hot in their 3 channels plus noise."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # something that freeze() must not train

    def decoder_features(self, images):
        return F.avg_pool2d(images * self.scale, 4)

    def forward(self, images):
        return F.interpolate(self.decoder_features(images), scale_factor=4.0, mode="nearest")


def make_dataset(n=16, size=16, seed=0, noise=0.8):
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, K, (n, size // 4, size // 4), generator=g)
    labels = small.repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = F.one_hot(labels, K).permute(0, 3, 1, 2).float() + noise * torch.randn(n, K, size, size, generator=g)
    labels = labels.clone()
    labels[:, 0, :3] = IGNORE  # a few ignore pixels
    return TensorDataset(images, labels)


def _cfg(tmp_path, name, **kw):
    base = dict(out=str(tmp_path / name), preset="tiny", width=16, channel_mult=[1, 2], num_res_blocks=1,
                num_timesteps=T, steps=6, single_step_steps=2, lr=3e-3, warmup_steps=2,
                log_every=1, checkpoint_every=3, ignore_index=IGNORE)
    base.update(kw)
    return DDPSTrainConfig(**base)


def _train(cfg, seed=0, data=None, inputs=None, **kw):
    data = data if data is not None else epoch_batches(make_dataset(), batch_size=4, seed=seed)
    return train_denoiser(cfg, OracleBase(), data, num_classes=K, seed=seed,
                          inputs=inputs or {"data": "make_dataset"}, **kw)


def _state(out):
    return torch.load(f"{out}/state.pt", weights_only=True)


def test_masked_cross_entropy_ignores_and_upsamples():
    logits = torch.zeros(1, K, 2, 2)
    logits[0, 1] = 5.0
    labels = torch.full((1, 8, 8), 1)
    labels[0, :4] = IGNORE
    loss = masked_cross_entropy(logits, labels, IGNORE)
    expect = -torch.log_softmax(torch.tensor([0.0, 5.0, 0.0]), 0)[1]
    assert torch.isclose(loss, expect, atol=1e-6)
    all_ignored = torch.full((1, 8, 8), IGNORE)
    assert masked_cross_entropy(logits, all_ignored, IGNORE) == 0


def test_downsample_labels_nearest():
    lab = torch.arange(16).reshape(1, 4, 4)
    assert torch.equal(downsample_labels(lab, (2, 2)), torch.tensor([[[0, 2], [8, 10]]]))
    assert downsample_labels(lab, (4, 4)) is not None


def test_dfp_training_reduces_the_loss(tmp_path):
    cfg = _cfg(tmp_path, "fit", steps=80, single_step_steps=10, lr=1e-2, warmup_steps=5, checkpoint_every=100)
    summary = _train(cfg)
    assert summary["steps"] == 80 and summary["model_id"]
    rows = list(csv.DictReader(open(tmp_path / "fit" / "loss.csv")))
    assert [r["stage"] for r in rows[:10]] == ["single_step"] * 10 and rows[-1]["stage"] == "dfp"
    losses = [float(r["loss"]) for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    info = json.loads((tmp_path / "fit" / "model.json").read_text())
    assert info["x0_source"] == "first_prediction" and info["schedule"]["num_timesteps"] == T
    model, schedule, _ = load_denoiser(tmp_path / "fit")
    assert isinstance(model, MaskDenoiser) and not model.training and schedule.num_classes == K
    state = _state(tmp_path / "fit")
    assert all(torch.equal(model.state_dict()[k], state["ema"][k]) for k in state["ema"])


def _spy(monkeypatch):
    """Record every denoiser forward (input mask, t, grad mode, argmax) and every q_sample
    (x0, s, result)."""
    calls, noised = [], []
    real_forward, real_q_sample = MaskDenoiser.forward, mn.MultinomialDiffusion.q_sample

    def forward(self, x, t, features):
        out = real_forward(self, x, t, features)
        calls.append({"x": x.clone(), "t": t.clone(), "grad": torch.is_grad_enabled(),
                      "argmax": out.detach().argmax(1), "features": features.detach().clone()})
        return out

    def q_sample(self, x0, s, generator=None):
        out = real_q_sample(self, x0, s, generator)
        noised.append({"x0": x0.clone(), "s": torch.as_tensor(s).clone(), "out": out.clone(), "after": len(calls)})
        return out

    monkeypatch.setattr(MaskDenoiser, "forward", forward)
    monkeypatch.setattr(mn.MultinomialDiffusion, "q_sample", q_sample)
    return calls, noised


def test_t_nonzero_inputs_are_the_noised_first_prediction(tmp_path, monkeypatch):
    calls, noised = _spy(monkeypatch)
    data = [make_dataset(n=4)[:]]  # one fixed batch per epoch
    _train(_cfg(tmp_path, "spy", steps=4, single_step_steps=1, checkpoint_every=100), data=data)
    train_calls = [c for c in calls if c["grad"]]
    assert len(train_calls) == 4
    assert (train_calls[0]["t"] == 0).all()  # the single-step pre-stage
    assert noised, "no t != 0 was drawn"
    gt_small = downsample_labels(data[0][1], (4, 4))
    differs = False
    for rec in noised:
        fp, trained = calls[rec["after"] - 1], calls[rec["after"]]
        # the x0 that was noised is the argmax of the no-grad call at t = 0 just before...
        assert not fp["grad"] and (fp["t"] == 0).all()
        assert torch.equal(rec["x0"], fp["argmax"])
        # ...and the noised mask is the input of the training call at exactly the t != 0 rows
        assert trained["grad"]
        rows = (trained["t"] != 0).nonzero(as_tuple=True)[0]
        assert torch.equal(trained["x"][rows], rec["out"])
        assert torch.equal(rec["s"], T - 1 - trained["t"][rows])
        assert torch.equal(fp["features"], trained["features"][rows])
        differs |= not torch.equal(rec["x0"], gt_small[rows])
    assert differs  # an untrained model's first prediction is not the ground truth


def test_gt_ablation_noises_the_ground_truth(tmp_path, monkeypatch):
    calls, noised = _spy(monkeypatch)
    data = [make_dataset(n=4)[:]]
    _train(_cfg(tmp_path, "gt", steps=3, single_step_steps=0, x0_source="gt", checkpoint_every=100), data=data)
    assert all(c["grad"] for c in calls)  # no first prediction is made
    gt_small = downsample_labels(data[0][1], (4, 4))
    assert noised
    for rec in noised:
        trained = calls[rec["after"]]
        rows = (trained["t"] != 0).nonzero(as_tuple=True)[0]
        expect = gt_small[rows]
        keep = expect != IGNORE
        assert torch.equal(rec["x0"][keep], expect[keep])
        assert torch.equal(trained["x"][rows], rec["out"])


@pytest.mark.parametrize("every,kill", [(3, 4), (4, 5)])  # mid-epoch / at an epoch end
def test_killed_run_resumes_bit_identically(tmp_path, every, kill):
    _train(_cfg(tmp_path, "full", checkpoint_every=every), seed=5)

    class Killed(Exception):
        pass

    def kill_at(task, step, total, **values):
        if step == kill:
            raise Killed

    with pytest.raises(Killed):
        _train(_cfg(tmp_path, "resumed", checkpoint_every=every), seed=5, report=CallbackReporter(kill_at))
    assert _state(tmp_path / "resumed")["step"] == every
    logs = []
    _train(_cfg(tmp_path, "resumed", checkpoint_every=every), seed=5, report=CallbackReporter(log=logs.append))
    assert any(f"resuming from step {every}" in m for m in logs)
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "resumed")
    assert full["step"] == resumed["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])
    rows = (tmp_path / "resumed" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    # every file, the state too: a resumed run's folder is the uninterrupted run's, byte for byte
    assert_same_files(tmp_path / "full", tmp_path / "resumed", ["ema.safetensors", "loss.csv", "model.json", "state.pt"])


def test_other_settings_or_inputs_start_over(tmp_path):
    _train(_cfg(tmp_path, "x", steps=2))
    logs = []
    _train(_cfg(tmp_path, "x", steps=2, x0_source="gt"), report=CallbackReporter(log=logs.append))
    assert any("other settings" in m for m in logs)
    logs = []
    _train(_cfg(tmp_path, "x", steps=2, x0_source="gt"), inputs={"data": "other pairs"},
           report=CallbackReporter(log=logs.append))
    assert any("starting over" in m for m in logs)


def test_non_finite_loss_stops(tmp_path):
    ds = make_dataset(n=4)
    images, labels = ds[:]
    images = images.clone()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1; no checkpoint was written yet"):
        _train(_cfg(tmp_path, "nan", steps=2, single_step_steps=2), data=[(images, labels)])


def test_smp_base_is_frozen_and_refines(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    net = smp.DeepLabV3Plus(encoder_name="mobilenet_v2", encoder_weights=None, classes=K,
                            encoder_output_stride=16)
    base = SmpBase(net)
    assert probe_features(base, 32) == (256, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.randint(0, K, (2, 32, 32), generator=g)
    cfg = _cfg(tmp_path, "smp", width=8, steps=2, single_step_steps=1, checkpoint_every=100)
    train_denoiser(cfg, base, [(images, labels)], num_classes=K, seed=0, inputs={"data": "random"})
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    model, schedule, info = load_denoiser(tmp_path / "smp")
    assert info["denoiser"]["feature_channels"] == 256
    base_logits, result = refine_images(base, model, schedule, images, n=2, generator=torch.Generator().manual_seed(0))
    assert base_logits.shape == (2, K, 32, 32)
    assert result.steps == [0, 5, 9] and set(result.logits) == {0, 5, 9}
    assert all(v.shape == (2, K, 32, 32) for v in result.logits.values())


def test_time_budget_stop_mid_epoch_then_rerun_equals_the_uninterrupted_run(tmp_path):
    _train(_cfg(tmp_path, "full"), seed=2)
    summary = _train(_cfg(tmp_path, "budget", time_budget_s=1e-9), seed=2)
    assert summary["stopped_early"] and summary["steps"] == 1  # after the first of 4 batches of epoch 0
    assert _state(tmp_path / "budget")["batch_in_epoch"] == 1
    _train(_cfg(tmp_path, "budget"), seed=2)
    for key in ("model", "ema"):
        full, resumed = _state(tmp_path / "full")[key], _state(tmp_path / "budget")[key]
        assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_drop_features_zeroes_whole_images_at_the_given_share():
    import torch

    from ddps_core.refiner.train import drop_features

    feats = torch.ones(4000, 3, 2, 2)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert drop_features(feats, 0.0, gen) is feats and torch.equal(gen.get_state(), state)  # nothing drawn
    out = drop_features(feats, 0.25, gen)
    zeroed = (out.flatten(1) == 0).all(1)
    kept = (out.flatten(1) == 1).all(1)
    assert bool((zeroed | kept).all())  # an image is dropped whole or not at all
    assert abs(float(zeroed.float().mean()) - 0.25) < 0.03


def test_the_first_prediction_is_guided_as_refinement_guides_step_0():
    from ddps_core.refiner.denoiser import DenoiserConfig
    from ddps_core.refiner.train import first_prediction

    torch.manual_seed(0)
    model = DenoiserConfig(5, 6, width=8, channel_mult=(1, 2), num_res_blocks=1).build()
    with torch.no_grad():  # the zero-initialised layers perturbed, so the features matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    feats = torch.randn(3, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 5, (3, 8, 8), generator=torch.Generator().manual_seed(2))
    t0 = torch.zeros(3, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        cond, uncond = model(x, t0, feats), model(x, t0, torch.zeros_like(feats))
    model.train()
    assert torch.equal(first_prediction(model, feats, x), cond.argmax(1))  # the reference: unguided
    guided = first_prediction(model, feats, x, guidance=2.0)
    assert torch.equal(guided, (3.0 * cond - 2.0 * uncond).argmax(1))
    assert not torch.equal(guided, cond.argmax(1)) and model.training  # mode restored
