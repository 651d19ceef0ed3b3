"""Hung requests: an overdue request gives back its in-flight slot (on a fake clock), and a run
against a sandbox that hangs some requests does not wait for them to make progress."""

from __future__ import annotations

import signal

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from bulkdisconnect.client import Answer
from bulkdisconnect.limiter import (
    MAX_CONCURRENCY,
    OVERDUE_FACTOR,
    OVERDUE_FLOOR,
    Meters,
    RateLimiter,
    Ticket,
)
from bulkdisconnect.model import RunStats
from bulkdisconnect.sandbox import SandboxThread, account_calls
from bulkdisconnect.stopping import Stop
from tests.support import FAST, FakeClock, Workspace, recorded, wait_for

OK = Answer(status=200, account_status="disconnected")


def adaptive(clock: FakeClock, *, latency: float, rate: float = 100.0) -> Meters:
    """Adaptive meters on `clock` whose tuner has seen `latency`: at 100/s and 10 ms, 4 slots."""
    limiter = RateLimiter(rate, clock=clock, sleep=clock.sleep)
    meters = Meters(limiter, concurrency=None, stats=RunStats(), stop=Stop(), clock=clock)
    assert meters.tuner is not None
    meters.tuner.observe_latency(latency)
    meters.tuner.retune(rate)
    return meters


async def admit(meters: Meters) -> Ticket:
    """One admitted request's ticket."""
    ticket = await meters.admit()
    assert ticket is not None
    return ticket


async def settle() -> None:
    """Let every task that can run, run (a waiter woken up, a fake-clock sleep)."""
    for _ in range(10):
        await anyio.lowlevel.checkpoint()


async def admitted_now(meters: Meters, tg: anyio.abc.TaskGroup, into: list[Ticket]) -> None:
    """Start one admission in `tg`, appending its ticket to `into` once admitted."""

    async def one() -> None:
        into.append(await admit(meters))

    tg.start_soon(one)
    await settle()


@pytest.mark.anyio
async def test_an_overdue_request_gives_back_its_slot_once() -> None:
    """Requests unanswered past the floor free their slots for others; their late answers
    give back nothing a second time, so the cap holds for the requests admitted since."""
    clock = FakeClock()
    meters = adaptive(clock, latency=0.01)
    hung = [await admit(meters) for _ in range(4)]  # the whole cap
    waiting: list[Ticket] = []
    async with anyio.create_task_group() as tg:
        await admitted_now(meters, tg, waiting)
        assert waiting == []  # the cap is full
        clock.advance(OVERDUE_FLOOR + 0.1)
        assert meters.release_overdue() == 4
        await settle()
        assert len(waiting) == 1  # a freed slot went to the waiting request
        waiting += [await admit(meters) for _ in range(3)]  # the cap again, all of it
        for ticket in hung:  # their answers come at last
            meters.release(ticket)
            meters.observe(ticket, OK)
        late: list[Ticket] = []
        await admitted_now(meters, tg, late)
        assert late == []  # the late answers gave back no slot
        meters.release(waiting[0])
        await settle()
        assert len(late) == 1
    assert meters.release_overdue() == 0  # nothing is released twice either


@pytest.mark.anyio
@pytest.mark.parametrize("latency", [0.01, 1.0])
async def test_a_request_is_overdue_after_k_times_the_latency_and_at_least_the_floor(
    latency: float,
) -> None:
    """The limit is max(floor, factor x the average latency), counted from when the request
    went out; requests sent later stay within it and keep their slots."""
    clock = FakeClock()
    meters = adaptive(clock, latency=latency)
    limit = max(OVERDUE_FLOOR, OVERDUE_FACTOR * latency)
    first = await admit(meters)
    clock.advance(limit / 2)
    second = await admit(meters)
    clock.advance(first.sent + limit - 0.001 - clock())
    assert meters.release_overdue() == 0  # 1 ms short of the limit
    clock.advance(0.001)
    assert meters.release_overdue() == 1
    assert (first.overdue, second.overdue) == (True, False)
    assert meters.tuner is not None  # the first taught it its limit: the average rose
    limit = max(OVERDUE_FLOOR, OVERDUE_FACTOR * meters.tuner.latency)
    clock.advance(second.sent + limit - 0.001 - clock())
    assert meters.release_overdue() == 0
    clock.advance(0.001)
    assert meters.release_overdue() == 1
    assert second.overdue


@pytest.mark.anyio
async def test_a_hang_does_not_inflate_the_latency_but_a_slower_api_raises_it() -> None:
    """An overdue request counts as taking the limit, whatever it ends up taking: a 30 s hang
    moves the average no further than that; when every request goes overdue (the API got
    slower), the average climbs towards the new latency and the cap with it."""
    clock = FakeClock()
    meters = adaptive(clock, latency=0.01)
    assert meters.tuner is not None
    hung = await admit(meters)
    clock.advance(OVERDUE_FLOOR)
    meters.release_overdue()
    after_release = meters.tuner.latency
    assert after_release == pytest.approx(0.9 * 0.01 + 0.1 * OVERDUE_FLOOR)
    clock.advance(30.0 - OVERDUE_FLOOR)  # the client times out at last
    meters.release(hung)
    meters.observe(hung, Answer(status=0, transport_error="TimeoutError"))
    assert meters.tuner.latency == after_release
    assert hung.latency == pytest.approx(30.0)  # the metrics still see what it took

    for _ in range(40):  # the API now answers in 2 s: at first each request goes overdue
        tickets = [await admit(meters) for _ in range(4)]
        limit = max(OVERDUE_FLOOR, OVERDUE_FACTOR * meters.tuner.latency)
        clock.advance(min(limit, 2.0))
        meters.release_overdue()
        clock.advance(tickets[0].sent + 2.0 - clock())
        for ticket in tickets:
            meters.release(ticket)
            meters.observe(ticket, OK)
    assert meters.tuner.latency == pytest.approx(2.0, rel=0.05)
    assert meters.tuner.retune(100) == MAX_CONCURRENCY  # 100/s x 2 s x 1.5 + 2 > 256


@pytest.mark.anyio
async def test_a_fixed_concurrency_tracks_nothing() -> None:
    """With --concurrency the workers are the cap: nothing is tracked or released early, and
    each ticket still carries its latency."""
    clock = FakeClock()
    limiter = RateLimiter(float("inf"), clock=clock)
    meters = Meters(limiter, concurrency=4, stats=RunStats(), stop=Stop(), clock=clock)
    ticket = await admit(meters)
    clock.advance(60.0)
    assert meters.release_overdue() == 0
    meters.release(ticket)
    assert ticket.latency == 60.0
    assert not ticket.overdue


# -- end to end -------------------------------------------------------------------------------

TIMEOUT = 30  # the run's --timeout: no hung request can time out before this


@pytest.mark.slow
def test_a_run_does_not_wait_for_hung_requests(ws: Workspace, sandbox: SandboxThread) -> None:
    """With 5 % of requests hung (far more than the in-flight cap a fast API gets), every
    other account is answered and recorded before the first hung request could time out:
    the store holds them all while each account has been called once."""
    count = 300
    ws.write("ids.txt", ws.ids(count))
    sandbox.sandbox.configure(p_hang=0.05, hang_seconds=3600.0, seed=13)
    proc = ws.spawn("run", "--input", "ids.txt", "--rate", "100", "--timeout", str(TIMEOUT), *FAST)
    try:

        def all_but_the_hung_recorded() -> bool:
            hung = sum(1 for e in sandbox.sandbox.journal_snapshot() if e.fault == "hang")
            return hung > 0 and recorded(ws.state("ids")) == count - hung

        # Started before the first request went out: a deadline before any could time out.
        wait_for(all_but_the_hung_recorded, timeout=TIMEOUT - 5)
        journal = sandbox.sandbox.journal_snapshot()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    hung = {e.account_id for e in journal if e.fault == "hang"}
    assert len(hung) > 6  # more than the adaptive cap holds at this rate and latency (4-6)
    assert account_calls(journal) == dict.fromkeys(ws.ids(count), 1)  # no timeout, no retry
    outcomes = ws.outcomes("ids")
    assert {a for a, o in outcomes.items() if o is None} == hung
    assert {o for a, o in outcomes.items() if a not in hung} == {"disconnected"}
