"""Progress bars for the CLI: the one place that draws rich progress on stderr.

Each helper yields a progress callback ``(phase, done, total)`` (storage/progress.py) while
a person watches stderr, and ``None`` otherwise (pipes, ``--json``), so jobs skip the
reporting entirely. rich is imported only when a bar is drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import TaskID

    from vmvault.scheduler.cli_context import CliContext
    from vmvault.storage.progress import Progress


@contextmanager
def byte_bar(ctx: CliContext, label: str | None = None) -> Iterator[Progress | None]:
    """One bar counting bytes (size, speed, time left); its text is the current phase,
    after ``label: `` when a label is given (backup, restore)."""
    if not ctx.interactive:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress

    with RichProgress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=ctx.console,
        transient=True,
    ) as bar:
        task = bar.add_task(label or "", total=None)

        def report(phase: str, done: int, total: int) -> None:
            text = f"{label}: {phase}" if label else phase
            bar.update(task, description=text, completed=done, total=total)

        yield report


@contextmanager
def count_bars(ctx: CliContext) -> Iterator[Progress | None]:
    """One bar per phase counting items (objects checked, backups removed): verify, prune, gc."""
    if not ctx.interactive:
        yield None
        return
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    bars = RichProgress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=ctx.console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total)
        bars.update(tasks[phase], completed=done, total=total)

    with bars:
        yield update
