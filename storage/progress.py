"""Progress reporting: the one callback type every long operation takes.

``progress(phase, done, total)``: the current phase (``"pull vda"``, ``"verify"``), units
done and units total (bytes for data paths, objects or backups for repository chores).
Defined in the lowest layer so storage, worker and the CLI (rich bars) and Celery tasks
(task state) all pass the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def no_progress(phase: str, done: int, total: int) -> None:
    """The default: report nothing."""
