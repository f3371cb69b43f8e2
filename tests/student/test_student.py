"""The student: smp models behind one interface (decoder features at stride 4, any input
size), encoder weights from a file, augmentation, and training that learns, selects by the
real images' mIoU and resumes to the same files."""


import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddps_core.config import StudentSettings
from ddps_core.datasets import GenericFolder
from ddps_core.datasets.common import png_bytes
from ddps_core.errors import CheckpointError, DataError
from ddps_core.progress import CallbackReporter
from ddps_core.student.model import Student, load_student
from ddps_core.student.train import ImageSet, SoftTargets, TrainingError, augment, distill_loss, score_set
from ddps_core.student.train import train_student as _train_student
from tests.test_training import assert_same_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch,encoder", [("segformer", "mit_b0"), ("deeplabv3plus", "mobilenet_v2")])
def test_decoder_features_are_the_heads_input_at_stride_4(arch, encoder):
    torch.manual_seed(0)
    model = Student(arch, encoder, 5).eval()
    x = torch.rand(2, 3, 52, 40)  # not multiples of 32: padded inside, cropped back
    with torch.no_grad():
        feats, logits = model.features_and_logits(x)
        assert feats.shape == (2, model.feature_channels, 13, 10) and logits.shape == (2, 5, 52, 40)
        assert torch.equal(model.decoder_features(x), feats)
        assert torch.equal(model(x), logits)
        # the logits are the segmentation head applied to the (uncropped) decoder output
        padded = F.pad((x - model.mean) / model.std, (0, 24, 0, 12), mode="replicate")
        full = model.net.decoder(model.net.encoder(padded))
        assert torch.allclose(model.net.segmentation_head(full)[..., :52, :40], logits)
        # and the smp model itself on a multiple-of-32 input gives the same logits
        y = torch.rand(1, 3, 64, 32)
        assert torch.allclose(model(y), model.net((y - model.mean) / model.std), atol=1e-6)


def test_encoder_weights_from_a_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = Student("segformer", "mit_b0", 3)
    save_file({k: v.contiguous() for k, v in donor.net.encoder.state_dict().items()}, tmp_path / "enc.safetensors")
    torch.manual_seed(2)
    model = Student("segformer", "mit_b0", 3, encoder_weights=str(tmp_path / "enc.safetensors"))
    for k, v in donor.net.encoder.state_dict().items():
        assert torch.equal(model.net.encoder.state_dict()[k], v)
    save_file({"nope": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="missing keys"):
        Student("segformer", "mit_b0", 3, encoder_weights=str(tmp_path / "bad.safetensors"))


def test_augment_identity_flip_and_pad():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    labels = torch.randint(0, 4, (3, 16, 16))
    same_i, same_l = augment(images, labels, g, hflip=False, scale_min=1.0, scale_max=1.0, ignore_index=255)
    assert torch.equal(same_i, images) and torch.equal(same_l, labels)
    small_i, small_l = augment(images, labels, g, hflip=False, scale_min=0.5, scale_max=0.5, ignore_index=255)
    assert small_i.shape == images.shape and (small_l == 255).sum(dim=(1, 2)).tolist() == [256 - 64] * 3
    big_i, big_l = augment(images, labels, g, hflip=True, scale_min=1.5, scale_max=1.5, ignore_index=255)
    assert set(big_l.unique().tolist()) <= set(labels.unique().tolist())  # nearest: no new values


def _folder(root, n, size=32, seed=0):
    """Images whose left / right halves carry class 1 / 2 with distinct colours, plus a box of
    class 3: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("[bg, left, right, box]\n")
    for i in range(n):
        lab = np.zeros((size, size), np.uint8)
        lab[:, : size // 2], lab[:, size // 2:] = 1, 2
        y, x = rng.integers(0, size - 10, 2)
        lab[y:y + 10, x:x + 10] = 3
        colours = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.float64)
        img = np.clip(colours[lab] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        (root / "images" / f"{i:03d}.png").write_bytes(png_bytes(img))
        (root / "masks" / f"{i:03d}.png").write_bytes(png_bytes(lab))
    return GenericFolder(root)


class _Stop(Exception):
    pass


def _stop_after_first_epoch(task, done, total, epoch=None, **values):
    """A progress callback that kills a training after its first epoch (to test resume)."""
    if epoch == 1:
        raise _Stop


def train_student(cfg, train, val, **kw):
    return _train_student(cfg, train, val, inputs={"train": "synthetic shapes"}, **kw)


def _cfg(tmp_path, name, **kw):
    return StudentSettings(**{"arch": "segformer", "encoder": "mit_b0", "epochs": 3, "batch_size": 8,
                              "lr": 3e-3, "warmup_steps": 2, "out": str(tmp_path / name), **kw})


def test_training_learns_selects_and_resumes(tmp_path):
    train = ImageSet(_folder(tmp_path / "train", 24), 32)
    val = ImageSet(_folder(tmp_path / "val", 6, seed=1), 32)
    calls = []
    full = train_student(_cfg(tmp_path, "a"), train, val, num_classes=4, class_names=["bg", "left", "right", "box"],
                         report=CallbackReporter(lambda *a, **v: calls.append((*a, v))))
    # progress from batch 0, then every batch (3 per epoch) and each epoch with its val mIoU
    assert [c[1] for c in calls] == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9] and {c[2] for c in calls} == {9}
    epochs = [c[3] for c in calls if "epoch" in c[3]]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all(0 <= e["mIoU"] <= 1 for e in epochs)
    assert all(set(c[3]) == {"loss", "lr"} for c in calls[1:] if "epoch" not in c[3])
    rows = np.genfromtxt(tmp_path / "a" / "history.csv", delimiter=",", names=True)
    assert len(rows) == 3 and rows["loss"][-1] < rows["loss"][0]
    assert full["best_epoch"] == int(rows["epoch"][np.nanargmax(rows["val_miou"])])
    model, info = load_student(tmp_path / "a")
    assert info["class_names"] == ["bg", "left", "right", "box"] and info["image_size"] == 32
    again = score_set(model, val, 4, 255)
    assert again.miou == pytest.approx(full["val_miou"])  # the saved weights are the selected ones
    assert again.miou > 0.5  # learnable task: far above chance

    # a run killed after its first epoch, then rerun, ends with the same weights
    with pytest.raises(_Stop):
        train_student(_cfg(tmp_path, "b"), train, val, num_classes=4, class_names=["bg", "left", "right", "box"],
                      report=CallbackReporter(_stop_after_first_epoch))
    logs = []
    train_student(_cfg(tmp_path, "b"), train, val, num_classes=4, class_names=["bg", "left", "right", "box"],
                  report=CallbackReporter(log=logs.append))
    assert any("resuming from epoch 1" in m for m in logs)
    # the resumed run's folder is the uninterrupted run's, byte for byte: no timing anywhere
    assert_same_files(tmp_path / "a", tmp_path / "b", ["history.csv", "model.json", "state.pt", "student.safetensors"])
    assert "train_seconds" in full and "train_seconds" not in json.loads((tmp_path / "a" / "model.json").read_text())

    # other validation images (the selection depends on them): not resumed
    other_val = ImageSet(_folder(tmp_path / "val2", 6, seed=2), 32)
    logs = []
    train_student(_cfg(tmp_path, "b"), train, other_val, num_classes=4, report=CallbackReporter(log=logs.append))
    assert any("other settings or inputs: starting over" in m for m in logs)


def test_nan_weights_from_a_finite_loss_keep_the_last_checkpoint(tmp_path, monkeypatch):
    """An optimiser step that turns weights into NaN (NaN gradients, finite loss) in the
    second epoch stops training with a clear error; the checkpoint of epoch 1 is kept."""
    train = ImageSet(_folder(tmp_path / "train", 8), 32)
    cfg = _cfg(tmp_path, "n", epochs=3)
    step = torch.optim.AdamW.step
    calls = {"n": 0}
    steps_per_epoch = 1  # 8 images, batch 8

    def poisoning_step(self, *a, **kw):
        out = step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] > steps_per_epoch:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(TrainingError, match=r"non-finite weights .* after epoch 2; the last good checkpoint "
                                            r"\(.*state.pt, epoch 1\) is kept"):
        train_student(cfg, train, None, num_classes=4)
    ckpt = torch.load(tmp_path / "n" / "state.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------------------------
# Distillation from the teacher's soft labels
# --------------------------------------------------------------------------------------------
def test_distill_loss_is_the_weighted_kl_at_a_temperature_by_hand():
    """Two pixels, two classes, worked out in closed form."""
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # [1, 2, 1, 2]: pixel a (0, 1), pixel b (1, 0)
    p = torch.tensor([[[[0.5, 0.9]], [[0.5, 0.1]]]])
    targets = torch.cat([p, torch.tensor([[[[1.0, 0.5]]]])], dim=1)  # weights 1 and 0.5
    labels = torch.tensor([[[0, 0]]])

    def kl(pt, qt):
        return sum(a * math.log(a / b) for a, b in zip(pt, qt))

    def soft(v, t):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    for t in (1.0, 2.0):
        pa = soft([math.log(0.5), math.log(0.5)], t)
        pb = soft([math.log(0.9), math.log(0.1)], t)
        want = t * t * (1.0 * kl(pa, soft([0.0, 1.0], t)) + 0.5 * kl(pb, soft([1.0, 0.0], t))) / 1.5
        got = distill_loss(logits, labels, targets, temperature=t)
        assert float(got) == pytest.approx(want, rel=1e-5)
    ce = (math.log(1 + math.e) + math.log(1 + math.exp(-1))) / 2  # -log q(0) at a and at b
    mixed = distill_loss(logits, labels, targets, temperature=1.0, soft_weight=0.25)
    full = distill_loss(logits, labels, targets, temperature=1.0)
    assert float(mixed) == pytest.approx(0.25 * float(full) + 0.75 * ce, rel=1e-5)
    # a one-hot target of weight 1 is the cross-entropy
    onehot = torch.cat([F.one_hot(labels, 2).permute(0, 3, 1, 2).float(), torch.ones(1, 1, 1, 2)], dim=1)
    assert float(distill_loss(logits, labels, onehot)) == pytest.approx(ce, rel=1e-5)


def test_soft_targets_resized_weighted_and_one_hot_for_real_images(tmp_path, monkeypatch):
    from math import isclose

    k = 3
    probs = np.random.default_rng(0).dirichlet(np.ones(k), size=(4, 4)).transpose(2, 0, 1).astype(np.float16)
    heat = np.full((4, 4), 51, np.uint8)  # JS = 0.2 ln M
    np.save(tmp_path / "p.npy", probs)
    (tmp_path / "u.png").write_bytes(png_bytes(heat))
    soft = SoftTargets({"pool_a": (tmp_path / "p.npy", tmp_path / "u.png")}, k, 255)
    labels = torch.tensor([[[0] * 8] * 8, [[1] * 8] * 4 + [[255] * 8] * 4])
    t = soft.batch(["pool_a", "real_b"], labels)
    assert t.shape == (2, k + 1, 8, 8)
    want = F.interpolate(torch.from_numpy(probs.astype(np.float32))[None], size=(8, 8), mode="bilinear",
                         align_corners=False)[0]
    assert torch.allclose(t[0, :k], want) and isclose(float(t[0, k].mean()), 0.8, rel_tol=1e-6)
    assert torch.equal(t[1, 1, :4], torch.ones(4, 8)) and float(t[1, :, 4:].abs().sum()) == 0  # ignore: weight 0
    flat = SoftTargets({"pool_a": (tmp_path / "p.npy", tmp_path / "u.png")}, k, 255, uncertainty_weight=False)
    assert float(flat.batch(["pool_a"], labels[:1])[0, k].min()) == 1.0
    # memory is bounded: past the budget the maps are read again, with the same values
    import ddps_core.student.train as student_train

    monkeypatch.setattr(student_train, "_CACHE_BYTES", 0)
    uncached = SoftTargets({"pool_a": (tmp_path / "p.npy", tmp_path / "u.png")}, k, 255)
    assert torch.equal(uncached.batch(["pool_a"], labels[:1])[0], t[0]) and not uncached._cache


def test_augment_moves_the_soft_targets_with_the_labels():
    """Targets one-hot of the labels: after any flip / scale / crop / pad their argmax where the
    weight is 1 is the augmented label (up to the bilinear blend at class borders)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(4, 16, 16, dtype=torch.long)
    labels[:, :, :5], labels[:, 6:, 9:] = 1, 2
    targets = torch.cat([F.one_hot(labels, 3).permute(0, 3, 1, 2).float(), torch.ones(4, 1, 16, 16)], dim=1)
    images = torch.rand(4, 3, 16, 16)
    for lo, hi in ((1.0, 1.0), (0.6, 0.6), (1.4, 1.4)):
        _, lab, tgt = augment(images, labels, g, True, lo, hi, 255, targets)
        assert tgt.shape == targets.shape
        pad = lab == 255
        assert torch.equal(tgt[:, 3] == 0, pad)  # zero weight exactly where the image is padded
        sure = (tgt[:, :3].max(1).values > 0.99) & ~pad
        assert bool((tgt[:, :3].argmax(1)[sure] == lab[sure]).all()) and sure.sum() > 0.6 * (~pad).sum()


def test_soft_distillation_trains_and_is_part_of_the_identity(tmp_path):
    """distill soft trains on targets that are the labels' one-hot (real images: none are
    soft); its run is another run than the hard one of the same data."""
    train = ImageSet(_folder(tmp_path / "train", 16), 32)
    soft = SoftTargets({}, 4, 255)
    hard = train_student(_cfg(tmp_path, "hard", epochs=1), train, None, num_classes=4)
    distilled = train_student(_cfg(tmp_path, "soft", epochs=1, distill="soft", temperature=2.0), train, None,
                              num_classes=4, soft=soft)
    assert hard["epochs"] == distilled["epochs"] == 1
    state = torch.load(tmp_path / "soft" / "state.pt", weights_only=True)
    other = torch.load(tmp_path / "hard" / "state.pt", weights_only=True)
    assert state["run_id"] != other["run_id"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "hard" / "student.safetensors"), load_file(tmp_path / "soft" / "student.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # T = 2: another loss, other weights
    with pytest.raises(DataError, match="soft labels"):
        train_student(_cfg(tmp_path, "none", epochs=1, distill="soft"), train, None, num_classes=4)


def test_ema_of_the_weights_by_hand_is_what_is_saved_and_it_resumes(tmp_path, monkeypatch):
    """ema_rate: the saved weights are the exponential average of every step's weights and
    BatchNorm statistics, computed here from the steps' own weights; decay 0 is the plain
    run; a run killed after its first epoch resumes to the same files."""
    import ddps_core.student.train as student_train
    from safetensors.torch import load_file

    train = ImageSet(_folder(tmp_path / "train", 16), 32)
    steps = []
    real_step = student_train.backward_step

    def recording_step(loss, opt, params):
        real_step(loss, opt, params)
        steps.append({k: v.detach().clone() for k, v in recording_step.model.net.state_dict().items()})

    original_averaged = student_train._averaged

    def keep_model(model, rate):
        recording_step.model = model
        return original_averaged(model, rate)

    monkeypatch.setattr(student_train, "backward_step", recording_step)
    monkeypatch.setattr(student_train, "_averaged", keep_model)
    train_student(_cfg(tmp_path, "ema", epochs=2, select_on="last", ema_rate=0.6), train, None, num_classes=4)
    assert len(steps) == 4  # 2 epochs of 2 batches
    want = {k: v.clone() for k, v in steps[0].items()}
    for s in steps[1:]:
        for k, v in s.items():
            if v.is_floating_point():
                want[k] = 0.6 * want[k] + 0.4 * v
    saved = load_file(tmp_path / "ema" / "student.safetensors")
    floats = [k for k in want if want[k].is_floating_point()]
    assert any("running_mean" in k for k in floats)  # the BatchNorm statistics are averaged too
    for k in floats:
        torch.testing.assert_close(saved[k], want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(saved[k], steps[-1][k]) for k in floats)  # not the last step's weights
    monkeypatch.undo()

    plain = train_student(_cfg(tmp_path, "plain", epochs=2, select_on="last"), train, None, num_classes=4)
    zero = train_student(_cfg(tmp_path, "zero", epochs=2, select_on="last", ema_rate=0.0), train, None, num_classes=4)
    a, b = load_file(tmp_path / "plain" / "student.safetensors"), load_file(tmp_path / "zero" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()) and plain["epochs"] == zero["epochs"]
    assert torch.load(tmp_path / "zero" / "state.pt", weights_only=True)["run_id"] != \
        torch.load(tmp_path / "plain" / "state.pt", weights_only=True)["run_id"]

    with pytest.raises(_Stop):
        train_student(_cfg(tmp_path, "resumed", epochs=2, select_on="last", ema_rate=0.6), train, None,
                      num_classes=4, report=CallbackReporter(_stop_after_first_epoch))
    train_student(_cfg(tmp_path, "resumed", epochs=2, select_on="last", ema_rate=0.6), train, None, num_classes=4)
    assert_same_files(tmp_path / "ema", tmp_path / "resumed", ["history.csv", "model.json", "state.pt", "student.safetensors"])
