"""``dicom-node twin`` while the server runs."""

from __future__ import annotations

import json

from dicom_client import send
from node_harness import NodeProcess, small_ct


def test_consent_default_donate_revoke_with_audit_while_serving(node: NodeProcess) -> None:
    assert send(node.port, [small_ct(patient_id="TWIN-1"), small_ct(patient_id="TWIN-2")]) == [0, 0]
    listing = json.loads(node.cli("twin", "list", "--json").stdout)
    assert {t["patient_id"]: t["donate"] for t in listing} == {"TWIN-1": False, "TWIN-2": False}

    out = node.cli("twin", "consent", "TWIN-1", "--donate", "--by", "Dr Grey", "--reason", "form 7")
    assert "TWIN-1 donates" in out.stdout
    # The server keeps storing while the CLI writes.
    assert send(node.port, [small_ct(patient_id="TWIN-1")]) == [0]
    node.cli("twin", "consent", "TWIN-1", "--revoke", "--by", "Clerk", "--reason", "withdrawn by phone")

    shown = json.loads(node.cli("twin", "show", "TWIN-1", "--json").stdout)
    assert shown["twin"]["donate"] is False
    assert shown["twin"]["studies"] == 2 and shown["twin"]["instances"] == 2
    history = [(e["previous"], e["donate"], e["by"], e["reason"]) for e in shown["consent_history"]]
    assert history == [(False, True, "Dr Grey", "form 7"), (True, False, "Clerk", "withdrawn by phone")]
    assert all(e["at"] for e in shown["consent_history"])
    assert shown["results"] == [] and shown["labels"] == []
    assert shown["studies"][0]["series"][0]["modality"] == "CT"

    text = node.cli("twin", "show", "TWIN-1").stdout
    assert "donate -> no  by Clerk  withdrawn by phone" in text

    missing = node.cli("twin", "consent", "NOBODY", "--donate", check=False)
    assert missing.returncode == 1 and "no twin with Patient ID 'NOBODY'" in missing.stderr
    both = node.cli("twin", "consent", "TWIN-1", "--donate", "--revoke", check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
