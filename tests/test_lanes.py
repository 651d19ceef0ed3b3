"""Whose turn it is, on a fake clock: one lane per Stripe account over a real SQLite store, and
workers that take the account that may send first (no head-of-line blocking)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from bulkdisconnect.limiter import Meters, RateLimiter
from bulkdisconnect.model import Owned, RunStats
from bulkdisconnect.pool import Lanes, PoolSettings
from bulkdisconnect.stopping import Stop
from bulkdisconnect.store import open_store
from bulkdisconnect.store.core import SqlStore
from tests.support import FakeClock

JOB = "platform"


async def planned(path: Path, rows: list[Owned]) -> SqlStore:
    """A store holding `rows` as the job's input, locked by run r1."""
    store = await open_store(path)
    async with store.stage(JOB, retry_failed=False) as staged:
        await staged.add(rows)
        await staged.commit()
    await store.acquire_lock(JOB, "r1", stale_after=30)
    return store


@asynccontextmanager
async def lanes_of(store: SqlStore, meters: Meters, clock: FakeClock) -> AsyncIterator[Lanes]:
    """The run's lanes, their first pages claimed."""
    async with anyio.create_task_group() as tg:
        lanes = Lanes(
            store=store,
            job=JOB,
            run_id="r1",
            meters=meters,
            settings=PoolSettings(concurrency=64),
            tg=tg,
            stop=Stop(),
            clock=clock,
        )
        await lanes.open()
        yield lanes
        tg.cancel_scope.cancel()


def turns(lanes: Lanes, clock: FakeClock, seconds: float, step: float = 0.005) -> list[str]:
    """The Stripe account of every turn taken, as fast as turns come, for `seconds`."""
    taken = []
    for _ in range(round(seconds / step)):
        clock.advance(step)
        while (turn := lanes.take()) is not None:
            lane, _, ticket = turn
            lane.budget.release(ticket)
            taken.append(lane.budget.stripe_account)
    return taken


def rows(owner: str, count: int) -> list[Owned]:
    return [Owned(f"fca_{owner[5:]}{n:04d}", owner) for n in range(count)]


@pytest.mark.anyio
async def test_a_throttled_account_first_in_the_input_does_not_hold_up_the_next(
    tmp_path: Path,
) -> None:
    """The input holds all of account A's rows, then B's; A's pacer is down to 1/s after
    429s. B still gets its full budget from the first moment, and A its own 1/s."""
    clock = FakeClock()
    store = await planned(tmp_path / "s.sqlite", rows("acct_A", 200) + rows("acct_B", 200))
    meters = Meters(
        RateLimiter(20, clock=clock), concurrency=64, stats=RunStats(), stop=Stop(), clock=clock
    )
    meters.budget("acct_A").pacer.current = 1.0
    try:
        async with lanes_of(store, meters, clock) as lanes:
            taken = turns(lanes, clock, 2.0)
    finally:
        await store.aclose()
    counts = Counter(taken)
    assert 36 <= counts["acct_B"] <= 40, counts  # 20/s, less the limiter's 1.5 % margin
    assert 2 <= counts["acct_A"] <= 3, counts
    assert "acct_B" in taken[:2]


@pytest.mark.anyio
async def test_each_account_runs_at_its_own_rate_within_the_total(tmp_path: Path) -> None:
    """Forty accounts at 10/s each: 400/s in all, each at its own 10/s; a total cap of 100/s
    then holds them all to 100/s together, shared fairly."""
    owners = [f"acct_{n:02d}" for n in range(40)]
    for total, per_account, overall in ((None, (18, 20), (720, 800)), (100.0, (4, 6), (190, 201))):
        clock = FakeClock()
        store = await planned(
            tmp_path / f"s{total}.sqlite", [r for o in owners for r in rows(o, 40)]
        )
        meters = Meters(
            RateLimiter(10, clock=clock),
            concurrency=64,
            stats=RunStats(),
            stop=Stop(),
            clock=clock,
            total=None if total is None else RateLimiter(total, clock=clock),
        )
        try:
            async with lanes_of(store, meters, clock) as lanes:
                counts = Counter(turns(lanes, clock, 2.0))
        finally:
            await store.aclose()
        assert set(counts) == set(owners)
        low, high = per_account
        assert all(low <= n <= high for n in counts.values()), counts
        assert overall[0] <= sum(counts.values()) <= overall[1], sum(counts.values())
