"""Holding a job's lease while a run works it: heartbeats, and this worker's share of --rate.

A run holds its job through a row in the store's lock table. `hold_lease` keeps that row's
heartbeat going, re-divides --rate as `run --join` workers come and go, and stops the run
(LockHeldError, exit 4) as soon as a heartbeat fails or does not get through within half the
lease: by the time the lease runs out, others may take over the accounts this run holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import anyio

from bulkdisconnect.errors import LockHeldError
from bulkdisconnect.limiter import RateLimiter
from bulkdisconnect.store import Beat

JOIN_POLL = 0.2  # seconds between heartbeats while a joining worker waits for its share


class LeaseStore(Protocol):
    """What holding a lease needs of the store."""

    async def heartbeat(self, job: str, owner: str) -> Beat | None:
        """Renew the lease; the live holders and whether they all run at their share."""
        ...


class Lease:
    """One run's hold on its job, renewed in the background while the body runs."""

    def __init__(
        self,
        store: LeaseStore,
        job: str,
        owner: str,
        *,
        lease: float,
        join: bool,
        limiter: RateLimiter,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._store = store
        self._job = job
        self._owner = owner
        self._lease = lease
        self._limiter = limiter
        self._sleep = sleep  # the clock's: tests drive the lease on a fake one
        # Joined workers re-divide the rate as others come and go: look often.
        self.every = min(lease / 6, JOIN_POLL * 5) if join else lease / 6
        self.lost = False

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Run the body under the lease; LockHeldError if the lease is lost meanwhile.

        A joining worker starts only once every other worker runs at its new, smaller share,
        so that the workers together never exceed --rate.
        """
        beat = await self._heartbeat()
        while beat is not None and not beat.ready:
            await self._sleep(JOIN_POLL)
            beat = await self._heartbeat()
        if beat is None:
            raise LockHeldError(f"job {self._job!r}: lost the lock's lease before starting")
        self._limiter.share(beat.workers)
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as body:
                tg.start_soon(self._renew, body)
                yield
            tg.cancel_scope.cancel()
        if self.lost:
            raise LockHeldError(
                f"job {self._job!r}: lost the lock's lease (taken over, or no heartbeat got "
                f"through for {self._lease / 2:g}s); stopped"
            )

    async def _renew(self, body: anyio.CancelScope) -> None:
        while True:
            await self._sleep(self.every)
            beat = await self._heartbeat(within=self._lease / 2)
            if beat is None:
                self.lost = True
                body.cancel()
                return
            self._limiter.share(beat.workers)

    async def _heartbeat(self, within: float | None = None) -> Beat | None:
        """One heartbeat; None if it failed, or did not get through `within` seconds."""
        beat: Beat | None = None
        async with anyio.create_task_group() as tg:

            async def renew() -> None:
                nonlocal beat
                beat = await self._store.heartbeat(self._job, self._owner)
                tg.cancel_scope.cancel()

            async def watchdog(seconds: float) -> None:
                await self._sleep(seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(renew)
            if within is not None:
                tg.start_soon(watchdog, within)
        return beat
