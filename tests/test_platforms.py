"""Connect platforms: one job across many connected accounts, each under its own header,
budget and breaker, against the loopback sandbox (which owns accounts per Stripe account)."""

from __future__ import annotations

import contextlib
import csv
import io
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path

from bulkdisconnect.model import idempotency_key
from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, Workspace, wait_for

OWNERS = ("acct_1Alpha", "acct_1Bravo", "acct_1Charlie")


def write_csv(ws: Workspace, name: str, rows: list[tuple[str, str]]) -> Path:
    """A CSV of (stripe_account, account_id) rows."""
    return ws.write(name, ["stripe_account,account_id", *(f"{a},{i}" for a, i in rows)])


def owned(ws: Workspace, per_owner: int, owners: tuple[str, ...] = OWNERS) -> list[tuple[str, str]]:
    """`per_owner` accounts of each owner, the input sorted by owner."""
    return [(owner, f"fca_{owner[5:]}{n:04d}") for owner in owners for n in range(per_owner)]


def headers_seen(sandbox: SandboxThread) -> dict[str, set[str | None]]:
    """account ID -> the Stripe-Account headers its disconnects were sent with."""
    seen: dict[str, set[str | None]] = defaultdict(set)
    for entry in sandbox.sandbox.journal_snapshot():
        if entry.account_id:
            seen[entry.account_id].add(entry.stripe_account)
    return seen


def stored(ws: Workspace, job: str) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(stripe_account, account_id) -> (outcome, error_code), straight from the file."""
    with contextlib.closing(sqlite3.connect(ws.state(job))) as db:
        rows = db.execute(
            "SELECT stripe_account, account_id, outcome, error_code FROM accounts WHERE job = ?",
            (job,),
        ).fetchall()
    return {(a, i): (o, c) for a, i, o, c in rows}


def test_each_row_reaches_stripe_under_its_own_connected_account(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Rows of three connected accounts and of the platform, interleaved in one CSV: each is
    sent with its own Stripe-Account header (none with another's), and all are disconnected."""
    rows = owned(ws, 8)
    platform = [("", f"fca_platform{n}") for n in range(4)]
    mixed = [row for pair in zip(rows[::2], rows[1::2], strict=True) for row in pair] + platform
    sandbox.sandbox.configure(accounts={i: a for a, i in mixed})
    write_csv(ws, "purge.csv", mixed)
    result = ws.run("run", "--input", "purge.csv", "--rate", "200", *FAST)
    assert result.exit_code == 0, result.stderr
    assert headers_seen(sandbox) == {i: {a or None} for a, i in mixed}
    assert set(stored(ws, "purge").values()) == {("disconnected", None)}
    report = ws.run("report", "--job", "purge", "--format", "csv")
    lines = list(csv.DictReader(io.StringIO(report.stdout)))
    assert {(r["stripe_account"], r["account_id"]) for r in lines} == set(mixed)


def test_status_counts_per_connected_account(ws: Workspace, sandbox: SandboxThread) -> None:
    """`status` of a job across connected accounts shows each one's counts."""
    rows = owned(ws, 3)
    write_csv(ws, "purge.csv", rows)
    assert ws.run("run", "--input", "purge.csv", "--dry-run", *FAST).exit_code == 0
    assert ws.run("run", "--input", "purge.csv", "--rate", "200", *FAST).exit_code == 0
    status = ws.run("status", "--job", "purge")
    assert "per Stripe account (3)" in status.stdout
    for owner in OWNERS:
        assert f"{owner}: disconnected 3," in status.stdout


def test_the_key_differs_per_connected_account_and_is_stable_across_reruns(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """The same account ID under two connected accounts is two rows with two keys; a rerun of
    the failed ones sends the very same keys. The job's own rows keep the key they always had."""
    rows = [("acct_1Alpha", "fca_same"), ("acct_1Bravo", "fca_same"), ("", "fca_same")]
    write_csv(ws, "twice.csv", rows)
    sandbox.sandbox.configure(p500=1.0)
    failed = ws.run("run", "--input", "twice.csv", "--max-attempts", "2", *FAST)
    assert failed.exit_code == 1, failed.stderr
    first = {(e.stripe_account, e.idempotency_key) for e in sandbox.sandbox.journal_snapshot()}
    assert first == {
        ("acct_1Alpha", "bulkdisconnect-b62c415d14dc46594e8d1502a0499aee"),
        ("acct_1Bravo", idempotency_key("twice", "fca_same", "acct_1Bravo")),
        (None, idempotency_key("twice", "fca_same")),
    }
    sandbox.sandbox.reset()
    sandbox.sandbox.configure(p500=0.0)
    again = ws.run("run", "--input", "twice.csv", "--retry-failed", *FAST)
    assert again.exit_code == 0, again.stderr
    assert {(e.stripe_account, e.idempotency_key) for e in sandbox.sandbox.journal_snapshot()} == (
        first
    )
    assert len(stored(ws, "twice")) == 3


def test_a_connected_account_revoked_mid_run_fails_only_its_rows(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A connected account that takes the platform's access away mid-run: its remaining rows
    end failed with account_invalid and Stripe's message, without a call each; the other
    accounts finish; the run exits 1 and says which account it stopped for."""
    rows = owned(ws, 60)
    sandbox.sandbox.configure(accounts={i: a for a, i in rows})
    write_csv(ws, "purge.csv", rows)
    revoked = OWNERS[1]
    process = ws.spawn("run", "--input", "purge.csv", "--rate", "20", *FAST)
    with contextlib.suppress(Exception):
        wait_for(lambda: headers_seen(sandbox) and sent_to(sandbox, revoked) >= 10)
        sandbox.sandbox.configure(revoked_accounts=frozenset({revoked}))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    outcomes = stored(ws, "purge")
    by_owner: dict[str, Counter[tuple[str | None, str | None]]] = defaultdict(Counter)
    for (owner, _), outcome in outcomes.items():
        by_owner[owner][outcome] += 1
    for owner in OWNERS:
        if owner != revoked:
            assert by_owner[owner] == Counter({("disconnected", None): 60})
    refused = by_owner[revoked][("failed", "account_invalid")]
    assert refused >= 30
    assert by_owner[revoked][("disconnected", None)] + refused == 60
    # Once refused, its rows were failed without a call each: a few in flight at most.
    assert sent_to(sandbox, revoked) <= by_owner[revoked][("disconnected", None)] + 5
    assert f"stopped for {revoked}: account_invalid" in out


def test_connected_accounts_on_postgresql_with_two_workers(
    ws: Workspace, sandbox: SandboxThread, pg_state: str
) -> None:
    """Two `--join` workers on one PostgreSQL job across three connected accounts, one of them
    refused: every row of the others disconnected under its own header, once; the refused
    one's rows failed account_invalid; both workers exit 1."""
    rows = owned(ws, 30)
    sandbox.sandbox.configure(
        accounts={i: a for a, i in rows}, revoked_accounts=frozenset({OWNERS[2]})
    )
    write_csv(ws, "purge.csv", rows)
    args = ("run", "--join", "--input", "purge.csv", "--state", pg_state, "--rate", "50", *FAST)
    workers = [ws.spawn(*args), ws.spawn(*args)]
    outputs = [worker.communicate(timeout=60) for worker in workers]
    assert [worker.returncode for worker in workers] == [1, 1], outputs
    seen = headers_seen(sandbox)
    for owner, account in rows:
        assert seen.get(account, {owner}) == {owner}
    sent = Counter(e.account_id for e in sandbox.sandbox.journal_snapshot() if e.account_id)
    assert all(sent[i] == 1 for a, i in rows if a != OWNERS[2])
    status = ws.run("status", "--job", "purge", "--state", pg_state)
    assert f"{OWNERS[0]}: disconnected 30," in status.stdout
    assert f"{OWNERS[2]}: disconnected 0, not_found 0, invalid_id 0, failed 30," in status.stdout


def sent_to(sandbox: SandboxThread, stripe_account: str) -> int:
    """Disconnect requests the sandbox saw for one connected account."""
    return sum(
        1
        for e in sandbox.sandbox.journal_snapshot()
        if e.account_id and e.stripe_account == stripe_account
    )


def test_the_breaker_of_one_misfiled_account_leaves_the_others_done(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Rows filed under the wrong connected account (the sandbox answers resource_missing):
    that account's breaker trips and its rows stay pending; the others are all disconnected;
    the run exits 1, not 3 (nothing is left that a plain rerun would do differently)."""
    rows = owned(ws, 40)
    wrong = OWNERS[2]
    owners = {i: (OWNERS[0] if a == wrong else a) for a, i in rows}
    sandbox.sandbox.configure(accounts=owners)
    write_csv(ws, "purge.csv", rows)
    result = ws.run(
        "run",
        "--input",
        "purge.csv",
        "--rate",
        "200",
        "--breaker-min-sample",
        "10",
        *FAST,
    )
    assert result.exit_code == 1, result.stderr
    outcomes = stored(ws, "purge")
    for (owner, _), outcome in outcomes.items():
        if owner == wrong:
            assert outcome[0] is None
        else:
            assert outcome == ("disconnected", None)
    assert f"stopped for {wrong}: failure breaker tripped" in result.stdout


def test_bad_connected_account_values_are_invalid_and_never_sent(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A stripe_account cell that is not acct_ + letters and digits makes its row invalid_id;
    an empty one means the run's --stripe-account."""
    rows = [("acct_1Alpha", "fca_good"), ("acct_1Al pha", "fca_spaced"), ("acct_", "fca_bare")]
    rows += [("", "fca_default")]
    write_csv(ws, "purge.csv", rows)
    result = ws.run("run", "--input", "purge.csv", "--stripe-account", "acct_1Own", *FAST)
    assert result.exit_code == 1, result.stderr
    assert stored(ws, "purge") == {
        ("acct_1Alpha", "fca_good"): ("disconnected", None),
        ("acct_1Al pha", "fca_spaced"): ("invalid_id", "invalid_id"),
        ("acct_", "fca_bare"): ("invalid_id", "invalid_id"),
        ("", "fca_default"): ("disconnected", None),
    }
    assert headers_seen(sandbox) == {"fca_good": {"acct_1Alpha"}, "fca_default": {"acct_1Own"}}


def test_account_column_names_another_column_and_jsonl_and_sql_carry_it(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """--account-column picks the column; JSONL rows carry the field; a SQL query returns
    it as a second column."""
    ws.write("a.csv", ["owner,account_id", "acct_1Alpha,fca_a1"])
    result = ws.run("run", "--input", "a.csv", "--account-column", "owner", *FAST)
    assert result.exit_code == 0, result.stderr
    ws.write("b.jsonl", ['{"account_id": "fca_b1", "stripe_account": "acct_1Bravo"}'])
    assert ws.run("run", "--input", "b.jsonl", *FAST).exit_code == 0
    db = ws.root / "src.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (id TEXT, owner TEXT)")
        conn.execute("INSERT INTO t VALUES ('fca_c1', 'acct_1Charlie')")
        conn.commit()
    query = "SELECT id, owner AS stripe_account FROM t"
    result = ws.run("run", "--db", f"sqlite:///{db}", "--query", query, "--job", "c", *FAST)
    assert result.exit_code == 0, result.stderr
    assert headers_seen(sandbox) == {
        "fca_a1": {"acct_1Alpha"},
        "fca_b1": {"acct_1Bravo"},
        "fca_c1": {"acct_1Charlie"},
    }
    missing = ws.run("run", "--input", "a.csv", "--account-column", "nope", *FAST)
    assert missing.exit_code == 2
    assert "no column 'nope'" in missing.stderr


V3_ACCOUNTS = """
CREATE TABLE accounts (
    job TEXT NOT NULL, account_id TEXT NOT NULL, outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, http_status INTEGER, error_code TEXT,
    error_message TEXT, request_id TEXT, first_attempt_at REAL, updated_at REAL, run_id TEXT,
    claim_gen INTEGER NOT NULL DEFAULT 0, confirmed_at REAL, event_id TEXT,
    UNIQUE (job, account_id)
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '3');
"""


def test_a_job_planned_by_the_previous_version_resumes(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A layout-3 store (before connected accounts): its rows are the job's own, resumed
    under the run's --stripe-account with the keys they always had, in input order."""
    ids = ws.ids(6)
    state = ws.state("old")
    state.parent.mkdir()
    with contextlib.closing(sqlite3.connect(state)) as db:
        db.executescript(V3_ACCOUNTS)
        db.executemany(
            "INSERT INTO accounts (job, account_id, outcome) VALUES ('old', ?, ?)",
            [(i, "disconnected" if n < 2 else None) for n, i in enumerate(ids)],
        )
        db.commit()
    ws.write("old.txt", ids)
    result = ws.run("run", "--input", "old.txt", "--stripe-account", "acct_1Old", *FAST)
    assert result.exit_code == 0, result.stderr
    journal = sandbox.sandbox.journal_snapshot()
    assert [e.account_id for e in journal] == ids[2:]
    assert {(e.stripe_account, e.idempotency_key) for e in journal} == {
        ("acct_1Old", idempotency_key("old", i)) for i in ids[2:]
    }
    assert stored(ws, "old") == {("", i): ("disconnected", None) for i in ids}
