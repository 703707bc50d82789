"""``vmvault backup``, ``vmvault checkpoints`` and ``vmvault demo``: pull backups from the CLI."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import add_command
from vmvault.scheduler.dispatch import add_wait_flag
from vmvault.scheduler.progress_bars import byte_bar
from vmvault.worker.routing import MODES

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.worker.backup import BackupResult


def register(commands: Any) -> None:
    """Add the ``backup``, ``checkpoints`` and ``demo`` commands."""
    parser = add_command(commands, "backup", "back up one running domain now (pull over NBD)")
    parser.add_argument("domain", metavar="DOMAIN", help="domain name from the config")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="auto (default): incremental when the checkpoint chain allows, else full; "
        "incremental fails when impossible",
    )
    add_wait_flag(parser)
    parser.set_defaults(func=_backup)

    parser = add_command(
        commands, "checkpoints", "show a domain's checkpoint chain as QEMU holds it"
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain name from the config")
    parser.set_defaults(func=_checkpoints)

    parser = add_command(
        commands,
        "demo",
        "run a self-contained demo: a QEMU VM with two disks, full and incremental backups",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the demo's temporary directory afterwards"
    )
    parser.set_defaults(func=_demo)


def _backup(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.scheduler.dispatch import run_job
    from vmvault.worker.backup import BackupResult, run_backup
    from vmvault.worker.job_requests import BackupRequest

    config = ctx.config
    config.domain(args.domain)  # unknown domain: exit 2 before anything else
    request = BackupRequest(args.domain, args.mode)
    with byte_bar(ctx, f"backup {args.domain}") as progress:
        result = run_job(
            ctx,
            args,
            "backup",
            request.to_job_kwargs(),
            progress,
            lambda: run_backup(config, request.domain, request.mode, progress),
            BackupResult.from_json,
            domain=args.domain,
        )
    if ctx.json:
        ctx.emit(result.to_json())
    else:
        _say_result(ctx, result)
    return 0


def _say_result(ctx: CliContext, result: BackupResult) -> None:
    parent = f" on top of {result.parent}" if result.parent else ""
    if getattr(result, "state", "running") == "shut-off":
        parent += ", domain shut off (from its images)"
    ctx.say(
        f"backup {result.backup_id} of {result.domain}: {result.kind}{parent} "
        f"in {result.duration_s:.1f}s ({result.reason})"
    )
    # A worker of an older version reports no consistency (queued jobs' JSON results).
    consistency = getattr(result, "consistency", None)
    if consistency is not None:
        frozen_ms = getattr(result, "frozen_ms", None)
        frozen = f", guest file systems frozen {frozen_ms:.0f} ms" if frozen_ms is not None else ""
        ctx.say(f"  {consistency}-consistent{frozen} ({result.consistency_reason})")
    for disk in result.disks:
        ctx.say(
            f"  {disk.name:<8} {_size(disk.virtual_size):>10}"
            f"  changed {_size(disk.dirty_bytes):>10}"
            f"  read {_size(disk.bytes_read):>10}  uploaded {_size(disk.bytes_uploaded):>10}"
        )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _checkpoints(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.chain_report import chain_report

    report = chain_report(ctx.config, args.domain)
    if ctx.json:
        ctx.emit(report)
        return 0
    ctx.say(
        f"domain {report['domain']}: next backup would be {report['next']['kind']} "
        f"({report['next']['reason']})"
    )
    for disk in report["disks"]:
        ctx.say(f"  disk {disk['name']} (node {disk['node']})")
        if not disk["checkpoints"]:
            ctx.say("    no checkpoints")
        for point in disk["checkpoints"]:
            flags = [
                "recording" if point["recording"] else "",
                "INCONSISTENT" if point["inconsistent"] else "",
                "usable" if point["usable"] else "unusable",
            ]
            backup = point["backup_id"] or "no committed backup"
            ctx.say(f"    {point['id']}  {' '.join(f for f in flags if f):<22} {backup}")
        for problem in disk["problems"]:
            ctx.say(f"    problem: {problem}")
        if disk["foreign_bitmaps"]:
            ctx.say(f"    other bitmaps (never touched): {', '.join(disk['foreign_bitmaps'])}")
    return 0


def _demo(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.scheduler.demo import run_demo

    def say(message: str) -> None:
        ctx.human.print(message, soft_wrap=True)

    report = run_demo(keep=args.keep, say=None if ctx.json else say)
    if ctx.json:
        ctx.emit(report)
    return 0
