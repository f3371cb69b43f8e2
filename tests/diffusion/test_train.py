"""DDPM training: determinism, resume equals an uninterrupted run, new images start over, NaN
stop, checkpoint use."""

import json

import numpy as np
import pytest
import torch

from ddps_core.config import DDPMSettings, parse_settings
from ddps_core.diffusion import checkpoint as ckpt
from ddps_core.diffusion import gaussian
from ddps_core.diffusion.presets import get_preset
from ddps_core.diffusion.stage import load_trained, load_training_images, use_checkpoint
from ddps_core.diffusion.train import TrainingError
from ddps_core.diffusion.train import train_ddpm as _train_ddpm
from ddps_core.progress import CallbackReporter
from ddps_core.training import content_id
from tests.test_training import assert_same_files

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)


def train_ddpm(cfg, images, device, **kw):
    """The trainer on ``images`` identified by their content."""
    return _train_ddpm(cfg, images, device, inputs={"images": content_id([images])}, **kw)


def _cfg(tmp_path, name, **kw):
    base = dict(preset="small32-spec", out=str(tmp_path / name), steps=4, batch_size=2,
                warmup_steps=2, log_every=1, checkpoint_every=2, sample_count=0)
    base.update(kw)
    return DDPMSettings(**base)


def _weights(out):
    state = torch.load(f"{out}/state.pt", weights_only=True)
    return state["model"], state["ema"], state["step"]


def test_same_seed_same_files_different_seed_differs(tmp_path, images):
    """Two identical runs write identical bytes (DVC sees the same outputs): weights, state,
    loss log and model.json hold no timing."""
    train_ddpm(_cfg(tmp_path, "a"), images, CPU, seed=1)
    train_ddpm(_cfg(tmp_path, "b"), images, CPU, seed=1)
    train_ddpm(_cfg(tmp_path, "c"), images, CPU, seed=2)
    assert_same_files(tmp_path / "a", tmp_path / "b", ["ema.safetensors", "loss.csv", "model.json", "state.pt"])
    (ma, _, sa), (mc, _, _) = (_weights(tmp_path / n) for n in "ac")
    assert sa == 4
    assert not all(torch.equal(ma[k], mc[k]) for k in ma)
    assert (tmp_path / "a" / "loss.csv").read_text().splitlines()[0] == "step,loss,mse,vb,lr"
    assert json.loads((tmp_path / "a" / "model.json").read_text())["inputs"] == {"images": content_id([images])}
    # training moved the weights away from the initialisation
    torch.manual_seed(1)
    init = get_preset("small32-spec").build().state_dict()
    assert not all(torch.equal(init[k], ma[k]) for k in init)


def test_killed_run_resumes_to_identical_weights(tmp_path, images):
    train_ddpm(_cfg(tmp_path, "full"), images, CPU, seed=3)

    class Killed(Exception):
        pass

    def kill_at_3(task, step, total, **values):
        if step == 3:  # after the step-2 checkpoint, before the next one
            raise Killed

    with pytest.raises(Killed):
        train_ddpm(_cfg(tmp_path, "resumed"), images, CPU, seed=3, report=CallbackReporter(kill_at_3))
    assert _weights(tmp_path / "resumed")[2] == 2
    logs = []
    train_ddpm(_cfg(tmp_path, "resumed"), images, CPU, seed=3, report=CallbackReporter(log=logs.append))
    assert any("resuming from step 2" in m for m in logs)
    (mf, ef, sf), (mr, er, sr) = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert sf == sr == 4
    assert all(torch.equal(mf[k], mr[k]) for k in mf)
    assert all(torch.equal(ef[k], er[k]) for k in ef)
    # the loss history was resumed too: one row per step, no duplicates
    rows = (tmp_path / "resumed" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]


def test_other_settings_or_other_images_start_over(tmp_path, images):
    train_ddpm(_cfg(tmp_path, "x", steps=2), images, CPU, seed=0)
    logs = []
    train_ddpm(_cfg(tmp_path, "x", steps=2, lr=5e-4), images, CPU, seed=0,
               report=CallbackReporter(log=logs.append))
    assert any("other settings" in m for m in logs)
    # the same number of images (the same file names, say) with other content: not resumed
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    logs = []
    train_ddpm(_cfg(tmp_path, "x", steps=2, lr=5e-4), other, CPU, seed=0,
               report=CallbackReporter(log=logs.append))
    assert any("other settings or inputs: starting over" in m for m in logs)
    logs = []
    train_ddpm(_cfg(tmp_path, "x", steps=2, lr=5e-4), other, CPU, seed=0,
               report=CallbackReporter(log=logs.append))
    assert any("resuming from step 2" in m for m in logs)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, images, monkeypatch):
    real = gaussian.GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        calls["n"] += 1
        out = real(self, *a, **kw)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(gaussian.GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss .* step 3.*step 2"):
        train_ddpm(_cfg(tmp_path, "nan"), images, CPU, seed=0)
    model, ema, step = _weights(tmp_path / "nan")
    assert step == 2 and all(torch.isfinite(v).all() for v in model.values())


def test_ema_and_info_loadable_and_progress_from_step_0(tmp_path, images):
    cfg = _cfg(tmp_path, "m", steps=3, log_every=2)
    calls = []
    summary = train_ddpm(cfg, images, CPU, seed=0,
                         report=CallbackReporter(lambda *a, **v: calls.append((*a, sorted(v)))))
    # step 0 before the first batch, then every log_every steps and the last one
    assert calls == [("ddpm", 0, 3, []), ("ddpm", 2, 3, ["loss", "lr", "mse", "vb"]),
                     ("ddpm", 3, 3, ["loss", "lr", "mse", "vb"])]
    assert summary["wall_s"] > 0 and summary["images_per_s"] > 0 and summary["steps_this_run"] == 3
    model, info = load_trained(cfg.out)
    assert info["model_id"] == summary["model_id"] and info["source"] == "trained"
    state = torch.load(tmp_path / "m" / "state.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], state["ema"][k]) for k in state["ema"])


def test_checkpoint_setting_skips_training(tmp_path):
    torch.manual_seed(0)
    model = get_preset("small32-spec").build()
    path = tmp_path / "official.pt"
    torch.save(model.state_dict(), path)
    cfg = DDPMSettings(preset="small32-spec", checkpoint=str(path), out=str(tmp_path / "out"))
    info = use_checkpoint(cfg)
    assert info["source"] == "checkpoint"
    assert info["model_id"] == ckpt.state_dict_hash(model.state_dict())
    loaded, _ = load_trained(cfg.out)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t), model.eval()(x, t))
    assert not (tmp_path / "out" / "state.pt").exists()
    assert json.loads((tmp_path / "out" / "model.json").read_text())["checkpoint"] == str(path.resolve())


def test_training_images_squared_from_dataset(tmp_path):
    from ddps_core.datasets.stage import prepare_dataset

    data = parse_settings({"data": {"out": str(tmp_path / "d"), "synthetic": {
        "n_unlabeled": 3, "n_labeled": 2, "n_test": 1}}}).data
    prepare_dataset(data)
    imgs = load_training_images(tmp_path / "d", 32)
    assert imgs.shape == (5, 3, 32, 32) and imgs.dtype == torch.uint8


def test_time_budget_stops_with_a_checkpoint_and_the_rerun_finishes_the_same(tmp_path, images):
    train_ddpm(_cfg(tmp_path, "full"), images, CPU, seed=4)
    logs = []
    summary = train_ddpm(_cfg(tmp_path, "budget", time_budget_s=1e-9), images, CPU, seed=4,
                         report=CallbackReporter(log=logs.append))
    assert summary["stopped_early"] and summary["steps"] == 1 and _weights(tmp_path / "budget")[2] == 1
    assert logs[-1].startswith("time budget of 0 s reached at step 1")
    train_ddpm(_cfg(tmp_path, "budget"), images, CPU, seed=4)  # the budget is not part of the identity
    (mf, ef, _), (mb, eb, sb) = _weights(tmp_path / "full"), _weights(tmp_path / "budget")
    assert sb == 4 and all(torch.equal(mf[k], mb[k]) for k in mf) and all(torch.equal(ef[k], eb[k]) for k in ef)


def test_focused_timesteps_keep_a_uniform_share_and_the_plain_stream_without_focus():
    from ddps_core.diffusion.train import draw_timesteps

    plain = draw_timesteps(5000, 1000, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randint(0, 1000, (5000,), generator=torch.Generator().manual_seed(3)))
    t = draw_timesteps(20000, 1000, torch.Generator().manual_seed(3), focus=0.5, below=200)
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    # half the batch below 200, plus the uniform half's own fifth there: 0.5 + 0.5 * 0.2 = 0.6
    assert abs(float((t < 200).float().mean()) - 0.6) < 0.02
    assert abs(float((t >= 200).float().mean()) - 0.4) < 0.02
    assert bool((draw_timesteps(100, 1000, torch.Generator(), focus=1.0, below=50) < 50).all())


def test_focus_weights_by_hand_undo_the_mixture_and_importance_is_another_run(tmp_path):
    from ddps_core.diffusion.train import draw_timesteps, focus_weights

    # T p(t) = 0.25 + 0.75 * 1000 / 200 = 4 below the bound, 0.25 above it
    w = focus_weights(torch.tensor([0, 199, 200, 999]), 1000, 0.75, 200)
    np.testing.assert_allclose(w.numpy(), [0.25, 0.25, 4.0, 4.0])
    # weighted, the mixture's mean of any g(t) is the uniform one: here g(t) = t, uniform mean 499.5
    t = draw_timesteps(200000, 1000, torch.Generator().manual_seed(0), focus=0.75, below=200)
    assert abs(float((focus_weights(t, 1000, 0.75, 200) * t.float()).mean()) - 499.5) < 5
    assert abs(float(t.float().mean()) - 499.5) > 200  # while the unweighted draw is far below it
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    common = dict(steps=1, t_focus=0.75, t_focus_below=200)
    plain = train_ddpm(_cfg(tmp_path, "plain", **common), images, CPU, seed=0)
    weighted = train_ddpm(_cfg(tmp_path, "imp", t_focus_mode="importance", **common), images, CPU, seed=0)
    assert weighted["final_loss"] != plain["final_loss"]
    run = torch.load(tmp_path / "imp" / "state.pt", weights_only=True)["run_id"]
    assert run != torch.load(tmp_path / "plain" / "state.pt", weights_only=True)["run_id"]


def test_min_snr_weights_by_hand_and_the_weighted_run_is_another_run(tmp_path):
    from ddps_core.diffusion.gaussian import GaussianDiffusion
    from ddps_core.diffusion.train import min_snr_weights

    d = GaussianDiffusion.from_name("linear", 1000)
    t = torch.tensor([0, 10, 500, 999])
    betas = np.linspace(1e-4, 0.02, 1000)  # the linear schedule at 1000 steps, by hand
    abar = np.cumprod(1 - betas)[[0, 10, 500, 999]]
    snr = abar / (1 - abar)
    want = np.minimum(snr, 5.0) / snr
    np.testing.assert_allclose(min_snr_weights(d.alphas_cumprod, t, 5.0).numpy(), want, rtol=1e-6)
    assert float(min_snr_weights(d.alphas_cumprod, torch.tensor([999]), 5.0)) == 1.0  # SNR < gamma: unweighted
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    # one step at t < 50 (SNR > 5 there): the same draws, the weighted loss is smaller
    plain = train_ddpm(_cfg(tmp_path, "plain", steps=1, t_focus=1.0, t_focus_below=50), images, CPU, seed=0)
    weighted = train_ddpm(_cfg(tmp_path, "snr", steps=1, t_focus=1.0, t_focus_below=50, min_snr_gamma=5.0),
                          images, CPU, seed=0)
    assert weighted["final_loss"] < plain["final_loss"]
    assert _weights(tmp_path / "plain")[0].keys() == _weights(tmp_path / "snr")[0].keys()
    run = torch.load(tmp_path / "snr" / "state.pt", weights_only=True)["run_id"]
    assert run != torch.load(tmp_path / "plain" / "state.pt", weights_only=True)["run_id"]
