"""Errors of the trainer room.

A leaf module: it imports only :mod:`dicom_node.foundation.errors` (the dependency-free root,
as :mod:`registry.errors` and :mod:`pipelines.errors` do). Every error the trainer
raises on purpose is a :class:`TrainingError`, which is also a ``RuntimeError``.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node.foundation.errors import DicomNodeError


class TrainingError(DicomNodeError, RuntimeError):
    """Base class of the trainer's errors: a training run cannot start or go on."""


class BundleConfigError(TrainingError):
    """The bundle to train cannot be read for training.

    Parameters
    ----------
    path : pathlib.Path
        The bundle file concerned.
    problem : str
        What is wrong, in words.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class CheckpointError(TrainingError):
    """A checkpoint to resume from cannot be used.

    Parameters
    ----------
    path : pathlib.Path
        The checkpoint file.
    problem : str
        What is wrong with it.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")
