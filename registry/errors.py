"""Exceptions of the model registry (the "knowledge bank").

A leaf module: it imports only :mod:`dicom_node.foundation.errors`, so that the registry stays
free of the application shell. Every error the registry raises on purpose is a
:class:`RegistryError`; each subclass also subclasses the fitting built-in, and
builds its message in ``__init__`` from the identifier involved.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.foundation.errors import DicomNodeError


class RegistryError(DicomNodeError):
    """Base class of the registry's errors."""


class VersionNotFoundError(RegistryError, LookupError):
    """No model version of that name is registered.

    Parameters
    ----------
    version : str
        The version identifier that was asked for (``spleen-ct-v3``).
    """

    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"model version {version!r} is not registered "
                         f"(see `dicom-node models list`)")


class NoActiveModelError(RegistryError, LookupError):
    """No active model version serves a task for a given scanner.

    Parameters
    ----------
    task : str
        The task (``spleen-ct``).
    manufacturer, model_name : str
        The scanner the series came from ('' when unknown).
    """

    def __init__(self, task: str, manufacturer: str = "", model_name: str = "") -> None:
        self.task = task
        self.manufacturer = manufacturer
        self.model_name = model_name
        scanner = " / ".join(s for s in (manufacturer, model_name) if s) or "any scanner"
        super().__init__(f"no active model for task {task!r} and {scanner}; import one with "
                         f"`dicom-node models import BUNDLE_DIR --task {task} --activate` "
                         f"or promote a candidate")


class StatusError(RegistryError, ValueError):
    """A status change that the version's current status does not allow.

    Parameters
    ----------
    version : str
        The version identifier.
    action : str
        What was attempted (``promote``, ``retire``, ``rollback``).
    why : str
        Why it is refused, in words.
    """

    def __init__(self, version: str, action: str, why: str) -> None:
        self.version = version
        self.action = action
        super().__init__(f"cannot {action} {version}: {why}")


class BundleError(RegistryError, ValueError):
    """A MONAI bundle that cannot be imported or run.

    Parameters
    ----------
    path : pathlib.Path
        The file (or directory) at fault.
    problem : str
        What is wrong with it.
    remedy : str
        What to do about it.
    """

    def __init__(self, path: Path | str, problem: str, remedy: str) -> None:
        self.path = Path(path)
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{self.path}: {problem}; {remedy}")
