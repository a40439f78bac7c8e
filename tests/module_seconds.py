"""Refresh ``tests/module_seconds.txt`` - each test module's seconds in a whole run - from a
pytest JUnit XML report, so that ``conftest.py`` starts the longest modules first:

    .venv/bin/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder --junitxml=/tmp/j.xml
    .venv/bin/python tests/module_seconds.py /tmp/j.xml

With several worker processes a long module that starts last ends the run alone; started
first, it runs beside the many short ones (longest processing time first).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TABLE = Path(__file__).with_name("module_seconds.txt")


def module_seconds(junit: Path) -> Counter[str]:
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "").removeprefix("tests.").split(".")[0]  # tests.test_x[.Class]
        seconds[f"{module}.py"] += float(case.get("time") or 0)
    return seconds


def main(junit: str) -> None:
    rows = module_seconds(Path(junit)).most_common()
    lines = [f"{s:8.1f} {m}" for m, s in rows]
    TABLE.write_text("# seconds module - written by tests/module_seconds.py; longest first\n"
                     + "\n".join(lines) + "\n")
    print(f"{len(rows)} modules written to {TABLE}")


if __name__ == "__main__":
    main(sys.argv[1])
