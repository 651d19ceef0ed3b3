"""The structlog pipeline: context, redaction before rendering, JSON off a terminal."""

from __future__ import annotations

import logging
import re
import sys
import urllib.parse
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

# Stripe secret, restricted and publishable keys, webhook secrets, and bearer credentials.
SECRET = re.compile(r"\b(?:(?:sk|rk|pk)_(?:test|live)_|whsec_)[A-Za-z0-9]+|(?<=Bearer )\S+")
REDACTED = "[redacted]"
# URL query parameters that carry a password (asyncpg reads these from a DSN's query too).
_SECRET_KEYS = frozenset({"password", "sslpassword"})


def redact_text(text: str) -> str:
    """Replace anything that looks like a key in a string."""
    return SECRET.sub(REDACTED, text)


def mask_url(url: str) -> str:
    """`url` with its password (also a `password=` query parameter) shown as `***`."""
    scheme, sep, rest = url.partition("://")
    # The last @ ends the user info, even when a careless password holds an unencoded @ or /.
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{host}"
    base, qmark, query = rest.partition("?")
    if qmark:
        pairs = (pair.partition("=") for pair in query.split("&"))
        query = "&".join(
            f"{key}=***" if urllib.parse.unquote(key).lower() in _SECRET_KEYS else key + eq + value
            for key, eq, value in pairs
        )
        rest = f"{base}?{query}"
    return f"{scheme}{sep}{rest}"


def _redact(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # exact types: a namedtuple cannot be rebuilt this way
        return type(value)(_redact(v) for v in value)
    # Anything else (an exception, a set, a namedtuple) is rendered through its repr: redact that.
    return redact_text(repr(value))


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact key-like strings in every value, before any renderer."""
    return {key: _redact(value) for key, value in event_dict.items()}


class _CurrentStderr:
    """A file-like object that writes to whatever sys.stderr is at the moment."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(
    *, json: bool | None = None, stream: TextIO | None = None, level: str = "info"
) -> None:
    """Set up logging once for the CLI: console on a terminal, JSON lines otherwise."""
    if json is None:
        json = not (stream or sys.stderr).isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        # Compact for a terminal (short time, no padding): a line should fit 80 columns
        # beside a progress bar rather than wrap into it.
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty(), pad_event_to=0)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso" if json else "%H:%M:%SZ", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # Without an explicit stream, look sys.stderr up at each write, so a live progress bar
        # (which redirects it) keeps log lines above the bar instead of tearing through it.
        logger_factory=structlog.PrintLoggerFactory(stream or cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )
