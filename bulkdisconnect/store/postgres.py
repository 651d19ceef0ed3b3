"""PostgreSQL store (asyncpg): the SQLite store's semantics, shared by many `run --join` workers.

Workers claim pages of pending accounts with `SELECT ... FOR UPDATE SKIP LOCKED`, marking them
with their run ID. A claim lasts as long as its worker's lease: a worker whose lock row missed
its heartbeat for `lease` seconds (killed, evicted, cut off) no longer holds anything, and the
others claim its accounts. Lease times are the database server's clock, never a worker's.

The tables live in the schema named by the URL's `schema` query parameter (default
`bulkdisconnect`), created on first use.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import asyncpg

from bulkdisconnect.errors import LockHeldError, UsageError
from bulkdisconnect.logs import mask_url
from bulkdisconnect.model import ItemResult, Outcome, Settled, is_valid_account_id
from bulkdisconnect.store import (
    Beat,
    Confirmation,
    LockInfo,
    PlanCounts,
    ReportRow,
    RunInfo,
    stored_value,
)
from bulkdisconnect.store.sqlite import INVALID_MESSAGE, REPORT_PAGE, SETTLED_MESSAGE

DEFAULT_SCHEMA = "bulkdisconnect"
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
POOL_SIZE = 6  # planning guard + staging + heartbeat + claims + writes, with room to spare

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the input order
    job TEXT NOT NULL,
    account_id TEXT NOT NULL,
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    request_id TEXT,
    first_attempt_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION,
    run_id TEXT,  -- the run that claimed or recorded it
    confirmed_at DOUBLE PRECISION,
    event_id TEXT,
    UNIQUE (job, account_id)
) WITH (fillfactor = 80);  -- room on each page for claims to update rows in place (HOT)
CREATE INDEX IF NOT EXISTS accounts_job_order ON accounts (job, id);
CREATE INDEX IF NOT EXISTS accounts_pending ON accounts (job, id) WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS customers (
    job TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    listed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job, customer_id)
);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    account_id TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
);
-- Deliveries of events for accounts outside the job: counted, their accounts not kept.
CREATE TABLE IF NOT EXISTS unknown_events (
    job TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    last_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    job TEXT NOT NULL,
    owner TEXT NOT NULL,  -- the holder's run ID
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,  -- the server's clock
    lease DOUBLE PRECISION NOT NULL,
    shared BOOLEAN NOT NULL,  -- a `run --join` worker
    share_of INTEGER NOT NULL,  -- the holder runs at (at most) --rate / share_of
    planned BOOLEAN NOT NULL DEFAULT false,  -- the holder planned, or found planned, the input
    source TEXT NOT NULL DEFAULT '',  -- a joining worker's source arguments, fingerprinted
    PRIMARY KEY (job, owner)
);
-- Holders whose lease still runs, by the server's clock: their claims hold.
CREATE OR REPLACE VIEW live_locks AS
    SELECT * FROM locks WHERE extract(epoch from clock_timestamp()) - heartbeat_at < lease;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    exit_code INTEGER,
    summary TEXT
);
"""

CLAIM = """
UPDATE accounts SET run_id = $2
WHERE id = ANY(ARRAY(
    SELECT id FROM accounts
    WHERE job = $1 AND id > $4 AND outcome IS NULL AND run_id IS DISTINCT FROM $2
      AND (run_id IS NULL OR run_id NOT IN (SELECT owner FROM live_locks WHERE job = $1))
    ORDER BY id LIMIT $3
    FOR UPDATE SKIP LOCKED
))
RETURNING id, account_id
"""

# A result lands unless another live worker holds the account now: a worker that lost its
# lease must not overwrite the outcome of the one that took the account over.
RECORD = """
UPDATE accounts a SET outcome = r.outcome, attempts = a.attempts + r.attempts,
    http_status = r.http_status, error_code = r.error_code, error_message = r.error_message,
    request_id = r.request_id,
    first_attempt_at = COALESCE(a.first_attempt_at, r.first_attempt_at),
    updated_at = $3, run_id = $2
FROM unnest($4::text[], $5::text[], $6::int[], $7::int[], $8::text[], $9::text[], $10::text[],
            $11::float8[])
    AS r(account_id, outcome, attempts, http_status, error_code, error_message, request_id,
         first_attempt_at)
WHERE a.job = $1 AND a.account_id = r.account_id AND a.account_id = ANY($4::text[])
  AND (a.run_id IS NULL OR a.run_id = $2
       OR a.run_id NOT IN (SELECT owner FROM live_locks WHERE job = $1))
"""

REPORT = """
SELECT id, account_id, outcome, attempts, http_status, error_code, error_message, request_id,
    first_attempt_at, updated_at, confirmed_at, event_id
FROM accounts
WHERE job = $1 AND id > $2 AND (NOT $3 OR (outcome = 'disconnected' AND confirmed_at IS NULL))
ORDER BY id LIMIT $4
"""


class PostgresStore:
    """The PostgreSQL implementation of `Store`, over a small asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, description: str) -> None:
        self._pool = pool
        self._description = description
        self._staging: asyncpg.Connection | None = None  # holds the staged input's temp tables
        self._claimed_up_to: dict[str, int] = {}  # run_id -> id of its last claimed account

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect, and create the schema and its tables if missing."""
        dsn, schema = _split_schema(url)
        description = mask_url(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                server_settings={
                    "search_path": schema,
                    "application_name": "bulkdisconnect",
                    "synchronous_commit": "off",
                },
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, OSError) as exc:
            raise UsageError(f"cannot open the state store {description}: {_reason(exc)}") from None
        store = cls(pool, description)
        try:
            async with pool.acquire() as conn, conn.transaction():
                # Workers starting together must not race on CREATE ... IF NOT EXISTS.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _key("schema", schema))
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                await conn.execute(SCHEMA)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
            raise
        return store

    async def aclose(self) -> None:
        """Close the pool."""
        with anyio.CancelScope(shield=True):
            await self.discard_staged()
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await self._pool.close()
                return
            self._pool.terminate()

    def __repr__(self) -> str:
        return f"PostgresStore({self._description})"

    # -- lock ---------------------------------------------------------------------------------

    async def acquire_lock(
        self, job: str, owner: str, *, stale_after: float, join: bool = False, source: str = ""
    ) -> None:
        """Take the job's lock, or join its `run --join` workers; stale holders are dropped.

        A run without `join` needs no live holder at all; a joining worker needs every live
        holder to be a joining worker started on the same `source` (a fingerprint of the
        source arguments), so that a worker given another input cannot join by mistake.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _key("lock", job))
            now = await conn.fetchval("SELECT extract(epoch from clock_timestamp())::float8")
            holders = [_lock_info(row) for row in await conn.fetch(LOCKS, job)]
            live = [h for h in holders if now - h.heartbeat_at < h.lease]
            await conn.execute(
                "DELETE FROM locks WHERE job = $1 AND owner = ANY($2::text[])",
                job,
                [h.owner for h in holders if h not in live],
            )
            _check_can_hold(job, live, join=join)
            others = await conn.fetchval(
                "SELECT COUNT(*) FROM live_locks WHERE job = $1 AND source <> $2", job, source
            )
            if others:
                raise LockHeldError(
                    f"job {job!r} is being worked by --join workers started on another input "
                    "(file, query or customers): start every worker with the same arguments"
                )
            await conn.execute(
                "INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, "
                "shared, share_of, source) VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9)",
                job,
                owner,
                os.getpid(),
                socket.gethostname(),
                now,
                stale_after,
                join,
                len(live) + 1,
                source,
            )

    async def heartbeat(self, job: str, owner: str) -> Beat | None:
        """Renew the lease and take the current share; None if the lease ran out or was taken.

        A holder that missed its own lease has lost it even if nobody took over: others may
        already be working the accounts it claimed.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            renewed = await conn.fetchval(
                "UPDATE locks SET heartbeat_at = extract(epoch from clock_timestamp()) "
                "WHERE owner = $2 AND (job, owner) IN (SELECT job, owner FROM live_locks "
                "WHERE job = $1) RETURNING 1",
                job,
                owner,
            )
            if renewed is None:
                return None
            live = await conn.fetch("SELECT owner, share_of FROM live_locks WHERE job = $1", job)
            workers = len(live)
            await conn.execute(
                "UPDATE locks SET share_of = $3 WHERE job = $1 AND owner = $2", job, owner, workers
            )
        ready = all(row["share_of"] >= workers for row in live if row["owner"] != owner)
        return Beat(workers=workers, ready=ready)

    async def release_lock(self, job: str, owner: str) -> None:
        """Drop this owner's hold on the job."""
        await self._pool.execute("DELETE FROM locks WHERE job = $1 AND owner = $2", job, owner)

    async def locks(self, job: str) -> list[LockInfo]:
        """The job's lock holders (fresh or stale), oldest first."""
        return [_lock_info(row) for row in await self._pool.fetch(LOCKS, job)]

    @asynccontextmanager
    async def planning(self, job: str, owner: str) -> AsyncIterator[bool]:
        """One worker at a time; yields False when a live worker already planned the input."""
        key = _key("plan", job)
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                planned = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM live_locks WHERE job = $1 AND planned)", job
                )
                yield not planned
                await conn.execute(
                    "UPDATE locks SET planned = true WHERE job = $1 AND owner = $2", job, owner
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)

    # -- planning and work --------------------------------------------------------------------

    async def stage(
        self, job: str, chunks: AsyncIterator[Sequence[str | Settled]], *, retry_failed: bool
    ) -> PlanCounts:
        """COPY the whole input into temporary tables on one connection and count it."""
        await self.discard_staged()
        conn = self._staging = await self._pool.acquire()
        read = 0
        try:
            await conn.execute(
                "CREATE TEMP TABLE staged_raw (pos BIGSERIAL, account_id TEXT NOT NULL, "
                "valid BOOLEAN NOT NULL, settled TEXT)"
            )
            async for chunk in chunks:
                read += len(chunk)
                await conn.copy_records_to_table(
                    "staged_raw",
                    records=[_staged_row(value) for value in chunk],
                    columns=["account_id", "valid", "settled"],
                )
            # Each value's first occurrence decides its place and its kind, as in SQLite.
            await conn.execute(
                "CREATE TEMP TABLE staged AS SELECT DISTINCT ON (account_id) * FROM staged_raw "
                "ORDER BY account_id, pos; "
                "CREATE UNIQUE INDEX ON staged (account_id); ANALYZE staged"
            )
            return await _count(conn, job=job, read=read, retry_failed=retry_failed)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.discard_staged()
            raise

    async def commit_staged(self, job: str, *, retry_failed: bool) -> None:
        """Merge the staged input into the job in one transaction."""
        conn = self._staging
        if conn is None:
            raise RuntimeError("commit_staged without stage")
        try:
            async with conn.transaction():
                await _merge(conn, job=job, retry_failed=retry_failed)
            # Statistics now, not when autovacuum gets to it: without them the planner takes
            # the job for a dozen rows and records a batch of 100 by scanning it whole.
            await conn.execute("ANALYZE accounts")
        finally:
            with anyio.CancelScope(shield=True):
                await self.discard_staged()

    async def discard_staged(self) -> None:
        """Drop the staged input and give its connection back."""
        conn, self._staging = self._staging, None
        if conn is None:
            return
        try:
            if not conn.is_closed():
                await conn.execute("DROP TABLE IF EXISTS staged_raw, staged")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            conn.terminate()  # the temporary tables die with the session
        finally:
            await self._pool.release(conn)

    async def customer_listed(self, job: str, customer: str) -> bool:
        """Whether a customer's accounts were already listed into the job."""
        found = await self._pool.fetchval(
            "SELECT 1 FROM customers WHERE job = $1 AND customer_id = $2", job, customer
        )
        return found is not None

    async def mark_customer_listed(self, job: str, customer: str) -> None:
        """Remember that a customer's accounts are in the job, so a rerun does not list them."""
        await self._pool.execute(
            "INSERT INTO customers VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            job,
            customer,
            time.time(),
        )

    async def claim_pending(self, job: str, run_id: str, *, limit: int) -> list[str]:
        """Claim the first `limit` accounts still to call that no live worker holds.

        The search starts after the run's last claim, so it does not wade through every
        account already done; only when nothing is left ahead does it look from the start,
        for accounts a dead worker left behind or a breaker released.
        """
        after = self._claimed_up_to.get(run_id, 0)
        rows = await self._pool.fetch(CLAIM, job, run_id, limit, after)
        if not rows and after:
            rows = await self._pool.fetch(CLAIM, job, run_id, limit, 0)
        rows = sorted(rows, key=lambda row: row["id"])
        if rows:
            self._claimed_up_to[run_id] = rows[-1]["id"]
        return [row["account_id"] for row in rows]

    async def pending_elsewhere(self, job: str, run_id: str) -> bool:
        """Whether accounts still to call are held by another worker (or free to claim)."""
        found = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM accounts WHERE job = $1 AND outcome IS NULL "
            "AND run_id IS DISTINCT FROM $2)",
            job,
            run_id,
        )
        return bool(found)

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one statement."""
        await self._pool.execute(
            RECORD,
            job,
            run_id,
            time.time(),
            [r.account_id for r in results],
            [r.outcome.value for r in results],
            [r.attempts for r in results],
            [r.http_status for r in results],
            [r.error_code for r in results],
            [r.error_message for r in results],
            [r.request_id for r in results],
            [r.first_attempt_at for r in results],
        )

    async def release_outcomes(self, job: str, run_id: str, outcomes: Sequence[str]) -> int:
        """Turn this run's outcomes of the given kinds back into pending; returns how many."""
        status = await self._pool.execute(
            "UPDATE accounts SET outcome = NULL "
            "WHERE job = $1 AND run_id = $2 AND outcome = ANY($3::text[])",
            job,
            run_id,
            list(outcomes),
        )
        return int(status.rsplit(" ", 1)[-1])

    # -- reading ------------------------------------------------------------------------------

    async def counts(self, job: str) -> dict[str | None, int]:
        """Accounts per outcome (None: still to call)."""
        rows = await self._pool.fetch(
            "SELECT outcome, COUNT(*) FROM accounts WHERE job = $1 GROUP BY outcome", job
        )
        return {row[0]: int(row[1]) for row in rows}

    async def confirmed_count(self, job: str) -> int:
        """Accounts whose disconnection a webhook event confirmed."""
        count = await self._pool.fetchval(
            "SELECT COUNT(*) FROM accounts WHERE job = $1 AND confirmed_at IS NOT NULL", job
        )
        return int(count)

    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation:
        """Record a disconnected event on the account's outcome, once per event ID."""
        async with self._pool.acquire() as conn, conn.transaction():
            # The event ID is claimed first: a concurrent delivery of it waits on the
            # unique index, then finds it taken and is a replay.
            new = await conn.fetchval(
                "INSERT INTO events VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
                event_id,
                job,
                account_id,
                confirmed_at,
            )
            if new is None:
                return Confirmation.REPLAYED
            updated = await conn.fetchval(
                "UPDATE accounts SET confirmed_at = $3, event_id = $4 "
                "WHERE job = $1 AND account_id = $2 RETURNING 1",
                job,
                account_id,
                confirmed_at,
                event_id,
            )
            if updated:
                return Confirmation.CONFIRMED
            # An account outside the job: nothing of it is kept, the delivery is counted.
            await conn.execute("DELETE FROM events WHERE event_id = $1", event_id)
            await conn.execute(
                "INSERT INTO unknown_events VALUES ($1, 1, $2) ON CONFLICT (job) "
                "DO UPDATE SET count = unknown_events.count + 1, last_at = excluded.last_at",
                job,
                confirmed_at,
            )
        return Confirmation.UNKNOWN

    async def unknown_events(self, job: str) -> int:
        """Events received for accounts outside the job (counted, not kept)."""
        count = await self._pool.fetchval("SELECT count FROM unknown_events WHERE job = $1", job)
        return 0 if count is None else int(count)

    async def rows(self, job: str, *, unconfirmed: bool = False) -> AsyncIterator[ReportRow]:
        """Every account of the job in input order (or only disconnected, unconfirmed ones)."""
        after = 0
        while True:
            page = await self._pool.fetch(REPORT, job, after, unconfirmed, REPORT_PAGE)
            for row in page:
                yield ReportRow(*tuple(row)[1:])
            if len(page) < REPORT_PAGE:
                return
            after = page[-1]["id"]

    async def has_job(self, job: str) -> bool:
        """Whether the store holds anything of this job."""
        found = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE job = $1) "
            "OR EXISTS (SELECT 1 FROM accounts WHERE job = $1)",
            job,
        )
        return bool(found)

    async def start_run(self, job: str, run_id: str) -> None:
        """Record that a run of the job started."""
        await self._pool.execute(
            "INSERT INTO runs (run_id, job, started_at) VALUES ($1, $2, $3)",
            run_id,
            job,
            time.time(),
        )

    async def finish_run(self, run_id: str, exit_code: int, summary: str) -> None:
        """Record how a run ended."""
        await self._pool.execute(
            "UPDATE runs SET finished_at = $2, exit_code = $3, summary = $4 WHERE run_id = $1",
            run_id,
            time.time(),
            exit_code,
            summary,
        )

    async def last_run(self, job: str) -> RunInfo | None:
        """The job's most recent run."""
        row = await self._pool.fetchrow(
            "SELECT run_id, started_at, finished_at, exit_code, summary FROM runs "
            "WHERE job = $1 ORDER BY started_at DESC LIMIT 1",
            job,
        )
        return None if row is None else RunInfo(*row)


LOCKS = (
    "SELECT owner, pid, host, heartbeat_at, lease, shared FROM locks WHERE job = $1 "
    "ORDER BY acquired_at, owner"
)


def _lock_info(row: asyncpg.Record) -> LockInfo:
    return LockInfo(*row)


def _check_can_hold(job: str, live: list[LockInfo], *, join: bool) -> None:
    """Raise LockHeldError unless a new holder (joining or not) may work the job now."""
    exclusive = [h for h in live if not h.shared]
    if exclusive:
        (holder,) = exclusive
        raise LockHeldError(
            f"job {job!r} is locked by a run on {holder.host} (pid {holder.pid}), "
            f"alive {time.time() - holder.heartbeat_at:.0f}s ago; wait for it to finish"
        )
    if live and not join:
        raise LockHeldError(
            f"job {job!r} is being worked by {len(live)} `run --join` worker(s); "
            "add --join to work with them, or wait for them to finish"
        )


async def _count(
    conn: asyncpg.Connection, *, job: str, read: int, retry_failed: bool
) -> PlanCounts:
    """What merging the staged input would find and leave to call; changes nothing."""
    row = await conn.fetchrow(
        """
        SELECT
          (SELECT COUNT(*) FROM staged),
          (SELECT COUNT(*) FROM staged WHERE NOT valid),
          (SELECT COUNT(*) FROM staged s JOIN accounts a
             ON a.job = $1 AND a.account_id = s.account_id
           WHERE s.valid AND a.outcome IS NOT NULL AND NOT ($2 AND a.outcome = 'failed')),
          (SELECT COUNT(*) FROM accounts a
           WHERE a.job = $1 AND (a.outcome IS NULL OR ($2 AND a.outcome = 'failed'))
             AND NOT EXISTS (SELECT 1 FROM staged s WHERE s.account_id = a.account_id
                             AND s.valid AND s.settled IS NOT NULL)),
          (SELECT COUNT(*) FROM staged s WHERE s.valid AND s.settled IS NULL
             AND NOT EXISTS (SELECT 1 FROM accounts a
                             WHERE a.job = $1 AND a.account_id = s.account_id))
        """,
        job,
        retry_failed,
    )
    unique, invalid, done, pending, new = (int(n) for n in row)
    return PlanCounts(
        read=read,
        invalid=invalid,
        duplicates=read - unique,
        already_done=done,
        to_call=pending + new,
    )


async def _merge(conn: asyncpg.Connection, *, job: str, retry_failed: bool) -> None:
    now = time.time()
    if retry_failed:
        await conn.execute(
            "UPDATE accounts SET outcome = NULL WHERE job = $1 AND outcome = $2",
            job,
            Outcome.FAILED.value,
        )
    # Invalid values are recorded invalid_id; settled ones (a Stripe list showed them
    # disconnected already) with their outcome and no call; the rest are to call.
    await conn.execute(
        """
        INSERT INTO accounts (job, account_id, outcome, error_code, error_message, updated_at)
        SELECT $1, s.account_id, CASE WHEN NOT s.valid THEN $2 ELSE s.settled END,
            CASE WHEN s.valid THEN NULL ELSE $2 END,
            CASE WHEN NOT s.valid THEN $3 WHEN s.settled IS NOT NULL THEN $4 END,
            CASE WHEN NOT s.valid OR s.settled IS NOT NULL THEN $5::float8 END
        FROM staged s ORDER BY s.pos
        ON CONFLICT (job, account_id) DO NOTHING
        """,
        job,
        Outcome.INVALID_ID.value,
        INVALID_MESSAGE,
        SETTLED_MESSAGE,
        now,
    )
    # A settled account already pending in the job (listed again later) needs no call.
    await conn.execute(
        "UPDATE accounts a SET outcome = s.settled, error_message = $2, updated_at = $3 "
        "FROM staged s WHERE a.job = $1 AND a.account_id = s.account_id "
        "AND a.outcome IS NULL AND s.settled IS NOT NULL AND s.valid",
        job,
        SETTLED_MESSAGE,
        now,
    )


def _staged_row(value: str | Settled) -> tuple[str, bool, str | None]:
    if isinstance(value, str):
        return stored_value(value), is_valid_account_id(value), None
    return value.account_id, is_valid_account_id(value.account_id), value.outcome.value


def _split_schema(url: str) -> tuple[str, str]:
    """The URL without its `schema` query parameter, and that schema (validated)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not SCHEMA_NAME.fullmatch(schema):
        raise UsageError(
            f"schema={schema!r} in the state URL: use lower-case letters, digits and '_'"
        )
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schema


def _key(purpose: str, name: str) -> int:
    """A stable 64-bit advisory lock key for (purpose, name)."""
    digest = hashlib.sha256(f"bulkdisconnect:{purpose}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.message)
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, ValueError) and not isinstance(exc, asyncpg.InterfaceError):
        return "malformed URL (percent-encode special characters in the password)"
    return " ".join(str(exc).split())
