"""The queue database's owner (``<data-dir>/queue.sqlite``): the only code that names its tables.

* :mod:`~dicom_node.queue.jobs` - durable inference jobs (and the queue's migrations);
* :mod:`~dicom_node.queue.sender` - durable sends of results to destinations;
* :mod:`~dicom_node.queue.monitor` - completeness: monitored series become jobs.

It imports the foundation, the configuration modules, the wire (statuses, TLS) and
learning's label intake; never the runtime or the CLI.
"""
