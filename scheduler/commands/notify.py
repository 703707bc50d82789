"""``vmvault notify test``: send a test event to the configured notification targets now.

It sends directly from this process (not through the scheduler's outbox), so the answer
says at once whether a webhook URL, token, SMTP server or password works.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import EXIT_FAILED, add_command

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext


def register(commands: Any) -> None:
    """Add ``notify`` with its ``test`` subcommand."""
    notify = add_command(commands, "notify", "notification targets (webhooks, e-mail)")
    actions = notify.add_subparsers(dest="notify_command", metavar="ACTION", required=True)
    test = add_command(actions, "test", "send a test event to every target (or one) now")
    test.add_argument("--target", metavar="NAME", help="only this target")
    test.set_defaults(func=_test)


def _test(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.scheduler.notify_send import DeliveryError, UnknownTargetError, send
    from vmvault.worker.notify_events import Event, now_iso

    config = ctx.config
    targets = config.notifications.targets()
    if args.target is not None:
        if args.target not in targets:
            known = ", ".join(targets) or "none"
            raise UnknownTargetError(
                f"unknown notification target {args.target!r} (configured: {known})"
            )
        targets = [args.target]
    if not targets:
        raise UnknownTargetError(
            "no notification targets configured: add notifications.webhooks or "
            "notifications.email to the config (see docs/fleet.md)"
        )
    event = Event(
        event="test",
        kind="test",
        problem="test",
        summary="test event from vmvault notify test",
        time=now_iso(),
    )
    results: dict[str, str] = {}
    for target in targets:
        try:
            send(config, target, event)
            results[target] = "ok"
        except DeliveryError as err:
            results[target] = str(err)
    if ctx.json:
        ctx.emit({"targets": results})
    else:
        for target, outcome in results.items():
            ctx.say(f"{target}: {outcome}")
    return 0 if all(v == "ok" for v in results.values()) else EXIT_FAILED
