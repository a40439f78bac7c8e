"""Arrows point one way (DESIGN.md): stores and pipelines never import the shell."""

from __future__ import annotations

import ast
import sys
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
LEAVES = {"dicom_node.errors", "dicom_node.database"}  # dependency-free modules any room uses


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
            if top in OURS and top not in ALLOWED[package] and name not in LEAVES:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_errors_module_is_a_leaf() -> None:
    assert {n.split(".")[0] for n in imports_of(ROOT / "dicom_node" / "errors.py")} <= {"__future__"}
    assert imports_of(ROOT / "dicom_node" / "__init__.py") == set()


def test_database_module_is_a_leaf() -> None:
    """dicom_node.database: the standard library and sqlite-utils, nothing of ours."""
    tops = {n.split(".")[0] for n in imports_of(ROOT / "dicom_node" / "database.py")}
    assert tops - set(sys.stdlib_module_names) == {"sqlite_utils"}


# ---------------------------------------------------------------- one way to SQLite
def _calls_sqlite3_connect(path: Path) -> list[int]:
    """Lines of ``sqlite3.connect`` (called or passed) and of ``from sqlite3 import connect``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr == "connect"
                and isinstance(node.value, ast.Name) and node.value.id == "sqlite3"):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sqlite3" and any(
                a.name == "connect" for a in node.names):
            found.append(node.lineno)
    return sorted(found)


def test_only_the_database_leaf_opens_sqlite() -> None:
    """Every store, queue and reader opens SQLite through dicom_node.database.connect
    (WAL, synchronous=FULL, busy timeout, read-only where asked). Tests may open the
    files with plain sqlite3 to look at them from outside."""
    paths = _product_modules() + sorted((ROOT / "benchmarks").rglob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in paths for line in _calls_sqlite3_connect(p)
           if p != ROOT / "dicom_node" / "database.py"]
    assert bad == []


def test_the_check_for_sqlite3_connect_finds_it(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import sqlite3\nfrom sqlite3 import connect\n"
                      "c = sqlite3.connect('x')\ntext = 'sqlite3.connect'\n")
    assert _calls_sqlite3_connect(sample) == [2, 3]


# ---------------------------------------------------------------- no copies in the stores
#: The stores and the queue: no block of REPEAT_LINES code lines appears twice among them.
STORE_MODULES = ("twin_archive/**/*.py", "registry/**/*.py", "dicom_node/jobs.py",
                 "dicom_node/sender.py")
REPEAT_LINES = 6


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with whitespace collapsed) of the code lines of a module:
    not blank, not a comment, not part of an import or a docstring."""
    text = path.read_text()
    skip: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            skip.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    lines = ((i, " ".join(line.split())) for i, line in enumerate(text.splitlines(), start=1))
    return [(i, line) for i, line in lines if line and not line.startswith("#") and i not in skip]


def _repeated_blocks(paths: list[Path], size: int) -> list[str]:
    """Each block of ``size`` code lines found more than once, with where it is."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for path in paths:
        lines = _code_lines(path)
        for k in range(len(lines) - size + 1):
            block = tuple(line for _, line in lines[k:k + size])
            seen.setdefault(block, []).append(f"{path.name}:{lines[k][0]} ({path.parent.name})")
    return [" and ".join(where) for where in seen.values() if len(where) > 1]


def test_no_block_of_code_repeated_in_the_stores() -> None:
    """Issue 18: one helper, not copies (a connection set-up, a transaction, a migration
    loop, a row mapping), among the stores and the queue, within a module or across."""
    paths = sorted({p for pattern in STORE_MODULES for p in ROOT.glob(pattern)})
    assert len(paths) > 10
    assert _repeated_blocks(paths, REPEAT_LINES) == []


def test_the_check_for_repeated_blocks_finds_them(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = f({i})\n" for i in range(REPEAT_LINES))
    (tmp_path / "a.py").write_text(f'"""Doc."""\n\nimport os\n\n\ndef a():\n{body}')
    noted = body.replace("    x0", "    # a comment, then blank\n\n    x0")
    (tmp_path / "b.py").write_text(f"def b():\n    '''Other doc.'''\n{noted}")
    (tmp_path / "c.py").write_text("import os\n\n\ndef c():\n" + "".join(body.splitlines(True)[1:]))
    found = _repeated_blocks(sorted(tmp_path.glob("*.py")), REPEAT_LINES)
    assert len(found) == 1 and "a.py:7" in found[0] and "b.py:5" in found[0]
    assert "c.py" not in found[0]  # five of the lines only


# ---------------------------------------------------------------- who names the tables
#: The stores' SQL tables and the queue's, each with the only places whose SQL may name it.
STORE_TABLES = ("twins", "consent_events", "studies", "series", "instances", "ai_results",
                "ai_result_objects", "labels", "training_use", "twin_merges", "audit_events",
                "model_versions", "artifacts", "verifications", "audit", "schema_migrations")
QUEUE_TABLES = ("jobs", "sends", "monitored_series")
STORES = ("twin_archive/", "registry/")
QUEUE_MODULES = ("dicom_node/jobs.py", "dicom_node/sender.py", "dicom_node/monitor.py")
#: Modules that name a table they do not own, as found when the check was written.
KNOWN_OFFENDERS = {  # issue 18: to move into the store (each a question the store answers)
    ("dicom_node/cli/archive.py", "ai_result_objects"),
    ("dicom_node/cli/archive.py", "labels"),
    ("dicom_node/cli/demo.py", "ai_results"),
    ("dicom_node/cli/demo.py", "sends"),
    ("dicom_node/monitor.py", "series"),  # attaches index.sqlite: series gone quiet
    ("dicom_node/monitor.py", "studies"),
    ("dicom_node/observability.py", "ai_results"),  # counts for status and /metrics
    ("dicom_node/observability.py", "audit_events"),
    ("dicom_node/observability.py", "instances"),
    ("dicom_node/observability.py", "jobs"),
    ("dicom_node/observability.py", "model_versions"),
    ("dicom_node/observability.py", "sends"),
    ("dicom_node/observability.py", "studies"),
    ("dicom_node/observability.py", "twins"),
}
_SQL_NAMING = r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE|EXISTS)\s+(?:\w+\.)?[\"'`]?({names})\b"


def _sql_texts(path: Path) -> list[str]:
    """Every string literal of a module (f-strings with ``?`` for their fields)."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "?"
                                 for v in node.values))
    return texts


def _tables_named(path: Path, tables: tuple[str, ...]) -> set[str]:
    import re

    pattern = re.compile(_SQL_NAMING.format(names="|".join(tables)))
    return {m.group(1) for text in _sql_texts(path) for m in pattern.finditer(text)}


def _product_modules() -> list[Path]:
    return sorted(p for package in sorted(OURS | {"orthanc"})
                  for p in (ROOT / package).rglob("*.py"))


def test_only_the_stores_and_the_queue_name_their_tables_in_sql() -> None:
    """No module outside twin_archive/ and registry/ names their tables in SQL (issue 18);
    the queue's tables only in the queue modules and the stores. Known offenders are listed
    in KNOWN_OFFENDERS and fail this test once fixed, so the list only shrinks."""
    found = set()
    for path in _product_modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(STORES):
            continue
        owned = QUEUE_TABLES if rel in QUEUE_MODULES else ()
        if rel == "dicom_node/database.py":  # the record of every file's migrations
            owned = ("schema_migrations",)
        for table in _tables_named(path, STORE_TABLES + QUEUE_TABLES):
            if table not in owned:
                found.add((rel, table))
    assert sorted(found - KNOWN_OFFENDERS) == [], "new module naming a store's table in SQL"
    assert sorted(KNOWN_OFFENDERS - found) == [], "fixed: remove it from KNOWN_OFFENDERS"


def test_the_check_for_table_names_finds_them(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text('q = ("SELECT COUNT(*) FROM idx.instances i JOIN series s ON 1"\n'
                      '     " WHERE x")\nf = f"DELETE FROM {1} WHERE 1; INSERT INTO jobs (a)"\n'
                      'text = "studies from the series are labels"\n')
    assert _tables_named(sample, STORE_TABLES + QUEUE_TABLES) == {"instances", "series", "jobs"}


def test_pyflakes_clean() -> None:
    """No unused import, undefined name or redefinition in the product, tests, benchmarks."""
    import io

    from pyflakes import api as pyflakes_api
    from pyflakes import reporter

    out = io.StringIO()
    paths = [str(ROOT / d) for d in ("dicom_node", "pipelines", "registry", "trainer",
                                     "twin_archive", "tests", "benchmarks", "orthanc")]
    warnings = pyflakes_api.checkRecursive(paths, reporter.Reporter(out, out))
    assert warnings == 0, out.getvalue()
