"""Graceful stops for long phases: the first SIGINT (Ctrl-C) or SIGTERM asks the phase to stop at its next safe
point, a second one aborts.

Apply stops between batches (a throttle wait ends at once) and soak between looks, so a stop never leaves half a
batch or half a measurement. A service manager's SIGTERM pauses a run exactly as Ctrl-C does.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Interruption", "stop_on_signals"]


@dataclass
class Interruption:
    """Which signal asked the phase to stop; ``signum`` stays None until one did."""

    signum: int | None = None

    @property
    def description(self) -> str:
        """How a person would name it: ``Ctrl-C`` or ``SIGTERM``."""
        if self.signum == signal.SIGINT:
            return "Ctrl-C"
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as shells report a process stopped by it (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)


@contextmanager
def stop_on_signals(
    stop: threading.Event, signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[Interruption]:
    """While active, the first of ``signals`` sets ``stop`` (and says which it was) instead of ending the process;
    a second one raises KeyboardInterrupt.

    Signal handlers can only be installed from the main thread; elsewhere (a server thread, a test) this does nothing.
    """
    received = Interruption()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.signum = signum
        stop.set()

    for signum in signals:
        signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
