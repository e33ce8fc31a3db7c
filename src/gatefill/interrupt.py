"""Graceful Ctrl-C for long phases: the first SIGINT asks the phase to stop at its next safe point, a second aborts.

Apply stops between batches and soak between looks, so an interrupt never leaves half a batch or half a measurement.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["stop_on_sigint"]


@contextmanager
def stop_on_sigint(stop: threading.Event) -> Iterator[None]:
    """While active, Ctrl-C sets ``stop`` instead of raising; a second Ctrl-C raises KeyboardInterrupt.

    Signal handlers can only be installed from the main thread; elsewhere (a server thread, a test) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(_signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
