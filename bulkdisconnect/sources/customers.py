"""A source that lists each customer's Financial Connections accounts through Stripe.

Each list call goes through the run's rate limiter and is retried by the disconnects' policy
and classifier. A customer's accounts stream page by page (100 a call); accounts Stripe
already shows as disconnected come out as `Settled`, so the run records them without a call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import anyio
import structlog

from bulkdisconnect.client import MAX_PAGE, Answer, ListAnswer, StripeClient
from bulkdisconnect.errors import (
    AuthenticationError,
    BulkDisconnectError,
    InputError,
    RunRefusedError,
    UsageError,
    WrongModeError,
)
from bulkdisconnect.limiter import RateLimiter
from bulkdisconnect.model import CUSTOMER_ID_PATTERN, Outcome, Settled
from bulkdisconnect.retry import Action, RetryPolicy, classify

log = structlog.get_logger("bulkdisconnect")


class CustomersSource:
    """The accounts of some Stripe customers, listed from the API (implements `Source`).

    `skip(customer)` says a customer was already listed into the job; `listed(customer)` is
    awaited once every account of that customer has been handed to the consumer, that is when
    the consumer asks for the chunk after the one holding its last account (or, for the last
    customers, when iteration ends). A consumer that stages chunks before committing them
    should therefore record `listed` customers only once it has committed.
    """

    def __init__(
        self,
        customers: Iterable[str],
        *,
        client: StripeClient,
        limiter: RateLimiter,
        policy: RetryPolicy,
        skip: Callable[[str], Awaitable[bool]] | None = None,
        listed: Callable[[str], Awaitable[None]] | None = None,
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
        self._limiter = limiter
        self._policy = policy
        self._skip = skip
        self._listed = listed

    async def check(self) -> None:
        """Nothing to check before listing: the customer IDs were checked when given."""

    async def chunks(self, size: int = 1000) -> AsyncIterator[Sequence[str | Settled]]:
        """Yield lists of 1 to `size` accounts (IDs, or `Settled` when already disconnected)."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        chunk: list[str | Settled] = []
        done: list[str] = []  # customers whose accounts all sit in `chunk` or earlier chunks
        for customer in self.customers:
            if self._skip is not None and await self._skip(customer):
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
                        await self._report(done)
            done.append(customer)
        if chunk:
            yield chunk
        await self._report(done)

    async def _report(self, done: list[str]) -> None:
        """Tell the caller about customers whose accounts the consumer has now all received."""
        if self._listed is not None:
            for customer in done:
                await self._listed(customer)
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
        """One list call, retried like a disconnect; raises when the run cannot go on."""
        attempt = 0
        while True:
            attempt += 1
            async with self._limiter:
                page = await self._client.list_accounts(
                    customer, starting_after=after, limit=MAX_PAGE
                )
            answer = page.answer
            if answer.status == 200 and answer.transport_error is None:
                return page
            action = classify(answer).action
            if action is not Action.RETRY:
                raise _refusal(customer, answer, action)
            if attempt >= self._policy.max_attempts:
                raise RunRefusedError(
                    f"listing the accounts of customer {customer} failed {attempt} times "
                    f"(last: {_describe(answer)}); rerun later: customers already listed are "
                    "not listed again"
                )
            delay = self._policy.delay(attempt)
            log.debug(
                "bulkdisconnect.list.retry",
                customer=customer,
                attempt=attempt,
                status=answer.status,
                code=answer.error_code or answer.transport_error,
                delay=round(delay, 3),
            )
            await anyio.sleep(delay)


def _refusal(customer: str, answer: Answer, action: Action) -> BulkDisconnectError:
    """The error that ends the run for a list call answered finally (or fatally) with no page."""
    message = answer.error_message or "no message"
    if action is Action.FATAL and answer.status == 404:  # resource_missing in the other mode
        return WrongModeError(f"customer {customer}: {message}")
    if action is Action.FATAL:
        return AuthenticationError(f"{message} (HTTP {answer.status}, listing customer {customer})")
    if answer.status == 404 and answer.error_code == "resource_missing":
        return UsageError(f"no such customer {customer}: {message}")
    return UsageError(f"listing the accounts of customer {customer} failed: {_describe(answer)}")


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
