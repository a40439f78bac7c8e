"""Per-row cost of sqlite-utils' ``Table.insert`` next to a prepared ``execute``.

The figure behind :mod:`dicom_node.foundation.database`'s choice to write SQL by hand. Both
write the same rows into an index-like table through :func:`dicom_node.foundation.database.connect`
(WAL, ``synchronous=FULL``), all rows in one :func:`~dicom_node.foundation.database.write`
transaction, so the statement cost is measured rather than the commit's fsync::

    .venv/bin/python benchmarks/sqlite_writes.py --rows 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dicom_node.foundation.database import connect, write

_TABLE = ("CREATE TABLE instances (id INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL,"
          " series_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,"
          " sha256 TEXT NOT NULL, received_at TEXT NOT NULL)")
_INSERT = ("INSERT INTO instances (sop_instance_uid, series_uid, path, size, sha256, received_at)"
           " VALUES (?,?,?,?,?,?)")


def _rows(n: int) -> list[dict[str, object]]:
    return [{"sop_instance_uid": f"1.2.826.0.1.{i}", "series_uid": "1.2.826.0.1", "path":
             f"ab/cd/{i}.dcm", "size": 524288 + i, "sha256": "ab" * 32,
             "received_at": "2026-11-30T08:00:00.000000+00:00"} for i in range(n)]


def _per_row_us(path: Path, rows: list[dict[str, object]], how: str) -> float:
    db = connect(path, timeout_s=30.0)
    try:
        db.execute(_TABLE)
        table = db["instances"]
        start = time.perf_counter()
        with write(db) as conn:
            for row in rows:
                if how == "execute":
                    conn.execute(_INSERT, tuple(row.values()))
                else:
                    table.insert(row)
        return (time.perf_counter() - start) / len(rows) * 1e6
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = _rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            figures = {how: _per_row_us(Path(tmp) / f"{how}-{r}.sqlite", rows, how)
                       for how in ("execute", "Table.insert")}
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} us/row" for k, v in figures.items())
                  + f" (x{figures['Table.insert'] / figures['execute']:.1f})")


if __name__ == "__main__":
    main()
