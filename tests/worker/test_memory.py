"""chunk_friendly_malloc: glibc tuned once for overlapping jobs, set back after the last."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from vmvault.worker import memory
from vmvault.worker.memory import chunk_friendly_malloc


class RecordingLibc:
    """Records mallopt/malloc_trim calls (the real ones would change this test process)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, 0))
        return 1


def test_nested_restores_tune_once_and_restore_defaults_after_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    tuned = [
        ("mallopt", memory._M_MMAP_THRESHOLD, memory._CHUNK_MMAP_THRESHOLD),
        ("mallopt", memory._M_TRIM_THRESHOLD, memory._CHUNK_TRIM_THRESHOLD),
    ]
    with chunk_friendly_malloc():
        assert libc.calls == tuned
        with chunk_friendly_malloc():
            pass
        # The inner restore ended, the outer one still runs: nothing set back yet.
        assert libc.calls == tuned
    assert libc.calls[2:] == [
        ("mallopt", memory._M_MMAP_THRESHOLD, memory._DEFAULT_MMAP_THRESHOLD),
        ("mallopt", memory._M_TRIM_THRESHOLD, memory._DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0, 0),
    ]
    assert memory._CHUNK_MMAP_THRESHOLD > 4 * 1024 * 1024  # a 4 MiB chunk comes from the heap


def test_defaults_are_set_back_when_the_restore_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError, match="boom"), chunk_friendly_malloc():
        raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0, 0)
    assert memory._users == 0


def test_concurrent_restores_in_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    inside = threading.Barrier(4)

    def job() -> None:
        with chunk_friendly_malloc():
            inside.wait(timeout=10)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    names: list[Any] = [c[0] for c in libc.calls]
    # Tuned once while all four overlapped, set back once after all of them.
    assert names == ["mallopt", "mallopt", "mallopt", "mallopt", "malloc_trim"]
    assert memory._users == 0


def test_without_glibc_nothing_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    with chunk_friendly_malloc():
        assert memory._users == 0


def test_real_glibc_is_found_here() -> None:
    # This machine runs glibc: the tuning must not silently be a no-op on it.
    assert memory._glibc() is not None
