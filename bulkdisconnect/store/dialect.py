"""What a dialect supplies to `SqlStore`, and how it loads the statements of queries.sql."""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from importlib import resources
from typing import Any, Protocol

from bulkdisconnect.model import ItemResult

Row = Sequence[Any]


def load_queries(tokens: dict[str, str]) -> dict[str, str]:
    """queries.sql by name, its {tokens} filled in for a dialect."""
    text = resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    queries = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        sql = "\n".join(line for line in body.splitlines() if not line.startswith("--"))
        for token, value in tokens.items():
            sql = sql.replace("{" + token + "}", value)
        queries[name.strip()] = sql.strip()
    return queries


class Connection(Protocol):
    """Runs the named statements of queries.sql with keyword parameters."""

    async def execute(self, name: str, **params: Any) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def fetch(self, name: str, **params: Any) -> list[Row]:
        """Run a query; its rows."""
        ...

    async def execute_each(self, name: str, params: Sequence[dict[str, Any]]) -> list[int]:
        """Run a statement once per parameter set, in order; the rows each changed."""
        ...

    async def script(self, sql: str) -> None:
        """Run several statements without parameters (the schema, a migration)."""
        ...


class Staging(Connection, Protocol):
    """A connection holding the temporary table
    `staged (pos, stripe_account, account_id, valid, settled)`."""

    async def add(self, rows: list[tuple[str, int, str, str]]) -> None:
        """Stage (value, valid, settled or '', connected account) rows; a (connected account,
        value) seen before keeps its first place."""
        ...

    async def seal(self) -> None:
        """Make `staged` ready for counting and merging (deduplicated, indexed)."""
        ...

    async def spans(self) -> list[tuple[int, int]]:
        """(after, up to) ranges of `pos` to merge one transaction each, in order."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """A write transaction on the staging connection (the merge)."""
        ...


class Dialect(Protocol):
    """What differs between SQLite and PostgreSQL; everything else is `SqlStore`'s."""

    @property
    def description(self) -> str:
        """Where the store is, fit for output (a URL's password masked)."""
        ...

    @property
    def schema(self) -> str:
        """The `schema` statements of queries.sql, for this dialect."""
        ...

    @property
    def migrations(self) -> dict[int, tuple[str, str]]:
        """Layout version -> the SQL to run before and after the schema, to leave it."""
        ...

    @property
    def reader(self) -> Connection:
        """Statements outside a transaction."""
        ...

    @property
    def shared(self) -> bool:
        """Whether processes on several machines can share the store (`run --join`)."""
        ...

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What the driver raises when the database fails (I/O, connection, disk, locks)."""
        ...

    def transient(self, exc: Exception) -> bool:
        """Whether an error of `errors` may pass if the statement is tried again shortly."""
        ...

    def describe(self, exc: Exception) -> str:
        """An error of `errors` in one line, fit for output."""
        ...

    def corrupted(self, exc: Exception) -> bool:
        """Whether an error of `errors` says the stored data is damaged (no rerun helps)."""
        ...

    def transaction(
        self, *, exclusive_for: str | None = None, beat: bool = False
    ) -> AbstractAsyncContextManager[Connection]:
        """A write transaction; with `exclusive_for`, one at a time for that key. A
        heartbeat's (`beat`) must not queue behind other statements of this process."""
        ...

    def staging(self) -> AbstractAsyncContextManager[Staging]:
        """A connection with an empty `staged` table, dropped on leaving."""
        ...

    def plan_turn(self, job: str) -> AbstractAsyncContextManager[None]:
        """Wait until no other worker of the job is planning."""
        ...

    async def claim(self, job: str, run_id: str, limit: int, stripe_account: str) -> list[str]:
        """Mark and return a connected account's next `limit` accounts still to call that
        nobody holds."""
        ...

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one write."""
        ...

    async def scrub(self) -> None:
        """Leave no trace of deleted rows in the database's files, where it can (`forget`)."""
        ...

    async def aclose(self) -> None:
        """Close the connections."""
        ...
