"""SQLite store: WAL mode, one connection driven from a worker thread, batched writes."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread

from bulkdisconnect.errors import LockHeldError, UsageError
from bulkdisconnect.model import (
    ItemResult,
    Outcome,
    Settled,
    is_valid_account_id,
)
from bulkdisconnect.store import (
    Beat,
    Confirmation,
    LockInfo,
    PlanCounts,
    ReportRow,
    RunInfo,
    stored_value,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    job TEXT NOT NULL,
    account_id TEXT NOT NULL,
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error_code TEXT,
    error_message TEXT,
    request_id TEXT,
    first_attempt_at REAL,
    updated_at REAL,
    run_id TEXT,
    confirmed_at REAL,
    event_id TEXT,
    UNIQUE (job, account_id)
);
CREATE TABLE IF NOT EXISTS customers (
    job TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    listed_at REAL NOT NULL,
    PRIMARY KEY (job, customer_id)
);
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    account_id TEXT NOT NULL,
    received_at REAL NOT NULL
);
-- Deliveries of events for accounts outside the job: counted, their accounts not kept.
CREATE TABLE IF NOT EXISTS unknown_events (
    job TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    job TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    lease REAL NOT NULL  -- seconds without a heartbeat after which the lock is stale
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    summary TEXT
);
"""

SETTLED_MESSAGE = "already disconnected when listed: recorded without a call"
INVALID_MESSAGE = "not a Financial Connections account ID (fca_ followed by letters and digits)"

RECORD = """
UPDATE accounts SET outcome = ?, attempts = attempts + ?, http_status = ?, error_code = ?,
    error_message = ?, request_id = ?, first_attempt_at = COALESCE(first_attempt_at, ?),
    updated_at = ?, run_id = ?
"""
# sqlite3 binds None and bool through its adaptation protocol: two failed attribute lookups,
# each formatting an AttributeError, ~1,300 instructions a parameter (callgrind). An outcome
# without error fields, the common case, is written by a statement that sets them NULL itself.
RECORD_CLEAN = """
UPDATE accounts SET outcome = ?, attempts = attempts + ?, http_status = ?, error_code = NULL,
    error_message = NULL, request_id = ?, first_attempt_at = COALESCE(first_attempt_at, ?),
    updated_at = ?, run_id = ?
WHERE rowid = ?
"""


class SQLiteStore:
    """The SQLite implementation of `Store`; every call runs on one connection in a thread.

    One process works a job at a time (`run --join` needs PostgreSQL), so a run claims its
    pages with a cursor over the input order rather than with leases.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._path = path
        self._lock = anyio.Lock()
        self._claimed_up_to: dict[str, int] = {}  # run_id -> rowid of its last claimed account
        self._rowids: dict[tuple[str, str], int] = {}  # claimed (job, account) -> rowid
        self._staged: _Staged | None = None  # what the staged input needs merged

    @classmethod
    async def open(cls, path: Path, *, create: bool = True) -> SQLiteStore:
        """Open (creating if needed) the store file and its schema; without `create`, a
        missing file is left alone and an empty store in memory stands in for it."""
        return cls(await anyio.to_thread.run_sync(_connect, path, create), path)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in a worker thread: for work that may take long (planning, reports)."""
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

    async def aclose(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        await self._call(lambda db: db.close())

    # -- lock ---------------------------------------------------------------------------------

    async def acquire_lock(
        self, job: str, owner: str, *, stale_after: float, join: bool = False, source: str = ""
    ) -> None:
        """Take the job's lock, or take over one whose holder missed its own lease.

        `stale_after` is this run's lease: it heartbeats well within it, and another run may
        take the lock over once no heartbeat came for that long.
        """
        if join:
            raise UsageError("--join needs a shared store: --state postgresql://...")

        def acquire(db: sqlite3.Connection) -> LockInfo | None:
            now = time.time()
            with _immediate(db):
                row = db.execute(
                    "SELECT owner, pid, host, heartbeat_at, lease FROM locks WHERE job = ?",
                    (job,),
                ).fetchone()
                if row is not None and now - row[3] < row[4]:
                    return _lock_info(row)
                db.execute(
                    "INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job, owner, os.getpid(), socket.gethostname(), now, now, stale_after),
                )
                return None

        holder = await self._call(acquire)
        if holder is not None:
            raise LockHeldError(
                f"job {job!r} is locked by a run on {holder.host} (pid {holder.pid}), "
                f"alive {time.time() - holder.heartbeat_at:.0f}s ago; wait for it to finish"
            )

    async def heartbeat(self, job: str, owner: str) -> Beat | None:
        """Renew the lock's lease; None if it ran out (even if nobody took over) or was taken."""

        def beat(db: sqlite3.Connection) -> bool:
            with _immediate(db):
                now = time.time()
                cursor = db.execute(
                    "UPDATE locks SET heartbeat_at = ? "
                    "WHERE job = ? AND owner = ? AND ? - heartbeat_at < lease",
                    (now, job, owner, now),
                )
            return cursor.rowcount == 1

        return Beat(workers=1, ready=True) if await self._call(beat) else None

    async def release_lock(self, job: str, owner: str) -> None:
        """Drop the lock if this owner still holds it."""

        def release(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.execute("DELETE FROM locks WHERE job = ? AND owner = ?", (job, owner))

        await self._call(release)

    async def locks(self, job: str) -> list[LockInfo]:
        """The job's lock holder, if any (fresh or stale)."""

        def read(db: sqlite3.Connection) -> list[LockInfo]:
            rows = db.execute(
                "SELECT owner, pid, host, heartbeat_at, lease FROM locks WHERE job = ?", (job,)
            ).fetchall()
            return [_lock_info(row) for row in rows]

        return await self._call(read)

    @asynccontextmanager
    async def planning(self, job: str, owner: str) -> AsyncIterator[bool]:
        """No other worker can share a SQLite job: this one always plans."""
        yield True

    # -- planning and work --------------------------------------------------------------------

    async def stage(
        self, job: str, chunks: AsyncIterator[Sequence[str | Settled]], *, retry_failed: bool
    ) -> PlanCounts:
        """Read the whole input into a temporary table and count what merging it would do.

        The job is untouched until `commit_staged`: a malformed row, a refused confirmation
        or --max-accounts leaves it as it was. The temporary table lives on disk, so memory
        stays flat however large the input.
        """
        await self._call(_create_staging)
        read = 0
        try:
            async for chunk in chunks:
                read += len(chunk)
                await self._call(partial(_stage, chunk=chunk))
            staged = await self._call(
                partial(_count, job=job, read=read, retry_failed=retry_failed)
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.discard_staged()
            raise
        self._staged = staged
        return staged.counts

    async def commit_staged(self, job: str, *, retry_failed: bool) -> None:
        """Merge the staged input into the job in one transaction.

        With `retry_failed`, the job's failed accounts become pending again in it.
        """
        staged, self._staged = self._staged, None
        try:
            await self._call(partial(_merge, job=job, retry_failed=retry_failed, staged=staged))
        finally:
            with anyio.CancelScope(shield=True):
                await self.discard_staged()

    async def discard_staged(self) -> None:
        """Drop the staged input."""
        await self._call(lambda db: db.execute("DROP TABLE IF EXISTS temp.staged"))

    async def customer_listed(self, job: str, customer: str) -> bool:
        """Whether a customer's accounts were already listed into the job."""

        def read(db: sqlite3.Connection) -> bool:
            row = db.execute(
                "SELECT 1 FROM customers WHERE job = ? AND customer_id = ?", (job, customer)
            ).fetchone()
            return row is not None

        return await self._call(read)

    async def mark_customer_listed(self, job: str, customer: str) -> None:
        """Remember that a customer's accounts are in the job, so a rerun does not list them."""

        def mark(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.execute(
                    "INSERT OR IGNORE INTO customers VALUES (?, ?, ?)", (job, customer, time.time())
                )

        await self._call(mark)

    async def claim_pending(self, job: str, run_id: str, *, limit: int) -> list[str]:
        """The run's next page of accounts still to call, in input order.

        Each account is handed to a run once: the next page starts after this run's last.
        Nothing is written: the job's lock already makes the run its only worker.
        """
        after = self._claimed_up_to.get(run_id)

        def claim(db: sqlite3.Connection) -> list[tuple[int, str]]:
            start = after
            if start is None:  # the job's first row, found once through the (job, ...) index
                first = db.execute("SELECT min(rowid) FROM accounts WHERE job = ?", (job,))
                start = (first.fetchone()[0] or 1) - 1
            # A range scan of rowids, not the (job, account_id) index: through that index
            # every page would visit all of the job's rows and sort them (quadratic in N).
            rows: list[tuple[int, str]] = db.execute(
                "SELECT rowid, account_id FROM accounts NOT INDEXED WHERE rowid > ? "
                "AND job = ? AND outcome IS NULL ORDER BY rowid LIMIT ?",
                (start, job, limit),
            ).fetchall()
            return rows

        rows = await self._call_here(claim)
        if rows:
            self._claimed_up_to[run_id] = rows[-1][0]
            # Recorded by rowid later: an integer key, cheaper than (job, account_id).
            self._rowids.update(((job, account_id), rowid) for rowid, account_id in rows)
        return [account_id for _, account_id in rows]

    async def pending_elsewhere(self, job: str, run_id: str) -> bool:
        """Never: the run holding a SQLite job's lock is its only worker."""
        return False

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one transaction."""
        now = time.time()
        rowids = self._rowids
        clean, by_rowid, by_name = [], [], []
        for r in results:
            rowid = rowids.pop((job, r.account_id), None)
            if rowid is not None and r.error_code is None and r.error_message is None:
                clean.append(
                    (
                        r.outcome.value,
                        r.attempts,
                        r.http_status,
                        r.request_id,
                        r.first_attempt_at,
                        now,
                        run_id,
                        rowid,
                    )
                )
                continue
            values = (
                r.outcome.value,
                r.attempts,
                r.http_status,
                r.error_code,
                r.error_message,
                r.request_id,
                r.first_attempt_at,
                now,
                run_id,
            )
            if rowid is None:
                by_name.append((*values, job, r.account_id))
            else:
                by_rowid.append((*values, rowid))

        def write(db: sqlite3.Connection) -> None:
            with _immediate(db):
                if clean:
                    db.executemany(RECORD_CLEAN, clean)
                if by_rowid:
                    db.executemany(RECORD + "WHERE rowid = ?", by_rowid)
                if by_name:
                    db.executemany(RECORD + "WHERE job = ? AND account_id = ?", by_name)

        await self._call_here(write)

    async def release_outcomes(self, job: str, run_id: str, outcomes: Sequence[str]) -> int:
        """Turn this run's outcomes of the given kinds back into pending; returns how many."""

        def release(db: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(outcomes))
            with _immediate(db):
                cursor = db.execute(
                    f"UPDATE accounts SET outcome = NULL WHERE job = ? AND run_id = ? "  # noqa: S608 - placeholders only
                    f"AND outcome IN ({marks})",
                    (job, run_id, *outcomes),
                )
            return cursor.rowcount

        return await self._call(release)

    # -- reading ------------------------------------------------------------------------------

    async def counts(self, job: str) -> dict[str | None, int]:
        """Accounts per outcome (None: still to call)."""

        def count(db: sqlite3.Connection) -> dict[str | None, int]:
            rows = db.execute(
                "SELECT outcome, COUNT(*) FROM accounts WHERE job = ? GROUP BY outcome", (job,)
            )
            return dict(rows.fetchall())

        return await self._call(count)

    async def confirmed_count(self, job: str) -> int:
        """Accounts whose disconnection a webhook event confirmed."""

        def count(db: sqlite3.Connection) -> int:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM accounts WHERE job = ? AND confirmed_at IS NOT NULL", (job,)
            ).fetchone()
            return int(n)

        return await self._call(count)

    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation:
        """Record a disconnected event on the account's outcome, once per event ID."""

        def confirm(db: sqlite3.Connection) -> Confirmation:
            with _immediate(db):
                seen = db.execute(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?)",
                    (event_id, job, account_id, confirmed_at),
                )
                if seen.rowcount == 0:
                    return Confirmation.REPLAYED
                updated = db.execute(
                    "UPDATE accounts SET confirmed_at = ?, event_id = ? "
                    "WHERE job = ? AND account_id = ?",
                    (confirmed_at, event_id, job, account_id),
                )
                if updated.rowcount:
                    return Confirmation.CONFIRMED
                # An account outside the job: nothing of it is kept, the delivery is counted.
                db.execute("DELETE FROM events WHERE event_id = ?", (event_id,))
                db.execute(
                    "INSERT INTO unknown_events VALUES (?, 1, ?) ON CONFLICT (job) "
                    "DO UPDATE SET count = count + 1, last_at = excluded.last_at",
                    (job, confirmed_at),
                )
            return Confirmation.UNKNOWN

        return await self._call_here(confirm)

    async def unknown_events(self, job: str) -> int:
        """Events received for accounts outside the job (counted, not kept)."""

        def count(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT count FROM unknown_events WHERE job = ?", (job,)).fetchone()
            return 0 if row is None else int(row[0])

        return await self._call(count)

    async def rows(self, job: str, *, unconfirmed: bool = False) -> AsyncIterator[ReportRow]:
        """Every account of the job in input order (or only disconnected, unconfirmed ones)."""
        after = 0
        while True:
            page = await self._call(
                partial(_report_page, job=job, after=after, unconfirmed=unconfirmed)
            )
            for _, row in page:
                yield row
            if len(page) < REPORT_PAGE:
                return
            after = page[-1][0]

    async def has_job(self, job: str) -> bool:
        """Whether the store holds anything of this job."""

        def check(db: sqlite3.Connection) -> bool:
            found = db.execute(
                "SELECT 1 FROM runs WHERE job = ? UNION ALL "
                "SELECT 1 FROM accounts WHERE job = ? LIMIT 1",
                (job, job),
            ).fetchone()
            return found is not None

        return await self._call(check)

    async def start_run(self, job: str, run_id: str) -> None:
        """Record that a run of the job started."""

        def start(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.execute(
                    "INSERT INTO runs (run_id, job, started_at) VALUES (?, ?, ?)",
                    (run_id, job, time.time()),
                )

        await self._call(start)

    async def finish_run(self, run_id: str, exit_code: int, summary: str) -> None:
        """Record how a run ended."""

        def finish(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.execute(
                    "UPDATE runs SET finished_at = ?, exit_code = ?, summary = ? WHERE run_id = ?",
                    (time.time(), exit_code, summary, run_id),
                )

        await self._call(finish)

    async def last_run(self, job: str) -> RunInfo | None:
        """The job's most recent run."""

        def read(db: sqlite3.Connection) -> RunInfo | None:
            row = db.execute(
                "SELECT run_id, started_at, finished_at, exit_code, summary FROM runs "
                "WHERE job = ? ORDER BY started_at DESC LIMIT 1",
                (job,),
            ).fetchone()
            return None if row is None else RunInfo(*row)

        return await self._call(read)


REPORT_PAGE = 5000


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
        db.executescript(SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise UsageError(f"cannot open the state store {path}: {exc}") from exc
    return db


def _lock_info(row: tuple[str, int, str, float, float]) -> LockInfo:
    owner, pid, host, heartbeat_at, lease = row
    return LockInfo(owner, pid, host, heartbeat_at, lease, shared=False)


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


def _create_staging(db: sqlite3.Connection) -> None:
    db.execute("DROP TABLE IF EXISTS temp.staged")
    # A rowid table: INSERT OR IGNORE keeps each value's first-seen position in the input.
    db.execute(
        "CREATE TEMP TABLE staged "
        "(account_id TEXT NOT NULL UNIQUE, valid INTEGER NOT NULL, settled TEXT)"
    )


def _stage(db: sqlite3.Connection, *, chunk: Sequence[str | Settled]) -> None:
    # Bound as int and str, never bool or None: see RECORD_CLEAN (a rerun of a million IDs
    # spends most of its planning staging them).
    rows = [
        (stored_value(v), 1 if is_valid_account_id(v) else 0, "")
        if isinstance(v, str)
        else (v.account_id, 1 if is_valid_account_id(v.account_id) else 0, v.outcome.value)
        for v in chunk
    ]
    with _immediate(db):
        db.executemany("INSERT OR IGNORE INTO temp.staged VALUES (?, ?, NULLIF(?, ''))", rows)


@dataclass(frozen=True, slots=True)
class _Staged:
    """What counting the staged input found, beyond the plan's counts: what merging must do."""

    counts: PlanCounts
    unseen: int  # staged values the job does not hold yet: to insert
    settled: int  # staged values a Stripe list showed disconnected already


def _count(db: sqlite3.Connection, *, job: str, read: int, retry_failed: bool) -> _Staged:
    """What merging the staged input would find and leave to call; changes nothing."""
    # One pass over the input, one index probe each (a rerun of a million IDs spends most
    # of its planning here).
    unique, invalid, done, new, unseen, settled = db.execute(
        "SELECT COUNT(*), TOTAL(NOT s.valid), "
        "TOTAL(s.valid AND a.outcome IS NOT NULL AND NOT (? AND a.outcome = 'failed')), "
        "TOTAL(s.valid AND s.settled IS NULL AND a.rowid IS NULL), "
        "TOTAL(a.rowid IS NULL), TOTAL(s.settled IS NOT NULL) "
        "FROM temp.staged s LEFT JOIN accounts a ON a.job = ? AND a.account_id = s.account_id",
        (retry_failed, job),
    ).fetchone()
    (pending,) = db.execute(
        "SELECT COUNT(*) FROM accounts a WHERE a.job = ? "
        "AND (a.outcome IS NULL OR (? AND a.outcome = 'failed')) AND NOT EXISTS "
        "(SELECT 1 FROM temp.staged s WHERE s.account_id = a.account_id "
        "AND s.valid AND s.settled IS NOT NULL)",
        (job, retry_failed),
    ).fetchone()
    counts = PlanCounts(
        read=read,
        invalid=int(invalid),
        duplicates=read - unique,
        already_done=int(done),
        to_call=pending + int(new),
    )
    return _Staged(counts, unseen=int(unseen), settled=int(settled))


def _merge(db: sqlite3.Connection, *, job: str, retry_failed: bool, staged: _Staged | None) -> None:
    now = time.time()
    with _immediate(db):
        if retry_failed:
            db.execute(
                "UPDATE accounts SET outcome = NULL WHERE job = ? AND outcome = ?",
                (job, Outcome.FAILED.value),
            )
        if staged is not None and not staged.unseen and not staged.settled:
            return  # a rerun of the same input: nothing to add
        # Invalid values are recorded invalid_id; settled ones (a Stripe list showed them
        # disconnected already) with their outcome and no call; the rest are to call.
        db.execute(
            "INSERT OR IGNORE INTO accounts (job, account_id, outcome, error_code, "
            "error_message, updated_at) "
            "SELECT ?, s.account_id, CASE WHEN NOT s.valid THEN ? ELSE s.settled END, "
            "CASE WHEN s.valid THEN NULL ELSE ? END, "
            "CASE WHEN NOT s.valid THEN ? WHEN s.settled IS NOT NULL THEN ? END, "
            "CASE WHEN NOT s.valid OR s.settled IS NOT NULL THEN ? END "
            "FROM temp.staged s ORDER BY s.rowid",
            (
                job,
                Outcome.INVALID_ID.value,
                Outcome.INVALID_ID.value,
                INVALID_MESSAGE,
                SETTLED_MESSAGE,
                now,
            ),
        )
        # A settled account already pending in the job (listed again later) needs no call.
        db.execute(
            "UPDATE accounts SET outcome = s.settled, error_message = ?, updated_at = ? "
            "FROM temp.staged s WHERE accounts.job = ? AND accounts.account_id = s.account_id "
            "AND accounts.outcome IS NULL AND s.settled IS NOT NULL AND s.valid",
            (SETTLED_MESSAGE, now, job),
        )


def _report_page(
    db: sqlite3.Connection, *, job: str, after: int, unconfirmed: bool
) -> list[tuple[int, ReportRow]]:
    rows = db.execute(
        "SELECT rowid, account_id, outcome, attempts, http_status, error_code, error_message, "
        "request_id, first_attempt_at, updated_at, confirmed_at, event_id FROM accounts "
        "WHERE job = ? AND rowid > ? "
        "AND (NOT ? OR (outcome = 'disconnected' AND confirmed_at IS NULL)) "
        "ORDER BY rowid LIMIT ?",
        (job, after, unconfirmed, REPORT_PAGE),
    ).fetchall()
    return [(row[0], ReportRow(*row[1:])) for row in rows]
