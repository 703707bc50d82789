"""``vmvault files``: list and fetch single files of a backup, read in a libguestfs appliance."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import EXIT_USAGE, add_command
from vmvault.scheduler.cli_context import add_repository_flag
from vmvault.scheduler.commands.restore import add_backup_choice

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.worker.guest_files import Entry, Source


def register(commands: Any) -> None:
    """Add the ``files`` command and its ``ls`` and ``get`` actions."""
    parser = add_command(
        commands,
        "files",
        "list or fetch files inside a backup's disk (read in a libguestfs appliance)",
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain whose backup to read")
    add_backup_choice(parser)
    add_repository_flag(parser, "read from")
    parser.add_argument("--disk", metavar="NAME", required=True, help="the disk to read")
    parser.add_argument(
        "--filesystem",
        metavar="DEVICE",
        help="the filesystem as the appliance names it (/dev/sda1, /dev/vg/root) when"
        " the disk has several and no single guest OS",
    )
    parser.add_argument(
        "--kvm",
        action="store_true",
        help="run the appliance with KVM (faster start; the default TCG works everywhere)",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = add_command(actions, "ls", "list a directory (or show one entry) of the backup")
    ls.add_argument("path", metavar="PATH", nargs="?", default="/", help="default: /")
    ls.set_defaults(func=_ls)
    get = add_command(actions, "get", "copy a file, a symlink or a directory tree out")
    get.add_argument("path", metavar="PATH", help="the file or directory in the guest")
    get.add_argument("--to", metavar="DIR", default=".", help="where to put it (default: .)")
    get.add_argument("--force", action="store_true", help="replace existing files in DIR")
    get.set_defaults(func=_get)


def _source(args: argparse.Namespace, ctx: CliContext) -> Source:
    from vmvault.worker.config import config_path
    from vmvault.worker.guest_files import Source

    config = ctx.config.with_primary(args.repository)
    config.domain(args.domain)  # unknown domain → exit 2 before anything runs
    return Source(
        config=config,
        config_file=config_path(ctx.config_file),
        domain=args.domain,
        disk=args.disk,
        backup_id=args.backup,
        at=args.at,
        filesystem=args.filesystem,
        kvm=args.kvm,
    )


def _ls(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.guest_files import list_files

    listing = list_files(_source(args, ctx), args.path, ctx.note)
    if ctx.json:
        ctx.emit(listing.to_json())
        return 0
    for entry in listing.entries:
        ctx.stdout.write(_line(entry) + "\n")
    ctx.stdout.flush()
    return 0


def _line(entry: Entry) -> str:
    """Like ``ls -l``: type and mode, size, mtime (UTC), name (and link target)."""
    letter = {"directory": "d", "symlink": "l", "char-device": "c", "block-device": "b"}
    kind = letter.get(entry.kind, {"fifo": "p", "socket": "s"}.get(entry.kind, "-"))
    when = datetime.fromtimestamp(entry.mtime, UTC).strftime("%Y-%m-%d %H:%M:%S")
    name = entry.name if entry.target is None else f"{entry.name} -> {entry.target}"
    return f"{kind}{_perms(entry.mode)} {entry.size:>12} {when} {name!s}"


def _perms(mode: int) -> str:
    import stat

    return stat.filemode(mode | stat.S_IFREG)[1:]


def _get(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.worker.guest_files import get_files

    if not args.to.strip():
        print("vmvault files: error: --to is empty: name a directory", file=sys.stderr)
        return EXIT_USAGE
    fetched = get_files(_source(args, ctx), args.path, Path(args.to), args.force, ctx.note)
    if ctx.json:
        ctx.emit(fetched.to_json())
        return 0
    ctx.say(
        f"{fetched.path} → {fetched.to}: {fetched.files} files ({fetched.bytes} bytes),"
        f" {fetched.directories} directories, {fetched.symlinks} symlinks (as links) from"
        f" backup {fetched.backup_id} in {fetched.duration_s:.1f}s"
    )
    for skipped in fetched.skipped:
        ctx.note(f"skipped {skipped}")
    return 0
