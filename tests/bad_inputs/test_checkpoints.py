"""Bad DDPM checkpoints (``ddpm.checkpoint``, stage ``train_ddpm``): missing, unexpected and
mis-shaped keys are listed, a truncated file is named, and a pickle with code in it is
refused without running the code. The earlier ``ddpm.out`` stays as it was."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from tests.bad_inputs.conftest import assert_clear_error, run_script, snapshot

SPEC_KEYS = "guided_diffusion_small32_keys.txt"  # the official key list of preset small32-spec


def spec_dir() -> Path:
    """The official checkpoints' state-dict keys and shapes (``name [shape]`` per line), read
    from guided-diffusion's released ``ffhq.pt`` layout: the fixture the UNet must load."""
    return Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys"


def spec_state_dict() -> dict[str, torch.Tensor]:
    """A state dict built from the official key list alone (not from our UNet code)."""
    sd = {}
    for line in (spec_dir() / SPEC_KEYS).read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            dims = [int(s) for s in shape.strip().strip("[]").split(",") if s.strip()]
            sd[key] = torch.full(dims, 0.01)
    return sd


@pytest.fixture
def adopted(tmp_path, cli):
    """An earlier, good run of ``ddps ddpm train`` with ``ddpm.checkpoint`` set."""
    good = tmp_path / "good.pt"
    torch.save(spec_state_dict(), good)
    out = tmp_path / "ddpm"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"device": "cpu", "ddpm": {
        "preset": "small32-spec", "checkpoint": str(good), "out": str(out)}}))
    res = cli("ddpm", "train", "--params", params)
    assert res.code == 0, res.err
    assert (out / "model.json").is_file()
    return params, out


def _missing(sd: dict, path: Path) -> str:
    del sd["input_blocks.0.0.weight"]
    torch.save(sd, path)
    return "1 missing key(s): input_blocks.0.0.weight"


def _unexpected(sd: dict, path: Path) -> str:
    sd["input_blocks.0.0.extra"] = torch.zeros(3)
    torch.save(sd, path)
    return "1 unexpected key(s): input_blocks.0.0.extra"


def _misshaped(sd: dict, path: Path) -> str:
    shape = list(sd["out.2.weight"].shape)
    wrong = [shape[0] + 1, *shape[1:]]
    sd["out.2.weight"] = torch.zeros(wrong)
    torch.save(sd, path)
    return f"1 mis-shaped key(s): out.2.weight (expected {shape}, got {wrong})"


def _truncated(sd: dict, path: Path) -> str:
    torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "unreadable (truncated or not a checkpoint)"


CASES = {"missing_keys": _missing, "unexpected_keys": _unexpected,
         "misshaped_keys": _misshaped, "truncated": _truncated}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_lists_the_keys(adopted, cli, tmp_path, case):
    params, out = adopted
    before = snapshot(out)
    bad = tmp_path / f"{case}.pt"
    what = CASES[case](spec_state_dict(), bad)
    res = cli("ddpm", "train", "--params", params, "--set", f"ddpm.checkpoint={bad}")
    assert_clear_error(res, f"checkpoint {bad}", what)
    assert snapshot(out) == before


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _write_evil(path: Path, layout: str, marker: Path) -> Path:
    if layout == "torch_zip":  # torch.save's zip format: real weights plus the payload
        torch.save({**spec_state_dict(), "payload": Payload(marker)}, path)
    else:  # a bare pickle (the legacy format)
        path.write_bytes(pickle.dumps(Payload(marker)))
    return path


@pytest.mark.parametrize("layout", ["torch_zip", "raw_pickle"])
def test_checkpoint_with_code_is_refused_without_running_it(adopted, cli, tmp_path, layout):
    params, out = adopted
    before = snapshot(out)
    marker = tmp_path / "pwned"
    evil = _write_evil(tmp_path / f"evil_{layout}.pt", layout, marker)
    # control: the same file made for another marker is armed - a plain unpickle runs it
    control = tmp_path / "control"
    armed = _write_evil(tmp_path / "armed.pt", layout, control)
    if layout == "torch_zip":
        torch.load(armed, weights_only=False)
    else:
        pickle.loads(armed.read_bytes())
    assert control.exists()

    res = cli("ddpm", "train", "--params", params, "--set", f"ddpm.checkpoint={evil}")
    assert_clear_error(res, f"checkpoint {evil}", "not a plain weights file",
                       "refused for safety")
    assert not marker.exists(), "the payload ran"
    assert snapshot(out) == before


def test_checkpoint_with_code_console_script(adopted, tmp_path):
    """The same refusal in a fresh process through the installed script: exit 1, one line."""
    params, out = adopted
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"payload": Payload(marker)}, evil)
    before = snapshot(out)
    res = run_script("ddpm", "train", "--params", params, "--set", f"ddpm.checkpoint={evil}")
    assert res.code == 1
    assert_clear_error(res, f"checkpoint {evil}", "not a plain weights file")
    assert not marker.exists()
    assert snapshot(out) == before


# --------------------------------------------------------------------------- model.json
def _truncate(path: Path) -> str:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    return "not a readable record (truncated or corrupt JSON"


def _drop(key: str):
    def drop(path: Path) -> str:
        import json

        record = json.loads(path.read_text())
        del record[key]
        path.write_text(json.dumps(record))
        return f"incomplete record: no '{key}' entry"

    return drop


RECORD_FAULTS = {"truncated": _truncate, "incomplete": _drop("schedule")}


@pytest.mark.parametrize("fault", list(RECORD_FAULTS))
def test_a_broken_ddpm_model_json_is_one_line(adopted, cli, tmp_path, fault):
    params, out = adopted
    record = out / "model.json"
    what = RECORD_FAULTS[fault](record)
    before = snapshot(out)
    res = cli("ddpm", "sample", "--params", params, "--n", "1", "--steps", "2", "--out", tmp_path / "s.png")
    assert_clear_error(res, record, what, "train_ddpm")
    assert snapshot(out) == before and not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("fault", ["truncated", "incomplete"])
def test_a_broken_student_model_json_is_one_line(adopted, cli, tmp_path, fault):
    """Any stage that loads the student (refine here) reads its model.json first."""
    params, _ = adopted
    student = tmp_path / "student"
    student.mkdir()
    record = student / "model.json"
    record.write_text('{"arch": "segformer", "encoder": "mit_b0", "num_classes": 3, "image_size": 32}')
    what = _truncate(record) if fault == "truncated" else _drop("encoder")(record)
    before = snapshot(student)
    res = cli("refiner", "refine", "--params", params, "--set", f"student.out={student}",
              "--set", f"refiner.refined_out={tmp_path / 'refined'}")
    assert_clear_error(res, record, what, "train_student")
    assert snapshot(student) == before and not (tmp_path / "refined").exists()


@pytest.mark.parametrize("fault", ["truncated", "incomplete", "foreign"])
def test_a_broken_refiner_model_json_is_one_line(tmp_path, fault):
    from ddps_core.errors import DataError, user_message
    from ddps_core.refiner.train import load_denoiser

    record = tmp_path / "model.json"
    record.write_text('{"denoiser": {"num_classes": 3, "width": 8, "channel_mult": [1]}, "schedule": {}}')
    if fault == "truncated":
        what = _truncate(record)
    elif fault == "incomplete":
        what = _drop("denoiser")(record)
    else:
        what = "its 'denoiser' entry does not describe a denoiser"
    with pytest.raises(DataError) as err:
        load_denoiser(tmp_path)
    line, code = user_message(err.value)
    assert code == 1 and "\n" not in line and line.startswith(f"{record}: ") and what in line


def test_a_broken_ddpm_record_stops_generate_with_one_line(tmp_path):
    from ddps_core.config import parse_settings
    from ddps_core.errors import DataError
    from ddps_core.generate.stage import _model_info

    (tmp_path / "model.json").write_text('{"preset": "tiny32", "sche')
    with pytest.raises(DataError, match=r"model\.json: not a readable record .*rerun the train_ddpm stage"):
        _model_info(parse_settings({"ddpm": {"out": str(tmp_path)}}))
