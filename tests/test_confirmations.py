"""Proof of purge end to end: sandbox -> signed webhook -> store -> status, report, metrics."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bulkdisconnect.sandbox import SandboxThread
from tests.conftest import FAST, Workspace

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
    receiver = ws.spawn(
        "webhook", "--job", "ids", "--port", "0", env={"STRIPE_WEBHOOK_SECRET": f"old,{SECRET}"}
    )
    try:
        assert receiver.stdout is not None
        line = receiver.stdout.readline()
        match = re.search(r"http://\S+", line)
        assert match, line
        sandbox.sandbox.configure(webhook_url=match.group(0), webhook_secret=SECRET)
        metrics = ws.root / "metrics" / "bulkdisconnect.prom"
        metrics.parent.mkdir()
        result = ws.run(
            "run", "--input", "ids.txt", "--rate", "1000", "--metrics-file", str(metrics), *FAST
        )
        assert result.exit_code == 1  # the junk line is invalid_id
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
