"""One run of a job: lock, plan the input into the store, work it, summarise, pick the exit code."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import anyio
import structlog

from bulkdisconnect.breaker import BreakerSettings, FailureBreaker
from bulkdisconnect.client import ClientSettings, StripeClient, make_session
from bulkdisconnect.config import RunConfig
from bulkdisconnect.errors import (
    BreakerTrippedError,
    BulkDisconnectError,
    ExitCode,
    LockHeldError,
    UsageError,
)
from bulkdisconnect.limiter import RateLimiter
from bulkdisconnect.logs import redact_text
from bulkdisconnect.metrics import MetricsSettings, RunMetrics
from bulkdisconnect.model import GOOD_OUTCOMES, Outcome, RunStats
from bulkdisconnect.pool import MAX_CONCURRENCY, Pool, PoolSettings
from bulkdisconnect.progress import show_progress
from bulkdisconnect.report import format_plan, format_summary
from bulkdisconnect.retry import RetryPolicy
from bulkdisconnect.sources import Source, open_run_source
from bulkdisconnect.store import PlanCounts, Store, open_store, plan_input
from bulkdisconnect.writer import ResultWriter

log = structlog.get_logger("bulkdisconnect")

JOIN_PAGE_SIZE = 100
# Values per chunk while planning: one worker-thread trip and one staging transaction each.
# 1,000 cost ~15 % of a million-ID resume in those trips; 10,000 values are ~1 MB in memory.
PLAN_CHUNK = 10_000
JOIN_POLL = 0.2  # seconds between heartbeats while a joining worker waits for its share


@dataclass(frozen=True, kw_only=True)
class RunHooks:
    """What a run talks to besides the API and the store: output, stdin, the operator."""

    out: TextIO
    progress: bool = True
    stdin: BinaryIO | None = None
    # Asks the operator to go ahead (a live key on a terminal); None: nobody to ask.
    confirm: Callable[[str], bool] | None = None


class _CustomerBook:
    """The customers a plan lists: skipped when an earlier plan of the job listed them,
    recorded as listed once this plan is merged (`store` is set once it is open)."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.store: Store | None = None
        self.listed: list[str] = []
        self.skipped = 0

    async def was_listed(self, customer: str) -> bool:
        assert self.store is not None, "the store opens before the source is read"
        listed = await self.store.customer_listed(self.job, customer)
        self.skipped += listed
        return listed

    async def add(self, customer: str) -> None:
        self.listed.append(customer)


@dataclass
class _Run:
    """What the phases of one run share."""

    config: RunConfig
    hooks: RunHooks
    store: Store
    client: StripeClient | None
    limiter: RateLimiter
    source: Source
    customers: _CustomerBook


async def run_job(config: RunConfig, hooks: RunHooks) -> ExitCode:
    """Run the job once and return its exit code; raises BulkDisconnectError for 2, 4 and 5.

    The source is opened and checked before the store: a run refused for its input or its
    configuration leaves no store behind, and a dry run writes none.
    """
    async with _client(config) as client:
        limiter = RateLimiter(config.rate)  # list calls and disconnects share it
        customers = _CustomerBook(config.job)
        source = open_run_source(
            config,
            stdin=hooks.stdin,
            client=client,
            limiter=limiter,
            policy=_retry_policy(config),
            skip_customer=customers.was_listed,
            customer_listed=customers.add,
        )
        await source.check()
        store = await open_store(config.state, create=not config.dry_run)
        customers.store = store
        try:
            run = _Run(config, hooks, store, client, limiter, source, customers)
            if config.dry_run:
                counts = await plan_input(
                    store,
                    config.job,
                    source.chunks(PLAN_CHUNK),
                    retry_failed=config.retry_failed,
                    dry_run=True,
                )
                hooks.out.write(format_plan(config.job, counts, dry_run=True))
                _warn_if_empty(run, counts)
                return ExitCode.OK
            # The run ID names the lock holder, and marks the accounts this run claims.
            run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
            await store.acquire_lock(
                config.job,
                run_id,
                stale_after=config.lock_stale_after,
                join=config.join,
                source=config.source_fingerprint,
            )
            try:
                return await _locked_run(run, run_id)
            finally:
                with anyio.CancelScope(shield=True):
                    await store.release_lock(config.job, run_id)
        finally:
            with anyio.CancelScope(shield=True):
                await store.aclose()


def _warn_if_empty(run: _Run, counts: PlanCounts) -> None:
    """Say so when the source yielded nothing: an empty export or a query matching no row is
    more often a mistake than a job with nothing to do."""
    if counts.read or run.customers.skipped:  # customers listed before: nothing new, rightly
        return
    run.hooks.out.write(f"0 accounts read from {run.source.description}\n")
    log.warning("bulkdisconnect.empty_source", job=run.config.job, source=run.source.description)


@asynccontextmanager
async def _client(config: RunConfig) -> AsyncIterator[StripeClient | None]:
    """One HTTP session for the run (list calls and disconnects), if it has a key."""
    if config.api_key is None:
        yield None
        return
    settings = ClientSettings(
        api_base=config.api_base,
        api_key=config.api_key.reveal(),
        stripe_account=config.stripe_account,
        stripe_version=config.stripe_version,
        connect_timeout=config.connect_timeout,
        total_timeout=config.timeout,
        pool_size=config.concurrency or MAX_CONCURRENCY,
    )
    async with make_session(settings) as session:
        yield StripeClient(session, settings)


def _retry_policy(config: RunConfig) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=config.max_attempts,
        initial_delay=config.retry_delay,
        max_delay=config.retry_max_delay,
    )


async def _locked_run(run: _Run, run_id: str) -> ExitCode:
    config, store = run.config, run.store
    await store.start_run(config.job, run_id)
    exit_code = ExitCode.INTERRUPTED
    message = "interrupted"
    metrics = _metrics_for(config)
    try:
        async with _lease(store, config, run_id, run.limiter), _signals() as stop:
            exit_code, message = await _plan_and_work(run, run_id, stop, metrics)
    except BaseExceptionGroup as group:
        error = _single_error(group)
        if isinstance(error, BulkDisconnectError):
            exit_code, message = error.exit_code, str(error)
        raise error from None
    except BulkDisconnectError as error:
        exit_code, message = error.exit_code, str(error)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await store.finish_run(run_id, int(exit_code), redact_text(message))
            if metrics is not None:
                metrics.finish(int(exit_code))
                await anyio.to_thread.run_sync(metrics.publish)
    return exit_code


def _metrics_for(config: RunConfig) -> RunMetrics | None:
    """Prometheus metrics for the run, when a file or a Pushgateway asks for them."""
    settings = MetricsSettings(
        file=Path(config.metrics_file) if config.metrics_file else None,
        pushgateway=config.pushgateway,
    )
    metrics = RunMetrics(config.job, settings)
    return metrics if metrics.enabled else None


async def _publish_metrics(metrics: RunMetrics, stats: RunStats, every: float) -> None:
    """Keep the metrics file (or Pushgateway) current while the run works."""
    while True:
        await anyio.sleep(every)
        metrics.set_progress(pending=stats.planned - stats.done, target_rate=stats.current_rate)
        await anyio.to_thread.run_sync(metrics.publish)


async def _plan_and_work(
    run: _Run, run_id: str, stop: _Stop, metrics: RunMetrics | None
) -> tuple[ExitCode, str]:
    config, store = run.config, run.store
    started = time.monotonic()
    stopping = stop.requested
    counts = await _plan(run, run_id, stopping)
    if counts is None:
        return ExitCode.INTERRUPTED, "interrupted while planning; nothing was called"
    hooks = run.hooks
    stats = RunStats(planned=counts.to_call)
    log.info(
        "bulkdisconnect.run.start",
        job=config.job,
        run_id=run_id,
        to_call=counts.to_call,
        rate=config.rate,
        concurrency=config.concurrency or "adaptive",
    )
    if counts.to_call:
        await _work(run, run_id, stats, stop, metrics)
    job_counts = await store.counts(config.job)
    if metrics is not None:
        metrics.set_progress(pending=job_counts.get(None, 0), target_rate=stats.current_rate)
    exit_code = _exit_code(job_counts, interrupted=stopping.is_set())
    elapsed = time.monotonic() - started
    summary = format_summary(config, stats, job_counts, elapsed, exit_code)
    hooks.out.write(summary)
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


async def _plan(run: _Run, run_id: str, stopping: anyio.Event) -> PlanCounts | None:
    """Plan the input into the store; None if a signal came first (nothing merged).

    Of the workers joining one job, the first plans and the others find the plan in place.
    """
    job = run.config.job
    if not run.config.join:
        return await _plan_input(run, stopping)
    async with run.store.planning(job, run_id) as must_plan:
        if must_plan:
            return await _plan_input(run, stopping)
    pending = (await run.store.counts(job)).get(None, 0)
    run.hooks.out.write(f"joined job {job}: planned by another worker, {pending} to call\n")
    log.info("bulkdisconnect.joined", job=job, run_id=run_id, pending=pending)
    return PlanCounts(read=0, invalid=0, duplicates=0, already_done=0, to_call=pending)


async def _plan_input(run: _Run, stopping: anyio.Event) -> PlanCounts | None:
    """Stage the whole source, approve it, then merge it into the job.

    The whole source is read and counted before the job changes: --max-accounts and the
    live-key confirmation can still refuse it, leaving the job as it was.
    """
    config, store = run.config, run.store
    result: list[PlanCounts] = []
    async with anyio.create_task_group() as tg:

        async def stage() -> None:
            result.append(
                await store.stage(
                    config.job, run.source.chunks(PLAN_CHUNK), retry_failed=config.retry_failed
                )
            )
            tg.cancel_scope.cancel()

        async def cancel_on_stop() -> None:
            await stopping.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(stage)
        tg.start_soon(cancel_on_stop)
    if not result:
        await store.discard_staged()
        return None
    counts = result[0]
    try:
        _approve(config, counts, run.hooks)
    except BulkDisconnectError:
        await store.discard_staged()
        raise
    await store.commit_staged(config.job, retry_failed=config.retry_failed)
    for customer in run.customers.listed:
        await store.mark_customer_listed(config.job, customer)
    run.hooks.out.write(format_plan(config.job, counts, dry_run=False))
    _warn_if_empty(run, counts)
    return counts


def _approve(config: RunConfig, counts: PlanCounts, hooks: RunHooks) -> None:
    """The safety rails between a plan and its first disconnect."""
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


async def _work(
    run: _Run,
    run_id: str,
    stats: RunStats,
    stop: _Stop,
    metrics: RunMetrics | None,
) -> None:
    """Call the API for every pending account; flush every outcome however this ends."""
    config, store = run.config, run.store
    assert run.client is not None
    writer = ResultWriter(store, config.job, run_id)
    pool = Pool(
        job=config.job,
        run_id=run_id,
        store=store,
        client=run.client,
        limiter=run.limiter,
        breaker=FailureBreaker(
            BreakerSettings(
                min_sample=config.breaker_min_sample, threshold=config.breaker_threshold
            )
        ),
        writer=writer,
        settings=PoolSettings(
            rate=config.rate,
            concurrency=config.concurrency,
            policy=_retry_policy(config),
            # Workers sharing a job end together better with smaller pages in hand.
            page_size=JOIN_PAGE_SIZE if config.join else PoolSettings.page_size,
        ),
        stats=stats,
        stopping=stop.requested,
        metrics=metrics,
    )
    error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            if metrics is not None:
                tg.start_soon(_publish_metrics, metrics, stats, metrics.settings.interval)
            if run.hooks.progress:
                tg.start_soon(show_progress, stats)
            with anyio.CancelScope() as pool_scope:
                tg.start_soon(_cancel_after_grace, stop, pool_scope, config.grace)
                await pool.run()
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = _single_error(group)
    finally:
        with anyio.CancelScope(shield=True):
            await writer.flush()
    if isinstance(error, BreakerTrippedError):
        # The answers that tripped the breaker are not final: a rerun calls them again.
        released = await store.release_outcomes(
            config.job, run_id, [Outcome.FAILED.value, Outcome.NOT_FOUND.value]
        )
        log.error("bulkdisconnect.breaker", released=released, reason=str(error))
    if error is not None:
        raise error


async def _cancel_after_grace(stop: _Stop, scope: anyio.CancelScope, grace: float) -> None:
    """After a stop signal, give in-flight requests `grace` seconds (or until a second signal),
    then cancel them."""
    await stop.requested.wait()
    with anyio.move_on_after(grace):
        await stop.hurry.wait()
    scope.cancel()


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful error of a task group: ours if any, else the group itself."""
    ours = group.subgroup(lambda e: isinstance(e, BulkDisconnectError))
    if ours is not None:
        leaf = ours.exceptions[0]
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        return leaf
    return group


def _exit_code(counts: dict[str | None, int], *, interrupted: bool) -> ExitCode:
    if interrupted or counts.get(None, 0):
        return ExitCode.INTERRUPTED
    bad = sum(n for outcome, n in counts.items() if outcome not in GOOD_OUTCOMES)
    return ExitCode.SOME_FAILED if bad else ExitCode.OK


@asynccontextmanager
async def _lease(
    store: Store, config: RunConfig, run_id: str, limiter: RateLimiter
) -> AsyncIterator[None]:
    """Hold the job's lease and this worker's share of --rate while the body runs.

    A joining worker starts only once every other worker runs at its new, smaller share, so
    the workers together never exceed --rate. A heartbeat that fails, or does not get
    through within half the lease, stops the run (exit 4) before the lease can run out: by
    then others may take over its accounts.
    """
    lease = config.lock_stale_after
    beat = await store.heartbeat(config.job, run_id)
    while beat is not None and not beat.ready:
        await anyio.sleep(JOIN_POLL)
        beat = await store.heartbeat(config.job, run_id)
    if beat is None:
        raise LockHeldError(f"job {config.job!r}: lost the lock's lease before starting")
    limiter.share(beat.workers)
    lost: list[bool] = []
    # Joined workers re-divide the rate as others come and go: look often.
    every = min(lease / 6, JOIN_POLL * 5) if config.join else lease / 6

    async def renew(scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(every)
            renewed = None
            with anyio.move_on_after(lease / 2):
                renewed = await store.heartbeat(config.job, run_id)
            if renewed is None:
                lost.append(True)
                scope.cancel()
                return
            limiter.share(renewed.workers)

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as body:
            tg.start_soon(renew, body)
            yield
        tg.cancel_scope.cancel()
    if lost:
        raise LockHeldError(
            f"job {config.job!r}: lost the lock's lease (taken over, or no heartbeat got "
            f"through for {lease / 2:g}s); stopped"
        )


@dataclass(frozen=True)
class _Stop:
    """What SIGINT/SIGTERM asked for: the first stops intake, the second cancels what is in
    flight at once (the run still flushes and prints its summary)."""

    requested: anyio.Event
    hurry: anyio.Event


@asynccontextmanager
async def _signals() -> AsyncIterator[_Stop]:
    """Watch SIGINT/SIGTERM for the body; a third signal abandons the body altogether."""
    stop = _Stop(requested=anyio.Event(), hurry=anyio.Event())

    async def watch(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if stop.hurry.is_set():
                    scope.cancel()
                    return
                if stop.requested.is_set():
                    log.warning("bulkdisconnect.stopping.now", signal=name)
                    stop.hurry.set()
                    continue
                log.warning("bulkdisconnect.stopping", signal=name)
                stop.requested.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        yield stop
        tg.cancel_scope.cancel()
