"""`reconcile` and `run --reconcile`: disconnects confirmed from Stripe's Events API, against
the loopback sandbox on a clock the tests move (events' `created`, their delay), with no
webhook server; what a rerun reads again, checked through the sandbox's journal."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkdisconnect.reconcile import CLOCK_MARGIN, EVENT_LAG
from bulkdisconnect.sandbox import DISCONNECTED, SandboxConfig, SandboxThread, drawn
from tests.support import FAST, FakeClock, Workspace, wait_for

JOB = "ids"
FASTER = ["--rate", "1000", "--retry-delay", "0", "--retry-max-delay", "0"]
SECRET = "whsec_test_0123456789abcdef"  # noqa: S105 - a test secret


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    """The clock of this module's sandbox: events are created, and shown, by it."""
    return FakeClock(time.monotonic())


@pytest.fixture(scope="module")
def running(clock: FakeClock) -> Iterator[SandboxThread]:
    """One sandbox for the module, on its clock."""
    with SandboxThread(clock=clock) as thread:
        yield thread


@pytest.fixture
def sandbox(running: SandboxThread, clock: FakeClock) -> Iterator[SandboxThread]:
    """The module's sandbox, nothing recorded, default knobs, its clock at the real time (the
    `ws` fixture runs against it)."""
    running.sandbox.config = SandboxConfig(seed=1)
    running.sandbox.reset()
    clock.advance(time.time() - running.sandbox.unix_time())
    yield running
    running.sandbox.config = SandboxConfig(seed=1)


def event_requests(sandbox: SandboxThread) -> list[dict[str, str]]:
    """Each GET /v1/events the sandbox received, in order: its query, and its Stripe-Account
    header as `header` ('' without one)."""
    listed = [e for e in sandbox.sandbox.journal_snapshot() if e.path.startswith("/v1/events")]
    return [
        {**dict(parse_qsl(urlsplit(e.path).query)), "header": e.stripe_account or ""}
        for e in sorted(listed, key=lambda e: e.at)
    ]


def report(ws: Workspace, *state: str) -> list[dict[str, Any]]:
    """The job's report rows (JSONL)."""
    result = ws.run("report", "--job", JOB, *state)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def epoch(iso: str) -> float:
    """A report timestamp as epoch seconds."""
    return datetime.fromisoformat(iso).timestamp()


def run(ws: Workspace, ids: list[str], *extra: str, name: str = "ids.txt") -> None:
    """Disconnect `ids` as job JOB (every one of them: exit 0)."""
    ws.write(name, ids)
    result = ws.run("run", "--job", JOB, "--input", name, "--rate", "1000", *FAST, *extra)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_run_then_reconcile_confirms_every_disconnect_without_a_webhook(
    ws: Workspace, sandbox: SandboxThread, kind: str, request: pytest.FixtureRequest
) -> None:
    """Each disconnected account is confirmed by its own event, read 100 a page newest first
    from a little before the first attempt; a rerun with nothing left to confirm lists nothing."""
    state = [] if kind == "sqlite" else ["--state", request.getfixturevalue("pg_state")]
    ids = ws.ids(250)
    run(ws, ids, *state)
    result = ws.run("reconcile", "--job", JOB, *state, *FASTER)
    assert result.exit_code == 0, result.stderr
    assert "confirmed 250 (already recorded 0" in result.stdout
    assert "every account a call disconnected is confirmed" in result.stdout

    events = {e.account_id: e for e in sandbox.sandbox.event_log.events()}
    rows = report(ws, *state)
    assert {r["account_id"]: r["event_id"] for r in rows} == {i: events[i].id for i in ids}
    assert all(epoch(r["confirmed_at"]) == events[r["account_id"]].created for r in rows)
    first = min(epoch(r["first_attempt_at"]) for r in rows)
    newest_first = sandbox.sandbox.event_log.events()[::-1]
    pages = event_requests(sandbox)
    assert [p.get("starting_after") for p in pages] == [
        None,
        newest_first[99].id,
        newest_first[199].id,
    ]
    for page in pages:
        assert page["type"] == DISCONNECTED
        assert page["limit"] == "100"
        assert page["created[gte]"] == str(int(first) - CLOCK_MARGIN)
        assert page["header"] == ""
    assert "confirmed 250, unconfirmed 0" in ws.run("status", "--job", JOB, *state).stdout

    again = ws.run("reconcile", "--job", JOB, *state, *FASTER)
    assert again.exit_code == 0, again.stderr
    assert "(1 had nothing left to confirm)" in again.stdout
    assert len(event_requests(sandbox)) == 3
    full = ws.run("reconcile", "--job", JOB, "--full", *state, *FASTER)
    assert full.exit_code == 0, full.stderr
    assert "confirmed 0 (already recorded 250, of accounts outside the job 0)" in full.stdout
    assert [p.get("starting_after") for p in event_requests(sandbox)[3:]] == [
        None,
        newest_first[99].id,
        newest_first[199].id,
    ]


def test_late_events_are_read_by_the_next_reconcile_without_the_older_pages(
    ws: Workspace, sandbox: SandboxThread, clock: FakeClock
) -> None:
    """Events listed late are confirmed by the next reconcile, which reads down only to what
    the first one left read (EVENT_LAG before its newest event): the earlier pages of the
    job are not read again."""
    early = ws.ids(200, "early")
    run(ws, early, name="early.txt")
    clock.advance(600)  # the rest of the job ten minutes later, some of its events late
    later = ws.ids(60, "later")
    sandbox.sandbox.configure(event_delay_seconds=30, event_delay_share=0.5, seed=3)
    late = {i for i in later if drawn(0.5, 3, "event_delay", i)}
    assert 0 < len(late) < len(later)
    run(ws, later, name="later.txt")

    first = ws.run("reconcile", "--job", JOB, *FASTER)
    assert first.exit_code == 0, first.stderr
    assert {r["account_id"] for r in report(ws) if not r["confirmed_at"]} == late
    assert f"{len(late)} disconnected accounts have no event yet" in first.stdout
    read_first = len(event_requests(sandbox))
    assert read_first == -(-(260 - len(late)) // 100)  # those listed already, 100 a page

    clock.advance(30)
    second = ws.run("reconcile", "--job", JOB, *FASTER)
    assert second.exit_code == 0, second.stderr
    assert f"confirmed {len(late)} (already recorded {len(later) - len(late)}" in second.stdout
    assert [r["account_id"] for r in report(ws) if not r["confirmed_at"]] == []
    [page] = event_requests(sandbox)[read_first:]  # one page: the later part only
    newest = max(e.created for e in sandbox.sandbox.event_log.events())
    assert (page["created[gte]"], page.get("starting_after")) == (str(newest - EVENT_LAG), None)
    assert int(page["created[gte]"]) > max(
        e.created for e in sandbox.sandbox.event_log.events() if e.account_id in early
    )


def test_dropped_events_leave_exactly_those_accounts_unconfirmed_and_verify_reads_them(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Accounts whose events Stripe never emitted stay unconfirmed, and only they; `verify
    --unconfirmed` reads exactly those back and records them verified."""
    sandbox.sandbox.configure(event_drop_share=0.15, seed=5)
    ids = ws.ids(120)
    run(ws, ids)
    dropped = sandbox.sandbox.dropped_events()
    assert 0 < len(dropped) < len(ids)
    assert ws.run("reconcile", "--job", JOB, *FASTER).exit_code == 0
    gap = ws.run("report", "--job", JOB, "--unconfirmed").stdout.splitlines()
    assert {json.loads(line)["account_id"] for line in gap} == dropped

    verify = ws.run("verify", "--job", JOB, "--unconfirmed", *FASTER)
    assert verify.exit_code == 0, verify.stderr
    read = [e.account_id for e in sandbox.sandbox.journal_snapshot() if e.method == "GET"]
    assert sorted(a for a in read if a) == sorted(dropped)
    rows = {r["account_id"]: r for r in report(ws)}
    assert {a for a, r in rows.items() if r["verified_status"] == "disconnected"} == dropped
    assert all(rows[a]["verified_at"] for a in dropped)
    status = ws.run("status", "--job", JOB).stdout
    assert f"verified {len(dropped)}, reactivated 0, never read back {120 - len(dropped)}" in status


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def confirmations(ws: Workspace) -> tuple[int, dict[str, str]]:
    """How many events the store keeps for the job, and each account's event ID."""
    with contextlib.closing(sqlite3.connect(ws.state(JOB))) as db:
        (kept,) = db.execute("SELECT COUNT(*) FROM events WHERE job = ?", (JOB,)).fetchone()
        rows = db.execute("SELECT account_id, event_id FROM accounts WHERE job = ?", (JOB,))
        return int(kept), {a: e for a, e in rows if e}


def receiving(ws: Workspace, port: int) -> Any:
    """A webhook receiver for the job on `port` (a subprocess), once it listens."""
    receiver = ws.spawn(
        "webhook", "--job", JOB, "--port", str(port), env={"STRIPE_WEBHOOK_SECRET": SECRET}
    )
    assert receiver.stdout is not None
    assert "webhook listening on" in receiver.stdout.readline()
    return receiver


def stopped(receiver: Any) -> dict[str, Any]:
    """Stop a receiver; what it logged it received."""
    receiver.send_signal(signal.SIGTERM)
    _, log = receiver.communicate(timeout=15)
    assert receiver.returncode == 0, log
    return dict(json.loads(next(line for line in log.splitlines() if "webhook.stopped" in line)))


def test_the_same_event_from_the_webhook_and_from_reconcile_is_recorded_once(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """An event the webhook recorded is a replay to reconcile, and one reconcile recorded is a
    replay to the webhook: each account keeps its one event, each event is kept once."""
    port = free_port()
    sandbox.sandbox.configure(webhook_url=f"http://127.0.0.1:{port}/webhook", webhook_secret=SECRET)
    delivered = sandbox.sandbox.events.delivered
    first, second = ws.ids(10, "hook"), ws.ids(10, "list")
    run(ws, first, name="first.txt")
    receiver = receiving(ws, port)
    try:
        wait_for(lambda: len(confirmations(ws)[1]) == 10)
    finally:
        assert stopped(receiver)["confirmed"] == 10
    run(ws, second, name="second.txt")  # its deliveries wait for a receiver, retried
    result = ws.run("reconcile", "--job", JOB, *FASTER)
    assert result.exit_code == 0, result.stderr
    assert "confirmed 10 (already recorded 10, of accounts outside the job 0)" in result.stdout
    receiver = receiving(ws, port)
    try:
        wait_for(lambda: sandbox.sandbox.events.delivered == delivered + 20)
    finally:
        heard = stopped(receiver)
    assert (heard.get("replayed"), heard.get("confirmed")) == (10, None)
    events = {e.account_id: e.id for e in sandbox.sandbox.event_log.events()}
    assert confirmations(ws) == (20, {i: events[i] for i in first + second})


def test_a_job_across_connected_accounts_reconciles_each_under_its_header(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Each connected account's events are read with its Stripe-Account header, and the job's
    own rows' with the run's --stripe-account; an event confirms only the row of the account it
    was listed under, not a row of the same ID filed under another (not found there)."""
    rows = [("acct_1Alpha", f"fca_alpha{n}") for n in range(5)]
    rows += [("acct_1Bravo", f"fca_bravo{n}") for n in range(4)]
    rows += [("", f"fca_own{n}") for n in range(3)]
    rows += [("acct_1Alpha", "fca_misfiled"), ("acct_1Bravo", "fca_misfiled")]
    owners = {i: a or "acct_1Own" for a, i in rows} | {"fca_misfiled": "acct_1Bravo"}
    sandbox.sandbox.configure(accounts=owners)
    ws.write("purge.csv", ["stripe_account,account_id", *(f"{a},{i}" for a, i in rows)])
    own = ["--stripe-account", "acct_1Own"]
    result = ws.run("run", "--job", JOB, "--input", "purge.csv", "--rate", "1000", *own, *FAST)
    assert result.exit_code == 0, result.stderr
    reconciled = ws.run("reconcile", "--job", JOB, *own, *FASTER)
    assert reconciled.exit_code == 0, reconciled.stderr
    assert "13 events listed in 3 pages from 3 Stripe account(s)" in reconciled.stdout
    assert sorted(r["header"] for r in event_requests(sandbox)) == [
        "acct_1Alpha",
        "acct_1Bravo",
        "acct_1Own",
    ]
    events = {
        (header, e.account_id): e.id
        for header in ("acct_1Alpha", "acct_1Bravo", "acct_1Own")
        for e in sandbox.sandbox.event_log.events(header)
    }
    stored = {(r["stripe_account"], r["account_id"]): r["event_id"] for r in report(ws)}
    assert stored == {(a, i): events.get((a or "acct_1Own", i)) for a, i in rows}
    assert stored["acct_1Alpha", "fca_misfiled"] is None
    assert stored["acct_1Bravo", "fca_misfiled"] is not None


def textfile(path: Path) -> dict[str, float]:
    """The samples of a Prometheus textfile by name (labels left out: one job)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }


def test_run_reconcile_confirms_right_after_the_last_disconnect(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """`run --reconcile` confirms the run's disconnects from the events before it exits, and
    counts them in the run's metrics; events that never come are waited for only
    --reconcile-wait seconds."""
    sandbox.sandbox.configure(event_drop_share=0.1, seed=7)
    ids = ws.ids(80)
    metrics = ws.root / "run.prom"
    started = time.monotonic()
    run(ws, ids, "--reconcile", "--reconcile-wait", "0.5", "--metrics-file", str(metrics))
    assert time.monotonic() - started < 20
    dropped = sandbox.sandbox.dropped_events()
    assert {r["account_id"] for r in report(ws) if not r["confirmed_at"]} == dropped
    samples = textfile(metrics)
    assert samples["bulkdisconnect_reconcile_confirmed_total"] == 80 - len(dropped)
    assert samples["bulkdisconnect_unconfirmed_accounts"] == len(dropped)
    assert samples["bulkdisconnect_last_run_exit_code"] == 0
    tops = [p for p in event_requests(sandbox) if "starting_after" not in p]
    assert len(tops) >= 2  # read, then again while the dropped ones were waited for


def test_reconcile_exports_its_own_metrics(ws: Workspace, sandbox: SandboxThread) -> None:
    """A standalone reconcile writes its counts, the job's state and its requests to its own
    textfile, under names of its own."""
    ids = ws.ids(30)
    run(ws, ids)
    metrics = ws.root / "reconcile.prom"
    result = ws.run("reconcile", "--job", JOB, "--metrics-file", str(metrics), *FASTER)
    assert result.exit_code == 0, result.stderr
    samples = textfile(metrics)
    assert samples["bulkdisconnect_reconcile_confirmed_total"] == 30
    assert samples["bulkdisconnect_reconcile_events_total"] == 30
    assert samples["bulkdisconnect_reconcile_requests_total"] == 1
    assert samples["bulkdisconnect_confirmed_accounts"] == 30
    assert samples["bulkdisconnect_unconfirmed_accounts"] == 0
    assert samples["bulkdisconnect_reconcile_last_exit_code"] == 0
    assert "bulkdisconnect_accounts_total" not in samples


def test_a_job_older_than_stripes_30_days_of_events_points_to_verify(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """First attempts older than the 30 days Stripe keeps events: reconcile says so and
    points to `verify`."""
    run(ws, ws.ids(5))
    with contextlib.closing(sqlite3.connect(ws.state(JOB))) as db, db:
        db.execute("UPDATE accounts SET first_attempt_at = first_attempt_at - 31 * 86400")
    result = ws.run("reconcile", "--job", JOB, *FASTER)
    assert result.exit_code == 0, result.stderr
    assert "older than the 30 days of events Stripe keeps" in result.stdout
    assert "bulkdisconnect verify --job ids --unconfirmed" in result.stdout


def test_an_interrupted_reconcile_goes_on_after_its_last_page(
    ws: Workspace, sandbox: SandboxThread, clock: FakeClock
) -> None:
    """SIGTERM mid-pass exits 3 keeping every page read; the rerun starts after the last event
    the pass recorded, and then reads from the top only down to where that pass ended."""
    for part in range(10):  # a job run in ten parts, 100 s apart
        run(ws, ws.ids(100, f"part{part}x"), name=f"part{part}.txt")
        clock.advance(100)
    sandbox.sandbox.configure(latency_ms=200)
    proc = ws.spawn("reconcile", "--job", JOB, "--rate", "1000", *FAST[:4])
    wait_for(lambda: len(event_requests(sandbox)) >= 3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 3, stderr
    assert "interrupted; what was read is kept" in stdout
    cut = event_requests(sandbox)
    recorded = {r["account_id"] for r in report(ws) if r["confirmed_at"]}
    assert 0 < len(recorded) < 1000
    sandbox.sandbox.configure(latency_ms=0)

    rerun = ws.run("reconcile", "--job", JOB, *FASTER)
    assert rerun.exit_code == 0, rerun.stderr
    newest_first = sandbox.sandbox.event_log.events()[::-1]
    pages = event_requests(sandbox)[len(cut) :]
    assert pages[0].get("starting_after") == newest_first[len(recorded) - 1].id
    # The rest of the cut pass, then one page from the top: the last part's 100 events, the
    # only ones within EVENT_LAG of the newest.
    assert len(pages) == (1000 - len(recorded)) // 100 + 1
    assert pages[-1].get("starting_after") is None
    assert int(pages[-1]["created[gte]"]) == newest_first[0].created - EVENT_LAG
    assert f"confirmed {1000 - len(recorded)} (already recorded 100" in rerun.stdout
    assert all(r["confirmed_at"] for r in report(ws))


def test_a_cursor_stripe_no_longer_lists_starts_the_pass_over(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A pass cut short whose last event Stripe no longer lists (400 resource_missing) is
    read again from the top, down to where it was going."""
    run(ws, ws.ids(150))
    with contextlib.closing(sqlite3.connect(ws.state(JOB))) as db, db:
        db.execute(
            "INSERT INTO reconciled (job, stripe_account, last_event_id, pass_floor, pass_top, "
            "at) VALUES (?, '', 'evt_gone', 0, NULL, 0)",
            (JOB,),
        )
    result = ws.run("reconcile", "--job", JOB, *FASTER)
    assert result.exit_code == 0, result.stderr
    assert "confirmed 150" in result.stdout
    assert [p.get("starting_after") for p in event_requests(sandbox)][:2] == ["evt_gone", None]


def test_reconcile_of_a_held_or_unknown_job_is_refused(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A job another run holds exits 4 listing nothing; a job never run exits 2 creating
    nothing."""
    run(ws, ws.ids(3))
    with contextlib.closing(sqlite3.connect(ws.state(JOB))) as db, db:
        db.execute(
            "INSERT INTO locks (job, owner, pid, host, acquired_at, heartbeat_at, lease, shared, "
            "share_of) VALUES (?, 'running', 1, 'elsewhere', ?, ?, 30, 0, 1)",
            (JOB, time.time(), time.time()),
        )
    held = ws.run("reconcile", "--job", JOB, *FASTER)
    assert held.exit_code == 4, held.stderr
    assert "locked by a run on elsewhere" in held.stderr
    missing = ws.run("reconcile", "--job", "never", *FASTER)
    assert missing.exit_code == 2
    assert "no state store at state/never.sqlite" in missing.stderr
    assert not (ws.root / "state" / "never.sqlite").exists()
    assert event_requests(sandbox) == []


def test_reconcile_reads_the_runs_job_file_and_both_commands_explain_themselves(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """`reconcile JOB_FILE` takes the job's name, store and settings from the run's job file
    (its source keys ignored); reconcile and verify have --help with examples and exit codes."""
    ws.write("purge.txt", ws.ids(12))
    (ws.root / "purge.toml").write_text('input = "purge.txt"\nrate = 500\nretry_delay = 0\n')
    assert ws.run("run", "purge.toml", *FAST).exit_code == 0
    result = ws.run("reconcile", "purge.toml")
    assert result.exit_code == 0, result.stderr
    assert "reconcile of job purge: 12 events listed" in result.stdout
    for command in ("reconcile", "verify"):
        shown = ws.run(command, "--help")
        assert shown.exit_code == 0
        assert "Examples:" in shown.stdout
        assert "Exit codes:" in shown.stdout


def test_a_connected_account_that_revoked_the_platform_is_named_and_the_others_confirmed(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A connected account answering 403 account_invalid is named and ends in exit 1; the other
    Stripe accounts' events are read and confirmed."""
    rows = [("acct_1Kept", f"fca_kept{n}") for n in range(4)]
    rows += [("acct_1Gone", f"fca_gone{n}") for n in range(4)]
    ws.write("purge.csv", ["stripe_account,account_id", *(f"{a},{i}" for a, i in rows)])
    result = ws.run("run", "--job", JOB, "--input", "purge.csv", "--rate", "1000", *FAST)
    assert result.exit_code == 0, result.stderr
    sandbox.sandbox.configure(revoked_accounts=frozenset({"acct_1Gone"}))
    reconciled = ws.run("reconcile", "--job", JOB, *FASTER)
    assert reconciled.exit_code == 1, reconciled.stderr
    assert "stopped for acct_1Gone: listing its events: HTTP 403 account_invalid" in (
        reconciled.stdout
    )
    confirmed = {r["account_id"] for r in report(ws) if r["confirmed_at"]}
    assert confirmed == {i for a, i in rows if a == "acct_1Kept"}
