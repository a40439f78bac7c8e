"""A throw-away PKI for the TLS tests, made with the ``openssl`` command (Debian ``openssl``).

A test CA; a node certificate it signs (``localhost`` and 127.0.0.1, server and client
use); a client certificate it signs; and a rogue CA with a client certificate the node
must not trust. EC P-256 keys: quick to make.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(name: str, cwd: Path) -> None:
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name} test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)


def _leaf(name: str, ca: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


def make_pki(folder: Path) -> Pki:
    """Create the CA, the node, client and rogue certificates under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca("ca", folder)
    _ca("rogue-ca", folder)
    _leaf("node", "ca", folder)
    _leaf("client", "ca", folder)
    _leaf("rogue", "rogue-ca", folder)
    return Pki(ca=folder / "ca.pem", server_cert=folder / "node.pem", server_key=folder / "node.key",
               client_cert=folder / "client.pem", client_key=folder / "client.key",
               rogue_cert=folder / "rogue.pem", rogue_key=folder / "rogue.key")
