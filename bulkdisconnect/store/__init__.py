"""The result store: one durable outcome per (job, account), the job's lock, and its runs.

Two implementations with the same semantics, picked by the location's form: SQLite (a path,
`state/<job>.sqlite` by default) for one process, and PostgreSQL (`postgresql://...`) which
several `run --join` workers on several machines can share.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bulkdisconnect.model import MAX_ACCOUNT_ID_LENGTH, ItemResult, Settled


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
    UNKNOWN = "unknown"  # the account is not in the job: acknowledged, counted, not kept


@dataclass(frozen=True, slots=True)
class LockInfo:
    """Who holds a job's lock and when it last showed it is alive."""

    owner: str
    pid: int
    host: str
    heartbeat_at: float
    lease: float  # seconds without a heartbeat after which another run may take it over
    shared: bool  # a `run --join` worker, one of several sharing the job


@dataclass(frozen=True, slots=True)
class Beat:
    """What a heartbeat learned about the job's live lock holders."""

    workers: int  # live holders, this one included: each takes 1/workers of --rate
    ready: bool  # every other live holder already runs at (at most) that share


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

    async def acquire_lock(
        self, job: str, owner: str, *, stale_after: float, join: bool = False, source: str = ""
    ) -> None: ...
    async def heartbeat(self, job: str, owner: str) -> Beat | None: ...
    async def release_lock(self, job: str, owner: str) -> None: ...
    async def locks(self, job: str) -> list[LockInfo]: ...
    # Entered by `run --join` workers around planning: yields whether this one must plan the
    # input (the first of the live workers to get there); the others find it planned.
    def planning(self, job: str, owner: str) -> AbstractAsyncContextManager[bool]: ...

    async def stage(
        self, job: str, chunks: AsyncIterator[Sequence[str | Settled]], *, retry_failed: bool
    ) -> PlanCounts: ...
    async def commit_staged(self, job: str, *, retry_failed: bool) -> None: ...
    async def discard_staged(self) -> None: ...
    async def customer_listed(self, job: str, customer: str) -> bool: ...
    async def mark_customer_listed(self, job: str, customer: str) -> None: ...
    async def claim_pending(self, job: str, run_id: str, *, limit: int) -> list[str]: ...
    # Whether accounts are still to call that this run cannot claim now: held by another
    # live worker, or by a dead one until its lease runs out.
    async def pending_elsewhere(self, job: str, run_id: str) -> bool: ...
    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None: ...
    async def release_outcomes(self, job: str, run_id: str, outcomes: Sequence[str]) -> int: ...

    async def counts(self, job: str) -> dict[str | None, int]: ...
    async def confirmed_count(self, job: str) -> int: ...
    async def unknown_events(self, job: str) -> int: ...
    def rows(self, job: str, *, unconfirmed: bool = False) -> AsyncIterator[ReportRow]: ...
    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation: ...
    async def start_run(self, job: str, run_id: str) -> None: ...
    async def finish_run(self, run_id: str, exit_code: int, summary: str) -> None: ...
    async def last_run(self, job: str) -> RunInfo | None: ...
    async def has_job(self, job: str) -> bool: ...


async def plan_input(
    store: Store,
    job: str,
    chunks: AsyncIterator[Sequence[str | Settled]],
    *,
    retry_failed: bool,
    dry_run: bool,
) -> PlanCounts:
    """Stage an input and count it, then merge it into the job (or, dry, discard it)."""
    counts = await store.stage(job, chunks, retry_failed=retry_failed)
    if dry_run:
        await store.discard_staged()
    else:
        await store.commit_staged(job, retry_failed=retry_failed)
    return counts


def stored_value(value: str) -> str:
    """An input value as a store records it: at most 255 characters, NUL shown as U+FFFD.

    Only invalid values can be long or hold a NUL (which PostgreSQL text cannot store); they
    are kept for the audit, readable.
    """
    return value[:MAX_ACCOUNT_ID_LENGTH].replace("\0", "\ufffd")


def is_shared_location(location: str | Path) -> bool:
    """Whether a store location is a PostgreSQL URL (shareable by `run --join` workers)."""
    return str(location).startswith(("postgresql://", "postgres://"))


def shown_location(location: str | Path) -> str:
    """A store location fit for output and logs: a URL's password masked."""
    from bulkdisconnect.logs import mask_url

    return mask_url(str(location)) if is_shared_location(location) else str(location)


async def open_store(location: str | Path, *, create: bool = True) -> Store:
    """Open the store at a path or sqlite:/// URL, or a PostgreSQL URL; created if missing.

    With `create` false a missing SQLite file is not created: an empty store in memory
    stands in for it (a dry run compares its input with nothing, and writes nothing).
    """
    if is_shared_location(location):
        from bulkdisconnect.store.postgres import PostgresStore

        return await PostgresStore.open(str(location))
    from bulkdisconnect.store.sqlite import SQLiteStore

    return await SQLiteStore.open(Path(str(location).removeprefix("sqlite:///")), create=create)
