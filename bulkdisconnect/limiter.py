"""Rate and concurrency meters, kept separate so each can be reasoned about (and tested) alone."""

from __future__ import annotations

import math
from types import TracebackType

from aiolimiter import AsyncLimiter


class RateLimiter:
    """At most `rate` acquisitions in any sliding one-second window.

    `AsyncLimiter(rate, 1)` is a leaky bucket of `rate` tokens that starts empty-levelled, so it
    admits `rate` at once and another `rate` over the next second: about twice the cap in the
    first window. A bucket holding a single token that leaks at `rate` per second spaces
    acquisitions at least 1/rate apart instead, so no window of one second holds more than
    `rate` of them.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._limiter = None if math.isinf(rate) else AsyncLimiter(1, 1 / rate)

    async def __aenter__(self) -> None:
        if self._limiter is not None:
            await self._limiter.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
