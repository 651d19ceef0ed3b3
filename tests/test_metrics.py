"""Run metrics: the textfile's samples, atomic writes, the Pushgateway push and periodic writes."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bulkdisconnect.metrics import MetricsSettings, RunMetrics
from bulkdisconnect.model import Outcome
from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, Workspace

JOB = "purge"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by sample name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value (the `job` label implied), or None if it is absent."""
    return samples.get((name, frozenset({"job_name": JOB, **labels}.items())))


def textfile_metrics(tmp_path: Path) -> tuple[RunMetrics, Path]:
    path = tmp_path / "bulkdisconnect.prom"
    return RunMetrics(JOB, MetricsSettings(file=path)), path


def record_a_run(metrics: RunMetrics) -> None:
    """Three accounts: one disconnected after a 429 and a retry, one not found, one failed."""
    metrics.request(0.2, status=429)
    metrics.retry()
    metrics.request(0.3, status=200)
    metrics.outcome(Outcome.DISCONNECTED)
    metrics.request(0.5, status=404)
    metrics.outcome(Outcome.NOT_FOUND)
    metrics.request(12.0, status=500)
    metrics.outcome(Outcome.FAILED)
    metrics.set_progress(pending=7, target_rate=42.5)


def test_textfile_holds_the_counters_histogram_and_gauges_of_a_run(tmp_path: Path) -> None:
    """The written textfile parses back to the run's outcomes, requests, latency and gauges."""
    metrics, path = textfile_metrics(tmp_path)
    record_a_run(metrics)
    before = time.time()
    metrics.finish(0)
    metrics.publish()

    samples = parse(path.read_text())
    accounts = "bulkdisconnect_accounts_total"
    assert value(samples, accounts, outcome="disconnected") == 1
    assert value(samples, accounts, outcome="not_found") == 1
    assert value(samples, accounts, outcome="invalid_id") == 0  # present, at 0
    assert value(samples, accounts, outcome="failed") == 1
    assert value(samples, "bulkdisconnect_requests_total") == 4
    assert value(samples, "bulkdisconnect_retries_total") == 1
    assert value(samples, "bulkdisconnect_rate_limited_total") == 1
    latency = "bulkdisconnect_request_duration_seconds"
    assert value(samples, f"{latency}_count") == 4
    assert value(samples, f"{latency}_sum") == pytest.approx(13.0)
    assert value(samples, f"{latency}_bucket", le="0.25") == 1
    assert value(samples, f"{latency}_bucket", le="10.0") == 3  # 12 s is beyond the last bucket
    assert value(samples, f"{latency}_bucket", le="+Inf") == 4
    assert value(samples, "bulkdisconnect_pending_accounts") == 7
    assert value(samples, "bulkdisconnect_target_rate") == 42.5
    assert value(samples, "bulkdisconnect_last_run_exit_code") == 0
    success = value(samples, "bulkdisconnect_last_success_timestamp_seconds")
    assert success is not None
    assert before <= success <= time.time()


@pytest.mark.parametrize("exit_code", [1, 3, 5])
def test_failed_run_records_its_exit_code_and_no_success_time(
    tmp_path: Path, exit_code: int
) -> None:
    """A run that exits non-zero exports its exit code and no last-success timestamp."""
    metrics, path = textfile_metrics(tmp_path)
    metrics.finish(exit_code)
    metrics.publish()

    samples = parse(path.read_text())
    assert value(samples, "bulkdisconnect_last_run_exit_code") == exit_code
    assert value(samples, "bulkdisconnect_last_success_timestamp_seconds") is None


def test_run_in_progress_exports_no_exit_code_yet(tmp_path: Path) -> None:
    """Before finish() the textfile has no exit code (0 would read as success) nor success time."""
    metrics, path = textfile_metrics(tmp_path)
    metrics.publish()

    samples = parse(path.read_text())
    assert value(samples, "bulkdisconnect_last_run_exit_code") is None
    assert value(samples, "bulkdisconnect_last_success_timestamp_seconds") is None
    assert value(samples, "bulkdisconnect_requests_total") == 0


def test_textfile_is_replaced_whole_with_no_temp_file_left(tmp_path: Path) -> None:
    """Publishing renames a complete new file over the old one and leaves nothing else behind."""
    metrics, path = textfile_metrics(tmp_path)
    path.write_text("# stale content from an older run, longer than anything we write\n" * 200)
    old_inode = path.stat().st_ino
    record_a_run(metrics)
    metrics.publish()

    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == generate_latest(metrics.registry)
    assert path.stat().st_ino != old_inode  # a rename, not a rewrite in place


def test_textfile_is_readable_by_node_exporter_whatever_the_umask(tmp_path: Path) -> None:
    """Counts only, read by another user: 0644 even under umask 077."""
    metrics, path = textfile_metrics(tmp_path)
    before = os.umask(0o077)
    try:
        metrics.publish()
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o644


def test_runs_in_one_process_keep_separate_registries(tmp_path: Path) -> None:
    """Two runs of the same job in one process neither collide nor share counts."""
    first = RunMetrics(JOB, MetricsSettings())
    second = RunMetrics(JOB, MetricsSettings(file=tmp_path / "second.prom"))
    first.request(0.1, status=200)
    second.publish()

    requests = "bulkdisconnect_requests_total"
    assert value(parse(generate_latest(first.registry).decode()), requests) == 1
    assert value(parse((tmp_path / "second.prom").read_text()), requests) == 0
    assert not first.enabled
    assert second.enabled
    assert RunMetrics(JOB, MetricsSettings(pushgateway="http://127.0.0.1:9091")).enabled


def test_unwritable_textfile_logs_a_warning_and_does_not_raise(tmp_path: Path) -> None:
    """A metrics file in a missing folder is logged, and the run goes on."""
    metrics = RunMetrics(JOB, MetricsSettings(file=tmp_path / "missing" / "m.prom"))
    with structlog.testing.capture_logs() as logs:
        metrics.publish()

    assert [entry["event"] for entry in logs] == ["bulkdisconnect.metrics.write_failed"]
    assert logs[0]["log_level"] == "warning"


@dataclass
class Gateway:
    """A loopback stand-in for the Pushgateway that records what it was sent."""

    url: str
    status: int = 200
    received: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, body
    authorization: list[str | None] = field(default_factory=list)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    """A real aiohttp server on a free loopback port, in the test's event loop."""
    recorder = Gateway(url="")

    async def record(request: web.Request) -> web.Response:
        recorder.received.append((request.method, request.path, await request.text()))
        recorder.authorization.append(request.headers.get("Authorization"))
        return web.Response(status=recorder.status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        recorder.url = f"http://{host}:{port}"
        yield recorder
    finally:
        await runner.cleanup()


@pytest.mark.anyio
async def test_push_puts_the_registry_under_the_job_grouping_key(gateway: Gateway) -> None:
    """publish() PUTs every metric to /metrics/job/bulkdisconnect/job_name/<job>."""
    metrics = RunMetrics(JOB, MetricsSettings(pushgateway=gateway.url))
    record_a_run(metrics)
    metrics.finish(0)
    with structlog.testing.capture_logs() as logs:
        await anyio.to_thread.run_sync(metrics.publish)

    assert logs == []
    assert gateway.authorization == [None]
    [(method, path, body)] = gateway.received
    assert method == "PUT"
    assert path == f"/metrics/job/bulkdisconnect/job_name/{JOB}"
    samples = parse(body)
    assert value(samples, "bulkdisconnect_accounts_total", outcome="disconnected") == 1
    for name in (
        "bulkdisconnect_requests_total",
        "bulkdisconnect_retries_total",
        "bulkdisconnect_rate_limited_total",
        "bulkdisconnect_request_duration_seconds_count",
        "bulkdisconnect_last_success_timestamp_seconds",
        "bulkdisconnect_last_run_exit_code",
        "bulkdisconnect_pending_accounts",
        "bulkdisconnect_target_rate",
    ):
        assert value(samples, name) is not None, name


@pytest.mark.anyio
async def test_push_answered_with_an_error_logs_a_warning(gateway: Gateway) -> None:
    """A gateway that rejects the push (HTTP 400) is logged as push_failed, not raised."""
    gateway.status = 400
    metrics = RunMetrics(JOB, MetricsSettings(pushgateway=gateway.url))
    with structlog.testing.capture_logs() as logs:
        await anyio.to_thread.run_sync(metrics.publish)

    assert len(gateway.received) == 1
    assert [entry["event"] for entry in logs] == ["bulkdisconnect.metrics.push_failed"]


@pytest.mark.anyio
async def test_credentials_in_the_url_are_sent_as_basic_auth(gateway: Gateway) -> None:
    """`user:password@` in --pushgateway becomes an Authorization header, not part of the host."""
    url = gateway.url.replace("http://", "http://ops:p%40ss@")
    metrics = RunMetrics(JOB, MetricsSettings(pushgateway=url))
    with structlog.testing.capture_logs() as logs:
        await anyio.to_thread.run_sync(metrics.publish)

    assert logs == []
    assert len(gateway.received) == 1
    assert gateway.authorization == [f"Basic {base64.b64encode(b'ops:p@ss').decode()}"]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening, so connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


def test_refused_push_logs_a_warning_and_does_not_raise(refused_port: int) -> None:
    """A Pushgateway that refuses the connection is logged as push_failed, not raised."""
    metrics = RunMetrics(JOB, MetricsSettings(pushgateway=f"http://127.0.0.1:{refused_port}"))
    with structlog.testing.capture_logs() as logs:
        metrics.publish()

    [entry] = logs
    assert entry["event"] == "bulkdisconnect.metrics.push_failed"
    assert entry["log_level"] == "warning"
    assert entry["gateway"] == f"http://127.0.0.1:{refused_port}"
    assert "refused" in entry["error"].lower()


def test_failed_push_logs_the_url_without_credentials(refused_port: int) -> None:
    """The push_failed warning names the gateway without the password of its URL."""
    url = f"http://ops:hunter2@127.0.0.1:{refused_port}/"
    metrics = RunMetrics(JOB, MetricsSettings(pushgateway=url))
    with structlog.testing.capture_logs() as logs:
        metrics.publish()

    [entry] = logs
    assert entry["gateway"] == f"http://127.0.0.1:{refused_port}/"
    assert "hunter2" not in repr(entry)


def test_unparseable_gateway_url_logs_a_warning_and_does_not_raise() -> None:
    """A --pushgateway URL that cannot be parsed is logged, without echoing it, not raised."""
    metrics = RunMetrics(JOB, MetricsSettings(pushgateway="http://ops:hunter2@[::1"))
    with structlog.testing.capture_logs() as logs:
        metrics.publish()

    [entry] = logs
    assert entry["event"] == "bulkdisconnect.metrics.push_failed"
    assert "hunter2" not in repr(entry)


def test_outcomes_decided_while_planning_are_counted(ws: Workspace, sandbox: SandboxThread) -> None:
    """Invalid values recorded while planning count in accounts_total (an alert on invalid
    input fires); a rerun of the same input counts them no more: they were decided before."""
    ws.write(f"{JOB}.txt", [*ws.ids(5), "not-an-id", "fca_bad!", "acct_x"])
    for run, invalid in ((1, 3), (2, 0)):
        metrics = ("--metrics-file", f"m{run}.prom")
        result = ws.run("run", "--input", f"{JOB}.txt", *metrics, *FAST)
        assert result.exit_code == 1, result.stderr
        samples = parse((ws.root / f"m{run}.prom").read_text())
        accounts = "bulkdisconnect_accounts_total"
        assert value(samples, accounts, outcome="invalid_id") == invalid
        assert value(samples, accounts, outcome="disconnected") == (5 if run == 1 else 0)
