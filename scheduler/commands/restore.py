"""``vmvault restore``: a backup back as image files, into a paused incoming-mode QEMU, or live."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import EXIT_USAGE, add_command
from vmvault.scheduler.cli_context import add_repository_flag
from vmvault.scheduler.dispatch import add_wait_flag, run_job
from vmvault.scheduler.progress_bars import byte_bar

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.worker.live_restore import LiveRestoreResult
    from vmvault.worker.restore import RestoreResult


def add_backup_choice(parser: Any) -> None:
    """``--backup ID`` or ``--at TIME``: which backup a command reads (restore, serve,
    files); neither means the newest."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--backup", metavar="ID", help="backup id (default: the newest)")
    which.add_argument(
        "--at",
        metavar="ISO-TIME",
        type=_parse_time,
        help="the newest backup taken at or before this time (UTC unless it has an offset)",
    )


def register(commands: Any) -> None:
    """Add the ``restore`` command."""
    parser = add_command(
        commands,
        "restore",
        "restore a backup to qcow2 files (--to DIR), into a paused incoming-mode QEMU"
        " (--incoming), or live: the guest runs while the backup is copied in (--live)",
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain whose backup to restore")
    add_backup_choice(parser)
    add_repository_flag(parser, "restore from")
    # Kept as text: Path("") is Path("."), and an empty --to must not mean "here".
    parser.add_argument(
        "--to",
        dest="to_text",
        metavar="DIR",
        help="directory for <disk>.qcow2 (made 0700 if missing; images are created 0600)",
    )
    parser.add_argument(
        "--incoming",
        action="store_true",
        help="start the domain's QEMU paused (-S -incoming defer) from its launch config"
        " and restore into it; a libvirt domain (shut off) gets fresh images at the paths"
        " of its XML",
    )
    parser.add_argument(
        "--boot",
        action="store_true",
        help="with --incoming: then restart the domain normally (libvirt: start it)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="start the domain's QEMU at once on local overlays backed by the served backup and"
        " copy the backup in while the guest runs (until the copy is done; with a broker, as"
        " a job on the domain's host)",
    )
    parser.add_argument(
        "--speed",
        metavar="RATE",
        type=_parse_rate,
        default=0,
        help="with --live: copy at most RATE bytes/s per disk (suffix K, M or G: KiB, MiB,"
        " GiB; default unlimited)",
    )
    parser.add_argument(
        "--disk", metavar="NAME", action="append", help="only this disk (repeatable)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace target images that already exist"
    )
    add_wait_flag(parser)
    parser.set_defaults(func=_restore)


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use ISO 8601, e.g. 2026-01-02T03:04:05Z"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_RATE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _parse_rate(text: str) -> int:
    """``50M`` → 52428800 (bytes per second); ``0`` means unlimited."""
    number, unit = text.rstrip("KMGkmg"), text[len(text.rstrip("KMGkmg")) :].upper()
    if not number.isdigit() or unit not in _RATE_UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate: give bytes per second, e.g. 50M, 512K or 1G"
        )
    return int(number) * _RATE_UNITS[unit]


def _usage_problem(args: argparse.Namespace) -> str | None:
    if args.live:
        for flag, given in (("--incoming", args.incoming), ("--boot", args.boot),
                            ("--disk", args.disk)):  # fmt: skip
            if given:
                return f"--live and {flag} do not go together (a live restore runs every disk)"
        return None
    if args.speed:
        return "--speed applies to --live restores only"
    if args.to_text is not None and not args.to_text.strip():
        return "--to is empty: name a directory (--to . for the current one)"
    if args.boot and not args.incoming:
        return "--boot needs --incoming (it restarts the restored domain)"
    if not args.incoming and args.to is None:
        return "say where to restore: --to DIR (image files) or --incoming (into the domain)"
    return None


def _restore(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.job_requests import RestoreRequest
    from vmvault.worker.restore import RestoreResult, run_restore

    args.to = Path(args.to_text) if args.to_text is not None else None
    problem = _usage_problem(args)
    if problem is not None:
        print(f"vmvault restore: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    config = ctx.config.with_primary(args.repository)
    config.domain(args.domain)  # unknown domain → exit 2 before anything runs
    if args.live:
        if args.repository:
            print(
                "vmvault restore: error: --live restores from the primary repository only;"
                " restore --to DIR from the copy instead",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return _restore_live(args, ctx)
    request = RestoreRequest(
        domain=args.domain,
        backup_id=args.backup,
        at=args.at,
        to_dir=args.to.absolute() if args.to is not None else None,
        incoming=args.incoming,
        boot=args.boot,
        force=args.force,
        disks=args.disk,
        repository=args.repository,
    )
    with byte_bar(ctx) as progress:
        result = run_job(
            ctx,
            args,
            "restore",
            request.to_job_kwargs(),
            progress,
            lambda: run_restore(config, progress=progress, **request.run_kwargs()),
            RestoreResult.from_json,
            domain=args.domain,
        )
    if ctx.json:
        ctx.emit(result.to_json())
    else:
        _say_result(ctx, result)
    return 0


def _restore_live(args: argparse.Namespace, ctx: CliContext) -> int:
    """``--live``: in this process until the copy is done, or — with a broker — as a
    restore job on the domain's host, followed until it ends."""
    from vmvault.worker.config import config_path
    from vmvault.worker.job_requests import RestoreRequest
    from vmvault.worker.live_restore import LiveRestoreResult, run_live_restore

    def running(result: LiveRestoreResult) -> None:
        if not ctx.json:
            ctx.say(
                f"guest of {result.domain} running (QEMU pid {result.qemu_pid}, QMP socket"
                f" {result.qmp}) on backup {result.backup_id}; copying it in, do not interrupt"
                " (docs/restore.md, Live restore)"
            )

    request = RestoreRequest(
        domain=args.domain,
        backup_id=args.backup,
        at=args.at,
        to_dir=args.to.absolute() if args.to is not None else None,
        force=args.force,
        live=True,
        speed=args.speed,
    )
    config_file = config_path(ctx.config_file)
    with byte_bar(ctx, "live restore") as progress:
        result = run_job(
            ctx,
            args,
            "restore",
            request.to_job_kwargs(),
            progress,
            lambda: run_live_restore(
                ctx.config,
                config_file,
                progress=progress,
                on_running=running,
                **request.live_kwargs(),
            ),
            LiveRestoreResult.from_json,
            domain=args.domain,
        )
    if ctx.json:
        ctx.emit(result.to_json())
        return 0
    total = sum(d.virtual_size for d in result.disks)
    ctx.say(
        f"live restore of {result.domain} done: backup {result.backup_id}, {len(result.disks)}"
        f" disk(s), {total / 2**20:.1f} MiB; guest running since {result.guest_started_s:.1f}s,"
        f" copy done after {result.duration_s:.1f}s; the backup is no longer needed"
    )
    for disk in result.disks:
        ctx.say(f"  {disk.name:<8} {disk.path}  {disk.virtual_size / 2**20:.1f} MiB, no backing")
    if result.server_restarts:
        ctx.say(f"  the backup's server was restarted {result.server_restarts} time(s)")
    if result.checkpoint:
        ctx.say(f"  checkpoint {result.checkpoint}: the next backup is incremental")
    ctx.say(f"  QEMU pid {result.qemu_pid} is running; QMP socket: {result.qmp}")
    return 0


def _say_result(ctx: CliContext, result: RestoreResult) -> None:
    total = sum(d.virtual_size for d in result.disks)
    written = sum(d.bytes_written for d in result.disks)
    rate = total / result.duration_s / 2**20 if result.duration_s > 0 else 0.0
    ctx.say(
        f"restored backup {result.backup_id} of {result.domain}: {len(result.disks)} disk(s),"
        f" {total / 2**20:.1f} MiB ({written / 2**20:.1f} MiB data) in"
        f" {result.duration_s:.1f}s ({rate:.0f} MiB/s), every chunk verified"
    )
    for disk in result.disks:
        ctx.say(
            f"  {disk.name:<8} {disk.path}  {disk.virtual_size / 2**20:.1f} MiB,"
            f" {disk.bytes_written / 2**20:.1f} MiB written, verified"
        )
    if result.checkpoint:
        ctx.say(f"  checkpoint {result.checkpoint}: the next backup is incremental")
    if result.mode == "libvirt":
        state = "started through libvirt" if result.booted else "left shut off"
        ctx.say(f"  libvirt domain {result.domain} restored into its images; {state}")
    if result.mode == "incoming":
        state = "running" if result.booted else "paused in incoming mode"
        ctx.say(f"  QEMU pid {result.qemu_pid} is {state}; QMP socket: {result.qmp}")
        ctx.say(f"  QEMU log: {result.qemu_log}")
