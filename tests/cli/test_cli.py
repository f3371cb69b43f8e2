"""The `ddps` command line: scoring end to end, bad input -> one message and a non-zero exit,
honest help (each option's settings key and current value), commands in pipeline order,
and a missing settings file refused."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ddps.cli import main


def run(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    with pytest.raises(SystemExit) as info:
        main(["data", "synthetic", "--out", str(root), "--n-unlabeled", "0",
              "--n-labeled", "1", "--n-test", "6", "--seed", "1"])
    assert info.value.code == 0
    return root


def test_score_ground_truth_vs_perturbed_copy(synthetic, tmp_path, capsys):
    gt_dir = synthetic / "real" / "test"
    pred = tmp_path / "pred"
    pred.mkdir()
    rng = np.random.default_rng(0)
    gts = {}
    for i, npy in enumerate(sorted(gt_dir.glob("*.npy"))):
        gt = np.load(npy)
        gts[npy.stem] = gt
        p = gt.copy()
        if i % 2:  # half of the predictions perturbed: a block set to "hair" (2)
            y, x = rng.integers(0, 24, 2)
            p[y:y + 8, x:x + 8] = 2
            Image.fromarray(p).save(pred / f"{npy.stem}.png")
        else:
            np.save(pred / f"{npy.stem}.npy", p)
    report = tmp_path / "r" / "report.parquet"
    code, out, err = run(["score", "--pred", str(pred), "--gt", str(gt_dir), "--num-classes", "7",
                          "--names", str(synthetic / "classes.yaml"), "--out", str(report),
                          "--figures", str(tmp_path / "fig"), "--max-figures", "4"], capsys)
    assert code == 0, err
    figs = sorted((tmp_path / "fig").glob("*.png"))
    assert [f.stem for f in figs] == sorted(gts)[:4]
    first = np.asarray(Image.open(figs[0]))
    image = np.asarray(Image.open(gt_dir / f"{figs[0].stem}.png"))
    assert first.shape == (128, 3 * 128 + 2 * 2, 3)  # 32 px panels upscaled 4x, 2 px gaps
    assert np.array_equal(first[:128:4, :128:4], image)  # panel 1 is the image itself
    assert "mIoU" in out and "mouth" in out
    df = pd.read_parquet(report)
    assert list(df["scope"]) == ["class"] * 7 + ["image"] * 6 + ["summary"]
    assert df[df.scope == "class"]["class_name"].tolist()[:3] == ["background", "skin", "hair"]
    per_image = df[df.scope == "image"].set_index("image_id")["miou"]
    stems = sorted(gts)
    assert all(per_image[s] == 1.0 for s in stems[0::2])  # untouched copies are perfect
    assert all(per_image[s] < 1.0 for s in stems[1::2])
    # summary agrees with an independent computation of the dataset-level pixel accuracy
    total = sum(g.size for g in gts.values())
    wrong = 0
    for i, s in enumerate(stems):
        p = np.load(pred / f"{s}.npy") if i % 2 == 0 else np.asarray(Image.open(pred / f"{s}.png"))
        wrong += int((p != gts[s]).sum())
    summary = df[df.scope == "summary"].iloc[0]
    assert summary["aacc"] == pytest.approx(1 - wrong / total)
    assert 0 < summary["mbiou"] < 1 and 0 < summary["miou"] < 1


@pytest.mark.parametrize("case", ["corrupt", "size", "missing_pred", "bad_names"])
def test_score_bad_input_one_message(synthetic, tmp_path, capsys, case):
    gt_dir = synthetic / "real" / "test"
    pred = tmp_path / "pred"
    pred.mkdir()
    stems = sorted(p.stem for p in gt_dir.glob("*.npy"))
    for s in stems:
        np.save(pred / f"{s}.npy", np.load(gt_dir / f"{s}.npy"))
    args = ["score", "--pred", str(pred), "--gt", str(gt_dir), "--num-classes", "7",
            "--out", str(tmp_path / "out.parquet")]
    expect = stems[0]
    if case == "corrupt":
        (pred / f"{stems[0]}.npy").write_bytes(b"\x93NUMPY garbage")
    elif case == "size":
        np.save(pred / f"{stems[0]}.npy", np.zeros((5, 5), np.uint8))
    elif case == "missing_pred":
        (pred / f"{stems[0]}.npy").unlink()
    else:
        names = tmp_path / "classes.yaml"
        names.write_text("classes: [a, b]\n")
        args += ["--names", str(names)]
        expect = "classes.yaml"
    code, out, err = run(args, capsys)
    assert code != 0
    assert err.startswith("error:") and expect in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.parquet").exists()


def test_bad_params_name_the_key_and_exit_2(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synthetic:\n    n_test: many\n")
    code, _, err = run(["config", "show", "--params", str(params)], capsys)
    assert code == 2
    assert "data.synthetic.n_test" in err and "Traceback" not in err


def test_console_script_exit_code_and_debug(tmp_path):
    """The installed entry point: exit status and --debug traceback, in a real process."""
    params = tmp_path / "p.yaml"
    params.write_text("bogus: 1\n")
    cmd = [sys.executable, "-m", "ddps", "config", "show", "--params", str(params)]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and "bogus: unknown key" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_lists_the_commands_in_pipeline_order(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == ["config", "data", "ddpm", "features", "teacher", "generate", "student", "refiner",
                      "evaluate", "report", "predict", "suggest", "score", "deploy"]


def test_option_help_shows_its_settings_key_and_current_value(tmp_path, monkeypatch):
    """Rendered in a project folder whose params.yaml sets ddpm.steps; a key the file leaves
    out shows the embedded default. Rendered by a fresh process: the values are read when
    the command module loads."""
    (tmp_path / "params.yaml").write_text("ddpm:\n  steps: 321\n")
    proc = subprocess.run([sys.executable, "-m", "ddps", "ddpm", "train", "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # help lines wrap: compare the words
    options = {part.split()[0]: part for part in ("--" + p for p in text.split(" --")[1:])}
    assert "(ddpm.steps; params.yaml: 321)" in options["--steps"]
    assert "(ddpm.preset; default 'tiny32')" in options["--preset"]
    assert options["--steps"].startswith("--steps N ") and "<" not in text  # metavars are words


def test_a_missing_settings_file_is_an_error_and_defaults_are_a_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["config", "show", "--params", "typo.yaml"], capsys)
    assert code == 2 and err.startswith("error: typo.yaml: settings file not found")
    code, out, _ = run(["config", "show", "--defaults", "--set", "ddpm.steps=9"], capsys)
    assert code == 0 and "steps: 9" in out and "preset: tiny32" in out


def flat(result):
    """(code, out, err) with the console's line wrapping undone."""
    code, out, err = result
    return code, " ".join(out.split()), " ".join(err.split())


def test_features_info_verify_names_a_flipped_value_and_repair_marks_its_shard(tmp_path, capsys, monkeypatch):
    from ddps_core.features import FeatureStore

    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults
    shapes = {"t3_b0": (2, 4, 4)}
    store = FeatureStore.create(tmp_path / "s.zarr", model_id="m", steps=[3], blocks=[0], image_size=8,
                                shapes=shapes, image_ids=["a", "b", "c", "d"], shard_images=2)
    rng = np.random.default_rng(0)
    for k in range(store.num_shards):
        store.write_shard(k, {"t3_b0": rng.standard_normal((2, 2, 4, 4)).astype(np.float16)})
    store.release()
    code, out, err = flat(run(["features", "info", str(tmp_path / "s.zarr"), "--verify"], capsys))
    assert code == 0 and "every done shard reads back as written" in out
    chunk = tmp_path / "s.zarr" / "features" / "c.1.0"
    raw = bytearray(chunk.read_bytes())
    raw[12] ^= 0x10  # same size: only the checksum sees it
    chunk.write_bytes(bytes(raw))
    code, out, err = flat(run(["features", "info", str(tmp_path / "s.zarr"), "--verify"], capsys))
    assert code == 1 and "shard 1 (images 2-3)" in err and "CRC32C" in err and "--repair" in err
    assert FeatureStore.open(tmp_path / "s.zarr", read_only=True, check=False).done_mask().all()
    code, out, err = flat(run(["features", "info", str(tmp_path / "s.zarr"), "--verify", "--repair"], capsys))
    assert code == 1 and "marked not done" in err
    done = FeatureStore.open(tmp_path / "s.zarr", read_only=True, check=False).done_mask()
    assert done.tolist() == [True, True, False, False]
    code, _, err = flat(run(["features", "info", str(tmp_path / "s.zarr"), "--repair"], capsys))
    assert code != 0 and "--repair: only with --verify" in err


def test_report_steps_option_takes_the_steps_as_text(tmp_path):
    """`ddps refiner refine --report-steps "0, 19"` sets refiner.report_steps (T = 20 by
    default); a step that is not run is one line naming the key (the stage is not reached)."""
    from ddps.cli import settings_from

    s = settings_from(tmp_path / "none.yaml", True, None, **{"refiner.report_steps": "0, 19"})
    assert s.refiner.report_steps == [0, 19]
    proc = subprocess.run([sys.executable, "-m", "ddps", "refiner", "refine", "--defaults", "--report-steps", "3"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "refiner.report_steps" in proc.stderr and "Traceback" not in proc.stderr
