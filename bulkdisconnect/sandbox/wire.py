"""Stripe's wire format as the sandbox speaks it: envelopes, messages, the account object."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import string
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

from bulkdisconnect.model import is_valid_account_id
from bulkdisconnect.sandbox.config import SandboxConfig

DEFAULT_STRIPE_VERSION = "2026-10-28.endive"
FORM = "application/x-www-form-urlencoded"
DISCONNECT_ROUTE = "/v1/financial_connections/accounts/{account}/disconnect"
LIST_ROUTE = "/v1/financial_connections/accounts"
_LIST_PARAMS = frozenset({"account_holder[customer]", "limit", "starting_after"})
# Real parameters of the list operation (stripe/openapi) that the sandbox does not implement.
_UNSUPPORTED_LIST_PARAMS = frozenset(
    {"account_holder[account]", "account_holder[customer_account]", "ending_before", "session"}
)
_CONTROL_PATHS = frozenset({"/_sandbox/journal", "/_sandbox/config", "/_sandbox/reset"})
_KEY_PATTERN = re.compile(r"(?:sk|rk)_(test|live)_[A-Za-z0-9]+")
_KEY_PREFIX = re.compile(r"[a-z]{2}_(?:test|live)_")
_EXPAND_PARAM = re.compile(r"expand\[\d*\]")
_ALNUM = (string.ascii_letters + string.digits).encode()
_TO_ALNUM = bytes(_ALNUM[i % len(_ALNUM)] for i in range(256))  # random bytes -> Request-Id
_DOCS = "https://stripe.com/docs/error-codes/"
_SHUTDOWN_GRACE = 0.25  # seconds in-flight handlers get when the server stops

# stripe-mock's example account (stripe/openapi fixtures3.json), balance keyed by a currency.
# The "@..." fields are filled per answer: several times cheaper than json.dumps of the object.
_FIXTURE_CUSTOMER = "cus_QXg1o8vcGmoR32"
_ACCOUNT_TEMPLATE = (
    '{"account_holder": {"customer": "@customer", "type": "customer"}, '
    '"balance": {"as_of": 93102340, "current": {"usd": 1126940025}, "type": "cash"}, '
    '"balance_refresh": {"last_attempted_at": 1981828143, "next_refresh_available_at": null, '
    '"status": "failed"}, "category": "cash", "created": "@created", '
    '"display_name": "Sample Checking Account", "id": "@id", "institution_name": "StripeBank", '
    '"last4": "6789", "livemode": "@livemode", "object": "financial_connections.account", '
    '"ownership": null, "ownership_refresh": {"last_attempted_at": 1981828143, '
    '"next_refresh_available_at": null, "status": "failed"}, "permissions": [], '
    '"status": "@status", "subcategory": "checking", "subscriptions": [], '
    '"supported_payment_method_types": ["us_bank_account"], "transaction_refresh": '
    '{"id": "obj_123", "last_attempted_at": 1981828143, "next_refresh_available_at": null, '
    '"status": "failed"}, "account_numbers": null}'
)


class _Answer(NamedTuple):
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


Signature = tuple[str, tuple[tuple[str, str], ...]]  # raw path and sorted form parameters


@dataclass(slots=True)
class _Note:
    """What the handlers learned about a request, for its journal entry."""

    at: float
    request_id: str
    mode: str = "test"  # of the API key
    fault: str | None = None
    replayed: bool = False
    dropped: bool = False
    journaled: bool = False


_NOTE = web.RequestKey("bulkdisconnect.sandbox.note", _Note)


def _error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> _Answer:
    error = {"message": message, "type": kind}
    if code is not None:
        error |= {"code": code, "doc_url": _DOCS + code.replace("_", "-")}
    if param is not None:
        error["param"] = param
    return _Answer(status, json.dumps({"error": error}).encode(), headers)


_RATE_MESSAGE = (
    "Request rate limit exceeded. You can learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)
_FAULTS = {
    "p500": _error(500, "An unknown error occurred. Please try again later.", kind="api_error"),
    "p429": _error(
        429,
        _RATE_MESSAGE,
        code="rate_limit",
        headers=(("Stripe-Rate-Limited-Reason", "endpoint-rate"),),
    ),
    "lock_timeout": _error(
        429,
        "This object cannot be accessed right now because another API request or Stripe process "
        "is currently accessing it. If you see this error intermittently, retry the request. If "
        "you see this error frequently and are making multiple concurrent requests to a single "
        "object, make your requests serially or at a lower rate.",
        code="lock_timeout",
        headers=(("Stripe-Should-Retry", "true"),),
    ),
    "rate_limit": _error(
        429,
        _RATE_MESSAGE,
        code="rate_limit",
        headers=(("Stripe-Rate-Limited-Reason", "global-rate"),),
    ),
}
_WWW_AUTHENTICATE = (("WWW-Authenticate", 'Basic realm="Stripe"'),)
_NO_KEY = _error(
    401,
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/.",
    headers=_WWW_AUTHENTICATE,
)


def _exists(account: str, config: SandboxConfig) -> bool:
    return (
        is_valid_account_id(account)
        and account not in config.missing
        and (config.accounts is None or account in config.accounts)
    )


def _customer_accounts(prefix: str, start: int, config: SandboxConfig) -> Iterator[str]:
    """A customer's existing account IDs from index `start` on, lazily (a customer may be huge)."""
    for index in range(start, config.accounts_per_customer):
        if _exists(account := f"{prefix}{index}", config):
            yield account


def _account_index(account: str, prefix: str, config: SandboxConfig) -> int | None:
    """The index of an existing account of the customer whose IDs start with `prefix`."""
    digits = account.removeprefix(prefix)
    if digits == account or not digits.isascii() or not digits.isdigit():
        return None
    index = int(digits)
    canonical = str(index) == digits and index < config.accounts_per_customer
    return index if canonical and _exists(account, config) else None


def _born_disconnected(account: str, config: SandboxConfig) -> bool:
    """Whether an implicit customer's account is one of those that start disconnected."""
    if not config.disconnected_per_customer:
        return False
    head, _, digits = account.rpartition("a")  # fca_<customer suffix>a<index>
    if not (head.startswith("fca_") and len(head) > 4 and digits.isascii() and digits.isdigit()):
        return False
    index = int(digits)
    return str(index) == digits and index < min(
        config.disconnected_per_customer, config.accounts_per_customer
    )


def _account_json(
    account: str, *, livemode: bool, status: str = "disconnected", customer: str = _FIXTURE_CUSTOMER
) -> str:
    """The account object as JSON; `account` and `customer` are alphanumeric IDs."""
    created = 1_600_000_000 + zlib.crc32(account.encode()) % 100_000_000
    return (
        _ACCOUNT_TEMPLATE.replace('"@id"', json.dumps(account))
        .replace('"@customer"', json.dumps(customer))
        .replace('"@status"', json.dumps(status))
        .replace('"@created"', str(created))
        .replace('"@livemode"', "true" if livemode else "false")
    )


def _request_id() -> str:
    return "req_" + os.urandom(14).translate(_TO_ALNUM).decode()


def _respond(request: web.Request, note: _Note, answer: _Answer) -> web.Response:
    headers = {
        "Content-Type": "application/json",
        "Request-Id": note.request_id,
        "Stripe-Version": request.headers.get("Stripe-Version", DEFAULT_STRIPE_VERSION),
    }
    headers.update(answer.headers)
    return web.Response(status=answer.status, body=answer.body, headers=headers)


def _key_from(header: str) -> str:
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    if scheme.lower() == "basic":  # Stripe takes the key as the basic-auth user name
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            return base64.b64decode(credentials, validate=True).decode().partition(":")[0]
    return header


def _invalid_key(key: str) -> _Answer:
    prefix = prefix_match[0] if (prefix_match := _KEY_PREFIX.match(key)) else ""
    rest = key[len(prefix) :]
    shown = rest[-4:] if len(rest) > 4 else ""
    masked = prefix + "*" * min(len(rest) - len(shown), 32) + shown
    return _error(401, f"Invalid API Key provided: {masked}", headers=_WWW_AUTHENTICATE)


def _parse_form(
    request: web.Request, body: bytes
) -> tuple[tuple[tuple[str, str], ...], _Answer | None]:
    if request.content_type != FORM:
        got = request.headers.get("Content-Type", "none")
        return (), _error(400, f"Invalid request: the Content-Type must be {FORM}, not {got}.")
    try:
        pairs = (
            parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=True) if body else []
        )
    except (UnicodeDecodeError, ValueError):
        return (), _error(400, "Invalid request: the body is not form-encoded.")
    for name, _ in pairs:
        if not _EXPAND_PARAM.fullmatch(name):
            message = f"Received unknown parameter: {name}"
            return (), _error(400, message, code="parameter_unknown", param=name)
    return tuple(sorted(pairs)), None
