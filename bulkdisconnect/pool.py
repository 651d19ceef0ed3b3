"""The worker pool: claims pending accounts from the store, calls the API, hands results on.

    store --claim pages--> feeder --bounded stream--> workers --results--> writer --> store

Each account's attempts pass through the concurrency cap and then the rate limiter, retries
included, so a retry storm cannot push the request rate above --rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from bulkdisconnect.breaker import FailureBreaker
from bulkdisconnect.client import Answer, StripeClient
from bulkdisconnect.errors import AuthenticationError, BreakerTrippedError, WrongModeError
from bulkdisconnect.limiter import AdaptivePacer, ConcurrencyTuner, RateLimiter
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
    """The pool's shape: rate cap, requests in flight, claim page size, retry policy."""

    rate: float
    concurrency: int | None  # None: adapt to the observed latency (Little's law)
    policy: RetryPolicy
    retry_failed: bool = False
    page_size: int = 500


class Pool:
    """Works every pending account of a job once, until done, stopped or refused."""

    def __init__(
        self,
        *,
        job: str,
        run_id: str,
        store: Store,
        client: StripeClient,
        breaker: FailureBreaker,
        writer: ResultWriter,
        settings: PoolSettings,
        stats: RunStats,
        stopping: anyio.Event,
    ) -> None:
        self._job = job
        self._run_id = run_id
        self._store = store
        self._client = client
        self._limiter = RateLimiter(settings.rate)
        self._pacer = AdaptivePacer(settings.rate)
        self._breaker = breaker
        self._writer = writer
        self._settings = settings
        self._stats = stats
        self._stopping = stopping
        fixed = settings.concurrency
        self._in_flight = anyio.CapacityLimiter(fixed or MIN_CONCURRENCY)
        self._tuner = (
            None
            if fixed
            else ConcurrencyTuner(self._in_flight, low=MIN_CONCURRENCY, high=MAX_CONCURRENCY)
        )
        stats.current_rate = settings.rate
        stats.concurrency = int(self._in_flight.total_tokens)

    async def run(self) -> None:
        """Feed and work until no account is pending or `stopping` is set."""
        # Twice as many workers as requests may be in flight, so accounts waiting out a
        # backoff do not leave the request slots idle.
        workers = 2 * (self._settings.concurrency or MAX_CONCURRENCY)
        send, receive = anyio.create_memory_object_stream[str](workers)
        async with anyio.create_task_group() as outer:
            if self._tuner is not None:
                outer.start_soon(self._tune, self._tuner)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._feed, send)
                for _ in range(workers):
                    tg.start_soon(self._work, receive.clone())
                receive.close()
            outer.cancel_scope.cancel()

    async def _tune(self, tuner: ConcurrencyTuner) -> None:
        while True:
            self._stats.concurrency = tuner.retune(self._pacer.current)
            await anyio.sleep(0.25)

    async def _feed(self, send: MemoryObjectSendStream[str]) -> None:
        after = 0
        async with send:
            while not self._stopping.is_set():
                page = await self._store.claim_pending(
                    self._job,
                    self._run_id,
                    after=after,
                    limit=self._settings.page_size,
                    retry_failed=self._settings.retry_failed,
                )
                if not page:
                    return
                after = page[-1][0]
                try:
                    for _, account_id in page:
                        await send.send(account_id)
                except anyio.BrokenResourceError:  # every worker stopped: the run is stopping
                    return

    async def _work(self, receive: ObjectReceiveStream[str]) -> None:
        async with receive:
            async for account_id in receive:
                if self._stopping.is_set():
                    return
                result = await self._disconnect(account_id)
                if result is None:  # stopped while waiting to retry: stays pending
                    return
                await self._writer.add(result)
                self._stats.outcomes[result.outcome] += 1
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
        while True:
            async with self._in_flight:
                async with self._pacer, self._limiter:
                    stats.requests += 1
                    sent = time.monotonic()
                    answer = await self._client.disconnect(account_id, key)
                if self._tuner is not None:
                    self._tuner.observe_latency(time.monotonic() - sent)
            attempts += 1
            self._observe_rate(answer)
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
            stats.retries += 1
            delay = policy.delay(attempts)
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
            if self._stopping.is_set():
                return None

    def _observe_rate(self, answer: Answer) -> None:
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
