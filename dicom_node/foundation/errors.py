"""The root of every exception dicom-node raises on purpose.

This module is a leaf: it imports nothing of ours, so every room (``twin_archive``,
``registry``, ``pipelines``, ``trainer``) may subclass :class:`DicomNodeError`
without depending on the application shell. Each room defines its own subclass
(``ArchiveError``, ``RegistryError``, ``PipelineError``, ``TrainingError``) in its
own ``errors`` module.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of all dicom-node errors."""


class ConfigError(DicomNodeError, ValueError):
    """The configuration is invalid; the message names the key and what is expected.

    Parameters
    ----------
    key : str
        Dotted name of the offending key (``destinations[0].port``) or flag.
    expected : str
        What the key must hold, in words.
    got : object, optional
        The value that was found.
    source : str, optional
        Where the value came from (a file path, ``environment``, ``command line``).
    """

    def __init__(self, key: str, expected: str, got: object = None, source: str = "") -> None:
        self.key = key
        self.expected = expected
        self.got = got
        self.source = source
        where = f" in {source}" if source else ""
        found = f", got {got!r}" if got is not None else ""
        super().__init__(f"configuration{where}: {key}: expected {expected}{found}")
