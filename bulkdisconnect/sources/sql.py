"""SQL sources: stream account IDs from a read-only query over SQLite or PostgreSQL.

A retention purge reads "accounts of customers offboarded more than 90 days ago" straight from
the user's database. Queries name parameters `:name` on both databases and values are always
bound, never interpolated. PostgreSQL receives every value as text (`:days` becomes `$1::text`),
so a query casts where it needs another type: `offboarded_at < :cutoff::timestamptz`,
`now() - :days::int * interval '1 day'`. No source can write: SQLite is opened read-only and
PostgreSQL is read in a READ ONLY transaction through a server-side cursor, a chunk at a time.
"""

from __future__ import annotations

import abc
import contextlib
import re
import sqlite3
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from bulkdisconnect.errors import InputError, UsageError
from bulkdisconnect.logs import mask_url
from bulkdisconnect.model import Owned
from bulkdisconnect.postgresql import CONNECT_TIMEOUT, describe_error
from bulkdisconnect.sources import choose_account_column, choose_column

SCHEMES = ("sqlite", "postgresql", "postgres")
CLOSE_TIMEOUT = 5.0
_SQLITE_ERRORS = (sqlite3.Error, sqlite3.Warning)  # 3.11 raises Warning for two statements
_TYPE_ERRORS = frozenset({"42883", "42804"})  # undefined_function, datatype_mismatch
_NAME = r"[^\W\d]\w*"
# Searched left to right: text skipped whole (literals, quoted identifiers, comments, casts), a
# block comment's start (PostgreSQL nests them), a :name placeholder (not right after an
# identifier, so `arr[lo:hi]` stays a slice), another placeholder style, an unclosed quote.
_DIALECTS = {
    "postgresql": re.compile(
        rf"""(?P<skip>(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|::
                |(?<![\w$])(?P<tag>\$(?:{_NAME})?\$).*?(?P=tag))
            |(?P<comment>/\*)|(?<![\w$]):(?P<name>{_NAME})|(?<![\w$])(?P<other>\$\d+)
            |(?P<open>['"]|(?<![\w$])\$(?:{_NAME})?\$)""",
        re.VERBOSE | re.DOTALL,
    ),
    "sqlite": re.compile(
        rf"""(?P<skip>'(?:[^']|'')*'|"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\]|--[^\n]*)
            |(?P<comment>/\*)|(?<![\w$]):(?P<name>{_NAME})|(?<![\w$])(?P<other>\?\d*|[@$]{_NAME})
            |(?P<open>['"`\[])""",
        re.VERBOSE,
    ),
}
_COMMENT_MARK = re.compile(r"/\*|\*/")


def open_sql_source(
    url: str,
    query: str,
    params: Mapping[str, str],
    column: str | None = None,
    account_column: str | None = None,
) -> SqlSource:
    """A source over `query` on the database at `url`; checks all it can without connecting.

    A result column named `account_column` (default: stripe_account, when there is one)
    holds each row's connected account.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        named = f"scheme {scheme}://" if sep and re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) else ""
        raise UsageError(
            f"unsupported database URL {named or '(no scheme)'}; supported:"
            " sqlite:///PATH.db, postgresql://USER@HOST/DB, postgres://USER@HOST/DB"
        )
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise UsageError(
                f"{url}: a SQLite URL names a file: sqlite:///relative.db or sqlite:////abs.db"
            )
        names = tuple(dict.fromkeys(name for *_, name in _placeholders(query, "sqlite")))
        _check_params(names, params)
        source: SqlSource = SqliteSource(url, query, dict(params), column, path=rest[1:])
    else:
        translated, names = translate_placeholders(query)
        _check_params(names, params)
        args = tuple(params[n] for n in names)
        source = PostgresSource(mask_url(url), translated, args, column, url)
    source.account_column = account_column
    return source


def translate_placeholders(query: str) -> tuple[str, tuple[str, ...]]:
    """`query` with each `:name` as `$n::text` (one n per name), and the names in `$n` order."""
    numbers: dict[str, int] = {}
    pieces: list[str] = []
    last = 0
    for start, end, name in _placeholders(query, "postgresql"):
        pieces += (query[last:start], f"${numbers.setdefault(name, len(numbers) + 1)}::text")
        last = end
    pieces.append(query[last:])
    return "".join(pieces), tuple(numbers)


class SqlSource(abc.ABC):
    """Trimmed account IDs from one column of a query's result, never holding the whole result."""

    def __init__(self, description: str, query: str, column: str | None) -> None:
        self.description = description
        self.query = query
        self.column = column
        self.account_column: str | None = None

    @abc.abstractmethod
    async def check(self) -> None:
        """Connect and prepare the query without fetching a row; UsageError if either fails."""

    @abc.abstractmethod
    def _values(self, size: int) -> AsyncGenerator[list[tuple[object, object]], None]:
        """Chunks of up to `size` raw (account ID, connected account) cells of the chosen
        columns; the second is None where the result has no connected account column."""

    async def chunks(self, size: int = 1000) -> AsyncGenerator[list[str | Owned], None]:
        """Yield lists of up to `size` IDs; the connection is closed however iteration ends."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        row = 0
        async with contextlib.aclosing(self._values(size)) as chunks:
            async for values in chunks:
                yield [self._row(cells, row + i) for i, cells in enumerate(values, 1)]
                row += len(values)

    def _row(self, cells: tuple[object, object], row: int) -> str | Owned:
        value, owner = cells
        account_id = self._text(value, row, "account ID")
        if owner is None:
            return account_id
        return Owned(account_id, self._text(owner, row, "connected account"))

    def _text(self, value: object, row: int, what: str) -> str:
        if isinstance(value, str):
            return value.strip()  # empty: recorded invalid_id, as in every source
        if value is None:
            return ""  # NULL: missing, like an empty one
        shown = repr(value)[:40] + ("..." if len(repr(value)) > 40 else "")
        raise InputError(
            f"{self.description} row {row}: {what} is {type(value).__name__} {shown},"
            " not text; select a text column (or cast it to text)"
        )

    def _column_index(self, names: Sequence[str]) -> tuple[int, int | None]:
        """The indexes of the account ID column and the connected account's (if any)."""
        if not names:
            raise UsageError(f"query on {self.description} returns no columns; select the IDs")
        where = f"query on {self.description}"
        owner = choose_account_column(names, self.account_column, where=where)
        return choose_column(names, self.column, where=where, besides=owner), owner

    @contextlib.contextmanager
    def _errors(self, kinds: tuple[type[Exception], ...]) -> Iterator[None]:
        """Turn a database's errors into one-line UsageErrors (a server never echoes passwords)."""
        try:
            yield
        except kinds as exc:
            reason = getattr(exc, "message", None) or str(exc)  # a server error without its HINT
            # `$1::text` is there only when the query has parameters (see translate_placeholders).
            if getattr(exc, "sqlstate", None) in _TYPE_ERRORS and "$1::text" in self.query:
                reason += " (parameters are passed as text: cast them, e.g. :cutoff::date)"
            raise UsageError(
                f"query failed on {self.description}: {' '.join(reason.split())[:300]}"
            ) from None


class SqliteSource(SqlSource):
    """A query over a SQLite file opened read-only, each chunk fetched in a worker thread."""

    def __init__(
        self, url: str, query: str, params: dict[str, str], column: str | None, *, path: str
    ) -> None:
        super().__init__(url, query, column)
        self.params = params
        self.path = Path(path)

    async def check(self) -> None:
        """Connect, EXPLAIN the query and resolve its column without reading a row."""
        async with self._cursor() as cursor:
            await anyio.to_thread.run_sync(self._execute, cursor, "EXPLAIN ")
            names = await anyio.to_thread.run_sync(self._column_names, cursor)
        if names is not None:
            self._column_index(names)

    def _column_names(self, cursor: sqlite3.Cursor) -> list[str] | None:
        """The query's column names, from a LIMIT 0 wrapper (SQLite reads no row for it);
        None if the query cannot be wrapped (a trailing `;`): resolved when read instead."""
        try:
            cursor.execute(f"SELECT * FROM (\n{self.query}\n) LIMIT 0", self.params)  # noqa: S608 - the user's own query, read-only
        except _SQLITE_ERRORS:
            return None
        return [column[0] for column in cursor.description or ()]

    async def _values(self, size: int) -> AsyncGenerator[list[tuple[object, object]], None]:
        async with self._cursor() as cursor:
            await anyio.to_thread.run_sync(self._execute, cursor, "")
            columns = self._column_index([column[0] for column in cursor.description or ()])
            while values := await anyio.to_thread.run_sync(self._fetch, cursor, size, columns):
                yield values

    @contextlib.asynccontextmanager
    async def _cursor(self) -> AsyncIterator[sqlite3.Cursor]:
        # Shielded so a cancellation cannot land between the open and the `with` that closes.
        with anyio.CancelScope(shield=True):
            conn = await anyio.to_thread.run_sync(self._connect)
        # The cursor closes first: a statement it still held would keep the file open (a
        # traceback can keep the cursor alive) even after conn.close().
        with contextlib.closing(conn), contextlib.closing(conn.cursor()) as cursor:
            yield cursor

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise UsageError(f"SQLite database not found: {self.path} (from {self.description})")
        # mode=ro: a purge can never write to the user's database; query_only covers ATTACH too.
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
        with self._errors(_SQLITE_ERRORS):
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
        return conn

    def _execute(self, cursor: sqlite3.Cursor, prefix: str) -> None:
        with self._errors(_SQLITE_ERRORS):
            cursor.execute(prefix + self.query, self.params)

    def _fetch(
        self, cursor: sqlite3.Cursor, size: int, columns: tuple[int, int | None]
    ) -> list[tuple[object, object]]:
        index, owner = columns
        with self._errors(_SQLITE_ERRORS):
            rows = cursor.fetchmany(size)
        return [(row[index], None if owner is None else row[owner]) for row in rows]


class PostgresSource(SqlSource):
    """A query over PostgreSQL (asyncpg), read in a READ ONLY transaction by a server cursor."""

    def __init__(
        self, description: str, query: str, args: tuple[str, ...], column: str | None, url: str
    ) -> None:
        import asyncpg

        super().__init__(description, query, column)
        self.asyncpg: Any = asyncpg
        self.args = args
        self.url = url
        self.kinds = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

    async def check(self) -> None:
        """Connect and PREPARE the query, resolving the column; no row is fetched."""
        async with self._connection() as conn:
            await self._prepare(conn)

    async def _values(self, size: int) -> AsyncGenerator[list[tuple[object, object]], None]:
        async with self._connection() as conn:
            statement, (index, owner) = await self._prepare(conn)
            with self._errors(self.kinds):
                # Never committed: closing the connection ends the transaction.
                await conn.transaction(readonly=True).start()
                cursor = await statement.cursor(*self.args)
            while True:
                with self._errors(self.kinds):
                    rows = await cursor.fetch(size)
                if not rows:
                    return
                yield [(row[index], None if owner is None else row[owner]) for row in rows]

    async def _prepare(self, conn: Any) -> tuple[Any, tuple[int, int | None]]:
        with self._errors(self.kinds):
            statement = await conn.prepare(self.query)
        return statement, self._column_index([a.name for a in statement.get_attributes()])

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pg = self.asyncpg
        try:
            conn = await pg.connect(
                self.url,
                timeout=CONNECT_TIMEOUT,
                server_settings={"application_name": "bulkdisconnect"},
            )
        except (pg.PostgresError, pg.InterfaceError, ValueError, OSError) as exc:
            raise UsageError(
                f"cannot connect to {self.description}: {describe_error(exc)}"
            ) from None
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError, pg.InterfaceError):
                await conn.close(timeout=CLOSE_TIMEOUT)


def _placeholders(query: str, dialect: str) -> Iterator[tuple[int, int, str]]:
    """The (start, end, name) of each `:name` outside literals, quoted names and comments."""
    pattern = _DIALECTS[dialect]
    pos = 0
    while match := pattern.search(query, pos):
        pos = match.end()
        if match["name"]:
            yield match.start(), pos, match["name"]
        elif match["comment"]:
            pos = _comment_end(query, match.start(), nested=dialect == "postgresql")
        elif match["other"]:
            raise UsageError(
                f"query uses the placeholder {match['other']}; write :name and give --param name=V"
            )
        elif match["open"]:
            where = f"at character {match.start() + 1}"
            raise UsageError(f"query has an unclosed {match['open']} {where}")


def _comment_end(query: str, start: int, *, nested: bool) -> int:
    """Where the block comment opened at `start` ends."""
    depth = 0
    for mark in _COMMENT_MARK.finditer(query, start):
        depth += 1 if mark.group() == "/*" else -1
        if depth == 0 or (not nested and mark.group() == "*/"):
            return mark.end()
    if not nested:
        return len(query)  # SQLite lets an unclosed comment run to the end
    raise UsageError(f"query has an unterminated comment at character {start + 1}")


def _check_params(names: Sequence[str], params: Mapping[str, str]) -> None:
    for name in names:
        if name not in params:
            raise UsageError(f"query parameter :{name} has no value; give --param {name}=VALUE")
    if unused := [name for name in params if name not in names]:
        used = ", ".join(f":{name}" for name in names) or "none"
        raise UsageError(
            f"--param {unused[0]} is not used by the query (its placeholders: {used});"
            " check the spelling"
        )
