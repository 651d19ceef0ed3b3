"""Several `run --join` worker processes on one job in PostgreSQL, against the sandbox."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import anyio
import asyncpg
import pytest

from bulkdisconnect.model import idempotency_key
from bulkdisconnect.sandbox import SandboxThread
from bulkdisconnect.sandbox.journal import account_calls
from tests.support import FAST, Workspace, wait_for

pytestmark = pytest.mark.slow

JOB = "shared"


def stored(state: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of a query over the store's schema."""
    url, _, schema = state.partition("?schema=")

    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            return list(await conn.fetch(sql, *args))
        except asyncpg.UndefinedTableError:  # the first worker has not created it yet
            return []
        finally:
            await conn.close()

    return anyio.run(fetch, backend="asyncio")


def outcomes(state: str) -> Counter[str | None]:
    """Accounts of the job per outcome."""
    rows = stored(state, "SELECT outcome, COUNT(*) FROM accounts WHERE job = $1 GROUP BY 1", JOB)
    return Counter({row[0]: row[1] for row in rows})


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Worker processes a test starts; any still running at its end are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def workers(
    ws: Workspace, started: list[subprocess.Popen[str]], state: str, count: int, *extra: str
) -> list[subprocess.Popen[str]]:
    """Start `count` identical `run --join` processes on ids.txt."""
    args = ["run", "--join", "--job", JOB, "--input", "ids.txt", "--state", state, *FAST, *extra]
    procs = [ws.spawn(*args) for _ in range(count)]
    started.extend(procs)
    return procs


def finish(
    procs: list[subprocess.Popen[str]], timeout: float = 120, outputs: list[str] | None = None
) -> list[int]:
    """Wait for every process; their exit codes (and their stdout into `outputs`)."""
    codes = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
            if outputs is not None:
                outputs.append(out)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
            pytest.fail(f"worker did not finish: {err[-2000:]}")
        codes.append(proc.returncode)
    return codes


def test_four_workers_share_a_job(
    ws: Workspace,
    sandbox: SandboxThread,
    pg_state: str,
    started: list[subprocess.Popen[str]],
) -> None:
    """4 workers, 4,000 accounts: one plans, all work, each account recorded and called once.

    That together they stay under --rate is measured by `make bench` (workers section):
    on two busy cores, when a request is stamped depends on the machine's load.
    """
    ids = ws.ids(4_000)
    ws.write("ids.txt", ids)
    procs = workers(ws, started, pg_state, 4, "--rate", "2000", "--concurrency", "16")
    outputs: list[str] = []
    assert finish(procs, outputs=outputs) == [0, 0, 0, 0]
    # One worker planned the input; the others found it planned.
    assert sum("plan for job shared: read 4000" in out for out in outputs) == 1
    assert sum("joined job shared: planned by another worker" in out for out in outputs) == 3

    assert outcomes(pg_state) == {"disconnected": 4_000}
    calls = account_calls(sandbox.sandbox.journal_snapshot())
    assert set(calls) == set(ids)
    assert max(calls.values()) == 1
    # Every worker did a share of the work: the job was really split, not run by one.
    by_run = stored(pg_state, "SELECT run_id, COUNT(*) FROM accounts GROUP BY run_id")
    assert len(by_run) == 4
    assert min(row[1] for row in by_run) > 4_000 / 4 / 3
    runs = stored(pg_state, "SELECT exit_code FROM runs WHERE job = $1", JOB)
    assert [row[0] for row in runs] == [0, 0, 0, 0]
    assert stored(pg_state, "SELECT * FROM locks") == []


def test_killed_workers_accounts_are_finished_by_the_others(
    ws: Workspace,
    sandbox: SandboxThread,
    pg_state: str,
    started: list[subprocess.Popen[str]],
) -> None:
    """kill -9 of one worker: the others take its accounts once its lease runs out."""
    ids = ws.ids(3000)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=20)
    lease = "2"
    procs = workers(
        ws, started, pg_state, 3, "--rate", "300", "--concurrency", "8", "--lock-stale-after", lease
    )
    wait_for(lambda: outcomes(pg_state).get("disconnected", 0) >= 600, timeout=30)
    victim = procs[0]
    (victim_run,) = (
        row[0] for row in stored(pg_state, "SELECT owner FROM locks WHERE pid = $1", victim.pid)
    )
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    killed_at = time.monotonic()
    stranded = {
        row[0]
        for row in stored(
            pg_state,
            "SELECT account_id FROM accounts WHERE run_id = $1 AND outcome IS NULL",
            victim_run,
        )
    }
    assert stranded  # it died with accounts in hand
    assert finish(procs[1:]) == [0, 0]

    assert outcomes(pg_state) == {"disconnected": 3000}
    finished_by = stored(
        pg_state, "SELECT DISTINCT run_id FROM accounts WHERE account_id = ANY($1)", [*stranded]
    )
    assert victim_run not in {row[0] for row in finished_by}
    unfinished = stored(pg_state, "SELECT run_id FROM runs WHERE finished_at IS NULL")
    assert [row[0] for row in unfinished] == [victim_run]  # on record as never finished

    journal = sandbox.sandbox.journal_snapshot()
    calls = account_calls(journal)
    assert set(calls) == set(ids)
    assert max(calls.values()) <= 2
    # Called twice only if the dead worker had sent it, and with the same key both times.
    twice = {account for account, n in calls.items() if n > 1}
    assert twice <= stranded
    keys = {e.idempotency_key for e in journal if e.account_id in twice}
    assert keys == {idempotency_key(JOB, a) for a in twice}
    # Nobody touched its accounts before its lease ran out. Each one's last call is the taker's
    # (the dead worker's own, sent just before the kill, may reach the sandbox just after it).
    last_call: dict[str, float] = {}
    for e in journal:
        if (account := e.account_id) is not None and account in stranded:
            last_call[account] = max(e.at, last_call.get(account, e.at))
    assert set(last_call) == stranded
    assert min(last_call.values()) >= killed_at + float(lease) * 0.5


def test_plain_run_refused_while_workers_hold_the_job(
    ws: Workspace,
    sandbox: SandboxThread,
    pg_state: str,
    started: list[subprocess.Popen[str]],
) -> None:
    """Without --join a second run exits 4 while joined workers work; --join on SQLite is 2."""
    ws.write("ids.txt", ws.ids(2000))
    sandbox.sandbox.configure(latency_ms=20)
    (proc,) = workers(ws, started, pg_state, 1, "--rate", "200", "--concurrency", "4")
    wait_for(lambda: outcomes(pg_state).get("disconnected", 0) > 0, timeout=30)
    plain = ws.run("run", "--job", JOB, "--input", "ids.txt", "--state", pg_state, *FAST)
    assert plain.exit_code == 4
    assert "--join" in plain.stderr
    ws.write("other.txt", ws.ids(10, prefix="other"))
    stray = ws.run(
        "run", "--join", "--job", JOB, "--input", "other.txt", "--state", pg_state, *FAST
    )
    assert stray.exit_code == 4
    assert "another input" in stray.stderr
    proc.send_signal(signal.SIGTERM)
    assert finish([proc]) == [3]

    sqlite = ws.run("run", "--join", "--job", JOB, "--input", "ids.txt", *FAST)
    assert sqlite.exit_code == 2
    assert "postgresql://" in sqlite.stderr


def test_status_lists_the_workers(
    ws: Workspace,
    sandbox: SandboxThread,
    pg_state: str,
    started: list[subprocess.Popen[str]],
) -> None:
    """status on a PostgreSQL store shows each live worker."""
    ws.write("ids.txt", ws.ids(600))
    sandbox.sandbox.configure(latency_ms=20)
    procs = workers(ws, started, pg_state, 2, "--rate", "200", "--concurrency", "4")
    wait_for(lambda: len(stored(pg_state, "SELECT 1 FROM locks WHERE share_of = 2")) == 2)
    status = ws.run("status", "--job", JOB, "--state", pg_state)
    assert status.exit_code == 0, status.stderr
    assert status.stdout.count("worked by --join worker") == 2
    assert finish(procs) == [0, 0]
    status = ws.run("status", "--job", JOB, "--state", pg_state)
    assert "not running" in status.stdout
    assert "disconnected 600" in status.stdout


def test_state_password_is_never_shown(
    ws: Workspace, sandbox: SandboxThread, pg_state: str
) -> None:
    """A password in the PostgreSQL state URL stays out of output, logs and the store."""
    ws.write("ids.txt", ws.ids(5))
    secret_url = pg_state.replace("postgres@", "postgres:s3cretpw@")
    result = ws.run("run", "--job", JOB, "--input", "ids.txt", "--state", secret_url, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "postgres:***@127.0.0.1" in result.stdout
    status = ws.run("status", "--job", "nope", "--state", secret_url)
    assert status.exit_code == 2
    summaries = stored(pg_state, "SELECT summary FROM runs")
    for text in (result.stdout, result.stderr, status.stderr, *(row[0] for row in summaries)):
        assert "s3cretpw" not in text
