"""``vmvault copy``: copy backups between the config's repositories (off-site copies).

``--to NAME`` and ``--from NAME`` are keys of the config's ``repositories`` (``--from``
defaults to the primary ``repository``). With a broker configured the copy runs as a job
on the ``storage`` queue, else in-process; storage/copy.py does the work.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import add_command
from vmvault.scheduler.dispatch import add_wait_flag, run_job
from vmvault.scheduler.errors import SchedulerError
from vmvault.scheduler.progress_bars import count_bars

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.storage.copy import CopyReport


def register(commands: Any) -> None:
    """Add ``copy``."""
    p = add_command(
        commands,
        "copy",
        "copy backups to another repository (only what it lacks; manifests last; resumable)",
    )
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="only these domains")
    p.add_argument(
        "--to", required=True, metavar="NAME", help="target: a key of the config's repositories"
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="NAME",
        help="source: a key of the config's repositories (default: the primary repository)",
    )
    p.add_argument(
        "--backup", dest="backup_id", metavar="ID", help="only this backup and its parents"
    )
    add_wait_flag(p)
    p.set_defaults(func=_copy)


def _copy(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.copy import CopyReport, copy_backups, select_backups
    from vmvault.storage.progress import no_progress

    config = ctx.config
    target_cfg = config.repository_config(args.to)
    source_cfg = config.repository_config(args.source)
    if args.to == args.source:
        raise SchedulerError(f"--to and --from are both {args.to!r}: name two repositories")

    def local() -> CopyReport:
        with source_cfg.open() as src, target_cfg.open() as dst:
            chosen = select_backups(src, args.domains or None, args.backup_id)
            return copy_backups(src, dst, chosen, progress or no_progress)

    job: dict[str, Any] = {
        "to": args.to,
        "source": args.source,
        "domains": args.domains or None,
        "backup_id": args.backup_id,
    }
    with count_bars(ctx) as progress:
        report = run_job(ctx, args, "copy", job, progress, local, CopyReport.from_json)
    if ctx.json:
        ctx.emit(report.to_json())
        return 0
    mib = 1024 * 1024
    ctx.human.print(
        f"copy {report.source} -> {report.target} ({report.mode}): {len(report.copied)} "
        f"backups copied, {len(report.skipped)} already there; {report.objects_copied} "
        f"objects ({report.bytes_copied / mib:.1f} MiB) sent, {report.objects_skipped} "
        f"({report.bytes_skipped / mib:.1f} MiB) skipped; {report.regions_verified} regions "
        "verified on the target",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    return 0
