"""Campaign progress: a live bar on a terminal, plain lines in job logs.

    progress = CampaignProgress(cfg.metrics.progress, total=cfg.campaign.iterations, done=0)
    with progress:
        ...
        progress.advance(step, "iteration 3/10: reward 0.41, gold 0.38, …")

`metrics.progress` picks the form: `bar` (a rich progress bar with the elapsed time and an
estimate of the time left, the latest numbers beside it; the driver's other lines scroll above
it), `lines` (one plain line per iteration: what `ray job logs` and files read well), or `auto`
(the bar when standard output is a terminal, else lines).
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def wants_bar(mode: str, stream: TextIO) -> bool:
    """Whether `mode` ("auto", "bar" or "lines") draws a bar on `stream`."""
    if mode not in ("auto", "bar", "lines"):
        raise ValueError(f"metrics.progress: expected auto, bar or lines, got {mode!r}")
    return mode == "bar" or (mode == "auto" and stream.isatty())


class CampaignProgress:
    """Iterations done out of the campaign's total, as a bar or as lines (see module doc)."""

    def __init__(self, mode: str, total: int, done: int = 0, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.total, self.done = total, done
        self.bar: Progress | None = None
        if wants_bar(mode, self.stream):
            console = Console(file=self.stream, force_terminal=mode == "bar" or None)
            self.bar = Progress(
                TextColumn("[bold]iterations"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                TextColumn("{task.fields[latest]}"), console=console, transient=False)
            self.task = self.bar.add_task("campaign", total=total, completed=done, latest="")

    def __enter__(self) -> CampaignProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, step: int, line: str, latest: str = "") -> None:
        """Iteration `step` finished: move the bar (its `latest` text beside it) and print
        `line` (above the bar on a terminal)."""
        self.done = step
        if self.bar is None:
            print(line, file=self.stream, flush=True)
            return
        self.bar.console.print(line, markup=False, highlight=False)
        self.bar.update(self.task, completed=step, latest=latest)
