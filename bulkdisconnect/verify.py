"""Verifying a job by reading its accounts back: what Stripe reports now, account by account.

    the pass's accounts (recorded disconnected: unconfirmed ones, all, or a sample), in input
    order, those it read already skipped
    -> GET /v1/financial_connections/accounts/{id} under each one's Stripe-Account, many at
       once, through the run's meters and retry loop
    -> the status Stripe reports recorded in batches, only while this check holds the job's
       lease: disconnected and inactive are verified; active again is flagged (exit 1)

A pass is the unit of resumption. It is a row of `verify_passes` (its selection and when it
started) and each account it read carries its ID, so a pass interrupted (SIGTERM: exit 3) is
resumed by the next `verify` of the same selection, which reads only what the pass has not.
A pass ends when it read every account it chose; the next `verify` then starts a new one. A
sample is drawn by hashing the pass's ID with each account's, so the resumed pass draws the
same accounts.
"""

from __future__ import annotations

import hashlib
import heapq
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import anyio
import anyio.abc
import structlog

from bulkdisconnect.checks import Check, checking, describe, first_error, published
from bulkdisconnect.client import Answer
from bulkdisconnect.config import CheckConfig
from bulkdisconnect.errors import BulkDisconnectError, ExitCode, LockHeldError
from bulkdisconnect.limiter import MAX_CONCURRENCY
from bulkdisconnect.model import Outcome
from bulkdisconnect.retry import classify_list
from bulkdisconnect.stopping import StoppedError, cancel_after_grace
from bulkdisconnect.store import ReadBack, VerifyCounts, VerifyPass

log = structlog.get_logger("bulkdisconnect")

PAGE = 500  # accounts read from the store at a time
BATCH = 200  # read-backs recorded per write, at most
INTERVAL = 0.5  # seconds a read-back waits in the buffer, at most
VERIFIED = frozenset({"disconnected", "inactive", "not_found"})


@dataclass(frozen=True)
class Selection:
    """Which of the job's accounts recorded disconnected a pass reads back."""

    unconfirmed: bool = True  # only those no event confirmed
    sample: int | None = None  # a random N of them (all, confirmed or not)

    @property
    def text(self) -> str:
        """As the pass records it: unconfirmed, all or sample:N."""
        if self.sample is not None:
            return f"sample:{self.sample}"
        return "unconfirmed" if self.unconfirmed else "all"


class VerifyStore(Protocol):
    """What verifying needs of the store."""

    async def open_verify_pass(self, job: str) -> VerifyPass | None:
        """The job's latest pass that did not finish."""
        ...

    async def start_verify_pass(self, job: str, pass_id: str, selection: str) -> None:
        """Start a pass (the job's other unfinished ones are not resumed any more)."""
        ...

    async def finish_verify_pass(self, job: str, pass_id: str) -> None:
        """The pass read every account it chose."""
        ...

    async def verify_candidates(
        self, job: str, pass_id: str, *, unconfirmed: bool, after: int, limit: int
    ) -> list[tuple[int, str, str, str | None]]:
        """(position, Stripe account, account, last pass) of accounts to read, a page."""
        ...

    async def record_verified(
        self, job: str, owner: str, pass_id: str, read: Sequence[ReadBack]
    ) -> int:
        """Record read-backs while `owner` holds the lease; how many."""
        ...

    async def verify_counts(self, job: str) -> VerifyCounts:
        """Verified, reactivated and never read back, over the job."""
        ...

    async def pass_counts(self, job: str, pass_id: str) -> dict[str, int]:
        """What one pass read back, per status."""
        ...


@dataclass(slots=True)
class Found:
    """What one `verify` read back (this process, not the whole pass)."""

    pass_id: str = ""
    resumed: bool = False
    statuses: Counter[str] = field(default_factory=Counter)  # recorded, per status
    unreadable: int = 0  # attempts spent, or an answer that is no account
    refused: dict[str, str] = field(default_factory=dict)  # Stripe account -> why
    ended: bool = False  # the pass read every account it chose


@dataclass(kw_only=True, eq=False)
class Verifier:
    """Reads a selection of a job's accounts back from Stripe into its store."""

    check: Check
    store: VerifyStore
    workers: int = MAX_CONCURRENCY
    found: Found = field(default_factory=Found)
    _buffer: list[ReadBack] = field(default_factory=list)

    async def verify(self, selection: Selection) -> Found:
        """Resume the job's unfinished pass of this selection, or start one, and read back
        what it has not; raises StoppedError if a stop came first (what was read is kept)."""
        found, job, stop = self.found, self.check.config.job, self.check.stop
        open_pass = await self.store.open_verify_pass(job)
        if open_pass is not None and open_pass.selection == selection.text:
            found.pass_id, found.resumed = open_pass.pass_id, True
        else:
            found.pass_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
            found.pass_id += uuid.uuid4().hex[:8]
            await self.store.start_verify_pass(job, found.pass_id, selection.text)
        send, receive = anyio.create_memory_object_stream[tuple[str, str]](self.workers)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.check.meters.tune)
                tg.start_soon(self._keep_writing)
                with anyio.CancelScope() as reading:
                    tg.start_soon(cancel_after_grace, stop, reading, self.check.config.grace)
                    async with anyio.create_task_group() as readers:
                        readers.start_soon(self._feed, selection, send)
                        for _ in range(self.workers):
                            readers.start_soon(self._read, receive.clone())
                        receive.close()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        finally:
            with stop.bounded():
                await self._flush()
        if stop.requested.is_set():
            raise StoppedError(f"stopped while verifying job {job}")
        if not found.unreadable and not found.refused:
            await self.store.finish_verify_pass(job, found.pass_id)
            found.ended = True
        return found

    async def _feed(
        self, selection: Selection, send: anyio.abc.ObjectSendStream[tuple[str, str]]
    ) -> None:
        """Hand the pass's accounts to the readers until they are all handed or a stop."""
        async with send:
            async for lane, account in self._chosen(selection):
                if self.check.stop.requested.is_set():
                    return
                with self.check.stop.cancels():
                    await send.send((lane, account))

    async def _chosen(self, selection: Selection) -> AsyncIterator[tuple[str, str]]:
        """The accounts the pass reads that it has not read yet, in input order."""
        job, pass_id = self.check.config.job, self.found.pass_id
        if selection.sample is None:
            after = 0
            while page := await self.store.verify_candidates(
                job, pass_id, unconfirmed=selection.unconfirmed, after=after, limit=PAGE
            ):
                for _, lane, account, _ in page:
                    yield lane, account
                after = page[-1][0]
            return
        # Drawn among all the job's disconnected accounts, whatever read them before, so that
        # a resumed pass draws the same ones; then those it read are skipped.
        drawn: list[tuple[bytes, int, str, str, str | None]] = []
        after = 0
        while page := await self.store.verify_candidates(
            job, "", unconfirmed=False, after=after, limit=PAGE
        ):
            ranked = [(_rank(pass_id, row[1], row[2]), *row) for row in page]
            drawn = heapq.nsmallest(selection.sample, [*drawn, *ranked])
            after = page[-1][0]
        for _, _, lane, account, read_by in sorted(drawn, key=lambda row: row[1]):
            if read_by != pass_id:
                yield lane, account

    async def _read(self, receive: anyio.abc.ObjectReceiveStream[tuple[str, str]]) -> None:
        """Read accounts back, one at a time, until there are none left or a stop."""
        found, check = self.found, self.check
        async with receive:
            async for lane, account in receive:
                if lane in found.refused:
                    continue
                attempted = await check.retrier.call(
                    lambda: check.client.retrieve_account(account, lane),  # noqa: B023 - awaited here
                    about=account,
                    judge=classify_list,  # a 200 is final whatever the status it reports
                    meter=check.meters.budget(lane),
                )
                if attempted is None:  # stopped before an answer
                    return
                answer, decision, attempts, _ = attempted
                status = _status(answer, decision.outcome)
                if status is not None:
                    self._put(ReadBack(lane, account, status, time.time()))
                elif decision.refuses_account:
                    found.refused[lane] = f"reading its accounts: {describe(answer)}"
                    log.error("bulkdisconnect.account_refused", stripe_account=lane or None)
                else:
                    found.unreadable += 1
                    log.warning(
                        "bulkdisconnect.verify.unreadable",
                        account_id=account,
                        attempts=attempts,
                        **answer.described(),
                    )

    def _put(self, read: ReadBack) -> None:
        self.found.statuses[read.status] += 1
        if read.status == "active":
            log.warning(
                "bulkdisconnect.verify.reactivated",
                account_id=read.account_id,
                stripe_account=read.stripe_account or None,
            )
        self._buffer.append(read)

    async def _keep_writing(self) -> None:
        """Record what was read every INTERVAL s (or sooner when a batch is full)."""
        while True:
            await anyio.sleep(INTERVAL)
            await self._flush()

    async def _flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:BATCH]
            written = await self.store.record_verified(
                self.check.config.job, self.check.owner, self.found.pass_id, batch
            )
            del self._buffer[: len(batch)]
            if written < len(batch):  # the lease was lost: nothing more is ours to write
                raise LockHeldError(
                    f"job {self.check.config.job!r}: lost the lock's lease (taken over); stopped"
                )


def _rank(pass_id: str, lane: str, account: str) -> bytes:
    """An account's place in a pass's sample draw: the same for the same pass."""
    return hashlib.blake2b(f"{pass_id}\n{lane}\n{account}".encode(), digest_size=8).digest()


def _status(answer: Answer, outcome: Outcome | None) -> str | None:
    """What to record of an answer: the status it reports, not_found, or None (not read)."""
    if answer.status == 200 and answer.transport_error is None:
        return answer.account_status
    if outcome is Outcome.NOT_FOUND:
        return "not_found"
    return None


async def verify_job(config: CheckConfig, out: TextIO, selection: Selection) -> ExitCode:
    """`bulkdisconnect verify`: one pass (or the rest of one) under the job's lock; 0 every
    account read back is verified, 1 some are active again or could not be read, 3 stopped."""
    exit_code = ExitCode.INTERRUPTED
    async with checking(config, "verify") as check:
        verifier = Verifier(
            check=check, store=check.store, workers=config.concurrency or MAX_CONCURRENCY
        )
        try:
            found = await verifier.verify(selection)
            counts = await check.store.verify_counts(config.job)
            bad = counts.reactivated or found.unreadable or found.refused
            exit_code = ExitCode.SOME_FAILED if bad else ExitCode.OK
        except StoppedError:
            out.write("interrupted; what was read back is kept: a rerun goes on with the pass\n")
        except BulkDisconnectError as error:
            exit_code = error.exit_code
            raise
        finally:
            with check.stop.bounded():
                await _tell(verifier, check, out, selection)
            await published(check, exit_code)
    return exit_code


async def _tell(verifier: Verifier, check: Check, out: TextIO, selection: Selection) -> None:
    """Print and log what the pass found, and count it in the metrics with the job's state."""
    found, job, store = verifier.found, check.config.job, check.store
    counts = await store.verify_counts(job)
    read = sum(found.statuses.values())
    if found.pass_id:
        state = "ended" if found.ended else "not ended: a rerun goes on with it"
        whole = await store.pass_counts(job, found.pass_id)
        out.write(
            f"verify of job {job}, pass {found.pass_id} ({selection.text} accounts"
            f"{', resumed' if found.resumed else ''}; {state}): read back {read} now\n"
            f"  the pass so far: {_statuses(whole)}\n"
        )
    if found.unreadable:
        out.write(f"  {found.unreadable} could not be read back (see the log): rerun\n")
    for account, reason in sorted(found.refused.items()):
        out.write(f"  stopped for {account or 'the own account'}: {reason}\n")
    out.write(
        f"  the job: verified {counts.verified}, reactivated {counts.reactivated}, "
        f"never read back {counts.unverified}\n"
    )
    if counts.reactivated:
        out.write(
            f"  REACTIVATED: {counts.reactivated} accounts recorded disconnected are active at "
            f"Stripe again; the report lists them (verified_status active): "
            f"bulkdisconnect report --job {job} --format csv\n"
        )
    log.info(
        "bulkdisconnect.verify.end",
        job=job,
        pass_id=found.pass_id,
        ended=found.ended,
        unreadable=found.unreadable,
        refused=len(found.refused),
        reactivated=counts.reactivated,
        **dict(found.statuses),
    )
    if check.metrics is not None:
        check.metrics.count(
            verified=sum(n for status, n in found.statuses.items() if status in VERIFIED),
            reactivated=found.statuses["active"],
            unreadable=found.unreadable,
        )
        check.metrics.set_job(
            verified_accounts=counts.verified, reactivated_accounts=counts.reactivated
        )


def _statuses(counts: dict[str, int]) -> str:
    """Counts per status Stripe reported, active (flagged) last."""
    if not counts:
        return "nothing read back yet"
    named = {"active": "ACTIVE AGAIN", "not_found": "not found"}
    order = sorted(counts, key=lambda status: (status == "active", status))
    return ", ".join(f"{named.get(status, status)} {counts[status]}" for status in order)
