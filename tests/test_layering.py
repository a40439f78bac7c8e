"""Arrows point one way (DESIGN.md): stores and pipelines never import the shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"dicom_node", "twin_archive", "registry", "pipelines", "trainer"}
ALLOWED = {
    "twin_archive": {"twin_archive"},
    "registry": {"registry"},
    "pipelines": {"pipelines", "registry"},
    "trainer": {"trainer", "twin_archive", "registry", "pipelines"},
}
LEAF = "dicom_node.errors"  # the dependency-free root exception module


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_design_allows(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in OURS and top not in ALLOWED[package] and name != LEAF:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_errors_module_is_a_leaf() -> None:
    assert {n.split(".")[0] for n in imports_of(ROOT / "dicom_node" / "errors.py")} <= {"__future__"}
    assert imports_of(ROOT / "dicom_node" / "__init__.py") == set()
