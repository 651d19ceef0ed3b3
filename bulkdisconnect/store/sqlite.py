"""The SQLite dialect: one file, one connection driven from a worker thread, WAL mode.

One process works a job at a time (`run --join` needs PostgreSQL), so a run claims its pages
with a cursor over the input order rather than with SKIP LOCKED, and records by rowid.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from bulkdisconnect.errors import LockHeldError, UsageError
from bulkdisconnect.model import ItemResult
from bulkdisconnect.store.dialect import Row, load_queries

T = TypeVar("T")

# How long a statement waits in all for another connection's write lock on the file, in
# waits of BUSY_SLICE_MS (the connection's busy timeout) between which a deadline (a stopping
# run's) gets through: SQLite's own wait cannot be cancelled.
BUSY_TIMEOUT = 10.0
BUSY_SLICE_MS = 100
# Staged values merged into the job per write transaction: ~0.1 s each, so that a heartbeat
# gets through while a large input is merged (the file's write lock is the whole file's).
MERGE_SPAN = 20_000

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

_V3_COLUMNS = (
    "job, account_id, outcome, attempts, http_status, error_code, error_message, request_id, "
    "first_attempt_at, updated_at, run_id, claim_gen, confirmed_at, event_id"
)
# The accounts table of layout 4, as step 3 leaves it (the schema is always the newest).
_V4_ACCOUNTS = (
    "CREATE TABLE accounts (job TEXT NOT NULL, stripe_account TEXT NOT NULL DEFAULT '', "
    "account_id TEXT NOT NULL, outcome TEXT, attempts INTEGER NOT NULL DEFAULT 0, "
    "http_status INTEGER, error_code TEXT, error_message TEXT, request_id TEXT, "
    "first_attempt_at REAL, updated_at REAL, run_id TEXT, "
    "claim_gen INTEGER NOT NULL DEFAULT 0, confirmed_at REAL, event_id TEXT, "
    "UNIQUE (job, stripe_account, account_id))"
)
# Layout 1 held one lock row per job; layout 2 has a row per holder, as PostgreSQL's.
# Layout 3 keys events by (job, event) and numbers each account's claims. Layout 4 keys
# accounts by (job, connected account, account): the table is rebuilt, rowids (the input
# order) kept, into layout 4's own definition so that step 4 finds it whatever it came from.
# Layout 5 adds what `verify` read back; its new tables come with the schema.
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
        (
            "ALTER TABLE events RENAME TO events_v2; "
            "ALTER TABLE accounts ADD COLUMN claim_gen INTEGER NOT NULL DEFAULT 0"
        ),
        (
            "INSERT INTO events (job, event_id, account_id, received_at) "
            "SELECT job, event_id, account_id, received_at FROM events_v2; DROP TABLE events_v2"
        ),
    ),
    3: (
        (
            f"ALTER TABLE accounts RENAME TO accounts_v3; {_V4_ACCOUNTS}; "  # noqa: S608 - constants
            f"INSERT INTO accounts (rowid, {_V3_COLUMNS}) SELECT rowid, {_V3_COLUMNS} "
            "FROM accounts_v3; DROP TABLE accounts_v3"
        ),
        "",
    ),
    4: (
        (
            "ALTER TABLE accounts ADD COLUMN verified_at REAL; "
            "ALTER TABLE accounts ADD COLUMN verified_status TEXT; "
            "ALTER TABLE accounts ADD COLUMN verified_pass TEXT"
        ),
        "",
    ),
}
# The rows of a connected account, in input order; the job's own rows ('') are not indexed:
# a job without connected accounts pays nothing for it, and claims them by a rowid scan.
INDEXES = """
CREATE INDEX IF NOT EXISTS accounts_lane ON accounts (job, stripe_account)
WHERE stripe_account <> ''
"""

# The job's own rows ('') by a range scan of rowids; a connected account's through its index.
CLAIM = (
    "SELECT rowid, account_id, claim_gen FROM accounts NOT INDEXED WHERE rowid > ? AND job = ? "
    "AND stripe_account = ? AND outcome IS NULL ORDER BY rowid LIMIT ?"
)
CLAIM_LANE = (
    "SELECT rowid, account_id, claim_gen FROM accounts INDEXED BY accounts_lane "
    "WHERE job = ? AND stripe_account = ? AND stripe_account <> '' AND rowid > ? "
    "AND outcome IS NULL ORDER BY rowid LIMIT ?"
)
MARK_CLAIMED = (
    "UPDATE accounts NOT INDEXED SET run_id = ?, claim_gen = claim_gen + 1 "
    "WHERE rowid > ? AND rowid <= ? AND job = ? AND stripe_account = '' AND outcome IS NULL"
)
MARK_ONE_CLAIMED = "UPDATE accounts SET run_id = ?, claim_gen = claim_gen + 1 WHERE rowid = ?"
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

    schema = QUERIES["schema"] + ";" + INDEXES
    migrations = MIGRATIONS
    shared = False  # one file: `run --join` needs PostgreSQL
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def transient(self, exc: Exception) -> bool:
        """The file's write lock, held by another process past the busy timeout."""
        return isinstance(exc, sqlite3.OperationalError) and _busy(exc)

    def describe(self, exc: Exception) -> str:
        return _described(exc)

    def corrupted(self, exc: Exception) -> bool:
        return _corrupted(exc)

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._path = path
        self.description = str(path)
        self._lock = anyio.Lock()
        self.reader = _Statements(self.call)
        self._beat_db: sqlite3.Connection | None = None  # the heartbeat's own connection
        self._beat_lock = anyio.Lock()
        # (run_id, connected account) -> rowid of its last claimed account
        self._claimed_up_to: dict[tuple[str, str], int] = {}
        # (job, connected account, account) this dialect claimed -> (rowid, claim generation)
        self._claims: dict[tuple[str, str, str], tuple[int, int]] = {}

    @classmethod
    async def connect(
        cls, path: Path, *, create: bool = True, read_only: bool = False
    ) -> SQLiteDialect:
        """Open (creating if needed) the store file; without `create`, a missing file is left
        alone and an empty database in memory stands in for it. `read_only` opens the file
        for reading only (SQLite's mode=ro)."""
        db = await anyio.to_thread.run_sync(functools.partial(_connect, path, create, read_only))
        return cls(db, path)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in a worker thread, holding the connection."""
        async with self._lock:
            return await _in_thread(fn, db=self._db)

    async def _call_here(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short, bounded fn (one write transaction) on the event loop's own thread.

        Measured: a worker thread doing the per-batch writes while the loop serves requests
        costs ~20 % of throughput. sqlite3 drops and retakes the GIL on every row, and each
        handover can make the loop wait. A 500-row batch done here blocks the loop ~2 ms.
        It never waits for another process's lock on the loop: refused, it tries again later.
        """

        async def once() -> T:
            db = self._db
            db.execute("PRAGMA busy_timeout = 0")
            try:
                return fn(db)
            finally:
                db.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")

        async with self._lock:
            return await _patiently(once)

    @asynccontextmanager
    async def transaction(
        self, *, exclusive_for: str | None = None, beat: bool = False
    ) -> AsyncIterator[_Statements]:
        """BEGIN IMMEDIATE ... COMMIT; every write transaction is exclusive in SQLite.

        A heartbeat (`beat`) has a connection of its own: it never queues behind a plan's
        long statements on the store's connection, only (briefly) behind the file's lock.
        """
        db, lock = self._db, self._lock
        if beat:
            db, lock = await self._beat_connection(), self._beat_lock
        async with lock:
            statements = _Statements(functools.partial(_in_thread, db=db))
            await statements.script("BEGIN IMMEDIATE")
            try:
                yield statements
                with anyio.CancelScope(shield=True):
                    await statements.script("COMMIT")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    if db.in_transaction:
                        await statements.script("ROLLBACK")
                raise

    async def _beat_connection(self) -> sqlite3.Connection:
        if self._beat_db is None:
            self._beat_db = await anyio.to_thread.run_sync(_connect, self._path, True)
        return self._beat_db

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

    async def claim(self, job: str, run_id: str, limit: int, stripe_account: str) -> list[str]:
        """The run's next page of a connected account's rows in input order, after its last.

        The job's own rows ('') by a range scan of rowids, not the unique index: through it
        every page would visit all of the job's rows and sort them (quadratic in N); a
        connected account's rows through their own index, in rowid order. A run whose lease
        ran out claims nothing (LockHeldError): another may be working the job now.
        """
        after = self._claimed_up_to.get((run_id, stripe_account))

        def claim(db: sqlite3.Connection) -> list[tuple[int, str, int]] | None:
            start = after
            if start is None:  # the job's first row, found once through the index
                first = db.execute("SELECT min(rowid) FROM accounts WHERE job = ?", (job,))
                start = (first.fetchone()[0] or 1) - 1
            with _immediate(db):
                if not db.execute(HOLDS_LEASE, (job, run_id)).fetchone():
                    return None
                rows: list[tuple[int, str, int]]
                if stripe_account:
                    rows = db.execute(CLAIM_LANE, (job, stripe_account, start, limit)).fetchall()
                    db.executemany(MARK_ONE_CLAIMED, [(run_id, row[0]) for row in rows])
                else:
                    rows = db.execute(CLAIM, (start, job, stripe_account, limit)).fetchall()
                    if rows:
                        db.execute(MARK_CLAIMED, (run_id, start, rows[-1][0], job))
            return rows

        rows = await self._call_here(claim)
        if rows is None:
            raise LockHeldError(f"job {job!r}: lost the lock's lease (taken over); stopped")
        if rows:
            self._claimed_up_to[run_id, stripe_account] = rows[-1][0]
            # Recorded by rowid and under this claim's generation (one more than it was).
            self._claims.update(
                ((job, stripe_account, account), (rowid, gen + 1)) for rowid, account, gen in rows
            )
        return [account_id for _, account_id, _ in rows]

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch in one transaction, each result under the claim it was made under.

        A result for an account this run did not claim has nothing to land on: it is dropped.
        """
        now = time.time()
        claims = self._claims
        clean, full = [], []
        for r in results:
            claim = claims.get((job, r.stripe_account, r.account_id))
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
            claims.pop((job, r.stripe_account, r.account_id), None)

    async def scrub(self) -> None:
        """Rebuild the file without the deleted rows' pages, and empty the WAL."""

        def vacuum(db: sqlite3.Connection) -> None:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self.call(vacuum)

    async def aclose(self) -> None:
        """Close the connections (checkpointing the WAL)."""
        if self._beat_db is not None:
            async with self._beat_lock:
                await anyio.to_thread.run_sync(self._beat_db.close)
        await self.call(lambda db: db.close())


Run = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]


async def _in_thread(fn: Callable[[sqlite3.Connection], T], *, db: sqlite3.Connection) -> T:
    return await _patiently(lambda: anyio.to_thread.run_sync(fn, db))


async def _patiently(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()`, again while another connection's lock on the file refuses it, for up to
    BUSY_TIMEOUT in all; cancellable between attempts. Refused, an attempt did nothing: a
    write transaction is refused at its BEGIN IMMEDIATE, a statement before it runs."""
    deadline = anyio.current_time() + BUSY_TIMEOUT
    while True:
        try:
            return await attempt()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or anyio.current_time() >= deadline:
                raise
        await anyio.sleep(BUSY_SLICE_MS / 1000 / 2)


class _Statements:
    """The named statements of queries.sql on a connection (`Connection`), run by `run`."""

    def __init__(self, run: Run) -> None:
        self._run = run

    async def execute(self, name: str, **params: Any) -> int:
        sql = QUERIES[name]
        rowcount: int = await self._run(lambda db: db.execute(sql, params).rowcount)
        return rowcount

    async def fetch(self, name: str, **params: Any) -> list[Row]:
        sql = QUERIES[name]
        rows: list[Row] = await self._run(lambda db: db.execute(sql, params).fetchall())
        return rows

    async def execute_each(self, name: str, params: Sequence[dict[str, Any]]) -> list[int]:
        # One trip to the worker thread for them all (a trip costs more than a statement).
        sql = QUERIES[name]
        counts: list[int] = await self._run(
            lambda db: [db.execute(sql, one).rowcount for one in params]
        )
        return counts

    async def script(self, sql: str) -> None:
        # executescript would COMMIT the transaction first: run the statements one by one.
        statements = [s for s in sql.split(";") if s.strip()]

        def run(db: sqlite3.Connection) -> None:
            for statement in statements:
                db.execute(statement)

        await self._run(run)


class _Staging(_Statements):
    """The staging side of the dialect (`Staging`): the store's own connection."""

    def __init__(self, dialect: SQLiteDialect) -> None:
        super().__init__(dialect.call)
        self._dialect = dialect

    async def add(self, rows: list[tuple[str, int, str, str]]) -> None:
        # INSERT OR IGNORE keeps each value's first-seen position (pos is the rowid). A
        # deferred transaction: it writes the temporary table only, never locking the file.
        def insert(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR IGNORE INTO temp.staged (account_id, valid, settled, "
                    "stripe_account) VALUES (?, ?, NULLIF(?, ''), ?)",
                    rows,
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await self._dialect.call(insert)

    async def seal(self) -> None:
        """Nothing to do: the UNIQUE column deduplicated the values as they came."""

    async def spans(self) -> list[tuple[int, int]]:
        """Spans of MERGE_SPAN positions: the file's write lock is held a span at a time."""
        ((last,),) = await self._dialect.call(
            lambda db: db.execute("SELECT COALESCE(max(pos), 0) FROM temp.staged").fetchall()
        )
        return [(after, after + MERGE_SPAN) for after in range(0, last, MERGE_SPAN)] or [(0, 0)]

    def transaction(self) -> Any:
        return self._dialect.transaction()


def _connect(path: Path, create: bool, read_only: bool = False) -> sqlite3.Connection:
    try:
        if read_only:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")
            db.execute("PRAGMA schema_version")  # reads the header: not a database fails here
            return db
        if not create and not path.exists():
            path = Path(":memory:")
        else:
            _private(path)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Opening waits as long as a statement may (in this thread): switching to WAL needs
        # the file to itself for a moment, and a switch refused is silent.
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal" and str(path) != ":memory:":
            raise sqlite3.OperationalError(f"the file stayed in {mode} mode: it is in use")
        db.execute(f"PRAGMA busy_timeout = {BUSY_SLICE_MS}")
        # NORMAL in WAL mode survives a killed process; a power loss may drop the last
        # batches, which a rerun redoes with the same idempotency keys.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA temp_store = FILE")
    except (sqlite3.Error, OSError) as exc:
        raise UsageError(f"cannot open the state store {path}: {_described(exc)}") from exc
    return db


def _private(path: Path) -> None:
    """The store holds customers' account IDs: its folder is created 0700, its file (and
    so the -wal and -shm files SQLite gives the same mode) 0600, whatever the umask; an
    existing file left more open is closed to others."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)  # mode: the folder itself, not its parents
    if not path.exists():
        # Only a file nobody has open: closing a descriptor of a database file drops every
        # POSIX lock this process holds on it, and SQLite's own connections rely on them.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def _corrupted(exc: BaseException) -> bool:
    """Whether the file is damaged, or not a SQLite database at all."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _described(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if _corrupted(exc):
        return f"the file is corrupted ({text}): restore it from a backup"
    return text


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether the error is another connection's lock on the file ("database is locked")."""
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _create_staging(db: sqlite3.Connection) -> None:
    db.execute("DROP TABLE IF EXISTS temp.staged")
    db.execute(
        "CREATE TEMP TABLE staged (pos INTEGER PRIMARY KEY, account_id TEXT NOT NULL, "
        "valid INTEGER NOT NULL, settled TEXT, stripe_account TEXT NOT NULL, "
        "UNIQUE (stripe_account, account_id))"
    )


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction taken with BEGIN IMMEDIATE, committed or rolled back on exit."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
