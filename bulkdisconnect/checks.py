"""What `reconcile` and `verify` share with a run: a check's parts, opened and closed in order.

    signals -> meters and retry loop -> HTTP session -> the job's store -> the job's lock,
    held under a lease -> the check's body -> its metrics -> the lock let go, the store closed

A check of a job holds the job's lock as a run does: a run and a check of one job never
overlap (the second exits 4), and a check killed mid-way leaves a lock that lapses with its
lease. Its requests pass the same meters (--rate per Stripe account, --total-rate) and the
same retry loop as a run's.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from bulkdisconnect.client import Answer, StripeClient, open_client
from bulkdisconnect.config import CheckConfig
from bulkdisconnect.errors import BulkDisconnectError, StoreError, UsageError
from bulkdisconnect.lease import Lease
from bulkdisconnect.limiter import MAX_CONCURRENCY, Meters
from bulkdisconnect.metrics import CheckMetrics, check_metrics
from bulkdisconnect.model import RunStats
from bulkdisconnect.retry import Retrier, metered
from bulkdisconnect.stopping import Stop, StoppedError, on_signals
from bulkdisconnect.store import open_store, shown_location
from bulkdisconnect.store.core import SqlStore

log = structlog.get_logger("bulkdisconnect")


@dataclass(frozen=True)
class Check:
    """The parts of one check of a job."""

    config: CheckConfig
    owner: str  # the lock holder's ID: <command>-<UTC time>-<random>
    store: SqlStore
    client: StripeClient
    meters: Meters
    retrier: Retrier
    stats: RunStats
    stop: Stop
    metrics: CheckMetrics | None


@asynccontextmanager
async def checking(config: CheckConfig, command: str) -> AsyncIterator[Check]:
    """The parts of a `command` check of the job, under its lock; everything let go after.

    Our errors leave it as themselves, not wrapped in the task groups' exception groups.
    """
    try:
        async with _checking(config, command) as check:
            yield check
    except BaseExceptionGroup as group:
        raise first_error(group) from None


@asynccontextmanager
async def _checking(config: CheckConfig, command: str) -> AsyncIterator[Check]:
    stats = RunStats()
    async with on_signals() as stop:
        meters, retrier = metered(config, stats=stats, stop=stop)
        metrics = check_metrics(
            config.job, command, file=config.metrics_file, pushgateway=config.pushgateway
        )
        async with _client(config) as client, _job_store(config, stop) as store:
            owner = f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
            owner += uuid.uuid4().hex[:8]
            await store.acquire_lock(config.job, owner, stale_after=config.lock_stale_after)
            try:
                lease = Lease(
                    store=store,
                    job=config.job,
                    owner=owner,
                    lease=config.lock_stale_after,
                    join=False,
                    limiter=meters,
                )
                async with lease.hold():
                    yield Check(config, owner, store, client, meters, retrier, stats, stop, metrics)
            finally:
                with stop.bounded(), contextlib.suppress(StoreError):
                    await store.release_lock(config.job, owner)


async def published(check: Check, exit_code: int) -> None:
    """Publish the check's metrics (if asked for) once it ended with `exit_code`."""
    metrics = check.metrics
    if metrics is None:
        return
    metrics.sent(check.stats)
    metrics.finish(exit_code)
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(metrics.publish)


def _client(config: CheckConfig) -> contextlib.AbstractAsyncContextManager[StripeClient]:
    return open_client(
        config, api_key=config.api_key.reveal(), pool_size=config.concurrency or MAX_CONCURRENCY
    )


@asynccontextmanager
async def _job_store(config: CheckConfig, stop: Stop) -> AsyncIterator[SqlStore]:
    """The store holding the job (migrated to this version's layout if older); UsageError,
    creating nothing, if there is none or it does not hold the job."""
    location, job = config.state, config.job
    if isinstance(location, Path) and not location.is_file():
        raise UsageError(f"no state store at {location}: has job {job!r} ever run? (see --state)")
    store = await open_store(location)
    try:
        if not await store.has_job(job):
            where = shown_location(location)
            raise UsageError(f"job {job!r} is not in {where}: check --job and --state")
        yield store
    finally:
        with stop.bounded():
            await store.aclose()


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error of a (nested) task group that tells how a check ended: ours or a stop first,
    else the group itself."""
    mine = group.subgroup(lambda e: isinstance(e, BulkDisconnectError | StoppedError))
    if mine is None:
        return group
    leaf: BaseException = mine
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def describe(answer: Answer) -> str:
    """An answer in a few words: the status and Stripe's code and message."""
    if answer.connect_error is not None:
        return f"cannot reach the API: {answer.connect_error}"
    code = answer.error_code or answer.error_type or answer.transport_error or "no code"
    text = f"HTTP {answer.status} {code}"
    return f"{text}: {answer.error_message}" if answer.error_message else text
