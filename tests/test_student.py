"""The student: smp models behind one interface (decoder features at stride 4, any input
size), encoder weights from a file, augmentation, and training that learns, selects by the
real images' mIoU and resumes to the same weights."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddps_core.config import StudentSettings
from ddps_core.datasets import GenericFolder
from ddps_core.datasets.common import png_bytes
from ddps_core.errors import CheckpointError
from ddps_core.student.model import Student, load_student
from ddps_core.student.train import ImageSet, augment, score_set, train_student

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


def _cfg(tmp_path, name, **kw):
    return StudentSettings(**{"arch": "segformer", "encoder": "mit_b0", "epochs": 3, "batch_size": 8,
                              "lr": 3e-3, "warmup_steps": 2, "out": str(tmp_path / name), **kw})


def test_training_learns_selects_and_resumes(tmp_path):
    train = ImageSet(_folder(tmp_path / "train", 24), 32)
    val = ImageSet(_folder(tmp_path / "val", 6, seed=1), 32)
    full = train_student(_cfg(tmp_path, "a"), train, val, num_classes=4, class_names=["bg", "left", "right", "box"])
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

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train_student(_cfg(tmp_path, "b"), train, val, num_classes=4, on_epoch=stop_after_first)
    logs = []
    train_student(_cfg(tmp_path, "b"), train, val, num_classes=4, log=logs.append)
    assert any("resuming student training after epoch 1" in m for m in logs)
    a = (tmp_path / "a" / "student.safetensors").read_bytes()
    b = (tmp_path / "b" / "student.safetensors").read_bytes()
    assert a == b


def test_nan_weights_from_a_finite_loss_keep_the_last_checkpoint(tmp_path, monkeypatch):
    """An optimiser step that turns weights into NaN (NaN gradients, finite loss) in the
    second epoch stops training with a clear error; the checkpoint of epoch 1 is kept."""
    from ddps_core.student.train import StudentTrainingError

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
    with pytest.raises(StudentTrainingError, match=r"non-finite student weights .* after epoch 2"):
        train_student(cfg, train, None, num_classes=4)
    ckpt = torch.load(tmp_path / "n" / "state.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point())
