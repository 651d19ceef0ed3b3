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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

from bulkdisconnect.model import is_valid_account_id
from bulkdisconnect.sandbox.config import SandboxConfig

DEFAULT_STRIPE_VERSION = "2026-10-28.endive"
# What the sandbox takes in Stripe-Version; Stripe answers 400 to a version it never released
# (stripe/stripe-java#682, "Invalid Stripe API version: 2019-2-19"). These are the version the
# client pins (client.STRIPE_VERSION), those of the spec and SDK in shared/stripe-openapi, and
# earlier releases a caller may still pin. An absent header is fine: the account's default.
STRIPE_VERSIONS = frozenset(
    {
        "2020-08-27",
        "2022-08-01",
        "2022-11-15",
        "2023-08-16",
        "2023-10-16",
        "2024-04-10",
        "2024-06-20",
        "2024-09-30.acacia",
        "2025-03-31.basil",
        "2026-06-24.dahlia",
        "2026-07-29.dahlia",
        DEFAULT_STRIPE_VERSION,
    }
)
FORM = "application/x-www-form-urlencoded"
DISCONNECT_ROUTE = "/v1/financial_connections/accounts/{account}/disconnect"
ACCOUNT_ROUTE = "/v1/financial_connections/accounts/{account}"
LIST_ROUTE = "/v1/financial_connections/accounts"
EVENTS_ROUTE = "/v1/events"
_LIST_PARAMS = frozenset(
    {"account_holder[customer]", "account_holder[account]", "limit", "starting_after"}
)
# Real parameters of the list operation (stripe/openapi) that the sandbox does not implement.
_UNSUPPORTED_LIST_PARAMS = frozenset(
    {"account_holder[customer_account]", "ending_before", "session"}
)
_CONTROL_PATHS = frozenset({"/_sandbox/journal", "/_sandbox/config", "/_sandbox/reset"})
_KEY_PATTERN = re.compile(r"(?:sk|rk)_(test|live)_[A-Za-z0-9]+")
_KEY_PREFIX = re.compile(r"[a-z]{2}_(?:test|live)_")
_EXPAND_PARAM = re.compile(r"expand\[\d*\]")
_ALNUM = (string.ascii_letters + string.digits).encode()
_TO_ALNUM = bytes(_ALNUM[i % len(_ALNUM)] for i in range(256))  # random bytes -> Request-Id
_DOCS = "https://stripe.com/docs/error-codes/"
_LOGS = "https://dashboard.stripe.com/"  # + test/ in test mode, logs/req_…?t=<unix time>
_SHUTDOWN_GRACE = 0.25  # seconds in-flight handlers get when the server stops

# stripe-mock's example account (stripe/openapi fixtures3.json), balance keyed by a currency.
# The "@..." fields are filled per answer: several times cheaper than json.dumps of the object.
_FIXTURE_CUSTOMER = "cus_QXg1o8vcGmoR32"
_ACCOUNT_TEMPLATE = (
    '{"account_holder": "@holder", '
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
    authenticated: bool = False  # the key was accepted: its errors carry request_log_url
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
# The disconnect ran, then failed: Stripe saves this under the key and says not to retry
# (stripe-python _http_client.py: "we expect the stripe-should-retry header to be false in
# most cases when a 500 is returned, since our idempotency framework would typically replay it").
_SAVED_500 = _FAULTS["p500"]._replace(headers=(("Stripe-Should-Retry", "false"),))
_WWW_AUTHENTICATE = (("WWW-Authenticate", 'Basic realm="Stripe"'),)
_NO_KEY = _error(
    401,
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
    "https://stripe.com/docs/api#authentication for details, or we can help at "
    "https://support.stripe.com/.",
    headers=_WWW_AUTHENTICATE,
)


def _with_log_url(answer: _Answer, request_id: str, mode: str, at: float) -> _Answer:
    """An error answer with Stripe's `request_log_url` (the request in the Dashboard's logs)."""
    if answer.status < 400 or b'"request_log_url"' in answer.body:
        return answer
    body = json.loads(answer.body)
    test = "test/" if mode == "test" else ""
    body["error"]["request_log_url"] = f"{_LOGS}{test}logs/{request_id}?t={int(at)}"
    return answer._replace(body=json.dumps(body).encode())


def _unknown_param(
    names: Iterable[str], known: frozenset[str], unsupported: frozenset[str] = frozenset()
) -> _Answer | None:
    """A 400 for the first query parameter outside `known` (expand[] always is)."""
    for name in names:
        if name in unsupported:
            return _error(400, f"The sandbox does not support the parameter {name}.", param=name)
        if name not in known and not _EXPAND_PARAM.fullmatch(name):
            message = f"Received unknown parameter: {name}"
            return _error(400, message, code="parameter_unknown", param=name)
    return None


def _limit(query: Mapping[str, str]) -> int | _Answer:
    """A list's `limit` (1 to 100, default 10), or the 400 for a bad one."""
    raw = query.get("limit", "10")
    limit = int(raw) if re.fullmatch(r"[0-9]{1,4}", raw) else 0
    if not 1 <= limit <= 100:
        message = f"Invalid limit: must be an integer between 1 and 100, not '{raw}'."
        return _error(400, message, code="parameter_invalid_integer", param="limit")
    return limit


def _list_body(data: Iterable[str], has_more: bool, url: str) -> bytes:
    """Stripe's list envelope around objects already rendered as JSON."""
    more = "true" if has_more else "false"
    return (
        f'{{"object": "list", "data": [{", ".join(data)}], "has_more": {more}, "url": "{url}"}}'
    ).encode()


def _bad_version(version: str) -> _Answer:
    return _error(400, f"Invalid Stripe API version: {version}")


def _exists(account: str, config: SandboxConfig, owner: str = "") -> bool:
    """Whether `account` exists for Stripe account `owner` (an acct_ ID, "" = the platform)."""
    if not is_valid_account_id(account) or account in config.missing:
        return False
    accounts = config.accounts
    if accounts is None:
        return True
    if isinstance(accounts, Mapping):  # account ID -> the Stripe account owning it
        return accounts.get(account) == owner
    return not owner and account in accounts  # the platform's own


# An implicit holder's accounts: fca_<customer suffix>a<index> for a customer (cus_), and
# fca_<account suffix>h<index> for a connected account (acct_), so the two never share an ID.
_HOLDER_MARKS = {"cus_": "a", "acct_": "h"}


def _holder_prefix(holder: str) -> str:
    """What the IDs of an implicit holder's accounts start with, before their index."""
    kind, _, suffix = holder.partition("_")
    return f"fca_{suffix}{_HOLDER_MARKS[kind + '_']}"


def _holder_accounts(prefix: str, start: int, config: SandboxConfig, owner: str) -> Iterator[str]:
    """A holder's existing account IDs from index `start` on, lazily (a holder may be huge)."""
    for index in range(start, config.accounts_per_customer):
        if _exists(account := f"{prefix}{index}", config, owner):
            yield account


def _account_index(account: str, prefix: str, config: SandboxConfig, owner: str) -> int | None:
    """The index of an existing account of the holder whose IDs start with `prefix`."""
    digits = account.removeprefix(prefix)
    if digits == account or not digits.isascii() or not digits.isdigit():
        return None
    index = int(digits)
    canonical = str(index) == digits and index < config.accounts_per_customer
    return index if canonical and _exists(account, config, owner) else None


def _holder_of(account: str) -> str:
    """The holder of an account: an implicit holder's customer or connected account (fca_Xa0 is
    cus_X's, fca_Xh0 acct_X's), else the customer of Stripe's fixture."""
    head = account.rstrip(string.digits)
    if head != account and head.startswith("fca_") and len(head) > 5 and head[-1] in "ah":
        kind = "cus_" if head[-1] == "a" else "acct_"
        return kind + head[4:-1]
    return _FIXTURE_CUSTOMER


def _born_disconnected(account: str, config: SandboxConfig) -> bool:
    """Whether an implicit holder's account is one of those that start disconnected."""
    if not config.disconnected_per_customer:
        return False
    head = account.rstrip(string.digits)  # fca_<holder suffix><mark>, then the index
    digits = account[len(head) :]
    if not (head.startswith("fca_") and len(head) > 5 and head[-1] in "ah" and digits):
        return False
    index = int(digits)
    return str(index) == digits and index < min(
        config.disconnected_per_customer, config.accounts_per_customer
    )


def _account_json(
    account: str, *, livemode: bool, status: str = "disconnected", holder: str = _FIXTURE_CUSTOMER
) -> str:
    """The account object as JSON; `account` and `holder` (cus_ or acct_) are alphanumeric IDs."""
    created = 1_600_000_000 + zlib.crc32(account.encode()) % 100_000_000
    kind = "account" if holder.startswith("acct_") else "customer"
    return (
        _ACCOUNT_TEMPLATE.replace('"@id"', json.dumps(account))
        .replace('"@holder"', f'{{"{kind}": {json.dumps(holder)}, "type": "{kind}"}}')
        .replace('"@status"', json.dumps(status))
        .replace('"@created"', str(created))
        .replace('"@livemode"', "true" if livemode else "false")
    )


def _object_id(prefix: str, length: int) -> str:
    """A random ID as Stripe forms them: a prefix and `length` letters and digits."""
    return prefix + os.urandom(length).translate(_TO_ALNUM).decode()


def _request_id() -> str:
    return _object_id("req_", 14)


def _respond(request: web.Request, note: _Note, answer: _Answer) -> web.Response:
    version = request.headers.get("Stripe-Version", DEFAULT_STRIPE_VERSION)
    headers = {
        "Content-Type": "application/json",
        "Request-Id": note.request_id,
        "Stripe-Version": version if version in STRIPE_VERSIONS else DEFAULT_STRIPE_VERSION,
    }
    key = request.headers.get("Idempotency-Key")
    if key is not None and request.method == "POST":  # Stripe echoes it on every POST answer
        headers["Idempotency-Key"] = key
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


def _masked_key(key: str) -> str:
    """The key as Stripe's messages show it: its prefix, stars, then its last four characters."""
    prefix = prefix_match[0] if (prefix_match := _KEY_PREFIX.match(key)) else ""
    rest = key[len(prefix) :]
    shown = rest[-4:] if len(rest) > 4 else ""
    return prefix + "*" * min(len(rest) - len(shown), 32) + shown


def _invalid_key(key: str) -> _Answer:
    return _error(401, f"Invalid API Key provided: {_masked_key(key)}", headers=_WWW_AUTHENTICATE)


def _expired_key(key: str) -> _Answer:
    """Stripe's 401 for a key that was rolled or revoked (message as SDK tests quote it)."""
    return _error(
        401,
        f"Expired API Key provided: {_masked_key(key)}",
        code="api_key_expired",
        headers=_WWW_AUTHENTICATE,
    )


def _no_access(key: str, account: str) -> _Answer:
    """Stripe's 403 for a Stripe-Account the key has no access to.

    Message and masking as in stripe/stripe-php tests/Stripe/ApiRequestorTest.php
    (testRaisesPermissionErrorOn403), with the code account_invalid that Stripe sends with it.
    """
    return _error(
        403,
        f"The provided key '{_masked_key(key)}' does not have access to account '{account}' "
        "(or that account does not exist). Application access may have been revoked.",
        code="account_invalid",
    )


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


def _missing(
    kind: str,
    ident: str,
    exists: bool,
    config: SandboxConfig,
    note: _Note,
    *,
    param: str = "account",
) -> _Answer | None:
    """Stripe's 404 resource_missing, hinting at the other mode when only the key's differs."""
    object_mode = "live" if config.livemode_accounts else "test"
    if exists and note.mode == object_mode:
        return None
    hint = (
        f"; a similar object exists in {object_mode} mode, but a {note.mode} mode key was used "
        "to make this request."
    )
    return _error(
        404,
        f"No such {kind}: '{ident}'{hint if exists else ''}",
        code="resource_missing",
        param=param,
    )
