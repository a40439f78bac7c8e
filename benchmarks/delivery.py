"""Delivering one result (SEG + SR + overlay series) to Orthanc: STOW-RS vs C-STORE, and
the time confirmation adds.

One Orthanc (the Debian package, with its DICOMweb plugin) is both destinations: its
DICOM port (C-STORE, one association per result) and its ``/dicom-web`` (STOW-RS, up to
:data:`dicom_node.wire.stow.MAX_INSTANCES` instances per request). Each round writes a fresh
result of a phantom CT (``--size`` x ``--size``, ``--slices`` slices: one SEG, one SR,
one overlay image per slice with a segment) and sends it with the node's own sender
(:class:`dicom_node.queue.sender.Sender`) four ways, in a rotating order:

* ``c-store``: ``confirm = "none"``, until every object is acknowledged;
* ``stow-rs``: ``confirm = "none"``, the same;
* ``c-store+commitment``: Storage Commitment; Orthanc reports on a new association to
  the node's listener (running here);
* ``stow-rs+read-back``: a QIDO-RS read-back right after the STOW-RS.

Printed per way: the median seconds per result until acknowledged (``send_due``), the
STOW-RS / C-STORE ratio, and, for the confirmed ways, the median seconds from the last
acknowledgement (``sent_at``) to the last ``confirmed_at`` (the issue's goal: 1 s).

    .venv/bin/python benchmarks/delivery.py                  # 5 rounds, 256 x 256 x 40
    .venv/bin/python benchmarks/delivery.py --rounds 9 --size 512 --slices 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dicom_node.queue.sender import Sender, SendState  # noqa: E402
from dicom_node.runtime.listener_services import listener_services  # noqa: E402
from dicom_node.wire.server import DicomServer  # noqa: E402
from dicom_node.settings import Destination, Settings  # noqa: E402
from loop_helpers import phantom_result  # noqa: E402
from orthanc.server import OrthancServer, free_ports  # noqa: E402
from twin_archive import Archive  # noqa: E402

WAYS = ("c-store", "stow-rs", "c-store+commitment", "stow-rs+read-back")


def make_result(data_dir: Path, key: str, size: int, slices: int) -> tuple[object, int]:
    """A stored result of a phantom CT: (the AI result, its number of objects)."""
    made = phantom_result(data_dir, key, size=size, slices=slices)
    return made.result, len(made.objects)


def one(sender: Sender, result: object, dest: Destination, n: int) -> tuple[float, float | None]:
    """Send ``result`` to ``dest``: seconds until acknowledged, and from the last
    acknowledgement to the last confirmation (None without confirmation)."""
    sender.enqueue(result, [dest])  # type: ignore[arg-type]
    t0 = time.perf_counter()
    delivered = sender.send_due()
    took = time.perf_counter() - t0
    if delivered != n:
        raise SystemExit(f"{dest.key}: {delivered} of {n} objects delivered")
    if dest.confirm == "none":
        return took, None
    deadline = time.monotonic() + 30
    while True:
        rows = [r for r in sender.list(limit=10_000) if r.destination == dest.key
                and r.result_id == result.id]  # type: ignore[attr-defined]
        if all(r.state is SendState.CONFIRMED for r in rows):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{dest.key}: not confirmed after 30 s")
        time.sleep(0.01)
        sender.settle_confirmations()
    last_ack = max(datetime.fromisoformat(r.sent_at) for r in rows)
    confirmed = max(datetime.fromisoformat(r.confirmed_at) for r in rows)
    return took, (confirmed - last_ack).total_seconds()


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    node_port = free_ports(1)[0]
    settings = Settings(data_dir=work / "node", port=node_port, bind_address="127.0.0.1",
                        ae_title="NODE")
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    confirms: dict[str, list[float]] = {w: [] for w in WAYS[2:]}
    objects = 0
    with Archive(work / "node") as archive, \
            OrthancServer(work / "orthanc", dicomweb=True,
                          known_modalities={"node": ("NODE", "127.0.0.1", node_port)}) as orthanc:
        server = DicomServer(settings, archive.ingest, services=listener_services(settings))
        server.start()
        dimse = dict(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        web = f"{orthanc.url}/dicom-web"
        dests = {"c-store": Destination(name="a", confirm="none", **dimse),  # type: ignore[arg-type]
                 "stow-rs": Destination(name="b", url=web, confirm="none"),
                 "c-store+commitment": Destination(name="c", **dimse),  # type: ignore[arg-type]
                 "stow-rs+read-back": Destination(name="d", url=web + "/")}
        sender = Sender(work / "node", ae_title="NODE", network_timeout_s=60,
                        destinations=list(dests.values()), confirm_timeout_s=60)
        try:
            for r in range(args.rounds):
                order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
                for way in order:
                    result, objects = make_result(work / "node", f"{way}-{r}", args.size, args.slices)
                    took, confirm = one(sender, result, dests[way], objects)
                    times[way].append(took)
                    if confirm is not None:
                        confirms[way].append(confirm)
                    print(f"round {r + 1} {way:<20} {took:6.3f} s"
                          + (f"  confirmed {confirm:.3f} s after the last ack" if confirm is not None
                             else ""), flush=True)
        finally:
            sender.close()
            server.stop(0.0)
    med = {w: statistics.median(v) for w, v in times.items()}
    return {"rounds": args.rounds, "size": args.size, "slices": args.slices,
            "objects_per_result": objects, "median_s": med,
            "stow_over_cstore": med["stow-rs"] / med["c-store"],
            "confirm_after_last_ack_median_s": {w: statistics.median(v) for w, v in confirms.items()},
            "confirm_after_last_ack_max_s": {w: max(v) for w, v in confirms.items()},
            "load_average": os.getloadavg()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=256, help="rows and columns of the phantom CT")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="delivery-") as tmp:
        out = run(args, Path(tmp))
    med = out["median_s"]
    print(f"\n{out['objects_per_result']} objects per result ({args.size} x {args.size}, "
          f"{args.slices} slices), {args.rounds} rounds; load average "
          + " ".join(f"{x:.2f}" for x in out["load_average"]))  # type: ignore[union-attr]
    for way in WAYS:
        print(f"  {way:<20} median {med[way]:.3f} s per result")  # type: ignore[index]
    print(f"  STOW-RS / C-STORE: {out['stow_over_cstore']:.2f} (below 1: STOW-RS is faster)")
    for way, s in out["confirm_after_last_ack_median_s"].items():  # type: ignore[union-attr]
        print(f"  {way:<20} confirmed {s:.3f} s after the last acknowledgement (median; max "
              f"{out['confirm_after_last_ack_max_s'][way]:.3f} s)")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
