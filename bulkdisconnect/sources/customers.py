"""A source that lists account holders' Financial Connections accounts through Stripe.

An account holder is a customer (`account_holder[customer]=cus_...`) or a connected account
(`account_holder[account]=acct_...`, offboarding it). Each holder is listed under a Stripe
account: a connected account under its own `Stripe-Account` header, a customer under the one its
row names ('' for the run's own --stripe-account, or the platform), and its accounts are planned
under that same Stripe account, so their disconnects carry that header too.

Each list call goes through the run's retry loop (`Retrier`: its meters, its classifier, its
back-off). A holder's accounts stream page by page (100 a call); accounts Stripe already
shows as disconnected come out as `Settled`, so the run records them without a call. A
connected account that refused the platform (403 account_invalid) is listed no further: its
holders are skipped and the run reports it refused (exit 1). The job's `CustomerBook` skips
holders an earlier plan listed; it remembers them in the store's customers table as
`Holder.key`: `cus_Y` (a customer of the run's own account), `acct_X/cus_Y` (a customer of
connected account acct_X) or `acct_X` (connected account acct_X as a holder).
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import structlog

from bulkdisconnect.client import MAX_PAGE, Answer, ListAnswer, StripeClient
from bulkdisconnect.errors import InputError, RunRefusedError, UsageError
from bulkdisconnect.model import (
    CUSTOMER_ID_PATTERN,
    Outcome,
    Owned,
    Settled,
    is_valid_stripe_account,
)
from bulkdisconnect.retry import Action, Retrier, classify_list
from bulkdisconnect.stopping import StoppedError

log = structlog.get_logger("bulkdisconnect")

CUSTOMER_HINT = "cus_ followed by letters and digits"
ACCOUNT_HINT = "acct_ followed by letters and digits"


class CustomerLedger(Protocol):
    """What the holders' bookkeeping needs of the store (its customers table)."""

    async def listed_before(self, job: str, customer: str) -> bool:
        """Whether an earlier plan of the job listed this holder's accounts (by its key)."""
        ...

    async def remember_listed(self, job: str, customers: Sequence[str]) -> None:
        """Remember that these holders' accounts (by their keys) are in the job."""
        ...


class CustomerBook:
    """Which holders' accounts a job holds already, by `Holder.key`.

    A holder an earlier plan listed is skipped; one this plan listed is remembered only
    once the plan is merged (`remember`), so a refused or interrupted plan lists it again.
    The store is bound once it is open: the source is opened and checked before it.
    """

    def __init__(self, job: str) -> None:
        self.job = job
        self._ledger: CustomerLedger | None = None
        self.handed_over: list[str] = []  # every account of these reached the consumer
        self.skipped = 0

    def bind(self, ledger: CustomerLedger) -> None:
        """The store to look holders up in and remember them to."""
        self._ledger = ledger

    async def listed_before(self, key: str) -> bool:
        """Whether an earlier plan listed this holder (then it is skipped)."""
        if self._ledger is None:
            return False
        listed = await self._ledger.listed_before(self.job, key)
        self.skipped += listed
        return listed

    async def remember(self) -> None:
        """The plan was merged: remember the holders it listed."""
        if self._ledger is not None and self.handed_over:
            await self._ledger.remember_listed(self.job, self.handed_over)


class Holder(NamedTuple):
    """An account holder whose accounts are listed, and the Stripe account they live on."""

    id: str  # cus_... (a customer) or acct_... (a connected account)
    stripe_account: str  # the Stripe-Account listed under ('': the run's own)
    is_account: bool = False  # a connected account, rather than a customer

    @classmethod
    def customer(cls, customer: str, stripe_account: str = "") -> Holder:
        """A customer of `stripe_account` ('': of the run's own account)."""
        return cls(customer, stripe_account)

    @classmethod
    def account(cls, account: str) -> Holder:
        """A connected account: its accounts live on it, so it is listed under its own header."""
        return cls(account, account, is_account=True)

    @property
    def key(self) -> str:
        """How the job's book remembers it: cus_Y, acct_X/cus_Y or acct_X."""
        if self.is_account or not self.stripe_account:
            return self.id
        return f"{self.stripe_account}/{self.id}"

    def __str__(self) -> str:
        if self.is_account:
            return f"connected account {self.id}"
        of = f" of {self.stripe_account}" if self.stripe_account else ""
        return f"customer {self.id}{of}"

    def check(self) -> None:
        """InputError unless the IDs are well formed (a connected account under its own)."""
        if self.is_account:
            if not is_valid_stripe_account(self.id):
                raise InputError(f"{self.id!r} is not a Stripe account ID ({ACCOUNT_HINT})")
            if self.stripe_account != self.id:
                raise InputError(f"connected account {self.id} is listed under its own header")
            return
        if CUSTOMER_ID_PATTERN.fullmatch(self.id) is None:
            raise InputError(f"{self.id!r} is not a Stripe customer ID ({CUSTOMER_HINT})")
        if self.stripe_account and not is_valid_stripe_account(self.stripe_account):
            raise InputError(
                f"{self.stripe_account!r} (of customer {self.id}) is not a Stripe account ID "
                f"({ACCOUNT_HINT})"
            )


class CustomersSource:
    """The accounts of customers and connected accounts, listed from the API (a `Source`)."""

    def __init__(
        self,
        holders: Iterable[Holder],
        *,
        client: StripeClient,
        retrier: Retrier,
        book: CustomerBook | None = None,
    ) -> None:
        self.holders = list(dict.fromkeys(holders))  # deduplicated, first-seen order
        for holder in self.holders:
            holder.check()
        accounts = sum(holder.is_account for holder in self.holders)
        customers = len(self.holders) - accounts
        self.description = " and ".join(
            f"{count} {noun}{'' if count == 1 else 's'}"
            for count, noun in ((customers, "customer"), (accounts, "connected account"))
            if count or (noun == "customer" and not accounts)
        )
        self._client = client
        self._retrier = retrier
        self._book = book
        self._refused: set[str] = set()  # Stripe accounts that answered 403 account_invalid

    async def check(self) -> None:
        """Nothing to check before listing: the holder IDs were checked when given."""

    async def chunks(self, size: int = 1000) -> AsyncIterator[Sequence[str | Owned | Settled]]:
        """Yield lists of 1 to `size` accounts: bare IDs (of the run's own account), `Owned`
        (of a connected account), or `Settled` when already disconnected.

        A holder counts as handed over to the book once the consumer asks for the chunk
        after the one holding its last account (or iteration ends).
        """
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        chunk: list[str | Owned | Settled] = []
        done: list[str] = []  # keys of holders whose accounts all sit in `chunk` or before
        for holder in self.holders:
            if holder.stripe_account in self._refused:
                continue
            if self._book is not None and await self._book.listed_before(holder.key):
                continue
            owner = holder.stripe_account
            complete = True
            async for page in self._pages(holder):
                if page is None:  # the connected account refused the platform
                    complete = False
                    break
                for account_id, status in page:
                    if status == "disconnected":
                        chunk.append(Settled(account_id, Outcome.DISCONNECTED, owner))
                    else:
                        chunk.append(Owned(account_id, owner) if owner else account_id)
                    if len(chunk) >= size:
                        yield chunk
                        chunk = []
                        self._hand_over(done)
            if complete:
                done.append(holder.key)
        if chunk:
            yield chunk
        self._hand_over(done)

    def _hand_over(self, done: list[str]) -> None:
        if self._book is not None:
            self._book.handed_over.extend(done)
        done.clear()

    async def _pages(self, holder: Holder) -> AsyncIterator[list[tuple[str, str]] | None]:
        """A holder's accounts a page at a time, each page after the last ID of the one
        before; None (and the end) if its Stripe account refused the platform."""
        after: str | None = None
        while True:
            page = await self._fetch(holder, after)
            if page is None:
                yield None
                return
            if page.accounts:
                yield page.accounts
            # An empty page claiming more would ask for the same page forever: treat it as the end.
            if not page.has_more or not page.accounts:
                return
            after = page.accounts[-1][0]

    async def _fetch(self, holder: Holder, after: str | None) -> ListAnswer | None:
        """One list call through the retry loop; None if the holder's Stripe account refused
        the platform (403 account_invalid); raises when the run cannot go on."""
        page = ListAnswer(Answer(0))

        async def send() -> Answer:
            nonlocal page
            page = await self._client.list_accounts(
                holder.id,
                stripe_account=holder.stripe_account,
                starting_after=after,
                limit=MAX_PAGE,
            )
            return page.answer

        attempted = await self._retrier.call(send, about=holder.key, judge=classify_list)
        if attempted is None:
            raise StoppedError(f"stopped while listing the accounts of {holder}")
        answer, decision, attempts, _ = attempted
        if decision.action is Action.FINAL and answer.status == 200:
            return page
        if decision.action is Action.RETRY:  # the attempts are spent
            raise RunRefusedError(
                f"listing the accounts of {holder} failed {attempts} times "
                f"(last: {_describe(answer)}); rerun later: holders already listed are "
                "not listed again"
            )
        if decision.refuses_account:
            self._refuse(holder, answer)
            return None
        if answer.status == 404 and answer.error_code == "resource_missing":
            raise UsageError(f"no such {holder}: {answer.error_message or 'no message'}")
        raise UsageError(f"listing the accounts of {holder} failed: {_describe(answer)}")

    def _refuse(self, holder: Holder, answer: Answer) -> None:
        """The platform has no access to the holder's Stripe account: list nothing more of it,
        and report it refused (the run exits 1); a rerun lists it again."""
        account = holder.stripe_account
        self._refused.add(account)
        reason = f"{answer.error_code}: {answer.error_message or 'no message'}"
        self._retrier.stats.refused[account] = f"listing its accounts: {reason}"
        log.error(
            "bulkdisconnect.account_refused",
            stripe_account=account or None,
            holder=holder.id,
            code=answer.error_code,
            message=answer.error_message,
        )


def _describe(answer: Answer) -> str:
    if answer.connect_error is not None:
        return f"cannot reach the API: {answer.connect_error}"
    code = answer.error_code or answer.error_type or answer.transport_error or "no code"
    text = f"HTTP {answer.status} {code}"
    return f"{text}: {answer.error_message}" if answer.error_message else text


def read_customers(path: Path) -> list[Holder]:
    """Customers from a file: one ID a line, or a CSV whose header names `customer_id` and,
    optionally, `stripe_account` (the connected account the customer belongs to; empty: the
    run's own). Blank lines and `#` comments are skipped; other columns are ignored."""
    lines = _meaningful_lines(path, "customers")
    if not lines:
        return []
    number, first = lines[0]
    if "," not in first and first != "customer_id":
        return [Holder.customer(_customer(path, n, value)) for n, value in lines]
    header = [name.strip() for name in _cells(first)]
    if "customer_id" not in header:
        shown = ", ".join(name[:40] for name in header[:20])
        raise InputError(
            f"{path}, line {number}: a customers CSV needs a customer_id column "
            f"(and optionally stripe_account); columns: {shown}"
        )
    at = header.index("customer_id")
    owner_at = header.index("stripe_account") if "stripe_account" in header else None
    holders = []
    for n, line in lines[1:]:
        cells = [cell.strip() for cell in _cells(line)]
        if len(cells) != len(header):
            raise InputError(
                f"{path}, line {n}: {len(cells)} cells where the header has {len(header)}"
            )
        owner = cells[owner_at] if owner_at is not None else ""
        if owner and not is_valid_stripe_account(owner):
            raise InputError(
                f"{path}, line {n}: {owner[:80]!r} is not a Stripe account ID ({ACCOUNT_HINT})"
            )
        holders.append(Holder.customer(_customer(path, n, cells[at]), owner))
    return holders


def read_holder_accounts(path: Path) -> list[Holder]:
    """Connected accounts to offboard, one acct_ ID a line (a first line `stripe_account`, a
    CSV header, is skipped); blank lines and `#` comments are skipped."""
    holders = []
    for number, value in _meaningful_lines(path, "holder accounts"):
        if number == 1 and value == "stripe_account":
            continue
        if not is_valid_stripe_account(value):
            raise InputError(
                f"{path}, line {number}: {value[:80]!r} is not a Stripe account ID ({ACCOUNT_HINT})"
            )
        holders.append(Holder.account(value))
    return holders


def _meaningful_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that are neither blank nor `#` comments."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} file: {exc}") from exc
    lines = ((n, line.strip()) for n, line in enumerate(text.splitlines(), start=1))
    return [(n, value) for n, value in lines if value and not value.startswith("#")]


def _cells(line: str) -> list[str]:
    return next(csv.reader([line]))


def _customer(path: Path, number: int, value: str) -> str:
    if CUSTOMER_ID_PATTERN.fullmatch(value) is None:
        raise InputError(
            f"{path}, line {number}: {value[:80]!r} is not a Stripe customer ID ({CUSTOMER_HINT})"
        )
    return value
