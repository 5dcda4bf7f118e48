"""Calls for the local executor's process pool in tests (a spawned worker imports them by name)."""
from __future__ import annotations

import time


def fail_first(i: int, report=None) -> str:
    """Call 0 returns "fail" at once; the others report that they started, wait a little and return "ok"."""
    if report is not None:
        report("started")
    if i == 0:
        return "fail"
    time.sleep(0.3)
    return "ok"
