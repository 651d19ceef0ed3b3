"""A source that lists each customer's Financial Connections accounts through Stripe.

Each list call goes through the run's retry loop (`Retrier`: its meters, its classifier, its
back-off). A customer's accounts stream page by page (100 a call); accounts Stripe already
shows as disconnected come out as `Settled`, so the run records them without a call. The
job's `CustomerBook` skips customers an earlier plan listed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from bulkdisconnect.client import MAX_PAGE, Answer, ListAnswer, StripeClient
from bulkdisconnect.errors import InputError, RunRefusedError, UsageError
from bulkdisconnect.model import CUSTOMER_ID_PATTERN, Outcome, Settled
from bulkdisconnect.retry import Action, Retrier, classify_list
from bulkdisconnect.stopping import StoppedError


class CustomerLedger(Protocol):
    """What the customers bookkeeping needs of the store."""

    async def listed_before(self, job: str, customer: str) -> bool:
        """Whether an earlier plan of the job listed this customer's accounts."""
        ...

    async def remember_listed(self, job: str, customers: Sequence[str]) -> None:
        """Remember that these customers' accounts are in the job."""
        ...


class CustomerBook:
    """Which customers' accounts a job holds already.

    A customer an earlier plan listed is skipped; one this plan listed is remembered only
    once the plan is merged (`remember`), so a refused or interrupted plan lists it again.
    The store is bound once it is open: the source is opened and checked before it.
    """

    def __init__(self, job: str) -> None:
        self.job = job
        self._ledger: CustomerLedger | None = None
        self.handed_over: list[str] = []  # every account of these reached the consumer
        self.skipped = 0

    def bind(self, ledger: CustomerLedger) -> None:
        """The store to look customers up in and remember them to."""
        self._ledger = ledger

    async def listed_before(self, customer: str) -> bool:
        """Whether an earlier plan listed this customer (then it is skipped)."""
        if self._ledger is None:
            return False
        listed = await self._ledger.listed_before(self.job, customer)
        self.skipped += listed
        return listed

    async def remember(self) -> None:
        """The plan was merged: remember the customers it listed."""
        if self._ledger is not None and self.handed_over:
            await self._ledger.remember_listed(self.job, self.handed_over)


class CustomersSource:
    """The accounts of some Stripe customers, listed from the API (implements `Source`)."""

    def __init__(
        self,
        customers: Iterable[str],
        *,
        client: StripeClient,
        retrier: Retrier,
        book: CustomerBook | None = None,
    ) -> None:
        self.customers = list(dict.fromkeys(customers))  # deduplicated, first-seen order
        for customer in self.customers:
            if CUSTOMER_ID_PATTERN.fullmatch(customer) is None:
                raise InputError(
                    f"{customer!r} is not a Stripe customer ID "
                    "(cus_ followed by letters and digits)"
                )
        count = len(self.customers)
        self.description = f"{count} customer{'' if count == 1 else 's'}"
        self._client = client
        self._retrier = retrier
        self._book = book

    async def check(self) -> None:
        """Nothing to check before listing: the customer IDs were checked when given."""

    async def chunks(self, size: int = 1000) -> AsyncIterator[Sequence[str | Settled]]:
        """Yield lists of 1 to `size` accounts (IDs, or `Settled` when already disconnected).

        A customer counts as handed over to the book once the consumer asks for the chunk
        after the one holding its last account (or iteration ends).
        """
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        chunk: list[str | Settled] = []
        done: list[str] = []  # customers whose accounts all sit in `chunk` or earlier chunks
        for customer in self.customers:
            if self._book is not None and await self._book.listed_before(customer):
                continue
            async for page in self._pages(customer):
                for account_id, status in page:
                    disconnected = status == "disconnected"
                    chunk.append(
                        Settled(account_id, Outcome.DISCONNECTED) if disconnected else account_id
                    )
                    if len(chunk) >= size:
                        yield chunk
                        chunk = []
                        self._hand_over(done)
            done.append(customer)
        if chunk:
            yield chunk
        self._hand_over(done)

    def _hand_over(self, done: list[str]) -> None:
        if self._book is not None:
            self._book.handed_over.extend(done)
        done.clear()

    async def _pages(self, customer: str) -> AsyncIterator[list[tuple[str, str]]]:
        """A customer's accounts a page at a time, each page after the last ID of the one before."""
        after: str | None = None
        while True:
            page = await self._fetch(customer, after)
            if page.accounts:
                yield page.accounts
            # An empty page claiming more would ask for the same page forever: treat it as the end.
            if not page.has_more or not page.accounts:
                return
            after = page.accounts[-1][0]

    async def _fetch(self, customer: str, after: str | None) -> ListAnswer:
        """One list call through the retry loop; raises when the run cannot go on."""
        page = ListAnswer(Answer(0))

        async def send() -> Answer:
            nonlocal page
            page = await self._client.list_accounts(customer, starting_after=after, limit=MAX_PAGE)
            return page.answer

        attempted = await self._retrier.call(send, about=customer, judge=classify_list)
        if attempted is None:
            raise StoppedError(f"stopped while listing the accounts of customer {customer}")
        answer, decision, attempts, _ = attempted
        if decision.action is Action.FINAL and answer.status == 200:
            return page
        if decision.action is Action.RETRY:  # the attempts are spent
            raise RunRefusedError(
                f"listing the accounts of customer {customer} failed {attempts} times "
                f"(last: {_describe(answer)}); rerun later: customers already listed are "
                "not listed again"
            )
        if answer.status == 404 and answer.error_code == "resource_missing":
            raise UsageError(f"no such customer {customer}: {answer.error_message or 'no message'}")
        raise UsageError(f"listing the accounts of customer {customer} failed: {_describe(answer)}")


def _describe(answer: Answer) -> str:
    if answer.connect_error is not None:
        return f"cannot reach the API: {answer.connect_error}"
    code = answer.error_code or answer.error_type or answer.transport_error or "no code"
    text = f"HTTP {answer.status} {code}"
    return f"{text}: {answer.error_message}" if answer.error_message else text


def read_customer_ids(path: Path) -> list[str]:
    """Customer IDs from a file, one a line; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"customers file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the customers file: {exc}") from exc
    customers = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        if CUSTOMER_ID_PATTERN.fullmatch(value) is None:
            raise InputError(
                f"{path}, line {number}: {value[:80]!r} is not a Stripe customer ID "
                "(cus_ followed by letters and digits)"
            )
        customers.append(value)
    return customers
