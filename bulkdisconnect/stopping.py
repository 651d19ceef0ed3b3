"""Stopping a run: SIGINT/SIGTERM become a `Stop` that every waiting part of the run obeys.

The first signal stops intake: whatever waits under `Stop.cancels()` (a worker at a rate
meter, a back-off, planning) is woken and gives up, so nothing new is sent. Requests on the
wire get the grace period (`cancel_after_grace`); a second signal ends that at once, and a
third abandons the run without its summary.

The store calls on the way out (the last results, the summary's counts, the run's end, the
lock) run under `Stop.bounded()`. A run that stops (a signal) or fails gives them
STOP_DEADLINE seconds in all, so that a stalled database cannot hold it, and HURRIED seconds
once a second signal came; a run that ends well gives them the time they take.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import structlog

from bulkdisconnect import early

log = structlog.get_logger("bulkdisconnect")

STOP_DEADLINE = 5.0  # seconds the store gets, in all, for a run's last writes and reads
LAST_CALL = 0.5  # ...but each call at least this long, unless hurried
HURRIED = 0.5  # seconds it gets once a second signal came


class StoppedError(Exception):
    """A stop ended work that has no partial result to return (listing, planning)."""


class Stop:
    """A stop asked for (`requested`), and in a hurry (`hurry`: in-flight work is dropped)."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.hurry = anyio.Event()
        self._waiting: set[anyio.CancelScope] = set()
        self._bounded: set[anyio.CancelScope] = set()
        self._wind_down_by: float | None = None  # the deadline of the calls on the way out
        self._failed = False

    def request(self) -> None:
        """Stop intake: set `requested` and wake whatever waits under `cancels()`; store calls
        on the way out already under way are bounded from now on."""
        self.requested.set()
        for scope in list(self._waiting):
            scope.cancel()
        self._bound_those_under_way()

    def hasten(self) -> None:
        """A second signal: drop in-flight work, and give the store HURRIED seconds more."""
        self.hurry.set()
        hurried_by = anyio.current_time() + HURRIED
        if self._wind_down_by is None or self._wind_down_by > hurried_by:
            self._wind_down_by = hurried_by
        self._bound_those_under_way()

    def failed(self) -> None:
        """The run is failing: its way out is bounded as a stopped run's is."""
        self._failed = True
        self._bound_those_under_way()

    @contextmanager
    def bounded(self) -> Iterator[anyio.CancelScope]:
        """A shielded scope for a store call on the way out.

        Once the run stops or fails, the first such call starts the STOP_DEADLINE clock and
        every call is bounded by it (those under way too); a call that finds it run out still
        gets LAST_CALL seconds, unless a second signal hurried the run.
        """
        scope = anyio.CancelScope(shield=True)
        if self.requested.is_set() or self._failed:
            scope.deadline = self._deadline()
        with _entered(scope, self._bounded):
            yield scope

    def _deadline(self) -> float:
        """The deadline of a store call on the way out, starting the clock if need be."""
        now = anyio.current_time()
        if self._wind_down_by is None:
            self._wind_down_by = now + STOP_DEADLINE
        if self.hurry.is_set():
            return self._wind_down_by
        return max(self._wind_down_by, now + LAST_CALL)

    def _bound_those_under_way(self) -> None:
        for scope in self._bounded:
            scope.deadline = min(scope.deadline, self._deadline())

    @contextmanager
    def cancels(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that a stop cancels (at once if one was asked for already).

        A scope per wait and no watcher task: a worker enters one only when it must wait.
        """
        scope = anyio.CancelScope()
        if self.requested.is_set():
            scope.cancel()
        with _entered(scope, self._waiting):
            yield scope


@contextmanager
def _entered(scope: anyio.CancelScope, registry: set[anyio.CancelScope]) -> Iterator[None]:
    """Enter `scope`, known to `registry` (which a stop walks) while it is entered."""
    registry.add(scope)
    try:
        with scope:
            yield
    finally:
        registry.discard(scope)


@asynccontextmanager
async def on_signals() -> AsyncIterator[Stop]:
    """A `Stop` driven by SIGINT/SIGTERM while the body runs (and by any that came before)."""
    stop = Stop()

    def obey(signum: signal.Signals, body: anyio.CancelScope) -> None:
        if stop.hurry.is_set():
            body.cancel()
        elif stop.requested.is_set():
            log.warning("bulkdisconnect.stopping.now", signal=signum.name)
            stop.hasten()
        else:
            log.warning("bulkdisconnect.stopping", signal=signum.name)
            stop.request()

    async def watch(signals: AsyncIterator[signal.Signals], body: anyio.CancelScope) -> None:
        async for signum in signals:
            obey(signal.Signals(signum), body)

    # The receiver is in place before the signals remembered at start-up are taken: none
    # can fall between the two.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, signals, tg.cancel_scope)
            for signum in early.take():
                obey(signum, tg.cancel_scope)
            yield stop
            tg.cancel_scope.cancel()


async def cancel_after_grace(stop: Stop, scope: anyio.CancelScope, grace: float) -> None:
    """Once a stop is asked for, give `scope` `grace` seconds (less in a hurry), then cancel it."""
    await stop.requested.wait()
    with anyio.move_on_after(grace):
        await stop.hurry.wait()
    scope.cancel()
