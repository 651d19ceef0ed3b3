"""The meters on a fake clock: AIMD pacing on 429s, Little's-law concurrency, the hard cap."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from bulkdisconnect.limiter import COOLDOWN, AdaptivePacer, ConcurrencyTuner, RateLimiter
from bulkdisconnect.sandbox import max_in_window
from tests.support import FakeClock


def feed(pacer: AdaptivePacer, clock: FakeClock, *, rate: float, seconds: float) -> None:
    """Clean answers at `rate` per second for `seconds`."""
    for _ in range(round(rate * seconds)):
        clock.advance(1 / rate)
        pacer.observe(rate_limited=False)


def test_a_429_lowers_the_target_below_the_accepted_rate() -> None:
    """After a 429, the target is 0.9 x what the API accepted over the last second."""
    clock = FakeClock()
    pacer = AdaptivePacer(100, clock=clock)
    feed(pacer, clock, rate=40, seconds=2)
    assert pacer.current == 100
    assert pacer.observe(rate_limited=True)
    assert pacer.current == pytest.approx(0.9 * 40, rel=0.05)


def test_429s_during_the_cooldown_do_not_compound() -> None:
    """429s answering requests sent at the old rate do not lower the target again."""
    clock = FakeClock()
    pacer = AdaptivePacer(100, clock=clock)
    feed(pacer, clock, rate=40, seconds=2)
    pacer.observe(rate_limited=True)
    lowered = pacer.current
    for _ in range(10):
        clock.advance(COOLDOWN / 20)
        assert not pacer.observe(rate_limited=True)
    assert pacer.current == lowered


def test_one_stray_429_at_start_does_not_collapse_the_rate() -> None:
    """In the first second a 429 can at most halve the target."""
    clock = FakeClock()
    pacer = AdaptivePacer(100, clock=clock)
    feed(pacer, clock, rate=100, seconds=0.05)
    pacer.observe(rate_limited=True)
    assert pacer.current == 50


def test_the_target_climbs_back_but_never_above_the_cap() -> None:
    """Clean answers raise the target: near the old limit gently, past it quickly, up to the cap."""
    clock = FakeClock()
    pacer = AdaptivePacer(100, clock=clock)
    feed(pacer, clock, rate=40, seconds=2)
    pacer.observe(rate_limited=True)
    feed(pacer, clock, rate=30, seconds=1.2)
    assert 0.95 * 40 - 0.01 <= pacer.current < 40  # straight back to 95 % of the old limit
    near = pacer.current
    feed(pacer, clock, rate=38, seconds=1)
    assert pacer.current - near <= 2 + 1e-9  # gentle probing near it: 1 % of the cap per 0.5 s
    feed(pacer, clock, rate=40, seconds=10)
    assert pacer.current == 100  # the limit is gone: back to the cap, and no further


@pytest.mark.anyio
async def test_pacing_spaces_requests_at_the_target() -> None:
    """Below the cap the pacer spaces waits 1/target apart; at the cap it never waits."""
    clock = FakeClock()
    pacer = AdaptivePacer(1000, clock=clock, sleep=clock.sleep)
    pacer.current = 100
    started = clock()
    for _ in range(21):
        await pacer.wait()
    assert clock() - started == pytest.approx(0.2, abs=0.011)  # the first goes at once


def admitted_by_polling(limiter: RateLimiter, clock: FakeClock, seconds: float) -> list[float]:
    """Times at which try_acquire succeeds when tried every millisecond for `seconds`."""
    times = []
    for _ in range(round(seconds * 1000)):
        clock.advance(0.001)
        if limiter.try_acquire():
            times.append(clock())
    return times


def test_hard_cap_admits_no_burst_and_runs_just_under_the_cap() -> None:
    """No sliding second holds more than the cap, from the first one on; the long-run rate
    is (rate - credit) / (1 + margin), about 0.985 of it."""
    clock = FakeClock()
    limiter = RateLimiter(50, clock=clock)
    times = admitted_by_polling(limiter, clock, 10.0)
    assert max_in_window(times) <= 50
    assert sum(1 for t in times if t - 1000.0 < 1.0) <= 50
    assert len(times) / 10.0 == pytest.approx(50 * 0.995 / 1.01, rel=0.01)
    assert RateLimiter(float("inf"), clock=clock).try_acquire()


@pytest.mark.anyio
async def test_waiters_are_served_in_order_and_under_the_cap() -> None:
    """Tasks waiting in acquire go first come, first served, and try_acquire never jumps
    the queue; many tasks looping on it together stay under the cap."""
    clock = FakeClock()
    limiter = RateLimiter(100, clock=clock, sleep=clock.sleep)
    while limiter.try_acquire():  # the bucket full: whoever comes next waits
        pass
    served: list[int] = []

    async def once(n: int) -> None:
        await limiter.acquire()
        served.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(once, n)
            await anyio.lowlevel.checkpoint()  # each queues before the next starts
        assert not limiter.try_acquire()  # others wait: no jumping the queue
    assert served == list(range(8))

    times: list[float] = []

    async def loop() -> None:
        for _ in range(20):
            await limiter.acquire()
            times.append(clock())

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(loop)
    assert len(times) == 160
    assert max_in_window(times) <= 100


@pytest.mark.anyio
async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    """A waiter cancelled at the head of the queue (a stop) lets the next one through."""
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, sleep=clock.sleep)
    assert limiter.try_acquire()
    got: list[str] = []

    async def wait(name: str) -> None:
        await limiter.acquire()
        got.append(name)

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as first:
            first.cancel()
            await limiter.acquire()  # cancelled where it waits
        tg.start_soon(wait, "second")
    assert got == ["second"]


def test_shared_limiter_runs_at_its_share_without_a_burst() -> None:
    """share(n) gives 1/n of the cap (2 % less, a whole number, less one for each worker's
    jitter), with no burst even after a lower share."""
    clock = FakeClock()
    limiter = RateLimiter(200, clock=clock)
    admitted_by_polling(limiter, clock, 0.3)  # at the whole cap first: the bucket fills
    limiter.share(4)
    assert limiter.rate == 48  # floor(200 / 4 x 0.98) - 1
    times = admitted_by_polling(limiter, clock, 1.0)
    assert len(times) <= 48  # none of the old share's credit, and the share's own bucket
    assert len(times) >= 45
    limiter.share(1)
    assert limiter.rate == 200
    assert len(admitted_by_polling(limiter, clock, 0.25)) >= 45  # back to the whole cap


def test_small_shares_leave_room_for_each_workers_jitter() -> None:
    """Four workers sharing 25/s run at 5/s each: 20 in all, so that one more request from
    each (timing jitter on a busy machine) still keeps a second at the server under 25."""
    clock = FakeClock()
    limiter = RateLimiter(25, clock=clock)
    limiter.share(4)
    assert limiter.rate == 5
    assert max_in_window(admitted_by_polling(limiter, clock, 3.0)) == 5
    limiter.share(30)  # under one a second each: the fraction itself
    assert limiter.rate == pytest.approx(25 / 30 * 0.98)


def test_concurrency_follows_rate_times_latency() -> None:
    """The in-flight cap is about rate x latency x 1.5, within its bounds."""
    limiter = anyio.CapacityLimiter(4)
    tuner = ConcurrencyTuner(limiter, low=4, high=64)
    for _ in range(50):
        tuner.observe_latency(0.25)
    assert tuner.retune(100) == 40  # ceil(100 x 0.25 x 1.5) + 2
    assert limiter.total_tokens == 40
    assert tuner.retune(1000) == 64
    assert tuner.retune(1) == 4
