"""``vmvault serve --repository NAME``: a copy in another repository (its own key) served
by real nbdkit; the plugin opens the named repository, not the primary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.restore.test_serve import (  # noqa: F401 (fixtures)
    REGION,
    Chain,
    _copy,
    file_chain,
    serve,
)
from vmvault.storage.copy import copy_backups, select_backups
from vmvault.storage.repository import init_repository, open_repository


def test_serve_a_backup_from_the_offsite_copy(
    file_chain: Chain,  # noqa: F811 (the fixture imported above)
    serve: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    offsite = f"file://{tmp_path}/offsite"
    (tmp_path / "offsite.pass").write_bytes(b"off-site key\n")
    init_repository(offsite, chunk_size=REGION, passphrase=b"off-site key", scrypt_n=2**12).close()
    with open_repository(offsite, passphrase=b"off-site key") as dst:
        report = copy_backups(file_chain.repo, dst, select_backups(file_chain.repo))
    assert report.mode == "rebuild" and len(report.copied) == len(file_chain.backups)
    doc = yaml.safe_load(file_chain.config.read_text())
    doc["repositories"] = {
        "offsite": {"url": offsite, "passphrase_file": str(tmp_path / "offsite.pass")}
    }
    file_chain.config.write_text(yaml.safe_dump(doc))
    inc3 = file_chain.backups[3]
    expected = file_chain.expected(inc3)
    # The primary's objects are gone: a read can only come from the copy.
    assert file_chain.root is not None
    for sub in ("chunks", "packs"):
        for path in (file_chain.root / sub).rglob("*"):
            if path.is_file():
                path.unlink()

    served = serve(file_chain, "--repository", "offsite", "--backup", inc3.backup_id)
    assert served.doc["backup_id"] == inc3.backup_id
    assert _copy(served.uri(), tmp_path / "served.raw") == expected
    assert served.stop() == 0
