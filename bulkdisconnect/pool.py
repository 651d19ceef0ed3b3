"""The worker pool: claims pending accounts from the store, calls the API, hands results on.

    store --claimed pages (one in memory)--> workers --results--> writer --> store

Each account's attempts pass through the concurrency cap and then the rate limiter, retries
included, so a retry storm cannot push the request rate above --rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog

from bulkdisconnect.breaker import FailureBreaker
from bulkdisconnect.client import Answer, StripeClient
from bulkdisconnect.errors import (
    AuthenticationError,
    BreakerTrippedError,
    UnreachableError,
    WrongModeError,
)
from bulkdisconnect.limiter import AdaptivePacer, ConcurrencyTuner, RateLimiter
from bulkdisconnect.metrics import RunMetrics
from bulkdisconnect.model import ItemResult, Outcome, RunStats, idempotency_key
from bulkdisconnect.retry import WRONG_MODE, Action, RetryPolicy, classify
from bulkdisconnect.store import Store
from bulkdisconnect.writer import ResultWriter

log = structlog.get_logger("bulkdisconnect")


# Bounds of the in-flight cap when it adapts (no --concurrency).
MIN_CONCURRENCY = 4
MAX_CONCURRENCY = 256


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """The pool's shape: rate cap, requests in flight, claim pages, retry policy."""

    rate: float
    concurrency: int | None  # None: adapt to the observed latency (Little's law)
    policy: RetryPolicy
    page_size: int = 500
    # How often to look again while other workers of the job hold all that is left.
    poll_interval: float = 0.5


class Pool:
    """Works every pending account of a job once, until done, stopped or refused."""

    def __init__(
        self,
        *,
        job: str,
        run_id: str,
        store: Store,
        client: StripeClient,
        limiter: RateLimiter | None = None,
        breaker: FailureBreaker,
        writer: ResultWriter,
        settings: PoolSettings,
        stats: RunStats,
        stopping: anyio.Event,
        metrics: RunMetrics | None = None,
    ) -> None:
        self._job = job
        self._run_id = run_id
        self._store = store
        self._client = client
        self._limiter = limiter or RateLimiter(settings.rate)
        self._pacer = AdaptivePacer(self._limiter.rate)
        self._breaker = breaker
        self._writer = writer
        self._settings = settings
        self._stats = stats
        self._stopping = stopping
        self._metrics = metrics
        self._waiting: set[anyio.CancelScope] = set()  # workers waiting at a meter
        self._reached = False  # whether any request of this run got an HTTP answer
        # A fixed --concurrency is enforced by the number of workers alone; an adaptive one
        # by a resizable limiter in front of the request, below MAX_CONCURRENCY workers.
        self._tuner: ConcurrencyTuner | None = None
        self._in_flight: anyio.CapacityLimiter | None = None
        if settings.concurrency:
            stats.concurrency = settings.concurrency
        else:
            in_flight = anyio.CapacityLimiter(initial_concurrency(settings.rate))
            self._tuner = ConcurrencyTuner(in_flight, low=MIN_CONCURRENCY, high=MAX_CONCURRENCY)
            self._in_flight = in_flight
            stats.concurrency = int(in_flight.total_tokens)
        stats.current_rate = settings.rate

    async def run(self) -> None:
        """Work until no account is pending or `stopping` is set."""
        # As many workers as requests may be in flight. An account waiting out a backoff
        # holds its worker: with a fixed --concurrency that briefly lowers the requests in
        # flight (a pool twice as large cost ~15 % of throughput in benchmarks/ to avoid it);
        # with an adaptive one it holds no request slot.
        workers = self._settings.concurrency or MAX_CONCURRENCY
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._stop_waiting)
            if self._tuner is not None:
                outer.start_soon(self._tune, self._tuner)
            claims = _Claims(
                self._store,
                job=self._job,
                run_id=self._run_id,
                settings=self._settings,
                tg=outer,
                stopping=self._stopping,
            )
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(self._work, claims)
            outer.cancel_scope.cancel()

    async def _tune(self, tuner: ConcurrencyTuner) -> None:
        while True:
            self._stats.concurrency = tuner.retune(self._pacer.current)
            await anyio.sleep(0.25)

    async def _work(self, claims: _Claims) -> None:
        stopping, writer = self._stopping, self._writer
        while not stopping.is_set():
            account_id = claims.take() or await claims.next()
            if account_id is None:
                return
            result = await self._disconnect(account_id)
            if result is None:  # stopped while waiting to retry: stays pending
                return
            if writer.put(result):
                await writer.room()
            self._stats.outcomes[result.outcome] += 1
            if self._metrics is not None:
                self._metrics.outcome(result.outcome)
            if self._breaker.observe(result.outcome):
                raise BreakerTrippedError(
                    f"failure breaker tripped: {self._breaker.diagnosis()}; "
                    "nothing was kept from this run's failures, a rerun after the fix "
                    "calls them again"
                )

    async def _disconnect(self, account_id: str) -> ItemResult | None:
        """All attempts for one account; None if the run stopped before it got an outcome."""
        key = idempotency_key(self._job, account_id)
        policy = self._settings.policy
        stats = self._stats
        first_attempt_at = time.time()
        attempts = 0
        in_flight = self._in_flight
        while True:
            if not await self._admit():  # stopped before this attempt went out: stays pending
                return None
            try:
                stats.requests += 1
                sent = time.monotonic()
                answer = await self._client.disconnect(account_id, key)
            finally:
                if in_flight is not None:
                    in_flight.release()
            attempts += 1
            self._observe(answer, time.monotonic() - sent)
            decision = classify(answer)
            if decision.action is Action.FATAL:
                raise _refusal(answer)
            if decision.action is Action.FINAL:
                assert decision.outcome is not None
                if decision.outcome is Outcome.FAILED:
                    _log_failure(account_id, answer, attempts)
                return ItemResult(
                    account_id=account_id,
                    outcome=decision.outcome,
                    attempts=attempts,
                    http_status=answer.status,
                    error_code=decision.error_code or _error_code(answer, decision.outcome),
                    error_message=decision.error_message or answer.error_message,
                    request_id=answer.request_id,
                    first_attempt_at=first_attempt_at,
                )
            if answer.status == 429:
                stats.rate_limited += 1
            if attempts >= policy.max_attempts:
                if answer.connect_error is not None and not self._reached:
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
                )
            if not await self._back_off(account_id, answer, attempts):
                return None

    async def _admit(self) -> bool:
        """Wait for a request slot, the pacer and a rate token, in that order.

        False, holding nothing, when the run stops first: a worker still waiting at a meter
        has sent nothing, and must not send once a stop is asked for. Only the slow paths
        (an actual wait) pay for a cancel scope; this runs once per request.
        """
        in_flight = self._in_flight
        if in_flight is not None:
            try:
                in_flight.acquire_nowait()
            except anyio.WouldBlock:
                if not await self._unless_stopped(in_flight.acquire):
                    return False
        pacer, limiter = self._pacer, self._limiter
        admitted = (
            (pacer.current >= pacer.cap or await self._unless_stopped(pacer.wait))
            and (limiter.try_acquire() or await self._unless_stopped(limiter.acquire))
            and not self._stopping.is_set()
        )
        if not admitted and in_flight is not None:
            in_flight.release()
        return admitted

    async def _unless_stopped(self, wait: Callable[[], Awaitable[None]]) -> bool:
        """Await `wait()` unless the run stops first; True if it completed."""
        if self._stopping.is_set():
            return False
        with anyio.CancelScope() as scope:
            self._waiting.add(scope)
            try:
                await wait()
            finally:
                self._waiting.discard(scope)
        return not scope.cancelled_caught

    async def _stop_waiting(self) -> None:
        """Once a stop is asked for, wake every worker still waiting at a meter."""
        await self._stopping.wait()
        for scope in list(self._waiting):
            scope.cancel()

    async def _back_off(self, account_id: str, answer: Answer, attempts: int) -> bool:
        """Wait before the next attempt; False if the run stopped meanwhile."""
        self._stats.retries += 1
        if self._metrics is not None:
            self._metrics.retry()
        delay = self._settings.policy.delay(attempts)
        log.debug(
            "bulkdisconnect.retry",
            account_id=account_id,
            attempt=attempts,
            status=answer.status,
            code=answer.error_code or answer.transport_error,
            delay=round(delay, 3),
        )
        with anyio.move_on_after(delay):
            await self._stopping.wait()
        return not self._stopping.is_set()

    def _observe(self, answer: Answer, latency: float) -> None:
        """Feed one answer to the meters: latency to the tuner and metrics, 429s to the pacer."""
        if answer.status:
            self._reached = True
        if self._tuner is not None:
            self._tuner.observe_latency(latency)
        if self._metrics is not None:
            self._metrics.request(latency, status=answer.status)
        if self._pacer.cap != self._limiter.rate:  # workers joined or left the job
            self._pacer.set_cap(self._limiter.rate)
        # lock_timeout is one object's lock, not the account's rate: it must not slow the run.
        limited = answer.status == 429 and answer.error_code != "lock_timeout"
        if self._pacer.observe(rate_limited=limited):
            self._stats.current_rate = self._pacer.current
            log.info(
                "bulkdisconnect.throttle",
                rate=round(self._pacer.current, 2),
                reason=answer.rate_limited_reason,
            )
        elif self._stats.current_rate != self._pacer.current:
            self._stats.current_rate = self._pacer.current


def initial_concurrency(rate: float) -> int:
    """Requests in flight before any latency is known: enough for --rate at 0.5 s each."""
    return max(MIN_CONCURRENCY, min(MAX_CONCURRENCY, math.ceil(rate * 0.5 * 1.5) + 2))


class _Claims:
    """Pending accounts claimed from the store a page at a time, handed out one by one.

    Handing out is synchronous while the page lasts, so a worker goes from an answer to its
    next request without a trip through the event loop; the next page is claimed in the
    background once the current one runs low, so workers never wait on the store. At most
    two pages are in memory. When nothing is left to claim but other workers of the job
    still hold accounts, it keeps looking: a worker that dies leaves its accounts behind
    once its lease runs out.
    """

    def __init__(
        self,
        store: Store,
        *,
        job: str,
        run_id: str,
        settings: PoolSettings,
        tg: anyio.abc.TaskGroup,
        stopping: anyio.Event,
    ) -> None:
        self._store = store
        self._job = job
        self._run_id = run_id
        self._settings = settings
        self._tg = tg
        self._stopping = stopping
        self._page: deque[str] = deque()
        self._exhausted = False
        self._refilled: anyio.Event | None = None  # set when the refill under way is done

    def take(self) -> str | None:
        """The next account of the page in hand, or None when it is empty (then: `next`)."""
        page = self._page
        if not page:
            return None
        if len(page) <= self._settings.page_size // 2 and not self._exhausted:
            self._refill()
        return page.popleft()

    async def next(self) -> str | None:
        """The next account to work, or None when none is pending."""
        while not self._page:
            if self._exhausted:
                return None
            await self._refill().wait()
        if len(self._page) <= self._settings.page_size // 2 and not self._exhausted:
            self._refill()
        return self._page.popleft()

    def _refill(self) -> anyio.Event:
        """Start claiming the next page unless that is under way; its done event."""
        if self._refilled is None:
            self._refilled = anyio.Event()
            self._tg.start_soon(self._claim_page, self._refilled)
        return self._refilled

    async def _claim_page(self, done: anyio.Event) -> None:
        store, job, run_id = self._store, self._job, self._run_id
        try:
            while not (
                page := await store.claim_pending(job, run_id, limit=self._settings.page_size)
            ):
                if self._stopping.is_set() or not await store.pending_elsewhere(job, run_id):
                    self._exhausted = True
                    return
                with anyio.move_on_after(self._settings.poll_interval):
                    await self._stopping.wait()
            self._page.extend(page)
        finally:
            self._refilled = None
            done.set()


def _log_failure(account_id: str, answer: Answer, attempts: int) -> None:
    log.warning(
        "bulkdisconnect.failed",
        account_id=account_id,
        attempts=attempts,
        status=answer.status,
        code=answer.error_code or answer.transport_error,
        message=answer.error_message,
        request_id=answer.request_id,
    )


def _error_code(answer: Answer, outcome: Outcome) -> str | None:
    if outcome is Outcome.DISCONNECTED:
        return None
    # Stripe's code when it gave one, else its error type (a 500 carries only `api_error`).
    return (
        answer.error_code or answer.transport_error or answer.error_type or f"http_{answer.status}"
    )


def _refusal(answer: Answer) -> AuthenticationError | WrongModeError:
    """The run-fatal error for an answer; Stripe's own message says what is wrong."""
    message = answer.error_message or f"HTTP {answer.status}"
    if answer.status == 404 and WRONG_MODE.search(message):
        return WrongModeError(f"the API key's mode does not match the accounts': {message}")
    return AuthenticationError(
        f"the API refused the key (HTTP {answer.status}"
        f"{', ' + answer.error_code if answer.error_code else ''}): {message}; "
        "fix STRIPE_API_KEY / --api-key-file and rerun"
    )
