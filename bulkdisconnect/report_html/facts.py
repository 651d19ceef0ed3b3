"""What the HTML report says, read from the store: counts, runs, activity over time, failures.

Nothing here grows with the job: the database counts (per outcome, per connected account, per
time bucket) and hands over at most PROBLEM_ROWS accounts; the run's samples are a few rows a
minute per run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bulkdisconnect.store import (
    LaneCounts,
    LockInfo,
    ReconcileProgress,
    ReportRow,
    RunInfo,
    VerifyCounts,
)

# The failed and invalid accounts listed by name; the page counts the rest.
PROBLEM_ROWS = 1000
# Runs listed; a job scheduled for years counts the rest.
RUN_ROWS = 500
# (outcome, status, code) groups of failures listed.
PROBLEM_CODES = 50
# About this many bars across a chart, whatever the job's length.
BUCKETS = 120
# Bucket widths a reader takes in at a glance, in seconds: none finer than the runs' samples
# (sampler.SAMPLE_EVERY) or than what batched writes of outcomes can tell apart.
NICE_WIDTHS = (
    5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
    3600, 7200, 10800, 21600, 43200, 86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400,
)  # fmt: skip

# (run_id, at, requests, rate_limited, disconnected, target_rate): one sample of a run's
# cumulative counters, as `SqlStore.samples` returns them.
Sample = tuple[str, float, int, int, int, float]


class AuditStore(Protocol):
    """What the HTML report reads from the store."""

    async def job_source(self, job: str) -> str | None:
        """What the job's last run read its accounts from."""
        ...

    async def lane_counts(self, job: str) -> list[LaneCounts]:
        """Accounts per connected account and outcome, most still to call first."""
        ...

    async def confirmed_count(self, job: str) -> int:
        """Accounts a Stripe event confirmed."""
        ...

    async def unknown_events(self, job: str) -> int:
        """Events received for accounts outside the job."""
        ...

    async def verify_counts(self, job: str) -> VerifyCounts:
        """Accounts read back verified, reactivated, never read back."""
        ...

    async def reconcile_progress(self, job: str) -> list[ReconcileProgress]:
        """How far reconcile read each Stripe account's events."""
        ...

    async def locks(self, job: str) -> list[LockInfo]:
        """The job's lock holders, live or stale."""
        ...

    async def runs(self, job: str, *, limit: int) -> tuple[list[RunInfo], int]:
        """The job's first `limit` runs, oldest first, and how many in all."""
        ...

    async def disconnected_span(self, job: str) -> tuple[float, float] | None:
        """When the first and last disconnect were recorded."""
        ...

    async def disconnected_buckets(
        self, job: str, *, start_ms: int, width_ms: int
    ) -> dict[int, int]:
        """Disconnects per time bucket."""
        ...

    async def problem_rows(self, job: str, *, limit: int) -> list[ReportRow]:
        """The first failed and invalid_id accounts, in input order."""
        ...

    async def problem_codes(
        self, job: str, *, limit: int
    ) -> list[tuple[str, int | None, str | None, int]]:
        """Failed and invalid_id accounts per (outcome, HTTP status, error code)."""
        ...

    async def samples(self, job: str) -> Sequence[Sample]:
        """Every run's counters, sampled while it worked."""
        ...


@dataclass(frozen=True, slots=True)
class Timeline:
    """The job's activity in equal time buckets: bucket i covers start + i * width."""

    start: float  # epoch seconds
    width: float  # seconds
    disconnected: list[int]  # disconnects recorded in the bucket (the store's updated_at)
    rate_limited: list[float]  # 429 answers received in it (from the runs' samples)
    request_rate: list[float]  # requests per second, averaged over the bucket
    target_rate: list[float]  # the pacers' target, summed over runs, averaged likewise
    sampled: bool  # whether any run recorded samples (runs before the sampler did not)


@dataclass(frozen=True, slots=True)
class Audit:
    """Everything the page shows of one job."""

    job: str
    store: str  # where the store is, a URL's password masked
    source: str | None  # what the job's last run read its accounts from
    generated_at: float
    counts: dict[str | None, int]
    lanes: list[LaneCounts]
    confirmed: int
    unknown_events: int
    holders: list[LockInfo]
    runs: list[RunInfo]
    run_total: int
    timeline: Timeline | None
    problems: list[ReportRow]
    problem_codes: list[tuple[str, int | None, str | None, int]]
    verified: VerifyCounts
    reconciled: list[ReconcileProgress]  # per Stripe account; empty: never reconciled

    @property
    def total(self) -> int:
        """Accounts in the job."""
        return sum(self.counts.values())

    @property
    def problem_total(self) -> int:
        """Failed and invalid_id accounts in the job."""
        return self.counts.get("failed", 0) + self.counts.get("invalid_id", 0)


async def gather(store: AuditStore, job: str, *, location: str) -> Audit:
    """Read what the page shows of `job`."""
    runs, run_total = await store.runs(job, limit=RUN_ROWS)
    lanes = await store.lane_counts(job)
    counts: dict[str | None, int] = {}
    for lane in lanes:  # the job's counts, without reading its accounts once more
        for outcome, n in lane.counts.items():
            counts[outcome] = counts.get(outcome, 0) + n
    return Audit(
        job=job,
        store=location,
        source=await store.job_source(job),
        generated_at=time.time(),
        counts=counts,
        lanes=lanes,
        confirmed=await store.confirmed_count(job),
        unknown_events=await store.unknown_events(job),
        verified=await store.verify_counts(job),
        reconciled=await store.reconcile_progress(job),
        holders=await store.locks(job),
        runs=runs,
        run_total=run_total,
        timeline=await timeline(store, job),
        problems=await store.problem_rows(job, limit=PROBLEM_ROWS),
        problem_codes=await store.problem_codes(job, limit=PROBLEM_CODES),
    )


async def timeline(store: AuditStore, job: str) -> Timeline | None:
    """The job's disconnects, 429s and request rate over time; None before any activity."""
    samples = sorted(await store.samples(job), key=lambda s: (s[0], s[1]))
    span = await store.disconnected_span(job)
    edges = [t for t in (span or ()) if t > 0] + [s[1] for s in samples]
    if not edges:
        return None
    width = bucket_width(max(edges) - min(edges))
    width_ms = round(width * 1000)
    start_ms = math.floor(min(edges) * 1000 / width_ms) * width_ms
    start = start_ms / 1000
    count = int((max(edges) - start) // width) + 1
    disconnected = [0] * count
    if span is not None:
        found = await store.disconnected_buckets(job, start_ms=start_ms, width_ms=width_ms)
        for bucket, n in found.items():
            disconnected[min(max(bucket, 0), count - 1)] += n
    rate_limited, requests, target = spread_samples(samples, start, width, count)
    return Timeline(
        start=start,
        width=width,
        disconnected=disconnected,
        rate_limited=rate_limited,
        request_rate=[n / width for n in requests],
        target_rate=[t / width for t in target],
        sampled=bool(samples),
    )


def bucket_width(span: float) -> float:
    """The smallest readable width that cuts `span` seconds into about BUCKETS buckets."""
    wanted = span / BUCKETS
    return float(next((w for w in NICE_WIDTHS if w >= wanted), math.ceil(wanted / 86400) * 86400))


def spread_samples(
    samples: Sequence[Sample], start: float, width: float, count: int
) -> tuple[list[float], list[float], list[float]]:
    """429s, requests, and target-rate-seconds per bucket, from each run's consecutive samples.

    What a run did between two samples is spread evenly over the time between them, so the
    buckets may be narrower than the sampling interval. Runs sharing a job (`--join`) add up.
    """
    rate_limited = [0.0] * count
    requests = [0.0] * count
    target = [0.0] * count
    for before, after in itertools.pairwise(samples):
        if before[0] != after[0] or after[1] <= before[1]:
            continue  # another run's first sample, or no time between them
        t0, t1 = before[1], after[1]
        got_requests = max(after[2] - before[2], 0)
        got_429s = max(after[3] - before[3], 0)
        first = max(int((t0 - start) // width), 0)
        last = min(int((t1 - start) // width), count - 1)
        for bucket in range(first, last + 1):
            left = start + bucket * width
            overlap = min(t1, left + width) - max(t0, left)
            if overlap <= 0:
                continue
            share = overlap / (t1 - t0)
            requests[bucket] += got_requests * share
            rate_limited[bucket] += got_429s * share
            target[bucket] += after[5] * overlap
    return rate_limited, requests, target
