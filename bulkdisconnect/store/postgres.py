"""The PostgreSQL dialect (asyncpg): one store shared by many `run --join` workers.

Workers claim pages of pending accounts with `SELECT ... FOR UPDATE SKIP LOCKED`, marking them
with their run ID. A claim lasts as long as its worker's lease: a worker whose lock row missed
its heartbeat for `lease` seconds (killed, evicted, cut off) no longer holds anything, and the
others claim its accounts. Lease times are the database server's clock, never a worker's.

The tables live in the schema named by the URL's `schema` query parameter (default
`bulkdisconnect`), created on first use.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg

from bulkdisconnect.errors import LockHeldError, UsageError
from bulkdisconnect.logs import mask_url
from bulkdisconnect.model import ItemResult
from bulkdisconnect.postgresql import CONNECT_TIMEOUT, describe_error
from bulkdisconnect.store.dialect import Row, load_queries

DEFAULT_SCHEMA = "bulkdisconnect"
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
CLOSE_TIMEOUT = 5.0
POOL_SIZE = 6  # planning turn + staging + heartbeat + claims + writes, with room to spare
NOW = "extract(epoch from clock_timestamp())::float8"
LIVE = f"{NOW} - heartbeat_at < lease"  # a holder whose lease still runs

QUERIES = load_queries(
    {
        "now": NOW,
        "real": "DOUBLE PRECISION",
        "bool": "BOOLEAN",
        "order": "id",
        "order_key": "id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the input order",
        # Room on each page for claims to update rows in place (HOT).
        "accounts_options": " WITH (fillfactor = 80)",
        "tables": "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
    }
)
INDEXES = """
CREATE INDEX IF NOT EXISTS accounts_job_order ON accounts (job, id);
CREATE INDEX IF NOT EXISTS accounts_pending_lane ON accounts (job, stripe_account, id)
    WHERE outcome IS NULL;
"""
# Layout 1 had a view of the live holders; the statements now say what "live" is themselves.
# Layout 3 keys events by (job, event) and numbers each account's claims.
# Layout 4 keys accounts by (job, connected account, account); the job's own rows are ''.
# Layout 5 adds what `verify` read back; its new tables come with the schema.
MIGRATIONS = {
    1: ("", "DROP VIEW IF EXISTS live_locks"),
    2: (
        "",
        (
            "ALTER TABLE events DROP CONSTRAINT events_pkey, ADD PRIMARY KEY (job, event_id); "
            "ALTER TABLE accounts ADD COLUMN IF NOT EXISTS claim_gen INTEGER NOT NULL DEFAULT 0"
        ),
    ),
    3: (
        (
            "ALTER TABLE accounts ADD COLUMN IF NOT EXISTS stripe_account TEXT NOT NULL "
            "DEFAULT '', DROP CONSTRAINT IF EXISTS accounts_job_account_id_key, "
            "ADD UNIQUE (job, stripe_account, account_id); "
            "DROP INDEX IF EXISTS accounts_pending"
        ),
        "",
    ),
    4: (
        (
            "ALTER TABLE accounts ADD COLUMN IF NOT EXISTS verified_at DOUBLE PRECISION, "
            "ADD COLUMN IF NOT EXISTS verified_status TEXT, "
            "ADD COLUMN IF NOT EXISTS verified_pass TEXT"
        ),
        "",
    ),
}

# S608: the f-strings below put in LIVE, a constant; every value is a bound parameter.
# A claim takes pending accounts no live worker holds, for a claimer that still holds its
# own lease, and increments their claim generation. Its own accounts it does not have in hand
# ($5: those in memory, in flight or not yet recorded) it takes again: a claim whose reply
# was lost, a record whose commit a crash undid.
CLAIM = f"""
UPDATE accounts SET run_id = $2, claim_gen = claim_gen + 1
WHERE id = ANY(ARRAY(
    SELECT id FROM accounts
    WHERE job = $1 AND stripe_account = $6 AND id > $4 AND outcome IS NULL
      AND (run_id IS NULL
           OR (run_id = $2 AND id <> ALL($5::bigint[]))
           OR run_id NOT IN (SELECT owner FROM locks WHERE job = $1 AND {LIVE}))
      AND EXISTS (SELECT 1 FROM locks WHERE job = $1 AND owner = $2 AND {LIVE})
    ORDER BY id LIMIT $3
    FOR UPDATE SKIP LOCKED
))
RETURNING id, account_id, claim_gen
"""  # noqa: S608
# A result lands only on the claim it was made under (the run and the claim's generation), and
# once: a worker that lost its lease cannot overwrite what the worker that took over recorded,
# alive or not, and a batch written again after a lost reply changes nothing.
RECORD = """
UPDATE accounts a SET outcome = r.outcome, attempts = a.attempts + r.attempts,
    http_status = r.http_status, error_code = r.error_code, error_message = r.error_message,
    request_id = r.request_id,
    first_attempt_at = COALESCE(a.first_attempt_at, r.first_attempt_at),
    updated_at = $3
FROM unnest($4::bigint[], $5::int[], $6::text[], $7::int[], $8::int[], $9::text[], $10::text[],
            $11::text[], $12::float8[])
    AS r(id, claim_gen, outcome, attempts, http_status, error_code, error_message, request_id,
         first_attempt_at)
WHERE a.id = r.id AND a.job = $1 AND a.run_id = $2 AND a.claim_gen = r.claim_gen
  AND a.outcome IS NULL
"""


# What may pass if tried again: a lost or refused connection (a restart, a failover, an
# administrator's pg_terminate_backend), a cancelled statement, a serialisation conflict.
TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    OSError,
    TimeoutError,
)


class PostgresDialect:
    """PostgreSQL for `SqlStore`, over a small asyncpg pool."""

    schema = QUERIES["schema"] + INDEXES
    migrations = MIGRATIONS
    shared = True
    errors: tuple[type[Exception], ...] = (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
        TimeoutError,
    )

    @staticmethod
    def transient(exc: Exception) -> bool:
        # asyncpg's InterfaceError is also how it reports a misuse ("another operation is in
        # progress"): only a connection or pool found closed is an outage to wait out.
        if isinstance(exc, asyncpg.InterfaceError):
            return "closed" in str(exc) or "closing" in str(exc)
        return isinstance(exc, TRANSIENT)

    def describe(self, exc: Exception) -> str:
        return describe_error(exc)

    def corrupted(self, exc: Exception) -> bool:
        return isinstance(exc, asyncpg.exceptions.InternalServerError) and (
            exc.sqlstate in ("XX001", "XX002")  # data_corrupted, index_corrupted
        )

    def __init__(self, pool: asyncpg.Pool, description: str, schema: str) -> None:
        self._pool = pool
        self.description = description
        self._schema = schema
        self.reader = _Statements(pool)
        # (run_id, connected account) -> id of its last claimed account
        self._claimed_up_to: dict[tuple[str, str], int] = {}
        # (job, connected account, account) this dialect claimed -> (id, claim generation)
        self._claims: dict[tuple[str, str, str], tuple[int, int]] = {}

    @classmethod
    async def connect(cls, url: str, *, read_only: bool = False) -> PostgresDialect:
        """Connect, and create the URL's schema if missing (unless `read_only`: then every
        transaction is read-only)."""
        dsn, schema = _split_schema(url)
        description = mask_url(url)
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
                    "default_transaction_read_only": "on" if read_only else "off",
                },
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, OSError) as exc:
            raise UsageError(
                f"cannot open the state store {mask_url(dsn)}: {describe_error(exc)}"
            ) from None
        dialect = cls(pool, description, schema)
        if read_only:
            return dialect
        try:
            async with dialect.transaction(exclusive_for="schema") as tx:
                await tx.script(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        except BaseException:
            with anyio.CancelScope(shield=True):
                await dialect.aclose()
            raise
        return dialect

    def _key(self, purpose: str) -> int:
        """A stable 64-bit advisory lock key for `purpose` in this store's schema."""
        digest = hashlib.sha256(f"bulkdisconnect:{self._schema}:{purpose}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    @asynccontextmanager
    async def transaction(
        self, *, exclusive_for: str | None = None, beat: bool = False
    ) -> AsyncIterator[_Statements]:
        """A transaction; with `exclusive_for`, under an advisory lock held until it ends.

        A heartbeat (`beat`) needs nothing special: each transaction has its own connection.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            if exclusive_for is not None:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", self._key(exclusive_for))
            yield _Statements(conn)

    @asynccontextmanager
    async def staging(self) -> AsyncIterator[_Staging]:
        """Temporary tables on a connection of their own, dropped and given back on leaving."""
        conn = await self._pool.acquire()
        try:
            await conn.execute(
                "CREATE TEMP TABLE staged_raw (pos BIGSERIAL, account_id TEXT NOT NULL, "
                "valid INTEGER NOT NULL, settled TEXT, stripe_account TEXT NOT NULL)"
            )
            yield _Staging(conn)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if not conn.is_closed():
                        await conn.execute("DROP TABLE IF EXISTS staged_raw, staged")
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    conn.terminate()  # the temporary tables die with the session
                await self._pool.release(conn)

    @asynccontextmanager
    async def plan_turn(self, job: str) -> AsyncIterator[None]:
        """One worker of the job plans at a time (a session advisory lock)."""
        key = self._key(f"plan:{job}")
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)

    async def claim(self, job: str, run_id: str, limit: int, stripe_account: str) -> list[str]:
        """Claim a connected account's first `limit` accounts still to call that no live
        worker holds.

        A worker whose own lease ran out claims nothing (LockHeldError).

        The search starts after the run's last claim, so it does not wade through every
        account already done; only when nothing is left ahead does it look from the start,
        for accounts a dead worker left behind or a breaker released.
        """
        after = self._claimed_up_to.get((run_id, stripe_account), 0)
        in_hand = [
            claim[0]
            for (of, lane, _), claim in self._claims.items()
            if of == job and lane == stripe_account
        ]
        args = (job, run_id, limit, after, in_hand, stripe_account)
        rows = await self._pool.fetch(CLAIM, *args)
        if not rows and after:
            rows = await self._pool.fetch(CLAIM, *args[:3], 0, *args[4:])
        if not rows and not await self.reader.fetch("holds_lease", job=job, owner=run_id):
            raise LockHeldError(f"job {job!r}: lost the lock's lease (taken over); stopped")
        rows = sorted(rows, key=lambda row: row["id"])
        if rows:
            self._claimed_up_to[run_id, stripe_account] = rows[-1]["id"]
            self._claims.update(
                ((job, stripe_account, r["account_id"]), (r["id"], r["claim_gen"])) for r in rows
            )
        return [row["account_id"] for row in rows]

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one statement, each under the claim it was made under.

        A result for an account this run did not claim has nothing to land on: it is dropped.
        """
        claims = self._claims
        mine = [
            (claims[job, r.stripe_account, r.account_id], r)
            for r in results
            if (job, r.stripe_account, r.account_id) in claims
        ]
        await self._pool.execute(
            RECORD,
            job,
            run_id,
            time.time(),
            [claim[0] for claim, _ in mine],
            [claim[1] for claim, _ in mine],
            [r.outcome.value for _, r in mine],
            [r.attempts for _, r in mine],
            [r.http_status for _, r in mine],
            [r.error_code for _, r in mine],
            [r.error_message for _, r in mine],
            [r.request_id for _, r in mine],
            [r.first_attempt_at for _, r in mine],
        )
        for r in results:  # only once written: a batch that failed is written again later
            claims.pop((job, r.stripe_account, r.account_id), None)

    async def scrub(self) -> None:
        """Nothing here: PostgreSQL's (auto)vacuum reclaims the deleted rows' space."""

    async def aclose(self) -> None:
        """Close the pool, or cut it off if it does not close in time (or the caller's
        deadline comes first)."""
        closed = False
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await self._pool.close()
                closed = True
        finally:
            if not closed:
                self._pool.terminate()

    def __repr__(self) -> str:
        return f"PostgresDialect({self.description})"


class _Statements:
    """The named statements of queries.sql on a pool or a connection (`Connection`)."""

    def __init__(self, conn: asyncpg.Pool | asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, name: str, **params: Any) -> int:
        sql, names = _numbered(name)
        status: str = await self._conn.execute(sql, *(params[n] for n in names))
        return int(status.rsplit(" ", 1)[-1])  # "UPDATE 3", "INSERT 0 1"

    async def fetch(self, name: str, **params: Any) -> list[Row]:
        sql, names = _numbered(name)
        return [tuple(row) for row in await self._conn.fetch(sql, *(params[n] for n in names))]

    async def execute_each(self, name: str, params: Sequence[dict[str, Any]]) -> list[int]:
        return [await self.execute(name, **one) for one in params]

    async def script(self, sql: str) -> None:
        if sql:
            await self._conn.execute(sql)


class _Staging(_Statements):
    """The staging connection (`Staging`): values COPY'd in, deduplicated when sealed."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self._connection = conn

    async def add(self, rows: list[tuple[str, int, str, str]]) -> None:
        await self._connection.copy_records_to_table(
            "staged_raw",
            records=rows,
            columns=["account_id", "valid", "settled", "stripe_account"],
        )

    async def spans(self) -> list[tuple[int, int]]:
        """One span: rows, not the whole table, are locked while merging."""
        return [(0, 2**62)]

    async def seal(self) -> None:
        # Each value's first occurrence decides its place and its kind, as in SQLite.
        await self._connection.execute(
            "CREATE TEMP TABLE staged AS SELECT DISTINCT ON (stripe_account, account_id) pos, "
            "stripe_account, account_id, valid, NULLIF(settled, '') AS settled FROM staged_raw "
            "ORDER BY stripe_account, account_id, pos; "
            "CREATE UNIQUE INDEX ON staged (stripe_account, account_id); ANALYZE staged"
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Statements]:
        async with self._connection.transaction():
            yield self
        # Statistics now, not when autovacuum gets to it: without them the planner takes
        # the job for a dozen rows and records a batch of 100 by scanning it whole.
        await self._connection.execute("ANALYZE accounts")


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_NUMBERED: dict[str, tuple[str, list[str]]] = {}


def _numbered(name: str) -> tuple[str, list[str]]:
    """Query `name` with its :params as $1, $2, ... and the params in that order (cached)."""
    if name not in _NUMBERED:
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match[1] not in order:
                order.append(match[1])
            return f"${order.index(match[1]) + 1}"

        _NUMBERED[name] = (_NAMED.sub(number, QUERIES[name]), order)
    return _NUMBERED[name]


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
