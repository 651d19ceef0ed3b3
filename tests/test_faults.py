"""Runs under faults, as real processes: a worker frozen past its lease, a store that fails,
signals at awkward moments, inputs larger than a lease. What must hold: no outcome is
overwritten by a run that lost its claim, every failure ends in the exit code a scheduler can
act on, and nothing waits unbounded."""

from __future__ import annotations

import contextlib
import functools
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import psycopg
import pytest

from bulkdisconnect.sandbox import SandboxThread
from bulkdisconnect.stopping import HURRIED, STOP_DEADLINE
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
            if ";" in numbered:  # a script: no rows
                await conn.execute(numbered)
                return []
            return [tuple(row) for row in await conn.fetch(numbered, *args)]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()

    return anyio.run(fetch, backend="asyncio")


def outcome_count(state: str, outcome: str) -> int:
    rows = query(state, "SELECT COUNT(*) FROM accounts WHERE job = ? AND outcome = ?", JOB, outcome)
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def progressed(state: str, done: int) -> bool:
    """Whether more than `done` accounts are disconnected now."""
    return outcome_count(state, "disconnected") > done


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


def waiting_for_the_table(state: str) -> bool:
    """Whether a statement of the run waits for a lock (the table another session holds)."""
    rows = query(
        state,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'bulkdisconnect' "
        "AND wait_event_type = 'Lock'",
    )
    return bool(rows[0][0])


@contextlib.contextmanager
def table_locked(state: str) -> Iterator[None]:
    """Another session holds an ACCESS EXCLUSIVE lock on the accounts table until leaving."""
    url, _, schema = state.partition("?schema=")
    conn = psycopg.connect(url, options=f"-c search_path={schema}", autocommit=False)
    try:
        conn.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        conn.rollback()
        conn.close()


# Holds the SQLite file's write lock for argv[2] seconds once it prints "held".
HOLD_THE_WRITE_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The process, killed on leaving if it still runs: a failed test leaves none behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # its pipes closed, whatever ended it


@contextlib.contextmanager
def write_lock_held(path: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the SQLite file's write lock from now on, for `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_WRITE_LOCK, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    with reaped(holder):
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        yield holder


@contextlib.contextmanager
def stalled(state: str) -> Iterator[None]:
    """The store stalls the run's writes: a table lock (PostgreSQL), the file's (SQLite)."""
    if state.startswith("postgresql://"):
        with table_locked(state):
            wait_for(lambda: waiting_for_the_table(state))
            yield
    else:
        with write_lock_held(Path(state), 60):
            yield


def stopped(proc: subprocess.Popen[str]) -> bool:
    """Whether the kernel has the process stopped (SIGSTOP delivered): state T in /proc."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


@contextlib.contextmanager
def frozen(proc: subprocess.Popen[str], state: str) -> Iterator[None]:
    """SIGSTOP the process between two store transactions; SIGCONT it on leaving."""
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: stopped(proc))
        if not idle_in_a_transaction(state):
            break
        proc.send_signal(signal.SIGCONT)
        wait_for(lambda: not stopped(proc))
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
    with reaped(
        ws.spawn(
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
    ) as a:
        wait_for(lambda: outcome_count(state, "failed") >= 20)
        with frozen(a, state):
            sandbox.sandbox.configure(p500=0.0, latency_ms=0)
            query(state, "UPDATE locks SET heartbeat_at = heartbeat_at - 60 WHERE job = ?", JOB)
            b = ws.run("run", *common, "--rate", "1000")
            assert b.exit_code == 1, b.stderr  # A's failures before the freeze are final
            after_b = accounts(state)
            assert not [row for row in after_b if row[1] is None]
        _, stderr = a.communicate(timeout=60)
    assert a.returncode == 4, stderr
    assert "lost the lock's lease" in stderr
    assert accounts(state) == after_b


# -- exit codes a scheduler can act on --------------------------------------------------------


def one_error_line(stderr: str) -> str:
    """The run's one-line error (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("bulkdisconnect: error:")]
    return line


def keys_per_account(sandbox: SandboxThread) -> dict[str, set[str | None]]:
    """The idempotency keys each account was sent under."""
    keys: dict[str, set[str | None]] = {}
    for entry in sandbox.sandbox.journal_snapshot():
        keys.setdefault(entry.account_id or "", set()).add(entry.idempotency_key)
    return keys


def test_a_full_disk_exits_6_and_a_rerun_finishes(ws: Workspace, sandbox: SandboxThread) -> None:
    """The store's file cannot grow past what the plan took (RLIMIT_FSIZE stands in for a full
    disk): the run stops with exit 6 and one line naming the store; a rerun finishes the job,
    each account under one idempotency key."""
    ids = ws.ids(3000)
    ws.write("ids.txt", ids)
    proc = ws.spawn(  # files of at most 781 blocks of 512 bytes: 400 kB
        "run", "--job", JOB, "--input", "ids.txt", "--rate", "3000", *FAST, limits="-f 781"
    )
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 6, stderr[-3000:]
    assert "the state store" in one_error_line(stderr)
    assert "a rerun resumes" in one_error_line(stderr)
    pending = sum(1 for outcome in ws.outcomes(JOB).values() if outcome is None)
    assert pending > 0
    # As if its lease had run out, should the full disk have kept it from letting go.
    query(str(ws.state(JOB)), "UPDATE locks SET heartbeat_at = heartbeat_at - 60")
    rerun = ws.run("run", "--job", JOB, "--input", "ids.txt", "--rate", "3000", *FAST)
    assert rerun.exit_code == 0, rerun.stderr
    assert ws.outcomes(JOB) == dict.fromkeys(ids, "disconnected")
    keys = keys_per_account(sandbox)
    assert set(keys) == set(ids)
    assert all(len(k) == 1 for k in keys.values())


def test_a_store_error_exits_6_records_it_and_lets_the_job_go(
    ws: Workspace, sandbox: SandboxThread, pg_state: str
) -> None:
    """PostgreSQL refuses to record outcomes (a trigger stands in for a failing disk): exit 6,
    the runs table says 6, the lock is released, and a rerun resumes at once."""
    ids = ws.ids(600)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=20)
    common = ["--job", JOB, "--input", "ids.txt", "--state", pg_state, *FAST]
    with reaped(ws.spawn("run", *common, "--rate", "200")) as proc:
        wait_for(lambda: outcome_count(pg_state, "disconnected") >= 50)
        query(
            pg_state,
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$; "
            "CREATE TRIGGER refuse BEFORE UPDATE OF outcome ON accounts "
            "FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 6, stderr[-3000:]
    assert "No space left on device" in one_error_line(stderr)
    assert query(pg_state, "SELECT exit_code FROM runs WHERE job = ?", JOB) == [(6,)]
    assert query(pg_state, "SELECT owner FROM locks WHERE job = ?", JOB) == []

    query(pg_state, "DROP TRIGGER refuse ON accounts")
    rerun = ws.run("run", *common, "--rate", "1000")
    assert rerun.exit_code == 0, rerun.stderr
    assert outcome_count(pg_state, "disconnected") == len(ids)
    assert all(len(k) == 1 for k in keys_per_account(sandbox).values())


def test_postgresql_connections_cut_again_and_again_are_ridden_out(
    ws: Workspace, sandbox: SandboxThread, pg_state: str
) -> None:
    """An administrator terminates the run's connections while its statements wait on a lock,
    five times, each once the run has made progress again: the run reconnects (and says so),
    finishes with exit 0, every account disconnected under one key."""
    ids = ws.ids(1500)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=10)
    with reaped(
        ws.spawn(
            "run", "--job", JOB, "--input", "ids.txt", "--state", pg_state, "--rate", "300", *FAST
        )
    ) as proc:
        wait_for(lambda: outcome_count(pg_state, "disconnected") >= 100)
        for _ in range(5):
            done = outcome_count(pg_state, "disconnected")
            with table_locked(pg_state):
                wait_for(lambda: waiting_for_the_table(pg_state))
                query(
                    pg_state,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'bulkdisconnect'",
                )
            wait_for(functools.partial(progressed, pg_state, done))
        _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-3000:]
    assert "bulkdisconnect.store.retry" in stderr
    assert outcome_count(pg_state, "disconnected") == len(ids)
    assert all(len(k) == 1 for k in keys_per_account(sandbox).values())


def test_a_write_lock_held_12_s_by_another_process_is_waited_out(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Another process holds the SQLite file's write lock for 12 s, past the busy timeout:
    the run waits it out (off the event loop) and finishes with exit 0."""
    ids = ws.ids(600)
    ws.write("ids.txt", ids)
    state = ws.state(JOB)
    with reaped(
        ws.spawn("run", "--job", JOB, "--input", "ids.txt", "--rate", "100", *FAST)
    ) as proc:
        wait_for(lambda: outcome_count(str(state), "disconnected") >= 50)
        with write_lock_held(state, 12) as holder:
            holder.communicate(timeout=30)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert ws.outcomes(JOB) == dict.fromkeys(ids, "disconnected")


def test_sigterm_while_the_process_starts_exits_3(ws: Workspace, sandbox: SandboxThread) -> None:
    """SIGTERM before the run has installed its own handlers (while it imports) still stops it
    the documented way: exit 3, as later ones do."""
    ws.write("ids.txt", ws.ids(50))
    for delay in (0.15, 0.3, 0.5):
        proc = ws.spawn("run", "--job", JOB, "--input", "ids.txt", *FAST)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 3, (delay, stderr[-3000:])


def test_a_lease_too_short_to_hold_is_refused(ws: Workspace, sandbox: SandboxThread) -> None:
    ws.write("ids.txt", ws.ids(5))
    result = ws.run("run", "--input", "ids.txt", "--lock-stale-after", "1", *FAST)
    assert result.exit_code == 2
    assert "lock-stale-after" in result.stderr or "lock_stale_after" in result.stderr
    assert "at least 2" in result.stderr
    assert not (ws.root / "state").exists()


def test_a_large_plan_keeps_its_short_lease(ws: Workspace, sandbox: SandboxThread) -> None:
    """200,000 values planned under a 2 s lease (the shortest accepted): the heartbeat gets
    through while they are staged, counted and merged, and the run goes on to work."""
    values = [f"bad_{n:07d}" for n in range(200_000)] + ws.ids(10)
    ws.write("ids.txt", values)
    proc = ws.spawn(
        "run", "--job", JOB, "--input", "ids.txt", "--lock-stale-after", "2", "--rate", "100", *FAST
    )
    out, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]  # the invalid values: finished, some invalid
    assert "lost the lock's lease" not in stderr
    assert "read 200010" in out
    assert outcome_count(str(ws.state(JOB)), "disconnected") == 10


# -- bounded in time --------------------------------------------------------------------------


@pytest.mark.parametrize("signals", [1, 2, 3])
def test_a_stalled_store_does_not_hold_a_stopping_run(
    ws: Workspace, sandbox: SandboxThread, state: str, signals: int
) -> None:
    """Another session holds the accounts table (PostgreSQL) or the file's write lock (SQLite);
    SIGTERM with --grace 2: the run exits 3 within the grace and the store's deadline on the
    way out. A second SIGTERM: at once; a third abandons the way out, still exit 3."""
    ws.write("ids.txt", ws.ids(2000))
    sandbox.sandbox.configure(latency_ms=20)
    with reaped(
        ws.spawn(
            "run",
            *("--job", JOB, "--input", "ids.txt", "--state", state, "--rate", "100"),
            *("--grace", "2", *FAST),
        )
    ) as proc:
        wait_for(lambda: outcome_count(state, "disconnected") >= 50)
        with stalled(state):
            for n in range(signals):
                if n:
                    time.sleep(0.2)  # two signals at once would merge into one
                proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            _, stderr = proc.communicate(timeout=40)
            took = time.monotonic() - signalled
    assert proc.returncode == 3, stderr[-3000:]
    # 2 s of grace and 5 s for the store on the way out; a second signal leaves 0.5 s.
    assert took < (2 + STOP_DEADLINE + 3 if signals == 1 else HURRIED + 3), took
    assert "Traceback" not in stderr


# -- status and report: read-only, and a damaged store ----------------------------------------


@pytest.mark.parametrize("damage", ["pages", "header"])
def test_status_and_report_say_in_one_line_that_the_store_is_corrupted(
    ws: Workspace, sandbox: SandboxThread, damage: str
) -> None:
    ws.write("ids.txt", ws.ids(3000))
    assert (
        ws.run("run", "--job", JOB, "--input", "ids.txt", "--rate", "10000", *FAST).exit_code == 0
    )
    state = ws.state(JOB)
    size = state.stat().st_size
    with state.open("r+b") as file:
        for offset in range(2 * 4096, size, 3 * 4096) if damage == "pages" else [0]:
            file.seek(offset)
            file.write(b"\xa5" * 4096)
    for command in ("status", "report"):
        result = ws.run(command, "--job", JOB)
        assert result.exit_code == 2, result.stderr
        assert "corrupted" in one_error_line(result.stderr)
        assert "restore it from a backup" in result.stderr


def test_status_reads_a_store_whose_write_lock_another_process_holds(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """status and report open the store read-only: no write lock, no layout check that
    writes, so a run (or anything) holding the file's write lock does not delay them."""
    ws.write("ids.txt", ws.ids(20))
    assert ws.run("run", "--job", JOB, "--input", "ids.txt", *FAST).exit_code == 0
    with write_lock_held(ws.state(JOB), 60):
        started = time.monotonic()
        status = ws.run("status", "--job", JOB)
        report = ws.run("report", "--job", JOB)
        took = time.monotonic() - started
    assert (status.exit_code, report.exit_code) == (0, 0), status.stderr + report.stderr
    assert "disconnected 20" in status.stdout
    assert len(report.stdout.splitlines()) == 20
    assert took < 8  # the busy timeout (10 s) was never waited for
