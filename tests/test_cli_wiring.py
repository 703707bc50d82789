"""The CLI's own wiring: every command group is there, or the CLI says why not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmvault.scheduler import cli


def test_a_command_group_that_fails_to_import_stops_the_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A broken install must not quietly lose commands from --help.
    monkeypatch.setattr(cli, "_COMMAND_GROUPS", (*cli._COMMAND_GROUPS, "vmvault.no_such_group"))
    with pytest.raises(ModuleNotFoundError, match=r"vmvault\.no_such_group"):
        cli.build_parser()


def test_every_command_group_registers_commands() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert {"config", "list", "backup", "demo", "restore", "worker", "jobs"} <= set(
        commands.choices or {}
    )


def test_building_the_cli_loads_no_heavy_library() -> None:
    # `vmvault --version` and `--help` build the parser only: the libraries a command
    # needs load when it runs (bench/cli_bench.py measures the start-up time).
    probe = (
        "import sys; from vmvault.scheduler import cli; cli.build_parser(); "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'celery', 'kombu', 'boto3', 'botocore', 'rich', 'croniter', 'pydantic', 'redis', "
        "'yaml', 'zstandard', 'blake3', 'cryptography', 'qemu', 'nbd'})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""
