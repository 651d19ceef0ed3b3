"""End to end: the CLI against the loopback sandbox, checked through its journal and the store."""

from __future__ import annotations

import gzip
import json
import socket
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path

from bulkdisconnect.model import idempotency_key
from bulkdisconnect.sandbox import SandboxThread, max_concurrent, max_in_window
from tests.support import API_KEY, FAST, Workspace

DISCONNECT = "/v1/financial_connections/accounts/{}/disconnect"


def calls(sandbox: SandboxThread) -> Counter[str]:
    """Disconnect requests per account, as the server saw them."""
    return Counter(e.account_id for e in sandbox.sandbox.journal_snapshot() if e.account_id)


def test_every_account_is_disconnected_once_and_recorded(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A clean run calls each account once, records `disconnected` for all, and exits 0."""
    ids = ws.ids(50)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--rate", "1000", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    assert calls(sandbox) == Counter(ids)
    assert "disconnected 50" in result.stdout


def test_requests_carry_stripes_headers(ws: Workspace, sandbox: SandboxThread) -> None:
    """Each request is a form POST with an empty body, Bearer auth, pinned version, our UA."""
    ws.write("ids.txt", ["fca_one"])
    result = ws.run("run", "--input", "ids.txt", "--stripe-account", "acct_123", *FAST)
    assert result.exit_code == 0, result.stderr
    (entry,) = sandbox.sandbox.journal_snapshot()
    assert entry.method == "POST"
    assert entry.path == DISCONNECT.format("fca_one")
    assert entry.content_type == "application/x-www-form-urlencoded"
    assert entry.authorized
    assert entry.stripe_account == "acct_123"
    assert entry.stripe_version
    assert entry.user_agent is not None
    assert entry.user_agent.startswith("bulkdisconnect/")
    assert entry.idempotency_key == idempotency_key("ids", "fca_one")


def test_unknown_accounts_end_not_found(ws: Workspace, sandbox: SandboxThread) -> None:
    """404 resource_missing is final: recorded not_found, called once, and the run exits 0."""
    ids = ws.ids(20)
    sandbox.sandbox.configure(missing=frozenset(ids[:3]))
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", *FAST, "--rate", "1000")
    assert result.exit_code == 0, result.stderr
    outcomes = ws.outcomes("ids")
    assert [outcomes[i] for i in ids[:3]] == ["not_found"] * 3
    assert calls(sandbox) == Counter(ids)
    row = next(r for r in ws.rows("ids") if r["account_id"] == ids[0])
    assert (row["http_status"], row["error_code"]) == (404, "resource_missing")


def test_hostile_and_invalid_ids_are_recorded_but_never_sent(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Values that are not plain account IDs end invalid_id, never reach any URL, exit 1."""
    hostile = [
        "fca_../../v1/customers",
        "fca_1?expand[]=x",
        "fca_a%2Fb",
        "fca_a/../b",
        "cus_123",
        "fca_ä",
    ]
    ws.write("ids.txt", ["fca_good1", *hostile, "fca_good2"])
    result = ws.run("run", "--input", "ids.txt", *FAST)
    assert result.exit_code == 1
    # The summary names what happened (no account failed: some were invalid).
    assert "exit code 1 (some accounts failed or were invalid)" in result.stdout
    outcomes = ws.outcomes("ids")
    assert {v: outcomes[v] for v in hostile} == dict.fromkeys(hostile, "invalid_id")
    paths = [e.path for e in sandbox.sandbox.journal_snapshot()]
    assert sorted(paths) == sorted(DISCONNECT.format(i) for i in ("fca_good1", "fca_good2"))


def test_duplicates_are_called_once(ws: Workspace, sandbox: SandboxThread) -> None:
    """An ID repeated in the input is called and recorded once."""
    ids = ws.ids(10)
    ws.write("ids.txt", ids + ids + ids[:5])
    result = ws.run("run", "--input", "ids.txt", *FAST)
    assert result.exit_code == 0, result.stderr
    assert calls(sandbox) == Counter(ids)
    assert "duplicates 15" in result.stdout


def test_every_input_format_gives_the_same_result(ws: Workspace, sandbox: SandboxThread) -> None:
    """.txt, .csv, .jsonl, their .gz forms and stdin yield the same accounts and outcomes."""
    ids = ws.ids(12)
    (ws.root / "a.txt").write_text("\n".join(ids) + "\n")
    (ws.root / "b.csv").write_text("name,account_id\n" + "".join(f"x,{i}\n" for i in ids))
    (ws.root / "c.jsonl").write_text("".join(json.dumps({"account_id": i}) + "\n" for i in ids))
    with gzip.open(ws.root / "d.csv.gz", "wt") as f:
        f.write("account_id\n" + "\n".join(ids) + "\n")
    with gzip.open(ws.root / "e.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"id": i}) + "\n" for i in ids))
    with gzip.open(ws.root / "f.txt.gz", "wt") as f:
        f.write("\n".join(ids) + "\n")
    runs = {
        "a": ["--input", "a.txt"],
        "b": ["--input", "b.csv"],
        "c": ["--input", "c.jsonl"],
        "d": ["--input", "d.csv.gz"],
        "e": ["--input", "e.jsonl.gz", "--column", "id"],
        "f": ["--input", "f.txt.gz"],
        "stdin": ["--input", "-", "--job", "stdin"],
    }
    for job, args in runs.items():
        stdin = ("\n".join(ids) + "\n").encode() if job == "stdin" else None
        result = ws.run("run", *args, *FAST, stdin=stdin)
        assert result.exit_code == 0, (job, result.stderr)
        assert ws.outcomes(job) == dict.fromkeys(ids, "disconnected"), job
    assert calls(sandbox) == Counter({i: len(runs) for i in ids})


def test_retries_keep_one_idempotency_key_per_account(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """5xx, 429, lock timeouts and dropped connections are retried with the account's one key."""
    ids = ws.ids(40)
    sandbox.sandbox.configure(p500=0.15, p429=0.1, p_lock_timeout=0.05, p_drop=0.05, seed=3)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--max-attempts", "12", *FAST, "--rate", "1000")
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    keys: defaultdict[str, set[str | None]] = defaultdict(set)
    for entry in sandbox.sandbox.journal_snapshot():
        assert entry.account_id is not None
        keys[entry.account_id].add(entry.idempotency_key)
    assert all(keys[i] == {idempotency_key("ids", i)} for i in ids)
    assert len({idempotency_key("ids", i) for i in ids}) == len(ids)
    assert sum(calls(sandbox).values()) > len(ids)  # some were retried
    attempts = {r["account_id"]: r["attempts"] for r in ws.rows("ids")}
    assert attempts == calls(sandbox)


def test_exhausted_retries_end_failed_and_retry_failed_reuses_the_key(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Exhausted retries end failed (exit 1); --retry-failed calls them again with the same key."""
    ids = ws.ids(5)
    sandbox.sandbox.configure(p500=1.0)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--max-attempts", "3", *FAST)
    assert result.exit_code == 1
    rows = {r["account_id"]: r for r in ws.rows("ids")}
    assert {i: (rows[i]["outcome"], rows[i]["attempts"]) for i in ids} == dict.fromkeys(
        ids, ("failed", 3)
    )
    assert rows[ids[0]]["http_status"] == 500
    assert rows[ids[0]]["error_code"] == "api_error"  # a 500 carries a type but no code
    assert rows[ids[0]]["error_message"].startswith("gave up after 3 attempts")

    again = ws.run("run", "--input", "ids.txt", *FAST)
    assert again.exit_code == 1
    assert sum(calls(sandbox).values()) == 15  # a plain rerun leaves failed accounts alone

    sandbox.sandbox.configure(p500=0.0)
    retried = ws.run("run", "--input", "ids.txt", "--retry-failed", *FAST)
    assert retried.exit_code == 0, retried.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    keys = {e.idempotency_key for e in sandbox.sandbox.journal_snapshot() if e.account_id == ids[0]}
    assert keys == {idempotency_key("ids", ids[0])}


def test_rerun_of_a_finished_job_makes_no_call(ws: Workspace, sandbox: SandboxThread) -> None:
    """A second run of a finished job reads the input, finds everything done, calls nothing."""
    ids = ws.ids(30)
    ws.write("ids.txt", ids)
    assert ws.run("run", "--input", "ids.txt", *FAST, "--rate", "1000").exit_code == 0
    sandbox.sandbox.reset()
    again = ws.run("run", "--input", "ids.txt", *FAST)
    assert again.exit_code == 0
    assert sandbox.sandbox.journal_snapshot() == []
    assert "already done 30" in again.stdout
    assert "to call 0" in again.stdout


def test_revoked_key_aborts_at_once_with_nothing_failed(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A 401 stops the run at once (exit 5), marks nothing failed; a rerun after the fix resumes."""
    ids = ws.ids(200)
    sandbox.sandbox.configure(revoke_after=20)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--rate", "1000", "--concurrency", "4", *FAST)
    assert result.exit_code == 5
    assert "401" in result.stderr
    assert API_KEY not in result.stderr + result.stdout
    outcomes = ws.outcomes("ids")
    assert "failed" not in outcomes.values()
    assert list(outcomes.values()).count("disconnected") <= 20
    assert sum(calls(sandbox).values()) < 40  # stopped at once, not after every account

    sandbox.sandbox.reset()
    sandbox.sandbox.configure(revoke_after=None)
    again = ws.run("run", "--input", "ids.txt", "--rate", "1000", *FAST)
    assert again.exit_code == 0, again.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    already = {i for i, n in calls(sandbox).items() if n}
    assert len(already) == 200 - list(outcomes.values()).count("disconnected")


def test_a_bad_key_is_refused_before_any_account_is_marked(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A key the API does not know exits 5 and leaves every account pending."""
    sandbox.sandbox.configure(api_key="sk_test_theRightOne")
    ws.write("ids.txt", ws.ids(10))
    result = ws.run("run", "--input", "ids.txt", *FAST)
    assert result.exit_code == 5
    assert set(ws.outcomes("ids").values()) == {None}


def test_wrong_mode_key_is_refused(ws: Workspace, sandbox: SandboxThread) -> None:
    """A test key against live-mode accounts exits 5, naming the mode, with nothing recorded."""
    sandbox.sandbox.configure(livemode_accounts=True)
    ws.write("ids.txt", ws.ids(10))
    result = ws.run("run", "--input", "ids.txt", *FAST)
    assert result.exit_code == 5
    assert "live mode" in result.stderr
    assert set(ws.outcomes("ids").values()) == {None}


def test_breaker_trips_on_mostly_unknown_accounts_and_a_rerun_calls_them_again(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """All-404 answers trip the breaker (exit 5) and are not kept; after the fix they are redone."""
    ids = ws.ids(300)
    # The wrong connected account: none of the IDs exist there.
    sandbox.sandbox.configure(accounts=frozenset())
    ws.write("ids.txt", ids)
    result = ws.run(
        "run",
        "--input",
        "ids.txt",
        "--stripe-account",
        "acct_wrong",
        "--breaker-min-sample",
        "50",
        "--rate",
        "1000",
        *FAST,
    )
    assert result.exit_code == 5
    assert "breaker" in result.stderr
    assert "not_found" not in ws.outcomes("ids").values()
    first = calls(sandbox)
    assert sum(first.values()) < 150

    # The fix: no --stripe-account (a new idempotency scope, so nothing is replayed).
    sandbox.sandbox.configure(accounts=None)
    again = ws.run(
        "run", "--input", "ids.txt", "--breaker-min-sample", "50", "--rate", "1000", *FAST
    )
    assert again.exit_code == 0, again.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    assert all(n == 2 for i, n in calls(sandbox).items() if i in first)


def test_rate_cap_holds_as_the_server_measures_it(ws: Workspace, sandbox: SandboxThread) -> None:
    """No one-second window at the server holds more requests than --rate, from the first second."""
    ids = ws.ids(45)
    ws.write("ids.txt", ids)
    # A separate process: a client sharing the sandbox's GIL could delay the server's clock
    # readings and blur what it measures.
    proc = ws.spawn("run", "--input", "ids.txt", "--rate", "15", "--concurrency", "30", *FAST)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    times = [e.at for e in sandbox.sandbox.journal_snapshot()]
    assert len(times) == 45
    assert max_in_window(times, 1.0) <= 15
    assert times[-1] - times[0] >= 44 / 15 * 0.95  # and it did not run slower than needed either


def test_concurrency_caps_requests_in_flight(ws: Workspace, sandbox: SandboxThread) -> None:
    """No more than --concurrency requests are ever open at the server at once."""
    ids = ws.ids(24)
    sandbox.sandbox.configure(latency_ms=80)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--rate", "1000", "--concurrency", "3", *FAST)
    assert result.exit_code == 0, result.stderr
    journal = sandbox.sandbox.journal_snapshot()
    assert len(journal) == 24
    assert max_concurrent(journal) == 3


def test_timeouts_and_hangs_are_retried(ws: Workspace, sandbox: SandboxThread) -> None:
    """A request the server never answers times out and is retried with the same key."""
    ids = ws.ids(10)
    sandbox.sandbox.configure(p_hang=0.3, seed=5)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--timeout", "0.3", "--max-attempts", "10", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    assert any(e.fault == "hang" for e in sandbox.sandbox.journal_snapshot())


def test_dry_run_calls_nothing_and_writes_nothing(ws: Workspace, sandbox: SandboxThread) -> None:
    """--dry-run prints the plan, makes no request and leaves no account in the store."""
    ids = ws.ids(8)
    ws.write("ids.txt", [*ids, ids[0], "bad"])
    result = ws.run("run", "--input", "ids.txt", "--dry-run", env={})
    assert result.exit_code == 0, result.stderr
    assert "read 10, invalid 1, duplicates 1, already done 0, to call 8" in result.stdout
    assert sandbox.sandbox.journal_snapshot() == []
    assert not (ws.root / "state").exists()


def test_a_run_refused_before_planning_leaves_no_store(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A missing input, an unusable SQL query or a missing key exits 2 and creates no store."""
    ws.write("ids.txt", ws.ids(2))
    assert ws.run("run", "--input", "nope.txt", *FAST).exit_code == 2
    db = ws.root / "app.db"
    sqlite3.connect(db).close()
    url = f"sqlite:///{db}"
    for query in ("SELECT x FROM missing_table", "SELECT 'fca_1' AS a, 'fca_2' AS b"):
        assert ws.run("run", "--db", url, "--query", query, "--job", "q", *FAST).exit_code == 2
    assert (
        ws.run("run", "--input", "ids.txt", *FAST, env={"STRIPE_API_BASE": ws.api_base}).exit_code
        == 2
    )
    assert not (ws.root / "state").exists()
    assert sandbox.sandbox.journal_snapshot() == []


def test_an_empty_source_says_so(ws: Workspace, sandbox: SandboxThread) -> None:
    """An input with no account ID finishes 0 but says `0 accounts read` and warns."""
    ws.write("ids.txt", [])
    result = ws.run("run", "--input", "ids.txt", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "0 accounts read from ids.txt" in result.stdout
    assert "bulkdisconnect.empty_source" in result.stderr


def test_malformed_row_is_a_clear_error_with_nothing_called(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A malformed JSONL row exits 2 naming the line, before any call and with no account stored."""
    lines = [json.dumps({"account_id": i}) for i in ws.ids(5)] + ["{not json"]
    ws.write("ids.jsonl", lines)
    result = ws.run("run", "--input", "ids.jsonl", *FAST)
    assert result.exit_code == 2
    assert "line 6" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sandbox.sandbox.journal_snapshot() == []
    assert ws.outcomes("ids") == {}


def test_bad_configuration_exits_2_naming_the_key(ws: Workspace, sandbox: SandboxThread) -> None:
    """An unknown job-file key, a bad flag or a missing input exits 2 with nothing called."""
    ws.write("ids.txt", ws.ids(3))
    (ws.root / "job.toml").write_text('input = "ids.txt"\nrat = 5\n')
    unknown = ws.run("run", "job.toml", *FAST)
    assert unknown.exit_code == 2
    assert "'rat'" in unknown.stderr
    assert ws.run("run", "--input", "ids.txt", "--rate", "0", *FAST).exit_code == 2
    assert ws.run("run", "--input", "nope.txt", *FAST).exit_code == 2
    plain_http = ws.run("run", "--input", "ids.txt", "--api-base", "http://example.com", *FAST)
    assert plain_http.exit_code == 2
    assert "https" in plain_http.stderr
    assert (
        ws.run("run", "--input", "ids.txt", *FAST, env={"STRIPE_API_BASE": ws.api_base}).exit_code
        == 2
    )
    assert sandbox.sandbox.journal_snapshot() == []


def test_job_file_settings_apply_and_flags_win(ws: Workspace, sandbox: SandboxThread) -> None:
    """A job file's settings are used, its name is the job's, and flags override it."""
    ids = ws.ids(4)
    ws.write("ids.txt", ids)
    (ws.root / "purge.toml").write_text('input = "ids.txt"\nrate = 1000\nstate = "s/p.sqlite"\n')
    result = ws.run("run", "purge.toml", "--state", "s/q.sqlite", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("purge", ws.root / "s" / "q.sqlite") == dict.fromkeys(ids, "disconnected")
    assert not (ws.root / "s" / "p.sqlite").exists()


def test_report_and_status(ws: Workspace, sandbox: SandboxThread) -> None:
    """report gives one row per account in CSV and JSONL; status gives counts per outcome."""
    ids = ws.ids(6)
    sandbox.sandbox.configure(missing=frozenset(ids[:1]))
    ws.write("ids.txt", [*ids, "junk"])
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 1
    jsonl = ws.run("report", "--job", "ids")
    assert jsonl.exit_code == 0, jsonl.stderr
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [r["account_id"] for r in rows] == [*ids, "junk"]
    assert {r["outcome"] for r in rows} == {"disconnected", "not_found", "invalid_id"}
    assert set(rows[0]) >= {
        "account_id",
        "outcome",
        "attempts",
        "http_status",
        "error_code",
        "request_id",
        "updated_at",
    }
    assert rows[1]["request_id"].startswith("req_")
    out = ws.root / "r.csv"
    csv_run = ws.run("report", "--job", "ids", "--format", "csv", "--output", str(out))
    assert csv_run.exit_code == 0
    nowhere = ws.run("report", "--job", "ids", "--output", "nodir/x.csv")
    assert nowhere.exit_code == 2
    assert nowhere.stderr == (
        "bulkdisconnect: error: cannot write the report to nodir/x.csv: No such file or directory\n"
    )
    assert len(out.read_text().splitlines()) == 8
    status = ws.run("status", "--job", "ids")
    assert status.exit_code == 0
    assert "disconnected 5, not_found 1, invalid_id 1, failed 0, pending 0" in status.stdout
    assert "not running" in status.stdout
    assert ws.run("status", "--job", "other").exit_code == 2


def test_every_command_has_help_with_examples(ws: Workspace) -> None:
    """Each command answers --help with exit 0 and ends with examples; run lists its exit
    codes, and plan offers none of the options only a run uses."""
    commands = ["run", "plan", "report", "status", "webhook", "sandbox"]
    assert ws.run("--help").exit_code == 0
    for command in commands:
        result = ws.run(command, "--help")
        assert result.exit_code == 0
        assert "Usage" in result.stdout
        examples = result.stdout.split("Examples:")[-1]
        assert examples.count(f"bulkdisconnect {command}") >= 2, command
    run_help, plan_help = ws.run("run", "--help").stdout, ws.run("plan", "--help").stdout
    assert "Exit codes:" in run_help
    plan_options = plan_help.split("Options:")[1]
    for option in ("--dry-run", "--yes", "--metrics-file", "--pushgateway", "--progress"):
        assert option in run_help
        assert option not in plan_options


def test_a_job_files_column_does_not_apply_to_a_txt_input_from_the_command_line(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """The shipped example (column = "account_id") runs with --input other.txt; a --column
    flag with a .txt input stays an error."""
    example = Path(__file__).parent.parent / "jobs" / "example.toml"
    ids = ws.ids(3)
    ws.write("other.txt", ids)
    result = ws.run("run", str(example), "--input", "other.txt", "--rate", "1000", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("example") == dict.fromkeys(ids, "disconnected")
    flagged = ws.run("run", "--input", "other.txt", "--column", "account_id", *FAST)
    assert flagged.exit_code == 2
    assert "--column applies only to .csv and .jsonl inputs" in flagged.stderr


def test_an_unreachable_api_is_a_configuration_error(ws: Workspace) -> None:
    """Connection refused on every request: exit 5 naming the host, no account marked failed."""
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ids = ws.ids(30)
    ws.write("ids.txt", ids)
    env = ws.env(STRIPE_API_BASE=f"http://127.0.0.1:{port}")
    result = ws.run("run", "--input", "ids.txt", "--rate", "1000", *FAST, env=env)
    assert result.exit_code == 5, result.stderr
    assert f"cannot reach the API: Cannot connect to host 127.0.0.1:{port}" in result.stderr
    assert set(ws.outcomes("ids").values()) == {None}
