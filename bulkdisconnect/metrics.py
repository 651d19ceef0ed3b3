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

`reconcile` and `verify` export their own metrics (`CheckMetrics`), named after the command
(bulkdisconnect_reconcile_confirmed_total, bulkdisconnect_verify_reactivated_total, ...) plus
the job's state after them (bulkdisconnect_confirmed_accounts, ..._unconfirmed_accounts,
..._verified_accounts, ..._reactivated_accounts): give each command a textfile of its own
(node_exporter refuses a series two files both hold); pushed, they group under
job_name=<the job> and command=<reconcile|verify>, beside the run's group.
"""

from __future__ import annotations

import functools
import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
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


class _Published:
    """A registry of metrics published to a textfile and/or a Pushgateway (shared behaviour
    of a run's metrics and a check's)."""

    def __init__(
        self,
        job: str,
        settings: MetricsSettings,
        registry: CollectorRegistry,
        grouping: dict[str, str],
    ) -> None:
        self._job = job
        self._settings = settings
        self._grouping = grouping
        # A periodic write in a worker thread must not interleave with the final one.
        self._publishing = threading.Lock()
        self.registry = registry

    @property
    def enabled(self) -> bool:
        """Whether a textfile or a Pushgateway is configured."""
        return self._settings.file is not None or self._settings.pushgateway is not None

    @property
    def settings(self) -> MetricsSettings:
        """Where and how often this run publishes."""
        return self._settings

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
                grouping_key=self._grouping,
                timeout=PUSH_TIMEOUT,
                handler=handler,
            )
        except PUBLISH_ERRORS as error:
            log.warning("bulkdisconnect.metrics.push_failed", gateway=target, error=str(error))


class RunMetrics(_Published):
    """The metrics of one run in their own registry, published to a textfile and/or a gateway."""

    def __init__(self, job: str, settings: MetricsSettings) -> None:
        registry = CollectorRegistry(auto_describe=True)
        super().__init__(job, settings, registry, {"job_name": job})
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

    def outcome(self, outcome: Outcome) -> None:
        """Count one account's final outcome."""
        self._outcomes[outcome].inc()

    def planned(self, *, invalid: int, settled: int) -> None:
        """Count the outcomes planning recorded without a call (invalid values, accounts a
        Stripe list showed already disconnected): an alert on invalid input must fire."""
        self._outcomes[Outcome.INVALID_ID].inc(invalid)
        self._outcomes[Outcome.DISCONNECTED].inc(settled)

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

    async def keep_published(self, stats: RunStats) -> None:
        """Publish the run's progress every `interval` while it works; runs until cancelled."""
        while True:
            await anyio.sleep(self._settings.interval)
            self.set_progress(pending=stats.planned - stats.done, target_rate=stats.current_rate)
            await anyio.to_thread.run_sync(self.publish)


# What `reconcile` and `verify` count, each under bulkdisconnect_<command>_<name>_total.
CHECK_COUNTS = {
    "reconcile": {
        "events": "Events listed from Stripe's Events API.",
        "confirmed": "Accounts whose disconnection a listed event confirmed.",
    },
    "verify": {
        "verified": "Accounts read back from Stripe disconnected, inactive or gone.",
        "reactivated": "Accounts recorded disconnected that Stripe reported active again.",
        "unreadable": "Accounts that could not be read back.",
    },
}
# The job's state after each, as gauges (bulkdisconnect_<name>).
CHECK_GAUGES = {
    "reconcile": {
        "confirmed_accounts": "The job's accounts whose disconnection an event confirmed.",
        "unconfirmed_accounts": "The job's disconnected accounts no event confirmed yet.",
    },
    "verify": {
        "verified_accounts": "The job's accounts read back disconnected, inactive or gone.",
        "reactivated_accounts": "The job's accounts recorded disconnected that Stripe reports "
        "active: alert on any.",
    },
}


class CheckMetrics(_Published):
    """The metrics of a `reconcile` or `verify` of a job: its own counts and the job's state
    after it, and (standalone) its requests and exit code, all named after the command
    (bulkdisconnect_reconcile_requests_total, ...) so that its textfile sits beside the run's
    without a clash. Pushed, it groups under job_name and command.

    `registry` (a run's, for `run --reconcile`) adds the counts and the job's state to it; the
    run then publishes them with its own, and counts the requests itself.
    """

    def __init__(
        self,
        job: str,
        command: str,
        settings: MetricsSettings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        standalone = registry is None
        registry = registry or CollectorRegistry(auto_describe=True)
        super().__init__(job, settings, registry, {"job_name": job, "command": command})
        prefix = f"bulkdisconnect_{command}_"

        def counter(name: str, doc: str) -> Any:
            return Counter(prefix + name, doc, ["job_name"], registry=registry).labels(job)

        self._counts = {name: counter(name, doc) for name, doc in CHECK_COUNTS[command].items()}
        self._gauges = {
            name: Gauge(f"bulkdisconnect_{name}", doc, ["job_name"], registry=registry).labels(job)
            for name, doc in CHECK_GAUGES[command].items()
        }
        self._requests: dict[str, Any] = {}
        self._sent = {"requests": 0, "retries": 0, "rate_limited": 0}
        self._exit_code: Gauge | None = None
        self._last_success: Gauge | None = None
        if standalone:
            self._requests = {
                "requests": counter("requests", "HTTP attempts sent to Stripe."),
                "retries": counter("retries", "Attempts that were retried."),
                "rate_limited": counter("rate_limited", "429 answers from Stripe."),
            }
            self._exit_code = Gauge(
                prefix + "last_exit_code", "Exit code of the last one.", ["job_name"],
                registry=registry,
            )  # fmt: skip
            self._last_success = Gauge(
                prefix + "last_success_timestamp_seconds",
                "Unix time at which the last one that exited 0 ended.",
                ["job_name"],
                registry=registry,
            )

    def count(self, **counts: int) -> None:
        """Add to this command's counts (names of CHECK_COUNTS)."""
        for name, n in counts.items():
            self._counts[name].inc(n)

    def set_job(self, **values: int) -> None:
        """The job's state now (names of CHECK_GAUGES)."""
        for name, value in values.items():
            self._gauges[name].set(value)

    def sent(self, stats: RunStats) -> None:
        """Catch the request counters up with the stats of the meters and retry loop."""
        for name, counter in self._requests.items():
            total = int(getattr(stats, name))
            counter.inc(total - self._sent[name])
            self._sent[name] = total

    def finish(self, exit_code: int) -> None:
        """Record how it ended, and when if it succeeded (standalone only)."""
        if self._exit_code is not None:
            self._exit_code.labels(self._job).set(exit_code)
        if self._last_success is not None and exit_code == 0:
            self._last_success.labels(self._job).set(time.time())


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


def check_metrics(
    job: str, command: str, *, file: str | None, pushgateway: str | None
) -> CheckMetrics | None:
    """Metrics for `reconcile` or `verify`, when a textfile or a Pushgateway asks for them."""
    metrics = CheckMetrics(
        job, command, MetricsSettings(file=Path(file) if file else None, pushgateway=pushgateway)
    )
    return metrics if metrics.enabled else None


def _metric(kind: type[Metric], name: str, doc: str, *, registry: CollectorRegistry) -> Metric:
    """A `bulkdisconnect_` counter or gauge labelled by job (and, for accounts, by outcome)."""
    labels = ["job_name", "outcome"] if name == "accounts" else ["job_name"]
    return kind(f"bulkdisconnect_{name}", doc, labels, registry=registry)
