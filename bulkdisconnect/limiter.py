"""Meters that decide when a request may go out, kept separate and stacked by `Meters`.

- `RateLimiter`: the hard cap, --rate in any sliding one-second window (a leaky bucket).
- `AdaptivePacer`: AIMD pacing *below* the cap, lowered when Stripe answers 429.
- `ConcurrencyTuner`: sizes the in-flight cap from rate x latency (Little's law).
- `Budget`: one Stripe account's limiter and pacer (Stripe meters each account apart).
- `Meters`: the in-flight cap, the account's budget and an optional total cap, stacked in
  front of every call to Stripe, disconnects and list calls alike, and what each answer
  teaches them; a request overdue for its answer gives back its in-flight slot (a `Ticket`
  names each admitted request).

Each takes its clock (and the limiter and pacer their sleep) as arguments: the tests drive
them on a fake clock.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import structlog

from bulkdisconnect.client import Answer
from bulkdisconnect.metrics import RunMetrics
from bulkdisconnect.model import RunStats
from bulkdisconnect.stopping import Stop

log = structlog.get_logger("bulkdisconnect")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

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

# Bounds of the in-flight cap when it adapts (no --concurrency).
MIN_CONCURRENCY = 4
MAX_CONCURRENCY = 256

# A request unanswered for OVERDUE_FACTOR x the average latency, and at least OVERDUE_FLOOR
# seconds, gives back its in-flight slot (it still waits for its answer, until --timeout):
# hung requests must not fill the cap. Four times the average is past nearly every answer of
# a healthy API (the sandbox's 250 ± 50 ms never gets there); the floor spares a fast API's
# hiccups (a GC pause, a busy event loop) and is short enough that, at 1 % hung requests
# against a fast API, the few slots they hold meanwhile fit in the cap's headroom. Giving a
# slot back too early costs little: --rate stays capped, and the workers bound what is open.
OVERDUE_FACTOR = 4.0
OVERDUE_FLOOR = 0.5


class RateLimiter:
    """At most `rate` acquisitions in any sliding one-second window, from the first second.

    A bucket of `rate` tokens that starts empty (aiolimiter's `AsyncLimiter(rate, 1)`) admits
    `rate` at once and another `rate` over the next second: about twice the cap in the first
    window. Here the bucket holds C = 1 + k tokens and leaks at r' per second; n acquisitions
    then need at least (n - C) / r' seconds, so rate + 1 of them need (rate - k) / r' =
    1 + MARGIN seconds: no window of one second (even seen through some jitter) holds more
    than `rate`. The long-run rate is r' = (rate - k) / (1 + MARGIN), about 0.985 x rate.
    Waiters are served first come, first served.
    """

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, sleep: Sleep = anyio.sleep):
        self.cap = rate  # --rate: for all the job's workers together
        self.rate = rate  # this worker's share of it
        self._clock = clock
        self._sleep = sleep
        self._capacity, self._leak = _bucket(rate)
        self._level = 0.0  # tokens in the bucket
        self._drained_at = clock()
        self._waiters: deque[anyio.Event] = deque()  # the head's turn is set

    def share(self, workers: int) -> None:
        """Run at 1/workers of the cap, from now on (workers sharing one job).

        A share of a request per second or more is a whole number, one less than it could be:
        a bucket at a fractional rate r lets floor(r) + 1 through in some second, and each
        worker's timing jitter on a busy machine can squeeze one more into a second at the
        server (measured: 4 workers at 6/s each put 26 in one second under a cap of 25).
        """
        rate = self.cap if workers <= 1 else self.cap / workers * (1 - SHARED_MARGIN)
        if workers > 1 and rate >= 1:
            rate = max(1.0, math.floor(rate) - 1.0)
        if rate == self.rate or math.isinf(rate):
            return
        self._drain()
        self._capacity, self._leak = _bucket(rate)
        if rate < self.rate:
            # No burst at the new share: a worker that just joined starts at the leak rate,
            # so the others' last second at their old share plus its first stays under the cap.
            self._level = max(self._level, self._capacity)
        self.rate = rate

    def ready_in(self) -> float:
        """Seconds until `try_acquire` may take a token (0: now); those waiting go first."""
        if self._leak == math.inf:
            return 0.0
        self._drain()
        wait = (self._level + 1 - self._capacity) / self._leak
        return max(0.0, wait) + len(self._waiters) / self._leak

    def try_acquire(self) -> bool:
        """Take a token now if one is free and nobody waits for one; False: call `acquire`.

        No coroutine: this runs once per request.
        """
        if self._leak == math.inf:
            return True
        if self._waiters:
            return False
        return self._take()

    async def acquire(self) -> None:
        """Wait until one more request fits under the cap (after those waiting already)."""
        if self.try_acquire():
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        if len(self._waiters) == 1:
            turn.set()
        try:
            await turn.wait()
            while not self._take():
                await self._sleep((self._level + 1 - self._capacity) / self._leak)
        finally:
            self._waiters.remove(turn)
            if self._waiters:
                self._waiters[0].set()

    def _take(self) -> bool:
        self._drain()
        # The tolerance: a sleep computed to the token's arrival must find it there, floating
        # point rounding notwithstanding.
        if self._level + 1 > self._capacity + 1e-9:
            return False
        self._level += 1
        return True

    def _drain(self) -> None:
        now = self._clock()
        self._level = max(0.0, self._level - (now - self._drained_at) * self._leak)
        self._drained_at = now


def _bucket(rate: float) -> tuple[float, float]:
    """The (capacity, leak per second) of the bucket that caps a sliding second at `rate`."""
    if math.isinf(rate):
        return math.inf, math.inf
    credit = rate * CREDIT
    return 1 + credit, (rate - credit) / (1 + MARGIN)


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
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self.cap = cap
        self.current = cap
        self._decrease = decrease
        self._clock = clock
        self._sleep = sleep
        self._accepted: deque[float] = deque()  # times of non-429 answers, last second
        self._limited_at = -math.inf  # when the last decrease happened
        self._limited_rate = math.inf  # the accepted rate measured at the last decrease
        self._increased_at = clock()
        self._next_slot = 0.0
        self._floor = min(cap, 1.0)
        self._started = clock()

    async def wait(self) -> None:
        """Wait for the next slot at the current target (below the cap)."""
        now = self._clock()
        slot = self._take_slot(now)
        if slot > now:
            await self._sleep(slot - now)

    def ready_in(self, now: float) -> float:
        """Seconds until the next slot at the current target (0: now, or no pacing)."""
        if self.current >= self.cap:
            return 0.0
        return max(0.0, self._next_slot - 0.01 - now)

    def take(self, now: float) -> None:
        """Take the slot `ready_in` found free (no pacing at the cap)."""
        if self.current < self.cap:
            self._take_slot(now)

    def _take_slot(self, now: float) -> float:
        # A little slack so that a late wake-up does not lose its slot for good.
        slot = max(self._next_slot, now - 0.01)
        self._next_slot = slot + 1 / self.current
        return slot

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
        elif self.current < limit:  # near it: probe gently (in steps of the limit, which may
            # be far below the cap: one account throttled to 5/s under --rate 25)
            step = 0.005 * limit
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

    @property
    def latency(self) -> float:
        """The moving average of seconds per request (0 before any answer)."""
        return self._latency

    def observe_latency(self, seconds: float) -> None:
        """Fold one request's latency into the moving average."""
        self._latency = seconds if self._latency == 0.0 else 0.9 * self._latency + 0.1 * seconds

    def retune(self, rate: float) -> int:
        """Resize the in-flight cap for the current target rate; returns the new size."""
        if math.isinf(rate):  # no cap on the rate: only the bounds cap what is in flight
            return self._resize(self.high)
        wanted = math.ceil(rate * self._latency * self._headroom) + 2
        return self._resize(max(self.low, min(self.high, wanted)))

    def _resize(self, size: int) -> int:
        self.limiter.total_tokens = size
        return size


def initial_concurrency(rate: float) -> int:
    """Requests in flight before any latency is known: enough for --rate at 0.5 s each."""
    if math.isinf(rate):
        return MAX_CONCURRENCY
    return max(MIN_CONCURRENCY, min(MAX_CONCURRENCY, math.ceil(rate * 0.5 * 1.5) + 2))


class Ticket:
    """One admitted request: it holds the in-flight slot, says when it went out and under
    which account's budget."""

    __slots__ = ("budget", "latency", "overdue", "sent")

    def __init__(self) -> None:
        self.sent = 0.0  # on the meters' clock
        self.latency = 0.0  # set when it is released
        self.overdue = False  # its slot was given back before its answer came
        self.budget: Budget | None = None  # set when admitted


class Budget:
    """One Stripe account's rate budget: a no-burst limiter at --rate (this worker's share of
    it) and the AIMD pacer under it; one account's 429s slow only that account.

    It is also the `Meter` its account's attempts pass (retry.Retrier): in-flight cap, this
    budget, then the total cap.
    """

    __slots__ = ("limiter", "meters", "pacer", "stripe_account")

    def __init__(
        self, meters: Meters, stripe_account: str, limiter: RateLimiter, pacer: AdaptivePacer
    ) -> None:
        self.meters = meters
        self.stripe_account = stripe_account  # '' for the run's own
        self.limiter = limiter
        self.pacer = pacer

    def ready_in(self, now: float) -> float:
        """Seconds until this account may send its next request (0: now)."""
        return max(self.limiter.ready_in(), self.pacer.ready_in(now))

    def try_take(self, now: float) -> bool:
        """Take this account's next request's turn now, if it has one."""
        if self.pacer.ready_in(now) > 0 or not self.limiter.try_acquire():
            return False
        self.pacer.take(now)
        return True

    async def admit(self) -> Ticket | None:
        return await self.meters.admit(self)

    def release(self, ticket: Ticket) -> None:
        self.meters.release(ticket)

    def observe(self, ticket: Ticket, answer: Answer) -> None:
        self.meters.observe(ticket, answer)


class Meters:
    """The meters every call to Stripe passes, stacked, and what each answer teaches them.

    In order: the in-flight cap (adaptive without --concurrency; a fixed one is the number of
    workers), the AIMD pacer (when 429s lowered the target), then the hard rate cap. Waiting
    at any of them ends when the run stops: a request not sent by then is not sent.

    The adaptive cap is held per `Ticket`, so that `tune` can give back the slot of a request
    unanswered for longer than the observed latency makes plausible (`release_overdue`): a
    hung request must not hold a slot until --timeout while the rest of the job waits.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        concurrency: int | None,
        stats: RunStats,
        stop: Stop,
        metrics: RunMetrics | None = None,
        clock: Clock = time.monotonic,
        total: RateLimiter | None = None,
    ) -> None:
        self.own = Budget(self, "", limiter, AdaptivePacer(limiter.rate, clock=clock))
        self.total = total  # --total-rate, across every account
        self._budgets = {"": self.own}
        self._workers = 1  # workers sharing the job: each budget runs at 1/workers
        self._stats = stats
        self._stop = stop
        self._metrics = metrics
        self._clock = clock
        self._in_flight: anyio.CapacityLimiter | None = None
        # The tickets holding an adaptive slot, in the order they went out (so oldest first).
        self._flying: dict[Ticket, None] = {}
        self.tuner: ConcurrencyTuner | None = None
        if concurrency:
            stats.concurrency = concurrency
        else:
            self._in_flight = anyio.CapacityLimiter(initial_concurrency(limiter.rate))
            self.tuner = ConcurrencyTuner(
                self._in_flight, low=MIN_CONCURRENCY, high=MAX_CONCURRENCY
            )
            stats.concurrency = int(self._in_flight.total_tokens)
        stats.current_rate = limiter.rate
        self.reached = False  # whether any request got an HTTP answer

    @property
    def limiter(self) -> RateLimiter:
        """The run's own account's limiter (rows without a connected account, list calls)."""
        return self.own.limiter

    @property
    def pacer(self) -> AdaptivePacer:
        """The run's own account's pacer."""
        return self.own.pacer

    def budget(self, stripe_account: str) -> Budget:
        """The budget of a Stripe account ('': the run's own), made on first use."""
        budget = self._budgets.get(stripe_account)
        if budget is None:
            limiter = RateLimiter(self.own.limiter.cap, clock=self._clock)
            limiter.share(self._workers)
            pacer = AdaptivePacer(limiter.rate, clock=self._clock)
            budget = self._budgets[stripe_account] = Budget(self, stripe_account, limiter, pacer)
        return budget

    def share(self, workers: int) -> None:
        """Run every budget (and the total cap) at 1/workers, from now on."""
        self._workers = workers
        for budget in self._budgets.values():
            budget.limiter.share(workers)
        if self.total is not None:
            self.total.share(workers)

    @property
    def target_rate(self) -> float:
        """The rate the budgets aim at together, within the total cap."""
        rate = sum(budget.pacer.current for budget in self._budgets.values())
        return rate if self.total is None else min(rate, self.total.rate)

    async def admit(self, budget: Budget | None = None) -> Ticket | None:
        """Wait for an in-flight slot, the account's pacer and rate token, then the total's;
        the request's ticket, or None, holding nothing, if the run stops first. Only an
        actual wait pays for a cancel scope."""
        ticket = await self.slot()
        if ticket is None:
            return None
        budget = budget or self.own
        pacer, limiter, total = budget.pacer, budget.limiter, self.total
        admitted = (
            (pacer.current >= pacer.cap or await self._unless_stopped(pacer.wait))
            and (limiter.try_acquire() or await self._unless_stopped(limiter.acquire))
            and (total is None or total.try_acquire() or await self._unless_stopped(total.acquire))
            and not self._stop.requested.is_set()
        )
        if not admitted:
            self.give_back(ticket)
            return None
        self.sent(ticket, budget)
        return ticket

    def slot_now(self) -> Ticket | None:
        """An in-flight slot if one is free now (a ticket holding it), else None."""
        ticket = Ticket()
        if self._in_flight is not None:
            try:
                self._in_flight.acquire_on_behalf_of_nowait(ticket)
            except anyio.WouldBlock:
                return None
        return ticket

    async def slot(self) -> Ticket | None:
        """Wait for an in-flight slot only; a ticket holding it, or None if the run stops
        first. `sent` (or `give_back`) must follow."""
        ticket = Ticket()
        in_flight = self._in_flight
        if in_flight is not None:
            try:
                in_flight.acquire_on_behalf_of_nowait(ticket)
            except anyio.WouldBlock:
                if not await self._unless_stopped(lambda: in_flight.acquire_on_behalf_of(ticket)):
                    return None
        return ticket

    def give_back(self, ticket: Ticket) -> None:
        """A slot taken for a request that is not sent after all."""
        if self._in_flight is not None:
            self._in_flight.release_on_behalf_of(ticket)

    def sent(self, ticket: Ticket, budget: Budget) -> None:
        """The ticket's request goes out now, under `budget` (its turn taken)."""
        self._stats.requests += 1
        ticket.sent = self._clock()
        ticket.budget = budget
        if self._in_flight is not None:
            self._flying[ticket] = None

    def release(self, ticket: Ticket) -> None:
        """The request is over: note its latency, give back its slot unless it was overdue."""
        ticket.latency = self._clock() - ticket.sent
        if self._in_flight is not None and not ticket.overdue:
            del self._flying[ticket]
            self._in_flight.release_on_behalf_of(ticket)

    def release_overdue(self) -> int:
        """Give back the slots of requests unanswered for OVERDUE_FACTOR x the average
        latency (at least OVERDUE_FLOOR s); how many. Each teaches the tuner that limit as
        its latency, not what it ends up taking: one 30 s hang must not inflate the average,
        yet an API that became slower must raise it."""
        tuner, in_flight = self.tuner, self._in_flight
        if tuner is None or in_flight is None or not self._flying:
            return 0
        limit = max(OVERDUE_FLOOR, OVERDUE_FACTOR * tuner.latency)
        before = self._clock() - limit
        overdue = list(itertools.takewhile(lambda ticket: ticket.sent <= before, self._flying))
        for ticket in overdue:
            ticket.overdue = True
            del self._flying[ticket]
            in_flight.release_on_behalf_of(ticket)
            tuner.observe_latency(limit)
        if overdue:
            log.debug("bulkdisconnect.overdue", requests=len(overdue), after=round(limit, 3))
        return len(overdue)

    async def _unless_stopped(self, wait: Callable[[], Awaitable[None]]) -> bool:
        with self._stop.cancels() as scope:
            await wait()
        return not scope.cancelled_caught

    def observe(self, ticket: Ticket, answer: Answer) -> None:
        """Feed one released request's answer to the meters: its latency to the tuner (unless
        it was overdue) and metrics, 429s to the pacer."""
        stats = self._stats
        budget = ticket.budget or self.own
        pacer = budget.pacer
        if answer.status:
            self.reached = True
        if self.tuner is not None and not ticket.overdue:
            self.tuner.observe_latency(ticket.latency)
        if self._metrics is not None:
            self._metrics.request(ticket.latency, status=answer.status)
        if pacer.cap != budget.limiter.rate:  # workers joined or left the job
            pacer.set_cap(budget.limiter.rate)
        if answer.status == 429:
            stats.rate_limited += 1
        # lock_timeout is one object's lock, not the account's rate: it must not slow the run.
        limited = answer.status == 429 and answer.error_code != "lock_timeout"
        if pacer.observe(rate_limited=limited):
            log.info(
                "bulkdisconnect.throttle",
                stripe_account=budget.stripe_account or None,
                rate=round(pacer.current, 2),
                reason=answer.rate_limited_reason,
            )
        if len(self._budgets) == 1:
            stats.current_rate = pacer.current

    async def tune(self, every: float = 0.25) -> None:
        """Keep the in-flight cap at rate x latency (Little's law), giving back the slots of
        overdue requests; runs until cancelled."""
        if self.tuner is None:
            return
        while True:
            self.release_overdue()
            rate = self.target_rate
            self._stats.current_rate = rate
            self._stats.concurrency = self.tuner.retune(rate)
            await anyio.sleep(every)
