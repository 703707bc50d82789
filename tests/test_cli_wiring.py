"""The CLI's own wiring: every command group is there, or the CLI says why not."""

from __future__ import annotations

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
