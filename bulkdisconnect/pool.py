"""The worker pool: claims pending accounts from the store, calls the API, hands results on.

    store --pages, one Stripe account each--> lanes --the first free turn--> workers
          --results--> writer --> store

A job's accounts belong to Stripe accounts: the run's own ('') and connected accounts, each
metered apart by Stripe. Each has a lane: its claimed page, its `Budget` (limiter and AIMD
pacer) and its breaker. A worker takes the next account of whichever lane may send first, so
a throttled or slow account never holds up the others, however the input is ordered.

Each account's attempts go through `Retrier.call`, so through its budget (in-flight cap,
pacer, hard rate cap, total cap), retries included: a retry storm cannot push an account's
request rate above --rate, and a stop signal ends every wait.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.abc
import structlog

from bulkdisconnect.breaker import BAD, BreakerSettings, FailureBreaker
from bulkdisconnect.client import Answer, StripeClient
from bulkdisconnect.errors import BreakerTrippedError, UnreachableError
from bulkdisconnect.limiter import MAX_CONCURRENCY, Budget, Clock, Meters, Ticket
from bulkdisconnect.metrics import RunMetrics
from bulkdisconnect.model import ItemResult, Outcome, RunStats, idempotency_key
from bulkdisconnect.retry import DISCONNECTED, Action, Attempted, Retrier, classify_list
from bulkdisconnect.stopping import Stop
from bulkdisconnect.writer import ResultWriter

log = structlog.get_logger("bulkdisconnect")

# A lane claims a few seconds of its account's budget (this worker's share of it) at a time,
# at least MIN_PAGE and at most the page size: forty accounts at 25/s hold 5,000 accounts,
# not 20,000, and `--join` workers (2 s) leave each other work rather than hold it all.
MIN_PAGE = 10
CLAIMS_AT_ONCE = 2


class ClaimStore(Protocol):
    """What the pool needs of the store (the writer records what it produces)."""

    async def lanes(self, job: str) -> list[str]:
        """The job's Stripe accounts ('' for the run's own)."""
        ...

    async def claim(
        self, job: str, run_id: str, *, limit: int, stripe_account: str = ""
    ) -> list[str]:
        """Mark and return the run's next page of a Stripe account's accounts to call."""
        ...

    async def pending_elsewhere(self, job: str, run_id: str) -> bool:
        """Whether accounts still to call are held by another run (or free to claim)."""
        ...

    async def fail_lane(self, job: str, run_id: str, refusal: ItemResult) -> int:
        """End the accounts to call under the refusal's Stripe account that no live run
        holds failed with its answer; how many."""
        ...

    async def release_refused(
        self, job: str, run_id: str, *, stripe_account: str | None = None
    ) -> int:
        """Turn this run's failed and not_found outcomes (of one account) back to pending."""
        ...


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """The pool's shape: workers, claim pages, and how often to look for others' accounts."""

    concurrency: int | None  # None: adapt to the observed latency (Little's law)
    page_size: int = 500
    page_seconds: float = 5.0
    # How often to look again while other workers of the job hold all that is left.
    poll_interval: float = 0.5
    breaker: BreakerSettings = field(
        default_factory=lambda: BreakerSettings(min_sample=100, threshold=0.5)
    )


@dataclass(kw_only=True, eq=False)
class Pool:
    """Works every pending account of a job once, until done, stopped or refused."""

    job: str
    run_id: str
    store: ClaimStore
    client: StripeClient
    meters: Meters
    retrier: Retrier
    breaker: FailureBreaker  # the run's: mostly bad answers everywhere stop it all
    writer: ResultWriter
    settings: PoolSettings
    stats: RunStats
    stop: Stop
    metrics: RunMetrics | None = None
    clock: Clock = time.monotonic

    async def run(self) -> None:
        """Work until no account is pending or a stop is asked for."""
        # As many workers as requests may be in flight. An account waiting out a backoff
        # holds its worker: with a fixed --concurrency that briefly lowers the requests in
        # flight (a pool twice as large cost ~15 % of throughput in benchmarks/ to avoid it);
        # with an adaptive one it holds no request slot.
        workers = self.settings.concurrency or MAX_CONCURRENCY
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.meters.tune)
            lanes = Lanes(
                store=self.store,
                job=self.job,
                run_id=self.run_id,
                meters=self.meters,
                settings=self.settings,
                tg=outer,
                stop=self.stop,
                clock=self.clock,
            )
            await lanes.open()
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(self._work, lanes)
            outer.cancel_scope.cancel()

    async def _work(self, lanes: Lanes) -> None:
        requested = self.stop.requested
        while not requested.is_set():
            turn = lanes.take() or await lanes.next()
            if turn is None:
                return
            lane, account_id, ticket = turn
            result = await self._disconnect(lane, account_id, ticket)
            if result is None:  # stopped before it got an outcome: stays pending
                return
            if lane.paused and result.outcome in BAD:
                continue  # its breaker tripped: not final, stays pending for a rerun
            await self._put(result)
            if self.breaker.observe(result.outcome):
                raise BreakerTrippedError(
                    f"failure breaker tripped: {self.breaker.diagnosis()}; "
                    "nothing was kept from this run's failures, a rerun after the fix "
                    "calls them again"
                )
            if lane.refusal is None and result.error_code == "account_invalid":
                await self._refuse(lanes, lane, result)
            elif lanes.many and lane.breaker.observe(result.outcome) and not lane.paused:
                await self._pause(lanes, lane)

    async def _put(self, result: ItemResult) -> None:
        writer = self.writer
        if writer.put(result):
            await writer.room()
        self.stats.outcomes[result.outcome] += 1
        if self.metrics is not None:
            self.metrics.outcome(result.outcome)

    async def _refuse(self, lanes: Lanes, lane: Lane, refusal: ItemResult) -> None:
        """The platform has no access to a connected account (403 account_invalid): its
        accounts end failed with Stripe's answer, without a call each; the others go on."""
        stripe_account = lane.budget.stripe_account
        log.error(
            "bulkdisconnect.account_refused",
            stripe_account=stripe_account or None,
            code=refusal.error_code,
            message=refusal.error_message,
        )
        self.stats.refused[stripe_account] = (
            f"{refusal.error_code}: {refusal.error_message or 'no message'}"
        )
        held = await lanes.close(lane, refusal=refusal)
        for account_id in held:  # claimed by this run: failed here, under its claim
            await self._put(refusal._replace(account_id=account_id, attempts=0))
        failed = await self.store.fail_lane(self.job, self.run_id, refusal)
        self.stats.outcomes[Outcome.FAILED] += failed
        if self.metrics is not None:
            for _ in range(failed):
                self.metrics.outcome(Outcome.FAILED)

    async def _pause(self, lanes: Lanes, lane: Lane) -> None:
        """A breaker tripped on one account's answers (mostly resource_missing: rows filed
        under the wrong connected account): its accounts stay pending; the others go on."""
        stripe_account = lane.budget.stripe_account
        reason = f"failure breaker tripped: {lane.breaker.diagnosis()}"
        self.stats.refused[stripe_account] = reason
        await lanes.close(lane)
        await self.writer.flush()  # this run's failures of it, written, then released
        released = await self.store.release_refused(
            self.job, self.run_id, stripe_account=stripe_account
        )
        log.error(
            "bulkdisconnect.account_paused",
            stripe_account=stripe_account or None,
            released=released,
            reason=reason,
        )

    async def _disconnect(self, lane: Lane, account_id: str, ticket: Ticket) -> ItemResult | None:
        """All attempts for one account, at most --max-attempts requests in all (read-backs
        included); None if the run stopped before it got an outcome.

        A 500 that Stripe saved under the Idempotency-Key comes back to every retry with that
        key: the account is read back instead. Disconnected, that is its outcome; still
        connected, it is asked again under the key's next generation.
        """
        budget = lane.budget
        stripe_account = budget.stripe_account
        client, most = self.client, self.retrier.policy.max_attempts
        used, generation, first_attempt_at = 0, 0, 0.0
        first: Ticket | None = ticket  # the first attempt's, admitted with the account's turn
        while True:
            key = idempotency_key(self.job, account_id, stripe_account, generation)
            attempted = await self.retrier.call(
                functools.partial(client.disconnect, account_id, key, stripe_account),
                about=account_id,
                meter=budget,
                ticket=first,
                max_attempts=most - used,
            )
            first = None
            if attempted is None:
                return None
            used += attempted.attempts
            first_attempt_at = first_attempt_at or attempted.first_attempt_at
            if attempted.decision.action is not Action.READ_BACK or used >= most:
                break
            read = await self.retrier.call(
                functools.partial(client.retrieve_account, account_id, stripe_account),
                about=account_id,
                judge=classify_list,
                meter=budget,
                max_attempts=most - used,
            )
            if read is None:
                return None
            used += read.attempts
            if read.answer.account_status == "disconnected" and read.answer.status == 200:
                attempted = read._replace(decision=DISCONNECTED)
                break
            if read.decision.outcome is Outcome.NOT_FOUND:
                attempted = read
                break
            if read.answer.status != 200 or used >= most:
                break  # not read back, or no attempt left: the saved 500 is the outcome
            generation += 1
        attempted = attempted._replace(attempts=used, first_attempt_at=first_attempt_at)
        return self._outcome(account_id, attempted, stripe_account)

    def _outcome(self, account_id: str, attempted: Attempted, stripe_account: str) -> ItemResult:
        """The result an account's last answer (and its verdict) amounts to."""
        answer, decision, attempts, first_attempt_at = attempted
        if decision.action is not Action.FINAL:
            return self._gave_up(account_id, attempted, stripe_account)
        assert decision.outcome is not None
        error_code = decision.error_code or _error_code(answer, decision.outcome)
        error_message = decision.error_message or answer.error_message
        if decision.outcome is Outcome.FAILED:
            _log_failure(account_id, answer, attempts, code=error_code, message=error_message)
        return ItemResult(
            account_id=account_id,
            outcome=decision.outcome,
            attempts=attempts,
            http_status=answer.status,
            error_code=error_code,
            error_message=error_message,
            request_id=answer.request_id,
            first_attempt_at=first_attempt_at,
            stripe_account=stripe_account,
        )

    def _gave_up(self, account_id: str, attempted: Attempted, stripe_account: str) -> ItemResult:
        """The outcome of an account whose attempts were all retryable failures."""
        answer, _, attempts, first_attempt_at = attempted
        if answer.connect_error is not None and not self.meters.reached:
            raise UnreachableError(
                f"cannot reach the API: {answer.connect_error}; check --api-base "
                "(STRIPE_API_BASE), DNS, proxy and network; nothing was marked failed"
            )
        _log_failure(account_id, answer, attempts)
        return ItemResult(
            account_id=account_id,
            outcome=Outcome.FAILED,
            attempts=attempts,
            http_status=answer.status or None,
            error_code=_error_code(answer, Outcome.FAILED),
            error_message=f"gave up after {attempts} attempts; last: "
            f"{answer.error_message or answer.transport_error or answer.status}",
            request_id=answer.request_id,
            first_attempt_at=first_attempt_at,
            stripe_account=stripe_account,
        )


@dataclass(eq=False, slots=True)
class Lane:
    """One Stripe account's share of the job: its claimed page, budget and breaker."""

    budget: Budget
    breaker: FailureBreaker
    settings: PoolSettings
    queue: deque[str] = field(default_factory=deque)
    exhausted: bool = False  # its last claim found nothing
    refilled: anyio.Event | None = None  # set when the claim under way is done
    entry: int = -1  # its live entry in the turn heap (-1: not listed)
    paused: bool = False  # its breaker tripped: what is left stays pending
    refusal: ItemResult | None = None  # the answer that refused it (account_invalid)

    @property
    def page_size(self) -> int:
        """Accounts to claim at a time: a few seconds' worth at this worker's share."""
        rate, page = self.budget.limiter.rate, self.settings.page_size
        if math.isinf(rate):
            return page
        return max(MIN_PAGE, min(page, math.ceil(rate * self.settings.page_seconds)))

    @property
    def closed(self) -> bool:
        return self.paused or self.refusal is not None


@dataclass(eq=False, slots=True)
class _Waiter:
    """A worker queued for a turn; its event is set when it should look."""

    woken: anyio.Event = field(default_factory=anyio.Event)


@dataclass(kw_only=True, eq=False)
class Lanes:
    """The lanes of a run, and whose turn it is: a heap of lanes by when each may send next.

    Taking a turn is synchronous while a lane may send now (a worker goes from an answer to
    its next request without a trip through the event loop). Otherwise workers queue; a
    timer wakes the head of the queue when the earliest lane's turn comes, and nobody else:
    each turn costs one wake-up, idle workers none. Each lane claims its next page in the
    background once its page runs low; when nothing is left to claim but other workers of
    the job still hold accounts, they keep looking: a worker that dies leaves its accounts
    behind once its lease runs out.
    """

    store: ClaimStore
    job: str
    run_id: str
    meters: Meters
    settings: PoolSettings
    tg: anyio.abc.TaskGroup
    stop: Stop
    clock: Clock
    _lanes: dict[str, Lane] = field(default_factory=dict, init=False)
    _heap: list[tuple[float, int, Lane]] = field(default_factory=list, init=False)
    _entries: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _waiters: deque[_Waiter] = field(default_factory=deque, init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False)  # wakes the head
    _polling: bool = field(default=False, init=False)
    # Claims under way at once: each holds a store connection (PostgreSQL's pool is small,
    # and the heartbeat must not wait behind forty lanes' claims).
    _claiming: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(CLAIMS_AT_ONCE), init=False
    )
    _finished: bool = field(default=False, init=False)

    @property
    def many(self) -> bool:
        """Whether the job spans several Stripe accounts (each then has its own breaker)."""
        return len(self._lanes) > 1

    async def open(self) -> None:
        """Find the job's Stripe accounts and claim a first page of each."""
        self.tg.start_soon(self._wake_on_stop)
        await self._discover()
        for lane in list(self._lanes.values()):
            if lane.refilled is not None:
                await lane.refilled.wait()

    async def _discover(self) -> None:
        for stripe_account in await self.store.lanes(self.job):
            lane = self._lanes.get(stripe_account)
            if lane is None:
                lane = self._lanes[stripe_account] = self._lane(stripe_account)
            if not lane.closed:
                lane.exhausted = False
                self._refill(lane)

    def _lane(self, stripe_account: str) -> Lane:
        budget = self.meters.budget(stripe_account)
        return Lane(budget, FailureBreaker(self.settings.breaker), self.settings)

    def take(self) -> tuple[Lane, str, Ticket] | None:
        """The next account and its admitted ticket if one may go now, without waiting."""
        if self._waiters:  # first come, first served
            return None
        ticket = self.meters.slot_now()
        if ticket is None:
            return None
        return self._taken(ticket)

    async def next(self) -> tuple[Lane, str, Ticket] | None:
        """The next account to work, with its lane and its admitted ticket (an in-flight
        slot and its account's turn); None when none is pending or the run stops.

        Workers queue for turns first come, first served; only the head of the queue is
        woken, when a lane may send (or something changed), and it takes an in-flight slot
        only then: a worker waiting for a turn holds no slot that a request could use.
        """
        me = _Waiter()
        self._waiters.append(me)
        if len(self._waiters) == 1:
            self._arm()
        try:
            while True:
                await me.woken.wait()
                if self.stop.requested.is_set():
                    return None
                if self._ready() is not None:
                    ticket = await self.meters.slot()
                    if ticket is None:
                        return None
                    if (turn := self._taken(ticket)) is not None:
                        return turn
                elif self._done():
                    return None
                me.woken = anyio.Event()
                self._arm()
        finally:
            self._waiters.remove(me)
            self._arm()

    def _arm(self) -> None:
        """Wake the head of the queue when the earliest lane may send: now, by a timer, or
        (nothing listed while pages are being claimed) when something changes (`_poke`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiters:
            return
        woken = self._waiters[0].woken
        delay = 0.0 if self._ready() is not None else self._due_in()
        if math.isinf(delay) and not (self._polling or self._claiming_any()):
            delay = 0.0  # nothing to wait for: the head finds out whether all is done
        if delay <= 0:
            woken.set()
        elif not math.isinf(delay):
            self._timer = asyncio.get_running_loop().call_later(delay, woken.set)

    def _poke(self) -> None:
        """Something changed (a page came, a lane closed): the head looks again."""
        if self._waiters:
            self._waiters[0].woken.set()

    def _claiming_any(self) -> bool:
        return any(lane.refilled is not None for lane in self._lanes.values())

    async def _wake_on_stop(self) -> None:
        await self.stop.requested.wait()
        for waiter in self._waiters:
            waiter.woken.set()

    def _taken(self, ticket: Ticket) -> tuple[Lane, str, Ticket] | None:
        """The turn `_pick` takes, sent under `ticket`; else None, the slot given back."""
        turn = self._pick()
        if turn is None:
            self.meters.give_back(ticket)
            return None
        self.meters.sent(ticket, turn[0].budget)
        return turn[0], turn[1], ticket

    def _ready(self) -> Lane | None:
        """The lane that may send now, if any, without taking its turn."""
        return self._first(take=False)

    def _pick(self) -> tuple[Lane, str] | None:
        """Take the turn of the lane that may send first, if it may send now."""
        lane = self._first(take=True)
        if lane is None:
            return None
        account_id = lane.queue.popleft()
        if len(lane.queue) <= lane.page_size // 2 and not lane.exhausted:
            self._refill(lane)
        return lane, account_id

    def _first(self, *, take: bool) -> Lane | None:
        """The lane that may send first, if it may send now (its turn taken, with `take`)."""
        heap, now, total = self._heap, self.clock(), self.meters.total
        while heap:
            due, entry, lane = heap[0]
            if entry != lane.entry:  # superseded
                heapq.heappop(heap)
                continue
            if due > now:
                return None
            if not lane.queue or lane.closed:
                heapq.heappop(heap)
                lane.entry = -1
                continue
            budget = lane.budget
            wait = budget.ready_in(now)
            if wait > 0:
                self._list(lane, now + wait, replace=True)
                continue
            if total is not None and total.ready_in() > 0:
                return None
            if not take:
                return lane
            if not budget.try_take(now) or (total is not None and not total.try_acquire()):
                self._list(lane, now + 0.001, replace=True)  # not after all: look again soon
                continue
            if len(lane.queue) > 1:
                self._list(lane, now + budget.ready_in(now), replace=True)
            else:
                heapq.heappop(heap)
                lane.entry = -1
            return lane
        return None

    def _list(self, lane: Lane, due: float, *, replace: bool = False) -> None:
        """(Re)list a lane in the turn heap for `due`."""
        lane.entry = next(self._entries)
        if replace:
            heapq.heapreplace(self._heap, (due, lane.entry, lane))
        else:
            heapq.heappush(self._heap, (due, lane.entry, lane))

    def _due_in(self) -> float:
        """Seconds until the earliest listed lane (or the total cap) may send; inf: none is
        listed (waiting for a page)."""
        now = self.clock()
        heap = self._heap
        while heap and heap[0][1] != heap[0][2].entry:
            heapq.heappop(heap)
        if not heap:
            return math.inf
        wait = heap[0][0] - now
        if self.meters.total is not None:
            wait = max(wait, self.meters.total.ready_in())
        return max(0.0, wait)

    def _done(self) -> bool:
        """Whether no lane has, or may yet get, an account to work."""
        if self._finished:
            return True
        if any(lane.queue and not lane.closed for lane in self._lanes.values()):
            return False
        if self._claiming_any():
            return False
        idle = all(lane.exhausted or lane.closed for lane in self._lanes.values())
        if idle and not self._polling:
            self._polling = True
            self.tg.start_soon(self._look_elsewhere)
        return False

    def _refill(self, lane: Lane) -> anyio.Event:
        """Start claiming the lane's next page unless that is under way; its done event."""
        if lane.refilled is None:
            lane.refilled = anyio.Event()
            self.tg.start_soon(self._claim_page, lane, lane.refilled)
        return lane.refilled

    async def _claim_page(self, lane: Lane, done: anyio.Event) -> None:
        try:
            async with self._claiming:
                page = await self.store.claim(
                    self.job,
                    self.run_id,
                    limit=lane.page_size,
                    stripe_account=lane.budget.stripe_account,
                )
            if not page:
                lane.exhausted = True
                return
            lane.queue.extend(page)
            if lane.entry == -1 and not lane.closed:
                self._list(lane, self.clock())
        finally:
            lane.refilled = None
            done.set()
            self._poke()

    async def _look_elsewhere(self) -> None:
        """Every lane found nothing more: finish, unless other workers of the job still hold
        accounts (or left them behind): then look again every poll interval."""
        try:
            while True:
                if self.stop.requested.is_set() or not await self.store.pending_elsewhere(
                    self.job, self.run_id
                ):
                    self._finished = True
                    return
                with self.stop.cancels():
                    await anyio.sleep(self.settings.poll_interval)
                await self._discover()
                waits = [lane.refilled for lane in self._lanes.values() if lane.refilled]
                for refilled in waits:
                    await refilled.wait()
                if any(lane.queue for lane in self._lanes.values() if not lane.closed):
                    return
        finally:
            self._polling = False
            self._poke()

    async def close(self, lane: Lane, *, refusal: ItemResult | None = None) -> list[str]:
        """Stop working a lane (refused, or its breaker tripped); the accounts this run had
        claimed of it and not started, once its claim under way (if any) is done."""
        if refusal is None:
            lane.paused = True
        else:
            lane.refusal = refusal
        if lane.refilled is not None:
            await lane.refilled.wait()
        held = list(lane.queue)
        lane.queue.clear()
        self._poke()
        return held


def _log_failure(account_id: str, answer: Answer, attempts: int, **reason: str | None) -> None:
    """One line for an account that failed: the answer's fields, and why (`code`, `message`:
    ours when the answer itself says nothing, e.g. a 200 with an unexpected status)."""
    fields = answer.described()
    fields.update({name: value for name, value in reason.items() if value is not None})
    log.warning("bulkdisconnect.failed", account_id=account_id, attempts=attempts, **fields)


def _error_code(answer: Answer, outcome: Outcome) -> str | None:
    if outcome is Outcome.DISCONNECTED:
        return None
    # Stripe's code when it gave one, else its error type (a 500 carries only `api_error`).
    return (
        answer.error_code or answer.transport_error or answer.error_type or f"http_{answer.status}"
    )
