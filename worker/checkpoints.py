"""The checkpoint chain: pure logic from a disk's dirty bitmaps to the QMP actions that edit it.

Scheme (from the seed RFC, ``shared/seed-libvirt-pull-backup-rfc.txt``)::

    checkpoint:   C1            C2            C3 (newest)
    bitmap:       B1 -------->  B2 -------->  B3 ----------> (recording)
                  writes C1..C2 writes C2..C3 writes since C3

- One bitmap records at a time; taking checkpoint C4 disables B3 and adds B4 in the
  same ``transaction`` as the fleecing ``blockdev-backup`` (one point in time).
- "Changes since C_K" = OR of B_K..B_N (a temporary, disabled bitmap).
- Deleting C_K merges B_K into B_{K-1}; deleting the newest re-enables its predecessor;
  deleting the oldest just removes it.
- Order survives a QEMU restart through the names: ``vmvault-<id>^<parent-id>`` (the first
  checkpoint of a chain has no ``^parent``). The oldest bitmap's parent may be absent (it
  was trimmed); any other gap, an ``inconsistent`` bitmap (unclean QEMU exit) or a recording
  bitmap that is not the newest makes the checkpoints up to that point unusable.

Nothing here talks to QEMU: :func:`parse_chain` reads bitmap records, the ``*_actions``
functions return lists of QMP ``transaction`` actions for :class:`worker.qmp.QmpSession`.
Only bitmaps whose names start with :data:`PREFIX` are ever looked at or touched.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

PREFIX = "vmvault-"
"""Name prefix of checkpoint bitmaps."""

TEMP_PREFIX = "vmvault.tmp-"
"""Name prefix of temporary export bitmaps (never persistent)."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_OWNER_RE = re.compile(r"[0-9a-f]{8}")

Action = dict[str, Any]


class BitmapLike(Protocol):
    """What the chain logic needs of a dirty bitmap (``worker.qmp.DirtyBitmapInfo`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def recording(self) -> bool: ...
    @property
    def inconsistent(self) -> bool: ...
    @property
    def busy(self) -> bool: ...
    @property
    def granularity(self) -> int: ...


def new_checkpoint_id(now: datetime | None = None, owner: str | None = None) -> str:
    """A fresh checkpoint id that sorts by time: ``20260102T030405Z-1a2b3c[.<owner>]``.

    ``owner`` tags the checkpoint with the repository whose backup takes it (8 hex
    digits of its id), so that a backup into another repository of the same domain
    leaves it alone when it trims (:func:`trim_actions`).
    """
    now = now or datetime.now(UTC)
    if owner is not None and not _OWNER_RE.fullmatch(owner):
        raise ValueError(f"bad checkpoint owner tag {owner!r}")
    tag = f".{owner}" if owner is not None else ""
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}{tag}"


def checkpoint_owner(checkpoint_id: str) -> str | None:
    """The repository tag of a checkpoint id, None for an untagged (older) one."""
    _, dot, tag = checkpoint_id.rpartition(".")
    return tag if dot and _OWNER_RE.fullmatch(tag) else None


def checkpoint_time(checkpoint_id: str) -> datetime | None:
    """When the checkpoint was taken, read from its id (None if it does not say)."""
    try:
        return datetime.strptime(checkpoint_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def bitmap_name(checkpoint_id: str, parent: str | None) -> str:
    """The bitmap name of a checkpoint: ``vmvault-<id>`` or ``vmvault-<id>^<parent>``."""
    for value in (checkpoint_id, parent):
        if value is not None and not _ID_RE.match(value):
            raise ValueError(f"bad checkpoint id {value!r}")
    return f"{PREFIX}{checkpoint_id}" + (f"^{parent}" if parent else "")


def parse_bitmap_name(name: str) -> tuple[str, str | None] | None:
    """``(id, parent)`` of a checkpoint bitmap name, or None for any other bitmap."""
    if not name.startswith(PREFIX):
        return None
    this, sep, parent = name[len(PREFIX) :].partition("^")
    if not _ID_RE.match(this) or (sep and not _ID_RE.match(parent)):
        return None
    return this, (parent if sep else None)


def is_temp_bitmap(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


@dataclass(frozen=True)
class CheckpointBitmap:
    """One checkpoint as its bitmap on one disk shows it."""

    id: str
    parent: str | None
    name: str
    recording: bool
    inconsistent: bool
    busy: bool
    granularity: int


@dataclass(frozen=True)
class DiskChain:
    """The checkpoint chain of one disk, rebuilt from its bitmaps alone.

    ``order`` is the chain ending in the newest (recording) checkpoint, oldest first.
    ``order[usable_from:]`` are the checkpoints a backup may diff from. ``stale`` are
    vmvault bitmaps outside the chain (gaps, forks) that only wait to be removed.
    """

    node: str
    order: tuple[CheckpointBitmap, ...]
    usable_from: int
    stale: tuple[CheckpointBitmap, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ids(self) -> list[str]:
        return [cp.id for cp in self.order]

    @property
    def tail(self) -> CheckpointBitmap | None:
        return self.order[-1] if self.order else None

    @property
    def appendable(self) -> bool:
        """True when a new checkpoint can follow the newest one (it records and is sound)."""
        tail = self.tail
        return tail is not None and tail.recording and not tail.inconsistent

    def usable_ids(self) -> list[str]:
        return [cp.id for cp in self.order[self.usable_from :]]

    def why_unusable(self, checkpoint_id: str, disk: str) -> str | None:
        """None when changes since ``checkpoint_id`` can be exported, else the reason."""
        index = next((i for i, cp in enumerate(self.order) if cp.id == checkpoint_id), None)
        if index is None:
            if any(cp.id == checkpoint_id for cp in self.stale):
                return (
                    f"checkpoint {checkpoint_id} on disk {disk} is cut off from the newest "
                    f"checkpoint ({'; '.join(self.problems) or 'a bitmap of the chain is missing'})"
                )
            return f"checkpoint {checkpoint_id} is missing on disk {disk} (bitmap removed?)"
        if index < self.usable_from:
            return f"checkpoint {checkpoint_id} on disk {disk} is unusable: " + "; ".join(
                self.problems
            )
        return None


def parse_chain(node: str, bitmaps: Iterable[BitmapLike]) -> DiskChain:
    """Rebuild one disk's checkpoint chain from its bitmap list (foreign bitmaps ignored)."""
    cps: dict[str, CheckpointBitmap] = {}
    problems: list[str] = []
    duplicates: list[CheckpointBitmap] = []
    for bm in bitmaps:
        parsed = parse_bitmap_name(bm.name)
        if parsed is None:
            continue
        cp = CheckpointBitmap(
            parsed[0], parsed[1], bm.name, bm.recording, bm.inconsistent, bm.busy, bm.granularity
        )
        if cp.id in cps:
            duplicates.append(cp)
            problems.append(f"checkpoint {cp.id} has two bitmaps")
            continue
        cps[cp.id] = cp
    recording = [cp for cp in cps.values() if cp.recording]
    children = {cp.parent for cp in cps.values() if cp.parent is not None}
    tails = [cp for cp in cps.values() if cp.id not in children]
    # The newest checkpoint is the recording one that nothing descends from. After an
    # unclean exit nothing records (inconsistent bitmaps are disabled): then a single
    # tail still gives the order, so the reason names the inconsistency.
    newest = [cp for cp in tails if cp.recording] or (tails if len(tails) == 1 else [])
    order: list[CheckpointBitmap] = []
    if len(newest) == 1:
        seen: set[str] = set()
        cur: CheckpointBitmap | None = newest[0]
        while cur is not None and cur.id not in seen:
            seen.add(cur.id)
            order.append(cur)
            cur = cps.get(cur.parent) if cur.parent is not None else None
        order.reverse()
    elif cps:
        if not newest:
            problems.append("no checkpoint bitmap is recording (newest disabled or removed)")
        else:
            problems.append("more than one recording checkpoint bitmap (forked chain)")
    usable_from = 0
    # A checkpoint with two bitmaps, or two children, has an ambiguous successor: the
    # writes up to the next checkpoint may sit in a bitmap outside the order.
    duplicated = {cp.id for cp in duplicates}
    child_count: dict[str, int] = {}
    for cp in (*cps.values(), *duplicates):
        if cp.parent is not None:
            child_count[cp.parent] = child_count.get(cp.parent, 0) + 1
    for i, cp in enumerate(order):
        if cp.id in duplicated:
            usable_from = i + 1
        elif child_count.get(cp.id, 0) > 1:
            usable_from = i + 1
            problems.append(f"checkpoint {cp.id} has more than one child bitmap (forked chain)")
        elif cp.inconsistent:
            usable_from = i + 1
            problems.append(f"bitmap {cp.name} is inconsistent (QEMU exited uncleanly)")
        elif cp.busy:
            usable_from = i + 1
            problems.append(f"bitmap {cp.name} is busy (in use by another job)")
        elif cp.recording and i != len(order) - 1:
            usable_from = i + 1
            problems.append(f"bitmap {cp.name} records but is not the newest")
        elif not cp.recording and i == len(order) - 1:
            usable_from = i + 1
            problems.append(f"newest bitmap {cp.name} does not record (disabled by hand?)")
    if len(recording) > 1 and len(newest) == 1:
        problems.append("more than one checkpoint bitmap is recording")
    in_order = {cp.id for cp in order}
    stale = tuple(cp for cp in cps.values() if cp.id not in in_order) + tuple(duplicates)
    if stale and order:
        problems.append("bitmaps outside the chain: " + ", ".join(sorted(cp.name for cp in stale)))
    return DiskChain(node, tuple(order), usable_from, stale, tuple(problems))


# -- QMP transaction actions -----------------------------------------------------------------


def _act(kind: str, **data: Any) -> Action:
    return {"type": kind, "data": data}


def add_action(
    node: str, name: str, *, persistent: bool, disabled: bool, granularity: int | None
) -> Action:
    data: dict[str, Any] = {"node": node, "name": name, "persistent": persistent}
    if disabled:
        data["disabled"] = True
    if granularity is not None:
        data["granularity"] = granularity
    return {"type": "block-dirty-bitmap-add", "data": data}


def merge_action(node: str, target: str, sources: Sequence[str]) -> Action:
    return _act("block-dirty-bitmap-merge", node=node, target=target, bitmaps=list(sources))


def remove_action(node: str, name: str) -> Action:
    return _act("block-dirty-bitmap-remove", node=node, name=name)


def checkpoint_actions(
    chain: DiskChain, new_id: str, granularity: int | None = None
) -> list[Action]:
    """Take checkpoint ``new_id`` on this disk at once: ``begin`` then ``seal`` actions."""
    return begin_checkpoint_actions(chain, new_id, granularity) + seal_checkpoint_actions(chain)


def begin_checkpoint_actions(
    chain: DiskChain, new_id: str, granularity: int | None = None
) -> list[Action]:
    """First half of taking checkpoint ``new_id``: add its bitmap, recording, as the child
    of the newest. The newest keeps recording until :func:`seal_checkpoint_actions`.

    Taken in two halves around the instant the backup freezes (worker/backup.py), every
    write lands in the right bitmap whenever it comes: before the freeze in the old one
    (this backup exports it), after the seal only in the new one, in between in both
    (exported now and again by the next backup: harmless). A job killed in between
    leaves two recording bitmaps, parent and child: ``interrupted_checkpoint_actions``
    seals it. When the chain cannot be extended (no sound recording tail), every vmvault
    checkpoint bitmap of the disk is removed in the same transaction and ``new_id``
    starts a new chain.
    """
    actions: list[Action] = []
    parent: str | None = None
    if chain.appendable:
        tail = chain.tail
        assert tail is not None
        parent = tail.id
    else:
        for cp in (*chain.order, *chain.stale):
            actions.append(remove_action(chain.node, cp.name))
    actions.append(
        add_action(
            chain.node,
            bitmap_name(new_id, parent),
            persistent=True,
            disabled=False,
            granularity=granularity,
        )
    )
    return actions


def seal_checkpoint_actions(chain: DiskChain) -> list[Action]:
    """Second half: the previous newest (``chain`` as it was before ``begin``) stops recording."""
    tail = chain.tail
    if not chain.appendable or tail is None:
        return []
    return [_act("block-dirty-bitmap-disable", node=chain.node, name=tail.name)]


def interrupted_checkpoint_actions(chain: DiskChain) -> list[Action]:
    """Seal a checkpoint whose job died between ``begin`` and ``seal``: the newest and its
    parent both record. Disabling the parent only stops it from recording more than it
    must (its extra bits are writes the newest holds too), so the chain is whole again."""
    if len(chain.order) < 2:
        return []
    newest, parent = chain.order[-1], chain.order[-2]
    if not (newest.recording and parent.recording and newest.parent == parent.id):
        return []
    if newest.inconsistent or parent.inconsistent or newest.busy or parent.busy:
        return []
    return [_act("block-dirty-bitmap-disable", node=chain.node, name=parent.name)]


def export_bitmap_actions(chain: DiskChain, since_id: str, temp_name: str) -> list[Action]:
    """Build ``temp_name`` = OR of the bitmaps from ``since_id`` to the newest, disabled.

    Run after the checkpoint transaction, when every merged bitmap is already disabled
    (so the result cannot move). NBD exports need a disabled bitmap.
    """
    index = chain.ids.index(since_id)
    if index < chain.usable_from:
        raise ValueError(f"checkpoint {since_id} is not usable on node {chain.node}")
    sources = [cp.name for cp in chain.order[index:]]
    granularity = chain.order[index].granularity
    return [
        add_action(chain.node, temp_name, persistent=False, disabled=True, granularity=granularity),
        merge_action(chain.node, temp_name, sources),
    ]


def delete_actions(chain: DiskChain, checkpoint_id: str) -> list[Action]:
    """Delete one checkpoint with the seed's merge rule, as one transaction.

    - oldest: remove it (the next one keeps a dangling ``^parent``, which is allowed);
    - middle K: merge B_K into B_{K-1}; rename B_{K+1} to ``id_{K+1}^id_{K-1}`` (add +
      merge + remove, recording if it is the newest); remove B_K;
    - newest: merge it into its predecessor, re-enable the predecessor, remove it.
    """
    return remove_actions(chain, [checkpoint_id])


def remove_actions(chain: DiskChain, doomed: Collection[str]) -> list[Action]:
    """Delete several checkpoints at once, the seed's merge rule applied to each.

    Every doomed checkpoint's bits go to its nearest surviving predecessor (with none,
    they only describe writes before every surviving checkpoint and are dropped). A
    survivor whose parent is doomed is renamed after its nearest surviving predecessor
    (add + merge + remove); the oldest survivor keeps a dangling ``^parent``. When the
    newest is doomed, its nearest surviving predecessor records again::

        before   A ── B ── C ── D (records)        doomed: B, D
        after    A ── C^A (records)                A |= B, C^A = C | D
    """
    node = chain.node
    gone = set(doomed) & set(chain.ids)
    renames: list[Action] = []
    removes: list[Action] = []
    into: dict[str, list[str]] = {}  # survivor's (final) name -> doomed bitmaps for it
    survivor: CheckpointBitmap | None = None  # nearest surviving predecessor so far
    parent_gone = False
    for cp in chain.order:
        if cp.id in gone:
            if survivor is not None:
                into.setdefault(survivor.name, []).append(cp.name)
            removes.append(remove_action(node, cp.name))
            parent_gone = True
            continue
        current = cp
        if parent_gone and survivor is not None:
            current = replace(cp, name=bitmap_name(cp.id, survivor.id), parent=survivor.id)
            renames += [
                add_action(
                    node,
                    current.name,
                    persistent=True,
                    disabled=not cp.recording,
                    granularity=cp.granularity,
                ),
                merge_action(node, current.name, [cp.name]),
                remove_action(node, cp.name),
            ]
        survivor, parent_gone = current, False
    # Renamed survivors exist under their new names before anything is merged into them;
    # doomed bitmaps go last, after their bits were merged.
    merges = [merge_action(node, target, sources) for target, sources in into.items()]
    enable: list[Action] = []
    tail = chain.tail
    if tail is not None and tail.id in gone and tail.recording and survivor is not None:
        enable.append(_act("block-dirty-bitmap-enable", node=node, name=survivor.name))
    return renames + merges + enable + removes


def trim_actions(
    chain: DiskChain,
    keep_from: str,
    owner: str | None = None,
    keep_foreign_since: datetime | None = None,
) -> list[Action]:
    """Remove the checkpoints older than ``keep_from`` and every stale vmvault bitmap.

    With ``owner`` (the repository tag of this backup's checkpoints), checkpoints that
    another repository's backups made (:func:`checkpoint_owner`) and that are not older
    than ``keep_foreign_since`` are kept, merged rule and all: that repository's next
    incremental diffs from one of them. Untagged (older vmvault) ones count as ours.
    """
    ids = chain.ids
    index = ids.index(keep_from) if keep_from in ids else 0
    doomed = [
        cp.id
        for cp in chain.order[:index]
        if not cp.busy and not _kept_foreign(cp.id, owner, keep_foreign_since)
    ]
    stale = [remove_action(chain.node, cp.name) for cp in chain.stale if not cp.busy]
    return remove_actions(chain, doomed) + stale


def _kept_foreign(checkpoint_id: str, owner: str | None, since: datetime | None) -> bool:
    theirs = checkpoint_owner(checkpoint_id)
    if owner is None or theirs is None or theirs == owner:
        return False
    taken = checkpoint_time(checkpoint_id)
    return since is None or taken is None or taken >= since
