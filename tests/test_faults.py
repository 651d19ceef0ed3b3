"""Runs under faults, as real processes: a worker frozen past its lease, a store that fails,
signals at awkward moments, inputs larger than a lease. What must hold: no outcome is
overwritten by a run that lost its claim, every failure ends in the exit code a scheduler can
act on, and nothing waits unbounded."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, Workspace, wait_for

pytestmark = pytest.mark.slow

JOB = "faults"


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, ws: Workspace) -> str:
    """The job's store: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return str(ws.state(JOB))
    return str(request.getfixturevalue("pg_state"))


def query(state: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Rows of a statement on the store, in its own connection (`?` placeholders)."""
    if not state.startswith("postgresql://"):
        if not Path(state).exists():
            return []
        with contextlib.closing(sqlite3.connect(state, timeout=10)) as db, db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError:  # the run has not created the tables yet
                return []
    url, _, schema = state.partition("?schema=")
    numbered = sql
    for n in range(1, len(args) + 1):
        numbered = numbered.replace("?", f"${n}", 1)

    async def fetch() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            return [tuple(row) for row in await conn.fetch(numbered, *args)]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()

    return anyio.run(fetch, backend="asyncio")


def outcome_count(state: str, outcome: str) -> int:
    rows = query(state, "SELECT COUNT(*) FROM accounts WHERE job = ? AND outcome = ?", JOB, outcome)
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def accounts(state: str) -> list[tuple[object, ...]]:
    """Every account of the job with what a run writes of it."""
    return query(
        state,
        "SELECT account_id, outcome, attempts, http_status, run_id, updated_at FROM accounts "
        "WHERE job = ? ORDER BY account_id",
        JOB,
    )


def idle_in_a_transaction(state: str) -> bool:
    """Whether a (frozen) run holds a write transaction open on the store."""
    if state.startswith("postgresql://"):
        rows = query(
            state,
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'bulkdisconnect' "
            "AND state LIKE 'idle in transaction%'",
        )
        return bool(rows[0][0])
    try:
        with contextlib.closing(sqlite3.connect(state, timeout=0.2)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
    except sqlite3.OperationalError:
        return True
    return False


@contextlib.contextmanager
def frozen(proc: subprocess.Popen[str], state: str) -> Iterator[None]:
    """SIGSTOP the process between two store transactions; SIGCONT it on leaving."""
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        if not idle_in_a_transaction(state):
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.03)
    else:
        pytest.fail("could not freeze the run between two transactions")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


def test_a_worker_that_lost_its_lease_overwrites_nothing(
    ws: Workspace, sandbox: SandboxThread, state: str
) -> None:
    """Run A (answers all 500s) is frozen past its lease; run B takes the job over and finishes
    it against a healthy API; A wakes up with answers and results in hand, and exits 4 having
    changed nothing B recorded: not its outcomes, attempts or run IDs."""
    ws.write("ids.txt", ws.ids(400))
    sandbox.sandbox.configure(p500=1.0, latency_ms=300)
    common = ["--job", JOB, "--input", "ids.txt", "--state", state, *FAST]
    a = ws.spawn(
        "run",
        *common,
        "--rate",
        "50",
        "--concurrency",
        "10",
        "--max-attempts",
        "1",
        "--lock-stale-after",
        "3",
        "--breaker-min-sample",
        "100000",
    )
    try:
        wait_for(lambda: outcome_count(state, "failed") >= 20)
        with frozen(a, state):
            sandbox.sandbox.configure(p500=0.0, latency_ms=0)
            query(state, "UPDATE locks SET heartbeat_at = heartbeat_at - 60 WHERE job = ?", JOB)
            b = ws.run("run", *common, "--rate", "1000")
            assert b.exit_code == 1, b.stderr  # A's failures before the freeze are final
            after_b = accounts(state)
            assert not [row for row in after_b if row[1] is None]
        _, stderr = a.communicate(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 4, stderr
    assert "lost the lock's lease" in stderr
    assert accounts(state) == after_b
