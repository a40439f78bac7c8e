"""The one way the tests wait: poll a condition until it holds, or fail saying what for.

Tests never sleep a fixed time to let something happen; they wait on the condition
that shows it happened, with a generous timeout (the machine may be loaded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(what: str, check: Callable[[], Any], timeout: float = 10.0, poll: float = 0.5,
               *, explain: Callable[[], Any] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy and return that value.

    After ``timeout`` seconds, one last try, then :class:`TimeoutError` naming ``what``
    (and the value of ``explain()``, when given, to say what was seen instead).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f": {explain()}" if explain is not None else ""
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}{seen}")
        time.sleep(poll)
