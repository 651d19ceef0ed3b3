"""The CLI as a real subprocess: kill -9, SIGTERM, the job lock, and where the key may not go."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from bulkdisconnect.model import idempotency_key
from bulkdisconnect.sandbox import SandboxThread
from tests.support import API_KEY, FAST, Workspace, recorded, wait_for

pytestmark = pytest.mark.slow


def test_kill_9_mid_run_then_rerun_records_every_account_once(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """After kill -9, a rerun finishes the job; accounts redone use the same key."""
    ids = ws.ids(400)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=20)
    proc = ws.spawn(
        "run",
        "--input",
        "ids.txt",
        "--rate",
        "200",
        "--concurrency",
        "8",
        "--lock-stale-after",
        "2",
        *FAST,
    )
    wait_for(lambda: recorded(ws.state("ids")) >= 60)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert recorded(ws.state("ids")) < 400
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 4  # its lease still runs
    with sqlite3.connect(ws.state("ids")) as db:  # as if its 2 s lease had run out
        db.execute("UPDATE locks SET heartbeat_at = heartbeat_at - 2.5")

    result = ws.run("run", "--input", "ids.txt", "--rate", "1000", *FAST)
    assert result.exit_code == 0, result.stderr
    rows = ws.rows("ids")
    assert sorted(r["account_id"] for r in rows) == sorted(ids)
    assert {r["outcome"] for r in rows} == {"disconnected"}
    keys: defaultdict[str, list[str | None]] = defaultdict(list)
    for entry in sandbox.sandbox.journal_snapshot():
        assert entry.account_id is not None
        keys[entry.account_id].append(entry.idempotency_key)
    assert set(keys) == set(ids)
    twice = [i for i, k in keys.items() if len(k) > 1]
    assert all(len(keys[i]) == 2 and set(keys[i]) == {idempotency_key("ids", i)} for i in twice)
    # Only what was in flight or not yet flushed is redone: at most 8 in flight + 0.5 s at 200/s.
    assert len(twice) <= 120


def test_sigterm_drains_in_flight_exits_3_and_a_rerun_completes(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """SIGTERM stops intake, lets in-flight requests finish, flushes, exits 3 within the grace."""
    ids = ws.ids(300)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=300)
    proc = ws.spawn(
        "run", "--input", "ids.txt", "--rate", "100", "--concurrency", "10", "--grace", "3", *FAST
    )
    wait_for(lambda: recorded(ws.state("ids")) >= 20)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 3, stderr
    assert time.monotonic() - signalled < 3 + 2
    assert API_KEY not in stderr
    answered = {e.account_id or "" for e in sandbox.sandbox.journal_snapshot() if e.status == 200}
    outcomes = ws.outcomes("ids")
    # Every answer the server gave before the stop was recorded: nothing in flight was lost.
    assert {a for a in answered if outcomes.get(a) != "disconnected"} == set()
    assert None in outcomes.values()

    result = ws.run("run", "--input", "ids.txt", "--rate", "1000", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")


def test_second_concurrent_run_exits_4(ws: Workspace, sandbox: SandboxThread) -> None:
    """While one run holds the job, another run of it exits 4 and calls nothing."""
    ids = ws.ids(50)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=100)
    first = ws.spawn("run", "--input", "ids.txt", "--rate", "5", "--grace", "0", *FAST)
    try:
        wait_for(lambda: recorded(ws.state("ids")) >= 1)
        before = len(sandbox.sandbox.journal_snapshot())
        second = ws.run("run", "--input", "ids.txt", "--rate", "1000", *FAST)
        assert second.exit_code == 4
        assert "locked" in second.stderr
        status = ws.run("status", "--job", "ids")
        assert "locked by pid" in status.stdout
        assert "(alive)" in status.stdout
        after = sandbox.sandbox.journal_snapshot()
        assert len(after) - before <= 3  # only the first run's own, rate-limited calls
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=15)
    assert first.returncode == 3


def test_a_stale_lock_is_taken_over(ws: Workspace, sandbox: SandboxThread) -> None:
    """A lock whose heartbeat stopped (a killed run) is taken over; a fresh one is not."""
    ids = ws.ids(5)
    ws.write("ids.txt", ids)
    assert ws.run("run", "--input", "ids.txt", "--dry-run", env={}).exit_code == 0
    ws.state("ids").parent.mkdir(exist_ok=True)
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 0  # creates the store
    with sqlite3.connect(ws.state("ids")) as db:
        db.execute(
            "INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, "
            "shared, share_of) VALUES ('ids', 'dead', 1, 'gone', ?, ?, 30, 0, 1)",
            (time.time() - 3600, time.time() - 3600),
        )
        db.execute("UPDATE accounts SET outcome = NULL")
    assert "(stale: the run is gone" in ws.run("status", "--job", "ids").stdout
    taken = ws.run("run", "--input", "ids.txt", *FAST)
    assert taken.exit_code == 0, taken.stderr
    with sqlite3.connect(ws.state("ids")) as db:
        db.execute(
            "INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, "
            "shared, share_of) VALUES ('ids', 'alive', 1, 'there', ?, ?, 30, 0, 1)",
            (time.time(), time.time()),
        )
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 4


def test_the_key_appears_nowhere(ws: Workspace, sandbox: SandboxThread) -> None:
    """The API key is in no output, log line, state file or report, even on errors."""
    ids = ws.ids(30)
    sandbox.sandbox.configure(missing=frozenset(ids[:2]), p500=0.2, seed=9, revoke_after=25)
    ws.write("ids.txt", [*ids, "fca_../x"])
    proc = ws.spawn(
        "run",
        "--input",
        "ids.txt",
        "--rate",
        "1000",
        "--max-attempts",
        "2",
        "--retry-delay",
        "0",
        "--log-format",
        "json",
    )
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 5
    assert stderr.strip()  # it did log
    sandbox.sandbox.configure(revoke_after=None)
    sandbox.sandbox.reset()
    finish = ws.spawn("run", "--input", "ids.txt", "--rate", "1000", "--log-format", "json")
    out2, err2 = finish.communicate(timeout=30)
    report = ws.run("report", "--job", "ids", "--format", "csv")
    status = ws.run("status", "--job", "ids")
    texts = [stdout, stderr, out2, err2, report.stdout, status.stdout]
    stored = b"".join(p.read_bytes() for p in ws.state("ids").parent.iterdir())
    assert all(API_KEY not in t for t in texts)
    assert API_KEY.encode() not in stored
    assert API_KEY[8:].encode() not in stored


@pytest.mark.parametrize("concurrency", [[], ["--concurrency", "8"]], ids=["adaptive", "fixed"])
def test_a_stop_signal_sends_nothing_more(
    ws: Workspace, sandbox: SandboxThread, concurrency: list[str]
) -> None:
    """After SIGINT no new request goes out: workers waiting at a meter give up their turn.

    At --rate 4 requests leave every 250 ms, so at most one can be on its way while the
    signal is sent; the old behaviour let every waiting worker send (one per slot, for the
    whole --grace).
    """
    ids = ws.ids(200)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(latency_ms=600)
    proc = ws.spawn("run", "--input", "ids.txt", "--rate", "4", *concurrency, *FAST)
    wait_for(lambda: len(sandbox.sandbox.journal_snapshot()) >= 4)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 3, stderr
    journal = sandbox.sandbox.journal_snapshot()
    after = [e for e in journal if e.at > signalled]
    assert len(after) <= 1, f"{len(after)} requests reached the server after the signal"
    # What was on the wire got its answer recorded; the rest stays pending for a rerun.
    outcomes = ws.outcomes("ids")
    assert {e.account_id for e in journal if e.status == 200} == {
        a for a, o in outcomes.items() if o == "disconnected"
    }
    assert sum(o is None for o in outcomes.values()) == 200 - len(journal)
    assert "run of job ids ended with exit code 3" in stdout


def test_a_second_signal_cancels_in_flight_and_still_prints_the_summary(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A second SIGINT does not wait out --grace: in-flight requests are dropped (their
    accounts stay pending), the summary is printed, and the run exits 3."""
    ids = ws.ids(50)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(p_hang=1.0, hang_seconds=30.0)  # journaled on arrival
    log = ws.root / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bulkdisconnect",
                "run",
                "--input",
                "ids.txt",
                "--rate",
                "50",
                "--concurrency",
                "5",
                "--grace",
                "60",
                *FAST,
            ],
            cwd=ws.root,
            env={**os.environ, **ws.env()},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        wait_for(lambda: len(sandbox.sandbox.journal_snapshot()) >= 5)
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "bulkdisconnect.stopping" in log.read_text())
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=20)
    assert proc.returncode == 3, log.read_text()
    assert "run of job ids ended with exit code 3" in stdout
    assert len(sandbox.sandbox.journal_snapshot()) == 5
    assert set(ws.outcomes("ids").values()) == {None}
