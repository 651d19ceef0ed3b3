"""The proof of purge in the store: events that confirm disconnects (from the webhook and from
`reconcile`), accounts read back (`verify`), and samples of runs (the HTML report's charts).

`Evidence` is the part of `SqlStore` (core.py) that records and reads them; a store opened
read-only at layout 4 has none of their tables yet, and reads as holding nothing of them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

from bulkdisconnect.store import (
    Confirmation,
    Cursor,
    LaneSpan,
    Listed,
    ReadBack,
    ReconcileProgress,
    VerifyCounts,
    VerifyPass,
)
from bulkdisconnect.store.dialect import Row
from bulkdisconnect.store.guarded import Guarded, guarded


class Evidence(Guarded):
    """Confirmations, reconcile's progress, verify's passes and read-backs, samples of runs."""

    # -- confirmations ------------------------------------------------------------------------

    @guarded
    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation:
        """Record a disconnected event on the account's outcome, once per event ID.

        For an account outside the job nothing is kept: the delivery is only counted.
        """
        event = {"event_id": event_id, "job": job, "account_id": account_id, "at": confirmed_at}
        async with self._dialect.transaction() as tx:
            if not await tx.execute("claim_event", **event):
                return Confirmation.REPLAYED
            if await tx.execute("confirm_account", **event):
                return Confirmation.CONFIRMED
            await tx.execute("forget_event", job=job, event_id=event_id)
            await tx.execute("count_unknown_event", job=job, at=confirmed_at)
        return Confirmation.UNKNOWN

    # -- reconciling with Stripe's events ------------------------------------------------------

    @guarded
    async def reconcile_span(self, job: str, stripe_account: str) -> LaneSpan:
        """One connected account's accounts of the job a call was made for: the first attempt
        among them, and how many are disconnected with no event confirming it yet."""
        ((first, unconfirmed),) = await self._read.fetch(
            "reconcile_span", job=job, stripe_account=stripe_account
        )
        return LaneSpan(None if first is None else float(first), int(unconfirmed))

    @guarded
    async def reconcile_progress(self, job: str) -> list[ReconcileProgress]:
        """How far reconcile read each connected account's events, least far first."""
        if self._layout < 5:
            return []
        return [_progress(row) for row in await self._read.fetch("reconcile_progress_all", job=job)]

    @guarded
    async def reconciled_page(
        self,
        job: str,
        stripe_account: str,
        listed: Sequence[Listed],
        *,
        events: int,
        cursor: Cursor | None,
        created_upto: int | None,
    ) -> collections.Counter[Confirmation]:
        """Record a page of one connected account's disconnected events and how far the pass
        got, in one transaction: each event as the webhook's (`confirm`), but on that account's
        row only, and an event of an account outside the job is neither kept nor counted
        (a later pass may list it again). `events` were listed in all; `cursor`, where the
        pass goes on (None: it ended); `created_upto`, how far every event is now read."""
        events_of = [
            {"event_id": event_id, "job": job, "account_id": account_id, "at": created}
            for account_id, event_id, created in listed
        ]
        async with self._dialect.transaction() as tx:
            claimed = await tx.execute_each("claim_event", events_of)
            fresh = [event for event, new in zip(events_of, claimed, strict=True) if new]
            mine = await tx.execute_each(
                "confirm_account_lane", [{**e, "stripe_account": stripe_account} for e in fresh]
            )
            others = [e for e, confirmed in zip(fresh, mine, strict=True) if not confirmed]
            await tx.execute_each(
                "forget_event", [{"job": job, "event_id": e["event_id"]} for e in others]
            )
            await tx.execute(
                "save_reconciled",
                job=job,
                stripe_account=stripe_account,
                created_upto=created_upto,
                last_event_id=None if cursor is None else cursor.last_event_id,
                pass_floor=None if cursor is None else cursor.floor,
                pass_top=None if cursor is None else cursor.top,
                events=events,
                at=time.time(),
            )
        found = collections.Counter(
            {
                Confirmation.REPLAYED: len(listed) - len(fresh),
                Confirmation.CONFIRMED: len(fresh) - len(others),
                Confirmation.UNKNOWN: len(others),
            }
        )
        return +found  # without the kinds that did not occur

    # -- verifying by reading accounts back -----------------------------------------------------

    @guarded
    async def open_verify_pass(self, job: str) -> VerifyPass | None:
        """The job's latest verify pass that did not finish."""
        rows = await self._read.fetch("open_verify_pass", job=job)
        return VerifyPass(rows[0][0], rows[0][1], float(rows[0][2])) if rows else None

    @guarded
    async def last_verify_pass(self, job: str) -> VerifyPass | None:
        """The job's latest verify pass, finished or not."""
        if self._layout < 5:
            return None
        rows = await self._read.fetch("last_verify_pass", job=job)
        return VerifyPass(*rows[0]) if rows else None

    @guarded
    async def start_verify_pass(self, job: str, pass_id: str, selection: str) -> None:
        """Start a verify pass; the job's other unfinished passes are not resumed any more."""
        async with self._dialect.transaction() as tx:
            await tx.execute("close_verify_passes", job=job, pass_id=pass_id, now=time.time())
            await tx.execute(
                "start_verify_pass", job=job, pass_id=pass_id, selection=selection, now=time.time()
            )

    @guarded
    async def finish_verify_pass(self, job: str, pass_id: str) -> None:
        """The pass read back every account it chose."""
        await self._read.execute("finish_verify_pass", job=job, pass_id=pass_id, now=time.time())

    @guarded
    async def verify_candidates(
        self, job: str, pass_id: str, *, unconfirmed: bool, after: int, limit: int
    ) -> list[tuple[int, str, str, str | None]]:
        """The next page, in input order after position `after`, of the job's accounts recorded
        disconnected (only unconfirmed ones, if asked) that pass `pass_id` has not read back
        ('': any): (position, connected account, account, the pass that last read it)."""
        rows = await self._read.fetch(
            "verify_candidates",
            job=job,
            pass_id=pass_id,
            unconfirmed=int(unconfirmed),
            after=after,
            limit=limit,
        )
        return [(int(order), lane, account, read_by) for order, lane, account, read_by in rows]

    @guarded
    async def record_verified(
        self, job: str, owner: str, pass_id: str, read: Sequence[ReadBack]
    ) -> int:
        """Record what Stripe reported for accounts read back in pass `pass_id`, in one write,
        only while `owner` holds the job's lease; how many were recorded."""
        rows = [
            {
                "job": job,
                "owner": owner,
                "pass_id": pass_id,
                "stripe_account": lane,
                "account_id": account_id,
                "status": status,
                "at": at,
            }
            for lane, account_id, status, at in read
        ]
        async with self._dialect.transaction() as tx:
            return sum(await tx.execute_each("record_verified", rows))

    @guarded
    async def verify_counts(self, job: str) -> VerifyCounts:
        """What read-backs found of the job: verified, reactivated, never read back."""
        if self._layout < 5:
            counts = await self._read.fetch("outcome_counts", job=job)
            disconnected = sum(int(n) for outcome, n in counts if outcome == "disconnected")
            return VerifyCounts(verified=0, reactivated=0, unverified=disconnected)
        ((verified, reactivated, unverified),) = await self._read.fetch("verify_counts", job=job)
        return VerifyCounts(int(verified), int(reactivated), int(unverified))

    @guarded
    async def pass_counts(self, job: str, pass_id: str) -> dict[str, int]:
        """What one verify pass read back, per status Stripe reported."""
        rows = await self._read.fetch("pass_counts", job=job, pass_id=pass_id)
        return {status: int(count) for status, count in rows}

    # -- samples of runs, for the HTML report ------------------------------------------------

    @guarded
    async def record_sample(
        self,
        job: str,
        run_id: str,
        *,
        at: float,
        requests: int,
        rate_limited: int,
        disconnected: int,
        target_rate: float,
    ) -> None:
        """Keep a run's cumulative counters at `at` (epoch seconds)."""
        await self._read.execute(
            "record_sample",
            job=job,
            run_id=run_id,
            at=at,
            requests=requests,
            rate_limited=rate_limited,
            disconnected=disconnected,
            target_rate=target_rate,
        )

    @guarded
    async def samples(self, job: str) -> list[tuple[str, float, int, int, int, float]]:
        """Every run's samples of the job, oldest first: (run_id, at, requests, rate_limited,
        disconnected, target_rate)."""
        if self._layout < 5:
            return []
        return [
            (run_id, float(at), int(requests), int(limited), int(disconnected), float(rate))
            for run_id, at, requests, limited, disconnected, rate in await self._read.fetch(
                "samples", job=job
            )
        ]


def _progress(row: Row) -> ReconcileProgress:
    lane, created_upto, last_event_id, floor, top, events, pages, at = row
    cursor = None
    if last_event_id is not None:
        cursor = Cursor(last_event_id, int(floor), None if top is None else int(top))
    upto = None if created_upto is None else int(created_upto)
    return ReconcileProgress(lane, upto, cursor, int(events), int(pages), float(at))
