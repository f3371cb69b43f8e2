"""A NaN during training: the trainer stops with one message naming the step, and the last
good checkpoint is kept (no checkpoint of non-finite weights is ever written).

The DDPM is driven through ``ddps ddpm train``; the DDPS denoiser and the pixel ensemble
through their training functions (their stages need a whole upstream pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.bad_inputs.conftest import assert_clear_error, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


@pytest.fixture
def ddpm_run(tmp_path, cli):
    """A tiny dataset and an earlier 2-step DDPM run with a checkpoint at every step."""
    params = tmp_path / "params.yaml"
    out = tmp_path / "ddpm"
    params.write_text(yaml.safe_dump({
        "device": "cpu",
        "data": {"out": str(tmp_path / "ds"), "synthetic": {"n_unlabeled": 4, "n_labeled": 1, "n_test": 1}},
        "ddpm": {"preset": "small32-spec", "out": str(out), "batch_size": 2, "steps": 2,
                 "warmup_steps": 0, "checkpoint_every": 1, "log_every": 1, "sample_count": 0,
                 "threads": 1},
    }))
    assert cli("data", "prepare", "--params", params).code == 0
    res = cli("ddpm", "train", "--params", params)
    assert res.code == 0, res.err
    return params, out


def _saved(out):
    state = torch.load(out / "state.pt", weights_only=True)
    return state, load_file(str(out / "ema.safetensors"))


def test_ddpm_nan_loss_from_a_huge_lr(ddpm_run, cli):
    """A real divergence, nothing patched: lr 1e30 makes the second step's loss NaN."""
    params, out = ddpm_run
    res = cli("ddpm", "train", "--params", params, "--steps", "5", "--set", "ddpm.lr=1e30")
    assert_clear_error(res, "non-finite loss (nan) at step 2", f"{out / 'state.pt'}, step 1) is kept")
    state, ema = _saved(out)
    assert state["step"] == 1  # the new run's last checkpoint (other settings start over)
    assert _finite(state["model"]) and _finite(ema)


def test_ddpm_nan_loss_on_resume_keeps_the_earlier_checkpoint(ddpm_run, cli, monkeypatch):
    params, out = ddpm_run
    before = snapshot(out)
    from ddps_core.diffusion.gaussian import GaussianDiffusion

    real = GaussianDiffusion.training_losses

    def nan_losses(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianDiffusion, "training_losses", nan_losses)
    res = cli("ddpm", "train", "--params", params, "--steps", "4")  # resumes at step 2
    assert_clear_error(res, "non-finite loss (nan) at step 3", f"{out / 'state.pt'}, step 2) is kept")
    assert snapshot(out) == before


def test_ddpm_nan_weights_with_a_finite_loss_are_not_checkpointed(ddpm_run, cli, monkeypatch):
    """NaN gradients (e.g. an overflowing backward pass) can poison the weights while the
    loss that produced them was finite; the checkpoint guard catches that."""
    params, out = ddpm_run
    before = snapshot(out)
    from ddps_core import training

    real = training.ema_update

    def poisoning_update(ema, model, rate, step):
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        real(ema, model, rate, step)

    monkeypatch.setattr(training, "ema_update", poisoning_update)
    res = cli("ddpm", "train", "--params", params, "--steps", "4")
    assert_clear_error(res, "non-finite weights (time_embed.0.weight) after step 3",
                       f"{out / 'state.pt'}, step 2) is kept")
    assert snapshot(out) == before


def test_ddps_denoiser_nan_weights_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from ddps_core import training
    from tests.refiner.test_train import _cfg, _train

    real = training.ema_update

    def poisoning_update(ema, model, rate, step):
        if step == 5:  # the 6th update, right before the checkpoint of step 6; step 3 was good
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        real(ema, model, rate, step)

    monkeypatch.setattr(training, "ema_update", poisoning_update)
    cfg = _cfg(tmp_path, "nan", steps=9, checkpoint_every=3)
    with pytest.raises(training.TrainingError,
                       match=r"non-finite weights .* after step 6; the last good checkpoint \(.*state.pt, step 3\)"):
        _train(cfg)
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["step"] == 3 and _finite(state["model"]) and _finite(state["ema"])


def test_pixel_ensemble_nan_weights_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from ddps_core.errors import DDPSError
    from ddps_core.teacher import PixelEnsemble
    from ddps_core.teacher import train as pixel_train

    rng = np.random.default_rng(0)
    X = rng.standard_normal((128, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)

    def batches(epoch):
        for b in range(0, 128, 32):
            yield torch.from_numpy(X[b:b + 32].copy()), torch.from_numpy(y[b:b + 32])

    real = pixel_train.MemberAdam.step
    calls = []

    def poisoning_step(self, active):
        real(self, active)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                next(iter(self.params.values())).view(-1)[0] = float("nan")

    monkeypatch.setattr(pixel_train.MemberAdam, "step", poisoning_step)
    ck = tmp_path / "e.ckpt"
    ens = PixelEnsemble(4, 2, members=2, widths=(8, 4))
    with pytest.raises(pixel_train.TrainingError,
                       match=r"non-finite weights .* after update 6; the last good checkpoint .* update 4") as err:
        pixel_train.train_ensemble(batches, ens, max_epochs=3, checkpoint_path=ck, checkpoint_every=2,
                                   inputs={"features": "random"})
    assert isinstance(err.value, DDPSError) and str(ck) in str(err.value)
    state = pixel_train.load_checkpoint(ck)
    assert state["state"]["updates"] == 4
    assert _finite(state["model"])


# --------------------------------------------------------------------------- nothing to train on
def test_an_all_ignore_training_split_is_refused_at_import(tmp_path, cli):
    from tests.bad_inputs.conftest import import_params, make_user_dataset

    root = make_user_dataset(tmp_path / "user")
    out = tmp_path / "dataset"
    params = import_params(tmp_path, root, out)
    assert cli("data", "prepare", "--params", params).code == 0
    before = snapshot(out)
    for label in (root / "real" / "train").glob("*.npy"):
        np.save(label, np.full((8, 8), 255, np.uint8))
    res = cli("data", "prepare", "--params", params)
    assert_clear_error(res, root / "real" / "train", "every label pixel of the training split is the ignore index 255")
    assert snapshot(out) == before


@pytest.fixture
def ignored_store(tmp_path, cli):
    """A tiny project whose training labels were all set to the ignore index after the
    import (as a dataset made by another tool would hold them), extracted."""
    from tests.helpers import tiny_project

    raw = tiny_project(tmp_path, {"n_unlabeled": 0, "n_labeled": 2, "n_test": 1},
                       features={"out": str(tmp_path / "features"), "steps": [10], "blocks": [2],
                                 "splits": ["train"], "batch_size": 2},
                       teacher={"baselines": [], "members": 2, "max_epochs": 2, "min_class_pixels": 1,
                                "out": str(tmp_path / "teacher")})
    for label in (tmp_path / "dataset" / "real" / "train").glob("*.npy"):
        np.save(label, np.full(np.load(label).shape, 255, np.uint8))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert cli("features", "extract", "--params", params).code == 0
    return params


def test_a_teacher_with_no_labelled_pixel_is_not_trained(ignored_store, cli, tmp_path):
    params = ignored_store
    before = snapshot(tmp_path / "features")
    res = cli("teacher", "train", "--params", params)
    assert_clear_error(res, tmp_path / "dataset" / "real" / "train", "has no labelled pixel to train the teacher on",
                       "ignore index 255")
    assert snapshot(tmp_path / "features") == before
    assert not (tmp_path / "teacher" / "ensemble.safetensors").exists()
    assert not (tmp_path / "teacher" / "checkpoint.pt").exists()


def test_a_full_disk_while_the_teacher_saves_its_checkpoint_is_one_line(tmp_path, cli, monkeypatch, request):
    """torch's own writer said ``RuntimeError: basic_ios::clear``; the message must name the
    checkpoint and the fault."""
    from tests.bad_inputs.test_disk import EXPECTED, Fault
    from tests.helpers import tiny_project

    fault = Fault("full_disk", tmp_path / "mnt", monkeypatch)
    request.node.user_properties.append(("method", fault.method))
    request.addfinalizer(fault.close)
    raw = tiny_project(tmp_path, {"n_unlabeled": 0, "n_labeled": 2, "n_test": 1},
                       features={"out": str(tmp_path / "features"), "steps": [10], "blocks": [2],
                                 "splits": ["train"], "batch_size": 2},
                       teacher={"baselines": [], "members": 2, "max_epochs": 2, "min_class_pixels": 1,
                                "out": str(tmp_path / "mnt" / "teacher")})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert cli("features", "extract", "--params", params).code == 0
    before = snapshot(tmp_path / "features")
    fault.arm()
    res = cli("teacher", "train", "--params", params)
    msg = assert_clear_error(res, tmp_path / "mnt" / "teacher" / "checkpoint.pt")
    assert any(e in msg for e in EXPECTED["full_disk"]), f"[{fault.method}] {msg}"
    assert snapshot(tmp_path / "features") == before
    assert not list((tmp_path / "mnt" / "teacher").glob("*.tmp")) and not list((tmp_path / "mnt" / "teacher").glob(".*.tmp"))


@pytest.mark.parametrize("name", ["ema.safetensors", "ema.pt"])
def test_a_full_disk_while_a_trainer_saves_its_weights_names_the_file(tmp_path, monkeypatch, request, name):
    """The DDPM's and the refiner's weights (``save_unet``): safetensors' and torch's writers,
    given a file name, raised a SafetensorError or a RuntimeError naming neither."""
    from ddps_core.diffusion.checkpoint import save_unet
    from ddps_core.errors import user_message
    from tests.bad_inputs.test_disk import EXPECTED, Fault

    fault = Fault("full_disk", tmp_path / "mnt", monkeypatch)
    request.node.user_properties.append(("method", fault.method))
    request.addfinalizer(fault.close)
    target = tmp_path / "mnt" / name
    fault.arm()
    with pytest.raises(OSError) as err:
        save_unet(torch.nn.Linear(64, 4096), target)  # 1 MiB of weights
    line, code = user_message(err.value)
    assert code == 1 and "\n" not in line and line.startswith(f"{target}: ")
    assert any(e in line for e in EXPECTED["full_disk"]), f"[{fault.method}] {line}"
    assert not list(target.parent.glob(f".{name}.*"))
