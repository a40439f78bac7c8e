"""The node's socket-pair protocol with its child processes (acceptors, inference workers).

One JSON object a line in each direction; values too rich for JSON travel pickled in a
``blob`` field (both ends run the same code). A child dies with its parent: it asks the
kernel for SIGKILL when the parent dies (``PR_SET_PDEATHSIG``) and stops when its end of
the socket pair closes.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import pickle
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

_PR_SET_PDEATHSIG = 1


def send_message(sock: socket.socket, lock: threading.Lock, message: dict[str, Any]) -> bool:
    """Write one JSON line; False if the other end is gone."""
    data = (json.dumps(message) + "\n").encode()
    with lock:
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False


def read_messages(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """The JSON objects the other end writes, one a line, until it closes its end."""
    buf = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message


def pack(value: object) -> str:
    """A value for a ``blob`` field (pickled: both ends run the same code)."""
    return base64.b64encode(pickle.dumps(value)).decode()


def unpack(blob: str) -> Any:
    """The value of a ``blob`` field."""
    return pickle.loads(base64.b64decode(blob))  # noqa: S301 - written by our parent


def die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the closed socket pair still stops us
        pass
    if os.getppid() != parent_pid:  # the listener died before prctl took effect
        os._exit(1)
