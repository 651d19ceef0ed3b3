"""Sources: every format yields the same trimmed values, and every bad input is an InputError."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import AsyncGenerator
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkdisconnect.errors import InputError
from bulkdisconnect.sources import Source
from bulkdisconnect.sources.files import MAX_LINE_BYTES, open_source

IDS = ["fca_1", "fca_2AbC", "fca_3", "fca_1"]  # a duplicate stays: deduping is the store's job


async def read_all(source: Source, size: int = 1000) -> list[str]:
    """All values of `source`, checking that no chunk is empty or larger than `size`."""
    values: list[str] = []
    async for chunk in source.chunks(size):
        assert 0 < len(chunk) <= size
        values.extend(v for v in chunk if isinstance(v, str))
    return values


async def read_path(path: Path, column: str | None = None) -> list[str]:
    """All values of the file at `path`."""
    return await read_all(open_source(str(path), column))


def write(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path`, gzipped when the name ends in .gz."""
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(gzip.compress(raw) if path.name.lower().endswith(".gz") else raw)
    return path


def open_fds_to(path: Path) -> int:
    """How many of this process's file descriptors point at `path` (Linux only)."""
    fd_dir = Path("/proc/self/fd")
    assert fd_dir.is_dir(), "these tests count open files through /proc (Linux)"
    count = 0
    for fd in fd_dir.iterdir():
        try:
            count += fd.readlink() == path
        except OSError:
            continue
    return count


TXT = "\ufefffca_1\n  fca_2AbC  \r\n\n# a comment\n\t\nfca_3\nfca_1"
CSV = "\ufeffaccount_id,name\r\nfca_1,a\n fca_2AbC ,b\n,\nfca_3,c\nfca_1,d\n"
JSONL = (
    "\ufeff" + "\n".join(json.dumps({"account_id": v, "n": i}) for i, v in enumerate(IDS)) + "\n\n"
)
FORMATS = {"txt": TXT, "csv": CSV, "jsonl": JSONL, "ndjson": JSONL}


@pytest.mark.anyio
@pytest.mark.parametrize("gz", ["", ".gz"])
@pytest.mark.parametrize("suffix", list(FORMATS))
async def test_every_format_yields_the_same_values(tmp_path: Path, suffix: str, gz: str) -> None:
    """Each format, plain or gzipped, yields the same trimmed values in input order."""
    path = write(tmp_path / f"ids.{suffix}{gz}", FORMATS[suffix])
    assert await read_path(path) == IDS


@pytest.mark.anyio
async def test_stdin_reads_lines_like_txt() -> None:
    """`-` reads the given binary stream as .txt, and open_source consumes none of it."""
    stdin = io.BytesIO(TXT.encode())
    source = open_source("-", stdin=stdin)
    assert stdin.tell() == 0
    assert source.description == "stdin"
    assert await read_all(source) == IDS


@pytest.mark.anyio
async def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    """An upper-case suffix picks the same format."""
    assert await read_path(write(tmp_path / "IDS.CSV.GZ", CSV)) == IDS


@pytest.mark.anyio
async def test_csv_column_picked_by_flag(tmp_path: Path) -> None:
    """--column picks a cell other than account_id."""
    path = write(tmp_path / "ids.csv", "account_id,other\nx,fca_9\ny,fca_8\n")
    assert await read_path(path, "other") == ["fca_9", "fca_8"]


@pytest.mark.anyio
async def test_csv_single_column_with_header(tmp_path: Path) -> None:
    """A single column with any header name is the ID column, and its header is skipped."""
    assert await read_path(write(tmp_path / "ids.csv", "Accounts\nfca_1\nfca_2\n")) == [
        "fca_1",
        "fca_2",
    ]


@pytest.mark.anyio
async def test_csv_single_column_without_header(tmp_path: Path) -> None:
    """A single column whose first cell looks like an account ID has no header row."""
    path = write(tmp_path / "ids.csv", "\n fca_1 \nfca_2\n")
    assert await read_path(path) == ["fca_1", "fca_2"]


def test_csv_ambiguous_columns_ask_for_column(tmp_path: Path) -> None:
    """Several columns, none named account_id, is an error pointing at --column."""
    path = write(tmp_path / "ids.csv", "id,name\nfca_1,a\n")
    with pytest.raises(InputError, match=r"--column") as info:
        open_source(str(path))
    assert "id, name" in str(info.value)


def test_csv_column_differing_in_case_gets_a_hint(tmp_path: Path) -> None:
    """A header that differs from account_id (or --column) only in case is pointed at."""
    path = write(tmp_path / "ids.csv", "Account_ID,name\nfca_1,a\n")
    with pytest.raises(InputError, match="did you mean --column 'Account_ID'"):
        open_source(str(path))
    with pytest.raises(InputError, match="did you mean --column 'name'"):
        open_source(str(path), "Name")


@pytest.mark.anyio
async def test_empty_ids_are_read_as_empty_values(tmp_path: Path) -> None:
    """An empty ID cell or field (or JSON null) is read as an empty value, recorded invalid_id
    like any malformed ID; rows with every cell blank are skipped."""
    csv_path = write(tmp_path / "ids.csv", "account_id,n\nfca_1,1\n,2\n , \nfca_3,3\n")
    assert await read_path(csv_path) == ["fca_1", "", "fca_3"]
    lines = ['{"account_id": "fca_1"}', '{"account_id": " "}', '{"account_id": null}']
    jsonl_path = write(tmp_path / "ids.jsonl", "\n".join(lines) + "\n")
    assert await read_path(jsonl_path) == ["fca_1", "", ""]


def test_csv_missing_column_is_named(tmp_path: Path) -> None:
    """A --column not in the header names itself and the columns there are."""
    path = write(tmp_path / "ids.csv", "account_id,name\nfca_1,a\n")
    with pytest.raises(InputError) as info:
        open_source(str(path), "acct")
    assert str(info.value) == f"{path}: no column 'acct' (columns: account_id, name)"


@pytest.mark.anyio
async def test_empty_csv_yields_nothing(tmp_path: Path) -> None:
    """An empty CSV is an empty input, not an error."""
    assert await read_path(write(tmp_path / "ids.csv", "")) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n,account_id\n1,fca_1\n2\n", "line 3: 1 cell(s), but 'account_id' is cell 2"),
        ('account_id\nfca_1\n"fca_2\n', "line 3: bad CSV"),
    ],
)
async def test_csv_malformed_rows_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    """An empty ID cell, a short row or broken quoting is an InputError naming the line."""
    path = write(tmp_path / "ids.csv", text)
    with pytest.raises(InputError, match=re.escape(message)):
        await read_path(path)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"account_id": ', r"line 3: not valid JSON \(Expecting value\): '\{\"account_id\":'$"),
        ('["fca_1"]', "line 3: expected a JSON object, got an array"),
        ('{"id": "fca_1"}', "line 3: no 'account_id' field"),
        ('{"account_id": 12}', "line 3: 'account_id' is a number, expected a string"),
        ('{"Account_ID": "fca_1"}', "no 'account_id' field; did you mean --column 'Account_ID'"),
    ],
)
async def test_jsonl_malformed_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    """Bad JSON, a non-object, a missing or non-string field is an InputError naming the line."""
    path = write(tmp_path / "ids.jsonl", f'{{"account_id": "fca_1"}}\n\n{line}\n')
    with pytest.raises(InputError, match=message):
        await read_path(path)


@pytest.mark.anyio
async def test_jsonl_column_names_the_field(tmp_path: Path) -> None:
    """For JSONL, --column names the field to read."""
    path = write(tmp_path / "ids.jsonl", '{"acct": "fca_1"}\n')
    assert await read_path(path, "acct") == ["fca_1"]


@pytest.mark.anyio
async def test_long_bad_line_is_clipped_in_the_message(tmp_path: Path) -> None:
    """A huge malformed line appears in the message only as a short excerpt."""
    path = write(tmp_path / "ids.jsonl", "x" * 100_000 + "\n")
    with pytest.raises(InputError) as info:
        await read_path(path)
    message = str(info.value).removeprefix(str(path))
    assert len(message) < 150
    assert "x" * 81 not in message


@pytest.mark.anyio
async def test_overlong_line_is_an_error(tmp_path: Path) -> None:
    """A line longer than MAX_LINE_BYTES is refused, so one line cannot exhaust memory."""
    path = write(tmp_path / "ids.txt", "fca_1\n" + "x" * (MAX_LINE_BYTES + 1) + "\n")
    with pytest.raises(InputError, match="line 2: longer than"):
        await read_path(path)


@pytest.mark.parametrize("path", ["-", "ids.txt", "ids.txt.gz"])
def test_column_with_txt_or_stdin_is_an_error(tmp_path: Path, path: str) -> None:
    """--column means nothing for one-ID-a-line input, so it is refused."""
    if path != "-":
        path = str(write(tmp_path / path, "fca_1\n"))
    with pytest.raises(InputError, match="--column"):
        open_source(path, "account_id", stdin=io.BytesIO())


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is named in the error."""
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError, match=f"^input file not found: {path}$"):
        open_source(str(path))


@pytest.mark.parametrize("name", ["ids.csv", "exports"])
def test_directory(tmp_path: Path, name: str) -> None:
    """A directory is said to be one, whatever its name looks like."""
    (tmp_path / name).mkdir()
    with pytest.raises(
        InputError, match=f"^{tmp_path / name}: is a directory; give an input file$"
    ):
        open_source(str(tmp_path / name))


@pytest.mark.parametrize("name", ["ids.xlsx", "ids", "ids.gz", "ids.json"])
def test_unknown_suffix_lists_supported_ones(tmp_path: Path, name: str) -> None:
    """An unknown suffix is refused with the path and the supported suffixes."""
    path = write(tmp_path / name, "fca_1\n")
    with pytest.raises(InputError, match=r"\.txt, \.csv, \.jsonl, \.ndjson") as info:
        open_source(str(path))
    assert str(path) in str(info.value)


def test_not_gzip_is_refused_up_front(tmp_path: Path) -> None:
    """A .gz file that is not gzip fails in open_source, before any value is read."""
    path = tmp_path / "ids.txt.gz"
    path.write_bytes(b"fca_1\n")
    with pytest.raises(InputError, match=f"^{path}: not a valid gzip file$"):
        open_source(str(path))


@pytest.mark.anyio
async def test_truncated_gzip(tmp_path: Path) -> None:
    """A gzip stream cut short is an InputError, not an EOFError."""
    data = gzip.compress(b"".join(b"fca_%d\n" % i for i in range(10_000)))
    path = tmp_path / "ids.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a valid gzip file"):
        await read_path(path)


@pytest.mark.anyio
@pytest.mark.parametrize("suffix", ["txt", "csv", "jsonl"])
async def test_bad_utf8_names_the_line(tmp_path: Path, suffix: str) -> None:
    """Bytes that are not UTF-8 are an InputError naming the line."""
    first = {"txt": b"fca_1\n", "csv": b"account_id\nfca_1\n", "jsonl": b'{"account_id": "a"}\n'}
    path = tmp_path / f"ids.{suffix}"
    path.write_bytes(first[suffix] + b"fca_\xff\n")
    line = first[suffix].count(b"\n") + 1
    with pytest.raises(InputError, match=f"line {line}: not valid UTF-8"):
        await read_path(path)


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1, 2, 3, 1000])
async def test_chunks_are_full_except_the_last(tmp_path: Path, size: int) -> None:
    """Chunks hold `size` values each, the last one fewer, and none is empty."""
    path = write(tmp_path / "ids.txt", "".join(f"fca_{i}\n# c\n\n" for i in range(7)))
    sizes = [len(chunk) async for chunk in open_source(str(path)).chunks(size)]
    assert sizes == [size] * (7 // size) + ([7 % size] if 7 % size else [])


@pytest.mark.anyio
async def test_chunk_size_must_be_positive(tmp_path: Path) -> None:
    """A chunk size below 1 is a programming error."""
    source = open_source(str(write(tmp_path / "ids.txt", "fca_1\n")))
    with pytest.raises(ValueError, match="at least 1"):
        await read_all(source, size=0)


@pytest.mark.anyio
async def test_hostile_values_pass_through(tmp_path: Path) -> None:
    """Values are not validated here: path-like or odd strings are yielded unchanged."""
    hostile = ["fca_../../v1/customers", "fca_1?expand[]=x", "fca_%2F..", "<script>", "fca_1 fca_2"]
    path = write(
        tmp_path / "ids.jsonl", "".join(json.dumps({"account_id": v}) + "\n" for v in hostile)
    )
    assert await read_path(path) == hostile
    assert await read_path(write(tmp_path / "ids.txt", "\n".join(hostile))) == hostile


@pytest.mark.anyio
async def test_a_file_source_can_be_read_twice(tmp_path: Path) -> None:
    """Each chunks() call reads a file afresh, header handling included."""
    source = open_source(str(write(tmp_path / "ids.csv.gz", CSV)))
    assert await read_all(source) == await read_all(source) == IDS


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "text", "stop"),
    [
        ("ids.txt", "".join(f"fca_{i}\n" for i in range(50)), "early"),
        ("ids.jsonl", '{"account_id": "fca_1"}\n' * 20 + "oops\n", "error"),
        ("ids.csv.gz", "account_id\n" + "fca_1\n" * 50, "end"),
    ],
)
async def test_file_is_closed_however_iteration_ends(
    tmp_path: Path, name: str, text: str, stop: str
) -> None:
    """The file is closed when iteration ends, fails, or is closed early with aclose()."""
    path = write(tmp_path / name, text)
    chunks = open_source(str(path)).chunks(10)
    assert len(await anext(chunks)) == 10
    assert open_fds_to(path) == 1
    if stop == "early":
        assert isinstance(chunks, AsyncGenerator)
        await chunks.aclose()
    elif stop == "error":
        with pytest.raises(InputError, match="line 21"):
            async for _ in chunks:
                pass
    else:
        async for _ in chunks:
            pass
    assert open_fds_to(path) == 0


LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufeff"))


@pytest.mark.anyio
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(LINE_TEXT, max_size=30))
async def test_txt_round_trips(tmp_path: Path, values: list[str]) -> None:
    """Printable one-line values written as .txt come back trimmed, minus blanks and comments."""
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(values) + "\n", encoding="utf-8")
    expected = [v.strip() for v in values if v.strip() and not v.strip().startswith("#")]
    assert await read_path(path) == expected


@pytest.mark.anyio
async def test_cancelling_a_blocked_stdin_read_returns_at_once() -> None:
    """A read waiting on an idle stdin pipe does not hold up cancellation."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"fca_1\n")
    with os.fdopen(read_fd, "rb") as stdin:
        chunks = open_source("-", stdin=stdin).chunks(2)
        with anyio.fail_after(5), anyio.move_on_after(0.1) as scope:
            await anext(chunks)  # one line arrived, the second never does
        assert scope.cancelled_caught
        os.close(write_fd)  # EOF lets the abandoned worker thread finish
        await anyio.sleep(0.05)
