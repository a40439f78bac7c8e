"""One typed settings object, loaded once and passed down.

Sources, later ones winning: built-in defaults, the TOML file (``--config`` or
``DICOM_NODE_CONFIG``), environment variables (``DICOM_NODE_DATA_DIR``,
``DICOM_NODE_PORT``, ``DICOM_NODE_AE_TITLE``, ``DICOM_NODE_LOG_LEVEL``), command-line
flags. Every mistake is reported as one :class:`~dicom_node.foundation.errors.ConfigError` line
naming the key and what is expected.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from dicom_node.foundation.errors import ConfigError
from dicom_node.profiles import DEFAULT_TRANSFER_SYNTAXES, check_transfer_syntaxes
from dicom_node.tasks import Task, default_tasks, parse_tasks
from pipelines.types import SEG_TYPES

DEFAULT_DATA_DIR = Path("/var/lib/dicom-node")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_PREFIX = "DICOM_NODE_"
#: What a destination may receive: the SEG, the SR, the overlay series and the RTSTRUCT.
RESULT_KINDS = ("seg", "sr", "overlay", "rtstruct")
#: What a destination receives when its ``send`` is not given (RTSTRUCT only when asked).
DEFAULT_SEND = ("seg", "sr", "overlay")
_SEND_TEXT = 'a non-empty list of "seg", "sr", "overlay", "rtstruct"'
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
    """A DICOM node that receives results (normally the PACS): by DIMSE C-STORE
    (``ae_title``, ``host``, ``port``) or by DICOMweb STOW-RS (``url``).

    Parameters
    ----------
    ae_title : str
        Its AE title (1-16 characters); DIMSE only.
    host : str
        Host name or IP address; DIMSE only.
    port : int
        Its DICOM port (1-65535); DIMSE only.
    url : str
        The DICOMweb base (``https://archive.example/dicom-web``; STOW-RS posts to
        ``URL/studies``); instead of ``ae_title``, ``host`` and ``port``.
    auth : str
        ``none``, ``basic`` (``username`` and ``password_file``) or ``bearer``
        (``token_file``); DICOMweb only. The files are read at each request.
    username : str
        User name of ``basic`` authentication.
    password_file, token_file : pathlib.Path or None
        File holding the password (``basic``) or the token (``bearer``).
    tls_ca : pathlib.Path or None
        PEM CA bundle that verifies an ``https`` destination (default: the system's).
    confirm : str
        ``commitment`` (Storage Commitment, DIMSE; the default there), ``read-back``
        (QIDO-RS of what was stored, DICOMweb; the default there) or ``none``: a send is
        ``confirmed`` once the archive said it keeps the object.
    send : tuple of str
        Which results it wants, any of ``seg``, ``sr``, ``overlay``, ``rtstruct``
        (default the first three).
    tls : bool
        Send over DICOM TLS (PS3.15 B.1), with the node's ``tls_cert``/``tls_key`` as
        client certificate and ``tls_ca`` to verify the destination (default false).
    name : str
        Its name in ``dicom-node destinations test NAME`` (default: the AE title, or the
        URL's host for DICOMweb).
    transfer_syntaxes : tuple of str
        Transfer syntaxes it accepts, most preferred first, as aliases or UIDs (see
        :mod:`dicom_node.profiles`); stored as UIDs. At least one uncompressed
        (default: explicit, then implicit VR little endian).
    seg_type : str
        ``binary`` (default: Segmentation Storage, which every PACS takes) or
        ``labelmap`` (Label Map Segmentation Storage: one frame per slice, much smaller
        with many labels). Each destination gets the SEG of its type, and the SR that
        references that SEG: a job writes one SEG (and SR) per type its destinations
        ask for (:func:`job_seg_types`), shares everything else (overlay, RTSTRUCT).
    query : bool
        Also ask it for a patient's prior studies (Query/Retrieve, :mod:`dicom_node.wire.priors`;
        default false).
    retrieve : str
        How priors are retrieved from it: ``move`` (C-MOVE to the node's AE title; the
        PACS must know the node) or ``get`` (C-GET on the query's association).
    """

    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""
    auth: str = "none"
    username: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    tls_ca: Path | None = None
    confirm: str = ""
    send: tuple[str, ...] = DEFAULT_SEND
    tls: bool = False
    name: str = ""
    transfer_syntaxes: tuple[str, ...] = DEFAULT_TRANSFER_SYNTAXES
    seg_type: str = "binary"
    query: bool = False
    retrieve: str = "move"

    def __post_init__(self) -> None:
        self._defaults()
        self.check("destinations", "")

    def _defaults(self) -> None:
        if not self.name:
            name = (self.ae_title.strip() if isinstance(self.ae_title, str) and not self.url
                    else _url_host(self.url))
            object.__setattr__(self, "name", name)
        if not self.confirm:
            object.__setattr__(self, "confirm", "read-back" if self.url else "commitment")

    @property
    def web(self) -> bool:
        """True for a DICOMweb (STOW-RS) destination."""
        return bool(self.url)

    def check(self, key: str, source: str) -> None:
        """Validate each field, naming ``key.field`` in the error.

        Raises
        ------
        ConfigError
            On the first invalid field.
        """
        if self.url:
            _check_web(self, key, source)
        else:
            _check_dimse(self, key, source)
        if (not isinstance(self.send, tuple) or not self.send
                or not all(k in RESULT_KINDS for k in self.send) or len(set(self.send)) != len(self.send)):
            raise ConfigError(f"{key}.send", _SEND_TEXT,
                              list(self.send) if isinstance(self.send, tuple) else self.send, source)
        if self.seg_type not in SEG_TYPES:
            raise ConfigError(f"{key}.seg_type", " or ".join(f'"{t}"' for t in SEG_TYPES),
                              self.seg_type, source)
        if not isinstance(self.query, bool):
            raise ConfigError(f"{key}.query", "true or false", self.query, source)
        if self.retrieve not in ("move", "get"):
            raise ConfigError(f"{key}.retrieve", '"move" or "get"', self.retrieve, source)
        if self.url and self.query:
            raise ConfigError(f"{key}.query", "absent with url (priors are queried over DIMSE: "
                              "C-FIND, C-MOVE or C-GET)", self.query, source)
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
        """``AET@HOST:PORT`` (or the DICOMweb URL), the destination's name in queues and logs."""
        return self.url.rstrip("/") if self.url else f"{self.ae_title}@{self.host}:{self.port}"


#: What ``confirm`` may be, per kind of destination.
CONFIRM_DIMSE = ("commitment", "none")
CONFIRM_WEB = ("read-back", "none")
AUTH_MODES = ("none", "basic", "bearer")


def _url_host(url: object) -> str:
    """The host of a URL as a destination name (letters, digits, '-', '_', '.')."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname if isinstance(url, str) else None
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in (host or "dicomweb"))[:64]


def _check_dimse(d: Destination, key: str, source: str) -> None:
    _check_ae_title(f"{key}.ae_title", d.ae_title, source)
    if not isinstance(d.host, str) or not d.host.strip() or any(c.isspace() for c in d.host):
        raise ConfigError(f"{key}.host", "a host name or IP address", d.host, source)
    if isinstance(d.port, bool) or not isinstance(d.port, int) or not 1 <= d.port <= 65535:
        raise ConfigError(f"{key}.port", "an integer from 1 to 65535", d.port, source)
    if not isinstance(d.tls, bool):
        raise ConfigError(f"{key}.tls", "true or false", d.tls, source)
    for name in ("auth", "username", "password_file", "token_file", "tls_ca"):
        if getattr(d, name) not in (None, "", "none"):
            raise ConfigError(f"{key}.{name}", "only with url (a DICOMweb destination)",
                              getattr(d, name), source)
    if d.confirm not in CONFIRM_DIMSE:
        raise ConfigError(f"{key}.confirm", '"commitment" or "none" (DIMSE)', d.confirm, source)


def _check_web(d: Destination, key: str, source: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(d.url) if isinstance(d.url, str) else None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.username or parts.query or any(c.isspace() for c in d.url)):
        raise ConfigError(f"{key}.url", "an http(s) URL of the DICOMweb base without credentials, "
                          "e.g. https://archive.example/dicom-web", d.url, source)
    for name in ("ae_title", "host"):
        if getattr(d, name):
            raise ConfigError(f"{key}.{name}", "absent with url (a DICOMweb destination)",
                              getattr(d, name), source)
    if d.port or d.tls:
        raise ConfigError(f"{key}.{'port' if d.port else 'tls'}",
                          "absent with url (https:// is TLS)", d.port or d.tls, source)
    if d.auth not in AUTH_MODES:
        raise ConfigError(f"{key}.auth", '"none", "basic" or "bearer"', d.auth, source)
    needs = {"basic": ("username", "password_file"), "bearer": ("token_file",)}.get(d.auth, ())
    for name in ("username", "password_file", "token_file"):
        value = getattr(d, name)
        if name in needs and not value:
            raise ConfigError(f"{key}.{name}", f"a value (auth = \"{d.auth}\" needs it)", value, source)
        if name not in needs and value:
            raise ConfigError(f"{key}.{name}", f"absent (auth = \"{d.auth}\")", value, source)
    for name in ("password_file", "token_file", "tls_ca"):
        if getattr(d, name) is not None and not isinstance(getattr(d, name), Path):
            raise ConfigError(f"{key}.{name}", "a file path", getattr(d, name), source)
    if d.tls_ca is not None and parts.scheme != "https":
        raise ConfigError(f"{key}.tls_ca", "only with an https:// url", str(d.tls_ca), source)
    if tuple(d.transfer_syntaxes) != DEFAULT_TRANSFER_SYNTAXES:  # STOW-RS posts the files as kept
        raise ConfigError(f"{key}.transfer_syntaxes", "absent with url (the files are posted in "
                          "the syntax they are kept in)", list(d.transfer_syntaxes), source)
    if d.confirm not in CONFIRM_WEB:
        raise ConfigError(f"{key}.confirm", '"read-back" or "none" (DICOMweb)', d.confirm, source)


def job_seg_types(destinations: Sequence[Destination]) -> tuple[str, ...]:
    """The SEG types a job writes for ``destinations``, in :data:`SEG_TYPES` order: each
    type a destination that takes the SEG asks for (``binary`` alone when none takes it:
    the twin keeps a SEG, and the SR needs one to reference).

    One SEG, and one SR referencing it, per type; :func:`seg_type_for` says which a
    destination receives."""
    wanted = {d.seg_type for d in destinations if "seg" in d.send}
    return tuple(t for t in SEG_TYPES if t in wanted) or (SEG_TYPES[0],)


def seg_type_for(destination: Destination, written: Sequence[str]) -> str:
    """The type of the SEG (and of the SR that references it) ``destination`` receives
    of a result whose SEGs are of the types ``written``: its own ``seg_type`` when one
    was written (always, for a destination that takes the SEG), else the first (a
    destination that takes the SR without the SEG, or a result recorded before its
    ``seg_type`` was configured).

    Raises
    ------
    ValueError
        If ``written`` is empty.
    """
    if not written:
        raise ValueError("written must name at least one SEG type")
    return destination.seg_type if destination.seg_type in written else written[0]


def resolve_forward(text: str, destinations: Sequence[Destination], source: str = ""
                    ) -> Destination:
    """The destination ``forward_mpps`` names: a destination's ``name``, or ``AET@HOST:PORT``.

    Raises
    ------
    ConfigError
        If it is neither.
    """
    for dest in destinations:
        if dest.name == text:
            return dest
    if "@" not in text:
        raise ConfigError("forward_mpps", "AET@HOST:PORT or the name of a destination ("
                          + (", ".join(d.name for d in destinations) or "none configured") + ")",
                          text, source)
    try:
        return parse_destination(text, source)
    except ConfigError as exc:
        raise ConfigError("forward_mpps", exc.expected, text, source) from None


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
    dest = _unchecked(ae_title=aet.strip(), host=host, port=port_number, name=aet.strip())
    dest.check("--destination", source)
    return dest


def _unchecked(**values: Any) -> Destination:
    """A :class:`Destination` with ``values`` over the defaults, not yet checked (the
    caller checks it naming its own key)."""
    dest = Destination.__new__(Destination)
    for f in dataclasses.fields(Destination):
        default = f.default if f.default is not dataclasses.MISSING else None
        object.__setattr__(dest, f.name, values.get(f.name, default))
    dest._defaults()  # noqa: SLF001 - its own class's step
    return dest


#: The keys of a ``[[destinations]]`` table: the fields of :class:`Destination`.
_DEST_KEYS = tuple(f.name for f in dataclasses.fields(Destination))


def _table_values(table: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """The fields of one ``[[destinations]]`` table, read (lists as tuples, paths)."""
    for name in table:
        if name not in _DEST_KEYS:
            raise ConfigError(f"{key}.{name}", f"no such key (known keys: {', '.join(_DEST_KEYS)})",
                              source=source)
    required = ("url",) if "url" in table else ("ae_title", "host", "port")
    for name in required:
        if name not in table:
            raise ConfigError(f"{key}.{name}", "a value (the key is required; or url for "
                              "DICOMweb)", source=source)
    for name, what in (("send", _SEND_TEXT),
                       ("transfer_syntaxes", "a list of transfer syntaxes")):
        if name in table and not isinstance(table[name], list):
            raise ConfigError(f"{key}.{name}", what, table[name], source)
    values = dict(table)
    for name in ("send", "transfer_syntaxes"):
        if name in values:
            values[name] = tuple(values[name])
    for name in ("password_file", "token_file", "tls_ca"):
        if name in values:
            try:
                values[name] = _to_path(values[name])
            except TypeError:
                raise ConfigError(f"{key}.{name}", "a file path (string)", values[name], source) from None
    if isinstance(values.get("ae_title"), str):
        values["ae_title"] = values["ae_title"].strip()
    return values


def _to_destinations(v: Any, source: str) -> tuple[Destination, ...]:
    if not isinstance(v, list):
        raise ConfigError("destinations", "an array of tables ([[destinations]])", v, source)
    out: list[Destination] = []
    for i, table in enumerate(v):
        key = f"destinations[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(key, "a table with ae_title, host, port (or url) and send", table, source)
        dest = _unchecked(**_table_values(table, key, source))
        dest.check(key, source)
        if any(d.name == dest.name for d in out):
            raise ConfigError(f"{key}.name", "a name no other destination has (defaults to the "
                              "AE title)", dest.name, source)
        if any(d.key == dest.key for d in out):  # the queue keeps one row per object and key
            raise ConfigError(key, "a destination no other table names (AET@HOST:PORT or url)",
                              dest.key, source)
        out.append(dest)
    return tuple(out)


# ---------------------------------------------------------------- one declaration per key
@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    """What a setting's value must be, and the words an error uses for it.

    Parameters
    ----------
    expected : str
        What the key must hold, in the error message and the README's table.
    test : callable, optional
        ``value -> bool``; a false result raises ``ConfigError(key, expected, value)``.
    custom : callable, optional
        ``(key, value, source) -> None`` that raises its own :class:`ConfigError` (AE
        titles, destinations, tasks: keys with several messages or indexed sub-keys).
    """

    expected: str
    test: Callable[[Any], bool] | None = None
    custom: Callable[[str, Any, str], object] | None = None

    def __call__(self, key: str, value: Any, source: str) -> None:
        """Raise :class:`ConfigError` naming ``key`` when ``value`` does not pass."""
        if self.custom is not None:
            self.custom(key, value, source)
        elif self.test is not None and not self.test(value):
            raise ConfigError(key, self.expected, value, source)


@dataclass(frozen=True, kw_only=True, slots=True)
class Key:
    """The one declaration of a setting: how it is read, checked and documented.

    Parameters
    ----------
    read : callable
        ``(value, source) -> value``: a TOML or environment value as the field's type;
        ``TypeError``/``ValueError`` become ``ConfigError(key, read_as, value)``.
    read_as : str
        What ``read`` expects, in words (``an integer``).
    check : Check or None
        What the value must be once read (also for ``Settings(...)`` in code).
    doc : str
        What the setting does (the class docstring and the README's table).
    env : bool
        Also read from ``DICOM_NODE_<KEY>``.
    shown : str
        The default as the README shows it (default: derived from the field).
    """

    read: Callable[[Any, str], Any]
    read_as: str
    check: Check | None
    doc: str
    env: bool = False
    shown: str = ""


def _setting(default: Any = dataclasses.MISSING, *, read: Callable[[Any, str], Any], read_as: str,
             doc: str, check: Check | None = None, env: bool = False, shown: str = "",
             default_factory: Any = dataclasses.MISSING) -> Any:
    """A :class:`Settings` field carrying its :class:`Key` (its only declaration)."""
    key = Key(read=read, read_as=read_as, check=check, doc=doc, env=env, shown=shown)
    return field(default=default, default_factory=default_factory, metadata={"key": key})


def _integer(lo: float, hi: float, expected: str = "") -> Check:
    """An integer from ``lo`` to ``hi`` (``expected`` says so unless given)."""
    return Check(expected=expected or f"an integer from {lo} to {hi}",
                 test=lambda v: not isinstance(v, bool) and isinstance(v, int) and lo <= v <= hi)


def _number(lo: float, hi: float, expected: str, *, above: bool = False) -> Check:
    """A number from ``lo`` (exclusive when ``above``) to ``hi``."""
    return Check(expected=expected, test=lambda v: not isinstance(v, bool)
                 and isinstance(v, int | float) and (lo < v if above else lo <= v) and v <= hi)


def _one_of(options: Sequence[str], expected: str) -> Check:
    return Check(expected=expected, test=lambda v: v in options)


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _check_aet_list(key: str, value: Any, source: str) -> None:
    for i, aet in enumerate(value):
        _check_ae_title(f"{key}[{i}]", aet, source)


def _check_destinations(key: str, value: Any, source: str) -> None:
    if not isinstance(value, tuple) or not all(isinstance(d, Destination) for d in value):
        raise ConfigError(key, "destination tables", value, source)
    for i, dest in enumerate(value):
        dest.check(f"{key}[{i}]", source)


def _check_tasks(key: str, value: Any, source: str) -> None:
    if not isinstance(value, tuple) or not all(isinstance(t, Task) for t in value):
        raise ConfigError(key, "task tables ([[tasks]])", value, source)
    if len({t.name for t in value}) != len(value):
        raise ConfigError(key, "task names that differ", [t.name for t in value], source)


def _triton_url_ok(url: object) -> bool:
    return isinstance(url, str) and not (url and (":" not in url or any(c.isspace() for c in url)))


def _train_device_ok(device: object) -> bool:
    return isinstance(device, str) and (device in ("auto", "cpu") or device.startswith("cuda"))


_FLAG = Check(expected="true or false", test=lambda v: isinstance(v, bool))
_SECONDS_POSITIVE = _number(0, math.inf, "a number of seconds > 0", above=True)
_SECONDS_DAY = _number(0, 86400, "a number of seconds > 0 (at most 86400)", above=True)
_AET = Check(expected="an AE title: 1-16 printable ASCII characters, no backslash",
             custom=_check_ae_title)


# How each key is read from TOML or the environment (the source names where a table was).
def _to_path(v: Any, source: str = "") -> Path:
    if not isinstance(v, str) or not v:
        raise TypeError
    return Path(v).expanduser()


def _to_int(v: Any, source: str = "") -> int:
    if isinstance(v, bool):
        raise TypeError
    if isinstance(v, str):
        return int(v.strip())
    if not isinstance(v, int):
        raise TypeError
    return v


def _to_bool(v: Any, source: str = "") -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    raise TypeError


def _to_float(v: Any, source: str = "") -> float:
    if isinstance(v, bool):
        raise TypeError
    return float(v)


def _to_days_or_forever(v: Any) -> float | None:
    if isinstance(v, str) and v.strip().lower() == "forever":
        return None
    return _to_float(v)


def _to_str(v: Any, source: str = "") -> str:
    if not isinstance(v, str):
        raise TypeError
    return v


def _to_upper(v: Any, source: str = "") -> str:
    return _to_str(v).upper()


def _to_aet_list(v: Any, source: str = "") -> tuple[str, ...]:
    if isinstance(v, str):
        v = [p for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError
    return tuple(x.strip() for x in v)


class _Reading(TypedDict):
    """How a kind of key is read (spread into :func:`_setting`)."""

    read: Callable[[Any, str], Any]
    read_as: str


class _CheckedReading(_Reading):
    """A kind of key read and checked one way (a flag)."""

    check: Check


_INT: _Reading = {"read": _to_int, "read_as": "an integer"}
_SECONDS: _Reading = {"read": _to_float, "read_as": "a number of seconds"}
_NUMBER: _Reading = {"read": _to_float, "read_as": "a number"}
_STR: _Reading = {"read": _to_str, "read_as": "a string"}
_BOOL: _CheckedReading = {"read": _to_bool, "read_as": "true or false", "check": _FLAG}


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    # The docstring is built from each field's Key (below the class): one declaration.
    ae_title: str = _setting("DICOM_NODE", **_STR, check=_AET, env=True,
                             doc="The node's own AE title (1-16 characters).")
    port: int = _setting(
        11112, **_INT, env=True, check=_integer(0, 65535),
        doc="TCP port of the DICOM listener (0 picks a free port; 104 needs a capability).")
    bind_address: str = _setting(
        "0.0.0.0", **_STR, check=Check(expected="an IP address such as 0.0.0.0 or 127.0.0.1",
                                       test=_is_ip),
        doc="Address the listener binds to.")
    data_dir: Path = _setting(DEFAULT_DATA_DIR, read=_to_path, read_as="a directory path (string)",
                              env=True, doc="Root of the archive, the queues and the model registry.")
    allowed_calling_aes: tuple[str, ...] = _setting(
        (), read=_to_aet_list, read_as="a list of AE titles",
        check=Check(expected="a list of AE titles (1-16 printable ASCII characters each)",
                    custom=_check_aet_list),
        doc="Calling AE titles allowed to associate; empty accepts every caller (a warning "
            "is logged at start).")
    require_called_ae: bool = _setting(
        False, **_BOOL, doc="Reject associations whose Called AE Title is not ``ae_title``.")
    max_associations: int = _setting(16, **_INT, check=_integer(1, 1000),
                                     doc="Associations served at once.")
    max_associations_per_host: int = _setting(
        8, **_INT, check=_integer(1, 1000),
        doc="Associations served at once for one peer address, and connections from it that "
            "have not finished their association request; beyond it that peer's requests are "
            "rejected (transient, local limit) and its further connections closed, while other "
            "peers are served. A connection counts against ``max_associations`` only once its "
            "association request has arrived. Per listener process.")
    max_pdu_size: int = _setting(
        0, **_INT, check=_integer(0, math.inf, "an integer >= 0 (0 = no limit)"),
        doc="Largest PDU the node accepts, bytes (0 = no limit); a larger P-DATA PDU is "
            "aborted at its header.")
    listener_processes: int = _setting(
        1, **_INT, check=_integer(1, 16),
        doc="Processes that accept DICOM associations on the one listening socket (the least "
            "busy takes each new association), 1-16. More than one lets parallel associations "
            "use more than one CPU core (one Python process stores on one core at a time); the "
            "extra ones are lean (no inference) and are started and stopped with the node. See "
            "``benchmarks/README.md``.")
    workers: int = _setting(
        1, **_INT, check=_integer(0, 32),
        doc="Inference worker processes, 0-32. Each claims jobs from the queue and runs them "
            "(torch and the model live in the workers, never in the DICOM listener); a worker "
            "that dies gives its job back and is restarted with back-off. 0: no inference here "
            "(jobs stay queued). Each worker holds its own copy of the models in memory.")
    network_timeout_s: float = _setting(
        60.0, **_SECONDS, check=_SECONDS_POSITIVE,
        doc="Seconds of silence after which an association is aborted; also the longest a PDU "
            "(or an A-ASSOCIATE-RQ) may take to arrive once it has begun.")
    acse_timeout_s: float = _setting(
        10.0, **_SECONDS, check=_SECONDS_POSITIVE,
        doc="Seconds a new connection has to send its association request; a connection that "
            "sends nothing is closed after it.")
    fast_receive: bool = _setting(
        True, **_BOOL,
        doc="Receive C-STOREs on the node's fast path (:mod:`dicom_node.wire.fast_receive`, which "
            "reaches into pynetdicom's internals) or, false, on plain pynetdicom. A pynetdicom "
            "whose internals changed is detected at start and served plainly.")
    min_free_mb: int = _setting(
        1024, **_INT, check=_integer(0, math.inf, "an integer number of MiB >= 0"),
        doc="Free space (MiB) kept in reserve on the data directory; below it C-STOREs are "
            "refused with A700 (out of resources).")
    log_level: str = _setting(
        "INFO", read=_to_upper, read_as="a string", env=True,
        check=_one_of(LOG_LEVELS, "one of " + ", ".join(LOG_LEVELS)),
        doc="One of DEBUG, INFO, WARNING, ERROR.")
    config_path: Path | None = None  # the file these settings were read from, if any
    stable_after: float = _setting(
        30.0, **_SECONDS, env=True, check=_SECONDS_DAY,
        doc="Seconds without a new instance after which a series is complete and its "
            "inference job is queued.")
    early_guard_s: float = _setting(
        0.2, **_SECONDS, check=_number(0, 60, "a number of seconds from 0 to 60"),
        doc="A series that reaches the size its scanner and protocol were learned to make (or "
            "its Images in Acquisition) is complete once no instance arrived for this long, "
            "instead of ``stable_after``. An MPPS COMPLETED whose instances are all in needs no "
            "guard.")
    learn_from_series: int = _setting(
        2, **_INT, check=_integer(0, 100, "an integer from 0 (learn nothing) to 100"),
        doc="A scanner (calling AE and station) and protocol (series description, frames per "
            "instance, temporal positions) has a learned size once its last this many series, "
            "each complete by the quiet period or MPPS, had the same number of instances; its "
            "next series of that size completes early. 0 turns learned sizes off (Images in "
            "Acquisition still counts).")
    early_reopen_limit: int = _setting(
        3, **_INT, check=_integer(1, 1000000, "an integer >= 1"),
        doc="A scanner whose series completed early were re-opened by later instances this "
            "many times loses its early start: its series wait for ``stable_after`` (MPPS "
            "COMPLETED still counts). Re-opens per scanner are in ``status`` and ``/metrics``.")
    forward_mpps: str = _setting(
        "", **_STR, check=Check(expected='"" (off), AET@HOST:PORT, or the name of a destination',
                                 test=lambda v: isinstance(v, str) and len(v) <= 200),
        doc="Where MPPS N-CREATEs and N-SETs received are passed on, in order, durably, with "
            "retries (the node may sit between scanner and PACS): ``AET@HOST:PORT`` or the "
            "``name`` of a ``[[destinations]]`` table; empty passes nothing on.")
    destinations: tuple[Destination, ...] = _setting(
        (), read=lambda v, source: _to_destinations(v, source),
        read_as="an array of tables ([[destinations]])", shown="none",
        check=Check(expected="destination tables", custom=_check_destinations),
        doc="Where results are sent (``[[destinations]]`` tables with ``ae_title``, ``host``, "
            "``port``, ``send`` (``seg``, ``sr``, ``overlay``, ``rtstruct``; default the first "
            "three), ``tls``, ``name``, ``transfer_syntaxes``, ``seg_type`` (``binary`` or "
            "``labelmap``: the SEG it gets, with the SR of that SEG), ``confirm``, ``query`` "
            "and ``retrieve`` (``move`` or ``get``: priors from this PACS); or, for DICOMweb "
            "STOW-RS, ``url``, ``auth``, "
            "``username``, ``password_file``, ``token_file``, ``tls_ca`` instead of "
            "``ae_title``, ``host``, ``port``, ``tls``; ``--destination``).")
    send_backoff_initial_s: float = _setting(
        2.0, **_SECONDS, check=_SECONDS_DAY,
        doc="First delay before re-sending to a destination that cannot be reached, seconds.")
    send_backoff_max_s: float = _setting(
        300.0, **_SECONDS, check=_SECONDS_DAY,
        doc="Cap of the doubling of that delay, seconds.")
    confirm_timeout_s: float = _setting(
        60.0, **_SECONDS, check=_SECONDS_DAY,
        doc="Seconds an acknowledged object waits for its confirmation (Storage Commitment "
            "report, DICOMweb read-back) of a destination with ``confirm`` other than "
            "``none``; then it is sent again.")
    confirm_resends: int = _setting(
        3, **_INT, check=_integer(0, 100),
        doc="Times an unconfirmed (or reported failed) object is sent again before it is "
            "held with the reason.")
    stop_grace_s: float = _setting(
        20.0, **_SECONDS, check=_number(0, 3600, "a number of seconds from 0 to 3600"),
        doc="On SIGTERM, seconds the associations in progress get to finish before they are "
            "aborted (an instance not yet answered is not acknowledged, so nothing acknowledged "
            "is lost). Keep it below the unit's ``TimeoutStopSec``.")
    metrics_port: int = _setting(
        0, **_INT, env=True, check=_integer(0, 65535, "an integer from 0 (off) to 65535"),
        doc="Port of the HTTP endpoint with ``/healthz`` and Prometheus ``/metrics``; 0 turns "
            "it off.")
    metrics_bind: str = _setting(
        "127.0.0.1", **_STR, check=Check(expected="an IP address such as 127.0.0.1", test=_is_ip),
        doc="Address of that endpoint (127.0.0.1: this machine only).")
    tls_cert: Path | None = _setting(
        None, read=_to_path, read_as="a PEM file path (string)",
        doc="PEM certificate of the node. When ``tls_cert``, ``tls_key`` and ``tls_ca`` are set "
            "(all three or none) the DICOM listener speaks TLS only and refuses a client "
            "without a certificate signed by ``tls_ca``; destinations with ``tls = true`` are "
            "sent to over TLS with the same certificate.")
    tls_key: Path | None = _setting(None, read=_to_path, read_as="a PEM file path (string)",
                                    doc="PEM private key of the node (see ``tls_cert``).")
    tls_ca: Path | None = _setting(None, read=_to_path, read_as="a PEM file path (string)",
                                   doc="PEM bundle of the CAs the node trusts (see ``tls_cert``).")
    train_enabled: bool = _setting(True, **_BOOL,
                                   doc="Whether ``serve`` schedules the nightly training.")
    train_at: str = _setting(
        "02:00", read=_to_str, read_as="a local time HH:MM or HH:MM:SS",
        check=Check(expected="a local time HH:MM or HH:MM:SS (24 h)",
                    test=lambda v: parse_time_of_day(v) is not None),
        doc="Local time of the nightly training, ``HH:MM`` or ``HH:MM:SS``.")
    train_min_new_series: int = _setting(
        5, **_INT, check=_integer(1, 100000, "an integer >= 1"),
        doc="A task is trained only when it gained at least this many labelled series of "
            "donating patients since its last training.")
    train_promote_margin: float = _setting(
        0.01, **_NUMBER, check=_number(0, 0.999, "a Dice difference from 0 to 0.999"),
        doc="A candidate is promoted only when its mean validation Dice exceeds the active "
            "version's by more than this.")
    train_time_budget_min: float = _setting(
        120.0, read=_to_float, read_as="a number of minutes",
        check=_number(0.01, 10080, "minutes > 0 (at most a week)"),
        doc="Wall-clock budget of one task's training, minutes.")
    train_max_epochs: int = _setting(100, **_INT, check=_integer(1, 100000, "an integer >= 1"),
                                     doc="Upper bound of epochs of one training.")
    train_min_patches_per_epoch: int = _setting(
        160, **_INT, check=_integer(0, 10_000_000, "an integer >= 0"),
        doc="Fewest training patches of an epoch: with few labelled series the volumes "
            "are visited again, so that the time budget, not the epoch cap, ends a run "
            "(0: one visit of each volume).")
    train_finetune_lr: float = _setting(
        1e-4, **_NUMBER, check=_number(1e-9, 0.999, "a learning rate in (0, 1)"),
        doc="Learning rate when fine-tuning the active version.")
    train_scratch_lr: float = _setting(
        1e-3, **_NUMBER, check=_number(1e-9, 0.999, "a learning rate in (0, 1)"),
        doc="Learning rate when training from scratch.")
    train_patch_size: int = _setting(
        96, **_INT, check=_integer(8, 1024, "an integer number of voxels from 8 to 1024"),
        doc="Edge of the cubic training patch on the model grid, voxels.")
    train_validation_fraction: float = _setting(
        0.2, **_NUMBER, check=_number(0.01, 0.99, "a fraction from 0.01 to 0.99"),
        doc="Share of patients held out for validation.")
    train_device: str = _setting(
        "auto", **_STR, check=Check(expected="auto, cpu or cuda[:N]", test=_train_device_ok),
        doc="``auto`` (CUDA when available), ``cpu`` or ``cuda``.")
    train_nice: int = _setting(10, **_INT, check=_integer(0, 19),
                               doc="Niceness of the training subprocess, 0-19.")
    backend: str = _setting(
        "local", **_STR, check=_one_of(BACKENDS, " or ".join(f'"{b}"' for b in BACKENDS)),
        doc="``local`` (the fastest verified backend of this machine) or ``triton``: the "
            "sliding-window batches go to the Triton Inference Server at ``triton_url``; pre- "
            "and post-processing stay in the node.")
    triton_url: str = _setting(
        "", **_STR, check=Check(expected="HOST:PORT of Triton's gRPC endpoint, e.g. "
                                "127.0.0.1:8001", test=_triton_url_ok),
        doc="Triton's gRPC address ``HOST:PORT`` (its default port is 8001); needed with "
            "``backend = \"triton\"``.")
    triton_variant: str = _setting(
        "onnx", **_STR,
        check=_one_of(TRITON_VARIANTS, " or ".join(f'"{v}"' for v in TRITON_VARIANTS)),
        doc="Which model of ``models export-triton`` Triton serves: ``onnx`` (``<version>``, "
            "ONNX Runtime backend, TensorRT on GPUs) or ``python`` (``<version>-python``, "
            "Python backend with ONNX Runtime).")
    triton_timeout_s: float = _setting(60.0, **_SECONDS, check=_SECONDS_DAY,
                                       doc="Deadline of one request to Triton, seconds.")
    triton_backoff_max_s: float = _setting(
        60.0, **_SECONDS, check=_SECONDS_DAY,
        doc="Triton down or the model missing: the job waits 2 s, then twice as long each time, "
            "up to this many seconds between tries; waiting never counts as a failed attempt.")
    tasks: tuple[Task, ...] = _setting(
        default_factory=default_tasks, read=lambda v, source: parse_tasks(v, source),
        read_as="an array of tables ([[tasks]])", shown="`default_tasks.toml`",
        check=Check(expected="task tables ([[tasks]])", custom=_check_tasks),
        doc="The tasks served (``[[tasks]]`` tables, :mod:`dicom_node.tasks`); without any, "
            "those of the shipped ``default_tasks.toml`` (``spleen-ct``). Reloaded on SIGHUP.")
    waiting_for_model_max_age_h: float = _setting(
        24.0, read=_to_float, read_as="a number of hours",
        check=_number(0, 8760, "a number of hours > 0 (at most 8760)", above=True),
        doc="A job whose task has no active model for the series' scanner waits for one; when "
            "a model becomes active, series received within this many hours run, older ones "
            "are left failed.")
    train_min_dice: float = _setting(
        0.7, **_NUMBER, check=_number(0, 1, "a mean Dice from 0 to 1"),
        doc="Quality floor: a trained candidate whose mean validation Dice is below it is "
            "never promoted, even when the task has no active version. A task's own "
            "``min_dice`` overrides it (:func:`dicom_node.learning.training.nightly_config`).")
    train_promote_after_shadow: int = _setting(
        0, **_INT, check=_integer(0, 100000, "an integer >= 0 (0 = off)"),
        doc="When > 0, the nightly job promotes a candidate only after it has shadowed this "
            "many live series (``models shadow``) with no disagreement beyond "
            "``train_shadow_min_agreement``; 0 turns the requirement off.")
    train_shadow_min_agreement: float = _setting(
        0.8, **_NUMBER, check=_number(0, 1, "a Dice from 0 to 1"),
        doc="Dice between the shadow's and the active version's masks (per label) below which "
            "a shadow series counts as a disagreement.")
    drift_baseline_series: int = _setting(
        20, **_INT, check=_integer(2, 100000, "an integer >= 2"),
        doc="Served series per scanner and task that form its baseline (the first ones).")
    drift_window_series: int = _setting(
        20, **_INT, check=_integer(2, 100000, "an integer >= 2"),
        doc="Latest series per scanner and task compared with the baseline.")
    drift_psi_threshold: float = _setting(
        0.25, **_NUMBER, check=_number(0.001, 100, "a population stability index > 0"),
        doc="Population stability index above which a figure counts as moved (0.25: the "
            "customary \"significant shift\").")
    retention_days: float = _setting(
        30.0, read=_to_float, read_as="a number of days",
        check=_number(0, 36500, "a number of days >= 0"),
        doc="Days the source images of a patient who does not donate are kept once their "
            "series is settled (every job done, every send of its results delivered or given "
            "up); 0 removes them as soon as that is true. Their labels go with them. Per task: "
            "``[[tasks]] retention_days``.")
    result_retention_days: float | None = _setting(
        None, read=lambda v, source: _to_days_or_forever(v), read_as='a number of days or "forever"',
        shown='"forever"',
        check=Check(expected='a number of days >= 0 or "forever"',
                    test=lambda v: v is None or 0 <= v <= 36500),
        doc="Days the results (SEG, SR, RTSTRUCT, overlay files) are kept once their series is settled; "
            '"forever" (the default) keeps them. Their measurements stay in the twin.')
    revoke_grace_days: float = _setting(
        30.0, read=_to_float, read_as="a number of days",
        check=_number(0, 36500, "a number of days >= 0"),
        doc="After a patient revokes donation, days their images stay before the non-donor "
            "rule applies (training-use records stay).")
    prune_every_min: float = _setting(
        60.0, read=_to_float, read_as="a number of minutes",
        check=_number(0, 10080, "a number of minutes > 0 (at most 10080)", above=True),
        doc="Minutes between the scheduled prunes (``archive prune`` runs one by hand).")
    disk_high_water_pct: float = _setting(
        90.0, **_NUMBER, check=_number(1, 100, "a percentage from 1 to 100"),
        doc="Use of the data directory's file system (%) above which the node prunes what "
            "retention allows, waiving ``retention_days`` for settled non-donor images, oldest "
            "first, down to ``disk_low_water_pct``, before any C-STORE is refused.")
    disk_low_water_pct: float = _setting(
        80.0, **_NUMBER, check=_number(0, 100, "a percentage from 0 to 100"),
        doc="Use (%) a prune under disk pressure brings the file system down to.")
    max_memory_gb: float = _setting(
        0.0, read=_to_float, read_as="a number of GB",
        check=_number(0, 100000, "a number of GB >= 0 (0 = derived from the machine)"),
        doc="Memory one inference may use, GB (10^9 bytes). A series the pipeline predicts will "
            "not fit (from its headers and the model, before any pixel is read) is refused with "
            "one line and not retried. 0 derives it from the machine: 80 % of its memory, or of "
            "the cgroup's limit when lower.")
    # issue 26: priors from the PACS (dicom_node.wire.priors)
    priors_years: float = _setting(
        2.0, **_NUMBER, check=_number(0, 100, "a number of years from 0 (off) to 100"),
        doc="When a study arrives and the twin has no earlier study of the patient within this "
            "many years, the destinations with ``query = true`` are asked for priors (C-FIND, "
            "then C-MOVE or C-GET), and the task runs on them so that the new result is "
            "compared with the prior's; 0 turns it off.")
    priors_max_studies: int = _setting(
        3, **_INT, check=_integer(1, 50),
        doc="Most prior studies retrieved for one new study (the most recent first).")
    priors_max_mb: float = _setting(
        2048.0, **_NUMBER, check=_number(1, 1e6, "a number of MB >= 1"),
        doc="Most MB (10^6 bytes) retrieved as priors for one new study; once reached, no "
            "further series is asked for.")
    priors_per_hour: int = _setting(
        60, **_INT, check=_integer(1, 100000, "an integer >= 1"),
        doc="Most prior retrievals (one per new study) the node starts in an hour; beyond it "
            "a new study goes out compared with what the twin has, saying so.")
    priors_timeout_s: float = _setting(
        10.0, **_NUMBER, check=_number(0, 600, "a number of seconds > 0 (at most 600)", above=True),
        doc="Seconds the PACS has to answer each association, C-FIND and retrieval response "
            "when asked for priors; a PACS that does not answer in time never holds the new "
            "result back (it goes out without the comparison, saying so).")
    priors_wait_s: float = _setting(
        30.0, **_NUMBER, check=_number(0, 3600, "a number of seconds from 0 to 3600"),
        doc="The priors of a new study are looked for (retrieved and measured) by a job "
            "queued as its first instance is filed; a job of the study that finds that one "
            "still running (in another worker) waits for it at most this many seconds, then "
            "goes out without the comparison, saying so.")
    send_prior_results: bool = _setting(
        False, **_BOOL,
        doc="Send the results computed on retrieved priors to the destinations too (default: "
            "they stay in the twin and serve the comparison only).")

    def __post_init__(self) -> None:
        src = str(self.config_path) if self.config_path else ""
        for name, key in KEYS.items():
            if key.check is not None:
                key.check(name, getattr(self, name), src)
        self._check_together(src)

    def _check_together(self, src: str) -> None:
        """The checks that read more than one key."""
        if self.send_backoff_initial_s > self.send_backoff_max_s:
            raise ConfigError("send_backoff_initial_s", "at most send_backoff_max_s",
                              self.send_backoff_initial_s, src)
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
        if self.disk_low_water_pct >= self.disk_high_water_pct:
            raise ConfigError("disk_low_water_pct", "below disk_high_water_pct",
                              self.disk_low_water_pct, src)
        if self.forward_mpps:
            resolve_forward(self.forward_mpps, self.destinations, src)
        if self.backend == "triton" and not self.triton_url:
            raise ConfigError("triton_url", 'HOST:PORT (backend = "triton" needs it)',
                              self.triton_url, src)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


#: Every configuration key (TOML, environment, flags) with its one declaration, in order.
KEYS: dict[str, Key] = {f.name: f.metadata["key"] for f in dataclasses.fields(Settings)
                        if "key" in f.metadata}
#: The keys also read from ``DICOM_NODE_<KEY>`` environment variables.
ENV_KEYS = tuple(name for name, key in KEYS.items() if key.env)


def _shown_default(name: str) -> str:
    """A key's default as the README's table shows it (TOML syntax)."""
    key = KEYS[name]
    if key.shown:
        return key.shown
    value = next(f.default for f in dataclasses.fields(Settings) if f.name == name)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)}`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def settings_table() -> str:
    """The README's table of configuration keys, derived from :data:`KEYS`.

    ``tests/test_settings.py`` checks that the README holds it as printed by
    ``python -c 'from dicom_node.settings import settings_table; print(settings_table())'``.
    """
    rows = ["| key | default | value | meaning |", "| --- | --- | --- | --- |"]
    for name, key in KEYS.items():
        env = f" Also `{ENV_PREFIX}{name.upper()}`." if key.env else ""
        value = key.check.expected if key.check is not None else key.read_as
        rows.append(f"| `{name}` | {_shown_default(name)} | {value} | "
                    f"{key.doc.replace('``', '`')}{env} |")
    return "\n".join(rows)


def _docstring() -> str:
    """:class:`Settings`' numpydoc docstring, built from :data:`KEYS`."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
    lines = ["Everything the node is configured with (each key declared once, as a field",
             "with its :class:`Key`).", "", "Parameters", "----------"]
    for name, key in KEYS.items():
        lines.append(f"{name} : {types[name]}")
        lines.extend(textwrap.wrap(key.doc, 84, initial_indent="    ", subsequent_indent="    "))
    lines += ["config_path : pathlib.Path or None", "    The file these settings were read from, if any."]
    return "\n".join(lines)


Settings.__doc__ = _docstring()


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


def _convert(key: str, value: Any, source: str) -> Any:
    declared = KEYS[key]
    try:
        return declared.read(value, source)
    except ConfigError:  # a table's reader names the sub-key itself
        raise
    except (TypeError, ValueError):
        raise ConfigError(key, declared.read_as, value, source) from None


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
            if key not in KEYS:
                known = ", ".join(sorted(KEYS))
                raise ConfigError(key, f"no such key (known keys: {known})", source=source)
            values[key] = _convert(key, value, source)
        values["config_path"] = path
    for key in ENV_KEYS:
        name = ENV_PREFIX + key.upper()
        if env.get(name):
            values[key] = _convert(key, env[name], f"environment variable {name}")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _convert(key, value, "command line") if key in KEYS else value
    try:
        return Settings(**values)
    except ConfigError as exc:
        if not exc.source and source:
            raise ConfigError(exc.key, exc.expected, exc.got, source) from None
        raise
