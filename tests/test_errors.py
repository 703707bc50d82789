"""One error tree per package, retryability as data that agrees with each class's docstring."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import vmvault.scheduler
import vmvault.storage
import vmvault.worker
from vmvault.scheduler.errors import SchedulerError
from vmvault.storage.errors import StorageError
from vmvault.worker.errors import WorkerError


def _all_errors() -> list[type[Exception]]:
    for package in (vmvault.storage, vmvault.worker, vmvault.scheduler):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    found: list[type[Exception]] = []
    todo: list[type[Exception]] = [StorageError, WorkerError, SchedulerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


@pytest.mark.parametrize("cls", _all_errors(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_retryable_matches_the_docstring(cls: type[Exception]) -> None:
    doc = " ".join((cls.__doc__ or "").split()).lower()
    retryable = getattr(cls, "retryable", None)
    assert isinstance(retryable, bool), f"{cls.__name__} has no retryable attribute"
    if "not retryable" in doc:
        assert retryable is False, f"{cls.__name__}: docstring says not retryable"
    elif "retryable" in doc or "retry the whole" in doc:
        assert retryable is True, f"{cls.__name__}: docstring says retryable"


def test_examples() -> None:
    from vmvault.storage.errors import BackendUnavailableError, CorruptObjectError
    from vmvault.worker.nbd import NbdTimeoutError
    from vmvault.worker.nbd_verify import VerifyError

    assert BackendUnavailableError.retryable and NbdTimeoutError.retryable
    assert not CorruptObjectError.retryable and not VerifyError.retryable
