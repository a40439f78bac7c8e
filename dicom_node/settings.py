"""One typed settings object, loaded once and passed down.

Sources, later ones winning: built-in defaults, the TOML file (``--config`` or
``DICOM_NODE_CONFIG``), environment variables (``DICOM_NODE_DATA_DIR``,
``DICOM_NODE_PORT``, ``DICOM_NODE_AE_TITLE``, ``DICOM_NODE_LOG_LEVEL``), command-line
flags. Every mistake is reported as one :class:`~dicom_node.errors.ConfigError` line
naming the key and what is expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError
from dicom_node.profiles import DEFAULT_TRANSFER_SYNTAXES, check_transfer_syntaxes
from dicom_node.tasks import Task, default_tasks, parse_tasks

DEFAULT_DATA_DIR = Path("/var/lib/dicom-node")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_PREFIX = "DICOM_NODE_"
ENV_KEYS = ("data_dir", "port", "ae_title", "log_level", "stable_after", "metrics_port")
#: What a destination may receive: the SEG, the SR and the overlay series.
RESULT_KINDS = ("seg", "sr", "overlay")
#: Where the model runs: here, or on a Triton Inference Server.
BACKENDS = ("local", "triton")
TRITON_VARIANTS = ("onnx", "python")


def _check_ae_title(key: str, value: object, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, "an AE title (string of 1-16 characters)", value, source)
    text = value.strip()
    if not 1 <= len(text) <= 16 or "\\" in text or any(ord(c) < 32 or ord(c) > 126 for c in text):
        raise ConfigError(
            key, "an AE title: 1-16 printable ASCII characters, no backslash", value, source
        )
    return text


@dataclass(frozen=True, kw_only=True, slots=True)
class Destination:
    """A DICOM node that receives results (normally the PACS).

    Parameters
    ----------
    ae_title : str
        Its AE title (1-16 characters).
    host : str
        Host name or IP address.
    port : int
        Its DICOM port (1-65535).
    send : tuple of str
        Which results it wants, any of ``seg``, ``sr``, ``overlay`` (default all three).
    tls : bool
        Send over DICOM TLS (PS3.15 B.1), with the node's ``tls_cert``/``tls_key`` as
        client certificate and ``tls_ca`` to verify the destination (default false).
    name : str
        Its name in ``dicom-node destinations test NAME`` (default: the AE title).
    transfer_syntaxes : tuple of str
        Transfer syntaxes it accepts, most preferred first, as aliases or UIDs (see
        :mod:`dicom_node.profiles`); stored as UIDs. At least one uncompressed
        (default: explicit, then implicit VR little endian).
    """

    ae_title: str
    host: str
    port: int
    send: tuple[str, ...] = RESULT_KINDS
    tls: bool = False
    name: str = ""
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES

    def __post_init__(self) -> None:
        if not self.name and isinstance(self.ae_title, str):
            object.__setattr__(self, "name", self.ae_title.strip())
        self.check("destinations", "")

    def check(self, key: str, source: str) -> None:
        """Validate each field, naming ``key.field`` in the error.

        Raises
        ------
        ConfigError
            On the first invalid field.
        """
        _check_ae_title(f"{key}.ae_title", self.ae_title, source)
        if not isinstance(self.host, str) or not self.host.strip() or any(c.isspace() for c in self.host):
            raise ConfigError(f"{key}.host", "a host name or IP address", self.host, source)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"{key}.port", "an integer from 1 to 65535", self.port, source)
        if (not isinstance(self.send, tuple) or not self.send
                or not all(k in RESULT_KINDS for k in self.send) or len(set(self.send)) != len(self.send)):
            raise ConfigError(f"{key}.send", 'a non-empty list of "seg", "sr", "overlay"',
                              list(self.send) if isinstance(self.send, tuple) else self.send, source)
        if not isinstance(self.tls, bool):
            raise ConfigError(f"{key}.tls", "true or false", self.tls, source)
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= 64 or not all(
                c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{key}.name", "1-64 letters, digits, '-', '_' or '.'", self.name, source)
        try:
            syntaxes = check_transfer_syntaxes(self.transfer_syntaxes if isinstance(
                self.transfer_syntaxes, tuple | list) else [self.transfer_syntaxes])
        except ValueError as exc:
            raise ConfigError(f"{key}.transfer_syntaxes", f"a list of transfer syntaxes ({exc})",
                              self.transfer_syntaxes, source) from None
        object.__setattr__(self, "transfer_syntaxes", syntaxes)

    @property
    def key(self) -> str:
        """``AET@HOST:PORT``, the destination's name in queues and logs."""
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str, source: str = "command line") -> Destination:
    """Parse ``AET@HOST:PORT`` (the ``--destination`` flag); it receives SEG, SR and overlay.

    Raises
    ------
    ConfigError
        If the text is not of that form or a part is invalid.
    """
    try:
        aet, hostport = text.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        port_number = int(port)
    except ValueError:
        raise ConfigError("--destination", "AET@HOST:PORT, e.g. PACS@10.0.0.5:104", text, source) from None
    dest = Destination.__new__(Destination)
    for name, value in (("ae_title", aet.strip()), ("host", host), ("port", port_number),
                        ("send", RESULT_KINDS), ("tls", False), ("name", aet.strip()),
                        ("transfer_syntaxes", DEFAULT_TRANSFER_SYNTAXES)):
        object.__setattr__(dest, name, value)
    dest.check("--destination", source)
    return dest


def _to_destinations(v: Any, source: str) -> tuple[Destination, ...]:
    if not isinstance(v, list):
        raise ConfigError("destinations", "an array of tables ([[destinations]])", v, source)
    known = ("name", "ae_title", "host", "port", "send", "tls", "transfer_syntaxes")
    out = []
    for i, table in enumerate(v):
        key = f"destinations[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(key, "a table with ae_title, host, port and send", table, source)
        for name in table:
            if name not in known:
                raise ConfigError(f"{key}.{name}", f"no such key (known keys: {', '.join(known)})",
                                  source=source)
        for name in ("ae_title", "host", "port"):
            if name not in table:
                raise ConfigError(f"{key}.{name}", "a value (the key is required)", source=source)
        send = table.get("send", list(RESULT_KINDS))
        if not isinstance(send, list):
            raise ConfigError(f"{key}.send", 'a list of "seg", "sr", "overlay"', send, source)
        syntaxes = table.get("transfer_syntaxes", list(DEFAULT_TRANSFER_SYNTAXES))
        if not isinstance(syntaxes, list):
            raise ConfigError(f"{key}.transfer_syntaxes", "a list of transfer syntaxes", syntaxes, source)
        dest = Destination.__new__(Destination)
        aet = table["ae_title"]
        for name, value in (("ae_title", table["ae_title"]), ("host", table["host"]),
                            ("port", table["port"]), ("send", tuple(send)),
                            ("tls", table.get("tls", False)),
                            ("name", table.get("name", aet.strip() if isinstance(aet, str) else aet)),
                            ("transfer_syntaxes", tuple(syntaxes))):
            object.__setattr__(dest, name, value)
        dest.check(key, source)
        if isinstance(dest.ae_title, str):
            object.__setattr__(dest, "ae_title", dest.ae_title.strip())
        if any(d.name == dest.name for d in out):
            raise ConfigError(f"{key}.name", "a name no other destination has (defaults to the "
                              "AE title)", dest.name, source)
        out.append(dest)
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the node is configured with.

    Parameters
    ----------
    ae_title : str
        The node's own AE title (1-16 characters).
    port : int
        TCP port of the DICOM listener (0 picks a free port; 104 needs a capability).
    bind_address : str
        Address the listener binds to.
    data_dir : pathlib.Path
        Root of the archive, the queues and the model registry.
    allowed_calling_aes : tuple of str
        Calling AE titles allowed to associate; empty accepts every caller (a warning
        is logged at start).
    require_called_ae : bool
        Reject associations whose Called AE Title is not ``ae_title``.
    max_associations : int
        Associations served at once.
    max_pdu_size : int
        Largest PDU the node accepts, bytes (0 = no limit).
    listener_processes : int
        Processes that accept DICOM associations on the one listening socket (the
        least busy takes each new association), 1-16, default 1. More than one lets
        parallel associations use more than one CPU core (one Python process stores on
        one core at a time); the extra ones are lean (no inference) and are started
        and stopped with the node. See ``benchmarks/README.md``.
    workers : int
        Inference worker processes, 0-32, default 1. Each claims jobs from the queue
        and runs them (torch and the model live in the workers, never in the DICOM
        listener); a worker that dies gives its job back and is restarted with
        back-off. 0: no inference here (jobs stay queued). Each worker holds its own
        copy of the models in memory.
    network_timeout_s : float
        Seconds of silence after which an association is aborted; also the longest a
        PDU (or an A-ASSOCIATE-RQ) may take to arrive once it has begun.
    acse_timeout_s : float
        Seconds a new connection has to send its association request (default 10);
        a connection that sends nothing is closed after it.
    fast_receive : bool
        Receive C-STOREs on the node's fast path (:mod:`dicom_node.fast_receive`,
        which reaches into pynetdicom's internals; default true) or on plain pynetdicom.
        A pynetdicom whose internals changed is detected at start and served plainly.
    min_free_mb : int
        Free space (MiB) kept in reserve on the data directory; below it C-STOREs are
        refused with A700 (out of resources).
    log_level : str
        One of DEBUG, INFO, WARNING, ERROR.
    config_path : pathlib.Path or None
        The file these settings were read from, if any.
    stable_after : float
        Seconds without a new instance after which a series is complete and its
        inference job is queued.
    destinations : tuple of Destination
        Where results are sent (``[[destinations]]`` tables, ``--destination``).
    send_backoff_initial_s, send_backoff_max_s : float
        First delay before re-sending to a destination that cannot be reached, and the
        cap of its doubling, seconds.
    stop_grace_s : float
        On SIGTERM, seconds the associations in progress get to finish before they are
        aborted (an instance not yet answered is not acknowledged, so nothing
        acknowledged is lost). Keep it below the unit's ``TimeoutStopSec``.
    metrics_port : int
        Port of the HTTP endpoint with ``/healthz`` and Prometheus ``/metrics``; 0 (the
        default) turns it off.
    metrics_bind : str
        Address of that endpoint (default 127.0.0.1, i.e. this machine only).
    tls_cert, tls_key, tls_ca : pathlib.Path or None
        PEM certificate and private key of the node and the CA bundle it trusts. When
        set (all three or none) the DICOM listener speaks TLS only and refuses a
        client without a certificate signed by ``tls_ca``; destinations with
        ``tls = true`` are sent to over TLS with the same certificate.
    train_enabled : bool
        Whether ``serve`` schedules the nightly training (default true).
    train_at : str
        Local time of the nightly training, ``HH:MM`` or ``HH:MM:SS`` (default 02:00).
    train_min_new_series : int
        A task is trained only when it gained at least this many labelled series of
        donating patients since its last training (default 5).
    train_promote_margin : float
        A candidate is promoted only when its mean validation Dice exceeds the active
        version's by more than this (default 0.01).
    train_time_budget_min : float
        Wall-clock budget of one task's training, minutes (default 120).
    train_max_epochs : int
        Upper bound of epochs of one training (default 100).
    train_finetune_lr, train_scratch_lr : float
        Learning rate when fine-tuning the active version (1e-4) or training from
        scratch (1e-3).
    train_patch_size : int
        Edge of the cubic training patch on the model grid, voxels (default 96).
    train_validation_fraction : float
        Share of patients held out for validation (default 0.2).
    train_device : str
        ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    train_nice : int
        Niceness of the training subprocess, 0-19 (default 10).
    backend : str
        ``local`` (default: the fastest verified backend of this machine) or
        ``triton``: the sliding-window batches go to the Triton Inference Server at
        ``triton_url``; pre- and post-processing stay in the node.
    triton_url : str
        Triton's gRPC address ``HOST:PORT`` (its default port is 8001); needed with
        ``backend = "triton"``.
    triton_variant : str
        Which model of ``models export-triton`` Triton serves: ``onnx`` (``<version>``,
        ONNX Runtime backend, TensorRT on GPUs; default) or ``python``
        (``<version>-python``, Python backend with ONNX Runtime).
    triton_timeout_s : float
        Deadline of one request to Triton, seconds (default 60).
    triton_backoff_max_s : float
        Triton down or the model missing: the job waits 2 s, then twice as long each
        time, up to this many seconds between tries (default 60); waiting never counts
        as a failed attempt.
    tasks : tuple of Task
        The tasks served (``[[tasks]]`` tables, :mod:`dicom_node.tasks`); without any,
        those of the shipped ``default_tasks.toml`` (``spleen-ct``). Reloaded on SIGHUP.
    waiting_for_model_max_age_h : float
        A job whose task has no active model for the series' scanner waits for one;
        when a model becomes active, series received within this many hours run, older
        ones are left failed (default 24).
    train_min_dice : float
        Quality floor: a trained candidate whose mean validation Dice is below it is
        never promoted, even when the task has no active version (default 0.7). A
        task's own ``min_dice`` overrides it (:func:`dicom_node.training.nightly_config`).
    train_promote_after_shadow : int
        When > 0, the nightly job promotes a candidate only after it has shadowed this
        many live series (``models shadow``) with no disagreement beyond
        ``train_shadow_min_agreement``; 0 (default) turns the requirement off.
    train_shadow_min_agreement : float
        Dice between the shadow's and the active version's masks (per label) below
        which a shadow series counts as a disagreement (default 0.8).
    drift_baseline_series : int
        Served series per scanner and task that form its baseline (the first ones;
        default 20).
    drift_window_series : int
        Latest series per scanner and task compared with the baseline (default 20).
    drift_psi_threshold : float
        Population stability index above which a figure counts as moved (default 0.25,
        the customary "significant shift").
    max_memory_gb : float
        Memory one inference may use, GB (10^9 bytes). A series the pipeline predicts
        will not fit (from its headers and the model, before any pixel is read) is
        refused with one line and not retried. 0 (the default) derives it from the
        machine: 80 % of its memory, or of the cgroup's limit when lower.
    """

    ae_title: str = "DICOM_NODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    data_dir: Path = DEFAULT_DATA_DIR
    allowed_calling_aes: tuple[str, ...] = ()
    require_called_ae: bool = False
    max_associations: int = 16
    max_pdu_size: int = 0
    listener_processes: int = 1
    workers: int = 1
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 10.0
    fast_receive: bool = True
    min_free_mb: int = 1024
    log_level: str = "INFO"
    config_path: Path | None = None
    stable_after: float = 30.0
    destinations: tuple[Destination, ...] = ()
    send_backoff_initial_s: float = 2.0
    send_backoff_max_s: float = 300.0
    stop_grace_s: float = 20.0
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    train_enabled: bool = True
    train_at: str = "02:00"
    train_min_new_series: int = 5
    train_promote_margin: float = 0.01
    train_time_budget_min: float = 120.0
    train_max_epochs: int = 100
    train_finetune_lr: float = 1e-4
    train_scratch_lr: float = 1e-3
    train_patch_size: int = 96
    train_validation_fraction: float = 0.2
    train_device: str = "auto"
    train_nice: int = 10
    backend: str = "local"
    triton_url: str = ""
    triton_variant: str = "onnx"
    triton_timeout_s: float = 60.0
    triton_backoff_max_s: float = 60.0
    tasks: tuple[Task, ...] = field(default_factory=default_tasks)
    waiting_for_model_max_age_h: float = 24.0
    train_min_dice: float = 0.7
    train_promote_after_shadow: int = 0
    train_shadow_min_agreement: float = 0.8
    drift_baseline_series: int = 20
    drift_window_series: int = 20
    drift_psi_threshold: float = 0.25
    max_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        src = str(self.config_path) if self.config_path else ""
        _check_ae_title("ae_title", self.ae_title, src)
        for i, aet in enumerate(self.allowed_calling_aes):
            _check_ae_title(f"allowed_calling_aes[{i}]", aet, src)
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError("port", "an integer from 0 to 65535", self.port, src)
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ConfigError("bind_address", "an IP address such as 0.0.0.0 or 127.0.0.1",
                              self.bind_address, src) from None
        if not isinstance(self.max_associations, int) or not 1 <= self.max_associations <= 1000:
            raise ConfigError("max_associations", "an integer from 1 to 1000", self.max_associations, src)
        if not isinstance(self.max_pdu_size, int) or self.max_pdu_size < 0:
            raise ConfigError("max_pdu_size", "an integer >= 0 (0 = no limit)", self.max_pdu_size, src)
        if isinstance(self.listener_processes, bool) or not isinstance(self.listener_processes, int) \
                or not 1 <= self.listener_processes <= 16:
            raise ConfigError("listener_processes", "an integer from 1 to 16",
                              self.listener_processes, src)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) \
                or not 0 <= self.workers <= 32:
            raise ConfigError("workers", "an integer from 0 to 32", self.workers, src)
        if not isinstance(self.network_timeout_s, int | float) or self.network_timeout_s <= 0:
            raise ConfigError("network_timeout_s", "a number of seconds > 0", self.network_timeout_s, src)
        if isinstance(self.acse_timeout_s, bool) or not isinstance(self.acse_timeout_s, int | float) \
                or self.acse_timeout_s <= 0:
            raise ConfigError("acse_timeout_s", "a number of seconds > 0", self.acse_timeout_s, src)
        if not isinstance(self.fast_receive, bool):
            raise ConfigError("fast_receive", "true or false", self.fast_receive, src)
        if not isinstance(self.min_free_mb, int) or self.min_free_mb < 0:
            raise ConfigError("min_free_mb", "an integer number of MiB >= 0", self.min_free_mb, src)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", "one of " + ", ".join(LOG_LEVELS), self.log_level, src)
        if isinstance(self.stable_after, bool) or not isinstance(self.stable_after, int | float) \
                or not 0 < self.stable_after <= 86400:
            raise ConfigError("stable_after", "a number of seconds > 0 (at most 86400)",
                              self.stable_after, src)
        if not isinstance(self.destinations, tuple) or not all(
                isinstance(d, Destination) for d in self.destinations):
            raise ConfigError("destinations", "destination tables", self.destinations, src)
        for i, dest in enumerate(self.destinations):
            dest.check(f"destinations[{i}]", src)
        for key in ("send_backoff_initial_s", "send_backoff_max_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
                raise ConfigError(key, "a number of seconds > 0 (at most 86400)", value, src)
        if self.send_backoff_initial_s > self.send_backoff_max_s:
            raise ConfigError("send_backoff_initial_s", "at most send_backoff_max_s",
                              self.send_backoff_initial_s, src)
        if isinstance(self.stop_grace_s, bool) or not isinstance(self.stop_grace_s, int | float) \
                or not 0 <= self.stop_grace_s <= 3600:
            raise ConfigError("stop_grace_s", "a number of seconds from 0 to 3600",
                              self.stop_grace_s, src)
        if isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int) \
                or not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", "an integer from 0 (off) to 65535", self.metrics_port, src)
        try:
            ipaddress.ip_address(self.metrics_bind)
        except ValueError:
            raise ConfigError("metrics_bind", "an IP address such as 127.0.0.1",
                              self.metrics_bind, src) from None
        tls = {k: getattr(self, k) for k in ("tls_cert", "tls_key", "tls_ca")}
        if any(v is not None for v in tls.values()) and not all(v is not None for v in tls.values()):
            missing = next(k for k, v in tls.items() if v is None)
            raise ConfigError(missing, "a PEM file path (tls_cert, tls_key and tls_ca go together)",
                              None, src)
        for i, dest in enumerate(self.destinations):
            if dest.tls and self.tls_cert is None:
                raise ConfigError(f"destinations[{i}].tls",
                                  "tls_cert, tls_key and tls_ca set (TLS needs the node's certificate)",
                                  True, src)

        if isinstance(self.max_memory_gb, bool) or not isinstance(self.max_memory_gb, int | float) \
                or not 0 <= self.max_memory_gb <= 100000:
            raise ConfigError("max_memory_gb", "a number of GB >= 0 (0 = derived from the machine)",
                              self.max_memory_gb, src)

        self._check_training(src)
        self._check_backend(src)
        self._check_tasks(src)

    def _check_tasks(self, src: str) -> None:
        """Validate ``tasks`` and ``waiting_for_model_max_age_h``."""
        if not isinstance(self.tasks, tuple) or not all(isinstance(t, Task) for t in self.tasks):
            raise ConfigError("tasks", "task tables ([[tasks]])", self.tasks, src)
        if len({t.name for t in self.tasks}) != len(self.tasks):
            raise ConfigError("tasks", "task names that differ", [t.name for t in self.tasks], src)
        age = self.waiting_for_model_max_age_h
        if isinstance(age, bool) or not isinstance(age, int | float) or not 0 < age <= 8760:
            raise ConfigError("waiting_for_model_max_age_h", "a number of hours > 0 (at most 8760)",
                              age, src)

    def _check_backend(self, src: str) -> None:
        """Validate ``backend`` and the ``triton_*`` keys."""
        if self.backend not in BACKENDS:
            raise ConfigError("backend", " or ".join(f'"{b}"' for b in BACKENDS), self.backend, src)
        url = self.triton_url
        if not isinstance(url, str) or (url and (":" not in url or any(c.isspace() for c in url))):
            raise ConfigError("triton_url", "HOST:PORT of Triton's gRPC endpoint, e.g. "
                              "127.0.0.1:8001", url, src)
        if self.backend == "triton" and not url:
            raise ConfigError("triton_url", 'HOST:PORT (backend = "triton" needs it)', url, src)
        if self.triton_variant not in TRITON_VARIANTS:
            raise ConfigError("triton_variant", " or ".join(f'"{v}"' for v in TRITON_VARIANTS),
                              self.triton_variant, src)
        for key in ("triton_timeout_s", "triton_backoff_max_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
                raise ConfigError(key, "a number of seconds > 0 (at most 86400)", value, src)

    def _check_training(self, src: str) -> None:
        """Validate the ``train_*`` keys (nightly learning)."""
        def number(key: str, lo: float, hi: float, what: str, integer: bool = False) -> None:
            v = getattr(self, key)
            kinds = (int,) if integer else (int, float)
            if isinstance(v, bool) or not isinstance(v, kinds) or not lo <= v <= hi:
                raise ConfigError(key, what, v, src)

        if not isinstance(self.train_enabled, bool):
            raise ConfigError("train_enabled", "true or false", self.train_enabled, src)
        if parse_time_of_day(self.train_at) is None:
            raise ConfigError("train_at", "a local time HH:MM or HH:MM:SS (24 h)", self.train_at, src)
        number("train_min_new_series", 1, 100000, "an integer >= 1", integer=True)
        number("train_promote_margin", 0, 0.999, "a Dice difference from 0 to 0.999")
        number("train_time_budget_min", 0.01, 10080, "minutes > 0 (at most a week)")
        number("train_max_epochs", 1, 100000, "an integer >= 1", integer=True)
        number("train_finetune_lr", 1e-9, 0.999, "a learning rate in (0, 1)")
        number("train_scratch_lr", 1e-9, 0.999, "a learning rate in (0, 1)")
        number("train_patch_size", 8, 1024, "an integer number of voxels from 8 to 1024",
               integer=True)
        number("train_validation_fraction", 0.01, 0.99, "a fraction from 0.01 to 0.99")
        number("train_nice", 0, 19, "an integer from 0 to 19", integer=True)
        number("train_min_dice", 0, 1, "a mean Dice from 0 to 1")
        number("train_promote_after_shadow", 0, 100000, "an integer >= 0 (0 = off)", integer=True)
        number("train_shadow_min_agreement", 0, 1, "a Dice from 0 to 1")
        number("drift_baseline_series", 2, 100000, "an integer >= 2", integer=True)
        number("drift_window_series", 2, 100000, "an integer >= 2", integer=True)
        number("drift_psi_threshold", 0.001, 100, "a population stability index > 0")
        if not isinstance(self.train_device, str) or not (
                self.train_device in ("auto", "cpu") or self.train_device.startswith("cuda")):
            raise ConfigError("train_device", "auto, cpu or cuda[:N]", self.train_device, src)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def parse_time_of_day(text: object) -> tuple[int, int, int] | None:
    """``HH:MM`` or ``HH:MM:SS`` as (hour, minute, second); ``None`` if it is not one."""
    if not isinstance(text, str):
        return None
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        return None
    h, m, sec = (int(p) for p in (*parts, "00")[:3])
    if h > 23 or m > 59 or sec > 59:
        return None
    return h, m, sec


# How each key is read from TOML or the environment: (expected, converter).
def _to_path(v: Any) -> Path:
    if not isinstance(v, str) or not v:
        raise TypeError
    return Path(v).expanduser()


def _to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise TypeError
    if isinstance(v, str):
        return int(v.strip())
    if not isinstance(v, int):
        raise TypeError
    return v


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    raise TypeError


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError
    return float(v)


def _to_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError
    return v


def _to_aet_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [p for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError
    return tuple(x.strip() for x in v)


_KEYS: dict[str, tuple[str, Any]] = {
    "ae_title": ("a string", _to_str),
    "port": ("an integer", _to_int),
    "bind_address": ("a string", _to_str),
    "data_dir": ("a directory path (string)", _to_path),
    "allowed_calling_aes": ("a list of AE titles", _to_aet_list),
    "require_called_ae": ("true or false", _to_bool),
    "max_associations": ("an integer", _to_int),
    "max_pdu_size": ("an integer", _to_int),
    "listener_processes": ("an integer", _to_int),
    "workers": ("an integer", _to_int),
    "network_timeout_s": ("a number of seconds", _to_float),
    "acse_timeout_s": ("a number of seconds", _to_float),
    "fast_receive": ("true or false", _to_bool),
    "min_free_mb": ("an integer", _to_int),
    "log_level": ("a string", lambda v: _to_str(v).upper()),
    "stable_after": ("a number of seconds", _to_float),
    "send_backoff_initial_s": ("a number of seconds", _to_float),
    "send_backoff_max_s": ("a number of seconds", _to_float),
    "stop_grace_s": ("a number of seconds", _to_float),
    "metrics_port": ("an integer", _to_int),
    "metrics_bind": ("a string", _to_str),
    "tls_cert": ("a PEM file path (string)", _to_path),
    "tls_key": ("a PEM file path (string)", _to_path),
    "tls_ca": ("a PEM file path (string)", _to_path),
    "destinations": ("an array of tables ([[destinations]])", None),
    "train_enabled": ("true or false", _to_bool),
    "train_at": ("a local time HH:MM or HH:MM:SS", _to_str),
    "train_min_new_series": ("an integer", _to_int),
    "train_promote_margin": ("a number", _to_float),
    "train_time_budget_min": ("a number of minutes", _to_float),
    "train_max_epochs": ("an integer", _to_int),
    "train_finetune_lr": ("a number", _to_float),
    "train_scratch_lr": ("a number", _to_float),
    "train_patch_size": ("an integer", _to_int),
    "train_validation_fraction": ("a number", _to_float),
    "train_device": ("a string", _to_str),
    "train_nice": ("an integer", _to_int),
    "backend": ("a string", _to_str),
    "triton_url": ("a string", _to_str),
    "triton_variant": ("a string", _to_str),
    "triton_timeout_s": ("a number of seconds", _to_float),
    "triton_backoff_max_s": ("a number of seconds", _to_float),
    "tasks": ("an array of tables ([[tasks]])", None),
    "waiting_for_model_max_age_h": ("a number of hours", _to_float),
    "train_min_dice": ("a number", _to_float),
    "train_promote_after_shadow": ("an integer", _to_int),
    "train_shadow_min_agreement": ("a number", _to_float),
    "drift_baseline_series": ("an integer", _to_int),
    "drift_window_series": ("an integer", _to_int),
    "drift_psi_threshold": ("a number", _to_float),
    "max_memory_gb": ("a number of GB", _to_float),
}


def _convert(key: str, value: Any, source: str) -> Any:
    expected, conv = _KEYS[key]
    if key == "destinations":
        return _to_destinations(value, source)
    if key == "tasks":
        return parse_tasks(value, source)
    try:
        return conv(value)
    except (TypeError, ValueError):
        raise ConfigError(key, expected, value, source) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read and syntax-check a configuration file.

    Raises
    ------
    ConfigError
        If the file is missing, unreadable or not valid TOML.
    """
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", "an existing TOML file", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(syntax)", f"valid TOML ({exc})", source=str(path)) from None
    except OSError as exc:
        raise ConfigError("--config", f"a readable file ({exc.strerror})", str(path)) from None


def load_settings(
    config_path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from the file, the environment and flag overrides.

    Parameters
    ----------
    config_path : path, optional
        TOML file; when ``None``, ``DICOM_NODE_CONFIG`` from ``env`` is used if set.
    env : mapping, optional
        Environment variables (defaults to ``os.environ``).
    overrides : mapping, optional
        Values from command-line flags; ``None`` values are ignored.

    Raises
    ------
    ConfigError
        Naming the first wrong key and what it expects.
    """
    import os

    env = os.environ if env is None else env
    if config_path is None and env.get(ENV_PREFIX + "CONFIG"):
        config_path = env[ENV_PREFIX + "CONFIG"]
    values: dict[str, Any] = {}
    source = ""
    if config_path is not None:
        path = Path(config_path).expanduser()
        source = str(path)
        for key, value in read_toml(path).items():
            if key not in _KEYS:
                known = ", ".join(sorted(_KEYS))
                raise ConfigError(key, f"no such key (known keys: {known})", source=source)
            values[key] = _convert(key, value, source)
        values["config_path"] = path
    for key in ENV_KEYS:
        name = ENV_PREFIX + key.upper()
        if env.get(name):
            values[key] = _convert(key, env[name], f"environment variable {name}")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _convert(key, value, "command line") if key in _KEYS else value
    try:
        return Settings(**values)
    except ConfigError as exc:
        if not exc.source and source:
            raise ConfigError(exc.key, exc.expected, exc.got, source) from None
        raise
