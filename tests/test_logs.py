"""The log pipeline: secrets are redacted before rendering, and JSON lines parse."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
import structlog

from bulkdisconnect import logs
from bulkdisconnect.logs import mask_url
from bulkdisconnect.sources.sql import open_sql_source


class Pair(NamedTuple):
    """A namedtuple, whose constructor does not take an iterable."""

    name: str
    value: str


SECRETS = ["sk_test_abc123", "rk_live_xyz", "whsec_123", "sk_test_zzz", "pk_live_Pub1"]


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Leave structlog's global configuration as it was found."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def buf() -> io.StringIO:
    """A stream the pipeline writes JSON lines to."""
    stream = io.StringIO()
    logs.configure(json=True, stream=stream)
    return stream


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    """Every JSON line written so far, parsed."""
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def assert_no_secrets(text: str) -> None:
    """None of the test secrets' values appears in the text."""
    for secret in SECRETS:
        assert secret not in text
    assert "abc123" not in text
    assert "xyz" not in text


def test_secrets_in_event_and_nested_values_are_redacted(buf: io.StringIO) -> None:
    """Keys in the event, in values and in nested dicts, lists and tuples never reach output."""
    structlog.get_logger().error(
        "bulkdisconnect.failure with sk_test_abc123 and Bearer sk_test_zzz",
        key="rk_live_xyz",
        header="Authorization: Bearer sk_test_zzz",
        nested={
            "webhook": "whsec_123",
            "deeper": {"list": ["ok", "pk_live_Pub1", ("rk_live_xyz",)]},
        },
        items=["sk_test_abc123", {"k": "Bearer sk_test_zzz"}],
        account="fca_1MqXyZ2eZvKYlo2C",
    )
    output = buf.getvalue()
    assert_no_secrets(output)
    assert "[redacted]" in output
    (line,) = lines(buf)
    assert line["event"] == "bulkdisconnect.failure with [redacted] and Bearer [redacted]"
    assert line["key"] == "[redacted]"
    assert line["header"] == "Authorization: Bearer [redacted]"
    assert line["nested"] == {
        "webhook": "[redacted]",
        "deeper": {"list": ["ok", "[redacted]", ["[redacted]"]]},
    }
    assert line["items"] == ["[redacted]", {"k": "Bearer [redacted]"}]
    assert line["account"] == "fca_1MqXyZ2eZvKYlo2C"
    assert line["level"] == "error"
    assert "timestamp" in line


def test_secrets_in_bound_and_context_values_are_redacted(buf: io.StringIO) -> None:
    """Values bound to a logger or to the context variables are redacted too."""
    structlog.contextvars.bind_contextvars(api_key="sk_test_abc123")
    structlog.get_logger().bind(header="rk_live_xyz").info("bulkdisconnect.run.start")
    assert_no_secrets(buf.getvalue())
    (line,) = lines(buf)
    assert line["api_key"] == line["header"] == "[redacted]"


def test_secrets_in_exception_tracebacks_are_redacted(buf: io.StringIO) -> None:
    """A logged exception's text is redacted after it is formatted."""

    def call() -> None:
        raise RuntimeError("request with sk_test_abc123 failed")

    try:
        call()
    except RuntimeError:
        structlog.get_logger().exception("bulkdisconnect.crash")
    assert_no_secrets(buf.getvalue())
    (line,) = lines(buf)
    assert "[redacted]" in line["exception"]


def test_secrets_in_non_string_values_are_redacted(buf: io.StringIO) -> None:
    """A key inside a value that is rendered by repr (an exception, a set) never reaches output."""
    log = structlog.get_logger()
    log.error("bulkdisconnect.failure", error=ValueError("bad key sk_test_abc123"))
    log.error("bulkdisconnect.failure", keys={"rk_live_xyz"})
    assert_no_secrets(buf.getvalue())
    assert len(lines(buf)) == 2


def test_namedtuple_values_do_not_break_logging(buf: io.StringIO) -> None:
    """Logging a namedtuple neither raises nor leaks a key it holds."""
    structlog.get_logger().info("bulkdisconnect.pair", pair=Pair("key", "sk_test_abc123"))
    assert_no_secrets(buf.getvalue())
    assert len(lines(buf)) == 1


def test_console_renderer_redacts_too() -> None:
    """The console renderer gets redacted values as well."""
    stream = io.StringIO()
    logs.configure(json=False, stream=stream)
    structlog.get_logger().warning("bulkdisconnect.retry", key="sk_test_abc123")
    output = stream.getvalue()
    assert_no_secrets(output)
    assert "[redacted]" in output


def test_non_tty_stream_gets_json_by_default() -> None:
    """Off a terminal the pipeline writes one JSON object a line."""
    stream = io.StringIO()
    logs.configure(stream=stream)
    log = structlog.get_logger()
    log.info("bulkdisconnect.one", n=1)
    log.info("bulkdisconnect.two", n=2)
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(p["event"], p["n"]) for p in parsed] == [
        ("bulkdisconnect.one", 1),
        ("bulkdisconnect.two", 2),
    ]


def test_level_filters_lower_levels() -> None:
    """Messages below the configured level are dropped."""
    stream = io.StringIO()
    logs.configure(json=True, stream=stream, level="warning")
    log = structlog.get_logger()
    log.info("bulkdisconnect.quiet")
    log.warning("bulkdisconnect.loud")
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == [
        "bulkdisconnect.loud"
    ]


def test_redact_secrets_processor_under_capture_logs() -> None:
    """The processor, run on a captured event dict, redacts values and keeps other fields."""
    event = {"event": "x sk_live_abc123", "count": 3, "items": ("whsec_123", 4), "none": None}
    redacted = logs.redact_secrets(None, "info", event)
    assert redacted == {
        "event": "x [redacted]",
        "count": 3,
        "items": ("[redacted]", 4),
        "none": None,
    }
    with structlog.testing.capture_logs(processors=[logs.redact_secrets]) as captured:
        structlog.get_logger().info("bulkdisconnect.retry", key="rk_test_abc123")
    assert captured == [{"event": "bulkdisconnect.retry", "key": "[redacted]", "log_level": "info"}]


@pytest.mark.parametrize(
    "text",
    [
        "fca_1MqXyZ2eZvKYlo2C",
        "disconnected fca_abc and fca_sk_test",
        "No such financialconnections.account: 'fca_1'",
        "a task_test_run and desk_test_pad",
        "acct_1Abc req_9XyZ",
        "Bearer",
        "",
    ],
)
def test_redact_text_leaves_ordinary_text(text: str) -> None:
    """Text holding no key, including account and request IDs, is left unchanged."""
    assert logs.redact_text(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sk_test_abc123", "[redacted]"),
        ("key=sk_live_abc123;", "key=[redacted];"),
        ("rk_test_A1 and rk_live_B2", "[redacted] and [redacted]"),
        ("pk_test_abc", "[redacted]"),
        ("whsec_123", "[redacted]"),
        ("Authorization: Bearer anything-at-all.x", "Authorization: Bearer [redacted]"),
    ],
)
def test_redact_text_replaces_keys(text: str, expected: str) -> None:
    """Secret, restricted, publishable keys, webhook secrets and bearer tokens are replaced."""
    assert logs.redact_text(text) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:s3c@r/et@h/db", "postgresql://u:***@h/db"),
        (
            "postgres://u@h/db?password=s3cret&sslmode=require",
            "postgres://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_mask_url_hides_passwords(url: str, shown: str) -> None:
    """A password never survives into a URL shown in messages, even badly encoded; a SQL
    source describes itself by the masked URL."""
    assert mask_url(url) == shown
    assert open_sql_source(url, "SELECT 1", {}).description == shown
