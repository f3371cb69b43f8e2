"""What the ``ddps`` command shows a person: progress bars, tables, and one line per error.

:class:`RichReporter` is the CLI's :class:`~ddps_core.progress.Reporter`: on a terminal one
progress bar per task, with its current figures (loss, lr) beside it, and the stage's log
lines above the bars; in a pipe or a log file (``dvc repro``, CI) plain lines instead
(:class:`~ddps_core.progress.LineReporter`). :func:`run_guarded` turns bad input into one
``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from ddps_core.errors import user_message
from ddps_core.progress import LineReporter, Reporter

__all__ = ["RichReporter", "console", "err_console", "percent", "print_error", "run_guarded"]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class RichReporter(Reporter):
    """Progress bars on a terminal, plain lines elsewhere (use it as a context manager)."""

    def __init__(self, con: Console = err_console):
        self.console = con
        self.live = con.is_terminal
        self._lines = LineReporter(lambda line: con.print(escape(line), soft_wrap=True))
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[values]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def progress(self, task: str, done: int, total: int | None = None, **values: float) -> None:
        if self._progress is None:
            self._lines.progress(task, done, total, **values)
            return
        shown = "  ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total, values=shown)
        self._progress.update(self._tasks[task], completed=done, total=total, values=shown)

    def log(self, message: str) -> None:
        self.console.print(escape(message), soft_wrap=True)


def percent(value: Any) -> str:
    """A fraction as a percentage with two decimals (``-`` when missing)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "nan" if v != v else f"{100 * v:.2f}"


def _click_exceptions() -> tuple[tuple[type[Exception], ...], ...]:
    """click's usage-error, no-arguments-help, other and abort exceptions: those of the click
    that typer vendors (``typer._click``) and of click itself, where each is installed."""
    found: list[Any] = []
    for name in ("typer", "typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(tuple(c for m in found if isinstance(c := getattr(m, cls, None), type)) for cls in
                 ("UsageError", "NoArgsIsHelpError", "ClickException", "Abort"))


def print_error(line: str) -> None:
    """``error: <line>`` on stderr."""
    err_console.print(f"[bold red]error:[/bold red] {escape(line)}", soft_wrap=True)


def run_guarded(fn: Callable[[], Any], debug: bool = False, tell: Callable[[str], Any] = print_error) -> int:
    """Run ``fn``; bad input and file-system faults end as one ``error:`` line naming the file
    or key, with the error's exit status; ``debug`` shows the traceback instead. A usage
    error of the command line (click's, raised when ``fn`` runs click outside its standalone
    mode) is one such line too, exit status 2. ``tell`` prints the line (the default), or
    keeps it to print later."""
    usage, no_args, other, abort = _click_exceptions()
    try:
        result = fn()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        return 130
    except no_args as exc:
        exc.show()  # the help text: a command group given no command
        return exc.exit_code
    except usage as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        text = " ".join(exc.format_message().split())
        tell(where + text + hint)
        return exc.exit_code
    except other as exc:
        tell(" ".join(exc.format_message().split()))
        return exc.exit_code
    except abort:
        err_console.print("[yellow]aborted[/yellow]")
        return 1
    except Exception as exc:
        told = user_message(exc)
        if told is None or debug:
            raise
        tell(told[0])
        return told[1]
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def exit_with(code: int) -> None:
    if code:
        sys.exit(code)
