"""The rounds of `fedfuse simulate` as a progress bar on a terminal; plain log lines anywhere else.

The server logs one line per round on fedfuse's logger with ``extra={"progress": (round, total)}``
(``server/strategy.py``). On a terminal that line moves the bar and becomes its status; every other
fedfuse line is printed above the bar, as it would be without one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common.logs import FORMAT

PROGRESS = "progress"  # the LogRecord attribute (round, total rounds) of a round's progress line


class RoundProgress(logging.Handler):
    """A logging handler that draws the rounds as a rich progress bar and prints fedfuse's other lines above it."""

    def __init__(self, total: int, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))
        self.progress = Progress(
            TextColumn("round"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.task = self.progress.add_task("rounds", total=total, status="")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            done = getattr(record, PROGRESS, None)
            if done is not None:
                status = record.getMessage().split(" | ", 1)[-1]  # the figures after "round r/R"
                self.progress.update(self.task, completed=done[0], total=done[1], status=status)
            else:
                self.progress.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # noqa: BLE001  (logging must never raise into the run)
            self.handleError(record)


@contextmanager
def round_progress(total: int, *, enabled: bool) -> Iterator[RoundProgress | None]:
    """While the run lasts: fedfuse's lines through a :class:`RoundProgress` when ``enabled`` (on a terminal)."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    handler = RoundProgress(total, Console(stderr=True))
    fedfuse = logging.getLogger("fedfuse")
    propagate = fedfuse.propagate
    fedfuse.addHandler(handler)
    fedfuse.propagate = False  # the root's plain handler would print the same lines again
    handler.progress.start()
    try:
        yield handler
    finally:
        handler.progress.stop()
        fedfuse.removeHandler(handler)
        fedfuse.propagate = propagate
