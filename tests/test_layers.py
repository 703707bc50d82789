"""The layers import one way: scheduler → worker → storage (docs/design.md, "Layers").

Every module of every layer is parsed (imports inside functions count too) and each
import of another layer must point down. A back edge is what turns three packages into
one tangle, so it fails here rather than in review.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder → rank; a module may import its own layer and any layer of lower rank.
LAYERS = {"storage": 0, "worker": 1, "scheduler": 2}


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the tree."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "vmvault" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return None


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    layer = path.relative_to(ROOT).parts[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    for line, module in _imported(tree):
        assert module.split(".")[0] not in LAYERS, (
            f"{path.relative_to(ROOT)}:{line}: bare import of {module}; use vmvault.{module}"
        )
        target = _layer_of(module)
        if target is not None:
            assert LAYERS[target] <= LAYERS[layer], (
                f"{path.relative_to(ROOT)}:{line}: {layer} must not import {module} "
                f"({target} sits above {layer})"
            )


def test_the_top_package_imports_no_layer() -> None:
    # vmvault/__init__.py is read by every layer (__version__): it must pull in none of them.
    tree = ast.parse((ROOT / "vmvault" / "__init__.py").read_text())
    assert [m for _, m in _imported(tree) if _layer_of(m)] == []


def test_the_checker_sees_a_back_edge() -> None:
    tree = ast.parse("def f():\n    from vmvault.scheduler.cli import main\n")
    assert _imported(tree) == [(2, "vmvault.scheduler.cli")]
    assert _layer_of("vmvault.scheduler.cli") == "scheduler"
    assert _layer_of("vmvault") is None


def test_the_install_exposes_only_vmvault(tmp_path: Path) -> None:
    # Outside the checkout the layer folders are reachable only as vmvault.<layer>: no
    # package named worker/scheduler/storage is installed at the top of site-packages.
    probe = (
        "import importlib.util as u; "
        "print([u.find_spec(n) is None for n in ('worker', 'scheduler', 'storage')], "
        "[u.find_spec('vmvault.' + n) is not None for n in ('worker', 'scheduler', 'storage')])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    assert out.split() == ["[True,", "True,", "True]", "[True,", "True,", "True]"]
