"""Erasing the tool's own records: `forget` a job, or every job finished before a date; and
the modes of what it writes."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, Workspace


def planned_and_run(ws: Workspace, job: str, state: str, count: int = 5) -> None:
    ws.write(f"{job}.txt", ws.ids(count, job))
    result = ws.run("run", "--job", job, "--input", f"{job}.txt", "--state", state, *FAST)
    assert result.exit_code == 0, result.stderr


def test_forget_deletes_one_job_and_says_how_much(ws: Workspace, sandbox: SandboxThread) -> None:
    state = str(ws.root / "shared.sqlite")
    planned_and_run(ws, "alpha", state, 5)
    planned_and_run(ws, "beta", state, 3)
    result = ws.run("forget", "--job", "alpha", "--state", state, "--yes")
    assert result.exit_code == 0, result.stderr
    assert "forgot job alpha" in result.stdout
    assert "5 accounts, 1 runs" in result.stdout
    with sqlite3.connect(state) as db:
        jobs = db.execute("SELECT job, COUNT(*) FROM accounts GROUP BY job").fetchall()
        runs = db.execute("SELECT DISTINCT job FROM runs").fetchall()
    assert (jobs, runs) == ([("beta", 3)], [("beta",)])
    gone = ws.run("status", "--job", "alpha", "--state", state)
    assert gone.exit_code == 2
    assert "not in" in gone.stderr


def test_forget_asks_and_without_a_terminal_needs_yes(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    state = str(ws.root / "shared.sqlite")
    planned_and_run(ws, "alpha", state)
    result = ws.run("forget", "--job", "alpha", "--state", state)
    assert result.exit_code == 2
    assert "--yes" in result.stderr
    assert ws.run("status", "--job", "alpha", "--state", state).exit_code == 0


def test_forget_is_refused_while_a_run_holds_the_job(ws: Workspace, sandbox: SandboxThread) -> None:
    state = str(ws.root / "shared.sqlite")
    planned_and_run(ws, "alpha", state)
    with sqlite3.connect(state) as db:  # a run holds the job, alive a second ago
        db.execute(
            "INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, shared, "
            "share_of) VALUES ('alpha', 'running', 1, 'elsewhere', ?, ?, 30, 0, 1)",
            (time.time(), time.time()),
        )
    result = ws.run("forget", "--job", "alpha", "--state", state, "--yes")
    assert result.exit_code == 4
    assert "locked" in result.stderr
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT COUNT(*) FROM accounts").fetchone() == (5,)


def test_forget_finished_before_a_date_keeps_a_job_to_resume(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """In the default state/ folder (a file a job): jobs whose last run ended 0 or 1 before
    the date are forgotten; one interrupted (3), left to resume, is kept."""
    for job in ("old", "older", "interrupted"):
        planned_and_run(ws, job, str(ws.root / "state" / f"{job}.sqlite"))
    with sqlite3.connect(ws.state("interrupted")) as db:
        db.execute("UPDATE runs SET exit_code = 3")
    result = ws.run("forget", "--finished-before", "2999-01-01", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "forgot job old " in result.stdout
    assert "forgot job older " in result.stdout
    assert "interrupted" not in result.stdout
    assert ws.run("status", "--job", "interrupted").exit_code == 0
    assert ws.run("status", "--job", "old").exit_code == 2
    nothing = ws.run("forget", "--finished-before", "2000-01-01", "--yes")
    assert (nothing.exit_code, nothing.stdout) == (0, "")


def test_the_report_file_is_private_whatever_the_umask(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    planned_and_run(ws, "alpha", str(ws.state("alpha")))
    before = os.umask(0)
    try:
        result = ws.run("report", "--job", "alpha", "--format", "csv", "--output", "out.csv")
    finally:
        os.umask(before)
    assert result.exit_code == 0, result.stderr
    assert (ws.root / "out.csv").stat().st_mode & 0o777 == 0o600
    assert Path(ws.root / "state").stat().st_mode & 0o777 == 0o700
