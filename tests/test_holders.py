"""Offboarding connected accounts: --holder-account / --holder-accounts list the accounts each
one holds under its own Stripe-Account and disconnect them under it; a --customers CSV names
each customer's connected account. End to end through the CLI against the loopback sandbox,
whose `accounts` knob makes each account exist only for the Stripe account owning it."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bulkdisconnect.config import CustomerList, build_run_config
from bulkdisconnect.errors import UsageError
from bulkdisconnect.sandbox import LIST_ROUTE, JournalEntry, SandboxThread
from tests.support import API_KEY, FAST, Workspace

ALPHA, BRAVO = "acct_1Alpha", "acct_2Bravo"
FAST_RATE = [*FAST, "--rate", "1000"]


def holder_ids(holder: str, count: int) -> list[str]:
    """The sandbox's IDs of a connected account's implicit accounts: fca_<suffix>h<i>."""
    return [f"fca_{holder[5:]}h{i}" for i in range(count)]


def customer_ids(customer: str, count: int) -> list[str]:
    """The sandbox's IDs of a customer's implicit accounts: fca_<suffix>a<i>."""
    return [f"fca_{customer[4:]}a{i}" for i in range(count)]


def list_calls(sandbox: SandboxThread) -> list[tuple[dict[str, str], str | None]]:
    """(query, Stripe-Account header) of each list request, in arrival order."""
    return [
        ({k: v[0] for k, v in parse_qs(urlsplit(e.path).query).items()}, e.stripe_account)
        for e in journal(sandbox)
        if e.method == "GET" and e.path.startswith(LIST_ROUTE)
    ]


def journal(sandbox: SandboxThread) -> list[JournalEntry]:
    """The sandbox's journal in arrival order."""
    return sorted(sandbox.sandbox.journal_snapshot(), key=lambda e: e.at)


def disconnect_headers(sandbox: SandboxThread) -> dict[str, set[str | None]]:
    """account ID -> the Stripe-Account headers its disconnects were sent with."""
    seen: dict[str, set[str | None]] = defaultdict(set)
    for entry in journal(sandbox):
        if entry.method == "POST" and entry.account_id:
            seen[entry.account_id].add(entry.stripe_account)
    return seen


def stored(ws: Workspace, job: str) -> dict[tuple[str, str], tuple[str | None, int]]:
    """(stripe_account, account_id) -> (outcome, attempts), straight from the store's file."""
    with contextlib.closing(sqlite3.connect(ws.state(job))) as db:
        rows = db.execute(
            "SELECT stripe_account, account_id, outcome, attempts FROM accounts WHERE job = ?",
            (job,),
        ).fetchall()
    return {(a, i): (o, n) for a, i, o, n in rows}


def remembered(ws: Workspace, job: str) -> set[str]:
    """The holders the job's book remembers as listed (the store's customers table)."""
    with contextlib.closing(sqlite3.connect(ws.state(job))) as db:
        rows = db.execute("SELECT customer_id FROM customers WHERE job = ?", (job,)).fetchall()
    return {row[0] for row in rows}


def test_holder_accounts_are_listed_and_disconnected_under_their_own_header(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Two connected accounts (a flag and a file) are each listed page by page under their own
    Stripe-Account, every active account is disconnected under its holder's header and none
    under another's, those listed disconnected are recorded without a call, and a rerun lists
    nothing again."""
    per_holder, born_disconnected = 210, 5  # three pages each: 100, 100, 10
    owners = {i: h for h in (ALPHA, BRAVO) for i in holder_ids(h, per_holder)}
    sandbox.sandbox.configure(
        accounts=owners,
        accounts_per_customer=per_holder,
        disconnected_per_customer=born_disconnected,
    )
    ws.write("holders.txt", ["# offboarded in November", BRAVO])
    args = ["--holder-account", ALPHA, "--holder-accounts", "holders.txt", "--job", "off"]
    result = ws.run("run", *args, *FAST_RATE)
    assert result.exit_code == 0, result.stderr

    calls = list_calls(sandbox)
    for holder in (ALPHA, BRAVO):
        mine = [(q, h) for q, h in calls if q.get("account_holder[account]") == holder]
        assert [q.get("starting_after") for q, _ in mine] == [
            None,
            f"fca_{holder[5:]}h99",
            f"fca_{holder[5:]}h199",
        ]
        assert {h for _, h in mine} == {holder}
        assert all("account_holder[customer]" not in q for q, _ in mine)
    assert len(calls) == 6
    assert disconnect_headers(sandbox) == {
        i: {h} for i, h in owners.items() if int(i.rsplit("h", 1)[1]) >= born_disconnected
    }
    rows = stored(ws, "off")
    assert set(rows) == {(h, i) for i, h in owners.items()}
    assert {outcome for outcome, _ in rows.values()} == {"disconnected"}
    settled = {i for (_, i), (_, attempts) in rows.items() if attempts == 0}
    assert settled == {i for h in (ALPHA, BRAVO) for i in holder_ids(h, born_disconnected)}
    assert remembered(ws, "off") == {ALPHA, BRAVO}

    sandbox.sandbox.reset()
    again = ws.run("run", *args, *FAST_RATE)
    assert again.exit_code == 0, again.stderr
    assert journal(sandbox) == []


def test_customers_csv_lists_each_customer_under_its_connected_account(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A customers CSV with a stripe_account column lists each customer under that header (an
    empty cell: the run's --stripe-account) and disconnects its accounts under it; the store
    keeps each under its connected account ('' for the run's own); a rerun lists nothing."""
    own = "acct_9Own"
    customers = {"cus_a": ALPHA, "cus_b": "", "cus_c": BRAVO, "cus_d": ALPHA}
    owners = {i: o or own for c, o in customers.items() for i in customer_ids(c, 3)}
    sandbox.sandbox.configure(accounts=owners, accounts_per_customer=3, disconnected_per_customer=1)
    ws.write(
        "customers.csv",
        ["customer_id,stripe_account", *(f"{c},{o}" for c, o in customers.items())],
    )
    args = ["--customers", "customers.csv", "--stripe-account", own, "--job", "off"]
    result = ws.run("run", *args, *FAST_RATE)
    assert result.exit_code == 0, result.stderr

    assert [(q["account_holder[customer]"], h) for q, h in list_calls(sandbox)] == [
        (c, o or own) for c, o in customers.items()
    ]
    assert disconnect_headers(sandbox) == {
        i: {h} for i, h in owners.items() if not i.endswith("a0")
    }
    rows = stored(ws, "off")
    assert set(rows) == {(o, i) for c, o in customers.items() for i in customer_ids(c, 3)}
    assert {outcome for outcome, _ in rows.values()} == {"disconnected"}
    assert {i for (_, i), (_, n) in rows.items() if n == 0} == {f"fca_{c[4:]}a0" for c in customers}
    assert remembered(ws, "off") == {
        "acct_1Alpha/cus_a",
        "cus_b",
        "acct_2Bravo/cus_c",
        "acct_1Alpha/cus_d",
    }

    sandbox.sandbox.reset()
    again = ws.run("run", *args, *FAST_RATE)
    assert again.exit_code == 0, again.stderr
    assert journal(sandbox) == []


def test_customers_and_holder_accounts_in_one_run(ws: Workspace, sandbox: SandboxThread) -> None:
    """Plain customer IDs and a holder account go together in one run, each under its header."""
    ws.write("customers.txt", ["cus_p"])
    result = ws.run(
        "run", "--customers", "customers.txt", "--holder-account", ALPHA, "--job", "mix", *FAST_RATE
    )
    assert result.exit_code == 0, result.stderr
    assert [(next(iter(q.items())), h) for q, h in list_calls(sandbox)] == [
        (("account_holder[customer]", "cus_p"), None),
        (("account_holder[account]", ALPHA), ALPHA),
    ]
    assert set(stored(ws, "mix")) == {
        *(("", i) for i in customer_ids("cus_p", 3)),
        *((ALPHA, i) for i in holder_ids(ALPHA, 3)),
    }


def test_a_revoked_holder_is_refused_alone_and_listed_again_by_a_rerun(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A connected account that revoked the platform's access answers its list call with 403
    account_invalid: nothing of it is disconnected, the others are, the run says so and exits
    1; once access is back, a rerun lists only that account and finishes it."""
    gone = "acct_3Gone"
    sandbox.sandbox.configure(revoked_accounts=frozenset({gone}))
    args = ["--holder-account", ALPHA, "--holder-account", gone, "--job", "off"]
    result = ws.run("run", *args, *FAST_RATE)
    assert result.exit_code == 1, result.stderr
    assert f"stopped for {gone}: listing its accounts: account_invalid" in result.stdout
    assert [(q["account_holder[account]"], h) for q, h in list_calls(sandbox)] == [
        (ALPHA, ALPHA),
        (gone, gone),
    ]
    assert disconnect_headers(sandbox) == {i: {ALPHA} for i in holder_ids(ALPHA, 3)}
    assert remembered(ws, "off") == {ALPHA}

    sandbox.sandbox.reset()
    sandbox.sandbox.configure(revoked_accounts=frozenset())
    again = ws.run("run", *args, *FAST_RATE)
    assert again.exit_code == 0, again.stderr
    assert [(q["account_holder[account]"], h) for q, h in list_calls(sandbox)] == [(gone, gone)]
    assert disconnect_headers(sandbox) == {i: {gone} for i in holder_ids(gone, 3)}
    assert {outcome for outcome, _ in stored(ws, "off").values()} == {"disconnected"}


def test_an_unknown_holder_account_is_exit_2_before_any_disconnect(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A connected account Stripe does not know stops the plan: exit 2 naming it, no
    disconnect, nothing stored."""
    sandbox.sandbox.configure(missing=frozenset({"acct_404"}))
    result = ws.run("run", "--holder-account", ALPHA, "--holder-account", "acct_404", "--job", "j")
    assert result.exit_code == 2
    assert "no such connected account acct_404" in result.stderr
    assert disconnect_headers(sandbox) == {}
    assert stored(ws, "j") == {}


def test_plan_lists_holders_without_disconnecting(ws: Workspace, sandbox: SandboxThread) -> None:
    """`plan --holder-account` makes the list calls and prints the count, calling nothing else."""
    sandbox.sandbox.configure(accounts_per_customer=4, disconnected_per_customer=1)
    result = ws.run("plan", "--holder-account", ALPHA, "--job", "j")
    assert result.exit_code == 0, result.stderr
    assert "read 4, invalid 0, duplicates 0, already done 0, to call 3" in result.stdout
    assert [h for _, h in list_calls(sandbox)] == [ALPHA]
    assert disconnect_headers(sandbox) == {}
    assert not ws.state("j").exists()


@pytest.mark.parametrize(
    ("args", "files", "message"),
    [
        (
            ["--holder-account", "acct_a-b"],
            {},
            "--holder-account must be Stripe account IDs (acct_...), got 'acct_a-b'",
        ),
        (
            ["--holder-account", "cus_a"],
            {},
            "--holder-account must be Stripe account IDs (acct_...), got 'cus_a'",
        ),
        (
            ["--holder-accounts", "holders.txt"],
            {"holders.txt": "acct_1A\nfca_notanaccount\n"},
            "holders.txt, line 2: 'fca_notanaccount' is not a Stripe account ID",
        ),
        (
            ["--holder-accounts", "absent.txt"],
            {},
            "holder accounts file not found: absent.txt",
        ),
        (
            ["--customers", "customers.csv"],
            {"customers.csv": "customer_id,stripe_account\ncus_a,acct_1\ncus_b,acct_b/../x\n"},
            "customers.csv, line 3: 'acct_b/../x' is not a Stripe account ID",
        ),
        (
            ["--customers", "customers.csv"],
            {"customers.csv": "customer_id,stripe_account\nacct_1,cus_a\n"},
            "customers.csv, line 2: 'cus_a' is not a Stripe account ID",
        ),
        (
            ["--holder-account", ALPHA, "--input", "ids.txt"],
            {"ids.txt": "fca_1\n"},
            "give one source, not --input and --holder-account/--holder-accounts",
        ),
    ],
)
def test_bad_holder_input_is_a_one_line_exit_2(
    ws: Workspace, sandbox: SandboxThread, args: list[str], files: dict[str, str], message: str
) -> None:
    """A malformed acct_ ID in a flag or a file (or a second source) is one line on stderr,
    exit 2, before any call and without a store."""
    for name, text in files.items():
        (ws.root / name).write_text(text, encoding="utf-8")
    result = ws.run("run", *args, "--job", "bad", *FAST)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"bulkdisconnect: error: {message}")
    assert result.stderr.count("\n") == 1
    assert journal(sandbox) == []
    assert not ws.state("bad").exists()


def test_holder_accounts_from_a_job_file(tmp_path: Path) -> None:
    """A job file may name holder accounts (one or a list) and a file of them; they build the
    one listing source together with customers."""
    job = tmp_path / "offboard.toml"
    job.write_text(
        f'holder_account = ["{ALPHA}", "{BRAVO}"]\nholder_accounts = "more.txt"\n'
        'customer = "cus_a"\n',
        encoding="utf-8",
    )
    env = {"STRIPE_API_KEY": API_KEY}
    config = build_run_config({}, job, env)
    assert config.job == "offboard"
    assert config.source == CustomerList(("cus_a",), None, (ALPHA, BRAVO), "more.txt")
    job.write_text('holder_account = "acct_x y"\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"holder_account in .*offboard.toml must be Stripe acc"):
        build_run_config({}, job, env)
    with pytest.raises(UsageError, match="--job is required"):
        build_run_config({"holder_account": (ALPHA,)}, None, env)
