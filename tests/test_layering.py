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
#: The one sub-package of the shell every room may import (DESIGN: the foundation).
FOUNDATION = "dicom_node.foundation"


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
            if (top in OURS and top not in ALLOWED[package]
                    and not name.startswith(FOUNDATION + ".")):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


#: The shell's sub-packages and the configuration modules at its top, and which of them
#: each may import (issue 30). The CLI and ``__main__`` may import everything; the lower
#: rooms the foundation only (above).
TOP_MODULES = {"__init__", "__main__", "settings", "tasks", "profiles", "logconfig"}
SHELL_ROOMS = {
    "foundation": {"foundation"},
    "config": {"foundation", "config"},
    "wire": {"foundation", "config", "wire"},
    "learning": {"foundation", "config", "learning"},
    "queue": {"foundation", "config", "wire", "learning", "queue"},
    "runtime": {"foundation", "config", "wire", "learning", "queue", "runtime"},
}
LOWER_FOR_SHELL = {"foundation"}


def _shell_room(name: str) -> str | None:
    """The room of a dotted module name inside ``dicom_node`` (``config`` for the top's)."""
    parts = name.split(".")
    if parts[0] != "dicom_node" or len(parts) < 2:
        return None
    return "config" if parts[1] in TOP_MODULES else parts[1]


def test_at_most_six_modules_at_the_shells_top() -> None:
    top = {p.stem for p in (ROOT / "dicom_node").glob("*.py")}
    assert top == TOP_MODULES, "put a new module in the sub-package of its job"
    assert len(top) <= 6


def _shell_imports(path: Path, package: str) -> set[str]:
    """The modules ``path`` (a module of ``package``) imports, with ``from dicom_node
    import queue`` read as ``dicom_node.queue`` and relative imports made absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                below = ROOT / Path(*sub.split("."))
                found.add(sub if below.is_dir() or below.with_suffix(".py").exists() else module)
    return found


def _room_violations(room: str, paths: list[Path]) -> list[str]:
    """What the modules ``paths`` of the shell's ``room`` import that it may not."""
    bad = []
    for path in paths:
        rel = (path.relative_to(ROOT) if path.is_relative_to(ROOT)
               else Path("dicom_node", room, path.name))  # a sample of the check's own test
        package = ".".join(rel.parent.parts)
        for name in _shell_imports(path, package):
            target = _shell_room(name) if name != "dicom_node" else "config"
            top = name.split(".")[0]
            if target is not None and target not in SHELL_ROOMS[room]:
                bad.append(f"{rel} imports {name}")
            elif room in LOWER_FOR_SHELL and top in OURS - {"dicom_node"}:
                bad.append(f"{rel} imports {name}")
    return bad


@pytest.mark.parametrize("room", sorted(SHELL_ROOMS))
def test_shell_room_imports_only_what_it_may(room: str) -> None:
    paths = ([ROOT / "dicom_node" / f"{m}.py" for m in sorted(TOP_MODULES - {"__main__"})]
             if room == "config" else sorted((ROOT / "dicom_node" / room).rglob("*.py")))
    assert _room_violations(room, paths) == []


def test_every_sub_package_of_the_shell_is_a_room() -> None:
    """A new sub-package is checked like the others (or is the CLI, which may import all)."""
    found = {p.name for p in (ROOT / "dicom_node").iterdir() if (p / "__init__.py").exists()}
    assert found == set(SHELL_ROOMS) - {"config"} | {"cli"}


def test_the_check_for_rooms_finds_them(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("from dicom_node import cli\nfrom dicom_node.runtime.node import Node\n"
                      "from ..runtime import loop\nfrom . import jobs\nfrom .. import settings\n"
                      "from dicom_node import __version__\nfrom dicom_node.wire import stow\n"
                      "def f():\n    import dicom_node.cli.demo\n")
    assert sorted(_room_violations("queue", [sample])) == [
        "dicom_node/queue/m.py imports dicom_node.cli",
        "dicom_node/queue/m.py imports dicom_node.cli.demo",
        "dicom_node/queue/m.py imports dicom_node.runtime.loop",
        "dicom_node/queue/m.py imports dicom_node.runtime.node"]


#: Compute libraries a store has no use for: ONNX export, ONNX Runtime, TensorRT live on
#: the compute side (pipelines/export/); the registry keeps their files and rows (issue 18).
COMPUTE_ONLY = {"onnx", "onnxruntime", "tensorrt"}


def test_the_registry_builds_no_artifacts() -> None:
    bad = [f"{path.relative_to(ROOT)} imports {name}"
           for path in sorted((ROOT / "registry").rglob("*.py"))
           for name in sorted(imports_of(path)) if name.split(".")[0] in COMPUTE_ONLY]
    assert bad == []


FOUNDATION_DIR = ROOT / "dicom_node" / "foundation"


def test_errors_module_is_a_leaf() -> None:
    assert {n.split(".")[0] for n in imports_of(FOUNDATION_DIR / "errors.py")} <= {"__future__"}
    assert imports_of(ROOT / "dicom_node" / "__init__.py") == set()
    assert imports_of(FOUNDATION_DIR / "__init__.py") == set()


@pytest.mark.parametrize("module", ["durable", "clock", "faults"])
def test_foundation_module_is_a_leaf(module: str) -> None:
    """``dicom_node/foundation/{durable,clock,faults}.py`` import only the standard library."""
    tops = {n.split(".")[0] for n in imports_of(FOUNDATION_DIR / f"{module}.py")}
    assert tops <= set(sys.stdlib_module_names) | {"__future__"}, tops


# ---------------------------------------------------------------- one durable write
#: Modules that may rename files or use ``tempfile``, and why (none of them keeps a file).
RENAMES_ALLOWED = {
    "dicom_node/foundation/durable.py": "the one durable write helper",
    "dicom_node/cli/demo.py": "the demo's throwaway data directory (TemporaryDirectory)",
    "pipelines/validation.py": "a scratch copy for the DICOM validator, removed after",
}


def _renames_and_tempfiles(path: Path) -> list[str]:
    """Lines of ``path`` that rename a file or use ``tempfile`` (``os.replace``,
    ``os.rename``, ``shutil.move``, ``Path.replace``/``rename``, ``import tempfile``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            if "tempfile" in names:
                found.append(f"{node.lineno}: tempfile")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func, owner = node.func.attr, node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else ""
            if (owner_name, func) in {("os", "replace"), ("os", "rename"), ("os", "renames"),
                                      ("shutil", "move")}:
                found.append(f"{node.lineno}: {owner_name}.{func}")
            elif (func in {"replace", "rename"} and owner_name not in {"os", "shutil"}
                  and len(node.args) == 1 and not node.keywords):
                # Path.replace(target) / Path.rename(target): one positional argument
                # (str.replace takes two, dataclasses/datetime .replace keywords only).
                found.append(f"{node.lineno}: .{func}(...)")
    return found


def test_files_are_kept_only_through_the_durable_helper() -> None:
    """Every file the node keeps is written by ``dicom_node.foundation.durable`` (issue 18): no other
    module renames files into place or makes temporary files."""
    found = {}
    for path in _product_modules():
        rel = path.relative_to(ROOT).as_posix()
        hits = _renames_and_tempfiles(path)
        if hits and rel not in RENAMES_ALLOWED:
            found[rel] = hits
    assert found == {}


def test_the_check_for_renames_finds_them(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import os, shutil\nfrom tempfile import mkstemp\n"
                      "os.replace(a, b)\nshutil.move(a, b)\np.with_suffix('.t').rename(q)\n"
                      "tmp.replace(final)\ns.replace('a', 'b')\nsettings.replace(port=1)\n"
                      "when.replace(tzinfo=None)\n")
    assert _renames_and_tempfiles(sample) == ["2: tempfile", "3: os.replace", "4: shutil.move",
                                              "5: .rename(...)", "6: .replace(...)"]


def test_database_module_is_a_leaf() -> None:
    """dicom_node.foundation.database: the standard library and sqlite-utils, nothing of ours."""
    names = imports_of(FOUNDATION_DIR / "database.py")
    tops = {n.split(".")[0] for n in names if not n.startswith(FOUNDATION + ".")}
    assert tops - set(sys.stdlib_module_names) == {"sqlite_utils"}
    assert {n for n in names if n.startswith("dicom_node")} == {FOUNDATION + ".clock"}


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
    """Every store, queue and reader opens SQLite through dicom_node.foundation.database.connect
    (WAL, synchronous=FULL, busy timeout, read-only where asked). Tests may open the
    files with plain sqlite3 to look at them from outside."""
    paths = _product_modules() + sorted((ROOT / "benchmarks").rglob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in paths for line in _calls_sqlite3_connect(p)
           if p != FOUNDATION_DIR / "database.py"]
    assert bad == []


def test_the_check_for_sqlite3_connect_finds_it(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import sqlite3\nfrom sqlite3 import connect\n"
                      "c = sqlite3.connect('x')\ntext = 'sqlite3.connect'\n")
    assert _calls_sqlite3_connect(sample) == [2, 3]


# ---------------------------------------------------------------- no copies in the stores
#: The stores and the queue: no block of REPEAT_LINES code lines appears twice among them.
STORE_MODULES = ("twin_archive/**/*.py", "registry/**/*.py", "dicom_node/queue/jobs.py",
                 "dicom_node/queue/sender.py")
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
QUEUE_TABLES = ("jobs", "sends", "monitored_series", "mpps_steps", "mpps_series",
                "mpps_instances", "mpps_forwards", "series_sizes", "scanner_completeness")
STORES = ("twin_archive/", "registry/")
#: The queue database's owner: the one sub-package of the shell that names its tables.
QUEUE_MODULES = ("dicom_node/queue/",)
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
    the queue's tables only in the queue modules and the stores. The shell asks the stores
    and the queue (e.g. :mod:`twin_archive.counts`, :mod:`twin_archive.arrivals`)."""
    found = set()
    for path in _product_modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(STORES):
            continue
        owned = QUEUE_TABLES if rel.startswith(QUEUE_MODULES) else ()
        if rel == "dicom_node/foundation/database.py":  # the record of every file's migrations
            owned = ("schema_migrations",)
        for table in _tables_named(path, STORE_TABLES + QUEUE_TABLES):
            if table not in owned:
                found.add((rel, table))
    assert sorted(found) == [], "a module outside the stores names a store's table in SQL"


def test_no_module_attaches_another_database() -> None:
    """Each room opens its own database; none attaches another's (STYLE rule 18)."""
    import re

    attach = re.compile(r"\bATTACH\s+(?:DATABASE\b|\?|[\"'])", re.IGNORECASE)
    found = [p.relative_to(ROOT).as_posix() for p in _product_modules()
             if any(attach.search(text) for text in _sql_texts(p))]
    assert found == []


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


# ---------------------------------------------------------------- functions a reader can hold
LONG_FUNCTION_LINES = 60
#: Where the rule holds: every product package (the stores, pipelines and trainer since
#: issue 18; the shell and the Orthanc helpers since issue 30).
HELD_PACKAGES = ("twin_archive", "registry", "pipelines", "trainer", "dicom_node", "orthanc")


def _long_functions(path: Path, limit: int = LONG_FUNCTION_LINES) -> set[str]:
    """Qualified names of the functions of ``path`` longer than ``limit`` lines, counted
    from ``def`` to the last line without the docstring, unless the docstring gives the
    reason in a line starting "Long because"."""
    found = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                doc = ast.get_docstring(child, clean=True)
                if doc is not None:
                    first = child.body[0]
                    lines -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
                reasoned = doc is not None and any(
                    line.startswith("Long because") for line in doc.splitlines())
                if lines > limit and not reasoned:
                    found.add(f"{prefix}{child.name}")
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def test_no_function_longer_than_a_reader_can_hold() -> None:
    """No function over 60 lines (docstring not counted) in the stores, pipelines and
    trainer without a "Long because" line in its docstring (issue 18)."""
    found = set()
    for package in HELD_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found |= {(rel, name) for name in _long_functions(path)}
    assert sorted(found) == [], "split it into named steps, or say why in its docstring"


def test_the_check_for_long_functions_finds_them(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(59))  # with its def: 60 lines
    sample = tmp_path / "m.py"
    sample.write_text(f'def short():\n    """Doc.\n\n    More.\n    """\n{body}'
                      f"def long():\n    y = 0\n{body}"
                      f'def reasoned():\n    """Doc.\n\n    Long because: one loop.\n    """\n'
                      f"    y = 0\n{body}"
                      f"class K:\n    def method(self):\n        def inner():\n"
                      + "".join(f"            z{i} = {i}\n" for i in range(61)))
    assert _long_functions(sample) == {"long", "K.method", "K.method.inner"}


# ---------------------------------------------------------------- one clock
def _clock_reads(path: Path) -> list[int]:
    """Lines that read the wall clock as a datetime (``datetime.now``/``utcnow``/``today``)."""
    return sorted(node.lineno for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Attribute) and node.attr in {"now", "utcnow", "today"}
                  and isinstance(node.value, ast.Attribute | ast.Name)
                  and (node.value.attr if isinstance(node.value, ast.Attribute)
                       else node.value.id) in {"datetime", "date"})


def test_one_clock() -> None:
    """Every timestamp the node records comes from ``dicom_node.foundation.clock.utc_now``
    (issue 18: there were three clocks with different return types)."""
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in _product_modules() for line in _clock_reads(p)
           if p != FOUNDATION_DIR / "clock.py"]
    assert bad == []


def test_the_check_for_clock_reads_finds_them(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import datetime as _dt\nfrom datetime import datetime\n"
                      "a = datetime.now(UTC)\nb = _dt.datetime.now()\nc = _dt.date.today()\n"
                      "d = utc_now()\ne = now()\n")
    assert _clock_reads(sample) == [3, 4, 5]


# ---------------------------------------------------------------- dependencies' private names
#: Modules that may import a private name of pydicom, pynetdicom or MONAI, and why.
PRIVATE_ALLOWED = {
    "dicom_node/wire/fast_receive/": "pynetdicom's: the one adapter behind the fast_receive switch",
    "pipelines/writers/highdicom_speedups.py": "highdicom's: many segments fast, behind its "
                                               "`fast` switch, tested both ways",
}


def _private_imports(path: Path) -> list[str]:
    """``module.name`` of every private name imported from pydicom, pynetdicom or MONAI."""
    return [f"{node.module}.{a.name}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.split(".")[0] in {"pydicom", "pynetdicom", "monai", "highdicom"}
            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]


def test_private_names_of_dependencies_in_the_allowed_modules_only() -> None:
    bad = {}
    for path in _product_modules():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(tuple(PRIVATE_ALLOWED)) and _private_imports(path):
            bad[rel] = _private_imports(path)
    assert bad == {}


def test_the_check_for_private_imports_finds_them(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("from pydicom.filereader import _read_file_meta_info, read_preamble\n"
                      "from pynetdicom.dul import __doc__\nfrom mine import _x\n")
    assert _private_imports(sample) == ["pydicom.filereader._read_file_meta_info"]
