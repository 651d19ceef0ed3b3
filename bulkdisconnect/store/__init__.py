"""The result store: one durable outcome per (job, account), the job's lock, and its runs.

A store is picked by URL scheme from `STORES`; today only SQLite (`state/<job>.sqlite`).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bulkdisconnect.model import ItemResult, Settled


@dataclass(frozen=True, slots=True)
class PlanCounts:
    """What planning an input into a job found."""

    read: int  # values read from the source
    invalid: int  # unique values of this input that failed validation (recorded invalid_id)
    duplicates: int  # values seen earlier in the same input
    already_done: int  # unique valid values the job already holds a final outcome for
    to_call: int  # accounts of the job still to be called after planning


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One account's recorded outcome, as `report` prints it."""

    account_id: str
    outcome: str | None
    attempts: int
    http_status: int | None
    error_code: str | None
    error_message: str | None
    request_id: str | None
    first_attempt_at: float | None
    updated_at: float | None
    confirmed_at: float | None  # when the financial_connections.account.disconnected event came
    event_id: str | None  # that event's ID


class Confirmation(enum.Enum):
    """What a `financial_connections.account.disconnected` event did to the store."""

    CONFIRMED = "confirmed"  # recorded on the account's outcome
    REPLAYED = "replayed"  # this event ID was seen before: ignored
    UNKNOWN = "unknown"  # the account is not in the job: acknowledged, counted, not stored


@dataclass(frozen=True, slots=True)
class LockInfo:
    """Who holds a job's lock and when it last showed it is alive."""

    owner: str
    pid: int
    host: str
    heartbeat_at: float
    lease: float  # seconds without a heartbeat after which another run may take it over


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run of a job, as `status` shows it."""

    run_id: str
    started_at: float
    finished_at: float | None
    exit_code: int | None
    summary: str | None


class Store(Protocol):
    """Durable per-account outcomes for jobs, a lock per job, and the runs' history."""

    async def aclose(self) -> None: ...

    async def acquire_lock(self, job: str, owner: str, *, stale_after: float) -> None: ...
    async def heartbeat(self, job: str, owner: str) -> bool: ...
    async def release_lock(self, job: str, owner: str) -> None: ...
    async def lock_info(self, job: str) -> LockInfo | None: ...

    async def plan(
        self,
        job: str,
        chunks: AsyncIterator[Sequence[str | Settled]],
        *,
        retry_failed: bool,
        dry_run: bool,
    ) -> PlanCounts: ...
    async def stage(
        self, job: str, chunks: AsyncIterator[Sequence[str | Settled]], *, retry_failed: bool
    ) -> PlanCounts: ...
    async def commit_staged(self, job: str) -> None: ...
    async def discard_staged(self) -> None: ...
    async def customer_listed(self, job: str, customer: str) -> bool: ...
    async def mark_customer_listed(self, job: str, customer: str) -> None: ...
    async def claim_pending(
        self, job: str, run_id: str, *, after: int, limit: int, retry_failed: bool
    ) -> list[tuple[int, str]]: ...
    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None: ...
    async def release_outcomes(self, job: str, run_id: str, outcomes: Sequence[str]) -> int: ...

    async def counts(self, job: str) -> dict[str | None, int]: ...
    async def confirmed_count(self, job: str) -> int: ...
    def rows(self, job: str, *, unconfirmed: bool = False) -> AsyncIterator[ReportRow]: ...
    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation: ...
    async def start_run(self, job: str, run_id: str) -> None: ...
    async def finish_run(self, run_id: str, exit_code: int, summary: str) -> None: ...
    async def last_run(self, job: str) -> RunInfo | None: ...
    async def has_job(self, job: str) -> bool: ...


async def open_store(location: str | Path) -> Store:
    """Open the store at a path (SQLite) or URL; created if missing."""
    from bulkdisconnect.store.sqlite import SQLiteStore

    text = str(location)
    if text.startswith("sqlite:///"):
        text = text.removeprefix("sqlite:///")
    return await SQLiteStore.open(Path(text))
