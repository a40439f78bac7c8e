"""The foundation: the one piece of the shell every room may import.

* :mod:`~dicom_node.foundation.errors` - the root of every exception raised on purpose;
* :mod:`~dicom_node.foundation.clock` - the one clock (``utc_now``) and its text form;
* :mod:`~dicom_node.foundation.database` - the one way to SQLite (connect, write, migrate);
* :mod:`~dicom_node.foundation.durable` - crash-safe file writes (fsync, atomic rename);
* :mod:`~dicom_node.foundation.faults` - faults that last (a full disk), logged once per change.

Its modules import the standard library and sqlite-utils only, nothing of ours
(``tests/test_layering.py``), and this ``__init__`` imports nothing.
"""
