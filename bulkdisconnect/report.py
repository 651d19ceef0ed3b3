"""What people read: the plan, the end-of-run summary, `status`, and the per-account report."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import AsyncIterator
from dataclasses import astuple, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, TextIO

from bulkdisconnect.errors import ExitCode
from bulkdisconnect.model import Outcome, RunStats
from bulkdisconnect.store import (
    LaneCounts,
    LockInfo,
    PlanCounts,
    ReconcileProgress,
    ReportRow,
    RunInfo,
    VerifyCounts,
    VerifyPass,
    shown_location,
)

if TYPE_CHECKING:
    from bulkdisconnect.config import RunConfig

REPORT_COLUMNS = [
    "account_id",
    "outcome",
    "attempts",
    "http_status",
    "error_code",
    "request_id",
    "updated_at",
    "error_message",
    "first_attempt_at",
    "confirmed_at",
    "event_id",
    "stripe_account",  # '' for the job's own account (its --stripe-account, or the platform)
    "verified_at",  # when `verify` last read the account back from Stripe
    "verified_status",  # what Stripe reported then: active (flagged), inactive, disconnected
]
# `status` lists this many connected accounts, those with most accounts to call first.
STATUS_ACCOUNTS = 20


class ReadStore(Protocol):
    """What `status` and `report` read from the store."""

    async def counts(self, job: str) -> dict[str | None, int]:
        """Accounts per outcome (None: still to call)."""
        ...

    async def confirmed_count(self, job: str) -> int:
        """Accounts a webhook event confirmed."""
        ...

    async def lane_counts(self, job: str) -> list[LaneCounts]:
        """Accounts per Stripe account and outcome, most still to call first."""
        ...

    async def unknown_events(self, job: str) -> int:
        """Events received for accounts outside the job."""
        ...

    async def last_run(self, job: str) -> RunInfo | None:
        """The job's most recent run."""
        ...

    async def verify_counts(self, job: str) -> VerifyCounts:
        """Accounts read back verified, reactivated, never read back."""
        ...

    async def last_verify_pass(self, job: str) -> VerifyPass | None:
        """The job's latest verify pass."""
        ...

    async def reconcile_progress(self, job: str) -> list[ReconcileProgress]:
        """How far reconcile read each Stripe account's events."""
        ...

    async def locks(self, job: str) -> list[LockInfo]:
        """The job's lock holders, live or stale."""
        ...

    def rows(self, job: str, *, unconfirmed: bool = False) -> AsyncIterator[ReportRow]:
        """Every account of the job in input order."""
        ...


def format_plan(job: str, counts: PlanCounts, *, dry_run: bool) -> str:
    """One line saying what the input holds and what will be called."""
    head = "plan (dry run, nothing called)" if dry_run else "plan"
    return (
        f"{head} for job {job}: read {counts.read}, invalid {counts.invalid}, "
        f"duplicates {counts.duplicates}, already done {counts.already_done}, "
        f"to call {counts.to_call}\n"
    )


def format_summary(
    config: RunConfig,
    stats: RunStats,
    job_counts: dict[str | None, int],
    elapsed: float,
    exit_code: ExitCode,
) -> str:
    """The end-of-run summary: this run's outcomes, rate, retries, the job's totals."""
    this_run = ", ".join(f"{o.value} {n}" for o, n in stats.outcomes.items())
    rate = stats.requests / elapsed if elapsed > 0 else 0.0
    lines = [
        f"run of job {config.job} ended with exit code {int(exit_code)} ({exit_code.meaning})",
        f"  this run: {this_run}",
        (
            f"  requests {stats.requests} in {elapsed:.1f}s ({rate:.1f}/s, cap {config.rate:g}/s),"
            f" retries {stats.retries}, 429s {stats.rate_limited}"
        ),
        f"  job totals: {format_counts(job_counts)}",
        *(
            f"  stopped for {account or 'the own account'}: {reason}"
            for account, reason in sorted(stats.refused.items())
        ),
        (
            f"  report: bulkdisconnect report --job {config.job} "
            f"--state {shown_location(config.state)}"
        ),
    ]
    return "\n".join(lines) + "\n"


def format_counts(counts: dict[str | None, int]) -> str:
    """Counts per outcome, pending last."""
    parts = [f"{o.value} {counts.get(o.value, 0)}" for o in Outcome]
    parts.append(f"pending {counts.get(None, 0)}")
    return ", ".join(parts)


def format_lanes(lanes: list[LaneCounts]) -> str:
    """Counts per connected account: the STATUS_ACCOUNTS with most to call, then the rest."""
    lines = [f"  per Stripe account ({len(lanes)}), most to call first:"]
    lines += [
        f"    {lane.stripe_account or '(own)'}: {format_counts(lane.counts)}"
        for lane in lanes[:STATUS_ACCOUNTS]
    ]
    rest = lanes[STATUS_ACCOUNTS:]
    if rest:
        total: dict[str | None, int] = {}
        for lane in rest:
            for outcome, n in lane.counts.items():
                total[outcome] = total.get(outcome, 0) + n
        lines.append(f"    {len(rest)} more: {format_counts(total)}")
    return "\n".join(lines) + "\n"


async def write_status(store: ReadStore, job: str, out: TextIO) -> None:
    """Counts per outcome, the last run and whether a run holds the lock now."""
    counts = await store.counts(job)
    out.write(f"job {job}: {sum(counts.values())} accounts\n  {format_counts(counts)}\n")
    lanes = await store.lane_counts(job)
    if len(lanes) > 1:
        out.write(format_lanes(lanes))
    confirmed = await store.confirmed_count(job)
    unconfirmed = counts.get(Outcome.DISCONNECTED.value, 0) - confirmed
    unknown = await store.unknown_events(job)
    out.write(
        f"  confirmations (webhook, reconcile): confirmed {confirmed}, unconfirmed "
        f"{max(unconfirmed, 0)}; events for accounts outside the job {unknown}\n"
    )
    out.write(await _checks(store, job))
    run = await store.last_run(job)
    if run is not None:
        ended = (
            f"ended {_when(run.finished_at)} with exit code {run.exit_code}"
            if run.finished_at is not None
            else "did not finish (still running, or killed)"
        )
        out.write(f"  last run {run.run_id}: started {_when(run.started_at)}, {ended}\n")
    holders = await store.locks(job)
    if not holders:
        out.write("  not running\n")
    for lock in holders:
        state = "alive" if lock.live else "stale: the run is gone; the next run takes over"
        held = "worked by --join worker" if lock.shared else "locked by"
        out.write(
            f"  {held} pid {lock.pid} on {lock.host}, heartbeat {lock.age:.0f}s ago ({state})\n"
        )


async def _checks(store: ReadStore, job: str) -> str:
    """What reconcile and verify found of the job: how far the events were read, the accounts
    read back verified, reactivated (flagged), never read back."""
    lines = []
    progress = await store.reconcile_progress(job)
    if progress:
        upto = [p.created_upto for p in progress if p.created_upto is not None]
        read = f"read up to {_when(min(upto))}" if len(upto) == len(progress) else "read in part"
        cut = sum(p.cursor is not None for p in progress)
        lines.append(
            f"  reconcile: events {read} ({sum(p.events for p in progress)} listed"
            f"{f'; {cut} pass(es) cut short, a rerun goes on' if cut else ''})"
        )
    counts = await store.verify_counts(job)
    last = await store.last_verify_pass(job)
    passed = ""
    if last is not None:
        ended = "ended" if last.finished_at is not None else "not ended: a rerun goes on"
        passed = f"; last pass {last.pass_id} ({last.selection}) {ended}"
    lines.append(
        f"  read back (verify): verified {counts.verified}, reactivated {counts.reactivated}, "
        f"never read back {counts.unverified}{passed}"
    )
    if counts.reactivated:
        lines.append(
            f"  REACTIVATED: {counts.reactivated} accounts recorded disconnected are active at "
            "Stripe again (report: verified_status active)"
        )
    return "".join(f"{line}\n" for line in lines)


async def write_report(
    store: ReadStore, job: str, out: TextIO, fmt: str, *, unconfirmed: bool = False
) -> int:
    """Stream one row per account in CSV or JSONL; returns the number of rows.

    With `unconfirmed`, only disconnected accounts no webhook event has confirmed yet.
    """
    names = [f.name for f in fields(ReportRow)]
    order = [names.index(c) for c in REPORT_COLUMNS]
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(REPORT_COLUMNS)
    count = 0
    stamped = ("updated_at", "first_attempt_at", "confirmed_at", "verified_at")
    times = [REPORT_COLUMNS.index(c) for c in stamped]
    async for row in store.rows(job, unconfirmed=unconfirmed):
        values = astuple(row)
        ordered = [values[i] for i in order]
        for i in times:
            ordered[i] = _iso(ordered[i])
        if writer is not None:
            writer.writerow(ordered)
        else:
            out.write(json.dumps(dict(zip(REPORT_COLUMNS, ordered, strict=True))) + "\n")
        count += 1
    return count


def _iso(timestamp: float | None) -> str | None:
    """An audit timestamp: ISO 8601 UTC with milliseconds."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))
