"""The student: smp models behind one interface (decoder features at stride 4, any input
size), encoder weights from a file, augmentation, and training that learns, selects by the
real images' mIoU and resumes to the same files."""


import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddps_core.config import StudentSettings
from ddps_core.datasets import GenericFolder
from ddps_core.datasets.common import png_bytes
from ddps_core.errors import CheckpointError
from ddps_core.progress import CallbackReporter
from ddps_core.student.model import Student, load_student
from ddps_core.student.train import ImageSet, TrainingError, augment, score_set
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
    class Stop(Exception):
        pass

    def stop_after_first(task, done, total, epoch=None, **values):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_student(_cfg(tmp_path, "b"), train, val, num_classes=4, class_names=["bg", "left", "right", "box"],
                      report=CallbackReporter(stop_after_first))
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
