"""Stop signals that come before a run can obey them: remembered, then handed over.

A scheduler may send SIGTERM at any moment, even while the interpreter is still importing
the run's libraries. Python's default would end the process with 143, which says nothing a
scheduler can act on; remembered instead, the signal stops the run as soon as it starts
(exit 3). Commands that are not runs give the signals back their default behaviour.

Deliberately free of imports beyond the standard library's `signal`: it runs first.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[signal.Signals] = []


def remember_stop_signals() -> None:
    """From now until a run takes over, SIGINT and SIGTERM are remembered, not fatal."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember)


def take() -> list[signal.Signals]:
    """The stop signals received so far, forgotten as they are handed over."""
    received = list(_received)
    _received.clear()
    return received


def restore_default() -> None:
    """Not a run: the signals act as usual again, and one that came already acts now."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for signum in take():
        signal.raise_signal(signum)


def _remember(signum: int, _frame: FrameType | None) -> None:
    _received.append(signal.Signals(signum))
