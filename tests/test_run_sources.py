"""The run's other sources and its safety rails, end to end through the CLI."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, Workspace

# Built at run time so no live-looking key is ever committed (secret scanners flag them).
LIVE_KEY = "sk_" + "live_" + "51NotARealKeyButLiveShaped"


def disconnects(sandbox: SandboxThread) -> list[str]:
    """Accounts the server was asked to disconnect, in order."""
    return [
        e.account_id
        for e in sandbox.sandbox.journal_snapshot()
        if e.method == "POST" and e.account_id
    ]


def list_calls(sandbox: SandboxThread) -> int:
    """How many list requests reached the server."""
    return sum(1 for e in sandbox.sandbox.journal_snapshot() if e.method == "GET")


def make_sqlite(ws: Workspace, ids: list[str]) -> str:
    """A customer database with offboarding dates; returns its URL."""
    path = ws.root / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE bank (id INTEGER PRIMARY KEY, fca TEXT, offboarded_days INT)")
        db.executemany(
            "INSERT INTO bank (fca, offboarded_days) VALUES (?, ?)",
            [(account, 100 if n % 2 == 0 else 10) for n, account in enumerate(ids)],
        )
    return f"sqlite:///{path}"


QUERY = "SELECT fca FROM bank WHERE offboarded_days > :days ORDER BY id"


def test_sql_source_disconnects_what_the_query_yields(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A SQLite query with a bound parameter decides which accounts are disconnected."""
    ids = ws.ids(10)
    url = make_sqlite(ws, ids)
    result = ws.run(
        "run", "--db", url, "--query", QUERY, "--param", "days=90", "--job", "purge", *FAST
    )
    assert result.exit_code == 0, result.stderr
    assert disconnects(sandbox) == ids[0::2]
    assert ws.outcomes("purge") == dict.fromkeys(ids[0::2], "disconnected")


def test_sql_source_reads_the_account_id_column_not_the_first(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A query returning another fca_ column first disconnects the account_id column's
    accounts; with no such column and several to choose from, it exits 2 calling nothing."""
    ids = ws.ids(6)
    url = make_sqlite(ws, ids)
    query = "SELECT 'fca_other' || id AS old_account_id, fca AS account_id FROM bank ORDER BY id"
    result = ws.run("run", "--db", url, "--query", query, "--job", "pick", *FAST)
    assert result.exit_code == 0, result.stderr
    assert disconnects(sandbox) == ids
    ambiguous = "SELECT 'fca_other' || id AS old_id, fca FROM bank"
    refused = ws.run("run", "--db", url, "--query", ambiguous, "--job", "amb", *FAST)
    assert refused.exit_code == 2
    assert "(columns: old_id, fca)" in refused.stderr
    assert "--column" in refused.stderr
    assert disconnects(sandbox) == ids


def test_an_empty_id_is_recorded_invalid_in_every_source(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """An empty or NULL ID in a SQL row, or an empty CSV cell, is recorded invalid_id (shown
    empty) and the rest of the job runs; the run exits 1."""
    ids = ws.ids(4)
    url = make_sqlite(ws, ids)
    with sqlite3.connect(ws.root / "app.db") as db:
        db.execute("INSERT INTO bank (fca, offboarded_days) VALUES (NULL, 1), ('', 1)")
    sql = ws.run("run", "--db", url, "--query", "SELECT fca FROM bank", "--job", "s", *FAST)
    (ws.root / "ids.csv").write_text(f"account_id,n\n{ids[0]},1\n,2\n")
    csv = ws.run("run", "--input", "ids.csv", "--job", "c", *FAST)
    for job, result, good in (("s", sql, ids), ("c", csv, ids[:1])):
        assert result.exit_code == 1, result.stderr
        assert ws.outcomes(job) == {**dict.fromkeys(good, "disconnected"), "": "invalid_id"}


@pytest.fixture
def pg_table(pg_url: str) -> Iterator[str]:
    """A uniquely named PostgreSQL table, dropped afterwards."""
    import anyio

    name = f"bd_run_{uuid.uuid4().hex[:12]}"

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    anyio.run(sql, f"CREATE TABLE {name} (id serial PRIMARY KEY, fca text, days int)")
    try:
        yield name
    finally:
        anyio.run(sql, f"DROP TABLE IF EXISTS {name}")


def test_postgres_source_from_a_job_file(
    ws: Workspace, sandbox: SandboxThread, pg_table: str, pg_url: str
) -> None:
    """A retention-purge job file with a PostgreSQL query and a params table runs end to end."""
    import anyio

    ids = ws.ids(6)

    async def fill() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.executemany(
                f"INSERT INTO {pg_table} (fca, days) VALUES ($1, $2)",  # noqa: S608 - test table
                [(account, 200) for account in ids],
            )
        finally:
            await conn.close()

    anyio.run(fill)
    query = "SELECT fca FROM " + pg_table + " WHERE days > :days::int ORDER BY id"  # noqa: S608
    (ws.root / "retention.toml").write_text(
        f'db = "{pg_url}"\nquery = "{query}"\n[params]\ndays = 90\n'
    )
    result = ws.run("run", "retention.toml", *FAST)
    assert result.exit_code == 0, result.stderr
    assert disconnects(sandbox) == ids
    assert set(ws.outcomes("retention").values()) == {"disconnected"}


def test_a_broken_query_is_exit_2_before_any_call(ws: Workspace, sandbox: SandboxThread) -> None:
    """A query error is one line, exit 2, nothing called and nothing stored."""
    url = make_sqlite(ws, ws.ids(3))
    result = ws.run("run", "--db", url, "--query", "SELEC nope", "--job", "purge", *FAST)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert sandbox.sandbox.journal_snapshot() == []
    assert not ws.state("purge").exists()


def test_max_accounts_refuses_a_large_plan_and_leaves_the_job_untouched(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """More accounts to call than --max-accounts: exit 2, no call, no account planned."""
    ws.write("ids.txt", ws.ids(20))
    refused = ws.run("run", "--input", "ids.txt", "--max-accounts", "19", *FAST)
    assert refused.exit_code == 2
    assert "--max-accounts 19" in refused.stderr
    assert sandbox.sandbox.journal_snapshot() == []
    assert ws.outcomes("ids") == {}
    assert ws.run("run", "--input", "ids.txt", "--max-accounts", "20", *FAST).exit_code == 0
    assert len(disconnects(sandbox)) == 20


def test_a_live_key_needs_yes(ws: Workspace, sandbox: SandboxThread) -> None:
    """A live key without --yes (and nobody to ask) is refused before any call; --yes goes."""
    sandbox.sandbox.configure(livemode_accounts=True)
    ws.write("ids.txt", ws.ids(4))
    env = ws.env(STRIPE_API_KEY=LIVE_KEY)
    refused = ws.run("run", "--input", "ids.txt", *FAST, env=env)
    assert refused.exit_code == 2
    assert "--yes" in refused.stderr
    assert LIVE_KEY not in refused.stderr
    assert sandbox.sandbox.journal_snapshot() == []
    assert ws.outcomes("ids") == {}
    confirmed = ws.run("run", "--input", "ids.txt", "--yes", *FAST, env=env)
    assert confirmed.exit_code == 0, confirmed.stderr
    assert len(disconnects(sandbox)) == 4


def test_plan_reads_everything_and_disconnects_nothing(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """`plan` prints what a run would do, without any disconnect and without storing it."""
    ids = ws.ids(6)
    ws.write("ids.txt", [*ids, ids[0], "junk"])
    result = ws.run("plan", "--input", "ids.txt", env={})
    assert result.exit_code == 0, result.stderr
    assert "read 8, invalid 1, duplicates 1, already done 0, to call 6" in result.stdout
    assert sandbox.sandbox.journal_snapshot() == []
    assert not ws.state("ids").exists()


def test_customers_source_lists_and_disconnects_and_is_resumable(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Customers' accounts are listed, the active ones disconnected, the disconnected ones
    recorded without a call; a rerun lists no customer again."""
    sandbox.sandbox.configure(accounts_per_customer=3, disconnected_per_customer=1)
    (ws.root / "customers.txt").write_text("cus_b\n# offboarded last week\ncus_c\n")
    result = ws.run(
        "run", "--customer", "cus_a", "--customers", "customers.txt", "--job", "off", *FAST
    )
    assert result.exit_code == 0, result.stderr
    assert list_calls(sandbox) == 3
    assert sorted(disconnects(sandbox)) == sorted(
        f"fca_{c}a{i}" for c in ("a", "b", "c") for i in (1, 2)
    )
    outcomes = ws.outcomes("off")
    assert len(outcomes) == 9
    assert set(outcomes.values()) == {"disconnected"}
    settled = [r for r in ws.rows("off") if r["attempts"] == 0]
    assert sorted(r["account_id"] for r in settled) == ["fca_aa0", "fca_ba0", "fca_ca0"]

    sandbox.sandbox.reset()
    again = ws.run(
        "run", "--customer", "cus_a", "--customers", "customers.txt", "--job", "off", *FAST
    )
    assert again.exit_code == 0, again.stderr
    assert sandbox.sandbox.journal_snapshot() == []


def test_unknown_customer_is_exit_2_before_any_disconnect(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A customer Stripe does not know stops the plan: exit 2, no disconnect, nothing stored."""
    sandbox.sandbox.configure(missing=frozenset({"cus_gone"}))
    result = ws.run("run", "--customer", "cus_a", "--customer", "cus_gone", "--job", "off", *FAST)
    assert result.exit_code == 2
    assert "cus_gone" in result.stderr
    assert disconnects(sandbox) == []
    assert ws.outcomes("off") == {}


@pytest.mark.parametrize("answer", [True, False])
def test_a_live_key_asks_the_operator_with_the_count(
    ws: Workspace, sandbox: SandboxThread, answer: bool
) -> None:
    """On a terminal a live key asks once, showing the count; no means exit 2 and no call."""
    import io

    import anyio

    from bulkdisconnect.config import build_run_config
    from bulkdisconnect.errors import UsageError
    from bulkdisconnect.job import RunHooks, run_job

    sandbox.sandbox.configure(livemode_accounts=True)
    ws.write("ids.txt", ws.ids(7))
    config = build_run_config(
        {"input": str(ws.root / "ids.txt"), "state": str(ws.root / "s.sqlite"), "retry_delay": 0},
        None,
        ws.env(STRIPE_API_KEY=LIVE_KEY),
    )
    questions: list[str] = []

    def confirm(question: str) -> bool:
        questions.append(question)
        return answer

    hooks = RunHooks(out=io.StringIO(), progress=False, confirm=confirm)
    if answer:
        assert anyio.run(run_job, config, hooks) == 0
        assert len(disconnects(sandbox)) == 7
    else:
        with pytest.raises(UsageError, match="live key"):
            anyio.run(run_job, config, hooks)
        assert disconnects(sandbox) == []
    assert len(questions) == 1
    assert "7 accounts" in questions[0]
    assert "LIVE" in questions[0]
