"""`verify`: a job's accounts read back from the loopback sandbox, what Stripe reports
recorded, a reactivated account flagged, a pass interrupted and resumed."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkdisconnect.sandbox import SandboxThread, account_calls
from tests.support import FAST, Workspace, wait_for

JOB = "ids"
FASTER = ["--rate", "1000", "--retry-delay", "0", "--retry-max-delay", "0"]


def run(ws: Workspace, ids: list[str], *state: str) -> None:
    """Disconnect `ids` as job JOB (every one of them: exit 0)."""
    ws.write("ids.txt", ids)
    result = ws.run("run", "--job", JOB, "--input", "ids.txt", "--rate", "1000", *state, *FAST)
    assert result.exit_code == 0, result.stderr


def report(ws: Workspace, *state: str) -> dict[str, dict[str, Any]]:
    """The job's report rows (JSONL) by account."""
    result = ws.run("report", "--job", JOB, *state)
    assert result.exit_code == 0, result.stderr
    rows = (json.loads(line) for line in result.stdout.splitlines())
    return {row["account_id"]: row for row in rows}


def reads(sandbox: SandboxThread) -> Counter[str]:
    """How many times each account was read back (GET of the account)."""
    return account_calls(sandbox.sandbox.journal_snapshot(), methods=("GET",))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_reactivated_account_is_flagged_and_verify_exits_1(
    ws: Workspace, sandbox: SandboxThread, kind: str, request: pytest.FixtureRequest
) -> None:
    """`verify --all` reads every disconnected account back once: those Stripe reports active
    again are flagged (report, status, exit 1), the others verified."""
    state = [] if kind == "sqlite" else ["--state", request.getfixturevalue("pg_state")]
    sandbox.sandbox.configure(reactivate_share=0.1, seed=4)
    ids = ws.ids(100)
    run(ws, ids, *state)
    reactivated = sandbox.sandbox.reactivated_accounts()
    assert 0 < len(reactivated) < 100
    result = ws.run("verify", "--job", JOB, "--all", *state, *FASTER)
    assert result.exit_code == 1, result.stderr
    assert f"disconnected {100 - len(reactivated)}, ACTIVE AGAIN {len(reactivated)}" in (
        result.stdout
    )
    assert reads(sandbox) == Counter(dict.fromkeys(ids, 1))
    rows = report(ws, *state)
    assert {a for a, r in rows.items() if r["verified_status"] == "active"} == reactivated
    assert {a for a, r in rows.items() if r["verified_status"] == "disconnected"} == (
        set(ids) - reactivated
    )
    assert all(r["verified_at"] for r in rows.values())
    status = ws.run("status", "--job", JOB, *state).stdout
    assert f"verified {100 - len(reactivated)}, reactivated {len(reactivated)}" in status
    assert f"REACTIVATED: {len(reactivated)} accounts" in status


def test_sigterm_during_verify_exits_3_and_a_rerun_finishes_the_pass(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """SIGTERM stops a pass (exit 3) with what it read recorded; while it runs the job is held
    (a run exits 4); the rerun resumes the same pass and reads each account not read yet,
    so every account is read back exactly once."""
    ids = ws.ids(300)
    run(ws, ids)
    sandbox.sandbox.configure(latency_ms=100)
    proc = ws.spawn("verify", "--job", JOB, "--all", "--rate", "50", *FAST[:4])
    wait_for(lambda: sum(reads(sandbox).values()) >= 30)
    held = ws.run("run", "--job", JOB, "--input", "ids.txt", *FAST)
    assert held.exit_code == 4, held.stderr
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 3, stderr
    assert "interrupted; what was read back is kept" in stdout
    pass_id = stdout.split(", pass ", 1)[1].split(" ", 1)[0]
    first = sum(reads(sandbox).values())
    assert 30 <= first < 300
    assert sum(1 for r in report(ws).values() if r["verified_at"]) == first
    assert f"last pass {pass_id} (all) not ended" in ws.run("status", "--job", JOB).stdout

    sandbox.sandbox.configure(latency_ms=0)
    rerun = ws.run("verify", "--job", JOB, "--all", *FASTER)
    assert rerun.exit_code == 0, rerun.stderr
    assert f"pass {pass_id} (all accounts, resumed; ended): read back {300 - first} now" in (
        rerun.stdout
    )
    assert reads(sandbox) == Counter(dict.fromkeys(ids, 1))
    status = ws.run("status", "--job", JOB).stdout
    assert "verified 300, reactivated 0, never read back 0" in status
    assert f"last pass {pass_id} (all) ended" in status


def passes(ws: Workspace) -> list[tuple[str, str, float | None]]:
    """The job's verify passes: (pass ID, selection, finished at), oldest first."""
    with contextlib.closing(sqlite3.connect(ws.state(JOB))) as db:
        return db.execute(
            "SELECT pass_id, selection, finished_at FROM verify_passes ORDER BY started_at"
        ).fetchall()


def test_a_sample_is_drawn_again_the_same_when_its_pass_resumes(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """`--sample N` reads N accounts; its pass, resumed, draws the same N and reads only those
    it had not read; an ended pass is followed by a new one, drawn anew."""
    ids = ws.ids(200)
    run(ws, ids)
    first = ws.run("verify", "--job", JOB, "--sample", "20", *FASTER)
    assert first.exit_code == 0, first.stderr
    drawn = set(reads(sandbox))
    assert len(drawn) == 20
    [(pass_id, selection, _)] = passes(ws)
    assert selection == "sample:20"
    undone = sorted(drawn)[:5]  # as if the pass had been stopped before reading these
    with contextlib.closing(sqlite3.connect(ws.state(JOB))) as db, db:
        db.execute("UPDATE verify_passes SET finished_at = NULL")
        db.executemany(
            "UPDATE accounts SET verified_pass = NULL WHERE account_id = ?",
            [(a,) for a in undone],
        )
    resumed = ws.run("verify", "--job", JOB, "--sample", "20", *FASTER)
    assert resumed.exit_code == 0, resumed.stderr
    assert f"pass {pass_id} (sample:20 accounts, resumed; ended): read back 5 now" in (
        resumed.stdout
    )
    assert reads(sandbox) == Counter({a: 2 if a in undone else 1 for a in drawn})

    anew = ws.run("verify", "--job", JOB, "--sample", "20", *FASTER)
    assert anew.exit_code == 0, anew.stderr
    assert [p[0] == pass_id for p in passes(ws)] == [True, False]
    assert sum(reads(sandbox).values()) == 45


def textfile(path: Path) -> dict[str, float]:
    """The samples of a Prometheus textfile by name (one job: labels left out)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }


def test_verify_exports_its_own_metrics(ws: Workspace, sandbox: SandboxThread) -> None:
    """verify writes its counts, the job's verified and reactivated accounts, its requests and
    exit code to its own textfile."""
    sandbox.sandbox.configure(reactivate_share=0.1, seed=4)
    ids = ws.ids(50)
    run(ws, ids)
    reactivated = len(sandbox.sandbox.reactivated_accounts())
    assert reactivated
    metrics = ws.root / "verify.prom"
    result = ws.run("verify", "--job", JOB, "--all", "--metrics-file", str(metrics), *FASTER)
    assert result.exit_code == 1, result.stderr
    samples = textfile(metrics)
    assert samples["bulkdisconnect_verify_verified_total"] == 50 - reactivated
    assert samples["bulkdisconnect_verify_reactivated_total"] == reactivated
    assert samples["bulkdisconnect_verify_unreadable_total"] == 0
    assert samples["bulkdisconnect_verified_accounts"] == 50 - reactivated
    assert samples["bulkdisconnect_reactivated_accounts"] == reactivated
    assert samples["bulkdisconnect_verify_requests_total"] == 50
    assert samples["bulkdisconnect_verify_last_exit_code"] == 1
    assert "bulkdisconnect_verify_last_success_timestamp_seconds" not in samples


def test_accounts_that_cannot_be_read_leave_the_pass_open_for_a_rerun(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A connected account that revoked the platform is named, its accounts are not recorded,
    and the pass stays open (exit 1); once it is readable the rerun reads only those."""
    rows = [("acct_1Kept", f"fca_kept{n}") for n in range(5)]
    rows += [("acct_1Gone", f"fca_gone{n}") for n in range(5)]
    ws.write("purge.csv", ["stripe_account,account_id", *(f"{a},{i}" for a, i in rows)])
    result = ws.run("run", "--job", JOB, "--input", "purge.csv", "--rate", "1000", *FAST)
    assert result.exit_code == 0, result.stderr
    sandbox.sandbox.configure(revoked_accounts=frozenset({"acct_1Gone"}))
    first = ws.run("verify", "--job", JOB, "--all", *FASTER)
    assert first.exit_code == 1, first.stderr
    assert "stopped for acct_1Gone: reading its accounts: HTTP 403 account_invalid" in first.stdout
    assert "not ended: a rerun goes on with it" in first.stdout
    verified = {a for a, r in report(ws).items() if r["verified_status"] == "disconnected"}
    assert verified == {i for a, i in rows if a == "acct_1Kept"}
    sandbox.sandbox.configure(revoked_accounts=frozenset())
    second = ws.run("verify", "--job", JOB, "--all", *FASTER)
    assert second.exit_code == 0, second.stderr
    assert "resumed; ended): read back 5 now" in second.stdout
    assert {a for a, r in report(ws).items() if r["verified_status"] == "disconnected"} == {
        i for _, i in rows
    }
