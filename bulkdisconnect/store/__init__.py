"""The result store: one durable outcome per (job, account), the job's lease, and its runs.

    core.py       SqlStore: the semantics, once, over a dialect
    evidence.py   its proof of purge: confirmations, reconcile's progress, verify, samples
    guarded.py    store calls that ride out a database failing in passing
    queries.sql   every statement both stores run, by name
    sqlite.py     SQLite (a path, `state/<job>.sqlite` by default): one process a job
    postgres.py   PostgreSQL (`postgresql://...`): shared by `run --join` workers

`open_store` picks the dialect by the location's form. Consumers type the store by the small
protocol they need, declared next to them (pool.py, lease.py, planning.py, webhook.py,
report.py); this module holds the values they exchange.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from bulkdisconnect.model import MAX_ACCOUNT_ID_LENGTH

if TYPE_CHECKING:
    from bulkdisconnect.store.core import SqlStore


@dataclass(frozen=True, slots=True)
class PlanCounts:
    """What planning an input into a job found."""

    read: int  # values read from the source
    invalid: int  # unique values of this input that failed validation (recorded invalid_id)
    duplicates: int  # values seen earlier in the same input
    already_done: int  # unique valid values the job already holds a final outcome for
    to_call: int  # accounts of the job still to be called after planning
    # Outcomes the merge records without a call: invalid values new to the job, and accounts
    # a Stripe list showed already disconnected that were not final yet.
    new_invalid: int = field(default=0, compare=False)
    new_settled: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One account's recorded outcome, as `report` prints it."""

    stripe_account: str  # '' for the job's own account (its --stripe-account, or none)
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
    verified_at: float | None = None  # when `verify` last read the account back
    verified_status: str | None = None  # what Stripe said then: active, inactive, disconnected


class Confirmation(enum.Enum):
    """What a `financial_connections.account.disconnected` event did to the store."""

    CONFIRMED = "confirmed"  # recorded on the account's outcome
    REPLAYED = "replayed"  # this event ID was seen before: ignored
    UNKNOWN = "unknown"  # the account is not in the job: acknowledged, counted, not kept


@dataclass(frozen=True, slots=True)
class LaneCounts:
    """One connected account's accounts in a job, per outcome (None: still to call)."""

    stripe_account: str  # '' for the job's own
    counts: dict[str | None, int]

    @property
    def pending(self) -> int:
        """Accounts still to call."""
        return self.counts.get(None, 0)


@dataclass(frozen=True, slots=True)
class LockInfo:
    """Who holds a job's lock and when it last showed it is alive."""

    owner: str
    pid: int
    host: str
    heartbeat_at: float
    lease: float  # seconds without a heartbeat after which another run may take it over
    shared: bool  # a `run --join` worker, one of several sharing the job
    source: str  # its source arguments, fingerprinted
    age: float  # seconds since its last heartbeat, by the store's clock

    @property
    def live(self) -> bool:
        """Whether its lease still runs."""
        return self.age < self.lease


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


class LaneSpan(NamedTuple):
    """One connected account's accounts of a job that a call was made for."""

    first_attempt_at: float | None  # the first of their first attempts (None: no call yet)
    unconfirmed: int  # recorded disconnected, no event confirming it yet


class Cursor(NamedTuple):
    """Where a reconcile pass cut short goes on: after `last_event_id`, down to `floor`."""

    last_event_id: str
    floor: int  # the oldest `created` it reads (unix seconds)
    top: int | None  # the newest `created` it saw


@dataclass(frozen=True, slots=True)
class ReconcileProgress:
    """How far `reconcile` read one connected account's events."""

    stripe_account: str  # '' for the job's own
    created_upto: int | None  # every event created before this was read (None: no pass ended)
    cursor: Cursor | None  # a pass cut short
    events: int  # listed in all
    pages: int
    at: float  # last progress


class Listed(NamedTuple):
    """A disconnected event as `reconcile` read it: its account, its ID, when Stripe made it."""

    account_id: str
    event_id: str
    created: float


class ReadBack(NamedTuple):
    """What Stripe reported for one account `verify` read back."""

    stripe_account: str
    account_id: str
    status: str  # active, inactive, disconnected; not_found when Stripe has no such account
    at: float


@dataclass(frozen=True, slots=True)
class VerifyPass:
    """One `verify` pass: a selection of the job's accounts read back once."""

    pass_id: str
    selection: str  # unconfirmed, all, or sample:N
    started_at: float
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class VerifyCounts:
    """What `verify` found of a job, over all its passes (the latest read of each account)."""

    verified: int  # read back not active: disconnected, inactive, or gone
    reactivated: int  # recorded disconnected, and Stripe reported it active
    unverified: int  # recorded disconnected, never read back


class Forgotten(NamedTuple):
    """What `forget` deleted of a job."""

    accounts: int
    runs: int
    confirmations: int  # webhook events kept for replay protection


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


async def open_store(
    location: str | Path, *, create: bool = True, read_only: bool = False
) -> SqlStore:
    """Open the store at a path or sqlite:/// URL, or a PostgreSQL URL; created if missing.

    With `create` false a missing SQLite file is not created: an empty store in memory
    stands in for it (a dry run compares its input with nothing, and writes nothing).
    `read_only` (status, report) opens an existing store without writing or locking anything,
    even its layout: a file the user may only read, or one a run is writing, reads fine.
    """
    from bulkdisconnect.store.core import SqlStore

    if is_shared_location(location):
        from bulkdisconnect.store.postgres import PostgresDialect

        shared = await PostgresDialect.connect(str(location), read_only=read_only)
        return await SqlStore.open(shared, read_only=read_only)
    from bulkdisconnect.store.sqlite import SQLiteDialect

    path = Path(str(location).removeprefix("sqlite:///"))
    local = await SQLiteDialect.connect(path, create=create, read_only=read_only)
    return await SqlStore.open(local, read_only=read_only)
