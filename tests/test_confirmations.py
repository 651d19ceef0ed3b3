"""Proof of purge end to end: sandbox -> signed webhook -> store -> status, report, metrics."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkdisconnect.sandbox import SandboxThread
from bulkdisconnect.webhook import sign
from tests.support import FAST, Workspace

pytestmark = pytest.mark.slow
SECRET = "whsec_test_0123456789abcdef"  # noqa: S105 - a test secret


def metric_values(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus textfile, parsed with prometheus_client's own parser."""
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_disconnections_are_confirmed_by_webhook_events(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Every disconnect's event reaches the receiver, is verified and recorded on its outcome."""
    ids = ws.ids(40)
    ws.write("ids.txt", [*ids, "junk"])
    # The receiver starts once the run has planned the job; the sandbox, like Stripe, retries
    # the deliveries that failed meanwhile.
    port = free_port()
    sandbox.sandbox.configure(webhook_url=f"http://127.0.0.1:{port}/webhook", webhook_secret=SECRET)
    metrics = ws.root / "metrics" / "bulkdisconnect.prom"
    metrics.parent.mkdir()
    result = ws.run(
        "run", "--input", "ids.txt", "--rate", "1000", "--metrics-file", str(metrics), *FAST
    )
    assert result.exit_code == 1  # the junk line is invalid_id
    receiver = ws.spawn(
        "webhook",
        "--job",
        "ids",
        "--port",
        str(port),
        env={"STRIPE_WEBHOOK_SECRET": f"old,{SECRET}"},
    )
    try:
        assert receiver.stdout is not None
        assert "webhook listening on" in receiver.stdout.readline()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status = ws.run("status", "--job", "ids").stdout
            if "confirmed 40, unconfirmed 0" in status:
                break
            time.sleep(0.1)
        assert "confirmed 40, unconfirmed 0" in status
    finally:
        receiver.send_signal(signal.SIGINT)
        _, log = receiver.communicate(timeout=10)
    stopped = json.loads(next(line for line in log.splitlines() if "webhook.stopped" in line))
    assert stopped["confirmed"] == 40

    rows = [json.loads(line) for line in ws.run("report", "--job", "ids").stdout.splitlines()]
    confirmed = {r["account_id"]: r for r in rows if r["confirmed_at"]}
    assert set(confirmed) == set(ids)
    assert all(r["event_id"].startswith("evt_") for r in confirmed.values())
    assert ws.run("report", "--job", "ids", "--unconfirmed").stdout == ""

    samples = metric_values(metrics)
    job = (("job_name", "ids"),)
    assert samples[("bulkdisconnect_accounts_total", (*job, ("outcome", "disconnected")))] == 40
    assert samples[("bulkdisconnect_accounts_total", (*job, ("outcome", "failed")))] == 0
    assert samples[("bulkdisconnect_requests_total", job)] == 40
    assert samples[("bulkdisconnect_last_run_exit_code", job)] == 1
    assert samples[("bulkdisconnect_request_duration_seconds_count", job)] == 40


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_unconfirmed_report_lists_the_gap(ws: Workspace, sandbox: SandboxThread) -> None:
    """Without webhook delivery, every disconnected account shows up as unconfirmed."""
    ids = ws.ids(5)
    ws.write("ids.txt", ids)
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 0
    gap = [
        json.loads(line)["account_id"]
        for line in ws.run("report", "--job", "ids", "--unconfirmed").stdout.splitlines()
    ]
    assert gap == ids
    assert "confirmed 0, unconfirmed 5" in ws.run("status", "--job", "ids").stdout


def test_a_receiver_for_a_job_never_planned_refuses_to_start(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """A mistyped --job exits 2 and creates nothing, instead of acknowledging and losing
    every event; a job that is planned starts."""
    env = {"STRIPE_WEBHOOK_SECRET": SECRET}
    missing = ws.run("webhook", "--job", "hok", "--port", "0", env=env)
    assert missing.exit_code == 2
    assert "no state store at state/hok.sqlite" in missing.stderr
    assert not (ws.root / "state").exists()
    ws.write("hook.txt", ws.ids(2))
    assert ws.run("run", "--input", "hook.txt", *FAST).exit_code == 0
    shared = ["--state", "state/hook.sqlite", "--port", "0"]
    other = ws.run("webhook", "--job", "hok", *shared, env=env)
    assert other.exit_code == 2
    assert "job 'hok' is not in state/hook.sqlite" in other.stderr


def test_sigterm_stops_the_receiver_cleanly_and_status_counts_unknown_events(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """SIGTERM stops the receiver like SIGINT (exit 0, its closing counts logged); events for
    accounts outside the job are counted in `status` and their accounts not kept."""
    ids = ws.ids(3)
    ws.write("ids.txt", ids)
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 0
    receiver = ws.spawn(
        "webhook", "--job", "ids", "--port", "0", env={"STRIPE_WEBHOOK_SECRET": SECRET}
    )
    try:
        assert receiver.stdout is not None
        url = receiver.stdout.readline().split()[-1]
        for n, account in enumerate([ids[0], "fca_stranger", "fca_stranger2"]):
            body = json.dumps(
                {
                    "id": f"evt_{n}",
                    "type": "financial_connections.account.disconnected",
                    "data": {"object": {"id": account}},
                }
            ).encode()
            request = urllib.request.Request(  # noqa: S310 - the receiver on loopback
                url, data=body, headers={"Stripe-Signature": sign(body, SECRET)}
            )
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                assert answer.status == 200
    finally:
        receiver.send_signal(signal.SIGTERM)
        _, log = receiver.communicate(timeout=10)
    assert receiver.returncode == 0, log
    stopped = json.loads(next(line for line in log.splitlines() if "webhook.stopped" in line))
    assert (stopped["signal"], stopped["confirmed"], stopped["unknown"]) == ("SIGTERM", 1, 2)
    status = ws.run("status", "--job", "ids").stdout
    assert "confirmed 1, unconfirmed 2; events for accounts outside the job 2" in status
    with sqlite3.connect(ws.state("ids")) as db:
        assert db.execute("SELECT account_id FROM events").fetchall() == [(ids[0],)]


@pytest.mark.parametrize("command", ["webhook", "sandbox"])
def test_a_port_in_use_is_a_one_line_error(ws: Workspace, command: str) -> None:
    """A server started on a taken port exits 2 naming the port, without a traceback."""
    ws.write("ids.txt", ws.ids(1))
    assert ws.run("run", "--input", "ids.txt", *FAST).exit_code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--job", "ids"] if command == "webhook" else []
        proc = ws.spawn(command, *args, "--port", str(port), env={"STRIPE_WEBHOOK_SECRET": SECRET})
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert stderr.strip() == (
        f"bulkdisconnect: error: port {port} on 127.0.0.1 is in use: "
        "pick another with --port (0 picks a free one)"
    )
