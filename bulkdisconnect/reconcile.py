"""Reconciling a job with Stripe's Events API: proof of purge without a reachable webhook.

    GET /v1/events?type=financial_connections.account.disconnected&created[gte]=FLOOR&limit=100
        newest first, each page after the last event of the one before, per Stripe account
        (its Stripe-Account header), through the run's meters and retry loop
    -> each event of an account of the job recorded as the webhook records it (once per event)
    -> how far it got, in the same transaction as the page: a rerun reads only what is new

Stripe lists an event some time after it is created. A pass that saw events up to `created` = T
has seen every event created before T - LAG, so it remembers T - LAG (`created_upto`) and the
next pass reads down to there: what it reads again is the last LAG seconds, never the pages
before. A pass cut short (a signal, an error) remembers its cursor, and the next one finishes
it first. A Stripe account whose disconnected accounts are all confirmed is not read at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TextIO

import anyio
import structlog

from bulkdisconnect.checks import checking, describe, first_error, published
from bulkdisconnect.client import Answer, EventPage, StripeClient
from bulkdisconnect.config import CheckConfig, RunConfig
from bulkdisconnect.errors import BulkDisconnectError, ExitCode, RunRefusedError, UsageError
from bulkdisconnect.limiter import Meters
from bulkdisconnect.metrics import CheckMetrics, RunMetrics
from bulkdisconnect.retry import Action, Retrier, classify_list
from bulkdisconnect.stopping import Stop, StoppedError
from bulkdisconnect.store import Confirmation, Cursor, LaneSpan, Listed, ReconcileProgress
from bulkdisconnect.store.core import SqlStore

log = structlog.get_logger("bulkdisconnect")

DISCONNECTED = "financial_connections.account.disconnected"
# Our clock and Stripe's differ by a little: a job's events are read from this long before
# its first attempt (by our clock) on.
CLOCK_MARGIN = 300
# Seconds an event may take to be listed after it is created (Stripe: seconds). Each pass
# reads this much again, for the events that came late.
EVENT_LAG = 60
RETENTION = 30 * 86_400  # Stripe lists the events of the last 30 days
LANES_AT_ONCE = 8  # Stripe accounts read at the same time (each has its own budget)


class EventLister(Protocol):
    """What reconciling needs of the client (client.StripeClient)."""

    async def list_events(
        self,
        kind: str,
        *,
        created_gte: int,
        stripe_account: str = "",
        starting_after: str | None = None,
    ) -> EventPage:
        """One page of events of a type, newest first."""
        ...


class ReconcileStore(Protocol):
    """What reconciling needs of the store."""

    async def lanes(self, job: str) -> list[str]:
        """The job's Stripe accounts ('' for its own)."""
        ...

    async def reconcile_span(self, job: str, stripe_account: str) -> LaneSpan:
        """One Stripe account's accounts a call was made for: first attempt, unconfirmed."""
        ...

    async def reconcile_progress(self, job: str) -> list[ReconcileProgress]:
        """How far earlier passes read each Stripe account's events."""
        ...

    async def reconciled_page(
        self,
        job: str,
        stripe_account: str,
        listed: list[Listed],
        *,
        events: int,
        cursor: Cursor | None,
        created_upto: int | None,
    ) -> dict[Confirmation, int]:
        """Record a page's events and where the pass goes on, in one transaction."""
        ...


@dataclass(slots=True)
class Tally:
    """What reconciling found, over its passes and Stripe accounts."""

    pages: int = 0
    events: int = 0  # listed
    confirmed: int = 0  # accounts of the job this reconcile confirmed
    replayed: int = 0  # recorded already (by the webhook, or an earlier pass)
    other: int = 0  # events of accounts outside the job: neither kept nor counted in the store
    read: int = 0  # Stripe accounts whose events were read
    settled: int = 0  # Stripe accounts with nothing left to confirm: not read
    unconfirmed: int = 0  # after the last pass: disconnected by a call, no event yet
    oldest: float | None = None  # the first attempt of the job, by our clock
    refused: dict[str, str] = field(default_factory=dict)  # Stripe account -> why


class _AccountRefusedError(Exception):
    """The platform has no access to a Stripe account (403 account_invalid)."""


@dataclass(kw_only=True, eq=False)
class Reconciler:
    """Reads a job's disconnected events from Stripe into its store (see the module doc)."""

    job: str
    store: ReconcileStore
    client: EventLister
    retrier: Retrier
    meters: Meters
    full: bool = False  # read every event since the job's first attempt, whatever was read
    lag: int = EVENT_LAG
    tally: Tally = field(default_factory=Tally)

    async def reconcile(self) -> Tally:
        """One pass over each of the job's Stripe accounts that has something to confirm.

        Raises StoppedError if a stop came first (what was read is kept), the refusal of a
        fatal answer, or RunRefusedError when a page could not be listed.
        """
        tally = self.tally
        lanes = await self.store.lanes(self.job)
        spans = {lane: await self.store.reconcile_span(self.job, lane) for lane in lanes}
        firsts = [span.first_attempt_at for span in spans.values() if span.first_attempt_at]
        tally.oldest = min(firsts, default=None)
        progress = {p.stripe_account: p for p in await self.store.reconcile_progress(self.job)}
        todo = [
            lane
            for lane, span in spans.items()
            if span.first_attempt_at is not None and (span.unconfirmed or self.full)
        ]
        tally.settled = len(firsts) - len(todo)
        limit = anyio.CapacityLimiter(LANES_AT_ONCE)

        async def read(lane: str) -> None:
            async with limit:
                try:
                    await self._lane(lane, spans[lane], progress.get(lane))
                except _AccountRefusedError as refused:
                    tally.refused[lane] = str(refused)

        try:
            async with anyio.create_task_group() as tg:
                for lane in todo:
                    tg.start_soon(read, lane)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        tally.read = len(todo) - len(tally.refused)
        tally.unconfirmed = sum(
            [(await self.store.reconcile_span(self.job, lane)).unconfirmed for lane in spans]
        )
        return tally

    async def _lane(self, lane: str, span: LaneSpan, progress: ReconcileProgress | None) -> None:
        """Read one Stripe account's events: finish a pass cut short, then one from the top."""
        assert span.first_attempt_at is not None
        start = int(span.first_attempt_at) - CLOCK_MARGIN
        upto = None if progress is None or self.full else progress.created_upto
        cut_short = None if progress is None or self.full else progress.cursor
        if cut_short is not None:
            upto = await self._pass(lane, cut_short.floor, cut_short, upto)
        await self._pass(lane, start if upto is None else max(start, upto), None, upto)

    async def _pass(
        self, lane: str, floor: int, cursor: Cursor | None, upto: int | None
    ) -> int | None:
        """Read down from the newest event (or after a pass's `cursor`) to `created` = `floor`,
        recording each page; the `created_upto` it leaves."""
        after, top = (None, None) if cursor is None else (cursor.last_event_id, cursor.top)
        while True:
            page = await self._page(lane, floor, after)
            if page is None:  # the cursor's event is no longer listed: start from the top
                log.info("bulkdisconnect.reconcile.cursor_gone", stripe_account=lane or None)
                after, top = None, None
                continue
            events = page.events
            if events:  # newest first: a pass's first event is its newest
                top = events[0].created if top is None else max(top, events[0].created)
            ended = not page.has_more or not events
            if ended and top is not None:
                upto = top - self.lag if upto is None else max(upto, top - self.lag)
            listed = [
                Listed(event.account_id, event.id, float(event.created))
                for event in events
                if event.type == DISCONNECTED and event.account_id is not None
            ]
            found = await self.store.reconciled_page(
                self.job,
                lane,
                listed,
                events=len(events),
                cursor=None if ended else Cursor(events[-1].id, floor, top),
                created_upto=upto if ended else None,
            )
            self._count(len(events), found)
            if ended:
                return upto
            after = events[-1].id

    def _count(self, events: int, found: dict[Confirmation, int]) -> None:
        tally = self.tally
        tally.pages += 1
        tally.events += events
        tally.confirmed += found.get(Confirmation.CONFIRMED, 0)
        tally.replayed += found.get(Confirmation.REPLAYED, 0)
        tally.other += found.get(Confirmation.UNKNOWN, 0)

    async def _page(self, lane: str, floor: int, after: str | None) -> EventPage | None:
        """One page through the retry loop; None if `after` is not an event Stripe lists."""
        page = EventPage(Answer(0))

        async def send() -> Answer:
            nonlocal page
            page = await self.client.list_events(
                DISCONNECTED, created_gte=floor, stripe_account=lane, starting_after=after
            )
            return page.answer

        attempted = await self.retrier.call(
            send,
            about=f"events of {lane or 'the own account'}",
            judge=classify_list,
            meter=self.meters.budget(lane),
        )
        if attempted is None:
            raise StoppedError(f"stopped while listing the events of {_named(lane)}")
        answer, decision, attempts, _ = attempted
        if decision.action is Action.FINAL and answer.status == 200:
            return page
        if decision.action is Action.RETRY or answer.status >= 500:  # the attempts are spent
            raise RunRefusedError(
                f"listing the events of {_named(lane)} failed {attempts} times (last: "
                f"{describe(answer)}); rerun later: it goes on where it stopped"
            )
        if decision.refuses_account:
            log.error(
                "bulkdisconnect.account_refused",
                stripe_account=lane or None,
                code=answer.error_code,
                message=answer.error_message,
            )
            raise _AccountRefusedError(f"listing its events: {describe(answer)}")
        if after is not None and answer.error_code == "resource_missing":
            return None
        raise UsageError(f"listing the events of {_named(lane)} failed: {describe(answer)}")


def _named(lane: str) -> str:
    return lane or "the own account"


def format_tally(job: str, tally: Tally, *, now: float) -> str:
    """What a reconcile did and what is left, for people."""
    lines = [
        (
            f"reconcile of job {job}: {tally.events} events listed in {tally.pages} pages from "
            f"{tally.read} Stripe account(s) ({tally.settled} had nothing left to confirm)"
        ),
        (
            f"  confirmed {tally.confirmed} (already recorded {tally.replayed}, "
            f"of accounts outside the job {tally.other})"
        ),
    ]
    if tally.oldest is not None and tally.oldest - CLOCK_MARGIN < now - RETENTION:
        since = datetime.fromtimestamp(now - RETENTION, UTC).strftime("%Y-%m-%d")
        lines.append(
            f"  the job's first attempts are older than the 30 days of events Stripe keeps: "
            f"events before {since} are gone; read those accounts back instead: "
            f"bulkdisconnect verify --job {job} --unconfirmed"
        )
    lines += [
        f"  stopped for {account or 'the own account'}: {reason}"
        for account, reason in sorted(tally.refused.items())
    ]
    if tally.unconfirmed:
        lines.append(
            f"  {tally.unconfirmed} disconnected accounts have no event yet: it may still "
            f"come (reconcile again later), or read them back: "
            f"bulkdisconnect verify --job {job} --unconfirmed"
        )
    else:
        lines.append("  every account a call disconnected is confirmed")
    return "\n".join(lines) + "\n"


def report_to(out: TextIO, job: str, tally: Tally) -> None:
    """Print the tally, and log it."""
    out.write(format_tally(job, tally, now=time.time()))
    log.info(
        "bulkdisconnect.reconcile.end",
        job=job,
        pages=tally.pages,
        events=tally.events,
        confirmed=tally.confirmed,
        replayed=tally.replayed,
        other=tally.other,
        unconfirmed=tally.unconfirmed,
        refused=len(tally.refused),
    )


async def reconcile_job(config: CheckConfig, out: TextIO, *, full: bool = False) -> ExitCode:
    """`bulkdisconnect reconcile`: one pass under the job's lock; its exit code (0 done, 1 a
    Stripe account refused the platform, 3 interrupted: a rerun goes on)."""
    exit_code = ExitCode.INTERRUPTED
    async with checking(config, "reconcile") as check:
        reconciler = Reconciler(
            job=config.job,
            store=check.store,
            client=check.client,
            retrier=check.retrier,
            meters=check.meters,
            full=full,
        )
        try:
            tally = await reconciler.reconcile()
            exit_code = ExitCode.SOME_FAILED if tally.refused else ExitCode.OK
        except StoppedError:
            out.write("interrupted; what was read is kept: a rerun goes on where it stopped\n")
        except BulkDisconnectError as error:
            exit_code = error.exit_code
            raise
        finally:
            with check.stop.bounded():
                await _tell(reconciler, check.store, out, check.metrics)
            await published(check, exit_code)
    return exit_code


class _Hooks(Protocol):
    @property
    def out(self) -> TextIO: ...


class RunParts(Protocol):
    """What `run --reconcile` borrows of the run (job._Run)."""

    @property
    def config(self) -> RunConfig: ...
    @property
    def hooks(self) -> _Hooks: ...
    @property
    def store(self) -> SqlStore: ...
    @property
    def client(self) -> StripeClient | None: ...
    @property
    def retrier(self) -> Retrier: ...
    @property
    def meters(self) -> Meters: ...
    @property
    def stop(self) -> Stop: ...
    @property
    def metrics(self) -> RunMetrics | None: ...


POLL = 2.0  # seconds between passes while `run --reconcile` waits for the last events


async def after_run(run: RunParts, ended: tuple[ExitCode, str]) -> tuple[ExitCode, str]:
    """`run --reconcile`: once the run has finished, read its events, again every POLL s while
    some are missing, for up to --reconcile-wait; the run's exit code and summary (3 if a
    stop came meanwhile: a rerun has nothing to call and reconciles again)."""
    exit_code, summary = ended
    if run.client is None or exit_code not in (ExitCode.OK, ExitCode.SOME_FAILED):
        return ended
    config, out = run.config, run.hooks.out
    metrics = None
    if run.metrics is not None:
        metrics = CheckMetrics(
            config.job, "reconcile", run.metrics.settings, registry=run.metrics.registry
        )
    reconciler = Reconciler(
        job=config.job,
        store=run.store,
        client=run.client,
        retrier=run.retrier,
        meters=run.meters,
    )
    give_up_at = time.monotonic() + config.reconcile_wait
    try:
        await _until_confirmed(reconciler, run.stop, give_up_at)
    except StoppedError:
        out.write("interrupted while reconciling; a rerun goes on where it stopped\n")
        exit_code, summary = ExitCode.INTERRUPTED, f"{summary}interrupted while reconciling\n"
    finally:
        with run.stop.bounded():
            await _tell(reconciler, run.store, out, metrics)
    if reconciler.tally.refused and exit_code is ExitCode.OK:
        exit_code = ExitCode.SOME_FAILED
    return exit_code, summary


async def _until_confirmed(reconciler: Reconciler, stop: Stop, give_up_at: float) -> None:
    """Reconcile, and again every POLL s while events are missing, until `give_up_at`."""
    while not (await reconciler.reconcile()).refused:
        left = give_up_at - time.monotonic()
        if not reconciler.tally.unconfirmed or left <= 0:
            return
        with stop.cancels():
            await anyio.sleep(min(POLL, left))
        if stop.requested.is_set():
            raise StoppedError


async def _tell(
    reconciler: Reconciler, store: SqlStore, out: TextIO, metrics: CheckMetrics | None
) -> None:
    """Print and log what reconciling did; count it in the metrics with the job's state."""
    tally = reconciler.tally
    report_to(out, reconciler.job, tally)
    if metrics is not None:
        metrics.count(events=tally.events, confirmed=tally.confirmed)
        confirmed = await store.confirmed_count(reconciler.job)
        metrics.set_job(confirmed_accounts=confirmed, unconfirmed_accounts=tally.unconfirmed)
