"""Flows run under a Prefect test server; tasks retry transient faults, never bad input."""

import pytest
from prefect import flow, task

from ddps_core.datasets import DDPMSegFolder
from ddps_core.errors import DataError
from tasks.common import retry_unless_user_error

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_data_flow_applies_overrides_over_params(tmp_path):
    from flows.data import data_flow

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {tmp_path / 'ds'}\n  synthetic:\n    n_test: 3\n")
    summary = data_flow(data={"synthetic": {"n_unlabeled": 4, "n_labeled": 2}},
                        params_path=str(params))
    # n_test from the file, the other counts from the flow parameters
    assert summary["counts"] == {"train": 2, "test": 3, "unlabeled": 4}
    assert len(DDPMSegFolder(tmp_path / "ds", "test")) == 3


def test_transient_failure_is_retried_bad_input_is_not():
    attempts = {"flaky": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def flaky():
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise RuntimeError("worker lost")
        return "ok"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def bad():
        attempts["bad"] += 1
        raise DataError("x.png: corrupt")

    @flow
    def both():
        return flaky(), bad(return_state=True)

    result, bad_state = both()
    assert result == "ok" and attempts["flaky"] == 2
    assert bad_state.is_failed() and attempts["bad"] == 1


def test_bad_parameter_fails_the_flow_run_naming_the_key(tmp_path):
    """A deployment's parameters are section overrides validated like params.yaml: an out of
    range or unknown key fails the run, and the message names the key (nothing is written)."""
    from ddps_core.errors import ConfigError
    from flows.data import data_flow
    from flows.extract_features import extract_features_flow

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  out: {tmp_path / 'ds'}\n")
    with pytest.raises(ConfigError, match=r"data\.synthetic\.image_size: Input should be 32, 64 or 128 \(got 48\)"):
        data_flow(data={"synthetic": {"image_size": 48}}, params_path=str(params))
    state = data_flow(data={"synthetic": {"n_tset": 3}}, params_path=str(params), return_state=True)
    assert state.is_failed() and "data.synthetic.n_tset: unknown key" in state.message
    with pytest.raises(ConfigError, match=r"features\.shard_images: Input should be greater than or equal to 1"):
        extract_features_flow(features={"shard_images": 0}, params_path=str(params))
    assert not (tmp_path / "ds").exists()
