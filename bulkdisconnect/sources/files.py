"""Files and stdin: stream raw account-ID values from .txt, .csv and .jsonl (maybe gzipped).

A source only reads: it trims values and reports malformed rows, but leaves validating and
deduplicating IDs to the store's planning. Each chunk is read in a worker thread, so a large
file never blocks the event loop, and memory stays flat however long the input is.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import gzip
import itertools
import json
import sys
import typing
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path, PurePath
from typing import Protocol

import anyio.to_thread

from bulkdisconnect.errors import InputError
from bulkdisconnect.model import ACCOUNT_ID_PATTERN, Owned
from bulkdisconnect.sources import (
    DEFAULT_ACCOUNT_COLUMN,
    DEFAULT_COLUMN,
    case_hint,
    choose_account_column,
    choose_column,
)

# Bounds the memory one line can take; an ID row is ~30 bytes, so only junk comes near it.
MAX_LINE_BYTES = 1 << 20
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class _LineReader(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


# Turns raw lines (BOM removed) into trimmed values, with their connected account when the
# input has a column for it; `str` is the description for messages.
Parser = Callable[[Iterator[bytes], str], Iterator[str | Owned]]


class StreamSource:
    """A binary stream parsed by one format; `owned` streams are opened afresh and closed."""

    def __init__(
        self, description: str, parse: Parser, open_: Callable[[], _LineReader], *, owned: bool
    ) -> None:
        self.description = description
        self.parse = parse
        self.open = open_
        self.owned = owned

    async def check(self) -> None:
        """Nothing more to check: `open_source` checked the file and its header."""

    async def chunks(self, size: int = 1000) -> AsyncIterator[list[str | Owned]]:
        """Yield lists of up to `size` values; an owned file is closed however iteration ends."""
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        # Shielded so a cancellation cannot land between the open and the `try` that closes.
        with anyio.CancelScope(shield=True):
            f = await anyio.to_thread.run_sync(self.open)
        try:
            values = self.parse(_lines(f, self.description), self.description)
            # Reading stdin can block forever (a terminal, an idle pipe): let a cancel abandon it.
            abandon = not self.owned
            while chunk := await anyio.to_thread.run_sync(
                _take, values, size, abandon_on_cancel=abandon
            ):
                yield chunk
        finally:
            if self.owned:
                f.close()


def open_source(
    path: str,
    column: str | None = None,
    *,
    stdin: typing.BinaryIO | None = None,
    account_column: str | None = None,
) -> StreamSource:
    """Open `path` (`-` for stdin), checking all that can be checked before reading values.

    `account_column` names the column (field) holding each row's connected account; by
    default one named stripe_account is read when the input has it.
    """
    if path == "-":
        if column is not None or account_column is not None:
            flag = "--column" if column is not None else "--account-column"
            raise InputError(f"{flag} does not apply to stdin, which is read as one ID a line")
        stream = stdin if stdin is not None else sys.stdin.buffer
        return StreamSource("stdin", _txt_values, lambda: stream, owned=False)
    if not Path(path).exists():
        raise InputError(f"input file not found: {path}")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a directory; give an input file")
    name = PurePath(path).name.lower()
    compressed = name.endswith(".gz")
    make_parser = FORMATS.get(PurePath(name.removesuffix(".gz")).suffix)
    if make_parser is None:
        supported = ", ".join(FORMATS)
        raise InputError(
            f"{path}: unknown input format; use one of the suffixes {supported}"
            " (each optionally followed by .gz), or - for stdin"
        )
    _open_file(path, compressed).close()  # unreadable or not gzip: fail before any work
    parse = make_parser(path, column, compressed, account_column)
    return StreamSource(path, parse, functools.partial(_open_file, path, compressed), owned=True)


def takes_column(path: str) -> bool:
    """Whether an input's format has columns or fields to pick from (.csv, .jsonl)."""
    name = PurePath(path).name.lower().removesuffix(".gz")
    return FORMATS.get(PurePath(name).suffix) in (_csv_format, _jsonl_format)


def _txt_format(
    path: str, column: str | None, compressed: bool, account_column: str | None
) -> Parser:
    for flag, given in (("--column", column), ("--account-column", account_column)):
        if given is not None:
            raise InputError(f"{path}: {flag} applies only to .csv and .jsonl inputs")
    return _txt_values


def _jsonl_format(
    path: str, column: str | None, compressed: bool, account_column: str | None
) -> Parser:
    return functools.partial(
        _jsonl_values,
        field=column or DEFAULT_COLUMN,
        account_field=account_column or DEFAULT_ACCOUNT_COLUMN,
    )


def _csv_format(
    path: str, column: str | None, compressed: bool, account_column: str | None
) -> Parser:
    """Read the header row now and resolve which cells hold the ID and connected account."""
    with contextlib.closing(_open_file(path, compressed)) as f:
        header = _first_row(csv.reader(_decoded(_lines(f, path), path), strict=True))
    if header is None:  # an empty file: nothing to read, nothing to resolve
        return functools.partial(_csv_values, index=0, label="value", skip_header=False)
    header = [cell.strip() for cell in header]
    if column is None and len(header) == 1 and ACCOUNT_ID_PATTERN.fullmatch(header[0]):
        if account_column is not None:
            raise InputError(f"{path}: no header row, so no column {account_column!r}")
        # A single column whose first cell is an account ID: no header row, that is data.
        return functools.partial(_csv_values, index=0, label="value", skip_header=False)
    owner = choose_account_column(header, account_column, where=path)
    index = choose_column(header, column, where=path, besides=owner)
    return functools.partial(
        _csv_values, index=index, label=_clip(header[index]), skip_header=True, owner=owner
    )


FORMATS: dict[str, Callable[[str, str | None, bool, str | None], Parser]] = {
    ".txt": _txt_format,
    ".csv": _csv_format,
    ".jsonl": _jsonl_format,
    ".ndjson": _jsonl_format,
}


def _txt_values(lines: Iterator[bytes], description: str) -> Iterator[str]:
    """One value a line; blank lines and `#` comments skipped."""
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):  # noqa: B007 - read in the except clause
            line = raw.decode().strip()
            if line and not line.startswith("#"):
                yield line
    except UnicodeDecodeError as exc:
        raise _bad_utf8(description, lineno, exc) from None


def _csv_values(
    lines: Iterator[bytes],
    description: str,
    *,
    index: int,
    label: str,
    skip_header: bool,
    owner: int | None = None,
) -> Iterator[str | Owned]:
    """The cell at `index` of each row (with the cell at `owner`, its connected account);
    rows with every cell blank are skipped."""
    reader = csv.reader(_decoded(lines, description), strict=True)
    try:
        if skip_header:
            _first_row(reader)
        for row in reader:
            if index < len(row):
                # An empty cell in a row with others filled is an ID that is missing: it is
                # recorded invalid_id (shown empty), as in every source.
                if (value := row[index].strip()) or any(cell.strip() for cell in row):
                    if owner is None:
                        yield value
                    else:
                        yield Owned(value, row[owner].strip() if owner < len(row) else "")
            elif any(cell.strip() for cell in row):
                where = f"{description} line {reader.line_num}"
                raise InputError(f"{where}: {len(row)} cell(s), but {label} is cell {index + 1}")
    except csv.Error as exc:
        raise InputError(f"{description} line {reader.line_num}: bad CSV ({exc})") from None


def _jsonl_values(
    lines: Iterator[bytes], description: str, *, field: str, account_field: str
) -> Iterator[str | Owned]:
    """The string `field` of each line's JSON object, with its string `account_field` when it
    has one (the row's connected account); blank lines skipped."""
    for lineno, raw in enumerate(lines, 1):
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise _bad_utf8(description, lineno, exc) from None
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            if not text.strip():
                continue
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise InputError(
                f"{description} line {lineno}: not valid JSON ({reason}): {_clip(text.strip())}"
            ) from None
        value = obj.get(field) if isinstance(obj, dict) else None
        where = f"{description} line {lineno}"
        if isinstance(value, str):
            # empty: recorded invalid_id, as in every source
            owner = obj.get(account_field)
            if owner is None:
                yield value.strip()
            elif isinstance(owner, str):
                yield Owned(value.strip(), owner.strip())
            else:
                raise InputError(
                    f"{where}: {account_field!r} is {_json_type(owner)}, expected a string"
                )
            continue
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {_json_type(obj)}")
        if field not in obj:
            raise InputError(f"{where}: no {field!r} field{case_hint(field, list(obj))}")
        if value is None:
            yield ""  # null: an ID that is missing, like an empty one
            continue
        raise InputError(f"{where}: {field!r} is {_json_type(value)}, expected a string")


def _open_file(path: str, compressed: bool) -> _LineReader:
    """Open for binary reading; a .gz file has its header checked now."""
    try:
        if not compressed:
            return Path(path).open("rb")
        f = gzip.open(path)  # noqa: SIM115 - returned open; the caller closes it
        try:
            f.peek(1)
        except BaseException:
            f.close()
            raise
        return f  # noqa: TRY300 - `else` would split the gzip case for no gain
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except _GZIP_ERRORS:
        raise InputError(f"{path}: not a valid gzip file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _lines(f: _LineReader, description: str) -> Iterator[bytes]:
    """Raw lines with a UTF-8 BOM dropped from the first; InputError on a read error."""
    read = functools.partial(f.readline, MAX_LINE_BYTES + 1)
    try:
        first = read()
        if not first:
            return
        lines = itertools.chain((first.removeprefix(codecs.BOM_UTF8),), iter(read, b""))
        for lineno, raw in enumerate(lines, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{description} line {lineno}: longer than {MAX_LINE_BYTES} bytes")
            yield raw
    except _GZIP_ERRORS:  # only a gzip reader raises these
        raise InputError(f"{description}: not a valid gzip file") from None
    except OSError as exc:
        raise InputError(f"{description}: cannot read ({exc.strerror or exc})") from None


def _decoded(lines: Iterator[bytes], description: str) -> Iterator[str]:
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):  # noqa: B007 - read in the except clause
            yield raw.decode()
    except UnicodeDecodeError as exc:
        raise _bad_utf8(description, lineno, exc) from None


def _first_row(reader: Iterator[list[str]]) -> list[str] | None:
    """The first row with a non-blank cell, or None at the end of the input."""
    return next((row for row in reader if any(cell.strip() for cell in row)), None)


def _take(values: Iterator[str | Owned], size: int) -> list[str | Owned]:
    return list(itertools.islice(values, size))


def _bad_utf8(description: str, lineno: int, exc: UnicodeDecodeError) -> InputError:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return InputError(
        f"{description} line {lineno}: not valid UTF-8 (byte 0x{byte} at offset {exc.start});"
        " save the file as UTF-8"
    )


def _clip(text: str, limit: int = 80) -> str:
    """At most `limit` characters of `text`, repr'd, so a huge line never lands in a message."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")
