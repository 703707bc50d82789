"""Progress reporting of a job: a tiny protocol the CLI (rich) and Celery tasks implement."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called with the current phase (``"pull vda"``), bytes done and bytes total."""

    def __call__(self, phase: str, done: int, total: int) -> None: ...


def no_progress(phase: str, done: int, total: int) -> None:
    """The default: report nothing."""
