"""The store suite, run against SQLite and PostgreSQL alike: planning, claiming, recording,
reading, the job lock and run history. Then what only one of them has (the file, leases).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkdisconnect.errors import InputError, LockHeldError, UsageError
from bulkdisconnect.model import ItemResult, Outcome, Owned, is_valid_account_id
from bulkdisconnect.planning import plan_input
from bulkdisconnect.store import (
    Beat,
    Confirmation,
    Cursor,
    LaneSpan,
    Listed,
    PlanCounts,
    ReadBack,
    ReportRow,
    VerifyCounts,
    open_store,
    stored_value,
)
from bulkdisconnect.store.core import SqlStore

JOB = "purge"
HOSTILE = ["fca_../../v1/customers", "fca_1?x=1", "fca_a/b", "fca_a%2F", "fca_\u00e4", "FCA_1", ""]


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store lives: a file in the test's folder, or a schema of its own."""
    if request.param == "sqlite":
        return str(tmp_path / "s.sqlite")
    return str(request.getfixturevalue("pg_state"))


@pytest.fixture
async def store(location: str) -> AsyncIterator[SqlStore]:
    """A fresh store of each kind."""
    async for opened in _opened(location):
        yield opened


async def _opened(location: str) -> AsyncIterator[SqlStore]:
    """The store at `location`, closed once the caller is done with it."""
    opened = await open_store(location)
    try:
        yield opened
    finally:
        await opened.aclose()


async def chunks(*parts: Sequence[str | Owned]) -> AsyncIterator[Sequence[str | Owned]]:
    """Feed values to `plan` in the given chunks."""
    for part in parts:
        yield part


async def plan(
    store: SqlStore, *parts: Sequence[str], job: str = JOB, retry_failed: bool = False
) -> PlanCounts:
    """Plan chunks into the job for real."""
    return await plan_input(store, job, chunks(*parts), retry_failed=retry_failed)


async def all_rows(store: SqlStore, job: str = JOB) -> list[ReportRow]:
    """Every report row of the job."""
    return [row async for row in store.rows(job)]


async def hold(store: SqlStore, run_id: str, job: str = JOB) -> None:
    """Make `run_id` the job's holder, as a run that took the job over: only a holder claims."""
    holders = await store.locks(job)
    if any(h.owner == run_id and h.live for h in holders):
        return
    for h in holders:
        await store.release_lock(job, h.owner)
    await store.acquire_lock(job, run_id, stale_after=30)


async def claim(store: SqlStore, run_id: str, *, limit: int, job: str = JOB) -> list[str]:
    """Claim a page for a run, as the job's holder."""
    await hold(store, run_id, job)
    return await store.claim(job, run_id, limit=limit)


async def claim_all(store: SqlStore, run_id: str, *, job: str = JOB) -> list[str]:
    """Claim every pending account of the job for a run, in pages."""
    claimed: list[str] = []
    while page := await claim(store, run_id, limit=3, job=job):
        claimed.extend(page)
    return claimed


async def settle(
    store: SqlStore, run_id: str, results: Sequence[ItemResult], job: str = JOB
) -> None:
    """A run that claims what is pending, records `results` and lets the job go."""
    await claim_all(store, run_id, job=job)
    await store.record(job, run_id, results)
    await store.release_lock(job, run_id)


async def age(location: str, owner: str, seconds: float) -> None:
    """Move a holder's last heartbeat `seconds` into the past, as if time had passed."""
    sql = (
        "UPDATE locks SET heartbeat_at = heartbeat_at - {}, acquired_at = acquired_at - {} "
        "WHERE owner = {}"
    )
    if location.startswith("postgresql://"):
        url, _, schema = location.partition("?schema=")
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            await conn.execute(sql.format("$1", "$1", "$2"), seconds, owner)
        finally:
            await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(location)) as db, db:
            db.execute(sql.format("?", "?", "?"), (seconds, seconds, owner))


async def raw_sql(location: str, sql: str) -> list[tuple[Any, ...]]:
    """Run `sql` (statements separated by ';', no parameters) straight on the store's
    database; the rows of the last one."""
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    if location.startswith("postgresql://"):
        url, _, schema = location.partition("?schema=")
        conn = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            for statement in statements[:-1]:
                await conn.execute(statement)
            return [tuple(row) for row in await conn.fetch(statements[-1])]
        finally:
            await conn.close()
    with contextlib.closing(sqlite3.connect(location)) as db, db:
        for statement in statements[:-1]:
            db.execute(statement)
        return db.execute(statements[-1]).fetchall()


def ids(count: int, prefix: str = "a") -> list[str]:
    """`count` distinct valid account IDs in a stable order."""
    return [f"fca_{prefix}{n:06d}" for n in range(count)]


def result(account: str, outcome: Outcome, attempts: int = 1, **extra: Any) -> ItemResult:
    """An ItemResult with defaults for the fields a test does not care about."""
    return ItemResult(account_id=account, outcome=outcome, attempts=attempts, **extra)


# -- planning ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_plan_counts_a_chunked_input(store: SqlStore) -> None:
    """Planning counts read, invalid, duplicate and to-call values across chunk boundaries."""
    counts = await plan(
        store,
        ["fca_a1", "fca_a2", "fca_../../v1/customers"],
        ["fca_a1", "fca_1?x=1", "fca_a3"],
        ["fca_a/b", "fca_../../v1/customers", "fca_a2", "FCA_1"],
        [],
        ["fca_a4"],
    )
    assert counts == PlanCounts(read=11, invalid=4, duplicates=3, already_done=0, to_call=4)
    assert await store.counts(JOB) == {None: 4, "invalid_id": 4}


@pytest.mark.anyio
async def test_replan_counts_already_done(store: SqlStore) -> None:
    """A second plan counts values the job already finished as already_done, not to_call."""
    await plan(store, ["fca_a1", "fca_a2", "fca_a3", "bad"])
    await settle(
        store, "r1", [result("fca_a1", Outcome.DISCONNECTED), result("fca_a2", Outcome.NOT_FOUND)]
    )
    counts = await plan(store, ["fca_a1", "fca_a2", "fca_a3", "fca_a4", "fca_a1", "bad"])
    assert counts == PlanCounts(read=6, invalid=1, duplicates=1, already_done=2, to_call=2)
    assert [r.account_id for r in await all_rows(store)] == [
        "fca_a1",
        "fca_a2",
        "fca_a3",
        "bad",
        "fca_a4",
    ]


@pytest.mark.anyio
async def test_invalid_values_are_recorded_and_never_claimed(store: SqlStore) -> None:
    """Hostile values are stored as invalid_id with a reason and are never handed out to call."""
    await plan(store, ["fca_ok1", *HOSTILE, "fca_ok2"])
    claimed = await claim_all(store, "r1")
    assert claimed == ["fca_ok1", "fca_ok2"]
    await plan(store, ["fca_ok1", *HOSTILE], retry_failed=True)
    assert await claim_all(store, "r2") == ["fca_ok1", "fca_ok2"]
    invalid = [r for r in await all_rows(store) if r.outcome == "invalid_id"]
    assert sorted(r.account_id for r in invalid) == sorted(HOSTILE)
    assert all(r.error_code == "invalid_id" and r.error_message for r in invalid)
    assert all(r.attempts == 0 for r in invalid)


@pytest.mark.anyio
async def test_over_long_values_are_stored_truncated(store: SqlStore) -> None:
    """A value over 255 characters is recorded invalid, truncated to 255."""
    long_value = "fca_" + "a" * 400
    counts = await plan(store, [long_value])
    assert counts.invalid == 1
    (row,) = await all_rows(store)
    assert row.outcome == "invalid_id"
    assert row.account_id == long_value[:255]


@pytest.mark.anyio
async def test_dry_run_plan_leaves_store_unchanged(store: SqlStore) -> None:
    """A dry-run plan reports its counts but writes nothing."""
    await plan(store, ["fca_a1"])
    before = await all_rows(store)
    counts = await plan_input(
        store, JOB, chunks(["fca_a1", "fca_a2", "bad", "fca_a2"]), retry_failed=False, commit=False
    )
    assert counts == PlanCounts(read=4, invalid=1, duplicates=1, already_done=0, to_call=2)
    assert await all_rows(store) == before
    fresh = await plan_input(
        store, "other", chunks(["fca_b1", "x"]), retry_failed=False, commit=False
    )
    assert fresh == PlanCounts(read=2, invalid=1, duplicates=0, already_done=0, to_call=1)
    assert not await store.has_job("other")
    assert await store.counts("other") == {}


@pytest.mark.anyio
async def test_failing_input_leaves_no_rows(store: SqlStore) -> None:
    """A chunk iterator that raises midway aborts the plan with nothing written."""

    async def broken() -> AsyncIterator[Sequence[str]]:
        yield ["fca_a1", "fca_a2"]
        yield ["fca_a3", "bad"]
        raise InputError("line 3 of ids.csv: unterminated quote")

    with pytest.raises(InputError, match="line 3"):
        await plan_input(store, JOB, broken(), retry_failed=False)
    assert await store.counts(JOB) == {}
    assert not await store.has_job(JOB)
    # The store is still usable, and the aborted input left nothing staged behind.
    assert await plan(store, ["fca_b1"]) == PlanCounts(
        read=1, invalid=0, duplicates=0, already_done=0, to_call=1
    )
    assert [r.account_id for r in await all_rows(store)] == ["fca_b1"]


@pytest.mark.anyio
async def test_value_that_cannot_be_encoded_leaves_store_usable(store: SqlStore) -> None:
    """A value UTF-8 cannot encode (a lone surrogate) fails the plan; the store stays usable."""
    with pytest.raises(UnicodeEncodeError):
        await plan(store, ["fca_a1", "fca_\udcff"])
    assert await store.counts(JOB) == {}
    counts = await plan(store, ["fca_b1"])
    assert counts.to_call == 1
    assert [r.account_id for r in await all_rows(store)] == ["fca_b1"]


@pytest.mark.anyio
async def test_jobs_are_separate(store: SqlStore) -> None:
    """The same account in two jobs is two rows with their own outcomes."""
    await plan(store, ["fca_a1"], job="one")
    await plan(store, ["fca_a1"], job="two")
    await settle(store, "r1", [result("fca_a1", Outcome.DISCONNECTED)], job="one")
    assert await store.counts("one") == {"disconnected": 1}
    assert await store.counts("two") == {None: 1}


# -- claiming and recording -------------------------------------------------------------------


@pytest.mark.anyio
async def test_claim_pending_pages_in_input_order(store: SqlStore) -> None:
    """claim_pending hands a run its pages in input order, each account once."""
    accounts = ids(10)
    await plan(store, accounts[:4], ["bad"], accounts[4:])
    assert await claim(store, "r1", limit=4) == accounts[:4]
    assert await claim(store, "r1", limit=4) == accounts[4:8]
    assert await claim(store, "r1", limit=4) == accounts[8:]
    assert await claim(store, "r1", limit=4) == []
    # Nothing is pending anywhere else: the run's own claims are not someone else's.
    assert not await store.pending_elsewhere(JOB, "r1")


@pytest.mark.anyio
async def test_claims_see_only_their_job_when_jobs_interleave(store: SqlStore) -> None:
    """A job planned, another planned after it, then the first grown: each claims its own."""
    first, second, grown = ids(5, "x"), ids(4, "y"), ids(3, "z")
    await plan(store, second, job="other-before")
    await plan(store, first)
    await plan(store, second, job="other-after")
    await plan(store, first, grown)
    assert await claim_all(store, "r1") == first + grown
    assert await claim_all(store, "r2", job="other-after") == second
    assert await claim_all(store, "r3", job="no-such-job") == []


@pytest.mark.anyio
async def test_claim_skips_accounts_with_outcomes(store: SqlStore) -> None:
    """Accounts with a recorded outcome are not claimed again."""
    accounts = ids(4)
    await plan(store, accounts)
    await settle(store, "r1", [result(accounts[1], Outcome.DISCONNECTED)])
    assert await claim_all(store, "r2") == [accounts[0], *accounts[2:]]


@pytest.mark.anyio
async def test_record_accumulates_attempts_and_keeps_first_attempt(store: SqlStore) -> None:
    """record() sets the outcome, adds attempts, and keeps the first first_attempt_at."""
    await plan(store, ["fca_a1", "fca_a2"])
    await claim(store, "r1", limit=1)
    await store.record(
        JOB,
        "r1",
        [
            result(
                "fca_a1",
                Outcome.FAILED,
                attempts=3,
                http_status=500,
                error_code="api_error",
                error_message="boom",
                request_id="req_1",
                first_attempt_at=100.0,
            )
        ],
    )
    (row, _) = await all_rows(store)
    assert (row.outcome, row.attempts, row.http_status, row.first_attempt_at) == (
        "failed",
        3,
        500,
        100.0,
    )
    assert (row.error_code, row.error_message, row.request_id) == ("api_error", "boom", "req_1")
    assert row.updated_at is not None
    await plan(store, ["fca_a1", "fca_a2"], retry_failed=True)
    await claim(store, "r2", limit=1)
    await store.record(
        JOB,
        "r2",
        [
            result(
                "fca_a1", Outcome.DISCONNECTED, attempts=2, http_status=200, first_attempt_at=200.0
            )
        ],
    )
    (row, untouched) = await all_rows(store)
    assert (row.outcome, row.attempts, row.http_status, row.first_attempt_at) == (
        "disconnected",
        5,
        200,
        100.0,
    )
    assert row.error_code is None
    assert (untouched.outcome, untouched.attempts, untouched.first_attempt_at) == (None, 0, None)


@pytest.mark.anyio
async def test_a_write_lands_only_under_the_claim_it_was_made_under(
    store: SqlStore, location: str
) -> None:
    """Fencing: a run that lost its lease writes nothing over the run that took its accounts,
    whether that run is still alive or has finished, and a batch written twice lands once."""
    accounts = ids(4)
    await plan(store, accounts)
    assert await claim(store, "stale", limit=4) == accounts
    await age(location, "stale", 3600)
    # The job is taken over; the new run records two accounts and leaves.
    assert await claim(store, "new", limit=4) == accounts
    done = [result(a, Outcome.DISCONNECTED, http_status=200) for a in accounts[:2]]
    await store.record(JOB, "new", done)
    await store.record(JOB, "new", done)  # a batch written again (a lost reply) adds nothing
    await store.release_lock(JOB, "new")
    before = await all_rows(store)
    assert [(r.outcome, r.attempts) for r in before] == [("disconnected", 1)] * 2 + [(None, 0)] * 2
    # The stale run wakes up and writes what it had: nothing changes.
    late = [result(a, Outcome.FAILED, http_status=500, attempts=3) for a in accounts]
    await store.record(JOB, "stale", late)
    assert await all_rows(store) == before
    # Nor can it claim: its lease is gone.
    with pytest.raises(LockHeldError, match="lost the lock's lease"):
        await store.claim(JOB, "stale", limit=4)


async def write_transactions(store: SqlStore, location: str, work: Awaitable[object]) -> int:
    """How many write transactions the store committed while `work` ran."""
    if location.startswith("postgresql://"):
        # Only a transaction that writes is given a transaction ID; each probe takes one.
        url = location.partition("?schema=")[0]
        conn = await asyncpg.connect(url)
        try:
            before = await conn.fetchval("SELECT txid_current()")
            await work
            after = await conn.fetchval("SELECT txid_current()")
        finally:
            await conn.close()
        return int(after - before - 1)
    commits: list[str] = []
    db = store._dialect._db  # type: ignore[attr-defined]  # the store's own connection, traced
    db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        await work
    finally:
        db.set_trace_callback(None)
    return len(commits)


@pytest.mark.anyio
async def test_a_batch_of_outcomes_is_one_write_transaction(store: SqlStore, location: str) -> None:
    """Recording 50 outcomes commits once: never a transaction per account."""
    accounts = ids(60)
    await plan(store, accounts)
    claimed = await claim(store, "r1", limit=50)
    batch = [result(a, Outcome.NOT_FOUND, http_status=404) for a in claimed]
    assert await write_transactions(store, location, store.record(JOB, "r1", batch)) == 1
    assert await store.counts(JOB) == {"not_found": 50, None: 10}


@pytest.mark.anyio
async def test_release_outcomes_only_touches_this_run(store: SqlStore) -> None:
    """release_outcomes returns this run's failed/not_found to pending; other runs are untouched."""
    a, b, c, d, e = ids(5)
    await plan(store, [a, b, c, d, e])
    await claim(store, "r1", limit=3)
    await store.record(
        JOB,
        "r1",
        [
            result(a, Outcome.FAILED),
            result(b, Outcome.NOT_FOUND),
            result(c, Outcome.DISCONNECTED),
        ],
    )
    await claim(store, "r2", limit=3)
    await store.record(JOB, "r2", [result(d, Outcome.FAILED), result(e, Outcome.NOT_FOUND)])

    released = await store.release_refused(JOB, "r1")
    assert released == 2
    outcomes = {r.account_id: r.outcome for r in await all_rows(store)}
    assert outcomes == {a: None, b: None, c: "disconnected", d: "failed", e: "not_found"}
    assert await claim_all(store, "r3") == [a, b]
    assert await store.release_refused(JOB, "r1") == 0


@pytest.mark.anyio
async def test_retry_failed_makes_failed_claimable(store: SqlStore) -> None:
    """Planned with retry_failed, failed accounts count as to_call and are pending again."""
    a, b, c = ids(3)
    await plan(store, [a, b, c])
    await settle(store, "r1", [result(a, Outcome.FAILED), result(b, Outcome.DISCONNECTED)])
    assert await claim_all(store, "r2") == [c]

    plain = await plan(store, [a, b, c])
    assert (plain.already_done, plain.to_call) == (2, 1)
    assert await store.counts(JOB) == {"failed": 1, "disconnected": 1, None: 1}
    dry = await plan_input(store, JOB, chunks([a, b, c]), retry_failed=True, commit=False)
    assert (dry.already_done, dry.to_call) == (1, 2)
    assert await store.counts(JOB) == {"failed": 1, "disconnected": 1, None: 1}
    retrying = await plan(store, [a, b, c], retry_failed=True)
    assert (retrying.already_done, retrying.to_call) == (1, 2)
    assert await store.counts(JOB) == {"disconnected": 1, None: 2}
    assert await claim_all(store, "r3") == [a, c]


@pytest.mark.anyio
async def test_counts_by_outcome(store: SqlStore) -> None:
    """counts() gives the number of accounts per outcome, None for still to call."""
    accounts = ids(6)
    await plan(store, [*accounts, "bad1", "bad2"])
    await settle(
        store,
        "r1",
        [
            result(accounts[0], Outcome.DISCONNECTED),
            result(accounts[1], Outcome.DISCONNECTED),
            result(accounts[2], Outcome.NOT_FOUND),
            result(accounts[3], Outcome.FAILED),
        ],
    )
    assert await store.counts(JOB) == {
        None: 2,
        "disconnected": 2,
        "not_found": 1,
        "failed": 1,
        "invalid_id": 2,
    }
    assert await store.counts("unknown") == {}


@pytest.mark.anyio
async def test_rows_stream_every_account_in_input_order(store: SqlStore) -> None:
    """rows() yields every account of the job in input order, across page boundaries."""
    accounts = ids(5003)
    await plan(store, *(accounts[i : i + 1000] for i in range(0, len(accounts), 1000)))
    await plan(store, ["fca_other"], job="other")
    rows = await all_rows(store)
    assert [r.account_id for r in rows] == accounts
    assert all(r.outcome is None and r.attempts == 0 for r in rows)


# -- lock -------------------------------------------------------------------------------------


async def holder(store: SqlStore, job: str = JOB) -> str | None:
    """The owner of the job's only lock holder, or None."""
    holders = await store.locks(job)
    assert len(holders) <= 1
    return holders[0].owner if holders else None


@pytest.mark.anyio
async def test_lock_is_exclusive_while_fresh(store: SqlStore, location: str) -> None:
    """A second owner, even through another connection, is refused while the lock is fresh."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    other = await open_store(location)
    try:
        with pytest.raises(LockHeldError, match=JOB):
            await other.acquire_lock(JOB, "owner-b", stale_after=30)
        with pytest.raises(LockHeldError):
            await store.acquire_lock(JOB, "owner-b", stale_after=30)
        assert await holder(other) == "owner-a"
        (info,) = await other.locks(JOB)
        assert (info.pid, info.lease, info.shared) == (os.getpid(), 30, False)
        # Another job's lock is independent.
        await other.acquire_lock("other-job", "owner-b", stale_after=30)
    finally:
        await other.aclose()


@pytest.mark.anyio
async def test_stale_lock_is_taken_over(store: SqlStore, location: str) -> None:
    """Once the holder's heartbeat is older than its lease, another owner takes the lock."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    assert await store.heartbeat(JOB, "owner-a") is not None
    await age(location, "owner-a", 31)
    (stale,) = await store.locks(JOB)
    assert not stale.live
    assert stale.age >= 31
    await store.acquire_lock(JOB, "owner-b", stale_after=30)
    assert await holder(store) == "owner-b"
    assert await store.heartbeat(JOB, "owner-a") is None
    assert await store.heartbeat(JOB, "owner-b") is not None


@pytest.mark.anyio
async def test_heartbeat_keeps_lock_fresh(store: SqlStore, location: str) -> None:
    """A heartbeat makes an old lock fresh again, so it is not taken over."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    await age(location, "owner-a", 20)
    assert await store.heartbeat(JOB, "owner-a") is not None
    await age(location, "owner-a", 20)
    # Acquired 40 s ago with a 30 s lease: stale, unless the heartbeat refreshed it.
    with pytest.raises(LockHeldError):
        await store.acquire_lock(JOB, "owner-b", stale_after=30)
    assert await holder(store) == "owner-a"


@pytest.mark.anyio
async def test_missed_lease_is_lost_even_if_nobody_took_over(
    store: SqlStore, location: str
) -> None:
    """A holder whose lease ran out cannot renew it: others may be working its claims."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    await age(location, "owner-a", 31)
    assert await store.heartbeat(JOB, "owner-a") is None


@pytest.mark.anyio
async def test_release_only_by_owner(store: SqlStore) -> None:
    """Only the lock's owner can release it; afterwards anyone may take it."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    await store.release_lock(JOB, "owner-b")
    assert await holder(store) == "owner-a"
    await store.release_lock(JOB, "owner-a")
    assert await store.locks(JOB) == []
    await store.acquire_lock(JOB, "owner-b", stale_after=30)
    assert await store.heartbeat(JOB, "owner-a") is None


@pytest.mark.anyio
async def test_single_holder_has_the_whole_rate(store: SqlStore) -> None:
    """A lone holder's heartbeat gives it the whole rate at once."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    beat = await store.heartbeat(JOB, "owner-a")
    assert beat is not None
    assert (beat.workers, beat.ready) == (1, True)


@pytest.mark.anyio
async def test_lone_planner_plans(store: SqlStore) -> None:
    """A run alone on its job always plans its input."""
    await store.acquire_lock(JOB, "owner-a", stale_after=30)
    async with store.planning(JOB, "owner-a") as must_plan:
        assert must_plan


# -- runs and jobs ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_history(store: SqlStore) -> None:
    """start_run/finish_run are reflected by last_run, which returns the latest run of the job."""
    assert await store.last_run(JOB) is None
    await store.start_run(JOB, "r1")
    started = await store.last_run(JOB)
    assert started is not None
    assert (started.run_id, started.finished_at, started.exit_code) == ("r1", None, None)
    await store.finish_run("r1", 1, "1 failed")
    finished = await store.last_run(JOB)
    assert finished is not None
    assert (finished.run_id, finished.exit_code, finished.summary) == ("r1", 1, "1 failed")
    assert finished.finished_at is not None
    assert finished.finished_at >= finished.started_at
    await anyio.sleep(0.01)
    await store.start_run(JOB, "r2")
    await store.start_run("other", "r3")
    latest = await store.last_run(JOB)
    assert latest is not None
    assert latest.run_id == "r2"


@pytest.mark.anyio
async def test_has_job(store: SqlStore) -> None:
    """has_job is true once a job has a run or any account, false otherwise."""
    assert not await store.has_job(JOB)
    await store.start_run("ran", "r1")
    assert await store.has_job("ran")
    await plan(store, ["bad"], job="planned")
    assert await store.has_job("planned")
    assert not await store.has_job(JOB)


@pytest.mark.anyio
async def test_confirmations_keep_nothing_of_accounts_outside_the_job(store: SqlStore) -> None:
    """An event for the job's account confirms it once; one for another account is counted
    (per job) and nothing of it is kept, so another job's receiver can still confirm it."""
    await plan(store, ["fca_mine"])
    await plan(store, ["fca_theirs"], job="other")
    confirm = store.confirm
    assert await confirm(JOB, "fca_mine", event_id="e1", confirmed_at=1.0) is Confirmation.CONFIRMED
    assert await confirm(JOB, "fca_mine", event_id="e1", confirmed_at=2.0) is Confirmation.REPLAYED
    assert await confirm(JOB, "fca_theirs", event_id="e2", confirmed_at=3.0) is Confirmation.UNKNOWN
    assert (await store.unknown_events(JOB), await store.unknown_events("other")) == (1, 0)
    assert await confirm("other", "fca_theirs", event_id="e2", confirmed_at=4.0) is (
        Confirmation.CONFIRMED
    )
    assert [(r.account_id, r.event_id) for r in await all_rows(store, "other")] == [
        ("fca_theirs", "e2")
    ]


@pytest.mark.anyio
async def test_one_event_confirms_the_account_in_every_job_that_holds_it(store: SqlStore) -> None:
    """Stripe sends an event to every endpoint: two jobs of one store, both holding the account,
    each confirm it once (replays are per job)."""
    await plan(store, ["fca_both"])
    await plan(store, ["fca_both"], job="other")
    for job in (JOB, "other"):
        assert await store.confirm(job, "fca_both", event_id="e1", confirmed_at=1.0) is (
            Confirmation.CONFIRMED
        )
        assert await store.confirm(job, "fca_both", event_id="e1", confirmed_at=2.0) is (
            Confirmation.REPLAYED
        )
        assert await store.confirmed_count(job) == 1


# -- reconcile and verify ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_reconciled_pages_confirm_each_event_once_on_its_own_row(store: SqlStore) -> None:
    """A page's events confirm the rows of the Stripe account they were listed under, once
    per event; an event of an account outside the job (or under another Stripe account) is
    neither kept nor counted; how far the pass got is kept with the page."""
    await plan_input(
        store,
        JOB,
        chunks(["fca_own", Owned("fca_x", "acct_1X"), Owned("fca_own", "acct_1Y")]),
        retry_failed=False,
    )
    await plan(store, ["fca_theirs"], job="other")
    at = 1_700_000_000.0
    page = store.reconciled_page
    found = await page(
        JOB,
        "",
        [Listed("fca_own", "evt_1", at), Listed("fca_theirs", "evt_2", at)],
        events=3,
        cursor=Cursor("evt_2", 1_699_999_000, 1_700_000_000),
        created_upto=None,
    )
    assert found == {Confirmation.CONFIRMED: 1, Confirmation.UNKNOWN: 1}
    (progress,) = await store.reconcile_progress(JOB)
    assert progress.cursor == Cursor("evt_2", 1_699_999_000, 1_700_000_000)
    assert (progress.created_upto, progress.events, progress.pages) == (None, 3, 1)
    found = await page(
        JOB,
        "acct_1X",
        [Listed("fca_own", "evt_3", at), Listed("fca_x", "evt_4", at + 1)],
        events=2,
        cursor=None,
        created_upto=1_699_999_940,
    )
    assert found == {Confirmation.UNKNOWN: 1, Confirmation.CONFIRMED: 1}
    again = await page(JOB, "", [Listed("fca_own", "evt_1", at + 5)], events=1, cursor=None,
                       created_upto=1_699_999_000)  # fmt: skip
    assert again == {Confirmation.REPLAYED: 1}
    stored = {
        (r.stripe_account, r.account_id): (r.event_id, r.confirmed_at)
        for r in await all_rows(store)
    }
    assert stored == {
        ("", "fca_own"): ("evt_1", at),
        ("acct_1X", "fca_x"): ("evt_4", at + 1),
        ("acct_1Y", "fca_own"): (None, None),
    }
    assert await store.unknown_events(JOB) == 0
    assert await store.confirm("other", "fca_theirs", event_id="evt_2", confirmed_at=at) is (
        Confirmation.CONFIRMED
    )
    lanes = {p.stripe_account: p for p in await store.reconcile_progress(JOB)}
    assert (lanes[""].cursor, lanes[""].created_upto, lanes[""].pages) == (None, 1_699_999_000, 2)
    assert lanes["acct_1X"].created_upto == 1_699_999_940
    await page(JOB, "acct_1X", [], events=0, cursor=None, created_upto=5)  # never moves back
    assert {p.stripe_account: p.created_upto for p in await store.reconcile_progress(JOB)} == {
        "": 1_699_999_000,
        "acct_1X": 1_699_999_940,
    }


@pytest.mark.anyio
async def test_reconcile_span_counts_what_a_call_disconnected_and_no_event_confirmed(
    store: SqlStore,
) -> None:
    """A Stripe account's span starts at its first attempt and counts only accounts a call
    disconnected that no event confirmed (not the failed, nor those never called)."""
    await plan(store, ids(4))
    assert await store.reconcile_span(JOB, "") == LaneSpan(None, 0)
    await settle(
        store,
        "r1",
        [
            result(ids(4)[0], Outcome.DISCONNECTED, first_attempt_at=20.0),
            result(ids(4)[1], Outcome.DISCONNECTED, first_attempt_at=10.0),
            result(ids(4)[2], Outcome.FAILED, first_attempt_at=5.0),
        ],
    )
    assert await store.reconcile_span(JOB, "") == LaneSpan(5.0, 2)
    await store.confirm(JOB, ids(4)[0], event_id="evt_1", confirmed_at=21.0)
    assert await store.reconcile_span(JOB, "") == LaneSpan(5.0, 1)
    assert await store.reconcile_span(JOB, "acct_1None") == LaneSpan(None, 0)


@pytest.mark.anyio
async def test_read_backs_are_recorded_only_while_the_lease_is_held(store: SqlStore) -> None:
    """A verify pass records what it read only while its owner holds the job's lease; its
    candidates leave out what it read; counts tell verified, reactivated and never read."""
    accounts = ids(4)
    await plan(store, accounts)
    await settle(store, "r1", [result(a, Outcome.DISCONNECTED) for a in accounts[:3]])
    await store.confirm(JOB, accounts[0], event_id="evt_1", confirmed_at=1.0)
    await store.start_verify_pass(JOB, "p1", "all")
    opened = await store.open_verify_pass(JOB)
    assert opened is not None
    assert (opened.pass_id, opened.selection) == ("p1", "all")
    assert opened.started_at == pytest.approx(time.time(), abs=60)
    unconfirmed = await store.verify_candidates(JOB, "p1", unconfirmed=True, after=0, limit=10)
    assert [row[2] for row in unconfirmed] == accounts[1:3]
    read = [
        ReadBack("", accounts[0], "disconnected", 2.0),
        ReadBack("", accounts[1], "active", 3.0),
    ]
    assert await store.record_verified(JOB, "v1", "p1", read) == 0  # not the holder
    await store.acquire_lock(JOB, "v1", stale_after=30)
    assert await store.record_verified(JOB, "v1", "p1", read) == 2
    left = await store.verify_candidates(JOB, "p1", unconfirmed=False, after=0, limit=10)
    assert [(row[2], row[3]) for row in left] == [(accounts[2], None)]
    assert await store.verify_counts(JOB) == VerifyCounts(verified=1, reactivated=1, unverified=1)
    assert await store.pass_counts(JOB, "p1") == {"disconnected": 1, "active": 1}
    rows = {r.account_id: (r.verified_at, r.verified_status) for r in await all_rows(store)}
    assert rows[accounts[1]] == (3.0, "active")
    await store.start_verify_pass(JOB, "p2", "unconfirmed")  # p1 is not resumed any more
    opened = await store.open_verify_pass(JOB)
    assert opened is not None
    assert (opened.pass_id, opened.selection, opened.finished_at) == ("p2", "unconfirmed", None)
    await store.finish_verify_pass(JOB, "p2")
    assert await store.open_verify_pass(JOB) is None
    last = await store.last_verify_pass(JOB)
    assert last is not None
    assert (last.pass_id, last.finished_at is not None) == ("p2", True)


# -- forgetting -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_forget_deletes_one_job_and_nothing_of_the_others(store: SqlStore) -> None:
    mine, theirs = ids(5, "m"), ids(3, "t")
    await plan(store, mine)
    await plan(store, theirs, job="other")
    await settle(store, "r1", [result(mine[0], Outcome.DISCONNECTED)])
    await store.start_run(JOB, "r1")
    await store.finish_run("r1", 0, "ok")
    await store.confirm(JOB, mine[0], event_id="e1", confirmed_at=1.0)
    await store.confirm(JOB, "fca_stranger", event_id="e2", confirmed_at=1.0)
    assert await store.forget(JOB, "forget-1") == (5, 1, 1)
    assert not await store.has_job(JOB)
    assert await store.counts(JOB) == {}
    assert await store.unknown_events(JOB) == 0
    assert await store.locks(JOB) == []
    assert await store.counts("other") == {None: 3}
    # Forgotten, the job starts afresh: its old event is no replay.
    await plan(store, mine)
    assert await store.confirm(JOB, mine[0], event_id="e1", confirmed_at=2.0) is (
        Confirmation.CONFIRMED
    )


@pytest.mark.anyio
async def test_forget_refuses_while_a_run_holds_the_job(store: SqlStore) -> None:
    await plan(store, ids(2))
    await store.acquire_lock(JOB, "running", stale_after=30)
    with pytest.raises(LockHeldError):
        await store.forget(JOB, "forget-1")
    assert await store.counts(JOB) == {None: 2}


@pytest.mark.anyio
async def test_samples_come_back_per_job_oldest_first(store: SqlStore) -> None:
    """A run's samples are kept once per (run, moment) and read back per job in time order,
    every run of the job together."""
    await store.record_sample(
        JOB, "r2", at=30.5, requests=9, rate_limited=1, disconnected=7, target_rate=18.5
    )
    for at, requests in ((10.0, 2), (20.25, 5)):
        await store.record_sample(
            JOB, "r1", at=at, requests=requests, rate_limited=0, disconnected=requests,
            target_rate=20.0,
        )  # fmt: skip
    # Written again (a lost reply): kept once, as first written.
    await store.record_sample(
        JOB, "r1", at=10.0, requests=99, rate_limited=0, disconnected=0, target_rate=1.0
    )
    await store.record_sample(
        "other", "r3", at=15.0, requests=1, rate_limited=0, disconnected=1, target_rate=5.0
    )
    assert await store.samples(JOB) == [
        ("r1", 10.0, 2, 0, 2, 20.0),
        ("r1", 20.25, 5, 0, 5, 20.0),
        ("r2", 30.5, 9, 1, 7, 18.5),
    ]
    assert await store.samples("nobody") == []


@pytest.mark.anyio
async def test_forget_deletes_the_jobs_samples_and_check_progress(
    store: SqlStore, location: str
) -> None:
    """forget deletes the job's samples, reconcile progress and verify passes too; another
    job's stay."""
    await plan(store, ids(2))
    for job in (JOB, "other"):
        await store.record_sample(
            job, f"run-{job}", at=1.0, requests=1, rate_limited=0, disconnected=1, target_rate=1.0
        )
    await raw_sql(
        location,
        "INSERT INTO reconciled (job, stripe_account, created_upto, at) VALUES "
        "('purge', '', 5, 1.0), ('other', '', 6, 1.0); "
        "INSERT INTO verify_passes (job, pass_id, selection, started_at) VALUES "
        "('purge', 'p1', 'all', 1.0), ('other', 'p2', 'all', 1.0)",
    )
    await store.forget(JOB, "forget-1")
    assert await store.samples(JOB) == []
    assert [row[0] for row in await store.samples("other")] == ["run-other"]
    for table in ("reconciled", "verify_passes"):
        assert await raw_sql(location, f"SELECT job FROM {table}") == [("other",)]  # noqa: S608


@pytest.mark.anyio
async def test_jobs_finished_before_a_date(store: SqlStore, location: str) -> None:
    """Finished is a last run that ended 0 or 1; a job to resume (3) is not finished."""
    for job, code in (("done", 0), ("some-failed", 1), ("interrupted", 3), ("recent", 0)):
        await store.start_run(job, f"run-{job}")
        await store.finish_run(f"run-{job}", code, "")
    cutoff = time.time() + 1
    await store.start_run("running", "run-running")
    assert await store.jobs_finished_before(cutoff) == ["done", "recent", "some-failed"]
    assert await store.jobs_finished_before(cutoff - 3600) == []


@pytest.mark.anyio
async def test_forget_leaves_no_trace_in_the_sqlite_file(tmp_path: Path) -> None:
    """Deleted rows' pages are rebuilt away and the WAL emptied: the IDs are not in the bytes."""
    path = tmp_path / "s.sqlite"
    store = await open_store(path)
    try:
        await plan(store, ids(2000, "secret"))
        await plan(store, ["fca_kept"], job="other")
        await store.forget(JOB, "forget-1")
    finally:
        await store.aclose()
    data = b"".join(
        (tmp_path / name).read_bytes() if (tmp_path / name).exists() else b""
        for name in ("s.sqlite", "s.sqlite-wal", "s.sqlite-shm")
    )
    assert b"fca_secret" not in data
    assert b"fca_kept" in data


# -- the file ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Customers' account IDs: the folder is created 0700, the file and its -wal and -shm 0600,
    even under umask 000; a file an older version left 0644 is closed to others."""
    folder = tmp_path / "state"
    before = os.umask(0)
    try:
        store = await open_store(folder / "s.sqlite")
        try:
            await plan(store, ids(10))
            modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        finally:
            await store.aclose()
        assert folder.stat().st_mode & 0o777 == 0o700
        assert modes == {"s.sqlite": 0o600, "s.sqlite-wal": 0o600, "s.sqlite-shm": 0o600}
        (folder / "s.sqlite").chmod(0o644)
        await (await open_store(folder / "s.sqlite")).aclose()
        assert (folder / "s.sqlite").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(before)


@pytest.mark.anyio
async def test_file_is_in_wal_mode(tmp_path: Path) -> None:
    """The store file uses WAL, so readers do not block the writer."""
    store = await open_store(tmp_path / "s.sqlite")
    try:
        await plan(store, ["fca_a1"])
    finally:
        await store.aclose()
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
    db.close()
    assert mode == "wal"


@pytest.mark.anyio
async def test_sqlite_claims_range_scan_rowids(tmp_path: Path) -> None:
    """Claiming a page reads and marks it by a rowid range: through the (job, account_id)
    index each page would visit every row of the job, quadratic in its size. A connected
    account's page is a rowid range within its own index."""
    from bulkdisconnect.store.sqlite import CLAIM, CLAIM_LANE, MARK_CLAIMED

    path = tmp_path / "s.sqlite"
    opened = await open_store(path)
    await opened.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        for sql, args, wanted in (
            (CLAIM, (0, JOB, "", 500), "INTEGER PRIMARY KEY (rowid>?"),
            (MARK_CLAIMED, ("r1", 0, 500, JOB), "INTEGER PRIMARY KEY (rowid>?"),
            (CLAIM_LANE, (JOB, "acct_1", 0, 500), "accounts_lane (job=? AND stripe_account=?"),
        ):
            plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert wanted in plan, plan


@pytest.mark.anyio
async def test_a_heartbeat_does_not_queue_behind_a_long_statement(tmp_path: Path) -> None:
    """While a plan's statement holds the store's connection (counting or merging a large
    input), the heartbeat goes through on a connection of its own."""
    store = await open_store(tmp_path / "s.sqlite")
    try:
        await store.acquire_lock(JOB, "r1", stale_after=30)
        started, finished = threading.Event(), threading.Event()
        order: list[str] = []

        def statement(db: sqlite3.Connection) -> None:
            started.set()
            finished.wait(10)

        async def long_statement() -> None:
            await store._dialect.call(statement)  # type: ignore[attr-defined]
            order.append("statement")

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_statement)
            await anyio.to_thread.run_sync(started.wait, 10)  # it holds the connection now
            assert await store.heartbeat(JOB, "r1") == Beat(workers=1, ready=True)
            order.append("beat")
            finished.set()
        assert order == ["beat", "statement"]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_sqlite_merges_a_large_input_a_span_at_a_time(tmp_path: Path) -> None:
    """The file's write lock is the whole file's: a large input is merged in spans of
    transactions, in input order, so that heartbeats get through between them."""
    location = str(tmp_path / "s.sqlite")
    store = await open_store(location)
    try:
        accounts = ids(45_000)
        planned = plan(store, accounts)
        assert await write_transactions(store, location, planned) == 1 + 3  # staged, merged

        assert [r.account_id for r in await all_rows(store)] == accounts
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_sqlite_url_is_accepted(tmp_path: Path) -> None:
    """open_store accepts a sqlite:/// URL and creates missing folders."""
    path = tmp_path / "deep" / "er" / "s.sqlite"
    opened = await open_store(f"sqlite:///{path}")
    try:
        await plan(opened, ["fca_a1"])
    finally:
        await opened.aclose()
    assert path.exists()


@pytest.mark.anyio
async def test_data_survives_close_and_reopen(location: str) -> None:
    """Plans, outcomes, locks and runs are durable across closing and reopening the store."""
    first = await open_store(location)
    await plan(first, ["fca_a1", "fca_a2", "bad"])
    await settle(first, "r1", [result("fca_a1", Outcome.DISCONNECTED, attempts=2)])
    await first.acquire_lock(JOB, "owner-a", stale_after=30)
    await first.start_run(JOB, "r1")
    await first.finish_run("r1", 0, "ok")
    before = await all_rows(first)
    await first.aclose()

    second = await open_store(location)
    try:
        assert await all_rows(second) == before
        assert await second.counts(JOB) == {"disconnected": 1, None: 1, "invalid_id": 1}
        assert await holder(second) == "owner-a"
        run = await second.last_run(JOB)
        assert run is not None
        assert (run.run_id, run.exit_code, run.summary) == ("r1", 0, "ok")
        assert await claim_all(second, "r2") == ["fca_a2"]
    finally:
        await second.aclose()


# The SQLite layout before layouts were numbered (layout 1): one lock row per job.
SQLITE_LAYOUT_1 = """
CREATE TABLE accounts (job TEXT NOT NULL, account_id TEXT NOT NULL, outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, http_status INTEGER, error_code TEXT,
    error_message TEXT, request_id TEXT, first_attempt_at REAL, updated_at REAL, run_id TEXT,
    confirmed_at REAL, event_id TEXT, UNIQUE (job, account_id));
CREATE TABLE customers (job TEXT NOT NULL, customer_id TEXT NOT NULL, listed_at REAL NOT NULL,
    PRIMARY KEY (job, customer_id));
CREATE TABLE events (event_id TEXT PRIMARY KEY, job TEXT NOT NULL, account_id TEXT NOT NULL,
    received_at REAL NOT NULL);
CREATE TABLE locks (job TEXT PRIMARY KEY, owner TEXT NOT NULL, pid INTEGER NOT NULL,
    host TEXT NOT NULL, acquired_at REAL NOT NULL, heartbeat_at REAL NOT NULL, lease REAL NOT NULL);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, job TEXT NOT NULL, started_at REAL NOT NULL,
    finished_at REAL, exit_code INTEGER, summary TEXT);
INSERT INTO accounts (job, account_id) VALUES ('purge', 'fca_a1'), ('purge', 'fca_a2');
INSERT INTO accounts (job, account_id, outcome) VALUES ('purge', 'fca_a3', 'disconnected');
INSERT INTO locks VALUES ('purge', 'old-run', 1, 'gone', 0, 0, 30);
"""


@pytest.mark.anyio
async def test_a_store_of_the_first_layout_is_migrated_and_resumes(tmp_path: Path) -> None:
    """A SQLite store written before layouts were numbered opens: its lock row moves to the
    table of holders (stale, so taken over), and its pending accounts are claimed as before."""
    path = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SQLITE_LAYOUT_1)
    store = await open_store(path)
    try:
        (old,) = await store.locks(JOB)
        assert (old.owner, old.host, old.shared, old.live) == ("old-run", "gone", False, False)
        await store.acquire_lock(JOB, "new-run", stale_after=30)
        assert await holder(store) == "new-run"
        assert await claim_all(store, "new-run") == ["fca_a1", "fca_a2"]
        assert await store.counts(JOB) == {None: 2, "disconnected": 1}
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM meta").fetchall() == [("5",)]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert "locks_v1" not in tables


# What layout 5 added, taken away again: a store as the previous version left it.
DOWNGRADE_TO_LAYOUT_4 = """
ALTER TABLE accounts DROP COLUMN verified_at; ALTER TABLE accounts DROP COLUMN verified_status;
ALTER TABLE accounts DROP COLUMN verified_pass; DROP TABLE reconciled; DROP TABLE verify_passes;
DROP TABLE samples; UPDATE meta SET value = '4'; SELECT value FROM meta
"""


async def layout_4_store(location: str) -> list[str]:
    """A store of layout 4 at `location` holding a job half done (one disconnected and
    confirmed, one pending, one invalid, one of a connected account); its accounts."""
    accounts = ["fca_a1", "fca_a2", "fca_a3"]
    async for store in _opened(location):
        await plan_input(
            store,
            JOB,
            chunks([*accounts[:2], "junk", Owned(accounts[2], "acct_1X")]),
            retry_failed=False,
        )
        await settle(store, "r1", [result("fca_a1", Outcome.DISCONNECTED)])
        await store.confirm(JOB, "fca_a1", event_id="evt_1", confirmed_at=5.0)
        await store.start_run(JOB, "r1")
    assert await raw_sql(location, DOWNGRADE_TO_LAYOUT_4) == [("4",)]
    return accounts


@pytest.mark.anyio
async def test_a_store_of_layout_4_is_migrated_to_5(location: str) -> None:
    """A store the previous version left opens as layout 5: its accounts, outcomes,
    confirmations and runs as they were, in input order, nothing read back yet; the new
    tables take samples; a rerun resumes the pending account."""
    accounts = await layout_4_store(location)
    async for store in _opened(location):
        rows = await all_rows(store)
        assert [(r.stripe_account, r.account_id, r.outcome, r.event_id) for r in rows] == [
            ("", "fca_a1", "disconnected", "evt_1"),
            ("", "fca_a2", None, None),
            ("", "junk", "invalid_id", None),
            ("acct_1X", "fca_a3", None, None),
        ]
        assert {(r.verified_at, r.verified_status) for r in rows} == {(None, None)}
        assert await store.confirmed_count(JOB) == 1
        run = await store.last_run(JOB)
        assert run is not None
        assert run.run_id == "r1"
        await store.record_sample(
            JOB, "r2", at=1.0, requests=1, rate_limited=0, disconnected=1, target_rate=2.0
        )
        assert await store.samples(JOB) == [("r2", 1.0, 1, 0, 1, 2.0)]
        assert await claim_all(store, "r2") == ["fca_a2"]
        assert accounts[2] not in await claim_all(store, "r2")
    assert await raw_sql(location, "SELECT value FROM meta") == [("5",)]
    columns = await raw_sql(
        location, "SELECT verified_at, verified_status, verified_pass FROM accounts"
    )
    assert set(columns) == {(None, None, None)}


@pytest.mark.anyio
async def test_status_and_report_read_a_layout_4_store_without_migrating_it(
    location: str,
) -> None:
    """Opened read-only, a store of layout 4 reads as one where nothing was read back yet,
    and stays at layout 4; layout 3 (no connected account per row) is refused, saying how."""
    await layout_4_store(location)
    reader = await open_store(location, read_only=True)
    try:
        rows = await all_rows(reader)
        assert [(r.account_id, r.verified_at, r.verified_status) for r in rows][:2] == [
            ("fca_a1", None, None),
            ("fca_a2", None, None),
        ]
        assert await reader.samples(JOB) == []
    finally:
        await reader.aclose()
    assert await raw_sql(location, "SELECT value FROM meta") == [("4",)]
    await raw_sql(location, "UPDATE meta SET value = '3'; SELECT 1")
    with pytest.raises(UsageError, match="has layout 3: a run of this bulkdisconnect migrates"):
        await open_store(location, read_only=True)


# -- PostgreSQL: workers sharing a job (run --join) ---------------------------------------------


@pytest.fixture
async def pg(pg_state: str) -> AsyncIterator[SqlStore]:
    """A fresh PostgreSQL store (the `store` fixture, without SQLite)."""
    async for opened in _opened(pg_state):
        yield opened


@pytest.mark.anyio
async def test_a_postgresql_store_of_layout_2_is_migrated(pg: SqlStore, pg_state: str) -> None:
    """Layout 2 keyed events by event ID alone and had no claim generation: reopened, its
    events are per job and its accounts are claimed and recorded under fences."""
    await plan(pg, ["fca_a1", "fca_a2"])
    await plan(pg, ["fca_a1"], job="other")
    url, _, schema = pg_state.partition("?schema=")
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        await conn.execute(
            "ALTER TABLE events DROP CONSTRAINT events_pkey, ADD PRIMARY KEY (event_id); "
            "ALTER TABLE accounts DROP COLUMN claim_gen; UPDATE meta SET value = '2'"
        )
    finally:
        await conn.close()
    async for reopened in _opened(pg_state):
        for job in (JOB, "other"):
            assert await reopened.confirm(job, "fca_a1", event_id="e1", confirmed_at=1.0) is (
                Confirmation.CONFIRMED
            )
        await settle(reopened, "r1", [result("fca_a1", Outcome.DISCONNECTED)])
        assert await reopened.counts(JOB) == {"disconnected": 1, None: 1}


@pytest.mark.anyio
async def test_accounts_a_lost_reply_left_claimed_are_claimed_again(
    pg: SqlStore, pg_state: str
) -> None:
    """A claim commits but its reply is lost (the connection cut): the run tries again and
    gets those accounts, not nothing; the ones it has in hand it is not given twice."""
    accounts = ids(6)
    await plan(pg, accounts)
    assert await claim(pg, "w1", limit=2) == accounts[:2]  # in hand
    url, _, schema = pg_state.partition("?schema=")
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:  # what the lost claim did: marked, never handed over
        await conn.execute(
            "UPDATE accounts SET run_id = 'w1', claim_gen = claim_gen + 1 "
            "WHERE account_id = ANY($1)",
            accounts[2:4],
        )
    finally:
        await conn.close()
    assert await pg.claim(JOB, "w1", limit=10) == accounts[2:]
    assert await pg.claim(JOB, "w1", limit=10) == []


def test_postgresql_outages_are_waited_out_and_misuses_are_not() -> None:
    from bulkdisconnect.store.postgres import PostgresDialect

    transient = PostgresDialect.transient
    assert transient(asyncpg.ConnectionDoesNotExistError("connection was closed"))
    assert transient(asyncpg.AdminShutdownError("terminating connection"))
    assert transient(asyncpg.InterfaceError("connection is closed"))
    assert transient(asyncpg.InterfaceError("pool is closing"))
    assert transient(ConnectionResetError())
    assert not transient(asyncpg.InterfaceError("cannot perform operation: another operation"))
    assert not transient(asyncpg.UndefinedTableError("relation accounts does not exist"))
    assert not transient(asyncpg.DiskFullError("could not extend file"))


@pytest.mark.anyio
async def test_sqlite_refuses_join(tmp_path: Path) -> None:
    """Only a shared store can be joined; SQLite says what to use instead."""
    store = await open_store(tmp_path / "s.sqlite")
    try:
        with pytest.raises(UsageError, match="postgresql://"):
            await store.acquire_lock(JOB, "w1", stale_after=30, join=True)
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_join_workers_share_but_exclude_plain_runs(pg: SqlStore) -> None:
    """Joining workers hold the job together; a plain run is refused, and refuses them."""
    await pg.acquire_lock(JOB, "w1", stale_after=30, join=True)
    await pg.acquire_lock(JOB, "w2", stale_after=30, join=True)
    assert [(h.owner, h.shared) for h in await pg.locks(JOB)] == [("w1", True), ("w2", True)]
    with pytest.raises(LockHeldError, match="--join"):
        await pg.acquire_lock(JOB, "plain", stale_after=30)
    await pg.release_lock(JOB, "w1")
    await pg.release_lock(JOB, "w2")
    await pg.acquire_lock(JOB, "plain", stale_after=30)
    with pytest.raises(LockHeldError, match="locked by a run"):
        await pg.acquire_lock(JOB, "w3", stale_after=30, join=True)


@pytest.mark.anyio
async def test_worker_on_another_input_cannot_join(pg: SqlStore) -> None:
    """Joining needs the same source arguments as the live workers: no joining by mistake."""
    await pg.acquire_lock(JOB, "w1", stale_after=30, join=True, source="ids-a")
    with pytest.raises(LockHeldError, match="another input"):
        await pg.acquire_lock(JOB, "w2", stale_after=30, join=True, source="ids-b")
    await pg.acquire_lock(JOB, "w2", stale_after=30, join=True, source="ids-a")
    await pg.release_lock(JOB, "w1")
    await pg.release_lock(JOB, "w2")
    await pg.acquire_lock(JOB, "w3", stale_after=30, join=True, source="ids-b")


@pytest.mark.anyio
async def test_newcomer_waits_until_others_take_their_smaller_share(pg: SqlStore) -> None:
    """Shares are re-divided as workers join; a newcomer is ready only once all others did."""
    await pg.acquire_lock(JOB, "w1", stale_after=30, join=True)
    assert await pg.heartbeat(JOB, "w1") == Beat(workers=1, ready=True)
    await pg.acquire_lock(JOB, "w2", stale_after=30, join=True)
    assert await pg.heartbeat(JOB, "w2") == Beat(workers=2, ready=False)  # w1 still at 1/1
    assert await pg.heartbeat(JOB, "w1") == Beat(workers=2, ready=True)
    assert await pg.heartbeat(JOB, "w2") == Beat(workers=2, ready=True)
    await pg.release_lock(JOB, "w2")
    assert await pg.heartbeat(JOB, "w1") == Beat(workers=1, ready=True)


@pytest.mark.anyio
async def test_claims_hold_while_the_lease_runs_then_pass_on(pg: SqlStore, pg_state: str) -> None:
    """Live workers never get each other's accounts; a dead worker's go to the others."""
    accounts = ids(6)
    await plan(pg, accounts)
    await pg.acquire_lock(JOB, "w1", stale_after=30, join=True)
    await pg.acquire_lock(JOB, "w2", stale_after=30, join=True)
    assert await pg.claim(JOB, "w1", limit=2) == accounts[:2]
    assert await pg.claim(JOB, "w2", limit=2) == accounts[2:4]
    assert await pg.claim(JOB, "w2", limit=10) == accounts[4:]
    assert await pg.claim(JOB, "w2", limit=10) == []
    assert await pg.pending_elsewhere(JOB, "w2")  # w1's two, still in its hands
    await age(pg_state, "w1", 31)  # w1 is gone: its lease runs out
    assert await pg.claim(JOB, "w2", limit=10) == accounts[:2]
    # w1 wakes up late with an answer: w2 holds the account now, so w1's write is dropped.
    await pg.record(JOB, "w1", [result(accounts[0], Outcome.FAILED, http_status=500)])
    await pg.record(JOB, "w2", [result(accounts[1], Outcome.DISCONNECTED)])
    rows = {r.account_id: r for r in await all_rows(pg)}
    assert rows[accounts[0]].outcome is None
    assert rows[accounts[1]].outcome == "disconnected"


@pytest.mark.anyio
async def test_concurrent_claims_never_overlap(pg: SqlStore, pg_state: str) -> None:
    """Workers claiming at once through their own connections get disjoint pages."""
    accounts = ids(2000)
    await plan(pg, accounts)
    stores = [await open_store(pg_state) for _ in range(4)]
    claimed: dict[str, list[str]] = {}
    try:
        for n in range(4):
            await stores[n].acquire_lock(JOB, f"w{n}", stale_after=30, join=True)

        async def drain(n: int) -> None:
            mine = claimed.setdefault(f"w{n}", [])
            while page := await stores[n].claim(JOB, f"w{n}", limit=37):
                mine.extend(page)

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(drain, n)
    finally:
        for opened in stores:
            await opened.aclose()
    everything = [a for pages in claimed.values() for a in pages]
    assert sorted(everything) == accounts
    assert all(claimed.values())  # every worker got some


@pytest.mark.anyio
async def test_input_is_planned_once_per_group_of_workers(pg: SqlStore) -> None:
    """The first live worker plans; the others find it planned; a later group plans again."""
    await pg.acquire_lock(JOB, "w1", stale_after=30, join=True)
    await pg.acquire_lock(JOB, "w2", stale_after=30, join=True)
    async with pg.planning(JOB, "w1") as must_plan:
        assert must_plan
    async with pg.planning(JOB, "w2") as must_plan:
        assert not must_plan
    await pg.release_lock(JOB, "w1")
    await pg.acquire_lock(JOB, "w3", stale_after=30, join=True)
    async with pg.planning(JOB, "w3") as must_plan:
        assert not must_plan  # w2 is still live, and found the plan in place
    await pg.release_lock(JOB, "w2")
    await pg.release_lock(JOB, "w3")
    await pg.acquire_lock(JOB, "w4", stale_after=30, join=True)
    async with pg.planning(JOB, "w4") as must_plan:
        assert must_plan


@pytest.mark.anyio
async def test_failed_planning_leaves_it_to_the_next_worker(pg: SqlStore) -> None:
    """A planner that fails does not mark the job planned."""
    await pg.acquire_lock(JOB, "w1", stale_after=30, join=True)
    await pg.acquire_lock(JOB, "w2", stale_after=30, join=True)
    with pytest.raises(InputError):
        async with pg.planning(JOB, "w1"):
            raise InputError("bad row")
    async with pg.planning(JOB, "w2") as must_plan:
        assert must_plan


@pytest.mark.anyio
async def test_bad_schema_name_is_a_usage_error(pg_state: str) -> None:
    """The schema parameter is checked before anything is created."""
    with pytest.raises(UsageError, match="schema="):
        await open_store(pg_state.replace("?schema=", "?schema=Bad-"))


# -- property: planning matches a simple model -------------------------------------------------

VALUES = st.one_of(
    st.sampled_from(["fca_a1", "fca_a2", "fca_B3", *HOSTILE]),
    st.from_regex(r"fca_[A-Za-z0-9]{1,4}", fullmatch=True),
    st.text(max_size=8),
)


def expected_order(values: Iterable[str]) -> list[str]:
    """Unique values in first-seen order."""
    return list(dict.fromkeys(values))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(VALUES, max_size=12), max_size=4))
def test_plan_round_trips_any_input(location: str, parts: list[list[str]]) -> None:
    """For any chunked input, counts, stored rows and claimable accounts match a plain model."""
    flat = [stored_value(v) for part in parts for v in part]
    unique = expected_order(flat)
    valid = [v for v in unique if is_valid_account_id(v)]
    job = f"prop-{uuid.uuid4().hex}"  # one store for every example; a job of its own each

    async def check() -> None:
        opened = await open_store(location)
        try:
            counts = await plan(opened, *parts, job=job)
            assert counts == PlanCounts(
                read=len(flat),
                invalid=len(unique) - len(valid),
                duplicates=len(flat) - len(unique),
                already_done=0,
                to_call=len(valid),
            )
            assert [r.account_id for r in await all_rows(opened, job)] == unique
            assert await claim_all(opened, "r1", job=job) == valid
        finally:
            await opened.aclose()

    anyio.run(check, backend="asyncio")
