"""The checkpoint chain logic against a reference model (hypothesis) and by example."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.qemu import KiB, MiB, QemuVm
from vmvault.worker.checkpoints import (
    DiskChain,
    begin_checkpoint_actions,
    bitmap_name,
    checkpoint_actions,
    checkpoint_owner,
    delete_actions,
    export_bitmap_actions,
    interrupted_checkpoint_actions,
    new_checkpoint_id,
    parse_bitmap_name,
    parse_chain,
    remove_actions,
    seal_checkpoint_actions,
    trim_actions,
)

NODE = "fmt-vda"


@dataclass
class FakeBitmap:
    """The few properties of a QEMU dirty bitmap the chain logic reads."""

    name: str
    bits: set[int]
    recording: bool
    persistent: bool
    granularity: int = 65536
    inconsistent: bool = False
    busy: bool = False


@dataclass
class FakeNode:
    """A block node's bitmaps; applies QMP transaction actions atomically, like QEMU."""

    bitmaps: dict[str, FakeBitmap] = field(default_factory=dict)

    def write(self, block: int) -> None:
        for bm in self.bitmaps.values():
            if bm.recording:
                bm.bits.add(block)

    def transaction(self, actions: list[dict[str, Any]]) -> None:
        new = copy.deepcopy(self.bitmaps)
        for action in actions:
            kind, data = action["type"], action["data"]
            assert data["node"] == NODE
            name = data.get("name") or data.get("target")
            if kind == "block-dirty-bitmap-add":
                assert name not in new, f"add of existing {name}"
                new[name] = FakeBitmap(
                    name, set(), not data.get("disabled", False), data["persistent"]
                )
            elif kind == "block-dirty-bitmap-remove":
                del new[name]
            elif kind == "block-dirty-bitmap-enable":
                new[name].recording = True
            elif kind == "block-dirty-bitmap-disable":
                new[name].recording = False
            elif kind == "block-dirty-bitmap-merge":
                for src in data["bitmaps"]:
                    new[name].bits |= new[src].bits
            else:
                raise AssertionError(kind)
        self.bitmaps = new

    def chain(self) -> DiskChain:
        return parse_chain(NODE, list(self.bitmaps.values()))


op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 31)),
    st.tuples(st.just("checkpoint"), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 10)),
    st.tuples(st.just("trim"), st.integers(0, 10)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_chain_matches_reference_model(ops: list[tuple[str, int]]) -> None:
    node = FakeNode()
    live: list[str] = []  # reference: live checkpoints, oldest first
    writes_since: dict[str, set[int]] = {}
    counter = 0
    for kind, arg in ops:
        if kind == "write":
            node.write(arg)
            for blocks in writes_since.values():
                blocks.add(arg)
        elif kind == "checkpoint":
            counter += 1
            new_id = f"c{counter:03d}"
            node.transaction(checkpoint_actions(node.chain(), new_id))
            live.append(new_id)
            writes_since[new_id] = set()
        elif kind == "delete" and live:
            victim = live[arg % len(live)]
            node.transaction(delete_actions(node.chain(), victim))
            live.remove(victim)
            del writes_since[victim]
        elif kind == "trim" and live:
            keep = live[arg % len(live)]
            node.transaction(trim_actions(node.chain(), keep))
            for gone in live[: live.index(keep)]:
                del writes_since[gone]
            live = live[live.index(keep) :]
        chain = node.chain()
        assert chain.ids == live
        assert chain.usable_ids() == live
        assert not chain.problems
        assert len([b for b in node.bitmaps.values() if b.recording]) == (1 if live else 0)
        for since in live:
            probe = copy.deepcopy(node)
            probe.transaction(export_bitmap_actions(chain, since, "vmvault.tmp-x"))
            exported = probe.bitmaps["vmvault.tmp-x"]
            assert not exported.recording
            # The exported dirty set is exactly the writes since the checkpoint.
            assert exported.bits == writes_since[since]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sets(st.integers(0, 31), max_size=4), min_size=1, max_size=8),
    st.data(),
)
def test_removing_any_set_of_checkpoints_keeps_the_survivors_exact(
    writes: list[set[int]], data: st.DataObject
) -> None:
    """Checkpoint i, then writes[i]: after any removal every survivor still diffs exactly."""
    node = FakeNode()
    ids = [f"c{i:03d}" for i in range(len(writes))]
    for checkpoint, blocks in zip(ids, writes, strict=True):
        node.transaction(checkpoint_actions(node.chain(), checkpoint))
        for block in blocks:
            node.write(block)
    doomed = data.draw(st.sets(st.sampled_from(ids)))
    node.transaction(remove_actions(node.chain(), doomed))
    survivors = [c for c in ids if c not in doomed]
    chain = node.chain()
    assert chain.ids == survivors and chain.usable_ids() == survivors
    assert not chain.problems
    assert len([b for b in node.bitmaps.values() if b.recording]) == (1 if survivors else 0)
    for since in survivors:
        probe = copy.deepcopy(node)
        probe.transaction(export_bitmap_actions(chain, since, "vmvault.tmp-x"))
        expected = set().union(*writes[ids.index(since) :])
        assert probe.bitmaps["vmvault.tmp-x"].bits == expected
    # Writes after the removal land in the newest survivor.
    node.write(99)
    if survivors:
        assert 99 in node.bitmaps[chain.order[-1].name].bits


def test_trim_keeps_another_repositorys_recent_checkpoints() -> None:
    """Two repositories back up one domain: neither trim deletes what the other needs."""
    assert checkpoint_owner(new_checkpoint_id(owner="0a1b2c3d")) == "0a1b2c3d"
    assert checkpoint_owner("20260102T030405Z-1a2b3c") is None
    node = FakeNode()
    ours, theirs = "aaaaaaaa", "bbbbbbbb"
    old_theirs = "20251001T000000Z-000001." + theirs
    sequence = [
        old_theirs,
        "20261201T000000Z-000002." + ours,
        "20261201T010000Z-000003." + theirs,
        "20261201T020000Z-000004",  # untagged: an older vmvault's, counts as ours
        "20261201T030000Z-000005." + ours,
    ]
    for index, checkpoint in enumerate(sequence):
        node.transaction(checkpoint_actions(node.chain(), checkpoint))
        node.write(index)
    since = datetime(2026, 11, 1, tzinfo=UTC)
    node.transaction(trim_actions(node.chain(), sequence[-1], ours, since))
    assert node.chain().ids == [sequence[2], sequence[4]]
    assert not node.chain().problems
    # The other repository's next incremental still sees every write since its checkpoint.
    probe = copy.deepcopy(node)
    probe.transaction(export_bitmap_actions(node.chain(), sequence[2], "vmvault.tmp-x"))
    assert probe.bitmaps["vmvault.tmp-x"].bits == {2, 3, 4}


def test_checkpoint_in_two_halves_loses_no_write_and_a_cut_one_is_sealed() -> None:
    """Writes before, between and after the halves of a checkpoint all reach the right
    bitmaps; a job killed between the halves leaves a chain the reaper seals whole."""
    node = FakeNode()
    node.transaction(checkpoint_actions(node.chain(), "a"))
    node.write(1)
    before = node.chain()
    node.transaction(begin_checkpoint_actions(before, "b"))
    node.write(2)  # between begin and the freeze: before the snapshot
    node.write(3)  # between the freeze and the seal: after the snapshot
    probe = copy.deepcopy(node)
    probe.transaction(
        seal_checkpoint_actions(before) + export_bitmap_actions(before, "a", "vmvault.tmp-x")
    )
    probe.write(4)
    chain = probe.chain()
    assert chain.ids == ["a", "b"] and not chain.problems
    # This backup exports every write since a (it reads 3's block frozen, as it was).
    assert probe.bitmaps["vmvault.tmp-x"].bits == {1, 2, 3}
    # The next one diffs from b: every write since begin, 2 and 3 again (harmless).
    assert probe.bitmaps[chain.order[-1].name].bits == {2, 3, 4}

    # Killed before the seal: two recording bitmaps, the chain unusable until sealed.
    cut = node.chain()
    assert cut.problems and cut.usable_ids() == ["b"]
    node.transaction(interrupted_checkpoint_actions(cut))
    node.write(5)
    sealed = node.chain()
    assert sealed.usable_ids() == ["a", "b"] and not sealed.problems
    node.transaction(export_bitmap_actions(sealed, "a", "vmvault.tmp-y"))
    assert node.bitmaps["vmvault.tmp-y"].bits == {1, 2, 3, 5}
    assert interrupted_checkpoint_actions(sealed) == []


def _bm(name: str, recording: bool = False, inconsistent: bool = False) -> FakeBitmap:
    return FakeBitmap(name, set(), recording, True, inconsistent=inconsistent)


def test_names_round_trip_and_foreign_bitmaps_are_ignored() -> None:
    assert parse_bitmap_name(bitmap_name("b", "a")) == ("b", "a")
    assert parse_bitmap_name(bitmap_name("a", None)) == ("a", None)
    assert parse_bitmap_name("backup-bitmap") is None
    chain = parse_chain(NODE, [_bm("foreign", recording=True), _bm("vmvault-a", recording=True)])
    assert chain.ids == ["a"] and not chain.problems
    with pytest.raises(ValueError):
        bitmap_name("a^b", None)


def test_gap_inconsistency_and_missing_recording_tail() -> None:
    # c's parent b was removed by hand: a is cut off, c..d stay usable.
    gap = parse_chain(NODE, [_bm("vmvault-a"), _bm("vmvault-c^b"), _bm("vmvault-d^c", True)])
    assert gap.ids == ["c", "d"] and [cp.id for cp in gap.stale] == ["a"]
    assert gap.why_unusable("a", "vda") is not None
    assert gap.why_unusable("c", "vda") is None
    # An inconsistent bitmap (unclean QEMU exit) makes it and everything older unusable.
    bad = parse_chain(
        NODE, [_bm("vmvault-a"), _bm("vmvault-b^a", inconsistent=True), _bm("vmvault-c^b", True)]
    )
    assert bad.usable_ids() == ["c"]
    assert "inconsistent" in (bad.why_unusable("a", "vda") or "")
    # The newest bitmap was removed: nothing records, nothing is usable, a new chain starts.
    dead = parse_chain(NODE, [_bm("vmvault-a"), _bm("vmvault-b^a")])
    assert dead.usable_ids() == [] and not dead.appendable
    actions = checkpoint_actions(dead, "z")
    assert [a["type"] for a in actions] == [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-add",
    ]
    assert actions[-1]["data"]["name"] == "vmvault-z"


def test_fork_or_duplicate_makes_the_branch_point_unusable() -> None:
    # b^a and c^a both claim a as parent: a's successor is ambiguous. Diffing from a with
    # a|c would miss the writes b recorded, so a must not be usable; c (the tail) is.
    fork = parse_chain(NODE, [_bm("vmvault-a"), _bm("vmvault-b^a"), _bm("vmvault-c^a", True)])
    assert fork.ids == ["a", "c"]
    assert fork.why_unusable("a", "vda") is not None
    assert fork.usable_ids() == ["c"]
    # Two bitmaps for checkpoint b: which one holds b's writes is unknown.
    dup = parse_chain(
        NODE, [_bm("vmvault-a"), _bm("vmvault-b"), _bm("vmvault-b^a"), _bm("vmvault-c^b", True)]
    )
    assert dup.why_unusable("a", "vda") is not None
    assert dup.why_unusable("b", "vda") is not None
    assert dup.usable_ids() == ["c"]


def test_chain_edits_are_accepted_by_real_qemu(qemu_vm: QemuVm) -> None:
    """The transactions (add+merge+remove, enable) run on QEMU and keep every write."""
    vm, node = qemu_vm, qemu_vm.disks["vda"].node

    def chain() -> DiskChain:
        (info,) = [n for n in vm.ctl.named_block_nodes() if n.node_name == node]
        return parse_chain(node, info.bitmaps)

    def count(name: str) -> int:
        (info,) = [n for n in vm.ctl.named_block_nodes() if n.node_name == node]
        return next(b.count for b in info.bitmaps if b.name == name)

    for index, checkpoint in enumerate(["a", "b", "c"]):
        vm.ctl.transaction(checkpoint_actions(chain(), checkpoint))
        vm.write("vda", index * MiB, 64 * KiB)
    vm.ctl.transaction(delete_actions(chain(), "b"))  # middle: c is renamed c^a
    assert [cp.name for cp in chain().order] == ["vmvault-a", "vmvault-c^a"]
    assert chain().appendable and count("vmvault-a") == 128 * KiB
    vm.ctl.transaction(export_bitmap_actions(chain(), "a", "vmvault.tmp-t"))
    assert count("vmvault.tmp-t") == 3 * 64 * KiB
    vm.ctl.bitmap_remove(node, "vmvault.tmp-t")
    vm.ctl.transaction(delete_actions(chain(), "c"))  # newest: merged into a, a records again
    assert chain().ids == ["a"] and chain().appendable
    vm.write("vda", 5 * MiB, 64 * KiB)
    assert count("vmvault-a") == 4 * 64 * KiB
