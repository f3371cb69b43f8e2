"""Stages train_refiner and refine on a tiny project (a random 4-class SegFormer-B0 student,
8 generated / real training images of 32 px and 6 test images of 96 x 64, 64 x 160 and 32 x 32
px): train_refiner trains the refiner and its ablation, resumes exactly and does nothing on a
rerun; refine writes the report blocks, the PNGs at each image's size, metrics and the
picture, in whole and slide mode, and its rows equal an independent evaluation against the
labels at their own size."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ddps_core import stages
from ddps_core.config import load_settings
from ddps_core.datasets import DDPMSegFolder
from ddps_core.datasets.common import npy_bytes, png_bytes
from ddps_core.errors import DataError
from ddps_core.metrics import REPORT_COLUMNS, ConfusionAccumulator, evaluate_arrays, load_label_map, report_frame
from ddps_core.progress import CallbackReporter
from ddps_core.refiner.denoiser import denoiser_preset, parameter_counts
from ddps_core.refiner.stage import (
    TrainBatches,
    format_step_table,
    info,
    info_text,
    step_table,
)
from ddps_core.student.model import Student, load_student

pytestmark = pytest.mark.usefixtures("one_thread")

K, S, N_TRAIN, N_TEST = 4, 32, 8, 6
NAMES = ["bg", "left", "right", "box"]
STEPS = [0, 10, 19]  # T = 20, n = 2


TEST_SHAPES = [(96, 64), (64, 160), (S, S)]  # the test images' (H, W), in turn


def _pair(rng, h=S, w=S):
    lab = np.zeros((h, w), np.uint8)
    lab[:, : w // 2], lab[:, w // 2:] = 1, 2
    y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
    lab[y:y + 10, x:x + 10] = 3
    lab[0, :4] = 255  # a few ignore pixels
    colours = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.float64)
    img = np.clip(colours[np.where(lab == 255, 0, lab)] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return img, lab


def _project(root):
    rng = np.random.default_rng(0)
    ds = root / "dataset"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        folder = ds / "real" / split
        folder.mkdir(parents=True)
        for i in range(n):
            img, lab = _pair(rng) if split == "train" else _pair(rng, *TEST_SHAPES[i % len(TEST_SHAPES)])
            (folder / f"{split}{i:02d}.png").write_bytes(png_bytes(img))
            (folder / f"{split}{i:02d}.npy").write_bytes(npy_bytes(lab))
    (ds / "classes.yaml").write_text(json.dumps(NAMES))
    gen = root / "generated"
    (gen / "images").mkdir(parents=True)
    (gen / "masks").mkdir()
    for i in range(N_TRAIN):
        img, lab = _pair(rng)
        (gen / "images" / f"g{i:02d}.png").write_bytes(png_bytes(img))
        (gen / "masks" / f"g{i:02d}.png").write_bytes(png_bytes(lab))
    (gen / "classes.yaml").write_text(json.dumps(NAMES))
    pd.DataFrame({"image_id": [f"g{i:02d}" for i in range(N_TRAIN)]}).to_parquet(gen / "manifest.parquet")
    # a random student in train_student's layout (what load_student reads)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    student = Student("segformer", "mit_b0", K)
    out = root / "student"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in student.net.state_dict().items()}, out / "student.safetensors")
    (out / "model.json").write_text(json.dumps({
        **student.config, "image_size": S, "feature_channels": student.feature_channels, "feature_stride": 4,
        "class_names": NAMES, "ignore_index": 255}))


def _settings(root, reports=None, **refiner):
    over = {"device": "cpu", "data.out": str(root / "dataset"), "generate.out": str(root / "generated"),
            "student.out": str(root / "student"), "evaluate.reports": str(reports or root / "reports")}
    base = dict(preset="tiny", width=8, num_timesteps=20, steps=4, single_step_steps=2, batch_size=4,
                warmup_steps=1, checkpoint_every=2, log_every=1, out=str(root / "refiner"), ablation=True,
                refine_steps=2, refined_out=str(root / "refined"), threads=1)
    base.update(refiner)
    over.update({f"refiner.{k}": v for k, v in base.items()})
    over.update({"report.refinement": 2, "evaluate.student": False})
    return load_settings(None, over)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ddps-project")
    _project(root)
    settings = _settings(root)
    summary = stages.get("train_refiner").run(settings)
    return root, settings, summary


def test_train_refiner_trains_both_and_a_rerun_does_nothing(project):
    root, settings, summary = project
    assert set(summary["models"]) == {"refiner", "refiner-gt"}
    assert summary["n_images"] == N_TRAIN and summary["data"] == "generated" and summary["image_size"] == S
    for method, folder, x0 in (("refiner", root / "refiner", "first_prediction"),
                               ("refiner-gt", root / "refiner" / "ablation-gt", "gt")):
        assert summary["models"][method]["steps"] == 4
        model_json = json.loads((folder / "model.json").read_text())
        assert model_json["x0_source"] == x0 and model_json["inputs"] == {"data": summary["data_id"]}
        assert model_json["denoiser"]["num_classes"] == K and model_json["denoiser"]["feature_channels"] == 256
    assert summary["data_id"].startswith("student=") and "data=generated:" in summary["data_id"]
    before = (root / "refiner" / "ema.safetensors").read_bytes()
    logs = []
    again = stages.get("train_refiner").run(settings, CallbackReporter(log=logs.append))
    assert all(m["steps_this_run"] == 0 for m in again["models"].values())
    assert any("resuming from step 4" in m for m in logs)
    assert (root / "refiner" / "ema.safetensors").read_bytes() == before


def test_killed_run_resumes_to_the_uninterrupted_weights(project, tmp_path):
    root, _, _ = project
    # 5 steps over 2 batches per epoch, a checkpoint at step 3 (mid-epoch 1), killed at step 4
    kw = dict(steps=5, checkpoint_every=3, ablation=False, data="real")
    full = _settings(root, out=str(tmp_path / "full"), **kw)
    stages.get("train_refiner").run(full)

    class Stop(Exception):
        pass

    def stop(task, done, *_a, **_k):
        if task == "refiner" and done == 4:
            raise Stop

    part = _settings(root, out=str(tmp_path / "part"), **kw)
    with pytest.raises(Stop):
        stages.get("train_refiner").run(part, CallbackReporter(progress=stop))
    logs = []
    res = stages.get("train_refiner").run(part, CallbackReporter(log=logs.append))
    assert any("resuming from step 3" in m for m in logs) and res["models"]["refiner"]["steps_this_run"] == 2
    assert (tmp_path / "full" / "ema.safetensors").read_bytes() == (tmp_path / "part" / "ema.safetensors").read_bytes()
    assert "data=real:" in res["data_id"]


class _Pairs:
    """What TrainBatches reads: ``len`` and ``batch(indices)`` (as ImageSet)."""

    def __init__(self, n):
        self.labels = torch.stack([torch.from_numpy(np.random.default_rng(i).integers(0, K, (S, S)))
                                   for i in range(n)])
        self.images = self.labels[:, None].expand(-1, 3, -1, -1).float() / K

    def __len__(self):
        return len(self.labels)

    def batch(self, indices):
        idx = torch.as_tensor(list(indices))
        return self.images[idx], self.labels[idx]


def test_train_batches_are_a_function_of_seed_and_epoch():
    data = _Pairs(10)
    b = TrainBatches(data, batch_size=4, seed=3, hflip=True)
    assert len(b) == 2  # 10 // 4, the partial batch dropped
    e0, e0_again, e1 = list(b(0)), list(b(0)), list(b(1))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(e0, e0_again, strict=True))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(e0, e1, strict=True))
    flipped = 0
    for images, labels in e0 + e1:
        assert torch.equal(images, labels[:, None].expand(-1, 3, -1, -1).float() / K)  # flipped together
        for lab in labels:
            same = [bool(torch.equal(lab, o)) for o in data.labels]
            mirrored = [bool(torch.equal(lab, o.flip(-1))) for o in data.labels]
            assert any(same) or any(mirrored)
            flipped += not any(same)
    assert 0 < flipped < 16  # some flipped, some not
    assert [len(x[1]) for x in TrainBatches(data, batch_size=32, seed=0)(0)] == [10]  # one batch
    no_flip = list(TrainBatches(data, batch_size=5, seed=0, hflip=False)(0))
    assert sorted(i for _, lab in no_flip for i in [next(j for j, o in enumerate(data.labels) if torch.equal(o, x))
                                                      for x in lab]) == list(range(10))


def refine(settings):
    """Stage refine; its report (``<evaluate.reports>/refine.parquet``)."""
    from pathlib import Path

    stages.get("refine").run(settings)
    return pd.read_parquet(Path(settings.evaluate.reports) / "refine.parquet")


@pytest.fixture(scope="module")
def refined(project):
    root, settings, _ = project
    return root, settings, refine(settings)


def test_refine_report_blocks_and_files(refined):
    root, settings, df = refined
    assert list(df.columns) == ["method", "step", *REPORT_COLUMNS, "mode", "size"]
    assert set(df["mode"]) == {"whole"} and set(df["size"]) == {S}  # how the images met the models
    keys = df[["method", "step"]].drop_duplicates().itertuples(index=False)
    blocks = [(m, None if pd.isna(s) else int(s)) for m, s in keys]
    assert blocks == [("student", None)] + [("refiner", i) for i in STEPS] + [("refiner-gt", i) for i in STEPS]
    for (method, step), block in df.groupby(["method", df["step"].fillna(-1)], sort=False):
        assert list(block["scope"]) == ["class"] * K + ["image"] * N_TEST + ["summary"]
        assert list(block[block["scope"] == "class"]["class_name"]) == NAMES
    out = root / "refined"
    assert len(list((out / "student").glob("*.png"))) == N_TEST
    for method in ("refiner", "refiner-gt"):
        assert sorted(p.name for p in (out / method).iterdir()) == sorted(f"step_{i}" for i in STEPS)
        for i in STEPS:
            assert len(list((out / method / f"step_{i}").glob("*.png"))) == N_TEST
    metrics = json.loads((root / "reports" / "metrics" / "refine.json").read_text())
    assert set(metrics) == {"student", "refiner", "refiner-gt"} and set(metrics["student"]) == {"miou", "mbiou"}
    assert set(metrics["refiner"]) == {f"step_{i}" for i in STEPS}
    summary = df[(df["scope"] == "summary") & (df["method"] == "refiner") & (df["step"] == 19)].iloc[0]
    assert metrics["refiner"]["step_19"]["miou"] == pytest.approx(100 * summary["miou"], abs=1e-4)
    assert not (root / "reports" / "figures").exists()  # pictures are stage report's


def test_report_draws_the_refinement_from_the_refined_labels(refined):
    """Stage report, with no evaluate report: the refinement's plot table and picture only."""
    from PIL import Image

    root, settings, df = refined
    stages.get("report").run(settings)
    plot = pd.read_csv(root / "reports" / "plots" / "refine_steps.csv")
    last = df[(df["scope"] == "summary") & (df["method"] == "refiner") & (df["step"] == 19)].iloc[0]
    assert list(plot["step"]) == STEPS and plot["refiner"].iloc[-1] == pytest.approx(100 * last["miou"], abs=1e-4)
    student = df[(df["scope"] == "summary") & (df["method"] == "student")].iloc[0]
    assert plot["student"].tolist() == pytest.approx([100 * student["miou"]] * len(STEPS), abs=1e-4)
    picture = np.asarray(Image.open(root / "reports" / "figures" / "refinement.png"))
    scale = 2  # the images squared to 64 px (their shortest side) upscaled to >= 128
    assert picture.shape[1] >= 6 * 64 * scale  # image | student | 3 steps | truth
    assert picture.shape[0] >= 2 * 64 * scale  # report.refinement = 2 rows
    # each panel is drawn from the label PNGs: the first step's panel of the first image
    # overlays refined/refiner/step_0/<id>.png on the image
    assert (root / "reports" / "figures" / "refine_steps.png").is_file()
    assert not (root / "reports" / "plots" / "per_class_iou.csv").exists()  # no evaluate report


def _student_by_hand(model, image):
    """Whole mode by hand: the image resized to S x S (PIL bilinear), the student's softmax,
    bilinear back to the image's size, argmax."""
    from PIL import Image

    H, W = image.shape[:2]
    x = np.asarray(Image.fromarray(image).resize((S, S), Image.Resampling.BILINEAR))
    x = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    return F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0).numpy()


def _scored_pixels(df, method, step=None):
    rows = df[(df["method"] == method) & (df["scope"] == "class")]
    rows = rows[rows["step"].isna()] if step is None else rows[rows["step"] == step]
    return int(rows["area_label"].sum())


def test_refine_student_rows_equal_an_independent_evaluation(refined):
    root, settings, df = refined
    model, _ = load_student(settings.student.out)
    reader = DDPMSegFolder(settings.data.out, "test")
    samples = [reader[k] for k in range(len(reader))]
    assert [x.image.shape[:2] for x in samples] == [TEST_SHAPES[k % 3] for k in range(N_TEST)]
    acc = ConfusionAccumulator(K)
    for sample in samples:
        pred = _student_by_hand(model, sample.image)
        saved = load_label_map(root / "refined" / "student" / f"{sample.id}.png")
        assert saved.shape == sample.label.shape and np.mean(saved == pred) > 0.999  # float ties aside
        acc.update(saved, sample.label, sample.id)
    expected = report_frame(acc.result(), NAMES)
    got = df[df["method"] == "student"][REPORT_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    # every labelled pixel of the labels at their own size is scored, and nothing else
    labelled = sum(int((x.label != 255).sum()) for x in samples)
    assert labelled < sum(x.label.size for x in samples)
    assert _scored_pixels(df, "student") == labelled
    # and each refinement step's rows are the evaluation of its PNGs, at the images' sizes
    for method in ("refiner", "refiner-gt"):
        for i in STEPS:
            folder = root / "refined" / method / f"step_{i}"
            for x in samples:
                assert load_label_map(folder / f"{x.id}.png").shape == x.label.shape
            res = evaluate_arrays(((x.id, load_label_map(folder / f"{x.id}.png"), x.label) for x in samples), K)
            row = df[(df["method"] == method) & (df["step"] == i) & (df["scope"] == "summary")].iloc[0]
            assert row["miou"] == pytest.approx(res.miou, nan_ok=True)
            assert row["mbiou"] == pytest.approx(res.mbiou, nan_ok=True)
            assert _scored_pixels(df, method, i) == labelled
    # the refiner predictor is the stage's implementation: same seed, same images, same labels
    from ddps_core.inference.refiner import load_refiner_predictor

    predictor = load_refiner_predictor(settings, "cpu")
    assert (predictor.model, predictor.size, predictor.num_classes, predictor.steps) == ("refiner", S, K, STEPS)
    for x, p in zip(samples, predictor([x.image for x in samples]), strict=True):
        assert np.array_equal(p.labels, load_label_map(root / "refined" / "refiner" / "step_19" / f"{x.id}.png"))
        assert p.uncertainty.shape == x.label.shape and 0 <= p.uncertainty.min() <= p.uncertainty.max() <= 1


def test_refine_is_reproducible_and_slides_over_the_images(refined, tmp_path):
    root, settings, df = refined
    again = refine(settings.model_copy(update={"evaluate": settings.evaluate.model_copy(update={"reports": str(tmp_path)})}))
    pd.testing.assert_frame_equal(again, df)
    # slide mode (windows of the image scaled to short side 32), two of the three run steps
    from ddps_core.student.stage import predict_split

    slide = settings.model_copy(update={
        "data": settings.data.model_copy(update={"resize": "slide"}),
        "refiner": settings.refiner.model_copy(update={"refined_out": str(tmp_path / "slide"), "ablation": False,
                                                       "report_steps": [0, 19]}),
        "evaluate": settings.evaluate.model_copy(update={"reports": str(tmp_path / "f-slide")})})
    dfs = refine(slide)
    keys = dfs[["method", "step"]].drop_duplicates().itertuples(index=False)
    assert [(m, None if pd.isna(s) else int(s)) for m, s in keys] == [("student", None), ("refiner", 0), ("refiner", 19)]
    assert sorted(p.name for p in (tmp_path / "slide" / "refiner").iterdir()) == ["step_0", "step_19"]
    assert set(dfs["mode"]) == {"slide"}
    metrics = json.loads((tmp_path / "f-slide" / "metrics" / "refine.json").read_text())
    assert set(metrics["refiner"]) == {"step_0", "step_19"}
    reader = DDPMSegFolder(settings.data.out, "test")
    labelled = 0
    for k in range(len(reader)):
        x = reader[k]
        labelled += int((x.label != 255).sum())
        for folder in ("student", "refiner/step_0", "refiner/step_19"):
            assert load_label_map(tmp_path / "slide" / folder / f"{x.id}.png").shape == x.label.shape
    for method, step in (("student", None), ("refiner", 0), ("refiner", 19)):
        assert _scored_pixels(dfs, method, step) == labelled
    # the student's rows equal predict_split's in the same mode
    expected = predict_split(slide, "test", tmp_path / "p-slide")
    row = dfs[(dfs["method"] == "student") & (dfs["scope"] == "summary")].iloc[0]
    assert row["miou"] == pytest.approx(expected.miou) and row["mbiou"] == pytest.approx(expected.mbiou)
    for k in range(len(reader)):
        sid = reader.ids[k]
        assert np.array_equal(load_label_map(tmp_path / "p-slide" / f"{sid}.png"),
                              load_label_map(tmp_path / "slide" / "student" / f"{sid}.png"))


def test_refine_refuses_report_steps_it_does_not_run(project, tmp_path):
    from ddps_core.errors import ConfigError

    root, settings, _ = project
    with pytest.raises(ConfigError, match="refiner.report_steps"):
        _settings(root, report_steps=[0, 7])
    # a denoiser whose T differs from the settings' (trained with other settings)
    s = settings.model_copy(update={"refiner": settings.refiner.model_copy(
        update={"num_timesteps": 30, "report_steps": [0, 15], "refined_out": str(tmp_path / "r")})})
    with pytest.raises(ConfigError, match="refiner.report_steps"):
        stages.get("refine").run(s)


def test_refine_refuses_a_denoiser_of_another_student(project, tmp_path):
    root, settings, _ = project
    import shutil

    other = tmp_path / "student"
    shutil.copytree(root / "student", other)
    from safetensors.torch import load_file, save_file

    sd = load_file(other / "student.safetensors")
    first = next(iter(sd))
    sd[first] = sd[first] + 1
    save_file(sd, other / "student.safetensors")
    s = settings.model_copy(update={"student": settings.student.model_copy(update={"out": str(other)})})
    with pytest.raises(DataError, match="another student"):
        stages.get("refine").run(s)


def test_step_table_and_text(refined):
    _, _, df = refined
    table = step_table(df)
    assert list(table["method"]) == ["student", "refiner", "refiner-gt"]
    assert list(table.columns) == ["method", "mIoU", "mBIoU", *(f"mIoU {i}" for i in STEPS),
                                   *(f"mBIoU {i}" for i in STEPS)]
    summary = df[df["scope"] == "summary"]
    student = summary[summary["method"] == "student"].iloc[0]
    assert table.loc[0, "mIoU"] == pytest.approx(100 * student["miou"]) and np.isnan(table.loc[0, "mIoU 0"])
    last = summary[(summary["method"] == "refiner") & (summary["step"] == 19)].iloc[0]
    assert table.loc[1, "mIoU 19"] == pytest.approx(100 * last["miou"]) == table.loc[1, "mIoU"]
    text = format_step_table(table)
    lines = text.splitlines()
    assert len(lines) == 3 and "mIoU 0,10,19 = " in lines[1] and lines[0].startswith("student")
    assert f"{table.loc[1, 'mBIoU 10']:.2f}" in lines[1]
    assert format_step_table(table.to_dict("records")) == text


def test_info_reports_the_configured_and_the_reference_preset(project):
    _, settings, _ = project
    entries = info(settings)
    assert [e["name"] for e in entries] == ["configured (tiny)", "ddps-segformer-b2"]
    assert entries[0]["config"]["num_classes"] == K and entries[0]["config"]["width"] == 8
    assert entries[0]["refine_steps"] == STEPS
    ref = denoiser_preset("ddps-segformer-b2")
    assert (ref.num_classes, ref.feature_channels) == (150, 256)
    assert entries[1]["parameters"] == parameter_counts(ref)
    text = info_text(settings)
    assert f"total {parameter_counts(ref)['total']:,}" in text and "K=150 C=256" in text


def test_a_failed_refine_keeps_the_earlier_labels_and_a_rerun_drops_what_is_no_longer_made(refined, tmp_path,
                                                                                            monkeypatch):
    """The labels are written beside the old ones and swapped in at the end (DVC keeps them:
    ``persist``): a run that fails half-way leaves them as they were, and a finished run
    leaves nothing the settings no longer make (the ablation's folder, a stale file)."""
    import hashlib

    import ddps_core.refiner.stage as refine_stage

    root, settings, _ = refined
    out = root / "refined"

    def snap():
        return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(out.rglob("*")) if p.is_file()}

    before = snap()
    calls = []
    real = refine_stage.atomic_write_bytes

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(refine_stage, "atomic_write_bytes", failing)
    with pytest.raises(OSError):
        stages.get("refine").run(settings)
    monkeypatch.undo()
    assert snap() == before and all(out not in p.parents for p in calls)
    (out / "student" / "gone.png").write_bytes(b"")
    no_ablation = settings.model_copy(update={"refiner": settings.refiner.model_copy(update={"ablation": False}),
                                              "evaluate": settings.evaluate.model_copy(
                                                  update={"reports": str(tmp_path / "reports")})})
    stages.get("refine").run(no_ablation)
    assert sorted(p.name for p in out.iterdir()) == ["refiner", "student"]
    assert not (out / "student" / "gone.png").exists()
    assert not list(root.glob(".refined.*"))


def test_every_training_setting_of_the_refiner_reaches_the_trainer():
    # a knob the settings accept but the stage does not pass on is silently ignored: every field
    # the trainer's config and the settings share must carry the settings' value
    from dataclasses import fields

    from ddps_core.config import load_settings
    from ddps_core.refiner.stage import train_config
    from ddps_core.refiner.train import DDPSTrainConfig

    shared = [f.name for f in fields(DDPSTrainConfig) if f.name not in ("out", "ignore_index")]
    changed = {"feature_drop": 0.3, "single_step_steps": 7, "steps": 11, "dropout": 0.1, "embed_dim": 5,
               "num_timesteps": 6, "schedule": "cosine", "lr": 0.002, "warmup_steps": 3, "weight_decay": 0.5,
               "ema_rate": 0.9, "grad_clip": 2.0, "checkpoint_every": 4, "log_every": 2, "time_budget_s": 9.0,
               "x0_source": "gt", "width": 8, "num_res_blocks": 2, "channel_mult": [1, 2]}
    settings = load_settings(None, {f"refiner.{k}": v for k, v in changed.items()})
    cfg = train_config(settings)
    for name in shared:
        assert getattr(cfg, name) == getattr(settings.refiner, name), name
    assert set(changed) <= set(shared)
