"""vmvault: fleet-wide, incremental, pull-mode backup for QEMU virtual machines.

Three layers, each importing only the ones below it (docs/design.md, "Layers"):

    vmvault.scheduler   the control plane and the ``vmvault`` CLI (folder scheduler/)
    vmvault.worker      the data plane on each hypervisor host    (folder worker/)
    vmvault.storage     the backup repository and its backends    (folder storage/)

The folders stay at the top of the checkout; the installed package maps them under
``vmvault.`` (pyproject ``package-dir``), so nothing named ``worker``, ``scheduler`` or
``storage`` lands at the top of site-packages. The symlinks in this folder give the same
view to tools that read the tree rather than the install (mypy, ``python -m`` from the
checkout).
"""

__version__ = "0.1.0"
