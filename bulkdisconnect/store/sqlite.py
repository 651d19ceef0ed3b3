"""The SQLite dialect: one file, one connection driven from a worker thread, WAL mode.

One process works a job at a time (`run --join` needs PostgreSQL), so a run claims its pages
with a cursor over the input order rather than with SKIP LOCKED, and records by rowid.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from bulkdisconnect.errors import LockHeldError, UsageError
from bulkdisconnect.model import ItemResult
from bulkdisconnect.store.dialect import Row, load_queries

T = TypeVar("T")

QUERIES = load_queries(
    {
        # The epoch in seconds (with milliseconds) by SQLite's own clock.
        "now": "((julianday('now') - 2440587.5) * 86400.0)",
        "real": "REAL",
        "bool": "INTEGER",
        "order": "rowid",
        "order_key": "",  # the rowid keeps the input order
        "accounts_options": "",
        "tables": "SELECT name FROM sqlite_master WHERE type = 'table'",
    }
)

# Layout 1 held one lock row per job; layout 2 has a row per holder, as PostgreSQL's.
# Layout 3 keys events by (job, event) and numbers each account's claims.
MIGRATIONS = {
    1: (
        "ALTER TABLE locks RENAME TO locks_v1",
        (
            "INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, shared, "
            "share_of, planned, source) SELECT job, owner, pid, host, acquired_at, heartbeat_at, "
            "lease, 0, 1, 1, '' FROM locks_v1; DROP TABLE locks_v1"
        ),
    ),
    2: (
        "ALTER TABLE events RENAME TO events_v2",
        (
            "INSERT INTO events (job, event_id, account_id, received_at) "
            "SELECT job, event_id, account_id, received_at FROM events_v2; DROP TABLE events_v2; "
            "ALTER TABLE accounts ADD COLUMN claim_gen INTEGER NOT NULL DEFAULT 0"
        ),
    ),
}

CLAIM = (
    "SELECT rowid, account_id, claim_gen FROM accounts NOT INDEXED WHERE rowid > ? AND job = ? "
    "AND outcome IS NULL ORDER BY rowid LIMIT ?"
)
MARK_CLAIMED = (
    "UPDATE accounts NOT INDEXED SET run_id = ?, claim_gen = claim_gen + 1 "
    "WHERE rowid > ? AND rowid <= ? AND job = ? AND outcome IS NULL"
)
HOLDS_LEASE = QUERIES["holds_lease"].replace(":job", "?").replace(":owner", "?")
# A result lands only on the claim it was made under (the run and the claim's generation), and
# once: a worker that lost its lease cannot overwrite what the run that took over recorded.
FENCE = "WHERE rowid = ? AND run_id = ? AND claim_gen = ? AND outcome IS NULL"
RECORD = f"""
UPDATE accounts SET outcome = ?, attempts = attempts + ?, http_status = ?, error_code = ?,
    error_message = ?, request_id = ?, first_attempt_at = COALESCE(first_attempt_at, ?),
    updated_at = ?
{FENCE}
"""  # noqa: S608 - FENCE is a constant
# sqlite3 binds None and bool through its adaptation protocol: two failed attribute lookups,
# each formatting an AttributeError, ~1,300 instructions a parameter (callgrind). An outcome
# without error fields, the common case, is written by a statement that sets them NULL itself.
RECORD_CLEAN = f"""
UPDATE accounts SET outcome = ?, attempts = attempts + ?, http_status = ?, error_code = NULL,
    error_message = NULL, request_id = ?, first_attempt_at = COALESCE(first_attempt_at, ?),
    updated_at = ?
{FENCE}
"""  # noqa: S608 - FENCE is a constant


class SQLiteDialect:
    """SQLite for `SqlStore`; every statement runs on one connection, one at a time."""

    schema = QUERIES["schema"]
    migrations = MIGRATIONS
    shared = False  # one file: `run --join` needs PostgreSQL

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.description = str(path)
        self._lock = anyio.Lock()
        self.reader = _Statements(self, locked=False)
        self._claimed_up_to: dict[str, int] = {}  # run_id -> rowid of its last claimed account
        # (job, account) this dialect claimed -> (its rowid, the claim's generation)
        self._claims: dict[tuple[str, str], tuple[int, int]] = {}

    @classmethod
    async def connect(cls, path: Path, *, create: bool = True) -> SQLiteDialect:
        """Open (creating if needed) the store file; without `create`, a missing file is left
        alone and an empty database in memory stands in for it."""
        return cls(await anyio.to_thread.run_sync(_connect, path, create), path)

    async def call(self, fn: Callable[[sqlite3.Connection], T], *, locked: bool = False) -> T:
        """Run fn in a worker thread, holding the connection unless the caller does."""
        if locked:
            return await anyio.to_thread.run_sync(fn, self._db)
        async with self._lock:
            return await anyio.to_thread.run_sync(fn, self._db)

    async def _call_here(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short, bounded fn on the event loop's own thread.

        Measured: a worker thread doing the per-batch writes while the loop serves requests
        costs ~20 % of throughput. sqlite3 drops and retakes the GIL on every row, and each
        handover can make the loop wait. A 500-row batch done here blocks the loop ~2 ms.
        """
        async with self._lock:
            return fn(self._db)

    @asynccontextmanager
    async def transaction(self, *, exclusive_for: str | None = None) -> AsyncIterator[_Statements]:
        """BEGIN IMMEDIATE ... COMMIT; every write transaction is exclusive in SQLite."""
        async with self._lock:
            statements = _Statements(self, locked=True)
            await statements.script("BEGIN IMMEDIATE")
            try:
                yield statements
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await statements.script("ROLLBACK")
                raise
            with anyio.CancelScope(shield=True):
                await statements.script("COMMIT")

    @asynccontextmanager
    async def staging(self) -> AsyncIterator[_Staging]:
        """The temporary table `staged` on the store's connection, dropped on leaving."""
        await self.call(_create_staging)
        try:
            yield _Staging(self)
        finally:
            with anyio.CancelScope(shield=True):
                await self.call(lambda db: db.execute("DROP TABLE IF EXISTS temp.staged"))

    @asynccontextmanager
    async def plan_turn(self, job: str) -> AsyncIterator[None]:
        """Always this holder's turn: its lock on a SQLite job is exclusive."""
        yield

    async def claim(self, job: str, run_id: str, limit: int) -> list[str]:
        """The run's next page in input order, after its last: a range scan of rowids.

        Not the (job, account_id) index: through it every page would visit all of the
        job's rows and sort them (quadratic in N). A run whose lease ran out claims nothing
        (LockHeldError): another may be working the job now.
        """
        after = self._claimed_up_to.get(run_id)

        def claim(db: sqlite3.Connection) -> list[tuple[int, str, int]] | None:
            start = after
            if start is None:  # the job's first row, found once through the index
                first = db.execute("SELECT min(rowid) FROM accounts WHERE job = ?", (job,))
                start = (first.fetchone()[0] or 1) - 1
            with _immediate(db):
                if not db.execute(HOLDS_LEASE, (job, run_id)).fetchone():
                    return None
                rows: list[tuple[int, str, int]] = db.execute(CLAIM, (start, job, limit)).fetchall()
                if rows:
                    db.execute(MARK_CLAIMED, (run_id, start, rows[-1][0], job))
            return rows

        rows = await self._call_here(claim)
        if rows is None:
            raise LockHeldError(f"job {job!r}: lost the lock's lease (taken over); stopped")
        if rows:
            self._claimed_up_to[run_id] = rows[-1][0]
            # Recorded by rowid and under this claim's generation (one more than it was).
            self._claims.update(((job, account), (rowid, gen + 1)) for rowid, account, gen in rows)
        return [account_id for _, account_id, _ in rows]

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch in one transaction, each result under the claim it was made under.

        A result for an account this run did not claim has nothing to land on: it is dropped.
        """
        now = time.time()
        claims = self._claims
        clean, full = [], []
        for r in results:
            claim = claims.get((job, r.account_id))
            if claim is None:
                continue
            head = (r.outcome.value, r.attempts, r.http_status)
            tail = (r.request_id, r.first_attempt_at, now, claim[0], run_id, claim[1])
            if r.error_code is None and r.error_message is None:
                clean.append((*head, *tail))
            else:
                full.append((*head, r.error_code, r.error_message, *tail))

        def write(db: sqlite3.Connection) -> None:
            with _immediate(db):
                if clean:
                    db.executemany(RECORD_CLEAN, clean)
                if full:
                    db.executemany(RECORD, full)

        await self._call_here(write)
        for r in results:  # only once written: a batch that failed is written again later
            claims.pop((job, r.account_id), None)

    async def aclose(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        await self.call(lambda db: db.close())


class _Statements:
    """The named statements of queries.sql on the dialect's connection (`Connection`)."""

    def __init__(self, dialect: SQLiteDialect, *, locked: bool) -> None:
        self._dialect = dialect
        self._locked = locked  # inside a transaction, which holds the connection already

    async def execute(self, name: str, **params: Any) -> int:
        sql = QUERIES[name]
        return await self._dialect.call(
            lambda db: db.execute(sql, params).rowcount, locked=self._locked
        )

    async def fetch(self, name: str, **params: Any) -> list[Row]:
        sql = QUERIES[name]
        return await self._dialect.call(
            lambda db: db.execute(sql, params).fetchall(), locked=self._locked
        )

    async def script(self, sql: str) -> None:
        # executescript would COMMIT the transaction first: run the statements one by one.
        statements = [s for s in sql.split(";") if s.strip()]

        def run(db: sqlite3.Connection) -> None:
            for statement in statements:
                db.execute(statement)

        await self._dialect.call(run, locked=self._locked)


class _Staging(_Statements):
    """The staging side of the dialect (`Staging`): the store's own connection."""

    def __init__(self, dialect: SQLiteDialect) -> None:
        super().__init__(dialect, locked=False)

    async def add(self, rows: list[tuple[str, int, str]]) -> None:
        # INSERT OR IGNORE keeps each value's first-seen position (pos is the rowid).
        def insert(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.executemany(
                    "INSERT OR IGNORE INTO temp.staged (account_id, valid, settled) "
                    "VALUES (?, ?, NULLIF(?, ''))",
                    rows,
                )

        await self._dialect.call(insert)

    async def seal(self) -> None:
        """Nothing to do: the UNIQUE column deduplicated the values as they came."""

    def transaction(self) -> Any:
        return self._dialect.transaction()


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    try:
        if not create and not path.exists():
            path = Path(":memory:")
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a killed process; a power loss may drop the last
        # batches, which a rerun redoes with the same idempotency keys.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA temp_store = FILE")
    except (sqlite3.Error, OSError) as exc:
        raise UsageError(f"cannot open the state store {path}: {exc}") from exc
    return db


def _create_staging(db: sqlite3.Connection) -> None:
    db.execute("DROP TABLE IF EXISTS temp.staged")
    db.execute(
        "CREATE TEMP TABLE staged (pos INTEGER PRIMARY KEY, account_id TEXT NOT NULL UNIQUE, "
        "valid INTEGER NOT NULL, settled TEXT)"
    )


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken with BEGIN IMMEDIATE, committed or rolled back on exit."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
