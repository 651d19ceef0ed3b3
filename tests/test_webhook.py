"""The webhook receiver: Stripe's signature scheme, and confirmations recorded over real HTTP."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from anyio.abc import TaskStatus
from hypothesis import assume, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bulkdisconnect.errors import UsageError
from bulkdisconnect.model import ItemResult, Outcome
from bulkdisconnect.planning import plan_input
from bulkdisconnect.store import ReportRow, open_store
from bulkdisconnect.store.core import SqlStore
from bulkdisconnect.webhook import (
    DISCONNECTED,
    SIGNATURE_TOLERANCE,
    SignatureError,
    WebhookReceiver,
    parse_secrets,
    serve_webhook,
    sign,
    verify,
)

JOB = "job"
WHSEC = "whsec_test_0123456789abcdef"
OLD_WHSEC = "whsec_test_old_fedcba9876543210"
ACCOUNTS = [f"fca_acct{n:04d}" for n in range(5)]
STRANGER = "fca_notinthisjob"
T0 = 1_700_000_000  # a fixed timestamp for the pure `verify` tests


async def chunks() -> AsyncIterator[Sequence[str]]:
    """The job's input, as `plan` reads it."""
    yield ACCOUNTS


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    """A real SQLite store holding a finished job: every account planned and disconnected."""
    opened = await open_store(tmp_path / "s.sqlite")
    try:
        await plan_input(opened, JOB, chunks(), retry_failed=False)
        await opened.acquire_lock(JOB, "run1", stale_after=30)
        assert await opened.claim(JOB, "run1", limit=len(ACCOUNTS)) == ACCOUNTS
        await opened.record(
            JOB,
            "run1",
            [
                ItemResult(account, Outcome.DISCONNECTED, attempts=1, http_status=200)
                for account in ACCOUNTS
            ],
        )
        await opened.release_lock(JOB, "run1")
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture
def receiver(store: SqlStore) -> WebhookReceiver:
    """A receiver for the job, with one signing secret."""
    return WebhookReceiver(store, JOB, [WHSEC])


async def _serve(receiver: WebhookReceiver, path: str, *, task_status: TaskStatus[str]) -> None:
    await serve_webhook(receiver, path=path, ready=task_status.started)


@contextlib.asynccontextmanager
async def serving(receiver: WebhookReceiver, path: str = "/webhook") -> AsyncIterator[str]:
    """Serve the receiver on a free loopback port in this event loop; yields its URL."""
    async with anyio.create_task_group() as group:
        url: str = await group.start(_serve, receiver, path)
        yield url
        group.cancel_scope.cancel()


@pytest.fixture
async def url(receiver: WebhookReceiver) -> AsyncIterator[str]:
    """The URL of the receiver, served for the test."""
    async with serving(receiver) as served:
        yield served


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session, closed after the test."""
    async with aiohttp.ClientSession() as session:
        yield session


def event(account: str, event_id: str = "evt_1", type_: str = DISCONNECTED, **extra: Any) -> bytes:
    """A Stripe event envelope about an account, as Stripe sends it."""
    body = {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type_,
        "data": {
            "object": {
                "id": account,
                "object": "financial_connections.account",
                "status": "disconnected",
            }
        },
        **extra,
    }
    return json.dumps(body).encode()


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, signature: str | None
) -> tuple[int, dict[str, Any]]:
    """POST a body with a Stripe-Signature header (none if None); the status and JSON answer."""
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with http.post(url, data=body, headers=headers) as response:
        answer: dict[str, Any] = await response.json()
        return response.status, answer


async def rows(store: SqlStore) -> dict[str, ReportRow]:
    """The job's report rows by account."""
    return {row.account_id: row async for row in store.rows(JOB)}


async def confirmed(store: SqlStore) -> dict[str, str | None]:
    """account -> event_id, for the confirmed accounts of the job."""
    return {a: r.event_id for a, r in (await rows(store)).items() if r.confirmed_at is not None}


@pytest.mark.anyio
async def test_valid_event_confirms_the_account(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession
) -> None:
    """A correctly signed disconnected event records confirmed_at and event_id on that account."""
    before = time.time()
    body = event(ACCOUNTS[2], "evt_ok")
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert (status, answer) == (200, {"received": True, "result": "confirmed"})
    row = (await rows(store))[ACCOUNTS[2]]
    assert row.event_id == "evt_ok"
    assert row.confirmed_at is not None
    assert before <= row.confirmed_at <= time.time()
    assert row.outcome == Outcome.DISCONNECTED.value
    assert await confirmed(store) == {ACCOUNTS[2]: "evt_ok"}
    assert receiver.counts == {"confirmed": 1}


@pytest.mark.anyio
async def test_wrong_secret_is_rejected(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession
) -> None:
    """An event signed with another secret gets 400, is counted rejected and stores nothing."""
    body = event(ACCOUNTS[0])
    with capture_logs() as logs:
        status, answer = await post(http, url, body, sign(body, "whsec_someone_else"))
    assert status == 400
    assert "no v1 signature matches" in answer["error"]
    assert await confirmed(store) == {}
    assert receiver.counts == {"rejected": 1}
    [entry] = [e for e in logs if e["event"] == "bulkdisconnect.webhook.rejected"]
    assert entry["log_level"] == "warning"
    assert entry["reason"] == answer["error"]
    signature = sign(body, "whsec_someone_else").split("v1=")[1]
    for text in (repr(logs), answer["error"]):
        assert WHSEC not in text
        assert signature not in text


@pytest.mark.anyio
async def test_stale_timestamp_is_rejected(
    store: SqlStore, url: str, http: aiohttp.ClientSession
) -> None:
    """A signature older than the 300 s tolerance gets 400; one just inside it is accepted."""
    body = event(ACCOUNTS[0], "evt_stale")
    stale = sign(body, WHSEC, timestamp=int(time.time()) - SIGNATURE_TOLERANCE - 100)
    status, answer = await post(http, url, body, stale)
    assert status == 400
    assert "old" in answer["error"]
    assert await confirmed(store) == {}
    recent = sign(body, WHSEC, timestamp=int(time.time()) - SIGNATURE_TOLERANCE + 30)
    status, answer = await post(http, url, body, recent)
    assert (status, answer["result"]) == (200, "confirmed")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "no Stripe-Signature header"),
        ("", "no Stripe-Signature header"),
        ("garbage", "no timestamp"),
        ("v1={sig}", "no timestamp"),
        ("t=soon,v1={sig}", "not an integer"),
        ("t={t},t={t},v1={sig}", "more than one timestamp"),
        ("t={t}", "no v1 signature in"),
        ("t={t},v0={sig}", "no v1 signature in"),
        ("t={t},v1=", "no v1 signature matches"),
        ("t={t},v1=caf\u00e9", "no v1 signature matches"),
    ],
)
async def test_missing_or_malformed_header_is_rejected(  # noqa: PLR0917 - fixtures
    store: SqlStore,
    receiver: WebhookReceiver,
    url: str,
    http: aiohttp.ClientSession,
    header: str | None,
    reason: str,
) -> None:
    """A missing or malformed Stripe-Signature header gets 400 naming what is wrong."""
    body = event(ACCOUNTS[0])
    good = sign(body, WHSEC)
    t, sig = good.split(",")[0][2:], good.split("v1=")[1]
    value = None if header is None else header.format(t=t, sig=sig)
    if value is not None and not value.isascii():
        value = value.encode().decode("latin-1")  # what a client puts on the wire as bytes
    status, answer = await post(http, url, body, value)
    assert status == 400
    assert reason in answer["error"]
    assert await confirmed(store) == {}
    assert receiver.counts == {"rejected": 1}


@pytest.mark.anyio
async def test_one_matching_signature_among_several_is_enough(
    store: SqlStore, url: str, http: aiohttp.ClientSession
) -> None:
    """A header with several v1 values (and a v0) is accepted when any one v1 matches."""
    body = event(ACCOUNTS[1], "evt_multi")
    good = sign(body, WHSEC)
    t = good.split(",")[0]
    other = sign(body, "whsec_other", timestamp=int(t[2:])).split("v1=")[1]
    header = f"{t},v1={other},v0={'0' * 64},{good.split(',')[1]},v1={'f' * 64}"
    status, answer = await post(http, url, body, header)
    assert (status, answer["result"]) == (200, "confirmed")
    assert await confirmed(store) == {ACCOUNTS[1]: "evt_multi"}


@pytest.mark.anyio
async def test_rotation_accepts_either_secret(store: SqlStore, http: aiohttp.ClientSession) -> None:
    """With two secrets configured, events signed with either one are accepted."""
    receiver = WebhookReceiver(store, JOB, [OLD_WHSEC, WHSEC])
    async with serving(receiver) as url:
        new = event(ACCOUNTS[0], "evt_new")
        status, answer = await post(http, url, new, sign(new, WHSEC))
        assert (status, answer["result"]) == (200, "confirmed")
        old = event(ACCOUNTS[1], "evt_old")
        status, answer = await post(http, url, old, sign(old, OLD_WHSEC))
        assert (status, answer["result"]) == (200, "confirmed")
        status, _ = await post(http, url, old, sign(old, "whsec_neither"))
        assert status == 400
    assert await confirmed(store) == {ACCOUNTS[0]: "evt_new", ACCOUNTS[1]: "evt_old"}
    assert receiver.counts == {"confirmed": 2, "rejected": 1}


@pytest.mark.anyio
async def test_replayed_event_is_acknowledged_and_not_recorded_again(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession
) -> None:
    """A redelivered event ID gets 200 "replayed" and leaves the first confirmation as it was."""
    body = event(ACCOUNTS[3], "evt_once")
    assert (await post(http, url, body, sign(body, WHSEC)))[1]["result"] == "confirmed"
    first = (await rows(store))[ACCOUNTS[3]]
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert (status, answer) == (200, {"received": True, "result": "replayed"})
    # Even a body naming another account is not recorded under an event ID already seen.
    other = event(ACCOUNTS[4], "evt_once")
    status, answer = await post(http, url, other, sign(other, WHSEC))
    assert (status, answer["result"]) == (200, "replayed")
    after = await rows(store)
    assert after[ACCOUNTS[3]] == first
    assert await confirmed(store) == {ACCOUNTS[3]: "evt_once"}
    assert receiver.counts == {"confirmed": 1, "replayed": 2}


@pytest.mark.anyio
async def test_event_for_an_account_outside_the_job_is_counted_unknown(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession
) -> None:
    """An event about an account the job does not hold gets 200 "unknown", counted, not stored."""
    body = event(STRANGER, "evt_stranger")
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert (status, answer) == (200, {"received": True, "result": "unknown"})
    assert sorted(await rows(store)) == sorted(ACCOUNTS)
    assert await confirmed(store) == {}
    assert receiver.counts == {"unknown": 1}
    assert await store.unknown_events(JOB) == 1


@pytest.mark.anyio
async def test_other_event_types_are_ignored(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession
) -> None:
    """Any other event type gets 200 "ignored" and stores nothing, even about a job account."""
    body = event(ACCOUNTS[0], "evt_refresh", "financial_connections.account.refreshed_balance")
    with capture_logs() as logs:
        status, answer = await post(http, url, body, sign(body, WHSEC))
    assert (status, answer) == (200, {"received": True, "result": "ignored"})
    assert await confirmed(store) == {}
    assert receiver.counts == {"ignored": 1}
    assert [e for e in logs if e["log_level"] != "debug"] == []  # never per event at info


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[1, 2]",
        b'"evt_1"',
        b'{"type": "financial_connections.account.disconnected"}',
        b'{"id": 7, "type": "financial_connections.account.disconnected"}',
        b'{"id": "evt_1", "type": null}',
        b'{"id": "", "type": "financial_connections.account.disconnected"}',
        b"[" * 5000,
        b"[" * 5000 + b"]" * 5000,  # well-formed, nested past any decoder's depth limit
    ],
)
async def test_signed_body_that_is_not_an_event_is_rejected(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession, body: bytes
) -> None:
    """A correctly signed body that is not a JSON object with string id and type gets 400."""
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert status == 400
    assert "not a JSON event" in answer["error"]
    assert await confirmed(store) == {}
    assert receiver.counts == {"rejected": 1}


@pytest.mark.anyio
@pytest.mark.parametrize("data", [None, {}, {"object": None}, {"object": {"id": 42}}])
async def test_disconnected_event_without_account_id_is_rejected(
    store: SqlStore, receiver: WebhookReceiver, url: str, http: aiohttp.ClientSession, data: Any
) -> None:
    """A disconnected event without a string data.object.id gets 400, not a silent 200."""
    body = event(ACCOUNTS[0], data=data)
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert status == 400
    assert "data.object.id" in answer["error"]
    assert await confirmed(store) == {}
    assert receiver.counts == {"rejected": 1}


@pytest.mark.anyio
async def test_served_on_the_given_path_only(
    store: SqlStore, receiver: WebhookReceiver, http: aiohttp.ClientSession
) -> None:
    """`ready` gets the full URL with the path; only POST on that path is routed."""
    async with serving(receiver, "/hooks/stripe") as url:
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/hooks/stripe")
        body = event(ACCOUNTS[0])
        assert (await post(http, url, body, sign(body, WHSEC)))[0] == 200
        async with http.get(url) as response:
            assert response.status == 405
        async with http.post(url.replace("/hooks/stripe", "/webhook"), data=body) as response:
            assert response.status == 404
    with pytest.raises(aiohttp.ClientConnectionError):  # cancelled means no longer listening
        await post(http, url, body, sign(body, WHSEC))


def test_receiver_needs_a_secret() -> None:
    """A receiver cannot be built without a signing secret."""
    with pytest.raises(ValueError, match="secret"):
        WebhookReceiver(None, JOB, [])  # type: ignore[arg-type]


# Real secrets are whsec_ + base64-ish text; NUL is left out because HMAC zero-pads short keys,
# so "k" and "k\0" are the same key by design (RFC 2104), not a verification bug.
secrets = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40
).map("whsec_".__add__)


@given(payload=st.binary(max_size=2000), secret=secrets, other=secrets)
def test_signed_payload_verifies_with_its_secret_only(
    payload: bytes, secret: str, other: str
) -> None:
    """Any payload signed with a secret verifies with that secret and fails with any other."""
    assume(secret != other)
    header = sign(payload, secret, timestamp=T0)
    verify(payload, header, [secret], now=T0)
    verify(payload, header, [other, secret], now=T0)
    with pytest.raises(SignatureError, match="no v1 signature matches") as caught:
        verify(payload, header, [other], now=T0)
    assert "whsec_" not in str(caught.value)


@given(payload=st.binary(min_size=1, max_size=200), flip=st.integers(min_value=0))
def test_tampered_payload_fails(payload: bytes, flip: int) -> None:
    """Changing any byte of a signed payload makes its signature fail."""
    header = sign(payload, WHSEC, timestamp=T0)
    index = flip % len(payload)
    tampered = payload[:index] + bytes([payload[index] ^ 0x01]) + payload[index + 1 :]
    with pytest.raises(SignatureError):
        verify(tampered, header, [WHSEC], now=T0)


def test_timestamp_is_part_of_the_signature() -> None:
    """A signature moved to another timestamp no longer matches."""
    header = sign(b"{}", WHSEC, timestamp=T0)
    moved = header.replace(f"t={T0}", f"t={T0 + 1}")
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify(b"{}", moved, [WHSEC], now=T0)


def test_tolerance_rejects_only_the_past() -> None:
    """Exactly at the tolerance is accepted, one second past it is not, the future always is."""
    header = sign(b"{}", WHSEC, timestamp=T0)
    verify(b"{}", header, [WHSEC], now=T0 + SIGNATURE_TOLERANCE)
    verify(b"{}", header, [WHSEC], now=T0 - 86_400)
    with pytest.raises(SignatureError, match="301 s old, over the 300 s tolerance"):
        verify(b"{}", header, [WHSEC], now=T0 + SIGNATURE_TOLERANCE + 1)
    verify(b"{}", header, [WHSEC], now=T0 + 1000, tolerance=1000)


def test_sign_defaults_to_now() -> None:
    """sign() without a timestamp uses the current time, which verify() accepts."""
    header = sign(b"{}", WHSEC)
    assert abs(int(header.split(",")[0].removeprefix("t=")) - time.time()) < 5
    verify(b"{}", header, [WHSEC])


def test_sign_matches_stripes_scheme() -> None:
    """sign() produces HMAC-SHA256 over "<t>.<payload>", as stripe-python's test helper does."""
    import hashlib
    import hmac

    expected = hmac.new(WHSEC.encode(), f"{T0}.{{}}".encode(), hashlib.sha256).hexdigest()
    assert sign(b"{}", WHSEC, timestamp=T0) == f"t={T0},v1={expected}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("whsec_a", ["whsec_a"]),
        (" whsec_a , ,whsec_b,, ", ["whsec_a", "whsec_b"]),
        ("whsec_a,whsec_a", ["whsec_a", "whsec_a"]),
    ],
)
def test_parse_secrets(value: str, expected: list[str]) -> None:
    """STRIPE_WEBHOOK_SECRET is split on commas, trimmed, and empty parts dropped."""
    assert parse_secrets(value) == expected


@pytest.mark.parametrize("value", ["whsec_a,whsec_\u00e9", "whsec_\udcff", "whsec_a\x00"])
def test_parse_secrets_refuses_non_ascii(value: str) -> None:
    """A secret with a non-ASCII or control character (never in a whsec_) is a usage error."""
    with pytest.raises(UsageError, match="STRIPE_WEBHOOK_SECRET") as caught:
        parse_secrets(value)
    assert "whsec_" not in str(caught.value)


@pytest.mark.parametrize("value", [None, "", "  ", " , ,"])
def test_parse_secrets_requires_one(value: str | None) -> None:
    """No secret at all is a usage error naming the variable."""
    with pytest.raises(UsageError, match="STRIPE_WEBHOOK_SECRET is not set"):
        parse_secrets(value)


def test_non_ascii_signature_is_a_mismatch_not_a_crash() -> None:
    """A v1 value with non-ASCII characters fails as a mismatch (compare_digest would raise)."""
    header = sign(b"{}", WHSEC, timestamp=T0) + ",v1=caf\u00e9"
    verify(b"{}", header, [WHSEC], now=T0)
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify(b"{}", f"t={T0},v1=caf\u00e9", [WHSEC], now=T0)


@pytest.mark.anyio
async def test_a_store_that_fails_is_503_so_that_stripe_delivers_again(
    store: SqlStore,
    receiver: WebhookReceiver,
    url: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The store refuses the write (a trigger stands in for a full disk): 503, not an
    acknowledgement, so Stripe retries; once it works again, the retry confirms."""
    with contextlib.closing(sqlite3.connect(tmp_path / "s.sqlite")) as db, db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF confirmed_at ON accounts "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    body = event(ACCOUNTS[1], "evt_later")
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert (status, answer) == (503, {"error": "the store is unavailable"})
    assert receiver.counts["unavailable"] == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "s.sqlite")) as db, db:
        db.execute("DROP TRIGGER refuse")
    status, answer = await post(http, url, body, sign(body, WHSEC))
    assert (status, answer) == (200, {"received": True, "result": "confirmed"})
    assert (await confirmed(store)) == {ACCOUNTS[1]: "evt_later"}
