"""Adaptive control on a fake clock: the pacer converges below a server's limit, recovers after.

The server is simulated as Stripe's limiter is documented: a sliding one-second window that
answers 429 to whatever would exceed the limit. (The same against the real sandbox, timed, is
`make bench`'s throttled section.)
"""

from __future__ import annotations

from collections import deque

import pytest

from bulkdisconnect.limiter import AdaptivePacer, RateLimiter
from bulkdisconnect.sandbox import max_in_window
from tests.support import FakeClock


class WindowLimit:
    """A server that accepts at most `limit` requests in any sliding second (None: no limit)."""

    def __init__(self, clock: FakeClock, limit: float | None) -> None:
        self.clock = clock
        self.limit = limit
        self._accepted: deque[float] = deque()

    def accepts(self) -> bool:
        now = self.clock()
        while self._accepted and self._accepted[0] <= now - 1.0:
            self._accepted.popleft()
        if self.limit is not None and len(self._accepted) >= self.limit:
            return False
        self._accepted.append(now)
        return True


async def send_for(
    seconds: float, pacer: AdaptivePacer, limiter: RateLimiter, server: WindowLimit
) -> list[tuple[float, bool, float]]:
    """Requests as the pool sends them for `seconds`: (time, accepted, target) each."""
    clock = server.clock
    end = clock() + seconds
    sent = []
    while clock() < end:
        if pacer.current < pacer.cap:
            await pacer.wait()
        if not limiter.try_acquire():
            await limiter.acquire()
        accepted = server.accepts()
        pacer.observe(rate_limited=not accepted)
        sent.append((clock(), accepted, pacer.current))
    return sent


@pytest.mark.anyio
async def test_rate_converges_below_a_server_limit_and_recovers_when_it_is_lifted() -> None:
    """Under a 40/s limit the target settles below it with few 429s; lifted, it climbs back."""
    clock = FakeClock()
    limiter = RateLimiter(100, clock=clock, sleep=clock.sleep)
    pacer = AdaptivePacer(100, clock=clock, sleep=clock.sleep)
    server = WindowLimit(clock, 40)
    start = clock()
    limited = await send_for(20, pacer, limiter, server)

    targets = [100.0] + [target for _, _, target in limited]
    # Where each 429 that lowered the target left it (429s in its cooldown lower nothing).
    drops = [
        after
        for (_, ok, after), before in zip(limited, targets, strict=False)
        if not ok and after < before
    ]
    assert drops[0] == 50  # the first second can at most halve the target
    settled = [(t, ok) for t, ok, _ in limited if t - start >= 2.0]
    rejected = sum(1 for _, ok in settled if not ok)
    assert rejected / len(settled) < 0.15
    accepted = [t for t, ok in settled if ok]
    assert len(accepted) / (accepted[-1] - accepted[0]) >= 0.75 * 40  # most of the limit used
    assert all(target < 40 for target in drops[1:])  # then every 429 puts it below the limit

    server.limit = None
    lifted = await send_for(10, pacer, limiter, server)
    assert all(ok for _, ok, _ in lifted)
    last = [t for t, _, _ in lifted if t >= lifted[-1][0] - 1.0]
    assert max_in_window(last) > 1.4 * 40  # recovered well past the old limit
    assert max_in_window([t for t, _, _ in limited + lifted]) <= 100  # never above the cap
