"""Learning in the shell: what the live node hands to training, and when training runs.

* :mod:`~dicom_node.learning.label_intake` - a radiologist's SEG becomes a label;
* :mod:`~dicom_node.learning.drift` - what each scanner sends and what the model makes of it;
* :mod:`~dicom_node.learning.shadow` - a candidate also runs on live series, unseen;
* :mod:`~dicom_node.learning.live_learning` - the worker's one touch point for the two above;
* :mod:`~dicom_node.learning.training` - the nightly job's tasks, settings and schedule.

It imports the foundation, the configuration modules and the lower rooms
(``twin_archive``, ``registry``, ``pipelines``, ``trainer``); never the wire, the queue,
the runtime or the CLI.
"""
