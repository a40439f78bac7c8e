"""The ``dicom-node`` command: subcommands in the domain's words.

Each subcommand module has ``register(subparsers, parents)``; handlers are
``cmd_xxx(args, settings) -> int`` and get the one settings object.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from collections.abc import Sequence

from dicom_node import __version__
from dicom_node.foundation.errors import ConfigError, DicomNodeError
from dicom_node.settings import load_settings


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="TOML configuration file (default: $DICOM_NODE_CONFIG)")
    common.add_argument("--data-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="data directory (default: $DICOM_NODE_DATA_DIR or the configuration)")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface."""
    from dicom_node.cli import demo, destinations, infer, models, ops, queues, serve, twin

    common = _common()
    parser = argparse.ArgumentParser(
        prog="dicom-node", parents=[common],
        description="PACS-integrated AI inference node: receives studies over DICOM, keeps "
                    "each patient's archive (twin) and returns AI results to the PACS.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (serve, twin, models, infer, demo, queues, ops, destinations):
        module.register(sub, [common])
    from dicom_node.cli import labels, tasks, training  # nightly learning: labels, train, queue, dataset
    from dicom_node.cli import drift  # live learning: drift per scanner

    for module in (labels, training, tasks, drift):
        module.register(sub, [common])
    from dicom_node.cli import archive  # issue 13: archive verify / rebuild-index

    archive.register(sub, [common])
    return parser


def damaged_database_line(data_dir: Path | str, exc: BaseException) -> str:
    """One line naming the damaged database of ``data_dir`` and what to run; on a full
    disk (SQLite's ``disk I/O error`` included) it says so instead: nothing is damaged."""
    from dicom_node.cli.archive import check_databases
    from dicom_node.foundation.faults import free_bytes, is_disk_full

    if is_disk_full(exc, data_dir):
        return (f"disk full: the data directory {data_dir} has {(free_bytes(data_dir) or 0) >> 10}"
                f" KiB free ({exc}); free space and the node and this command work again, "
                "with no repair")

    found = [p for p in check_databases(Path(data_dir)) if "damaged" in p or "missing" in p]
    what = found[0] if found else f"database error in {data_dir} ({exc})"
    return (f"{what}; check and repair with 'dicom-node archive verify --repair', or rebuild "
            "the index with 'dicom-node archive rebuild-index' (stop the node first)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {
        "data_dir": getattr(args, "data_dir", None),
        "log_level": getattr(args, "log_level", None),
        "port": getattr(args, "port", None),
        "ae_title": getattr(args, "ae_title", None),
        "bind_address": getattr(args, "bind", None),
    }
    settings = None
    try:
        settings = load_settings(getattr(args, "config", None), overrides=overrides)
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:  # a damaged database: one line, no traceback
        where = settings.data_dir if settings is not None else "."
        print(f"dicom-node: {damaged_database_line(where, exc)}", file=sys.stderr)
        return 1
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_status", 1))
    except ValueError as exc:  # a bad argument, named by the raiser
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
