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
