"""``vmvault config``: validate the fleet config and summarize what it describes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import add_command

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.worker.config import FleetConfig


def register(commands: Any) -> None:
    """Add the ``config`` command."""
    parser = add_command(
        commands, "config", "check the fleet config file and show what it describes"
    )
    parser.set_defaults(func=_check_config)


def _check_config(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.redact import mask_url

    config = ctx.config
    # The file names a passphrase file: it must be there, readable and not empty, or
    # every repository command would fail later (ConfigError: exit 2).
    config.repository.read_passphrase()
    for named in config.repositories.values():
        named.read_passphrase()
    config.broker_url()  # an unreadable or empty broker_password_file is a config error
    if ctx.json:
        doc = config.model_dump(mode="json", by_alias=True)  # e-mail's "from", as written
        if config.broker is not None:
            doc["broker"] = mask_url(config.broker)
        ctx.emit(doc)
        return 0
    repo = config.repository
    ctx.say(f"config OK: {ctx.config_file or 'default location'}")
    ctx.say(f"  repository  {repo.url}" + (" (encrypted)" if repo.passphrase_file else ""))
    for name, named in sorted(config.repositories.items()):
        ctx.say(f"    {name:<20} {named.url}" + (" (encrypted)" if named.passphrase_file else ""))
    ctx.say(f"  broker      {_broker_line(config)}")
    if config.broker is not None:
        ctx.say(f"  queue policy {_policy_line(config)}")
    ctx.say(f"  state_dir   {config.state_dir}")
    ctx.say(f"  domains     {len(config.domains)}")
    for name, domain in sorted(config.domains.items()):
        disks = ", ".join(domain.disks) if domain.disks else "all writable disks"
        if domain.libvirt is not None:
            reach = f"libvirt={domain.libvirt.uri} name={domain.libvirt_name(name)}"
        else:
            reach = f"qmp={domain.qmp}"
        ctx.say(f"    {name:<20} host={domain.host} {reach} disks: {disks}")
    ctx.say(f"  schedules   {len(config.schedules)}")
    for name, sched in sorted(config.schedules.items()):
        matched = config.domains_matching(sched.domains)
        ctx.say(f"    {name:<20} '{sched.cron}' -> {len(matched)} domain(s)")
    if config.copy_jobs:
        ctx.say(f"  copy_jobs   {len(config.copy_jobs)}")
    for name, job in sorted(config.copy_jobs.items()):
        matched = config.domains_matching(job.domains)
        source = job.source or "repository"
        ctx.say(f"    {name:<20} '{job.cron}' {source} -> {job.to}, {len(matched)} domain(s)")
    _say_notifications(config, ctx)
    return 0


def _say_notifications(config: FleetConfig, ctx: CliContext) -> None:
    """One line per target; a secret unreadable *here* is shown, not fatal: only the
    scheduler hosts send, and workers need no webhook token or SMTP password."""
    from vmvault.worker.notify_config import SecretError

    notifications = config.notifications
    ctx.say(f"  notifications {len(notifications.targets())} target(s)")
    for name in notifications.targets():
        secret = ""
        try:
            if name in notifications.webhooks:
                hook = notifications.webhooks[name]
                line = f"webhook {hook.url}"
                secret = " (bearer token)" if hook.token(name) is not None else ""
            else:
                mail = notifications.email[name]
                line = f"email via {mail.smtp_host}:{mail.smtp_port} to {', '.join(mail.to)}"
                secret = " (auth)" if mail.password(name) is not None else ""
        except SecretError as err:
            secret = f" (secret not readable on this host: {err})"
        ctx.say(f"    {name:<20} {line}{secret}")


def _broker_line(config: FleetConfig) -> str:
    from vmvault.worker.redact import mask_url

    if config.broker is None:
        return "none: jobs run in-process"
    shown = mask_url(config.broker)
    if config.broker_password_file is not None:
        return f"{shown} (password from {config.broker_password_file})"
    if shown == config.broker:
        # Whoever reaches an open Redis runs jobs as root on every host: say so.
        return f"{shown} (no password: see 'Trust boundary' in docs/fleet.md)"
    return shown


def _policy_line(config: FleetConfig) -> str:
    """What workers accept from the queue (docs/fleet.md, "Trust boundary")."""
    policy = config.worker
    roots = ", ".join(map(str, config.restore_roots())) or "none (queued restores refused)"
    force = "taken" if policy.allow_force_from_queue else "refused"
    return (
        f"restores under {roots}; force {force}; prune: schedules' retention"
        f"{' + ' + str(len(policy.prune_policies)) + ' listed' if policy.prune_policies else ''};"
        f" gc grace >= {policy.gc_grace_seconds:g} s"
    )
