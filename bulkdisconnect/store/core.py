"""The store's semantics, once: leases, planning, claims and outcomes, confirmations, runs.

`SqlStore` runs the statements of queries.sql through a `Dialect`, which supplies only what
truly differs between SQLite and PostgreSQL: connections and transactions, placeholders and
the {tokens} of the SQL, how pages are claimed and outcomes recorded, how an input is staged,
and how planning is serialised among workers.

    SqlStore ──statements by name──> Dialect (sqlite.py | postgres.py) ──> the database
"""

from __future__ import annotations

import collections
import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
import structlog

from bulkdisconnect.errors import LockHeldError, StoreError, UsageError
from bulkdisconnect.model import (
    ACCOUNT_ID_PATTERN,
    MAX_ACCOUNT_ID_LENGTH,
    ItemResult,
    Owned,
    Settled,
    is_valid_account_id,
    is_valid_stripe_account,
)
from bulkdisconnect.store import (
    Beat,
    Confirmation,
    Cursor,
    Forgotten,
    LaneCounts,
    LaneSpan,
    Listed,
    LockInfo,
    PlanCounts,
    ReadBack,
    ReconcileProgress,
    ReportRow,
    RunInfo,
    VerifyCounts,
    VerifyPass,
    stored_value,
)
from bulkdisconnect.store.dialect import Dialect, Row, Staging

log = structlog.get_logger("bulkdisconnect")
P = ParamSpec("P")
T = TypeVar("T")

# The layout a store is migrated to when opened; a dialect's MIGRATIONS lead up to it.
SCHEMA_VERSION = 5
# The oldest layout status and report read without migrating it. Layout 4 reads as one where
# nothing was read back yet; older ones lack the connected account of each row.
READABLE_FROM = 4
# How long a store call rides out a database that fails in passing (a restart, a failover,
# terminated connections, a lock held by another process) before the run stops with exit 6.
OUTAGE = 15.0
RETRY_DELAY = (0.1, 2.0)  # the first wait between tries, and the longest
REPORT_PAGE = 5000
# What `forget` deletes of a job besides its accounts, runs and events.
FORGOTTEN_TABLES = (
    "customers",
    "unknown_events",
    "holders",
    "reconciled",
    "verify_passes",
    "samples",
)
SETTLED_MESSAGE = "already disconnected when listed: recorded without a call"
INVALID_MESSAGE = "not a Financial Connections account ID (fca_ followed by letters and digits)"
INVALID_ACCOUNT_MESSAGE = "not a connected account ID (acct_ followed by letters and digits)"


def _guarded(
    method: Callable[Concatenate[SqlStore, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SqlStore, P], Coroutine[Any, Any, T]]:
    """A store call that is tried again through a passing outage, else fails as StoreError.

    Every call so marked is safe to repeat: writes are idempotent (fenced records, ON
    CONFLICT inserts), so a reply lost after the commit is harmless.
    """

    @functools.wraps(method)
    async def call(self: SqlStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._retried(method.__name__, lambda: method(self, *args, **kwargs))

    return call


class SqlStore:
    """Durable per-account outcomes for jobs, their leases, confirmations and runs.

    Each consumer types it by the small protocol it needs (pool.py, lease.py, planning.py,
    webhook.py, report.py); this class satisfies them all.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._read = dialect.reader
        self._layout = SCHEMA_VERSION  # an older one only when opened read-only

    @classmethod
    async def open(cls, dialect: Dialect, *, read_only: bool = False) -> SqlStore:
        """The store over `dialect`, its schema created or migrated to the current layout;
        `read_only`, its layout only checked to be one this version reads."""
        store = cls(dialect)
        try:
            with store._failing("opening"):
                await (store._check_readable() if read_only else store._migrate())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await dialect.aclose()
            raise
        return store

    async def _check_readable(self) -> None:
        """Refuse a store this version cannot read as it is (not created, too old, too new)."""
        tables = {row[0] for row in await self._read.fetch("tables")}
        if "accounts" not in tables:
            raise UsageError(f"{self.description} holds no bulkdisconnect store")
        rows = await self._read.fetch("schema_version") if "meta" in tables else []
        version = int(rows[0][0]) if rows else 1
        _check_version(self.description, version)
        if version < READABLE_FROM:
            raise UsageError(
                f"the store {self.description} has layout {version}: a run of this "
                "bulkdisconnect migrates it (status and report only read)"
            )
        self._layout = version

    async def _migrate(self) -> None:
        """Create the tables, or bring an older store's up to SCHEMA_VERSION."""
        dialect = self._dialect
        async with dialect.transaction(exclusive_for="schema") as tx:
            tables = {row[0] for row in await tx.fetch("tables")}
            if "meta" in tables:
                rows = await tx.fetch("schema_version")
                version = int(rows[0][0]) if rows else 1
            else:  # created before layouts were numbered, or not at all
                version = 1 if "accounts" in tables else SCHEMA_VERSION
            if version == SCHEMA_VERSION and "meta" in tables:
                return  # up to date
            _check_version(dialect.description, version)
            steps = [dialect.migrations.get(v, ("", "")) for v in range(version, SCHEMA_VERSION)]
            for before, _ in steps:
                await tx.script(before)
            await tx.script(dialect.schema)
            for _, after in steps:
                await tx.script(after)
            await tx.execute("set_schema_version", version=str(SCHEMA_VERSION))

    @property
    def description(self) -> str:
        """Where the store is, fit for output."""
        return self._dialect.description

    async def aclose(self) -> None:
        """Close the store's connections."""
        await self._dialect.aclose()

    async def _retried(self, operation: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again while its errors are transient, for up to OUTAGE seconds."""
        dialect = self._dialect
        delay, longest = RETRY_DELAY
        started: float | None = None
        while True:
            try:
                return await attempt()
            except dialect.errors as exc:
                now = time.monotonic()
                started = now if started is None else started
                if not dialect.transient(exc) or now + delay - started > OUTAGE:
                    raise self._failure(operation, exc) from exc
                log.warning(
                    "bulkdisconnect.store.retry",
                    operation=operation,
                    error=dialect.describe(exc),
                    retry_in=delay,
                )
            await anyio.sleep(delay)
            delay = min(2 * delay, longest)

    @contextmanager
    def _failing(self, operation: str) -> Iterator[None]:
        """The database's errors inside, as StoreError (what cannot simply be tried again)."""
        try:
            yield
        except self._dialect.errors as exc:
            raise self._failure(operation, exc) from exc

    def _failure(self, operation: str, exc: Exception) -> StoreError:
        dialect = self._dialect
        advice = "" if dialect.corrupted(exc) else "; nothing was lost, a rerun resumes"
        return StoreError(
            f"the state store {self.description} failed ({operation}): "
            f"{dialect.describe(exc)}{advice}"
        )

    # -- the lease ----------------------------------------------------------------------------

    @_guarded
    async def acquire_lock(
        self, job: str, owner: str, *, stale_after: float, join: bool = False, source: str = ""
    ) -> None:
        """Hold the job, alone or as one of its `run --join` workers; stale holders are dropped.

        A run without `join` needs no live holder at all; a joining worker needs every live
        holder to be a joining worker started on the same `source` (a fingerprint of the
        source arguments), so that a worker given another input cannot join by mistake.
        `stale_after` is this holder's lease: it heartbeats well within it, and others may
        take over once no heartbeat came for that long (by the database's clock).
        """
        if join and not self._dialect.shared:
            raise UsageError("--join needs a shared store: --state postgresql://...")
        async with self._dialect.transaction(exclusive_for=f"lock:{job}") as tx:
            holders = [_lock_info(row) for row in await tx.fetch("holders", job=job)]
            # Itself excepted: tried again after a lost reply, it finds its own row.
            live = [h for h in holders if h.live and h.owner != owner]
            await tx.execute("drop_stale_holders", job=job)
            _check_can_hold(job, live, join=join, source=source)
            await tx.execute(
                "add_holder",
                job=job,
                owner=owner,
                pid=os.getpid(),
                host=socket.gethostname(),
                lease=stale_after,
                shared=join,
                share_of=len(live) + 1,
                source=source,
            )

    @_guarded
    async def heartbeat(self, job: str, owner: str) -> Beat | None:
        """Renew the lease and take the current share; None if it ran out or was taken.

        A holder that missed its own lease has lost it even if nobody took over: others may
        already be working the accounts it claimed.
        """
        async with self._dialect.transaction(beat=True) as tx:
            if not await tx.execute("renew_lease", job=job, owner=owner):
                return None
            live = await tx.fetch("live_shares", job=job)
            await tx.execute("set_share", job=job, owner=owner, workers=len(live))
        ready = all(share >= len(live) for holder, share in live if holder != owner)
        return Beat(workers=len(live), ready=ready)

    @_guarded
    async def release_lock(self, job: str, owner: str) -> None:
        """Give up this owner's hold on the job."""
        async with self._dialect.transaction() as tx:
            await tx.execute("drop_holder", job=job, owner=owner)

    @_guarded
    async def locks(self, job: str) -> list[LockInfo]:
        """The job's holders (live or stale), oldest first."""
        return [_lock_info(row) for row in await self._read.fetch("holders", job=job)]

    @asynccontextmanager
    async def planning(self, job: str, owner: str) -> AsyncIterator[bool]:
        """This holder's turn to plan: yields False when a live holder already planned.

        Workers joining a job take turns; the first plans the input, the others find it
        planned. A holder alone on its job (SQLite's) always finds it not planned yet.
        """
        with self._failing("planning"):
            async with self._dialect.plan_turn(job):
                (row,) = await self._read.fetch("planned_by_a_live_holder", job=job)
                yield not row[0]
                await self._read.execute("mark_planned", job=job, owner=owner)

    # -- planning -----------------------------------------------------------------------------

    @asynccontextmanager
    async def stage(
        self, job: str, *, retry_failed: bool, stripe_account: str | None = None
    ) -> AsyncIterator[StagedInput]:
        """An input counted in a temporary table; leaving without `commit` discards it.

        A row naming `stripe_account` (the run's --stripe-account) is stored as the job's own.
        """
        with self._failing("planning"):
            async with self._dialect.staging() as staging:
                yield StagedInput(
                    staging, job, retry_failed=retry_failed, stripe_account=stripe_account
                )

    @_guarded
    async def listed_before(self, job: str, customer: str) -> bool:
        """Whether an earlier plan of the job listed this customer's accounts."""
        return bool(await self._read.fetch("listed_before", job=job, customer=customer))

    @_guarded
    async def remember_listed(self, job: str, customers: Sequence[str]) -> None:
        """Remember that these customers' accounts are in the job: a rerun skips them."""
        async with self._dialect.transaction() as tx:
            for customer in customers:
                await tx.execute("remember_listed", job=job, customer=customer, now=time.time())

    # -- work ---------------------------------------------------------------------------------

    @_guarded
    async def claim(
        self, job: str, run_id: str, *, limit: int, stripe_account: str = ""
    ) -> list[str]:
        """The run's next page of a connected account's accounts still to call, in input
        order ('': the job's own)."""
        return await self._dialect.claim(job, run_id, limit, stripe_account)

    @_guarded
    async def lanes(self, job: str) -> list[str]:
        """The job's connected accounts ('' for its own), whatever their accounts' state."""
        return [row[0] for row in await self._read.fetch("lanes", job=job)]

    @_guarded
    async def pending_elsewhere(self, job: str, run_id: str) -> bool:
        """Whether accounts still to call are held by another run (or free to claim)."""
        (row,) = await self._read.fetch("pending_elsewhere", job=job, run_id=run_id)
        return bool(row[0])

    @_guarded
    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one write."""
        await self._dialect.record(job, run_id, results)

    @_guarded
    async def release_refused(
        self, job: str, run_id: str, *, stripe_account: str | None = None
    ) -> int:
        """Turn this run's failed and not_found outcomes (under one connected account, if
        given) back to pending; how many."""
        async with self._dialect.transaction() as tx:
            if stripe_account is None:
                return await tx.execute("release_refused", job=job, run_id=run_id)
            return await tx.execute(
                "release_refused_lane", job=job, run_id=run_id, stripe_account=stripe_account
            )

    @_guarded
    async def fail_lane(self, job: str, run_id: str, refusal: ItemResult) -> int:
        """End the accounts still to call under the refusal's connected account that no live
        run holds `failed` with its answer (no call each: the platform has no access to it);
        how many. Those a live run holds it records itself, each under its own claim."""
        async with self._dialect.transaction() as tx:
            return await tx.execute(
                "fail_lane",
                job=job,
                stripe_account=refusal.stripe_account,
                http_status=refusal.http_status,
                error_code=refusal.error_code,
                error_message=refusal.error_message,
                request_id=refusal.request_id,
                now=time.time(),
            )

    # -- confirmations ------------------------------------------------------------------------

    @_guarded
    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation:
        """Record a disconnected event on the account's outcome, once per event ID.

        For an account outside the job nothing is kept: the delivery is only counted.
        """
        event = {"event_id": event_id, "job": job, "account_id": account_id, "at": confirmed_at}
        async with self._dialect.transaction() as tx:
            if not await tx.execute("claim_event", **event):
                return Confirmation.REPLAYED
            if await tx.execute("confirm_account", **event):
                return Confirmation.CONFIRMED
            await tx.execute("forget_event", job=job, event_id=event_id)
            await tx.execute("count_unknown_event", job=job, at=confirmed_at)
        return Confirmation.UNKNOWN

    # -- reconciling with Stripe's events ------------------------------------------------------

    @_guarded
    async def reconcile_span(self, job: str, stripe_account: str) -> LaneSpan:
        """One connected account's accounts of the job a call was made for: the first attempt
        among them, and how many are disconnected with no event confirming it yet."""
        ((first, unconfirmed),) = await self._read.fetch(
            "reconcile_span", job=job, stripe_account=stripe_account
        )
        return LaneSpan(None if first is None else float(first), int(unconfirmed))

    @_guarded
    async def reconcile_progress(self, job: str) -> list[ReconcileProgress]:
        """How far reconcile read each connected account's events, least far first."""
        if self._layout < 5:
            return []
        return [_progress(row) for row in await self._read.fetch("reconcile_progress_all", job=job)]

    @_guarded
    async def reconciled_page(
        self,
        job: str,
        stripe_account: str,
        listed: Sequence[Listed],
        *,
        events: int,
        cursor: Cursor | None,
        created_upto: int | None,
    ) -> collections.Counter[Confirmation]:
        """Record a page of one connected account's disconnected events and how far the pass
        got, in one transaction: each event as the webhook's (`confirm`), but on that account's
        row only, and an event of an account outside the job is neither kept nor counted
        (a later pass may list it again). `events` were listed in all; `cursor`, where the
        pass goes on (None: it ended); `created_upto`, how far every event is now read."""
        events_of = [
            {"event_id": event_id, "job": job, "account_id": account_id, "at": created}
            for account_id, event_id, created in listed
        ]
        async with self._dialect.transaction() as tx:
            claimed = await tx.execute_each("claim_event", events_of)
            fresh = [event for event, new in zip(events_of, claimed, strict=True) if new]
            mine = await tx.execute_each(
                "confirm_account_lane", [{**e, "stripe_account": stripe_account} for e in fresh]
            )
            others = [e for e, confirmed in zip(fresh, mine, strict=True) if not confirmed]
            await tx.execute_each(
                "forget_event", [{"job": job, "event_id": e["event_id"]} for e in others]
            )
            await tx.execute(
                "save_reconciled",
                job=job,
                stripe_account=stripe_account,
                created_upto=created_upto,
                last_event_id=None if cursor is None else cursor.last_event_id,
                pass_floor=None if cursor is None else cursor.floor,
                pass_top=None if cursor is None else cursor.top,
                events=events,
                at=time.time(),
            )
        found = collections.Counter(
            {
                Confirmation.REPLAYED: len(listed) - len(fresh),
                Confirmation.CONFIRMED: len(fresh) - len(others),
                Confirmation.UNKNOWN: len(others),
            }
        )
        return +found  # without the kinds that did not occur

    # -- verifying by reading accounts back -----------------------------------------------------

    @_guarded
    async def open_verify_pass(self, job: str) -> VerifyPass | None:
        """The job's latest verify pass that did not finish."""
        rows = await self._read.fetch("open_verify_pass", job=job)
        return VerifyPass(rows[0][0], rows[0][1], float(rows[0][2])) if rows else None

    @_guarded
    async def last_verify_pass(self, job: str) -> VerifyPass | None:
        """The job's latest verify pass, finished or not."""
        if self._layout < 5:
            return None
        rows = await self._read.fetch("last_verify_pass", job=job)
        return VerifyPass(*rows[0]) if rows else None

    @_guarded
    async def start_verify_pass(self, job: str, pass_id: str, selection: str) -> None:
        """Start a verify pass; the job's other unfinished passes are not resumed any more."""
        async with self._dialect.transaction() as tx:
            await tx.execute("close_verify_passes", job=job, pass_id=pass_id, now=time.time())
            await tx.execute(
                "start_verify_pass", job=job, pass_id=pass_id, selection=selection, now=time.time()
            )

    @_guarded
    async def finish_verify_pass(self, job: str, pass_id: str) -> None:
        """The pass read back every account it chose."""
        await self._read.execute("finish_verify_pass", job=job, pass_id=pass_id, now=time.time())

    @_guarded
    async def verify_candidates(
        self, job: str, pass_id: str, *, unconfirmed: bool, after: int, limit: int
    ) -> list[tuple[int, str, str, str | None]]:
        """The next page, in input order after position `after`, of the job's accounts recorded
        disconnected (only unconfirmed ones, if asked) that pass `pass_id` has not read back
        ('': any): (position, connected account, account, the pass that last read it)."""
        rows = await self._read.fetch(
            "verify_candidates",
            job=job,
            pass_id=pass_id,
            unconfirmed=int(unconfirmed),
            after=after,
            limit=limit,
        )
        return [(int(order), lane, account, read_by) for order, lane, account, read_by in rows]

    @_guarded
    async def record_verified(
        self, job: str, owner: str, pass_id: str, read: Sequence[ReadBack]
    ) -> int:
        """Record what Stripe reported for accounts read back in pass `pass_id`, in one write,
        only while `owner` holds the job's lease; how many were recorded."""
        rows = [
            {
                "job": job,
                "owner": owner,
                "pass_id": pass_id,
                "stripe_account": lane,
                "account_id": account_id,
                "status": status,
                "at": at,
            }
            for lane, account_id, status, at in read
        ]
        async with self._dialect.transaction() as tx:
            return sum(await tx.execute_each("record_verified", rows))

    @_guarded
    async def verify_counts(self, job: str) -> VerifyCounts:
        """What read-backs found of the job: verified, reactivated, never read back."""
        if self._layout < 5:
            disconnected = (await self.counts(job)).get("disconnected", 0)
            return VerifyCounts(verified=0, reactivated=0, unverified=disconnected)
        ((verified, reactivated, unverified),) = await self._read.fetch("verify_counts", job=job)
        return VerifyCounts(int(verified), int(reactivated), int(unverified))

    @_guarded
    async def pass_counts(self, job: str, pass_id: str) -> dict[str, int]:
        """What one verify pass read back, per status Stripe reported."""
        rows = await self._read.fetch("pass_counts", job=job, pass_id=pass_id)
        return {status: int(count) for status, count in rows}

    # -- reading ------------------------------------------------------------------------------

    @_guarded
    async def counts(self, job: str) -> dict[str | None, int]:
        """Accounts per outcome (None: still to call)."""
        return {row[0]: int(row[1]) for row in await self._read.fetch("outcome_counts", job=job)}

    @_guarded
    async def lane_counts(self, job: str) -> list[LaneCounts]:
        """Accounts per connected account and outcome, most still to call first."""
        lanes: dict[str, dict[str | None, int]] = {}
        for lane, outcome, count in await self._read.fetch("lane_counts", job=job):
            lanes.setdefault(lane, {})[outcome] = int(count)
        found = [LaneCounts(lane, counts) for lane, counts in lanes.items()]
        return sorted(found, key=lambda lane: (-lane.pending, lane.stripe_account))

    @_guarded
    async def confirmed_count(self, job: str) -> int:
        """Accounts whose disconnection an event confirmed (from the webhook or reconcile)."""
        (row,) = await self._read.fetch("confirmed_count", job=job)
        return int(row[0])

    @_guarded
    async def unknown_events(self, job: str) -> int:
        """Events received for accounts outside the job (counted, not kept)."""
        rows = await self._read.fetch("unknown_events", job=job)
        return int(rows[0][0]) if rows else 0

    async def rows(self, job: str, *, unconfirmed: bool = False) -> AsyncIterator[ReportRow]:
        """Every account of the job in input order (or only disconnected, unconfirmed ones)."""
        after = 0
        while True:
            with self._failing("reading"):
                page = await self._read.fetch(
                    "report_page" if self._layout >= 5 else "report_page_v4",
                    job=job,
                    after=after,
                    unconfirmed=int(unconfirmed),
                    limit=REPORT_PAGE,
                )
            for row in page:
                yield ReportRow(*row[1:])
            if len(page) < REPORT_PAGE:
                return
            after = page[-1][0]

    @_guarded
    async def has_job(self, job: str) -> bool:
        """Whether the store holds anything of this job."""
        (row,) = await self._read.fetch("has_job", job=job)
        return bool(row[0])

    # -- forgetting ---------------------------------------------------------------------------

    @_guarded
    async def forget(self, job: str, owner: str) -> Forgotten:
        """Delete everything the store holds of `job`, under its lock (LockHeldError while
        another run holds it); what was deleted."""
        await self.acquire_lock(job, owner, stale_after=60)
        async with self._dialect.transaction(exclusive_for=f"lock:{job}") as tx:
            forgotten = Forgotten(
                accounts=await tx.execute("forget_accounts", job=job),
                runs=await tx.execute("forget_runs", job=job),
                confirmations=await tx.execute("forget_events", job=job),
            )
            for table in FORGOTTEN_TABLES:
                await tx.execute(f"forget_{table}", job=job)
        await self._dialect.scrub()
        return forgotten

    @_guarded
    async def jobs_finished_before(self, before: float) -> list[str]:
        """Jobs whose last run finished (exit 0 or 1) before `before` (epoch seconds)."""
        return [row[0] for row in await self._read.fetch("jobs_finished_before", before=before)]

    # -- samples of runs, for the HTML report ------------------------------------------------

    @_guarded
    async def record_sample(
        self,
        job: str,
        run_id: str,
        *,
        at: float,
        requests: int,
        rate_limited: int,
        disconnected: int,
        target_rate: float,
    ) -> None:
        """Keep a run's cumulative counters at `at` (epoch seconds)."""
        await self._read.execute(
            "record_sample",
            job=job,
            run_id=run_id,
            at=at,
            requests=requests,
            rate_limited=rate_limited,
            disconnected=disconnected,
            target_rate=target_rate,
        )

    @_guarded
    async def samples(self, job: str) -> list[tuple[str, float, int, int, int, float]]:
        """Every run's samples of the job, oldest first: (run_id, at, requests, rate_limited,
        disconnected, target_rate)."""
        if self._layout < 5:
            return []
        return [
            (run_id, float(at), int(requests), int(limited), int(disconnected), float(rate))
            for run_id, at, requests, limited, disconnected, rate in await self._read.fetch(
                "samples", job=job
            )
        ]

    # -- runs ---------------------------------------------------------------------------------

    @_guarded
    async def start_run(self, job: str, run_id: str) -> None:
        """Record that a run of the job started."""
        await self._read.execute("start_run", job=job, run_id=run_id, now=time.time())

    @_guarded
    async def finish_run(self, run_id: str, exit_code: int, summary: str) -> None:
        """Record how a run ended."""
        await self._read.execute(
            "finish_run", run_id=run_id, exit_code=exit_code, summary=summary, now=time.time()
        )

    @_guarded
    async def last_run(self, job: str) -> RunInfo | None:
        """The job's most recent run."""
        rows = await self._read.fetch("last_run", job=job)
        return RunInfo(*rows[0]) if rows else None

    # -- the HTML report ----------------------------------------------------------------------

    @_guarded
    async def runs(self, job: str, *, limit: int) -> tuple[list[RunInfo], int]:
        """The job's first `limit` runs, oldest first, and how many it had in all."""
        rows = await self._read.fetch("job_runs", job=job, limit=limit)
        (count,) = await self._read.fetch("run_count", job=job)
        return [RunInfo(*row) for row in rows], int(count[0])

    @_guarded
    async def disconnected_span(self, job: str) -> tuple[float, float] | None:
        """When the job's first and last disconnect were recorded; None before any."""
        ((first, last),) = await self._read.fetch("disconnected_span", job=job)
        return None if first is None else (float(first), float(last))

    @_guarded
    async def disconnected_buckets(
        self, job: str, *, start_ms: int, width_ms: int
    ) -> dict[int, int]:
        """Disconnects recorded per bucket of `width_ms` from `start_ms` (bucket 0), counted
        by the database: as many rows as buckets, whatever the job's size."""
        rows = await self._read.fetch(
            "disconnected_buckets", job=job, start_ms=start_ms, width_ms=width_ms
        )
        return {int(bucket): int(count) for bucket, count in rows}

    @_guarded
    async def problem_rows(self, job: str, *, limit: int) -> list[ReportRow]:
        """The job's first `limit` failed and invalid_id accounts, in input order."""
        rows = await self._read.fetch("problem_rows", job=job, limit=limit)
        return [ReportRow(*row) for row in rows]

    @_guarded
    async def problem_codes(
        self, job: str, *, limit: int
    ) -> list[tuple[str, int | None, str | None, int]]:
        """(outcome, HTTP status, error code, accounts) of the job's failed and invalid_id
        accounts, the most frequent first."""
        rows = await self._read.fetch("problem_codes", job=job, limit=limit)
        return [(outcome, status, code, int(n)) for outcome, status, code, n in rows]


class StagedInput:
    """An input staged for one job: add chunks, count them, then commit the merge."""

    def __init__(
        self, staging: Staging, job: str, *, retry_failed: bool, stripe_account: str | None
    ) -> None:
        self._staging = staging
        self._job = job
        self._own = stripe_account or ""
        self._retry_failed = retry_failed
        self._read = 0
        self._sealed = False
        self._nothing_new = False

    async def add(self, chunk: Sequence[str | Owned | Settled]) -> None:
        """Stage a chunk of raw values (with their connected account, or settled by the
        source)."""
        self._read += len(chunk)
        await self._staging.add(_staged_rows(chunk, self._own))

    async def count(self) -> PlanCounts:
        """What merging the staged input would do; changes nothing."""
        if not self._sealed:
            await self._staging.seal()
            self._sealed = True
        retry = int(self._retry_failed)
        ((unique, invalid, done, new, unseen, settled, *decided),) = await self._staging.fetch(
            "count_staged", job=self._job, retry_failed=retry
        )
        ((pending,),) = await self._staging.fetch(
            "count_still_pending", job=self._job, retry_failed=retry
        )
        # A rerun of the same input: the merge has nothing to add.
        self._nothing_new = not unseen and not settled
        return PlanCounts(
            read=self._read,
            invalid=int(invalid),
            duplicates=self._read - int(unique),
            already_done=int(done),
            to_call=int(pending) + int(new),
            new_invalid=int(decided[0]),
            new_settled=int(decided[1]),
        )

    async def commit(self) -> None:
        """Merge the staged input into the job: in one transaction, or (SQLite, whose write
        lock is the whole file's) a span of positions at a time, in input order."""
        if not self._sealed:
            await self.count()
        job = self._job
        spans = [(0, 0)] if self._nothing_new else await self._staging.spans()
        for n, (after, upto) in enumerate(spans):
            async with self._staging.transaction() as tx:
                if n == 0 and self._retry_failed:
                    await tx.execute("reopen_failed", job=job)
                if self._nothing_new:
                    continue
                await tx.execute(
                    "merge_staged",
                    job=job,
                    invalid_message=INVALID_MESSAGE,
                    invalid_account_message=INVALID_ACCOUNT_MESSAGE,
                    settled_message=SETTLED_MESSAGE,
                    now=time.time(),
                    after=after,
                    upto=upto,
                )
                if n == len(spans) - 1:
                    await tx.execute(
                        "settle_pending", job=job, settled_message=SETTLED_MESSAGE, now=time.time()
                    )


def _staged_rows(
    chunk: Sequence[str | Owned | Settled], own: str
) -> list[tuple[str, int, str, str]]:
    """(value as stored, valid, settled outcome or '', connected account as stored) for the
    staging table; `own` (the run's --stripe-account) is stored as ''.

    One pass, the common case (a plain valid ID) first: a rerun of a million IDs spends most
    of its planning here. '' rather than None for "not settled": sqlite3 binds None slowly.
    """
    valid = ACCOUNT_ID_PATTERN.fullmatch
    return [
        (value, 1, "", "")
        if value.__class__ is str and len(value) <= MAX_ACCOUNT_ID_LENGTH and valid(value)
        else _unusual_row(value, own)
        for value in chunk
    ]


def _unusual_row(value: str | Owned | Settled, own: str) -> tuple[str, int, str, str]:
    if isinstance(value, str):
        return stored_value(value), int(is_valid_account_id(value)), "", ""
    if isinstance(value, Owned):
        account_id, stripe_account, settled = value.value, value.stripe_account, ""
    else:
        account_id, stripe_account = value.account_id, value.stripe_account
        settled = value.outcome.value
    lane = "" if stripe_account == own else stripe_account
    if not is_valid_account_id(account_id):
        return stored_value(account_id), 0, settled, stored_value(lane)
    if lane and not is_valid_stripe_account(lane):
        return account_id, -1, settled, stored_value(lane)
    return account_id, 1, settled, lane


def _progress(row: Row) -> ReconcileProgress:
    lane, created_upto, last_event_id, floor, top, events, pages, at = row
    cursor = None
    if last_event_id is not None:
        cursor = Cursor(last_event_id, int(floor), None if top is None else int(top))
    upto = None if created_upto is None else int(created_upto)
    return ReconcileProgress(lane, upto, cursor, int(events), int(pages), float(at))


def _check_version(description: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"the store {description} has layout {version}, newer than this "
            f"bulkdisconnect knows ({SCHEMA_VERSION}): upgrade bulkdisconnect"
        )


def _lock_info(row: Row) -> LockInfo:
    owner, pid, host, heartbeat_at, lease, shared, source, now = row
    return LockInfo(
        owner, pid, host, heartbeat_at, lease, bool(shared), source, age=now - heartbeat_at
    )


def _check_can_hold(job: str, live: list[LockInfo], *, join: bool, source: str) -> None:
    """Raise LockHeldError unless a new holder (joining or not) may work the job now."""
    exclusive = [h for h in live if not h.shared]
    if exclusive:
        holder = exclusive[0]
        raise LockHeldError(
            f"job {job!r} is locked by a run on {holder.host} (pid {holder.pid}), "
            f"alive {holder.age:.0f}s ago; wait for it to finish"
        )
    if live and not join:
        raise LockHeldError(
            f"job {job!r} is being worked by {len(live)} `run --join` worker(s); "
            "add --join to work with them, or wait for them to finish"
        )
    if any(h.source != source for h in live):
        raise LockHeldError(
            f"job {job!r} is being worked by --join workers started on another input "
            "(file, query or customers): start every worker with the same arguments"
        )
