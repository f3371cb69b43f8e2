"""``python -m flows STAGE [--params FILE] [--set KEY=VALUE ...]``: run one stage's flow.

This is the command of every DVC stage. Bad settings or bad input end with one line that
names the file or key and what is wrong, and a non-zero exit; ``--debug`` shows the
traceback. That line is the last one the command prints: Prefect logs after the flow run
ends (its temporary server stopping), so the line waits for the end of the process.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys

from ddps_core import stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description="Run one pipeline stage as a Prefect flow.")
    parser.add_argument("stage", choices=stages.ORDER)
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    # Prefect's local server would otherwise send usage telemetry, and log each failure to
    # reach it on a machine without internet; a user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from ddps import console
    from ddps_core.config import parse_assignment

    # Registered before Prefect is imported, so it runs after Prefect's own exit handlers.
    last: list[str] = []
    atexit.register(lambda: [console.print_error(line) for line in last])

    def go() -> None:
        from flows.common import settings_for
        from flows.stages import FLOWS

        overrides = dict(parse_assignment(s) for s in args.sets)
        settings_for(args.params, overrides)  # validated before Prefect starts anything
        state = FLOWS[args.stage](overrides=overrides, params_path=args.params, return_state=True)
        if state.is_failed():
            state.result()  # raises the stage's own exception

    return console.run_guarded(go, debug=args.debug, tell=last.append)


if __name__ == "__main__":
    sys.exit(main())
