"""dicom-node: the application shell (configuration, DICOM SCP/SCU, queues, CLI).

This ``__init__`` deliberately imports nothing, so that the stores can import the
leaf module :mod:`dicom_node.foundation.errors` without pulling in the application shell.
"""

__version__ = "0.1.0"
