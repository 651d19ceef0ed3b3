"""The webhook receiver: verify Stripe's signature, record disconnected events in the store.

Signature checking follows stripe-python's `stripe/_webhook.py` (`WebhookSignature`): the
`Stripe-Signature` header is `t=<unix>,v1=<hex>[,v1=<hex>...]`, the signed payload is
`"<t>." + raw body`, each v1 is an HMAC-SHA256 hex digest with the endpoint secret as key, and a
timestamp older than the tolerance is refused (a future one is not).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import msgspec
import structlog
from aiohttp import web

from bulkdisconnect.errors import StoreError, UsageError
from bulkdisconnect.serving import serve_app
from bulkdisconnect.store import Confirmation

SIGNATURE_TOLERANCE = 300  # seconds; stripe-python's Webhook.DEFAULT_TOLERANCE
SIGNATURE_HEADER = "Stripe-Signature"
EXPECTED_SCHEME = "v1"
DISCONNECTED = "financial_connections.account.disconnected"
# In-flight deliveries get this long to finish (one SQLite write each) when the server stops.
_SHUTDOWN_GRACE = 5.0  # seconds
# A delivery's body must be in this long after its headers: Stripe sends a few kilobytes at
# once, and a connection left waiting on a stalled body is one a delivery cannot have.
BODY_TIMEOUT = 10.0  # seconds

_DIGITS = re.compile(r"[0-9]+")
# What an event or account ID may hold before it reaches the store: Stripe's IDs are a prefix
# and letters and digits. A NUL (which PostgreSQL's text cannot hold), another control
# character, a space or a kilobyte of ID never came from Stripe.
_STRIPE_ID = re.compile(r"[!-~]{1,255}")
_STRIPE_ID_RULE = "1 to 255 printable ASCII characters without spaces"
_NOT_AN_EVENT = "the body is not a JSON event with a string id and type"

log = structlog.get_logger("bulkdisconnect")


class SignatureError(Exception):
    """The Stripe-Signature header is missing, malformed, does not match, or is too old."""


class EventError(Exception):
    """A signed body is not an event the receiver can record: not JSON, or a malformed ID."""


def _digest(timestamp: int, payload: bytes, secret: str) -> str:
    signed = f"{timestamp}.".encode() + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A Stripe-Signature header value for payload (stripe-python's generate_signature_header)."""
    if timestamp is None:
        timestamp = int(time.time())
    return f"t={timestamp},{EXPECTED_SCHEME}={_digest(timestamp, payload, secret)}"


def _parse_header(header: str) -> tuple[int, list[str]]:
    """The timestamp and the v1 signatures of a header; other schemes (v0) are skipped."""
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamps.append(value)
        elif key == EXPECTED_SCHEME:
            signatures.append(value)
    if not timestamps:
        raise SignatureError("no timestamp (t=) in the Stripe-Signature header")
    if len(timestamps) > 1:  # stripe-python keeps the last; an ambiguous header is refused here
        raise SignatureError("more than one timestamp (t=) in the Stripe-Signature header")
    if _DIGITS.fullmatch(timestamps[0]) is None:
        raise SignatureError("the timestamp (t=) in the Stripe-Signature header is not an integer")
    if not signatures:
        raise SignatureError("no v1 signature in the Stripe-Signature header")
    return int(timestamps[0]), signatures


def verify(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    tolerance: float = SIGNATURE_TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless a v1 signature in header matches payload under a secret."""
    if not header:
        raise SignatureError("no Stripe-Signature header")
    timestamp, signatures = _parse_header(header)
    # compare_digest refuses non-ASCII str; such a value cannot be a hex digest anyway.
    candidates = [s for s in signatures if s.isascii()]
    expected = [_digest(timestamp, payload, secret) for secret in secrets]
    # Every pair is compared (no early exit), so timing says nothing about which one matched.
    matched = False
    for want in expected:
        for got in candidates:
            matched |= hmac.compare_digest(want, got)
    if not matched:
        raise SignatureError("no v1 signature matches the payload under the configured secrets")
    if now is None:
        now = time.time()
    if timestamp < now - tolerance:
        age = int(now - timestamp)
        raise SignatureError(f"timestamp is {age} s old, over the {tolerance:g} s tolerance")


def parse_secrets(value: str | None) -> list[str]:
    """The webhook signing secrets in STRIPE_WEBHOOK_SECRET (comma-separated during a rotation)."""
    secrets = [part.strip() for part in (value or "").split(",")]
    secrets = [secret for secret in secrets if secret]
    if not secrets:
        raise UsageError(
            "STRIPE_WEBHOOK_SECRET is not set: set it to the endpoint's signing secret (whsec_...),"
            " or to several separated by commas while rotating it"
        )
    for number, secret in enumerate(secrets, 1):
        # Signing secrets are ASCII; anything else (e.g. a byte the environment could not decode)
        # would fail every delivery, so say so now. The value itself is never echoed.
        if not (secret.isascii() and secret.isprintable()):
            raise UsageError(
                f"secret #{number} in STRIPE_WEBHOOK_SECRET has a non-ASCII or control character:"
                " copy the signing secret again from the Stripe dashboard"
            )
    return secrets


def _error(reason: str, status: int = 400) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _received(result: str) -> web.Response:
    return web.json_response({"received": True, "result": result})


def _event(payload: bytes) -> dict[str, Any]:
    """The event object in a body: a JSON object with a Stripe ID and a string type."""
    try:
        event = msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # not JSON, or nested too deep to decode
        raise EventError(_NOT_AN_EVENT) from None
    if not isinstance(event, dict):
        raise EventError(_NOT_AN_EVENT)
    if not (isinstance(event.get("id"), str) and event["id"]):
        raise EventError(_NOT_AN_EVENT)
    if not (isinstance(event.get("type"), str) and event["type"]):
        raise EventError(_NOT_AN_EVENT)
    if _STRIPE_ID.fullmatch(event["id"]) is None:
        raise EventError(f"the event id is not a Stripe ID ({_STRIPE_ID_RULE})")
    return event


def _account_id(event: dict[str, Any]) -> str:
    """data.object.id of a disconnected event, if it is a Stripe ID."""
    data = event.get("data")
    account = data.get("object") if isinstance(data, dict) else None
    found = account.get("id") if isinstance(account, dict) else None
    if not (isinstance(found, str) and found):
        # Acknowledging it would lose a confirmation silently; a 400 shows in Stripe's
        # dashboard as a failed delivery.
        raise EventError(f"{DISCONNECTED} event without a string data.object.id")
    if _STRIPE_ID.fullmatch(found) is None:
        raise EventError(
            f"{DISCONNECTED} event whose data.object.id is not a Stripe ID ({_STRIPE_ID_RULE})"
        )
    return found


class ConfirmStore(Protocol):
    """What the receiver needs of the store."""

    async def confirm(
        self, job: str, account_id: str, *, event_id: str, confirmed_at: float
    ) -> Confirmation:
        """Record a disconnected event on the account's outcome, once per event ID."""
        ...


class WebhookReceiver:
    """Receives a job's Stripe events and records disconnection confirmations in the store."""

    def __init__(self, store: ConfirmStore, job: str, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("a webhook receiver needs at least one signing secret")
        self.store = store
        self.job = job
        self._secrets = tuple(secrets)
        # confirmed / replayed / unknown / ignored / rejected
        self.counts: collections.Counter[str] = collections.Counter()

    def make_app(self, path: str = "/webhook") -> web.Application:
        """An aiohttp application with the one POST route at path."""
        app = web.Application()
        app.router.add_post(path, self.handle)
        return app

    def _reject(self, reason: str, status: int = 400) -> web.Response:
        self.counts["rejected"] += 1
        # The reason never holds a secret, a signature value or an ID: none is built from them.
        log.warning("bulkdisconnect.webhook.rejected", reason=reason, status=status)
        return _error(reason, status)

    async def _too_slow(self, request: web.Request) -> web.Response:
        """Answer 408 to a delivery whose body stalled, and close its connection."""
        response = self._reject(f"the body did not arrive within {BODY_TIMEOUT:g} s", 408)
        # Sent here, then the connection dropped: aiohttp would otherwise linger for the rest
        # of a body that is not coming before closing it.
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
        return response

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one delivery: 400 if unsigned or malformed, else 200 with what it did."""
        try:
            with anyio.fail_after(BODY_TIMEOUT):
                payload = await request.read()
        except TimeoutError:
            return await self._too_slow(request)
        try:
            verify(payload, request.headers.get(SIGNATURE_HEADER), self._secrets)
            event = _event(payload)
            # Every ID is checked before any reaches the store.
            account_id = _account_id(event) if event["type"] == DISCONNECTED else None
        except (SignatureError, EventError) as exc:
            return self._reject(str(exc))
        if account_id is None:
            result = "ignored"
        else:
            try:
                confirmation: Confirmation = await self.store.confirm(
                    self.job, account_id, event_id=event["id"], confirmed_at=time.time()
                )
            except StoreError as exc:
                # Not acknowledged: Stripe delivers it again, by then to a store that works.
                log.error("bulkdisconnect.webhook.store", reason=str(exc))  # noqa: TRY400
                self.counts["unavailable"] += 1
                return web.json_response({"error": "the store is unavailable"}, status=503)
            result = confirmation.value
        self.counts[result] += 1
        log.debug(
            "bulkdisconnect.webhook.event", event_id=event["id"], type=event["type"], result=result
        )
        return _received(result)


async def serve_webhook(
    receiver: WebhookReceiver,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "/webhook",
    ready: Callable[[str], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (),
) -> str | None:
    """Serve the receiver until cancelled or signalled (see `serve_app`); `ready` gets the
    full URL (with path) once listening."""
    return await serve_app(
        receiver.make_app(path),
        host=host,
        port=port,
        shutdown_timeout=_SHUTDOWN_GRACE,
        ready=None if ready is None else (lambda url: ready(url + path)),
        stop_signals=stop_signals,
    )
