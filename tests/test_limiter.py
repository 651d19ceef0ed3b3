"""The meters: AIMD pacing on 429s (on our own clock), Little's-law concurrency, the hard cap."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from bulkdisconnect.limiter import COOLDOWN, AdaptivePacer, ConcurrencyTuner, RateLimiter


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def feed(pacer: AdaptivePacer, clock: Clock, *, rate: float, seconds: float) -> None:
    """Clean answers at `rate` per second for `seconds`."""
    for _ in range(round(rate * seconds)):
        clock.advance(1 / rate)
        pacer.observe(rate_limited=False)


def test_a_429_lowers_the_target_below_the_accepted_rate() -> None:
    """After a 429, the target is 0.9 x what the API accepted over the last second."""
    clock = Clock()
    pacer = AdaptivePacer(100, clock=clock)
    feed(pacer, clock, rate=40, seconds=2)
    assert pacer.current == 100
    assert pacer.observe(rate_limited=True)
    assert pacer.current == pytest.approx(0.9 * 40, rel=0.05)


def test_429s_during_the_cooldown_do_not_compound() -> None:
    """429s answering requests sent at the old rate do not lower the target again."""
    clock = Clock()
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
    clock = Clock()
    pacer = AdaptivePacer(100, clock=clock)
    feed(pacer, clock, rate=100, seconds=0.05)
    pacer.observe(rate_limited=True)
    assert pacer.current == 50


def test_the_target_climbs_back_but_never_above_the_cap() -> None:
    """Clean answers raise the target: near the old limit gently, past it quickly, up to the cap."""
    clock = Clock()
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
    """Below the cap the pacer spaces acquisitions 1/target apart; at the cap it never waits."""
    pacer = AdaptivePacer(1000)
    started = anyio.current_time()
    for _ in range(50):
        async with pacer:
            pass
    assert anyio.current_time() - started < 0.05
    pacer.current = 100
    started = anyio.current_time()
    for _ in range(21):
        async with pacer:
            pass
    assert anyio.current_time() - started >= 0.19


@pytest.mark.anyio
async def test_hard_cap_admits_no_burst_at_start() -> None:
    """The first second admits no more than the cap: the bucket does not start full."""
    limiter = RateLimiter(50)
    admitted = 0
    with anyio.move_on_after(0.5):
        while True:
            async with limiter:
                admitted += 1
    assert admitted <= 26


@pytest.mark.anyio
async def test_tokens_taken_without_waiting_count_against_the_cap() -> None:
    """try_acquire takes from the same bucket: many tasks mixing it with acquire stay capped."""
    limiter = RateLimiter(100)
    admitted: list[float] = []

    async def worker() -> None:
        while True:
            if not limiter.try_acquire():
                await limiter.acquire()
            admitted.append(anyio.current_time())
            await anyio.lowlevel.checkpoint()

    started = anyio.current_time()
    with anyio.move_on_after(1.2):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(worker)
    assert 100 <= len(admitted) <= 121  # ~99/s, and the first second no more than the cap
    assert sum(1 for t in admitted if t - started < 1.0) <= 100
    assert RateLimiter(float("inf")).try_acquire()


@pytest.mark.anyio
async def test_shared_limiter_runs_at_its_share_without_a_burst() -> None:
    """share(n) gives 1/n of the cap (2 % less), with no burst even after a lower share."""
    limiter = RateLimiter(200)
    with anyio.move_on_after(0.3):  # at the whole cap first: the bucket fills
        while True:
            await limiter.acquire()
    limiter.share(4)
    assert limiter.rate == pytest.approx(200 / 4 * 0.98)
    admitted = 0
    with anyio.move_on_after(0.5):
        while True:
            await limiter.acquire()
            admitted += 1
    assert 20 <= admitted <= 26  # ~49/s for half a second, none of the old share's credit
    limiter.share(1)
    assert limiter.rate == 200
    admitted = 0
    with anyio.move_on_after(0.25):
        while True:
            await limiter.acquire()
            admitted += 1
    assert admitted >= 40  # back to the whole cap at once


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
