"""Meters that decide when a request may go out, kept separate and stacked in the pool.

- `RateLimiter`: the hard cap, --rate in any sliding one-second window (aiolimiter).
- `AdaptivePacer`: AIMD pacing *below* the cap, lowered when Stripe answers 429.
- `ConcurrencyTuner`: sizes the in-flight cap from rate x latency (Little's law).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

import anyio
from aiolimiter import AsyncLimiter

# How often the target may climb while answers are clean.
INCREASE_PERIOD = 0.5
# After a decrease, 429s answering requests sent at the old rate are ignored this long.
COOLDOWN = 0.3
# The hard limiter's bucket holds 1 + CREDIT x rate tokens: credit that absorbs event-loop
# wake-ups that come late, which a bucket of exactly one token loses for good (measured: 0.95
# of the cap at 100/s, 0.90 at 250/s).
CREDIT = 0.005
# And it spaces tokens so that rate + 1 of them span at least 1 + MARGIN seconds: the server
# counts arrivals, and a few milliseconds of jitter must not squeeze an extra one in.
MARGIN = 0.01

# Workers sharing a job each keep this much further below their share: the server sees the
# sum of several processes' timing jitter (measured: 4 workers at 1 % margin on 2 busy cores
# put 1,003 requests in one second under a cap of 1,000).
SHARED_MARGIN = 0.02


class RateLimiter:
    """At most `rate` acquisitions in any sliding one-second window, from the first second.

    `AsyncLimiter(rate, 1)` is a bucket of `rate` tokens that starts empty, so it admits `rate`
    at once and another `rate` over the next second: about twice the cap in the first window.
    Here the bucket holds C = 1 + k tokens and leaks at r' per second; n acquisitions then
    need at least (n - C) / r' seconds, so rate + 1 of them need (rate - k) / r' = 1 + MARGIN
    seconds: no window of one second (even seen through some jitter) holds more than `rate`.
    The long-run rate is r' = (rate - k) / (1 + MARGIN), about 0.985 x rate.
    """

    def __init__(self, rate: float) -> None:
        self.cap = rate  # --rate: for all the job's workers together
        self.rate = rate  # this worker's share of it
        self._limiter: AsyncLimiter | None = None
        if not math.isinf(rate):
            self._limiter = AsyncLimiter(*_bucket(rate))

    def share(self, workers: int) -> None:
        """Run at 1/workers of the cap, from now on (workers sharing one job)."""
        rate = self.cap if workers <= 1 else self.cap / workers * (1 - SHARED_MARGIN)
        if rate == self.rate or self._limiter is None:
            return
        limiter = self._limiter
        # aiolimiter has no setter: settle the bucket at the old leak rate, then reshape it.
        limiter.has_capacity()
        limiter.max_rate, limiter.time_period = _bucket(rate)
        limiter._rate_per_sec = limiter.max_rate / limiter.time_period
        if rate < self.rate:
            # No burst at the new share: a worker that just joined starts at the leak rate,
            # so the others' last second at their old share plus its first stays under the cap.
            limiter._level = max(limiter._level, limiter.max_rate)
        self.rate = rate

    def try_acquire(self) -> bool:
        """Take a token now if one is free and nobody waits for one; False: call `acquire`.

        What aiolimiter's `acquire` does when it need not wait, without a coroutine: this
        runs once per request.
        """
        limiter = self._limiter
        if limiter is None:
            return True
        if limiter._waiters or not limiter.has_capacity():
            return False
        limiter._level += 1
        return True

    async def acquire(self) -> None:
        """Wait until one more request fits under the cap."""
        if self._limiter is not None:
            await self._limiter.acquire()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def _bucket(rate: float) -> tuple[float, float]:
    """The (capacity, period) of the leaky bucket that caps a sliding second at `rate`."""
    credit = rate * CREDIT
    leak = (rate - credit) / (1 + MARGIN)
    return 1 + credit, (1 + credit) / leak


class AdaptivePacer:
    """Additive-increase, multiplicative-decrease pacing under the cap, driven by 429s.

    On a rate-limit 429 the target drops to `decrease` x the rate the API actually accepted
    over the last second (in the run's first second, to no less than half the target: too
    little history to tell the limit), then ignores 429s for COOLDOWN seconds: they answer
    requests sent at the old rate. Every clean half second it climbs back: straight to 95 % of
    the rate where it was last limited, then gently up to it, then quickly past it (the limit
    was lifted), never above the cap. At the cap the pacer adds no wait at all.
    """

    def __init__(
        self,
        cap: float,
        *,
        decrease: float = 0.9,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = cap
        self.current = cap
        self._decrease = decrease
        self._clock = clock
        self._accepted: deque[float] = deque()  # times of non-429 answers, last second
        self._limited_at = -math.inf  # when the last decrease happened
        self._limited_rate = math.inf  # the accepted rate measured at the last decrease
        self._increased_at = clock()
        self._next_slot = 0.0
        self._floor = min(cap, 1.0)
        self._started = clock()

    async def __aenter__(self) -> None:
        if self.current < self.cap:
            await self.wait()

    async def wait(self) -> None:
        """Wait for the next slot at the current target (below the cap)."""
        now = self._clock()
        # A little slack so that a late wake-up does not lose its slot for good.
        slot = max(self._next_slot, now - 0.01)
        self._next_slot = slot + 1 / self.current
        if slot > now:
            await anyio.sleep(slot - now)

    async def __aexit__(self, *_: object) -> None:
        return None

    def set_cap(self, cap: float) -> None:
        """Move the cap (this worker's share changed); a target at the cap follows it."""
        self.current = cap if self.current >= self.cap else min(self.current, cap)
        self.cap = cap

    def observe(self, *, rate_limited: bool) -> bool:
        """Account for one answer; True when this answer lowered the target."""
        now = self._clock()
        accepted = self._accepted
        while accepted and accepted[0] <= now - 1.0:
            accepted.popleft()
        if not rate_limited:
            accepted.append(now)
            self._maybe_increase(now)
            return False
        if now - self._limited_at < COOLDOWN:
            return False
        # Answers accepted in the last second: under a sliding-window limit, that is the limit.
        measured = float(len(accepted))
        self._limited_rate = measured
        target = self._decrease * min(self.current, measured)
        if now - self._started < 1.0:  # too young for the last second to tell the limit
            target = max(target, self.current / 2)
        self.current = max(self._floor, target)
        self._limited_at = self._increased_at = now
        return True

    def _maybe_increase(self, now: float) -> None:
        if self.current >= self.cap or now - self._increased_at < INCREASE_PERIOD:
            return
        limit = self._limited_rate
        if self.current < 0.95 * limit:  # well below the last limit: straight back near it
            step = min(0.1 * self.cap, 0.95 * limit - self.current)
        elif self.current < limit:  # near it: probe gently
            step = 0.01 * self.cap
        else:  # past it without a 429: the limit was lifted or raised
            step = 0.1 * self.cap
        self.current = min(self.cap, self.current + step)
        self._increased_at = now


class ConcurrencyTuner:
    """Keeps requests in flight at about rate x latency x headroom, within bounds.

    Little's law: to sustain R requests/s when each takes L seconds, about R x L must be in
    flight. A slow API therefore needs more in flight, not a lower rate.
    """

    def __init__(
        self, limiter: anyio.CapacityLimiter, *, low: int, high: int, headroom: float = 1.5
    ) -> None:
        self.limiter = limiter
        self.low = low
        self.high = high
        self._headroom = headroom
        self._latency = 0.0  # EWMA of seconds per request

    def observe_latency(self, seconds: float) -> None:
        """Fold one request's latency into the moving average."""
        self._latency = seconds if self._latency == 0.0 else 0.9 * self._latency + 0.1 * seconds

    def retune(self, rate: float) -> int:
        """Resize the in-flight cap for the current target rate; returns the new size."""
        wanted = math.ceil(rate * self._latency * self._headroom) + 2
        size = max(self.low, min(self.high, wanted))
        self.limiter.total_tokens = size
        return size
