"""Sources: where a run's account IDs come from, picked from its configuration.

    files.py      .txt / .csv / .jsonl, optionally .gz, or stdin
    sql.py        a query over SQLite or PostgreSQL
    customers.py  the accounts of Stripe customers and connected accounts, listed through the API

A source only reads: it trims values and reports malformed rows, and leaves validating and
deduplicating to the store's planning.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from bulkdisconnect.errors import InputError
from bulkdisconnect.model import Owned, Settled

if TYPE_CHECKING:
    from bulkdisconnect.client import StripeClient
    from bulkdisconnect.config import SourceConfig
    from bulkdisconnect.retry import Retrier
    from bulkdisconnect.sources.customers import CustomerBook


# The column (CSV), field (JSONL) or query column read when --column does not name one.
DEFAULT_COLUMN = "account_id"
# The one holding each row's connected account, read when present (--account-column).
DEFAULT_ACCOUNT_COLUMN = "stripe_account"


def choose_column(
    names: Sequence[str], column: str | None, *, where: str, besides: int | None = None
) -> int:
    """The index of the column holding account IDs among `names`.

    `column` when given; else the one named `account_id`; else the only one (the connected
    account's column, at `besides`, aside). Anything else is ambiguous, and guessing could
    disconnect the wrong accounts (another column of `fca_` IDs): ask for --column, listing
    the columns.
    """
    shown = ", ".join(name[:40] for name in names[:20]) + (", ..." if len(names) > 20 else "")
    if column is not None:
        if column in names:
            return list(names).index(column)
        raise InputError(
            f"{where}: no column {column!r} (columns: {shown}){case_hint(column, names)}"
        )
    if DEFAULT_COLUMN in names:
        return list(names).index(DEFAULT_COLUMN)
    others = [index for index in range(len(names)) if index != besides]
    if len(others) == 1:
        return others[0]
    raise InputError(
        f"{where}: no column named {DEFAULT_COLUMN!r} (columns: {shown})"
        f"{case_hint(DEFAULT_COLUMN, names)}; pick the one holding account IDs with --column NAME"
    )


def choose_account_column(names: Sequence[str], column: str | None, *, where: str) -> int | None:
    """The index of the column holding each row's connected account, if any: `column` when
    given (it must exist), else the one named stripe_account."""
    if column is None:
        names = list(names)
        return names.index(DEFAULT_ACCOUNT_COLUMN) if DEFAULT_ACCOUNT_COLUMN in names else None
    if column in names:
        return list(names).index(column)
    shown = ", ".join(name[:40] for name in names[:20]) + (", ..." if len(names) > 20 else "")
    hint = case_hint(column, names, flag="--account-column")
    raise InputError(f"{where}: no column {column!r} (columns: {shown}){hint}")


def case_hint(wanted: str, names: Sequence[str], *, flag: str = "--column") -> str:
    """' (did you mean --column X?)' when a name differs from `wanted` only in case."""
    close = [name for name in names if name.casefold() == wanted.casefold()]
    return f"; did you mean {flag} {close[0]!r}?" if close else ""


class Source(Protocol):
    """A stream of raw account-ID values (trimmed strings), read in chunks.

    A source that already knows an account's outcome (a Stripe list showing it disconnected)
    yields a `Settled` for it instead of the bare ID.
    """

    description: str

    async def check(self) -> None:
        """Check what can be checked before the store is touched; UsageError if it fails."""
        ...

    def chunks(self, size: int = 1000) -> AsyncIterator[Sequence[str | Owned | Settled]]:
        """Yield sequences of 1 to `size` values; raise InputError naming a malformed row."""
        ...


def open_run_source(
    source: SourceConfig,
    *,
    stdin: BinaryIO | None,
    client: StripeClient | None,
    retrier: Retrier,
    book: CustomerBook,
) -> Source:
    """The run's source of account IDs, opened and checked as far as it can be unread."""
    from bulkdisconnect.config import CustomerList, FileInput, SqlQuery  # config reads files.py

    match source:
        case FileInput(path, column, account_column):
            from bulkdisconnect.sources.files import open_source

            return open_source(path, column, stdin=stdin, account_column=account_column)
        case SqlQuery(db, query, params, column, account_column):
            from bulkdisconnect.sources.sql import open_sql_source

            return open_sql_source(db, query, params, column, account_column)
        case CustomerList(ids, file, holder_ids, holders_file):
            from bulkdisconnect.sources.customers import (
                CustomersSource,
                Holder,
                read_customers,
                read_holder_accounts,
            )

            assert client is not None, "a customers or holders source needs the API key"
            holders = [
                *(Holder.customer(customer) for customer in ids),
                *(read_customers(Path(file)) if file is not None else []),
                *(Holder.account(account) for account in holder_ids),
                *(read_holder_accounts(Path(holders_file)) if holders_file is not None else []),
            ]
            return CustomersSource(holders, client=client, retrier=retrier, book=book)
