"""`ddps predict`: any images (formats, modes, sizes, folders, URLs) to masks at their own
size, overlays with a legend, uncertainty heat maps and a Parquet table; resume by content
and model id; a bad file is one line and exit 1 with the others written; a class count that
does not fit is one error; a missing model names its stage. The model is a fake predictor
(tests/predict/fakes.py) put in through the loader seam, ``ddps_core.predict.run._load``."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddps.cli import main
from ddps_core.datasets.common import load_image, load_label
from ddps_core.errors import ConfigError, DataError
from ddps_core.predict import outputs, run
from ddps_core.predict.inputs import collect_inputs
from ddps_core.viz.palette import palette
from tests.predict.fakes import NAMES, FakePredictor, fake_labels, mixed_folder, quadrants


@pytest.fixture
def fake(monkeypatch):
    """The loader seam returns the fake predictor; ``fake.loaded`` records its arguments."""
    predictor = FakePredictor()
    predictor.loaded = []

    def load(settings, model, device=None):
        predictor.loaded.append((model, device))
        predictor.model = model
        return predictor

    monkeypatch.setattr(run, "_load", load)
    return predictor


def cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


def predict(args, capsys, *extra):
    return cli(["predict", *map(str, args), "--defaults", *extra], capsys)


def table(out: Path) -> list[dict]:
    return pq.read_table(out / "predictions.parquet").to_pylist()


def errors(err: str) -> list[str]:
    """The ``error:`` lines of stderr (progress and log lines aside), unwrapped."""
    return [" ".join(ln.split()) for ln in err.splitlines() if ln.startswith("error:")]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


# --------------------------------------------------------------------------- formats and outputs
def test_a_mixed_folder_gives_masks_at_each_size_overlays_with_a_legend_heat_maps_and_a_table(
        fake, tmp_path, capsys):
    sizes = mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, err = predict([tmp_path / "in", "--out", out, "--overlay", "--uncertainty", "--batch-size", 3,
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    assert fake.loaded == [("student", "cpu")] and fake.calls == [3, 3, 1]  # batched, 7 images
    assert "1 file(s) ignored" in err and "notes.txt" in err  # the non-image file, counted and named
    assert "7 predicted, 0 reused of 7 images" in " ".join(stdout.split())
    sources = {p.relative_to(tmp_path / "in").with_suffix("").as_posix(): p
               for p in (tmp_path / "in").rglob("*") if p.is_file() and p.suffix != ".txt" and p.name[0] != "."}
    assert set(sources) == set(sizes)

    for name, (h, w) in sizes.items():
        image = load_image(sources[name])
        assert image.shape[:2] == (h, w)
        expected = fake_labels(image)
        # the mask: an 8-bit palette PNG at the image's size, its values the class ids, the
        # project's class colours as its palette; label readers get the ids
        with Image.open(out / "masks" / f"{name}.png") as m:
            assert m.mode == "P" and m.size == (w, h)
            assert m.getpalette()[: 3 * 256] == palette(256).ravel().tolist()
            assert np.array_equal(np.asarray(m), expected)
        assert np.array_equal(load_label(out / "masks" / f"{name}.png"), expected)
        # the overlay: the blended image at the top left, the legend strip below it
        over = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        present = sorted(set(expected.ravel().tolist()))
        strip = over[h:]
        assert over.shape[0] == h + outputs.legend_height(expected, NAMES, w) and over.shape[1] >= w
        assert np.array_equal(over[:h, :w], outputs.overlay_picture(image, expected, NAMES)[:h, :w])
        blend = np.rint(0.5 * image + 0.5 * palette(4)[expected]).astype(np.uint8)
        assert np.abs(over[:h, :w].astype(int) - blend).max() <= 1
        assert strip.shape[0] >= 10
        white = (strip == 255).all(axis=2).mean()
        assert 0.5 < white < 0.99  # a drawn legend, not the image: mostly white, with ink
        assert ((strip < 40).all(axis=2)).sum() > 20  # black text and swatch borders
        for c in range(1, 4):  # a swatch of each present class colour, and only of those
            has_swatch = (strip == palette(4)[c]).all(axis=2).sum() >= 16
            assert has_swatch == (c in present), (name, c)
        # the uncertainty map: 8-bit, value = round(255 * u) with u = blue / 255, heat colours
        with Image.open(out / "uncertainty" / f"{name}.png") as u:
            assert u.mode == "P" and u.size == (w, h)
            assert np.array_equal(np.asarray(u), image[..., 2])
            assert u.getpalette()[:3] != u.getpalette()[-3:]

    rows = table(out)
    assert len(rows) == 7 and list(rows[0]) == list(run.COLUMNS)
    by_mask = {r["mask"]: r for r in rows}
    for name, (h, w) in sizes.items():
        r = by_mask[f"masks/{name}.png"]
        assert r["image"] == str(sources[name]) and (r["height"], r["width"]) == (h, w)
        assert (r["model"], r["model_id"], r["num_classes"]) == ("student", "fake-1", 4)
        assert r["sha256"] == hashlib.sha256(sources[name].read_bytes()).hexdigest()
        assert r["overlay"] == f"overlays/{name}.png" and r["uncertainty"] == f"uncertainty/{name}.png"
        assert r["seconds"] > 0 and 0 <= r["score"] <= 1


def test_one_conversion_rule_for_grey_rgba_palette_and_16_bit(tmp_path):
    """Grey to R = G = B; alpha dropped; palette colours; 16-bit by its high byte, v >> 8 (big-
    endian TIFFs too); the same rule for arrays and PIL images (the Python API)."""
    from ddps_core.datasets.common import decode_image, to_rgb

    rgb = quadrants(6, 5)
    grey = rgb[..., 0]
    deep = np.array([[0, 257, 65535], [1000, 30000, 65535]], np.uint16)
    scaled = (deep // 256).astype(np.uint8)  # the high byte, by hand
    rgba = np.concatenate([rgb, np.zeros((6, 5, 1), np.uint8)], axis=2)
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8))
    pal.putpalette([10, 20, 30, 200, 100, 50])
    cases = [(grey, np.repeat(grey[..., None], 3, 2)), (rgba, rgb), (deep, np.repeat(scaled[..., None], 3, 2)),
             (rgb, rgb)]
    for array, expected in cases:
        assert np.array_equal(to_rgb(array), expected)
        assert np.array_equal(to_rgb(Image.fromarray(array)), expected)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        assert np.array_equal(decode_image(buf.getvalue(), "x.png"), expected)
    assert to_rgb(pal)[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    Image.fromarray(deep.astype(">u2")).save(tmp_path / "be.tif")
    assert Image.open(tmp_path / "be.tif").mode == "I;16B"
    assert np.array_equal(load_image(tmp_path / "be.tif")[..., 0], scaled)
    with pytest.raises(ValueError, match="float32"):
        to_rgb(np.zeros((4, 4), np.float32))


def test_masks_of_more_than_256_classes_are_16_bit():
    labels = np.array([[0, 299], [256, 3]], np.uint16)
    with Image.open(io.BytesIO(outputs.mask_png(labels, 300))) as m:
        assert m.mode == "I;16" and np.array_equal(np.asarray(m), labels)


# --------------------------------------------------------------------------- bad input
def test_a_corrupt_file_is_one_line_naming_it_and_the_others_are_written(fake, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(quadrants(20 + i, 30, i)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    good = io.BytesIO()
    Image.fromarray(quadrants(40, 40)).save(good, format="JPEG")
    (folder / "cut.jpg").write_bytes(good.getvalue()[:30])
    out = tmp_path / "out"
    code, _, err = predict([folder, "--out", out, "--batch-size", 2], capsys)
    assert code == 1
    lines = errors(err)
    assert len([ln for ln in lines if "broken.png" in ln]) == 1
    assert len([ln for ln in lines if "cut.jpg" in ln]) == 1
    assert all("cannot read image" in ln for ln in lines[:2])
    assert len(lines) == 3 and lines[-1].startswith("error: 2 of 5 images could not be read")
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["ok0.png", "ok1.png", "ok2.png"]
    assert sorted(r["mask"] for r in table(out)) == [f"masks/ok{i}.png" for i in range(3)]


def test_a_run_that_stops_keeps_its_table_and_the_rerun_goes_on_from_there(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(quadrants(16, 16 + i, i)).save(folder / f"im{i}.png")
    out = tmp_path / "out"
    from ddps_core.config import load_settings

    s = load_settings(None)
    broken = FakePredictor(fail_on_call=2)
    with pytest.raises(RuntimeError, match="went away"):
        run.predict_images(s, [str(folder)], "student", out, batch_size=2, predictor=broken)
    assert sorted(r["mask"] for r in table(out)) == ["masks/im0.png", "masks/im1.png"]
    again = FakePredictor()
    summary = run.predict_images(s, [str(folder)], "student", out, batch_size=2, predictor=again)
    assert (summary["reused"], summary["predicted"]) == (2, 3) and again.calls == [2, 1]


def test_a_class_count_that_does_not_fit_is_one_error_before_any_image(fake, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(quadrants(16, 16)).save(folder / "a.png")
    out = tmp_path / "out"
    code, _, err = predict([folder, "--out", out, "--num-classes", "5"], capsys)
    assert code == 2 and errors(err) == ["error: data.num_classes (--num-classes) is 5, but the student (fake-1) "
                                         "predicts 4 classes"]
    assert not out.exists()
    code, _, _ = predict([folder, "--out", out, "--set", "data.num_classes=4"], capsys)
    assert code == 0
    before = mtimes(out)
    fake.num_classes, fake.model_id = 7, "fake-7"
    code, _, err = predict([folder, "--out", out], capsys)
    assert code == 1 and f"{out / 'predictions.parquet'}: holds masks of 4 classes, but the student predicts 7" in err
    assert mtimes(out) == before and fake.calls == [1]


def test_missing_inputs_name_them(fake, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for args, expect in (([tmp_path / "nope"], "nope: no such file or folder"),
                         ([tmp_path / "empty"], "empty: no image file in it"),
                         ([tmp_path / "notes.txt"], "notes.txt: not an image file")):
        code, _, err = predict([*args, "--out", tmp_path / "out"], capsys)
        assert code == 1 and len(errors(err)) == 1 and expect in errors(err)[0], err
    code, _, err = predict([tmp_path / "in", "--out", tmp_path / "out", "--model", "segformer"], capsys)
    assert code == 2 and "--model 'segformer': expected one of teacher, student, refiner" in err


def test_two_images_with_one_name_are_an_error_naming_both(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(quadrants(8, 8)).save(folder / "a.png")
    Image.fromarray(quadrants(8, 8)).save(folder / "a.jpg")
    with pytest.raises(DataError, match=r"a\.jpg and .*a\.png: both would be written as a\.png"):
        collect_inputs([str(folder)])


def test_a_missing_model_names_the_stage_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(quadrants(8, 8)).save(tmp_path / "a.png")
    code, _, err = predict(["a.png", "--out", "out"], capsys)
    assert code == 1 and errors(err)[0].startswith("error: data/models/student/student.safetensors: not found: the "
                                                   "student needs stage train_student (run `ddps student train`")
    (tmp_path / "data/models/student").mkdir(parents=True)
    (tmp_path / "data/models/student/student.safetensors").write_bytes(b"x")
    code, _, err = predict(["a.png", "--out", "out", "--model", "refiner"], capsys)
    assert code == 1 and "ema.safetensors: not found: the refiner needs stage train_refiner" in err
    code, _, err = predict(["a.png", "--out", "out", "--model", "teacher"], capsys)
    assert code == 1 and "data/models/ddpm/model.json: not found: the teacher needs stage train_ddpm" in err
    assert not (tmp_path / "out").exists()


def test_the_model_files_checked_are_the_trainers_files():
    from ddps_core.diffusion import train as ddpm_train
    from ddps_core.refiner import train as refiner_train
    from ddps_core.student import model as student_model
    from ddps_core.teacher import stage as teacher_stage

    files = {(key, name) for entries in run.MODEL_FILES.values() for key, name, _, _ in entries}
    assert files == {("ddpm.out", ddpm_train.INFO_FILE), ("teacher.out", teacher_stage.WEIGHTS),
                     ("student.out", student_model.WEIGHTS_FILE), ("refiner.out", refiner_train.WEIGHTS_FILE)}


# --------------------------------------------------------------------------- resume
def test_a_rerun_reuses_by_content_and_model_id(fake, tmp_path, capsys):
    folder = tmp_path / "in"
    mixed_folder(folder)
    out = tmp_path / "out"
    assert predict([folder, "--out", out, "--uncertainty"], capsys)[0] == 0
    first = mtimes(out)
    assert len(first) == 14 and fake.calls == [7]

    # the same images and model: nothing predicted, nothing rewritten
    code, stdout, _ = predict([folder, "--out", out, "--uncertainty"], capsys)
    assert code == 0 and "0 predicted, 7 reused" in " ".join(stdout.split())
    assert mtimes(out) == first and fake.calls == [7]

    # overlays asked for later are drawn from the masks, without the model
    assert predict([folder, "--out", out, "--overlay"], capsys)[0] == 0
    assert fake.calls == [7] and len(list((out / "overlays").rglob("*.png"))) == 7
    assert {k: v for k, v in mtimes(out).items() if not k.startswith("overlays")} == first

    # a changed file under the same name is predicted again, alone
    Image.fromarray(quadrants(64, 96, 99)).save(folder / "wide.png")
    assert predict([folder, "--out", out, "--uncertainty"], capsys)[0] == 0
    now = mtimes(out)
    assert fake.calls == [7, 1]
    assert [k for k in first if now[k] != first[k]] == ["masks/wide.png", "uncertainty/wide.png"]
    assert not (out / "overlays/wide.png").exists()  # the old content's overlay goes (no --overlay)

    # another model id predicts every image again
    fake.model_id = "fake-2"
    code, stdout, _ = predict([folder, "--out", out], capsys)
    assert code == 0 and "7 predicted, 0 reused" in " ".join(stdout.split()) and fake.calls == [7, 1, 7]
    assert all(now[k] != v for k, v in mtimes(out).items() if k.startswith("masks"))
    assert {r["model_id"] for r in table(out)} == {"fake-2"}
    # the earlier model's pictures of the images go with its masks
    assert not list(out.glob("uncertainty/**/*.png")) and not list(out.glob("overlays/**/*.png"))


def test_the_output_folder_inside_the_input_folder_is_not_read_back(fake, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(quadrants(8, 8)).save(folder / "a.png")
    for _ in range(2):
        code, stdout, _ = predict([folder, "--out", folder / "preds", "--overlay"], capsys)
        assert code == 0 and "of 1 images" in stdout


def test_urls_in_and_out(tmp_path):
    """fsspec URLs for the inputs (a prefix, a glob) and the output folder; a rerun reuses."""
    import fsspec

    from ddps_core.config import load_settings

    base = f"memory://ddps-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    for name, size in {"imgs/a.png": (10, 12), "imgs/sub/b.jpg": (9, 7), "imgs/c.txt": None}.items():
        buf = io.BytesIO()
        if size:
            h, w = size
            Image.fromarray(quadrants(h, w)).save(buf, format="PNG" if name.endswith("png") else "JPEG")
        fs.pipe_file(f"{base}/{name}", buf.getvalue() or b"text")
    s = load_settings(None)
    p = FakePredictor()
    summary = run.predict_images(s, [f"{base}/imgs"], "student", f"{base}/out", overlay=True, predictor=p)
    assert (summary["images"], summary["predicted"], summary["ignored"]) == (2, 2, 1)
    with fs.open(f"{base}/out/masks/sub/b.png") as f, Image.open(f) as m:
        assert m.size == (7, 9) and m.mode == "P"
    rows = run.read_table(f"{base}/out")
    assert rows["masks/a.png"]["image"] == f"{base}/imgs/a.png"
    again = run.predict_images(s, [f"{base}/imgs/*.png"], "student", f"{base}/out", predictor=p)
    assert (again["images"], again["reused"]) == (1, 1) and p.calls == [2]


def test_bad_batch_size_and_unknown_model_are_settings_errors(tmp_path):
    from ddps_core.config import load_settings

    with pytest.raises(ConfigError, match="--batch-size"):
        run.predict_images(load_settings(None), [str(tmp_path)], "student", tmp_path / "o", batch_size=0)
