"""The shipped demo model of task ``spleen-ct``.

:data:`DEMO_BUNDLE` is a MONAI bundle (configs and weights) of a deliberately small
3D UNet trained only on synthetic CT phantoms by ``python -m trainer.demo_model``
(see the bundle's ``README.md`` for the exact command and seed). It lets the node
work out of the box, without downloading anything; it is not for clinical use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from registry.records import ModelVersion
from registry.store import Registry

LOG = logging.getLogger(__name__)

#: The bundle directory shipped with the package.
DEMO_BUNDLE = Path(__file__).resolve().parent / "spleen_ct_demo"
#: The task the demo model serves.
DEMO_TASK = "spleen-ct"


def ensure_demo_model(reg: Registry, *, task: str = DEMO_TASK) -> ModelVersion:
    """Make sure ``task`` has an active general model: import the demo bundle if not.

    Idempotent: when an active general (any-scanner) version of ``task`` exists,
    nothing is imported and that version is returned, whether it is the demo model
    or a model the site promoted since.

    Parameters
    ----------
    reg : Registry
        The node's model registry.
    task : str
        Task to serve (default ``spleen-ct``).

    Returns
    -------
    ModelVersion
        The active general version of ``task``.

    Raises
    ------
    registry.errors.BundleError
        If the shipped bundle is missing or broken (a damaged installation).
    """
    active = reg.active(task)
    if active is not None:
        LOG.debug("task %s already has active model %s", task, active.version)
        return active
    mv = reg.import_bundle(DEMO_BUNDLE, task=task, activate=True, by="dicom-node",
                           reason="shipped demo model (synthetic phantoms only)")
    LOG.info("installed the shipped demo model as %s (active for %s)", mv.version, task)
    return mv
