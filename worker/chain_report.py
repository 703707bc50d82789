"""The checkpoint chain of a domain as QEMU holds it, cross-checked with the repository."""

from __future__ import annotations

from typing import Any

from vmvault.worker import checkpoints as cp
from vmvault.worker.backup import plan_backup
from vmvault.worker.config import FleetConfig
from vmvault.worker.disks import list_disks
from vmvault.worker.qmp import open_session


def chain_report(config: FleetConfig, domain: str) -> dict[str, Any]:
    """Per disk: checkpoints oldest → newest, their state and backup; and the next backup's plan."""
    dom = config.domain(domain)
    with open_session(domain, dom.qmp_socket(domain)) as qmp, config.repository.open() as repo:
        disks = list_disks(qmp, dom.disks)
        manifests = repo.list_manifests(domain)
    by_checkpoint = {m.checkpoint: m.backup_id for m in manifests if m.checkpoint}
    chains = {d.name: cp.parse_chain(d.node, d.bitmaps) for d in disks}
    plan = plan_backup(domain, "auto", disks, chains, manifests)
    out_disks = []
    for disk in disks:
        chain = chains[disk.name]
        usable = set(chain.usable_ids())
        points = [
            {
                "id": point.id,
                "bitmap": point.name,
                "recording": point.recording,
                "inconsistent": point.inconsistent,
                "usable": point.id in usable,
                "backup_id": by_checkpoint.get(point.id),
            }
            for point in (*chain.order, *chain.stale)
        ]
        out_disks.append(
            {
                "name": disk.name,
                "node": disk.node,
                "virtual_size": disk.virtual_size,
                "checkpoints": points,
                "problems": list(chain.problems),
                "foreign_bitmaps": [
                    b.name
                    for b in disk.bitmaps
                    if cp.parse_bitmap_name(b.name) is None and not cp.is_temp_bitmap(b.name)
                ],
            }
        )
    return {
        "domain": domain,
        "disks": out_disks,
        "next": {
            "kind": plan.kind,
            "reason": plan.reason,
            "parent": plan.parent.backup_id if plan.parent else None,
        },
    }
