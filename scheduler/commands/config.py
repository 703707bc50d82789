"""``vmvault config``: validate the fleet config and summarize what it describes."""

from __future__ import annotations

import argparse
from typing import Any

from scheduler.cli import add_command
from scheduler.cli_context import CliContext


def register(commands: Any) -> None:
    """Add the ``config`` command."""
    parser = add_command(
        commands, "config", "check the fleet config file and show what it describes"
    )
    parser.set_defaults(func=_check_config)


def _check_config(args: argparse.Namespace, ctx: CliContext) -> int:
    config = ctx.config
    # The file names a passphrase file: it must be there, readable and not empty, or
    # every repository command would fail later (ConfigError: exit 2).
    config.repository.read_passphrase()
    if ctx.json:
        ctx.emit(config.model_dump(mode="json"))
        return 0
    repo = config.repository
    ctx.say(f"config OK: {ctx.config_file or 'default location'}")
    ctx.say(f"  repository  {repo.url}" + (" (encrypted)" if repo.passphrase_file else ""))
    ctx.say(f"  broker      {config.broker or 'none: jobs run in-process'}")
    ctx.say(f"  state_dir   {config.state_dir}")
    ctx.say(f"  domains     {len(config.domains)}")
    for name, domain in sorted(config.domains.items()):
        disks = ", ".join(domain.disks) if domain.disks else "all writable disks"
        ctx.say(f"    {name:<20} host={domain.host} qmp={domain.qmp} disks: {disks}")
    ctx.say(f"  schedules   {len(config.schedules)}")
    for name, sched in sorted(config.schedules.items()):
        matched = config.domains_matching(sched.domains)
        ctx.say(f"    {name:<20} '{sched.cron}' -> {len(matched)} domain(s)")
    return 0
