"""Holding a job's lease while a run works it: heartbeats, and this worker's share of --rate.

A run holds its job through a row in the store's lock table. `hold_lease` keeps that row's
heartbeat going, re-divides --rate as `run --join` workers come and go, and stops the run as
soon as a heartbeat finds the lease lost (LockHeldError, exit 4) or does not get through
within half the lease (StoreError, exit 6): by the time the lease runs out, others may take
over the accounts this run holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from bulkdisconnect.errors import LockHeldError, StoreError
from bulkdisconnect.store import Beat

JOIN_POLL = 0.2  # seconds between heartbeats while a joining worker waits for its share


class Shared(Protocol):
    """Rate budgets that workers of one job divide among themselves (limiter.Meters)."""

    def share(self, workers: int) -> None:
        """Run at 1/workers of each budget, from now on."""
        ...


class LeaseStore(Protocol):
    """What holding a lease needs of the store."""

    async def heartbeat(self, job: str, owner: str) -> Beat | None:
        """Renew the lease; the live holders and whether they all run at their share."""
        ...


@dataclass(kw_only=True, eq=False)
class Lease:
    """One run's hold on its job, renewed in the background while the body runs."""

    store: LeaseStore
    job: str
    owner: str
    lease: float  # seconds: a heartbeat must get through within half of it
    join: bool
    limiter: Shared  # every account's budget (and the total cap), divided among the workers
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep  # the clock's: tests fake it
    lost: bool = field(default=False, init=False)
    silent: bool = field(default=False, init=False)  # lost because the store did not answer

    @property
    def every(self) -> float:
        """Seconds between heartbeats; joined workers look often, as others come and go."""
        return min(self.lease / 6, JOIN_POLL * 5) if self.join else self.lease / 6

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Run the body under the lease; LockHeldError if the lease is lost meanwhile.

        A joining worker starts only once every other worker runs at its new, smaller share,
        so that the workers together never exceed --rate.
        """
        beat = await self._heartbeat()
        while beat is not None and not beat.ready:
            await self.sleep(JOIN_POLL)
            beat = await self._heartbeat()
        if beat is None:
            raise LockHeldError(f"job {self.job!r}: lost the lock's lease before starting")
        self.limiter.share(beat.workers)
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as body:
                tg.start_soon(self._renew, body)
                yield
            tg.cancel_scope.cancel()
        if self.silent:
            # Not "taken over": the store did not answer. Others cannot take over through it
            # either, and a rerun resumes once it answers (exit 6, which schedulers retry).
            raise StoreError(
                f"job {self.job!r}: no heartbeat got through for {self.lease / 2:g}s (the "
                "store did not answer in time); stopped: nothing was lost, a rerun resumes"
            )
        if self.lost:
            raise LockHeldError(f"job {self.job!r}: lost the lock's lease (taken over); stopped")

    async def _renew(self, body: anyio.CancelScope) -> None:
        while True:
            await self.sleep(self.every)
            beat = await self._heartbeat(within=self.lease / 2)
            if beat is None:
                self.lost = True
                body.cancel()
                return
            self.limiter.share(beat.workers)

    async def _heartbeat(self, within: float | None = None) -> Beat | None:
        """One heartbeat; None if the lease was lost, or (`silent`) did not get through
        within `within` seconds."""
        beat: Beat | None = None
        async with anyio.create_task_group() as tg:

            async def renew() -> None:
                nonlocal beat
                beat = await self.store.heartbeat(self.job, self.owner)
                tg.cancel_scope.cancel()

            async def watchdog(seconds: float) -> None:
                await self.sleep(seconds)
                self.silent = True
                tg.cancel_scope.cancel()

            tg.start_soon(renew)
            if within is not None:
                tg.start_soon(watchdog, within)
        return beat
