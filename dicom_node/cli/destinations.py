"""``dicom-node destinations list`` and ``dicom-node destinations test NAME``.

``test`` opens one association to the destination proposing, for each result SOP
class (SEG, Comprehensive 3D SR, Secondary Capture), one presentation context per
transfer syntax the node can write, reports which the peer accepts, and suggests the
``[[destinations]]`` profile (which objects, which syntaxes) that fits it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pynetdicom import AE, build_context

from dicom_node.foundation.errors import ConfigError
from dicom_node.profiles import KIND_SOP_CLASSES, TRANSFER_SYNTAXES, alias, suggest
from dicom_node.settings import Destination, Settings

VERIFICATION = "1.2.840.10008.1.1"


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("destinations", parents=parents, help="list destinations, test one",
                       description="The destinations results are sent to, and what each accepts.")
    dsub = p.add_subparsers(dest="destinations_command", metavar="ACTION", required=True)
    q = dsub.add_parser("list", parents=parents, help="list configured destinations")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)
    q = dsub.add_parser("test", parents=parents,
                        help="ask a destination which SOP classes and transfer syntaxes it accepts",
                        description="Open an association to NAME, report the accepted SOP classes "
                                    "and transfer syntaxes, and suggest its profile.")
    q.add_argument("name", metavar="NAME", help="the destination's name (default: its AE title)")
    q.add_argument("--timeout", type=float, default=10.0, help="network timeout, seconds")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_test)


def _find(settings: Settings, name: str) -> Destination:
    for dest in settings.destinations:
        if dest.name == name:
            return dest
    names = ", ".join(d.name for d in settings.destinations) or "none configured"
    raise ConfigError("destinations", f"a destination named {name!r} (known: {names})")


def _describe(dest: Destination) -> dict[str, Any]:
    if dest.web:
        return {"name": dest.name, "url": dest.url, "auth": dest.auth, "send": list(dest.send),
                "confirm": dest.confirm, "tls_ca": str(dest.tls_ca) if dest.tls_ca else None}
    return {"name": dest.name, "ae_title": dest.ae_title, "host": dest.host, "port": dest.port,
            "send": list(dest.send), "tls": dest.tls, "confirm": dest.confirm,
            "transfer_syntaxes": [alias(t) for t in dest.transfer_syntaxes]}


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = [_describe(d) for d in settings.destinations]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("destinations: none configured ([[destinations]] in the configuration file)")
    for r in rows:
        if "url" in r:
            print(f"{r['name']}: STOW-RS {r['url']} (auth {r['auth']}) send {', '.join(r['send'])}; "
                  f"confirm {r['confirm']}")
            continue
        print(f"{r['name']}: {r['ae_title']}@{r['host']}:{r['port']} send {', '.join(r['send'])}; "
              f"transfer syntaxes {', '.join(r['transfer_syntaxes'])}{'; TLS' if r['tls'] else ''}; "
              f"confirm {r['confirm']}")
    return 0


def probe(dest: Destination, *, calling_ae: str, timeout: float = 10.0) -> dict[str, Any]:
    """Associate with ``dest`` and report what it accepts.

    Returns
    -------
    dict
        ``established`` (bool), ``reason`` (when not), ``echo`` (C-ECHO status or
        ``None``), ``accepted`` ``{kind: {sop_class_uid: [aliases]}}`` and the
        ``suggestion`` (``send``, ``transfer_syntaxes``, ``toml``).
    """
    ae = AE(ae_title=calling_ae)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, timeout)
    contexts = [build_context(VERIFICATION)]
    for sops in KIND_SOP_CLASSES.values():
        for sop in sops:
            contexts.extend(build_context(sop, [str(ts)]) for ts in TRANSFER_SYNTAXES.values())
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, contexts=contexts)
    if not assoc.is_established:
        why = ("association rejected" if assoc.is_rejected else
               "association aborted" if assoc.is_aborted else "cannot connect")
        return {"established": False, "reason": why, "echo": None, "accepted": {},
                "suggestion": None}
    try:
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        echo = None
        if VERIFICATION in accepted:
            status = assoc.send_c_echo()
            echo = int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
    order = [str(t) for t in TRANSFER_SYNTAXES.values()]
    by_kind = {kind: {sop: [alias(t) for t in order if t in accepted.get(sop, set())] for sop in sops}
               for kind, sops in KIND_SOP_CLASSES.items()}
    s = suggest(accepted)
    return {"established": True, "reason": "", "echo": echo, "accepted": by_kind,
            "suggestion": {"send": list(s.send), "transfer_syntaxes": list(s.transfer_syntaxes),
                           "toml": s.toml(dest.name, dest.ae_title, dest.host, dest.port)
                           if s.send else ""}}


def probe_web(dest: Destination, timeout: float = 10.0) -> dict[str, Any]:
    """Ask a DICOMweb destination one QIDO-RS question (``/studies?limit=1``) with its
    authentication; ``reachable`` when it answers 2xx."""
    import requests

    from dicom_node.wire import stow

    try:
        with stow.session_for(dest) as session:
            rsp = session.get(f"{dest.url.rstrip('/')}/studies", params={"limit": "1"},
                              headers={"Accept": "application/dicom+json"},
                              timeout=(min(10.0, timeout), timeout))
    except (requests.RequestException, OSError) as exc:
        return {"reachable": False, "reason": f"{type(exc).__name__}: {exc}"}
    ok = 200 <= rsp.status_code < 300
    return {"reachable": ok, "reason": "" if ok else f"HTTP {rsp.status_code} {rsp.reason}"}


def cmd_test(args: argparse.Namespace, settings: Settings) -> int:
    dest = _find(settings, args.name)
    if dest.web:
        report = dict(probe_web(dest, args.timeout), destination=_describe(dest))
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"{dest.name} ({dest.url}): " + ("QIDO-RS answered" if report["reachable"]
                                                   else report["reason"]))
        return 0 if report["reachable"] else 1
    report = probe(dest, calling_ae=settings.ae_title, timeout=args.timeout)
    report["destination"] = _describe(dest)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["established"] else 1
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
    if not report["established"]:
        print(f"{where}: {report['reason']}")
        return 1
    echo = report["echo"]
    print(f"{where}: association accepted; C-ECHO "
          f"{'not offered' if echo is None else f'status 0x{echo:04X}'}")
    for kind, sops in report["accepted"].items():
        for sop, syntaxes in sops.items():
            print(f"  {kind:<8} {sop:<32} {', '.join(syntaxes) if syntaxes else 'REFUSED'}")
    sugg = report["suggestion"]
    if not sugg["send"]:
        print("suggestion: this peer accepts none of the result objects uncompressed")
        return 1
    print("suggested profile:")
    print(sugg["toml"], end="")
    return 0
