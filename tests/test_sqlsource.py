"""SQL sources: real PostgreSQL and SQLite, bound parameters, read-only access, flat memory."""

# S608: queries here name uuid-generated test tables; every value in them is bound.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import sqlite3
import tracemalloc
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import cast

import anyio
import anyio.lowlevel
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdisconnect.errors import InputError, UsageError
from bulkdisconnect.model import Owned
from bulkdisconnect.sources.sql import (
    SqlSource,
    open_sql_source,
    translate_placeholders,
)

# Only parsed, never connected to.
SOME_PG = "postgresql://postgres@db.internal:5432/app"
# (id, account_id, offboarded_at): the query below keeps rows offboarded before 2024-03-01.
ROWS = [
    (1, "fca_1", "2024-01-05"),
    (2, "  fca_2AbC ", "2024-02-10"),
    (3, "fca_late", "2024-06-01"),
    (4, "fca_4", "2023-12-31"),
]
WANTED = ["fca_1", "fca_2AbC", "fca_4"]
QUERY = "SELECT account_id FROM {t} WHERE offboarded_at < :cutoff ORDER BY id"
CUTOFF = {"cutoff": "2024-03-01"}
HOSTILE = "x'; DROP TABLE {t}; --"
N_BIG = 200_000


async def pg(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Run one statement on the test database with a connection of its own."""
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
async def table(pg_url: str) -> AsyncIterator[str]:
    """A uniquely named PostgreSQL table holding ROWS, dropped after the test."""
    name = f"bd_test_{uuid.uuid4().hex}"
    await pg(
        pg_url, f"CREATE TABLE {name} (id int PRIMARY KEY, account_id text, offboarded_at text)"
    )
    await pg(
        pg_url,
        f"INSERT INTO {name} SELECT * FROM unnest($1::int[], $2::text[], $3::text[])",
        *zip(*ROWS, strict=True),
    )
    yield name
    await pg(pg_url, f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> tuple[str, str]:
    """A SQLite file with a table `t` holding ROWS: its URL and the table name."""
    path = tmp_path / "crm.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, account_id TEXT, offboarded_at TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", ROWS)
    return f"sqlite:///{path}", "t"


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Each database in turn, holding ROWS: its URL and the table name."""
    if request.param == "sqlite":
        result: tuple[str, str] = request.getfixturevalue("sqlite_db")
        return result
    return request.getfixturevalue("pg_url"), request.getfixturevalue("table")


async def read_all(source: SqlSource, size: int = 1000) -> list[str | Owned]:
    """All values of `source`, checking that no chunk is empty or larger than `size`."""
    values: list[str | Owned] = []
    async for chunk in source.chunks(size):
        assert 0 < len(chunk) <= size
        values.extend(chunk)
    return values


async def read(
    url: str, query: str, params: dict[str, str] | None = None, **kw: str
) -> list[str | Owned]:
    """Open and read a SQL source in one go."""
    return await read_all(open_sql_source(url, query, params or {}, **kw))


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1, 2, 1000])
async def test_both_databases_yield_the_same_ids_in_order(db: tuple[str, str], size: int) -> None:
    """A bound :cutoff selects the same trimmed IDs in query order on SQLite and PostgreSQL."""
    url, t = db
    source = open_sql_source(url, QUERY.format(t=t), CUTOFF)
    await source.check()
    assert await read_all(source, size) == WANTED


@pytest.mark.anyio
async def test_a_relative_sqlite_path_is_read_from_the_working_directory(
    sqlite_db: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///crm.db` names crm.db in the working directory (four slashes: absolute)."""
    absolute, t = sqlite_db
    assert absolute.startswith("sqlite:////")
    monkeypatch.chdir(Path(absolute.removeprefix("sqlite:///")).parent)
    assert await read("sqlite:///crm.db", QUERY.format(t=t), CUTOFF) == WANTED


@pytest.mark.anyio
async def test_a_named_column_is_read_among_several(db: tuple[str, str]) -> None:
    """`column` picks the named column of a wide result; a missing one lists the columns."""
    url, t = db
    query = f"SELECT id, offboarded_at AS note, account_id FROM {t} ORDER BY id"
    assert await read(url, query, column="account_id") == [v.strip() for _, v, _ in ROWS]
    with pytest.raises(UsageError, match=r"no column 'acct' \(columns: id, note, account_id\)"):
        await read(url, query, column="acct")


@pytest.mark.anyio
async def test_a_hostile_value_is_bound_not_interpolated(db: tuple[str, str]) -> None:
    """A value that would be SQL if pasted in is compared as a string: no rows, table intact."""
    url, t = db
    query = f"SELECT account_id FROM {t} WHERE account_id = :id OR offboarded_at = :id"
    assert await read(url, query, {"id": HOSTILE.format(t=t)}) == []
    assert await read(url, f"SELECT account_id FROM {t} ORDER BY id") == [
        v.strip() for _, v, _ in ROWS
    ]


@pytest.mark.anyio
async def test_a_query_cannot_write(db: tuple[str, str]) -> None:
    """SQLite is opened read-only and PostgreSQL read in a READ ONLY transaction."""
    url, t = db
    query = f"INSERT INTO {t} (id, account_id) VALUES (99, 'fca_new') RETURNING account_id"
    with pytest.raises(UsageError, match=r"readonly|read-only"):
        await read(url, query)
    assert "fca_new" not in await read(url, f"SELECT account_id FROM {t}")


@pytest.mark.anyio
async def test_null_and_empty_values_are_read_as_empty_ids(db: tuple[str, str]) -> None:
    """A NULL or blank ID is read as an empty value (recorded invalid_id), not a stop."""
    url, _ = db
    rows = (
        "SELECT 'fca_1' AS account_id, 1 AS n UNION ALL SELECT NULL, 2 "
        "UNION ALL SELECT '  ', 3 UNION ALL SELECT 'fca_4', 4"
    )
    query = f"SELECT account_id, n FROM ({rows}) AS r ORDER BY n"
    assert await read(url, query) == ["fca_1", "", "", "fca_4"]


@pytest.mark.anyio
async def test_non_text_values_are_input_errors(db: tuple[str, str]) -> None:
    """A number where an ID belongs stops the read naming the row."""
    url, _ = db
    query = "SELECT 1 AS n"
    with pytest.raises(InputError, match=r"row 1: account ID is int 1, not text"):
        await read(url, query)


@pytest.mark.anyio
async def test_the_account_id_column_is_read_wherever_it_stands(db: tuple[str, str]) -> None:
    """Without --column the column named account_id is read, not the first one."""
    url, t = db
    query = f"SELECT 'fca_other' || id AS customer, account_id FROM {t} ORDER BY id"
    assert await read(url, query) == [r[1].strip() for r in ROWS]


@pytest.mark.anyio
async def test_a_single_column_is_read_whatever_its_name(db: tuple[str, str]) -> None:
    """A query returning one column needs no --column."""
    url, t = db
    assert await read(url, f"SELECT account_id AS acct FROM {t} ORDER BY id") == [
        r[1].strip() for r in ROWS
    ]


@pytest.mark.anyio
async def test_several_columns_without_account_id_ask_for_column(db: tuple[str, str]) -> None:
    """Several columns, none named account_id: exit 2 listing them and asking for --column."""
    url, t = db
    query = f"SELECT account_id AS old_account_id, account_id AS new_id FROM {t}"
    with pytest.raises(UsageError, match=r"\(columns: old_account_id, new_id\).*--column NAME"):
        await read(url, query)


@pytest.mark.anyio
async def test_a_column_differing_in_case_gets_a_hint(db: tuple[str, str]) -> None:
    """A query column named Account_ID is pointed at, not guessed."""
    url, t = db
    query = f'SELECT account_id AS "Account_ID", id FROM {t}'
    with pytest.raises(UsageError, match="did you mean --column 'Account_ID'"):
        await read(url, query)


@pytest.mark.anyio
async def test_casts_give_parameters_a_type_on_postgresql(table: str, pg_url: str) -> None:
    """Parameters reach PostgreSQL as text: a cast types them, and a missing cast is explained."""
    query = f"SELECT account_id FROM {table} WHERE offboarded_at::date < :cutoff::date ORDER BY id"
    assert await read(pg_url, query, CUTOFF) == WANTED
    limited = f"SELECT account_id FROM {table} ORDER BY id LIMIT :n::int"
    assert await read(pg_url, limited, {"n": "2"}) == WANTED[:2]
    uncast = f"SELECT account_id FROM {table} WHERE offboarded_at::date < :cutoff"
    with pytest.raises(UsageError, match=r"date < text .*cast them, e\.g\. :cutoff::date"):
        await read(pg_url, uncast, CUTOFF)


@pytest.mark.parametrize("scheme", ["sqlite:///nowhere.db", SOME_PG])
def test_missing_and_unused_parameters_are_usage_errors(scheme: str) -> None:
    """Every placeholder needs a value and every given value a placeholder, before connecting."""
    with pytest.raises(UsageError, match=r"^query parameter :cutoff has no value; give --param"):
        open_sql_source(scheme, "SELECT a FROM t WHERE b < :cutoff", {})
    with pytest.raises(UsageError, match=r"^--param cutof is not used .*placeholders: :cutoff\)"):
        open_sql_source(scheme, "SELECT a FROM t WHERE b < :cutoff", {"cutoff": "1", "cutof": "2"})
    with pytest.raises(UsageError, match=r"--param days is not used .*placeholders: none\)"):
        open_sql_source(scheme, "SELECT a FROM t WHERE b = ':days'", {"days": "1"})


@pytest.mark.parametrize(
    ("url", "query"),
    [
        ("sqlite:///x.db", "SELECT a FROM t WHERE b = ?"),
        ("sqlite:///x.db", "SELECT a FROM t WHERE b = @b"),
        ("sqlite:///x.db", "SELECT a FROM t WHERE b = $b"),
        (SOME_PG, "SELECT a FROM t WHERE b = $1"),
    ],
)
def test_other_placeholder_styles_are_refused(url: str, query: str) -> None:
    """Only :name placeholders are bound, so `?`, `@b`, `$b` and `$1` are refused up front."""
    with pytest.raises(UsageError, match=r"uses the placeholder .*write :name"):
        open_sql_source(url, query, {})


def test_sqlite_quoting_hides_colons() -> None:
    """SQLite's bracket and backtick identifiers and its literals hold colons, not placeholders."""
    query = "SELECT \"a:b\", [c:d], `e:f`, 'g:h' /* :i */ FROM t -- :j\nWHERE x = :k"
    assert open_sql_source("sqlite:///x.db", query, {"k": "1"}).description == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("query", "expected", "names"),
    [
        ("SELECT :a, :b, :a", "SELECT $1::text, $2::text, $1::text", ("a", "b")),
        ("SELECT 'it''s :x', :y", "SELECT 'it''s :x', $1::text", ("y",)),
        ("SELECT E'it\\'s :x', :y", "SELECT E'it\\'s :x', $1::text", ("y",)),
        ('SELECT "a:b", "q""uo:te" FROM t', 'SELECT "a:b", "q""uo:te" FROM t', ()),
        ("SELECT :days::int, x::text", "SELECT $1::text::int, x::text", ("days",)),
        ("SELECT 1 -- :x\n, :y", "SELECT 1 -- :x\n, $1::text", ("y",)),
        ("SELECT /* :x /* :y */ :z */ :w", "SELECT /* :x /* :y */ :z */ $1::text", ("w",)),
        ("SELECT $$ :x $$, $f$ :x $$ $f$, :y", "SELECT $$ :x $$, $f$ :x $$ $f$, $1::text", ("y",)),
        ("SELECT arr[lo:hi], a$b:c, x:=1", "SELECT arr[lo:hi], a$b:c, x:=1", ()),
        ("SELECT '$1', :é", "SELECT '$1', $1::text", ("é",)),
    ],
)
def test_placeholders_are_translated_outside_literals(
    query: str, expected: str, names: tuple[str, ...]
) -> None:
    """Only live :name placeholders become $n, and a repeated name keeps its number."""
    assert translate_placeholders(query) == (expected, names)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT 'x", r"unclosed ' at character 8"),
        ('SELECT "x', r'unclosed " at character 8'),
        ("SELECT $q$ x", r"unclosed \$q\$ at character 8"),
        ("SELECT /* /* */ x", r"unterminated comment at character 8"),
    ],
)
def test_unclosed_literals_are_usage_errors(query: str, message: str) -> None:
    """An unclosed literal or comment is reported where it starts, before any connection."""
    with pytest.raises(UsageError, match=message):
        translate_placeholders(query)


INNER = st.text(alphabet=":ab1 $'\"-*/\n\\é", max_size=12)
NAMES = st.sampled_from(["a", "b", "cutoff", "x1", "é"])
SKIPPED = st.one_of(
    INNER.map(lambda s: "'" + s.replace("'", "''") + "'"),
    INNER.map(lambda s: '"' + s.replace('"', '""') + '"'),
    INNER.map(lambda s: "-- " + s.replace("\n", " ") + "\n"),
    INNER.map(lambda s: "/* " + s.replace("*", "") + " */"),
    INNER.map(lambda s: "$$" + s.replace("$", "") + "$$"),
    INNER.map(lambda s: "$q$" + s.replace("$", "") + "$q$"),
    st.sampled_from(["SELECT", "x", "=", "(", ")", ",", "1", "::int", "a[1:2]", "a$b", "x:y"]),
)


@given(st.lists(st.one_of(NAMES.map(lambda n: (n,)), SKIPPED), max_size=12))
def test_translation_keeps_every_other_character(parts: list[tuple[str] | str]) -> None:
    """Translating changes exactly the live placeholders; every other character stays."""
    numbers: dict[str, int] = {}
    expected = " ".join(
        f"${numbers.setdefault(p[0], len(numbers) + 1)}::text" if isinstance(p, tuple) else p
        for p in parts
    )
    query = " ".join(f":{p[0]}" if isinstance(p, tuple) else p for p in parts)
    assert translate_placeholders(query) == (expected, tuple(numbers))


@given(st.text())
def test_translation_of_any_text_is_an_identity_or_a_usage_error(query: str) -> None:
    """Any text translates without crashing; without a colon it comes back unchanged."""
    try:
        translated, names = translate_placeholders(query)
    except UsageError:
        return
    assert len(names) <= query.count(":")
    if ":" not in query:
        assert translated == query


@pytest.mark.parametrize("url", ["mysql://u:s3cret@h/db", "u:s3cret@h/db", "sqlite://h/x.db"])
def test_unsupported_urls_are_usage_errors(url: str) -> None:
    """An unsupported scheme is named with the supported ones, and no password is echoed."""
    with pytest.raises(UsageError, match=r"sqlite:///") as error:
        open_sql_source(url, "SELECT 1", {})
    assert "s3cret" not in str(error.value)
    if url.startswith("mysql"):
        assert "scheme mysql://" in str(error.value)


async def one_line_errors(source: SqlSource, message: str) -> None:
    """check() and the first read each fail with one UsageError line matching `message`."""
    for attempt in (source.check, lambda: read_all(source)):
        with pytest.raises(UsageError, match=message) as error:
            await attempt()
        assert "\n" not in str(error.value)
        assert "s3cret" not in str(error.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "query", "message"),
    [
        (
            "postgresql://{user}:s3cret@{host}:{port}/{db}",
            "SELEC 1",
            r'^query failed on postgresql://.*:\*\*\*@.*: syntax error at or near "SELEC"$',
        ),
        (
            "postgresql://{user}:s3cret@{host}:{port}/{db}",
            "SELECT a FROM nope",
            r'^query failed on .*: relation "nope" does not exist$',
        ),
        (
            "postgresql://{user}:s3cret@{host}:{port}/{db}",
            "SELECT 1; SELECT 2",
            r"^query failed on .*multiple commands",
        ),
        (
            "postgresql://nobody:s3cret@{host}:{port}/{db}",
            "SELECT 1",
            r'^cannot connect to postgresql://nobody:\*\*\*@.*: role "nobody" does not exist$',
        ),
        (
            "postgresql://{user}:s3cret@127.0.0.1:1/{db}",
            "SELECT 1",
            r"^cannot connect to .*:1/.*: .*Connect call failed",
        ),
        (
            "postgresql://{user}:s3cret@{host}:{port}/nodb",
            "SELECT 1",
            r'database "nodb" does not exist',
        ),
        ("postgresql://{user}:s3cret@{host}:port/{db}", "SELECT 1", r"malformed URL"),
    ],
)
async def test_postgresql_errors_are_one_line_usage_errors(
    pg_url: str, url: str, query: str, message: str
) -> None:
    """A bad query, login or server fails check() and the first read with one line."""
    parts = urllib.parse.urlsplit(pg_url)
    server = {
        "user": parts.username,
        "host": parts.hostname,
        "port": parts.port,
        "db": parts.path.lstrip("/"),
    }
    await one_line_errors(open_sql_source(url.format(**server), query, {}), message)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "query", "message"),
    [
        ("sqlite:///missing.db", "SELECT 1", r"^SQLite database not found: missing\.db"),
        (
            "sqlite:///{db}",
            "SELEC 1",
            r'^query failed on sqlite:///.*: near "SELEC": syntax error$',
        ),
        ("sqlite:///{db}", "SELECT a FROM nope", r"^query failed on .*: no such table: nope$"),
        ("sqlite:///{db}", "SELECT 1; SELECT 2", r"^query failed on .*one statement at a time"),
    ],
)
async def test_sqlite_errors_are_one_line_usage_errors(
    tmp_path: Path, url: str, query: str, message: str
) -> None:
    """A bad query or file fails check() and the first read with one line."""
    (tmp_path / "empty.db").touch()
    await one_line_errors(open_sql_source(url.format(db=tmp_path / "empty.db"), query, {}), message)


@pytest.mark.anyio
async def test_check_prepares_without_running(tmp_path: Path, pg_url: str) -> None:
    """check() compiles the query only: an error that needs a row appears on the first read."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    cases = {
        pg_url: "SELECT (1 / (g - g))::text FROM generate_series(1, 3) g",
        f"sqlite:///{path}": "SELECT abs(-9223372036854775807 - 1)",
    }
    for url, query in cases.items():
        source = open_sql_source(url, query, {})
        await source.check()
        with pytest.raises(UsageError, match=r"division by zero|integer overflow"):
            await read_all(source)


def open_fds_to(path: Path) -> int:
    """How many of this process's file descriptors point at `path` (Linux only)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            count += fd.readlink() == path
    return count


async def backend_alive(url: str, pid: str) -> bool:
    """Whether the PostgreSQL backend `pid` still runs, waiting up to 2 s for it to exit."""
    with anyio.move_on_after(2):
        # Polling another process's state: there is no event to await (ASYNC110).
        while await pg(url, "SELECT 1 FROM pg_stat_activity WHERE pid = $1", int(pid)):  # noqa: ASYNC110
            await anyio.sleep(0.02)
        return False
    return True


@pytest.mark.anyio
@pytest.mark.parametrize("stop", ["break", "cancel"])
async def test_connections_close_when_reading_stops_early(
    tmp_path: Path, stop: str, pg_url: str
) -> None:
    """Leaving the loop or cancelling it mid-read closes the connection at once."""
    path = tmp_path / "big.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE t (account_id TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", ((f"fca_{i}",) for i in range(5000)))
    sources = [
        open_sql_source(pg_url, "SELECT pg_backend_pid()::text FROM generate_series(1, 5000)", {}),
        open_sql_source(f"sqlite:///{path}", "SELECT account_id FROM t", {}),
    ]
    for source in sources:
        first: list[str | Owned] = []
        with anyio.CancelScope() as scope:
            async with contextlib.aclosing(source.chunks(100)) as chunks:
                async for chunk in chunks:
                    first = chunk
                    if stop == "cancel":
                        scope.cancel()
                        await anyio.lowlevel.checkpoint()
                    break
        assert first
        if source.description == pg_url:
            assert not await backend_alive(pg_url, str(first[0]))
        else:
            assert open_fds_to(path) == 0


async def peak_memory_reading(source: SqlSource) -> tuple[int, str | Owned, int]:
    """Count, last value and peak traced memory (bytes) of reading `source` in chunks of 1000."""
    tracemalloc.start()
    try:
        count, last = 0, cast(str | Owned, "")
        async for chunk in source.chunks(1000):
            count += len(chunk)
            last = chunk[-1]
        return count, last, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def ids(n: int) -> Iterable[tuple[str]]:
    """fca_1 .. fca_n as one-column rows."""
    return ((f"fca_{i}",) for i in range(1, n + 1))


@pytest.mark.anyio
async def test_large_results_stream_with_flat_memory(
    table: str, tmp_path: Path, pg_url: str
) -> None:
    """200,000 rows stream from both databases in chunks, never held all at once (< 5 MB)."""
    # Holding 200,000 IDs would take ~15 MB+ (a 59-byte str each plus its list slot and row).
    await pg(
        pg_url,
        f"CREATE TABLE {table}_big AS SELECT 'fca_' || g AS account_id, g AS id"
        f" FROM generate_series(1, {N_BIG}) g",
    )
    path = tmp_path / "big.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, account_id TEXT)")
        conn.executemany("INSERT INTO t (account_id) VALUES (?)", ids(N_BIG))
    try:
        for url, t in ((pg_url, f"{table}_big"), (f"sqlite:///{path}", "t")):
            source = open_sql_source(url, f"SELECT account_id FROM {t} ORDER BY id", {})
            count, last, peak = await peak_memory_reading(source)
            assert (count, last) == (N_BIG, f"fca_{N_BIG}")
            assert peak < 5_000_000, f"{url}: peak {peak / 1e6:.1f} MB"
    finally:
        await pg(pg_url, f"DROP TABLE IF EXISTS {table}_big")
