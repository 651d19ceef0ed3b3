"""One run of a job, as a story: open → lock → plan → approve → work → summarise → exit code.

Each phase is a short function below, in that order; the mechanics live in their modules:
stopping.py (signals), lease.py (heartbeats and rate share), planning.py (staging and merge),
pool.py and writer.py (the work), limiter.py and retry.py (the meters and the retry loop
that list calls and disconnects share), metrics.py, report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

import anyio
import structlog

from bulkdisconnect.breaker import BreakerSettings, FailureBreaker
from bulkdisconnect.client import StripeClient, open_client
from bulkdisconnect.config import RunConfig, SqlQuery
from bulkdisconnect.errors import (
    BreakerTrippedError,
    BulkDisconnectError,
    ExitCode,
    StoreError,
    UsageError,
)
from bulkdisconnect.lease import Lease
from bulkdisconnect.limiter import MAX_CONCURRENCY, Meters
from bulkdisconnect.logs import redact_text
from bulkdisconnect.metrics import RunMetrics, run_metrics
from bulkdisconnect.model import GOOD_OUTCOMES, RunStats
from bulkdisconnect.planning import PLAN_CHUNK, plan_input
from bulkdisconnect.pool import Pool, PoolSettings
from bulkdisconnect.progress import show_progress
from bulkdisconnect.reconcile import after_run
from bulkdisconnect.report import format_plan, format_summary
from bulkdisconnect.retry import Retrier, metered
from bulkdisconnect.sampler import keep_sampling
from bulkdisconnect.sources import Source, open_run_source
from bulkdisconnect.sources.customers import CustomerBook
from bulkdisconnect.stopping import Stop, StoppedError, cancel_after_grace, on_signals
from bulkdisconnect.store import PlanCounts, open_store
from bulkdisconnect.store.core import SqlStore
from bulkdisconnect.writer import ResultWriter

log = structlog.get_logger("bulkdisconnect")

# Workers sharing a job end together better with smaller pages in hand.
JOIN_PAGE_SIZE = 100
JOIN_PAGE_SECONDS = 2.0
SOURCE_QUERY_CHARS = 500  # of a SQL source's query, kept with the job for its audit page


@dataclass(frozen=True, kw_only=True)
class RunHooks:
    """What a run talks to besides the API and the store: output, stdin, the operator."""

    out: TextIO
    progress: bool = True
    stdin: BinaryIO | None = None
    # Asks the operator to go ahead (a live key on a terminal); None: nobody to ask.
    confirm: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class _Run:
    """What the phases of one run share."""

    config: RunConfig
    hooks: RunHooks
    store: SqlStore
    client: StripeClient | None
    source: Source
    book: CustomerBook
    meters: Meters
    retrier: Retrier
    stats: RunStats
    stop: Stop
    metrics: RunMetrics | None


async def run_job(config: RunConfig, hooks: RunHooks) -> ExitCode:
    """Run the job once and return its exit code; raises BulkDisconnectError for 2 to 6."""
    asyncio.get_running_loop().set_exception_handler(_log_background_error)
    try:
        async with on_signals() as stop, _opened(config, hooks, stop) as run:
            if config.dry_run:
                return await _dry_run(run)
            return await _locked(run)
    except BaseExceptionGroup as group:  # a task group's: ours is the one that tells the exit
        raise _ours(group) or group from None
    return ExitCode.INTERRUPTED  # a third signal abandoned the run


def _log_background_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An error in a task nobody awaits any more, in one log line rather than a traceback on
    stderr: asyncpg still resetting a connection whose query a stopping run cancelled."""
    log.warning(
        "bulkdisconnect.background_error",
        message=context.get("message"),
        error=repr(context.get("exception")),
    )


@asynccontextmanager
async def _opened(config: RunConfig, hooks: RunHooks, stop: Stop) -> AsyncIterator[_Run]:
    """The run's parts. The source is opened and checked before the store: a run refused for
    its input or configuration leaves no store behind, and a dry run creates none."""
    stats = RunStats()
    metrics = run_metrics(config.job, file=config.metrics_file, pushgateway=config.pushgateway)
    meters, retrier = metered(config, stats=stats, stop=stop, metrics=metrics)
    book = CustomerBook(config.job)
    async with _client(config) as client:
        source = open_run_source(
            config.source, stdin=hooks.stdin, client=client, retrier=retrier, book=book
        )
        await source.check()
        store = await open_store(config.state, create=not config.dry_run)
        book.bind(store)
        try:
            yield _Run(
                config, hooks, store, client, source, book, meters, retrier, stats, stop, metrics
            )
        finally:
            with stop.bounded():
                await store.aclose()


@asynccontextmanager
async def _client(config: RunConfig) -> AsyncIterator[StripeClient | None]:
    """One HTTP session for the run (list calls and disconnects), if it has a key."""
    if config.api_key is None:
        yield None
        return
    pool_size = config.concurrency or MAX_CONCURRENCY
    async with open_client(config, api_key=config.api_key.reveal(), pool_size=pool_size) as client:
        yield client


async def _dry_run(run: _Run) -> ExitCode:
    """Plan without changing the job: what a run would do."""
    counts = await _plan_unless_stopped(run, commit=False)
    if counts is None:
        return ExitCode.INTERRUPTED
    run.hooks.out.write(format_plan(run.config.job, counts, dry_run=True))
    _warn_if_empty(run, counts)
    return ExitCode.OK


async def _locked(run: _Run) -> ExitCode:
    """Hold the job for the rest of the run; record the run and how it ended."""
    config, store = run.config, run.store
    # The run ID names the lock holder, and marks the accounts this run claims.
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    await store.acquire_lock(
        config.job,
        run_id,
        stale_after=config.lock_stale_after,
        join=config.join,
        source=config.source_fingerprint,
    )
    exit_code, message = ExitCode.INTERRUPTED, "interrupted"
    try:
        await store.start_run(config.job, run_id, source=_described(config, run.source))
        lease = Lease(
            store=store,
            job=config.job,
            owner=run_id,
            lease=config.lock_stale_after,
            join=config.join,
            limiter=run.meters,
        )
        async with lease.hold():
            exit_code, message = await _plan_and_work(run, run_id)
    except* BulkDisconnectError as group:
        error = _ours(group)
        assert error is not None
        exit_code, message = error.exit_code, str(error)
        run.stop.failed()
        raise
    finally:
        await _last_words(run, run_id, exit_code, redact_text(message))
    return exit_code


async def _last_words(run: _Run, run_id: str, exit_code: ExitCode, message: str) -> None:
    """Record how the run ended and let the job go, as far as the store allows in time: a
    lock left behind lapses with its lease."""
    job, store, stop = run.config.job, run.store, run.stop
    with stop.bounded(), _unless_the_store_fails("the run's end"):
        await store.finish_run(run_id, int(exit_code), message)
    if run.metrics is not None:
        run.metrics.finish(int(exit_code))
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(run.metrics.publish)
    with stop.bounded(), _unless_the_store_fails("the lock"):
        await store.release_lock(job, run_id)


@contextlib.contextmanager
def _unless_the_store_fails(what: str) -> Iterator[None]:
    """Log, not raise, a store that fails on the way out: the run's exit code says why."""
    try:
        yield
    except StoreError as exc:
        log.error("bulkdisconnect.store.unwritten", what=what, reason=str(exc))  # noqa: TRY400


async def _plan_and_work(run: _Run, run_id: str) -> tuple[ExitCode, str]:
    """Plan (or join the plan), work what is pending, summarise; the exit code and summary."""
    config, stats = run.config, run.stats
    started = time.monotonic()
    counts = await _plan(run, run_id)
    if counts is None:
        return ExitCode.INTERRUPTED, "interrupted while planning; nothing was called"
    stats.planned = counts.to_call
    log.info(
        "bulkdisconnect.run.start",
        job=config.job,
        run_id=run_id,
        to_call=counts.to_call,
        rate=config.rate,
        concurrency=config.concurrency or "adaptive",
    )
    if counts.to_call:
        unwritten = await _work(run, run_id)
        if unwritten and not run.stop.requested.is_set():
            raise StoreError(
                f"the state store {run.store.description} did not take the last "
                f"{unwritten} results in time; their accounts stay pending and a rerun "
                "sends them again under the same idempotency keys"
            )
    ended = await _summarise(run, run_id, time.monotonic() - started)
    return await after_run(run, ended) if config.reconcile else ended  # run --reconcile


async def _plan(run: _Run, run_id: str) -> PlanCounts | None:
    """Plan the input into the job; None if a stop came first (nothing called; in SQLite,
    spans of the input already merged stay, and a rerun merges the rest).

    Of the workers joining one job, the first plans and the others find the plan in place.
    """
    job = run.config.job
    if not run.config.join:
        return await _plan_unless_stopped(run, commit=True)
    with contextlib.suppress(StoppedError):
        async with run.store.planning(job, run_id) as must_plan:
            if must_plan:
                counts = await _plan_unless_stopped(run, commit=True)
                if counts is None:  # leave it unplanned: the next worker plans
                    raise StoppedError
                return counts
    if run.stop.requested.is_set():
        return None
    pending = (await run.store.counts(job)).get(None, 0)
    run.hooks.out.write(f"joined job {job}: planned by another worker, {pending} to call\n")
    log.info("bulkdisconnect.joined", job=job, run_id=run_id, pending=pending)
    return PlanCounts(read=0, invalid=0, duplicates=0, already_done=0, to_call=pending)


async def _plan_unless_stopped(run: _Run, *, commit: bool) -> PlanCounts | None:
    """Stage the whole source, approve it, merge it (with `commit`); None if stopped."""
    config = run.config
    counts = None
    with run.stop.cancels(), contextlib.suppress(StoppedError):
        counts = await plan_input(
            run.store,
            config.job,
            run.source.chunks(PLAN_CHUNK),
            retry_failed=config.retry_failed,
            stripe_account=config.stripe_account,
            approve=(lambda counts: _approve(config, counts, run.hooks)) if commit else None,
            commit=commit,
        )
    if counts is None:
        return None
    if commit:
        if run.metrics is not None:
            run.metrics.planned(invalid=counts.new_invalid, settled=counts.new_settled)
        await run.book.remember()
        run.hooks.out.write(format_plan(config.job, counts, dry_run=False))
        _warn_if_empty(run, counts)
    return counts


def _approve(config: RunConfig, counts: PlanCounts, hooks: RunHooks) -> None:
    """The safety rails between a plan and its first disconnect (raising refuses it)."""
    if config.max_accounts is not None and counts.to_call > config.max_accounts:
        raise UsageError(
            f"the source holds {counts.to_call} accounts to disconnect, more than "
            f"--max-accounts {config.max_accounts}: check the query or input, or raise the limit"
        )
    if not config.is_live or config.yes or counts.to_call == 0:
        return
    question = f"Disconnect {counts.to_call} accounts with a LIVE key (job {config.job})?"
    if hooks.confirm is None or not hooks.confirm(question):
        raise UsageError(
            f"refusing to disconnect {counts.to_call} accounts with a live key without "
            "confirmation: pass --yes (or answer the prompt on a terminal)"
        )


def _warn_if_empty(run: _Run, counts: PlanCounts) -> None:
    """Say so when the source yielded nothing: an empty export or a query matching no row is
    more often a mistake than a job with nothing to do."""
    if counts.read or run.book.skipped:  # customers listed before: nothing new, rightly
        return
    run.hooks.out.write(f"0 accounts read from {run.source.description}\n")
    log.warning("bulkdisconnect.empty_source", job=run.config.job, source=run.source.description)


async def _work(run: _Run, run_id: str) -> int:
    """Call the API for every pending account; flush every outcome however this ends, as
    far as the store allows in time: how many results it did not take."""
    config, store, stats = run.config, run.store, run.stats
    assert run.client is not None
    writer = ResultWriter(store, config.job, run_id)
    breaker = BreakerSettings(
        min_sample=config.breaker_min_sample, threshold=config.breaker_threshold
    )
    pool = Pool(
        job=config.job,
        run_id=run_id,
        store=store,
        client=run.client,
        meters=run.meters,
        retrier=run.retrier,
        breaker=FailureBreaker(breaker),
        writer=writer,
        settings=PoolSettings(
            concurrency=config.concurrency,
            page_size=JOIN_PAGE_SIZE if config.join else PoolSettings.page_size,
            page_seconds=JOIN_PAGE_SECONDS if config.join else PoolSettings.page_seconds,
            breaker=breaker,
        ),
        stats=stats,
        stop=run.stop,
        metrics=run.metrics,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            if run.metrics is not None:
                tg.start_soon(run.metrics.keep_published, stats)
            tg.start_soon(keep_sampling, store, config.job, run_id, stats)  # report's charts
            if run.hooks.progress:
                tg.start_soon(show_progress, stats)
            with anyio.CancelScope() as pool_scope:
                tg.start_soon(cancel_after_grace, run.stop, pool_scope, config.grace)
                await pool.run()
            tg.cancel_scope.cancel()
    except* BreakerTrippedError as group:
        # The answers that tripped the breaker are not final: a rerun calls them again.
        run.stop.failed()
        released = None
        with run.stop.bounded(), _unless_the_store_fails("the last results"):
            await writer.flush()
        with run.stop.bounded(), _unless_the_store_fails("the breaker's release"):
            released = await store.release_refused(config.job, run_id)
        log.error(  # noqa: TRY400 - the reason is the message; a traceback says nothing more
            "bulkdisconnect.breaker", released=released, reason=str(group.exceptions[0])
        )
        raise
    finally:
        if sys.exc_info()[0] is not None:  # failing: the store may be what fails
            run.stop.failed()
        with run.stop.bounded(), _unless_the_store_fails("the last results"):
            await writer.flush()
        if writer.unwritten:
            log.error(
                "bulkdisconnect.store.unwritten",
                what="the last results",
                accounts=writer.unwritten,
                reason="the store did not take them in time; their accounts stay pending",
            )
    return writer.unwritten


async def _summarise(run: _Run, run_id: str, elapsed: float) -> tuple[ExitCode, str]:
    """Print the summary and log the run's end; the exit code and the summary."""
    config, stats = run.config, run.stats
    job_counts = None
    with run.stop.bounded():
        job_counts = await run.store.counts(config.job)
    if job_counts is None:
        silent = f"the state store {run.store.description} did not answer in time"
        if not run.stop.requested.is_set():
            raise StoreError(f"{silent}; nothing was lost, a rerun resumes")
        run.hooks.out.write(f"interrupted; {silent}: a rerun resumes\n")
        return ExitCode.INTERRUPTED, f"interrupted; {silent}"
    if run.metrics is not None:
        run.metrics.set_progress(pending=job_counts.get(None, 0), target_rate=stats.current_rate)
    paused = {a for a, reason in stats.refused.items() if reason.startswith("failure breaker")}
    left = await _left_in(run, paused) if paused else 0
    exit_code = _exit_code(
        job_counts, interrupted=run.stop.requested.is_set(), left=left, refused=bool(stats.refused)
    )
    summary = format_summary(config, stats, job_counts, elapsed, exit_code)
    run.hooks.out.write(summary)
    log.info(
        "bulkdisconnect.run.end",
        job=config.job,
        run_id=run_id,
        exit_code=int(exit_code),
        requests=stats.requests,
        retries=stats.retries,
        elapsed=round(elapsed, 3),
        **{o.value: n for o, n in stats.outcomes.items()},
    )
    return exit_code, summary


async def _left_in(run: _Run, stripe_accounts: set[str]) -> int:
    """Accounts left pending under these Stripe accounts (their breakers tripped)."""
    lanes = []
    with run.stop.bounded(), _unless_the_store_fails("the summary"):
        lanes = await run.store.lane_counts(run.config.job)
    return sum(lane.pending for lane in lanes if lane.stripe_account in stripe_accounts)


def _exit_code(
    counts: dict[str | None, int], *, interrupted: bool, left: int = 0, refused: bool = False
) -> ExitCode:
    """3 while accounts are pending (other than `left`, those of accounts whose breaker
    tripped); else 1 if any failed or an account was refused; else 0."""
    if interrupted or counts.get(None, 0) > left:
        return ExitCode.INTERRUPTED
    bad = sum(n for outcome, n in counts.items() if outcome not in GOOD_OUTCOMES)
    return ExitCode.SOME_FAILED if bad or refused else ExitCode.OK


def _described(config: RunConfig, source: Source) -> str:
    """The run's source for the record (the audit page): where, and for a query, which."""
    if isinstance(config.source, SqlQuery):
        query = " ".join(config.source.query.split())
        return f"{source.description}: {query[:SOURCE_QUERY_CHARS]}"
    return source.description


def _ours(group: BaseExceptionGroup[BaseException]) -> BulkDisconnectError | None:
    """The first of our errors in a (nested) exception group: it decides the exit code."""
    ours = group.subgroup(lambda e: isinstance(e, BulkDisconnectError))
    if ours is None:
        return None
    leaf: BaseException = ours
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, BulkDisconnectError)
    return leaf
