"""The store's semantics, once: leases, planning, claims and outcomes, runs (and, in
evidence.py, confirmations, read-backs and samples).

`SqlStore` runs the statements of queries.sql through a `Dialect`, which supplies only what
truly differs between SQLite and PostgreSQL: connections and transactions, placeholders and
the {tokens} of the SQL, how pages are claimed and outcomes recorded, how an input is staged,
and how planning is serialised among workers.

    SqlStore ──statements by name──> Dialect (sqlite.py | postgres.py) ──> the database
      └─ Evidence (evidence.py) ─ Guarded (guarded.py: calls that ride out outages)
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import structlog

from bulkdisconnect.errors import LockHeldError, UsageError
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
    Forgotten,
    LaneCounts,
    LockInfo,
    PlanCounts,
    ReportRow,
    RunInfo,
    stored_value,
)
from bulkdisconnect.store.dialect import Dialect, Row, Staging
from bulkdisconnect.store.evidence import Evidence
from bulkdisconnect.store.guarded import guarded

log = structlog.get_logger("bulkdisconnect")

# The layout a store is migrated to when opened; a dialect's MIGRATIONS lead up to it.
SCHEMA_VERSION = 5
# The oldest layout status and report read without migrating it. Layout 4 reads as one where
# nothing was read back yet; older ones lack the connected account of each row.
READABLE_FROM = 4
REPORT_PAGE = 5000
# What `forget` deletes of a job besides its accounts, runs and events.
FORGOTTEN_TABLES = (
    "customers",
    "unknown_events",
    "holders",
    "reconciled",
    "verify_passes",
    "samples",
    "source",
)
SETTLED_MESSAGE = "already disconnected when listed: recorded without a call"
INVALID_MESSAGE = "not a Financial Connections account ID (fca_ followed by letters and digits)"
INVALID_ACCOUNT_MESSAGE = "not a connected account ID (acct_ followed by letters and digits)"


class SqlStore(Evidence):
    """Durable per-account outcomes for jobs, their leases, confirmations and runs.

    Each consumer types it by the small protocol it needs (pool.py, lease.py, planning.py,
    webhook.py, report.py); this class satisfies them all. Its proof-of-purge calls
    (confirmations, reconcile, verify, samples) are in evidence.py.
    """

    def __init__(self, dialect: Dialect) -> None:
        super().__init__(dialect, SCHEMA_VERSION)

    @classmethod
    async def open(cls, dialect: Dialect, *, read_only: bool = False) -> SqlStore:
        """The store over `dialect`, its schema created or migrated to the current layout;
        `read_only`, its layout only checked to be one this version reads."""
        store = cls(dialect)
        try:
            # Rides out a database failing in passing, as every call does: both only read, or
            # migrate in one transaction.
            await store._retried("opening", store._check_readable if read_only else store._migrate)
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

    async def aclose(self) -> None:
        """Close the store's connections."""
        await self._dialect.aclose()

    # -- the lease ----------------------------------------------------------------------------

    @guarded
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

    @guarded
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

    @guarded
    async def release_lock(self, job: str, owner: str) -> None:
        """Give up this owner's hold on the job."""
        async with self._dialect.transaction() as tx:
            await tx.execute("drop_holder", job=job, owner=owner)

    @guarded
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

    @guarded
    async def listed_before(self, job: str, customer: str) -> bool:
        """Whether an earlier plan of the job listed this customer's accounts."""
        return bool(await self._read.fetch("listed_before", job=job, customer=customer))

    @guarded
    async def remember_listed(self, job: str, customers: Sequence[str]) -> None:
        """Remember that these customers' accounts are in the job: a rerun skips them."""
        async with self._dialect.transaction() as tx:
            for customer in customers:
                await tx.execute("remember_listed", job=job, customer=customer, now=time.time())

    # -- work ---------------------------------------------------------------------------------

    @guarded
    async def claim(
        self, job: str, run_id: str, *, limit: int, stripe_account: str = ""
    ) -> list[str]:
        """The run's next page of a connected account's accounts still to call, in input
        order ('': the job's own)."""
        return await self._dialect.claim(job, run_id, limit, stripe_account)

    @guarded
    async def lanes(self, job: str) -> list[str]:
        """The job's connected accounts ('' for its own), whatever their accounts' state."""
        return [row[0] for row in await self._read.fetch("lanes", job=job)]

    @guarded
    async def pending_elsewhere(self, job: str, run_id: str) -> bool:
        """Whether accounts still to call are held by another run (or free to claim)."""
        (row,) = await self._read.fetch("pending_elsewhere", job=job, run_id=run_id)
        return bool(row[0])

    @guarded
    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one write."""
        await self._dialect.record(job, run_id, results)

    @guarded
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

    @guarded
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

    # -- reading ------------------------------------------------------------------------------

    @guarded
    async def counts(self, job: str) -> dict[str | None, int]:
        """Accounts per outcome (None: still to call)."""
        return {row[0]: int(row[1]) for row in await self._read.fetch("outcome_counts", job=job)}

    @guarded
    async def lane_counts(self, job: str) -> list[LaneCounts]:
        """Accounts per connected account and outcome, most still to call first."""
        lanes: dict[str, dict[str | None, int]] = {}
        for lane, outcome, count in await self._read.fetch("lane_counts", job=job):
            lanes.setdefault(lane, {})[outcome] = int(count)
        found = [LaneCounts(lane, counts) for lane, counts in lanes.items()]
        return sorted(found, key=lambda lane: (-lane.pending, lane.stripe_account))

    @guarded
    async def confirmed_count(self, job: str) -> int:
        """Accounts whose disconnection an event confirmed (from the webhook or reconcile)."""
        (row,) = await self._read.fetch("confirmed_count", job=job)
        return int(row[0])

    @guarded
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

    @guarded
    async def has_job(self, job: str) -> bool:
        """Whether the store holds anything of this job."""
        (row,) = await self._read.fetch("has_job", job=job)
        return bool(row[0])

    # -- forgetting ---------------------------------------------------------------------------

    @guarded
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

    @guarded
    async def jobs_finished_before(self, before: float) -> list[str]:
        """Jobs whose last run finished (exit 0 or 1) before `before` (epoch seconds)."""
        return [row[0] for row in await self._read.fetch("jobs_finished_before", before=before)]

    # -- runs ---------------------------------------------------------------------------------

    @guarded
    async def start_run(self, job: str, run_id: str, *, source: str = "") -> None:
        """Record that a run of the job started, and what it reads (`source`, if given)."""
        async with self._dialect.transaction() as tx:
            await tx.execute("start_run", job=job, run_id=run_id, now=time.time())
            if source:
                await tx.execute("remember_source", job=job, source=source)

    @guarded
    async def job_source(self, job: str) -> str | None:
        """What the job's last run read its accounts from, if a run said."""
        rows = await self._read.fetch("job_source", job=job)
        return str(rows[0][0]) if rows else None

    @guarded
    async def finish_run(self, run_id: str, exit_code: int, summary: str) -> None:
        """Record how a run ended."""
        await self._read.execute(
            "finish_run", run_id=run_id, exit_code=exit_code, summary=summary, now=time.time()
        )

    @guarded
    async def last_run(self, job: str) -> RunInfo | None:
        """The job's most recent run."""
        rows = await self._read.fetch("last_run", job=job)
        return RunInfo(*rows[0]) if rows else None

    # -- the HTML report ----------------------------------------------------------------------

    @guarded
    async def runs(self, job: str, *, limit: int) -> tuple[list[RunInfo], int]:
        """The job's first `limit` runs, oldest first, and how many it had in all."""
        rows = await self._read.fetch("job_runs", job=job, limit=limit)
        (count,) = await self._read.fetch("run_count", job=job)
        return [RunInfo(*row) for row in rows], int(count[0])

    @guarded
    async def disconnected_span(self, job: str) -> tuple[float, float] | None:
        """When the job's first and last disconnect were recorded; None before any."""
        ((first, last),) = await self._read.fetch("disconnected_span", job=job)
        return None if first is None else (float(first), float(last))

    @guarded
    async def disconnected_buckets(
        self, job: str, *, start_ms: int, width_ms: int
    ) -> dict[int, int]:
        """Disconnects recorded per bucket of `width_ms` from `start_ms` (bucket 0), counted
        by the database: as many rows as buckets, whatever the job's size."""
        rows = await self._read.fetch(
            "disconnected_buckets", job=job, start_ms=start_ms, width_ms=width_ms
        )
        return {int(bucket): int(count) for bucket, count in rows}

    @guarded
    async def problem_rows(self, job: str, *, limit: int) -> list[ReportRow]:
        """The job's first `limit` failed and invalid_id accounts, in input order."""
        rows = await self._read.fetch("problem_rows", job=job, limit=limit)
        return [ReportRow(*row) for row in rows]

    @guarded
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
