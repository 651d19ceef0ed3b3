"""The worker pool: claims pending accounts from the store, calls the API, hands results on.

    store --claimed pages (one in memory)--> workers --results--> writer --> store

Each account's attempts go through `Retrier.call`, so through the run's meters (in-flight
cap, pacer, hard rate cap), retries included: a retry storm cannot push the request rate
above --rate, and a stop signal ends every wait.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.abc
import structlog

from bulkdisconnect.breaker import FailureBreaker
from bulkdisconnect.client import Answer, StripeClient
from bulkdisconnect.errors import BreakerTrippedError, UnreachableError
from bulkdisconnect.limiter import MAX_CONCURRENCY, Meters
from bulkdisconnect.metrics import RunMetrics
from bulkdisconnect.model import ItemResult, Outcome, RunStats, idempotency_key
from bulkdisconnect.retry import Action, Attempted, Retrier
from bulkdisconnect.stopping import Stop
from bulkdisconnect.writer import ResultWriter

log = structlog.get_logger("bulkdisconnect")


class ClaimStore(Protocol):
    """What the pool needs of the store (the writer records what it produces)."""

    async def claim(self, job: str, run_id: str, *, limit: int) -> list[str]:
        """Mark and return the run's next page of accounts still to call."""
        ...

    async def pending_elsewhere(self, job: str, run_id: str) -> bool:
        """Whether accounts still to call are held by another run (or free to claim)."""
        ...


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """The pool's shape: workers, claim pages, and how often to look for others' accounts."""

    concurrency: int | None  # None: adapt to the observed latency (Little's law)
    page_size: int = 500
    # How often to look again while other workers of the job hold all that is left.
    poll_interval: float = 0.5


@dataclass(kw_only=True, eq=False)
class Pool:
    """Works every pending account of a job once, until done, stopped or refused."""

    job: str
    run_id: str
    store: ClaimStore
    client: StripeClient
    meters: Meters
    retrier: Retrier
    breaker: FailureBreaker
    writer: ResultWriter
    settings: PoolSettings
    stats: RunStats
    stop: Stop
    metrics: RunMetrics | None = None

    async def run(self) -> None:
        """Work until no account is pending or a stop is asked for."""
        # As many workers as requests may be in flight. An account waiting out a backoff
        # holds its worker: with a fixed --concurrency that briefly lowers the requests in
        # flight (a pool twice as large cost ~15 % of throughput in benchmarks/ to avoid it);
        # with an adaptive one it holds no request slot.
        workers = self.settings.concurrency or MAX_CONCURRENCY
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.meters.tune)
            claims = _Claims(
                store=self.store,
                job=self.job,
                run_id=self.run_id,
                settings=self.settings,
                tg=outer,
                stop=self.stop,
            )
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(self._work, claims)
            outer.cancel_scope.cancel()

    async def _work(self, claims: _Claims) -> None:
        requested, writer = self.stop.requested, self.writer
        while not requested.is_set():
            account_id = claims.take() or await claims.next()
            if account_id is None:
                return
            result = await self._disconnect(account_id)
            if result is None:  # stopped before it got an outcome: stays pending
                return
            if writer.put(result):
                await writer.room()
            self.stats.outcomes[result.outcome] += 1
            if self.metrics is not None:
                self.metrics.outcome(result.outcome)
            if self.breaker.observe(result.outcome):
                raise BreakerTrippedError(
                    f"failure breaker tripped: {self.breaker.diagnosis()}; "
                    "nothing was kept from this run's failures, a rerun after the fix "
                    "calls them again"
                )

    async def _disconnect(self, account_id: str) -> ItemResult | None:
        """All attempts for one account; None if the run stopped before it got an outcome."""
        key = idempotency_key(self.job, account_id)
        client = self.client
        attempted = await self.retrier.call(
            lambda: client.disconnect(account_id, key), about=account_id
        )
        if attempted is None:
            return None
        answer, decision, attempts, first_attempt_at = attempted
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
        return self._gave_up(account_id, attempted)

    def _gave_up(self, account_id: str, attempted: Attempted) -> ItemResult:
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
        )


@dataclass(kw_only=True, eq=False)
class _Claims:
    """Pending accounts claimed from the store a page at a time, handed out one by one.

    Handing out is synchronous while the page lasts, so a worker goes from an answer to its
    next request without a trip through the event loop; the next page is claimed in the
    background once the current one runs low, so workers never wait on the store. At most
    two pages are in memory. When nothing is left to claim but other workers of the job
    still hold accounts, it keeps looking: a worker that dies leaves its accounts behind
    once its lease runs out.
    """

    store: ClaimStore
    job: str
    run_id: str
    settings: PoolSettings
    tg: anyio.abc.TaskGroup
    stop: Stop
    _page: deque[str] = field(default_factory=deque, init=False)
    _exhausted: bool = field(default=False, init=False)
    _refilled: anyio.Event | None = field(default=None, init=False)  # set when the refill is done

    def take(self) -> str | None:
        """The next account of the page in hand, or None when it is empty (then: `next`)."""
        page = self._page
        if not page:
            return None
        if len(page) <= self.settings.page_size // 2 and not self._exhausted:
            self._refill()
        return page.popleft()

    async def next(self) -> str | None:
        """The next account to work, or None when none is pending."""
        while not self._page:
            if self._exhausted:
                return None
            await self._refill().wait()
        if len(self._page) <= self.settings.page_size // 2 and not self._exhausted:
            self._refill()
        return self._page.popleft()

    def _refill(self) -> anyio.Event:
        """Start claiming the next page unless that is under way; its done event."""
        if self._refilled is None:
            self._refilled = anyio.Event()
            self.tg.start_soon(self._claim_page, self._refilled)
        return self._refilled

    async def _claim_page(self, done: anyio.Event) -> None:
        store, job, run_id, stop = self.store, self.job, self.run_id, self.stop
        try:
            while not (page := await store.claim(job, run_id, limit=self.settings.page_size)):
                if stop.requested.is_set() or not await store.pending_elsewhere(job, run_id):
                    self._exhausted = True
                    return
                with stop.cancels():
                    await anyio.sleep(self.settings.poll_interval)
            self._page.extend(page)
        finally:
            self._refilled = None
            done.set()


def _log_failure(account_id: str, answer: Answer, attempts: int) -> None:
    log.warning(
        "bulkdisconnect.failed", account_id=account_id, attempts=attempts, **answer.described()
    )


def _error_code(answer: Answer, outcome: Outcome) -> str | None:
    if outcome is Outcome.DISCONNECTED:
        return None
    # Stripe's code when it gave one, else its error type (a 500 carries only `api_error`).
    return (
        answer.error_code or answer.transport_error or answer.error_type or f"http_{answer.status}"
    )
