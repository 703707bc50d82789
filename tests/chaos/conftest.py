"""Chaos runs share the backup tests' short state_dir (unix socket paths stay short)."""

from tests.worker.conftest import state_dir

__all__ = ["state_dir"]
