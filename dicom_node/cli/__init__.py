"""The ``dicom-node`` command: subcommands in the domain's words.

Each subcommand module has ``register(subparsers, parents)``; handlers are
``cmd_xxx(args, settings) -> int`` and get the one settings object.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import MutableMapping
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


#: Which module of this package registers each top-level command (its parser and
#: handler): ``dicom-node COMMAND`` imports that module only, so that a command starts
#: without importing every other command's dependencies (``infer`` does not load the
#: listener, ``serve`` not the trainer's). tests/test_cli_start.py checks the table
#: against what each module registers.
COMMAND_MODULES: dict[str, str] = {
    "serve": "serve", "twin": "twin", "models": "models", "infer": "infer", "demo": "demo",
    "jobs": "queues", "sends": "queues", "status": "ops", "audit": "ops",
    "destinations": "destinations", "labels": "labels", "train": "training",
    "queue": "training", "dataset": "training", "tasks": "tasks", "drift": "drift",
    "archive": "archive",
}
#: The order of the modules in ``dicom-node --help``: the table's.
_MODULE_ORDER = tuple(dict.fromkeys(COMMAND_MODULES.values()))


def command_of(argv: Sequence[str]) -> str | None:
    """The command named by ``argv`` (after the common options), or ``None`` when there
    is none or it is not one of :data:`COMMAND_MODULES` (the whole parser says why)."""
    common = _common()
    common.exit_on_error = False
    try:
        _known, rest = common.parse_known_args(list(argv))
    except argparse.ArgumentError:  # a common option without its value: the whole parser says so
        return None
    first = next((a for a in rest if not a.startswith("-")), None)
    return first if first in COMMAND_MODULES and rest and rest[0] == first else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line interface: every command, or only ``command``'s module."""
    import importlib

    common = _common()
    parser = argparse.ArgumentParser(
        prog="dicom-node", parents=[common],
        description="PACS-integrated AI inference node: receives studies over DICOM, keeps "
                    "each patient's archive (twin) and returns AI results to the PACS.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = (COMMAND_MODULES[command],) if command is not None else _MODULE_ORDER
    for name in names:
        importlib.import_module(f"dicom_node.cli.{name}").register(sub, [common])
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


#: What the OpenMP runtime of torch's CPU kernels is told when the environment does not
#: say otherwise (:func:`openmp_defaults`).
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Let OpenMP threads wait for work asleep, not spinning (``OMP_WAIT_POLICY=PASSIVE``),
    unless ``environ`` already sets the variable.

    Done before any command imports torch (the runtime reads it when it loads), and
    inherited by the node's inference workers and the trainer. GNU OpenMP's default lets
    an idle thread spin: on a machine where the DICOM listener, other workers or other
    programs want the cores, the spinning threads burned CPU and took time from the one
    doing the work (``dicom-node infer``, 200-slice CT, 2 shared cores at load 4.9-6.2:
    7.6 s of CPU and 7.9 s wall asleep against 12.5 s and 12.8 s spinning, medians of 3;
    benchmarks/README.md). The results are the same either way.
    """
    for name, value in OPENMP_DEFAULTS.items():
        environ.setdefault(name, value)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script."""
    openmp_defaults()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
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
