"""The running node: what ``dicom-node serve`` starts, supervises and stops.

:mod:`~dicom_node.runtime.node` (listener, archive, loop, metrics; the data-directory lock
of :mod:`~dicom_node.runtime.datadir_lock`, systemd's notify protocol of
:mod:`~dicom_node.runtime.sdnotify`), :mod:`~dicom_node.runtime.loop` (monitor, workers,
sender, scheduler), the inference worker processes (:mod:`~dicom_node.runtime.supervisor`,
:mod:`~dicom_node.runtime.worker_process`, :mod:`~dicom_node.runtime.worker`), retention in
the running node (:mod:`~dicom_node.runtime.retention`) and what the node reports about
itself (:mod:`~dicom_node.runtime.observability`). It may import every other room of the
shell but the CLI.
"""
