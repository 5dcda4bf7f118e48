"""The worker side of :class:`experiments.executors.LocalExecutor`'s process
pool: how a call sends reports (a sweep's finished experiences) to the
parent. Light to import: a spawned worker imports it before its first call.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

#: in a pool worker: the pipe to the parent (set by the pool's initializer; None when nothing is reported)
_report_queue = None


def start_worker(queue, parent: int) -> None:
    """The pool's initializer: the pipe of this worker's reports, and a watch
    that ends the worker when ``parent`` is gone (a sweep killed with SIGKILL
    cannot stop its pool; its workers would run on, holding memory, with
    nobody to receive their results; what they leave half-written is cleaned
    up when the sweep runs again)."""
    global _report_queue
    _report_queue = queue

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def call_reporting(fn: Callable, index: int, *args):
    """``fn(*args, report=send)`` in a pool worker, ``send(*message)`` putting
    (index, message) in the pipe (written at once, so before the call's result)."""
    return fn(*args, report=lambda *message: _report_queue.put((index, message)))


def read_reports(queue, report: Callable) -> None:
    """In the parent: ``report(index, *message)`` for every message in the pipe now."""
    while queue is not None and not queue.empty():
        index, message = queue.get()
        report(index, *message)
