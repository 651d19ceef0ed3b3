"""Prometheus metrics of one run, for schedulers: a textfile for node_exporter and/or a Pushgateway.

Each run has its own CollectorRegistry, so tests and several runs in one process never share
a series. Every metric carries a `job_name` label naming the bulkdisconnect job (not `job`:
Prometheus renames a scraped `job` label to `exported_job`, and the Pushgateway overwrites it).

`bulkdisconnect_last_success_timestamp_seconds` is set only when the run exits 0, and each
write replaces the whole textfile (or, with PUT, the whole Pushgateway group): after a failed
run the series is gone rather than old. Alert on its staleness *and* its absence, e.g.
`time() - max_over_time(bulkdisconnect_last_success_timestamp_seconds[2d]) > 86400
or absent_over_time(bulkdisconnect_last_success_timestamp_seconds[2d])`.

Pushes group under job="bulkdisconnect" and job_name=<the job>.
"""

from __future__ import annotations

import functools
import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    write_to_textfile,
)
from prometheus_client.exposition import basic_auth_handler, default_handler

from bulkdisconnect.model import Outcome, RunStats

log = structlog.get_logger("bulkdisconnect")
Metric = TypeVar("Metric", Counter, Gauge)

# Stripe answers a disconnect in ~0.2-1 s; slow tails and timeouts reach the 10 s bucket.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
PUSH_JOB = "bulkdisconnect"
# Short enough that the final push cannot hold the scheduler's slot for long.
PUSH_TIMEOUT = 10.0
# An unreachable gateway or a bad URL; urllib's errors are OSErrors, http.client's are not.
PUBLISH_ERRORS = (OSError, http.client.HTTPException, ValueError)


@dataclass(frozen=True, kw_only=True)
class MetricsSettings:
    """Where a run's metrics go, and how often they are written while it runs."""

    file: Path | None = None  # --metrics-file: node_exporter textfile collector format
    pushgateway: str | None = None  # --pushgateway URL
    interval: float = 15.0  # seconds between periodic writes during the run


class RunMetrics:
    """The metrics of one run in their own registry, published to a textfile and/or a gateway."""

    def __init__(self, job: str, settings: MetricsSettings) -> None:
        self._job = job
        self._settings = settings
        # A periodic write in a worker thread must not interleave with the final one.
        self._publishing = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        metric = functools.partial(_metric, registry=self.registry)
        accounts = metric(Counter, "accounts", "Accounts that reached a final outcome in this run.")
        # Bound for every outcome so each series exists, at 0, from the first write.
        self._outcomes = {o: accounts.labels(job, o.value) for o in Outcome}
        self._requests = metric(Counter, "requests", "HTTP attempts sent to Stripe.").labels(job)
        self._retries = metric(Counter, "retries", "Attempts that were retried.").labels(job)
        self._rate_limited = metric(Counter, "rate_limited", "429 answers from Stripe.").labels(job)
        self._latency = Histogram(
            "bulkdisconnect_request_duration_seconds",
            "Latency of one HTTP attempt.",
            ["job_name"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(job)
        # Not bound until finish(): an unset child exports no sample, so a run in progress
        # shows no exit code and a failed run no success time.
        self._last_success = metric(
            Gauge,
            "last_success_timestamp_seconds",
            "Unix time at which the last run that exited 0 ended.",
        )
        self._exit_code = metric(Gauge, "last_run_exit_code", "Exit code of the last run.")
        self._pending = metric(Gauge, "pending_accounts", "Accounts still to call.").labels(job)
        self._target_rate = metric(
            Gauge, "target_rate", "Current adaptive request rate, requests per second."
        ).labels(job)

    @property
    def enabled(self) -> bool:
        """Whether a textfile or a Pushgateway is configured."""
        return self._settings.file is not None or self._settings.pushgateway is not None

    def outcome(self, outcome: Outcome) -> None:
        """Count one account's final outcome."""
        self._outcomes[outcome].inc()

    def request(self, seconds: float, *, status: int) -> None:
        """Count one HTTP attempt and its latency; a 429 also counts as rate limited."""
        self._requests.inc()
        self._latency.observe(seconds)
        if status == 429:
            self._rate_limited.inc()

    def retry(self) -> None:
        """Count one retried attempt."""
        self._retries.inc()

    def set_progress(self, *, pending: int, target_rate: float) -> None:
        """Record the accounts still to call and the current adaptive rate."""
        self._pending.set(pending)
        self._target_rate.set(target_rate)

    def finish(self, exit_code: int) -> None:
        """Record the run's exit code, and its end time if it succeeded."""
        self._exit_code.labels(self._job).set(exit_code)
        if exit_code == 0:
            self._last_success.labels(self._job).set(time.time())

    @property
    def settings(self) -> MetricsSettings:
        """Where and how often this run publishes."""
        return self._settings

    async def keep_published(self, stats: RunStats) -> None:
        """Publish the run's progress every `interval` while it works; runs until cancelled."""
        while True:
            await anyio.sleep(self._settings.interval)
            self.set_progress(pending=stats.planned - stats.done, target_rate=stats.current_rate)
            await anyio.to_thread.run_sync(self.publish)

    def publish(self) -> None:
        """Write the textfile and/or push to the gateway; failures are logged, never raised.

        Blocking: from async code run it in a worker thread (anyio.to_thread.run_sync).
        """
        with self._publishing:
            if self._settings.file is not None:
                self._write(self._settings.file)
            if self._settings.pushgateway is not None:
                self._push(self._settings.pushgateway)

    def _write(self, path: Path) -> None:
        # write_to_textfile writes `<path>.<pid>.<thread>` beside the target and renames it
        # over the target, so node_exporter never reads half a file (and skips the temp
        # file: it reads only *.prom).
        try:
            write_to_textfile(str(path), self.registry)
            path.chmod(0o644)  # counts only: node_exporter, another user, must read it
        except PUBLISH_ERRORS as error:
            # Metrics must never stop a run that is disconnecting accounts.
            log.warning("bulkdisconnect.metrics.write_failed", path=str(path), error=str(error))

    def _push(self, url: str) -> None:
        target = "(unparseable URL)"  # logged as is: the URL itself may hold a password
        try:
            target, handler = _with_basic_auth(url)
            push_to_gateway(
                target,
                job=PUSH_JOB,
                registry=self.registry,
                grouping_key={"job_name": self._job},
                timeout=PUSH_TIMEOUT,
                handler=handler,
            )
        except PUBLISH_ERRORS as error:
            log.warning("bulkdisconnect.metrics.push_failed", gateway=target, error=str(error))


def _with_basic_auth(url: str) -> tuple[str, Callable[..., Callable[[], None]]]:
    """The URL without `user:password@`, and a push handler sending them as Basic auth.

    urllib ignores credentials in a URL (it resolves `user:password@host` as a host name),
    and the URL is logged: they are moved into a header.
    """
    parts = urlsplit(url)
    if parts.username is None:
        return url, default_handler
    handler = functools.partial(
        basic_auth_handler,
        username=unquote(parts.username),
        password=unquote(parts.password or ""),
    )
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), handler


def run_metrics(job: str, *, file: str | None, pushgateway: str | None) -> RunMetrics | None:
    """Metrics for a run, when a textfile or a Pushgateway asks for them."""
    metrics = RunMetrics(
        job, MetricsSettings(file=Path(file) if file else None, pushgateway=pushgateway)
    )
    return metrics if metrics.enabled else None


def _metric(kind: type[Metric], name: str, doc: str, *, registry: CollectorRegistry) -> Metric:
    """A `bulkdisconnect_` counter or gauge labelled by job (and, for accounts, by outcome)."""
    labels = ["job_name", "outcome"] if name == "accounts" else ["job_name"]
    return kind(f"bulkdisconnect_{name}", doc, labels, registry=registry)
