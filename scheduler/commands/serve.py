"""``vmvault serve``: a backup's disks as read-only NBD exports, until stopped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import EXIT_USAGE, add_command
from vmvault.scheduler.cli_context import add_repository_flag
from vmvault.scheduler.commands.restore import add_backup_choice

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.worker.serve import ServeInfo


def register(commands: Any) -> None:
    """Add the ``serve`` command."""
    parser = add_command(
        commands,
        "serve",
        "serve a backup's disks as read-only NBD exports (instant access) until stopped",
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain whose backup to serve")
    add_backup_choice(parser)
    add_repository_flag(parser, "serve from")
    parser.add_argument(
        "--disk", metavar="NAME", action="append", help="only this disk (repeatable)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="unix socket to listen on (created 0600)")
    where.add_argument(
        "--listen", metavar="HOST:PORT", help="TCP address to listen on (no TLS: trusted nets)"
    )
    parser.add_argument(
        "--cache-mib",
        metavar="N",
        type=int,
        default=None,
        help="memory for verified regions shared by all exports (default 256)",
    )
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.config import config_path
    from vmvault.worker.serve import DEFAULT_CACHE_MIB, Listen, serve
    from vmvault.worker.signals import Terminated

    if args.socket is None and args.listen is None:
        print(
            "vmvault serve: error: say where to listen: --socket PATH or --listen HOST:PORT",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.socket is not None and not args.socket.strip():
        print("vmvault serve: error: --socket is empty: name a path", file=sys.stderr)
        return EXIT_USAGE
    listen = (
        Listen(socket=Path(args.socket).absolute())
        if args.socket is not None
        else Listen.parse_tcp(args.listen)
    )
    config = ctx.config.with_primary(args.repository)
    config.domain(args.domain)  # unknown domain → exit 2 before anything runs

    def ready(info: ServeInfo) -> None:
        if ctx.json:
            ctx.emit(info.to_json())
            return
        ctx.say(
            f"serving backup {info.backup_id} of {info.domain} ({info.created:%Y-%m-%d %H:%M:%S}"
            " UTC), read-only, every region verified before it is sent:"
        )
        for disk in info.disks:
            # The bare URI, unstyled and unwrapped: scripts and people copy it.
            ctx.stdout.write(f"{disk.uri}\n")
        ctx.stdout.flush()
        ctx.note("stop with Ctrl-C or SIGTERM")

    try:
        serve(
            config,
            config_path(ctx.config_file),
            args.domain,
            listen,
            ready,
            backup_id=args.backup,
            at=args.at,
            disks=args.disk,
            cache_mib=args.cache_mib if args.cache_mib is not None else DEFAULT_CACHE_MIB,
        )
    except (KeyboardInterrupt, Terminated):
        # Being stopped is how a server ends: nbdkit is gone, the lease released.
        ctx.note("stopped: nbdkit exited, the repository lease is released")
        return 0
    return 0
