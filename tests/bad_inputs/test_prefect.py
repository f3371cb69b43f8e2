"""Bad input under Prefect: a stage's flow run fails with the one line as its state's message
(what the UI and ``prefect flow-run inspect`` show), the earlier outputs stay, and the
console log shows no traceback for it, while the run's log on the server keeps it."""

from __future__ import annotations

import pytest

from ddps_core.errors import DataError
from tests.bad_inputs.conftest import snapshot

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_a_stage_flow_run_fails_with_the_one_line(imported):
    from flows.stages import data

    root, out, params = imported
    before = snapshot(out)
    label = root / "real" / "train" / "train_2.npy"
    label.write_bytes(label.read_bytes()[:-20])
    state = data(params_path=str(params), return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"{label}: cannot read .npy label (corrupt or truncated)")
    assert "\n" not in state.message and "encountered an exception" not in state.message
    with pytest.raises(DataError, match="cannot read .npy label"):
        state.result()  # the stage's own exception, as before
    assert snapshot(out) == before


def test_a_bad_setting_fails_the_flow_run_with_the_one_line(imported):
    from flows.stages import data

    root, out, params = imported
    before = snapshot(out)
    state = data(params_path=str(params), overrides={"data.ignore_index": -1}, return_state=True)
    assert state.is_failed()
    assert "data.ignore_index: Input should be greater than or equal to 0" in state.message
    assert "encountered an exception" not in state.message
    assert snapshot(out) == before


def test_the_console_log_has_no_traceback_for_bad_input_but_the_server_log_has(capsys, monkeypatch):
    import logging
    import sys

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.common import one_line_user_errors

    one_line_user_errors()
    # Prefect's console handler writes where sys.stderr pointed when logging was set up (in
    # a test session, maybe an earlier test's capture): point it at this test's
    consoles = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    assert consoles
    for handler in consoles:
        monkeypatch.setattr(handler.console, "file", sys.stderr)

    @flow(name="raises-bad-input")
    def raises() -> None:
        raise DataError("x.png: cannot read image (corrupt or not an image)")

    capsys.readouterr()
    state = raises(return_state=True)
    console = capsys.readouterr().err
    assert state.is_failed()
    assert "x.png: cannot read image" in console and "Traceback" not in console, console
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    kept = [log.message for log in logs if "x.png: cannot read image" in log.message]
    assert any("Traceback (most recent call last)" in m for m in kept), kept
