"""Bad settings: params.yaml with an unknown key or a wrong type, a stage-flow parameter out of
range, and a feature store made with other settings (``features.on_change: error``)."""

from __future__ import annotations

import pytest
import yaml

from ddps_core.errors import ConfigError
from tests.bad_inputs.conftest import assert_clear_error, run_script, snapshot


@pytest.fixture
def synthetic_out(tmp_path, cli):
    """An earlier ``ddps data synthetic`` output."""
    out = tmp_path / "ds"
    res = cli("data", "synthetic", "--out", out, "--n-unlabeled", "0", "--n-labeled", "1",
              "--n-test", "1")
    assert res.code == 0, res.err
    return out


def test_params_unknown_key(tmp_path, cli, synthetic_out):
    before = snapshot(synthetic_out)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"out": str(synthetic_out), "synthetic": {
        "n_test": 1, "n_labeled": 1, "n_unlabeled": 0, "sizee": 64}}}))
    res = cli("data", "prepare", "--params", params)
    assert res.code == 2  # ConfigError
    assert_clear_error(res, f"{params}: data.synthetic.sizee: unknown key")
    assert snapshot(synthetic_out) == before


def test_params_wrong_type(tmp_path, cli, synthetic_out):
    before = snapshot(synthetic_out)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {synthetic_out}\n  synthetic:\n    n_test: many\n"
                      "teacher:\n  members: [10]\n")
    res = run_script("data", "prepare", "--params", params)
    assert res.code == 2
    msg = assert_clear_error(res, f"{params}: data.synthetic.n_test: Input should be a valid integer",
                             "(got 'many')", f"{params}: teacher.members")
    assert len(msg.strip().splitlines()) == 3  # the header line, then one line per bad key
    assert snapshot(synthetic_out) == before


def test_cli_override_out_of_range_names_the_override(tmp_path, cli, synthetic_out):
    before = snapshot(synthetic_out)
    res = cli("data", "synthetic", "--out", synthetic_out, "--image-size", "48")
    assert res.code == 2
    assert_clear_error(res, "data.synthetic.image_size", "(got 48)")
    assert snapshot(synthetic_out) == before


def test_flow_parameter_out_of_range(tmp_path):
    """A deployment's parameters reach a stage flow as overrides; the flow validates them
    before any task runs. The flow body is called directly (``.fn``), so no Prefect server is
    needed: what is checked is the flow's own validation."""
    from flows.common import settings_for
    from flows.stages import extract

    params = tmp_path / "params.yaml"
    params.write_text("{}\n")  # the embedded defaults
    with pytest.raises(ConfigError, match=r"features\.batch_size: Input should be greater than or equal to 1 \(got 0\)"):
        settings_for(params, {"features": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"features\.batch_size: .*\(got 0\)"):
        extract.fn(overrides={"features.batch_size": 0}, params_path=str(params))
    with pytest.raises(ConfigError, match=r"features\.shard_imagez: unknown key"):
        extract.fn(overrides={"features": {"shard_imagez": 4}}, params_path=str(params))
    with pytest.raises(ConfigError, match=r"no-params\.yaml: file not found"):
        extract.fn(params_path=str(tmp_path / "no-params.yaml"))


@pytest.fixture
def extracted(tmp_path, cli):
    """A tiny project (random small32-spec DDPM) whose train split was extracted."""
    from tests.helpers import tiny_project

    raw = tiny_project(tmp_path, {"n_unlabeled": 0, "n_labeled": 2, "n_test": 1},
                       features={"out": str(tmp_path / "features"), "steps": [10], "blocks": [2],
                                 "splits": ["train"], "batch_size": 2},
                       teacher={"baselines": []})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    res = cli("features", "extract", "--params", params)
    assert res.code == 0, res.err
    return params, tmp_path / "features" / "train.zarr"


def test_feature_store_made_with_other_settings(extracted, cli):
    params, store = extracted
    before = snapshot(store)
    res = cli("features", "extract", "--params", params, "--set", "features.on_change=error",
              "--set", "features.steps=[10, 20]", "--set", "features.noise_seed=3")
    assert res.code == 2
    assert_clear_error(res, f"{store}: existing feature store was made with different settings",
                       "steps", "noise_seed")
    assert snapshot(store) == before


def test_a_key_given_twice_is_an_error_naming_it(tmp_path, cli, synthetic_out):
    """YAML keeps the last of two equal keys without a word; the second n_test would win."""
    before = snapshot(synthetic_out)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {synthetic_out}\n  synthetic:\n    n_test: 1\n    n_labeled: 1\n"
                      "    n_unlabeled: 0\n    n_test: 5\n")
    res = cli("data", "prepare", "--params", params)
    assert res.code == 2
    assert_clear_error(res, f"{params}: data.synthetic.n_test: key given twice (lines 4 and 7)")
    assert snapshot(synthetic_out) == before


@pytest.mark.parametrize("setting, kind", [("teacher.members", "integer"), ("ddpm.lr", "number"),
                                           ("features.steps", "integer")])
def test_a_boolean_where_a_number_is_expected_is_an_error(tmp_path, cli, synthetic_out, setting, kind):
    """pydantic would read ``members: true`` as one member."""
    before = snapshot(synthetic_out)
    section, key = setting.split(".")
    params = tmp_path / "params.yaml"
    value = [True, 10] if key == "steps" else True
    params.write_text(yaml.safe_dump({"data": {"out": str(synthetic_out)}, section: {key: value}}))
    res = cli("config", "show", "--params", params)
    assert res.code == 2
    assert_clear_error(res, f"{params}: {setting}: Input should be a valid {kind}, not a boolean")
    assert snapshot(synthetic_out) == before


@pytest.mark.parametrize("override, message", [
    ("features.steps=[10, 1000]", "features.steps: 1000 is not a timestep of the diffusion model "
                                  "(ddpm.num_timesteps is 1000: 0..999)"),
    ("features.blocks=[0, 6]", "features.blocks: 6 is not an output block of preset 'tiny32' (it has 6: 0..5)"),
    ("ddpm.sample_steps=5000", "ddpm.sample_steps: 5000 sampling steps are more than the model's 1000"),
])
def test_settings_that_two_sections_rule_out_fail_in_config_show(tmp_path, cli, override, message):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    extra = ["--set", "data.ignore_index=0"] if override.startswith("data.") else []
    res = cli("config", "show", "--params", params, "--set", override, *extra)
    assert res.code == 2
    assert_clear_error(res, message)


@pytest.mark.parametrize("option, value, needle", [("--n", "-1", "ddps ddpm sample: Invalid value for '--n'"),
                                                   ("--steps", "0", "ddpm.sample_steps")])
def test_ddpm_sample_with_an_option_out_of_range_is_one_line(tmp_path, cli, option, value, needle):
    res = cli("ddpm", "sample", "--defaults", "--out", tmp_path / "s.png", option, value)
    assert res.code == 2
    assert_clear_error(res, needle)
    assert not (tmp_path / "s.png").exists()


def test_ddpm_sample_with_more_steps_than_the_model_has_is_one_line(tmp_path, cli):
    from tests.helpers import tiny_project

    raw = tiny_project(tmp_path, {"n_unlabeled": 0, "n_labeled": 1, "n_test": 1})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    before = snapshot(tmp_path / "ddpm")
    res = cli("ddpm", "sample", "--params", params, "--steps", "5000", "--n", "1", "--out", tmp_path / "s.png")
    assert res.code == 2
    assert_clear_error(res, "ddpm.sample_steps", "5000")
    assert snapshot(tmp_path / "ddpm") == before and not (tmp_path / "s.png").exists()
