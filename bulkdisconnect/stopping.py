"""Stopping a run: SIGINT/SIGTERM become a `Stop` that every waiting part of the run obeys.

The first signal stops intake: whatever waits under `Stop.cancels()` (a worker at a rate
meter, a back-off, planning) is woken and gives up, so nothing new is sent. Requests on the
wire get the grace period (`cancel_after_grace`); a second signal ends that at once, and a
third abandons the run without its summary.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import structlog

log = structlog.get_logger("bulkdisconnect")


class StoppedError(Exception):
    """A stop ended work that has no partial result to return (listing, planning)."""


class Stop:
    """A stop asked for (`requested`), and in a hurry (`hurry`: in-flight work is dropped)."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.hurry = anyio.Event()
        self._waiting: set[anyio.CancelScope] = set()

    def request(self) -> None:
        """Stop intake: set `requested` and wake whatever waits under `cancels()`."""
        self.requested.set()
        for scope in list(self._waiting):
            scope.cancel()

    @contextmanager
    def cancels(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that a stop cancels (at once if one was asked for already).

        A scope per wait and no watcher task: a worker enters one only when it must wait.
        """
        scope = anyio.CancelScope()
        if self.requested.is_set():
            scope.cancel()
        self._waiting.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._waiting.discard(scope)


@asynccontextmanager
async def on_signals() -> AsyncIterator[Stop]:
    """A `Stop` driven by SIGINT/SIGTERM while the body runs."""
    stop = Stop()

    async def watch(body: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if stop.hurry.is_set():
                    body.cancel()
                    return
                if stop.requested.is_set():
                    log.warning("bulkdisconnect.stopping.now", signal=name)
                    stop.hurry.set()
                    continue
                log.warning("bulkdisconnect.stopping", signal=name)
                stop.request()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        yield stop
        tg.cancel_scope.cancel()


async def cancel_after_grace(stop: Stop, scope: anyio.CancelScope, grace: float) -> None:
    """Once a stop is asked for, give `scope` `grace` seconds (less in a hurry), then cancel it."""
    await stop.requested.wait()
    with anyio.move_on_after(grace):
        await stop.hurry.wait()
    scope.cancel()
