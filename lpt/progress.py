"""Terminal output: one rich console on stderr, progress bars, and rank-0-only printing under torch.distributed."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(transient: bool = False) -> Progress:
    """A progress bar on stderr; disabled on ranks other than 0."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not is_main_process(),
    )


def steps_bar(description: str, total: int):
    """A progress bar over the coarse steps of a stage (load, merge, slice, write): ``(bar, step)``, where
    ``step(what)`` advances it by one and names the next step."""
    bar = progress_bar()
    task = bar.add_task(description, total=total)

    def step(what: str) -> None:
        bar.update(task, advance=1, description=what)

    return bar, step
