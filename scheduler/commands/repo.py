"""Repository commands: ``init``, ``upgrade``, ``passwd``, ``list``, ``show``, ``verify``,
``prune``, ``gc``.

They act on the repository named by the config's ``repository`` section (the
passphrase comes from ``repository.passphrase_file``), or on the one ``--repository
NAME`` names in ``repositories``. Every command takes ``--json``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmvault.scheduler.cli import add_command
from vmvault.scheduler.cli_context import add_repository_flag
from vmvault.scheduler.dispatch import add_wait_flag, run_job
from vmvault.scheduler.errors import SchedulerError
from vmvault.scheduler.progress_bars import count_bars
from vmvault.storage.format import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    DamagedManifest,
    Manifest,
    iso,
)
from vmvault.storage.locks import DEFAULT_GRACE
from vmvault.storage.prune import KEEP_RULES

if TYPE_CHECKING:
    from vmvault.scheduler.cli_context import CliContext
    from vmvault.storage.gc import GcReport
    from vmvault.storage.repository import Repository
    from vmvault.storage.verification import Verification
    from vmvault.storage.verify import VerifyReport


def register(commands: Any) -> None:
    """Add the repository commands."""
    p = add_command(commands, "init", "create the repository named in the config")
    p.add_argument(
        "--chunk-size",
        default=str(DEFAULT_CHUNK_SIZE),
        metavar="SIZE",
        help="chunk size, a power of two from 64K to 64M (default 4M); fixed for good",
    )
    p.add_argument(
        "--format-version",
        type=int,
        choices=(1, FORMAT_VERSION),
        default=FORMAT_VERSION,
        help=f"repository format (default {FORMAT_VERSION}); 1 only for hosts that still run "
        "a vmvault without format 2 ('vmvault upgrade' converts it later)",
    )
    add_repository_flag(p)
    p.set_defaults(func=_init)

    p = add_command(
        commands,
        "upgrade",
        "make a format version 1 repository version 2 (rewrites config and key; backups stay)",
    )
    add_repository_flag(p)
    p.set_defaults(func=_upgrade)

    p = add_command(
        commands, "passwd", "change the passphrase of an encrypted repository (re-wraps its key)"
    )
    p.add_argument(
        "--new-passphrase-file",
        required=True,
        type=Path,
        metavar="FILE",
        help="file holding the new passphrase; point repository.passphrase_file at it after",
    )
    add_repository_flag(p)
    p.set_defaults(func=_passwd)

    p = add_command(commands, "list", "list committed backups, oldest first")
    p.add_argument("domain", nargs="?", help="only this domain's backups")
    add_repository_flag(p)
    p.set_defaults(func=_list)

    p = add_command(commands, "show", "show one backup's manifest")
    p.add_argument("backup_id", metavar="BACKUP_ID")
    add_repository_flag(p)
    p.set_defaults(func=_show)

    p = add_command(commands, "verify", "check the repository (or one backup) for damage")
    p.add_argument("backup_id", nargs="?", metavar="BACKUP_ID", help="only this backup")
    p.add_argument(
        "--read-data",
        action="store_true",
        help="also download, decrypt, decompress and re-hash every referenced chunk",
    )
    add_wait_flag(p)
    add_repository_flag(p)
    p.set_defaults(func=_verify)

    p = add_command(commands, "prune", "remove backups that no retention rule keeps")
    p.add_argument("domain", nargs="?", help="only this domain (default: all)")
    for rule in KEEP_RULES:
        what = "newest backups" if rule == "last" else f"{rule} backups (newest per period)"
        p.add_argument(f"--keep-{rule}", type=int, metavar="N", help=f"keep N {what}")
    p.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    add_wait_flag(p)
    add_repository_flag(p)
    p.set_defaults(func=_prune)

    p = add_command(commands, "gc", "delete chunks no backup references (mark and sweep)")
    p.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"never delete objects younger than this (default {DEFAULT_GRACE:.0f})",
    )
    add_wait_flag(p)
    add_repository_flag(p)
    p.set_defaults(func=_gc)


# --------------------------------------------------------------------------- helpers


def _open(ctx: CliContext, args: argparse.Namespace) -> Repository:
    return ctx.repository_config(args).open()


def _with_repository(
    ctx: CliContext, args: argparse.Namespace, job: dict[str, Any]
) -> dict[str, Any]:
    """A queued job's arguments, naming the repository when it is not the primary one
    (checked here first; a worker whose config lacks the name refuses the job)."""
    if not args.repository:
        return job
    ctx.repository_config(args)
    return {**job, "repository": args.repository}


_SIZE_RE = re.compile(r"^(\d+)([KMG]?)(i?B)?$", re.IGNORECASE)


def _say(ctx: CliContext, message: str) -> None:
    """A human line (see CliContext.say): never wrapped, so ids stay greppable; never markup."""
    ctx.human.print(message, soft_wrap=True, markup=False, highlight=False)


def _parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise SchedulerError(f"bad --chunk-size {text!r}: use bytes or K/M suffixes, e.g. 4M")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2).upper()]
    return int(m.group(1)) * scale


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_SUMMARY_KEYS = (
    "backup_id",
    "domain",
    "kind",
    "reason",
    "parent",
    "checkpoint",
    "created",
    "disks",
    "virtual_size",
    "bytes_uploaded",
)


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "backup_id": m.backup_id,
        "domain": m.domain,
        "kind": m.kind,
        "reason": m.reason,
        "parent": m.parent,
        "checkpoint": m.checkpoint,
        "created": iso(m.created),
        "disks": [d.name for d in m.disks],
        "virtual_size": sum(d.virtual_size for d in m.disks),
        "bytes_uploaded": sum(d.stats.bytes_uploaded for d in m.disks),
    }


# --------------------------------------------------------------------------- handlers


def _init(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.repository import init_repository

    cfg = ctx.repository_config(args)
    passphrase = cfg.read_passphrase()
    repo = init_repository(
        cfg.url,
        endpoint_url=cfg.endpoint_url,
        region=cfg.region,
        passphrase=passphrase,
        chunk_size=_parse_size(args.chunk_size),
        format_version=args.format_version,
    )
    with repo:
        doc = {
            "url": repo.url,
            "id": repo.config.id,
            "chunk_size": repo.chunk_size,
            "encrypted": repo.encrypted,
            "version": repo.config.version,
        }
    if ctx.json:
        ctx.emit(doc)
    else:
        how = "encrypted (AES-256-GCM, scrypt)" if repo.encrypted else "NOT encrypted"
        _say(
            ctx,
            f"created repository {repo.url}: format version {repo.config.version}, {how}, "
            f"chunk size {_human(repo.chunk_size)}",
        )
        if repo.encrypted:
            _say(ctx, "keep the passphrase safe: without it the backups cannot be read")
    return 0


def _upgrade(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.upgrade import upgrade_repository

    with _open(ctx, args) as repo:
        report = upgrade_repository(repo, ctx.repository_config(args).read_passphrase())
    if ctx.json:
        ctx.emit(report.to_json())
        return 0
    if not report.changed:
        _say(ctx, f"{report.url} is already format version {report.version}: nothing changed")
        return 0
    for i, step in enumerate(report.steps, 1):
        _say(ctx, f"upgrade: step {i}/{len(report.steps)}: wrote {step.description}")
    _say(
        ctx,
        f"{report.url} is now format version {report.version} (was {report.version_before}); "
        "existing backups stay readable",
    )
    return 0


def _passwd(args: argparse.Namespace, ctx: CliContext) -> int:
    try:
        new = args.new_passphrase_file.read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise SchedulerError(
            f"cannot read --new-passphrase-file {args.new_passphrase_file}: {err.strerror}"
        ) from err
    with _open(ctx, args) as repo:
        repo.change_passphrase(new)
        url = repo.url
    if ctx.json:
        ctx.emit({"url": url, "changed": True})
    else:
        _say(
            ctx,
            f"passphrase of {url} changed; set repository.passphrase_file to "
            f"{args.new_passphrase_file} now",
        )
    return 0


def _damaged_summary(d: DamagedManifest) -> dict[str, Any]:
    """A ``list --json`` entry for a manifest that cannot be read: what its key tells."""
    doc: dict[str, Any] = dict.fromkeys(_SUMMARY_KEYS)
    doc.update(backup_id=d.backup_id, domain=d.domain, damaged=True, key=d.key, error=d.error)
    return doc


def _verified(records: dict[tuple[str, str], Verification], m: Manifest) -> dict[str, Any]:
    """``list``/``show --json``'s ``verification``: the record, or "unverified"."""
    from vmvault.storage.verification import UNKNOWN_JSON

    record = records.get((m.domain, m.backup_id))
    return record.status_json() if record else dict(UNKNOWN_JSON)


def _verified_text(records: dict[tuple[str, str], Verification], m: Manifest) -> str:
    record = records.get((m.domain, m.backup_id))
    return record.summary() if record else "unverified"


def _list(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.verification import load_records

    with _open(ctx, args) as repo:
        # One listing of backups/ for both the manifests and their verification records.
        listing = repo.backup_objects(args.domain)
        scan = repo.scan_manifests(args.domain, listing)
        records = load_records(repo, args.domain, listing)
    manifests = scan.manifests
    if ctx.json:
        # Readable backups oldest first, then the damaged ones ("damaged": true).
        docs = [
            {**_summary(m), "damaged": False, "verification": _verified(records, m)}
            for m in manifests
        ]
        ctx.emit(docs + [_damaged_summary(d) for d in scan.damaged])
        return 0
    if not manifests:
        _say(ctx, "no backups" + (f" of {args.domain}" if args.domain else ""))
        _say_damaged(ctx, scan.damaged)
        return 0
    # Plain aligned lines (not a rich table): ids are never truncated and the
    # output stays greppable when stderr is not a terminal.
    _say(
        ctx,
        f"{'BACKUP ID':<32}  {'DOMAIN':<16} {'KIND':<11} {'CREATED (UTC)':<19}  "
        f"{'SIZE':>10} {'UPLOADED':>10}  {'DISKS':<10}  VERIFICATION",
    )
    for m in manifests:
        s = _summary(m)
        _say(
            ctx,
            f"{m.backup_id:<32}  {m.domain:<16} {m.kind:<11} "
            f"{m.created:%Y-%m-%d %H:%M:%S}  {_human(s['virtual_size']):>10} "
            f"{_human(s['bytes_uploaded']):>10}  {','.join(s['disks']):<10}  "
            f"{_verified_text(records, m)}",
        )
    _say_damaged(ctx, scan.damaged)
    return 0


def _say_damaged(ctx: CliContext, damaged: list[DamagedManifest]) -> None:
    for d in damaged:
        _say(ctx, f"damaged manifest {d.key}: {d.error} (run 'vmvault verify')")


def _show(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.verification import read_record

    with _open(ctx, args) as repo:
        m = repo.find_backup(args.backup_id)
        record = read_record(repo, m.domain, m.backup_id)
    records = {(m.domain, m.backup_id): record} if record else {}
    if ctx.json:
        ctx.emit({**m.to_json(), "verification": _verified(records, m)})
        return 0
    _say(ctx, f"backup   {m.backup_id}")
    _say(ctx, f"domain   {m.domain}")
    _say(ctx, f"kind     {m.kind} ({m.reason})")
    _say(ctx, f"parent   {m.parent or '-'}")
    _say(ctx, f"checkpoint {m.checkpoint or '-'}")
    _say(ctx, f"created  {iso(m.created)}  finished {iso(m.finished)}")
    for d in m.disks:
        st = d.stats
        _say(
            ctx,
            f"  disk {d.name}: {_human(d.virtual_size)} {d.format}, {d.chunks} chunks "
            f"(new {st.chunks_new}, dedup {st.chunks_dedup}, zero {st.chunks_zero}, "
            f"from parent {st.chunks_parent}, patched {st.chunks_patched}), "
            f"uploaded {_human(st.bytes_uploaded)} in {st.objects_put} objects",
        )
    _say(ctx, f"verification {_verified_text(records, m)}")
    if record and not record.latest.ok:
        for p in record.latest.problems[1:]:
            _say(ctx, f"  problem: {p}")
        if record.latest.problem_count > len(record.latest.problems):
            _say(ctx, f"  ... {record.latest.problem_count} problems in all")
    if record and record.last_ok and not record.latest.ok:
        _say(ctx, f"last ok      {iso(record.last_ok.time)} ({record.last_ok.kind})")
    return 0


def _verify(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.verify import VerifyReport, verify

    def local() -> VerifyReport:
        with _open(ctx, args) as repo:
            return verify(repo, args.backup_id, read_data=args.read_data, progress=progress)

    with count_bars(ctx) as progress:
        job = {"backup_id": args.backup_id, "read_data": args.read_data}
        job = _with_repository(ctx, args, job)
        report = run_job(ctx, args, "verify", job, progress, local, VerifyReport.from_json)
    if ctx.json:
        ctx.emit(report.to_json())
    else:
        for p in report.problems:
            _say(ctx, f"problem: {p}")
        what = f"{report.backups} backups, {report.disks} disks, "
        what += f"{report.chunks_referenced} chunks"
        if report.read_data:
            what += f" ({report.chunks_read} read, {_human(report.bytes_read)})"
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        _say(ctx, f"verify: {what}: {verdict}")
    return 0 if report.ok else 1


def _removed_ids(doc: dict[str, Any]) -> list[str]:
    # The prune handler plans locally for display and runs only the deletion remotely.
    removed: list[str] = doc["removed"]
    return removed


def _prune(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.prune import KeepPolicy, plan_prune

    rules = {r: getattr(args, f"keep_{r}") for r in KEEP_RULES}
    if all(v is None for v in rules.values()) and args.repository:
        # A named repository's own retention (an off-site copy keeps longer, or less).
        retention = getattr(ctx.repository_config(args), "retention", None)
        if retention is not None:
            rules = {r: getattr(retention, f"keep_{r}") for r in KEEP_RULES}
    if all(v is None for v in rules.values()):
        ctx.note(
            "vmvault prune: error: give at least one --keep-* rule (e.g. --keep-daily 7)"
            + (f" or a retention for repositories.{args.repository}" if args.repository else "")
        )
        return 2
    policy = KeepPolicy(**rules)
    with _open(ctx, args) as repo:
        scan = repo.scan_manifests(args.domain)
        plan = plan_prune(policy, scan.manifests, scan.damaged)
        with count_bars(ctx) as progress:
            job = {"policy": policy.to_json(), "domains": args.domain and [args.domain]}
            job = _with_repository(ctx, args, job)
            removed = run_job(
                ctx,
                args,
                "prune",
                {**job, "dry_run": args.dry_run},
                progress,
                lambda: [] if args.dry_run else plan.execute(repo, progress),
                _removed_ids,
            )
    if ctx.json:
        doc = plan.to_json()
        doc.update(dry_run=args.dry_run, removed=removed)
        ctx.emit(doc)
        return 0
    for d in plan.decisions:
        m = d.manifest
        why = ", ".join(d.reasons) if d.keep else ""
        action = "keep  " if d.keep else ("would remove" if args.dry_run else "remove")
        _say(ctx, f"{action} {m.domain:<16} {m.backup_id}  {why}")
    for dm in plan.damaged:
        _say(ctx, f"damaged {dm.key}: left in place, neither kept nor removed ({dm.error})")
    verb = "would remove" if args.dry_run else "removed"
    _say(ctx, f"prune: keep {len(plan.keep)}, {verb} {len(plan.remove)} (run 'vmvault gc' next)")
    return 0


def _gc(args: argparse.Namespace, ctx: CliContext) -> int:
    from vmvault.storage.gc import GcReport, collect_garbage

    def local() -> GcReport:
        with _open(ctx, args) as repo:
            return collect_garbage(repo, grace=args.grace, dry_run=args.dry_run, progress=progress)

    with count_bars(ctx) as progress:
        job = _with_repository(ctx, args, {"grace": args.grace, "dry_run": args.dry_run})
        report = run_job(ctx, args, "gc", job, progress, local, GcReport.from_json)
    if ctx.json:
        ctx.emit(report.to_json())
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    young = (
        report.chunks_in_grace
        + report.packs_in_grace
        + report.orphan_objects_in_grace
        + report.temp_files_in_grace
    )
    _say(
        ctx,
        f"gc: {report.backups} backups reference {report.chunks_referenced} of "
        f"{report.chunks_total} chunks and {report.packs_referenced} of {report.packs_total} "
        f"packs; {verb} {report.chunks_deleted} chunks and {report.packs_deleted} packs "
        f"({_human(report.bytes_deleted)}), {report.orphan_objects_deleted} objects of "
        f"unfinished backups and {report.temp_files_deleted} temp files of killed writers; "
        f"{young} objects younger than the grace window kept",
    )
    if report.damaged_backups:
        _say(
            ctx,
            f"gc: {report.damaged_backups} backup(s) with a damaged manifest: their chunks were "
            "kept (run 'vmvault verify')",
        )
    return 0
