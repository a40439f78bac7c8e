"""Logging for the entry point only: plain lines on stdout, readable in journald."""

from __future__ import annotations

import logging
import os
import sys

from twin_archive.text import printable


class EscapeControlCharacters(logging.Filter):
    """Escapes control characters in every message (issue 13): identifiers from the
    wire (Patient IDs, UIDs, AE titles) may hold NUL, ESC or newlines; they are kept as
    received but never reach the terminal or the journal raw, so no value can forge a
    log line. Tracebacks (formatted separately) keep their line breaks."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - let the handler report the bad format as usual
            return True
        safe = printable(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


#: The project's own packages: their INFO lines are the journal; other libraries' are not.
OUR_PACKAGES = frozenset({"dicom_node", "twin_archive", "registry", "pipelines", "trainer",
                          "orthanc", "__main__"})


class OnlyOursBelowWarning(logging.Filter):
    """Let other libraries' records through at WARNING and above only (highdicom logs a
    dozen "copy attributes of module ..." lines per result at INFO, APScheduler every
    job run); ``--log-level DEBUG`` shows them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OUR_PACKAGES


class JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority (``<3>`` error ... ``<7>`` debug).

    journald reads that prefix on a service's stdout (``SyslogLevelPrefix=yes``, the
    default), so ``journalctl -u dicom-node -p warning`` shows warnings and errors only.
    """

    PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
                logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # One journal entry per line: a traceback keeps its priority on every line.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def configure_logging(level: str = "INFO") -> None:
    """Send log lines to stdout; journald adds its own timestamps under systemd."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stdout)
    if under_journald:
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(EscapeControlCharacters())
    if str(level).upper() != "DEBUG":
        handler.addFilter(OnlyOursBelowWarning())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))

