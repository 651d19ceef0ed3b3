"""A local stand-in for Stripe's disconnect and list endpoints, with fault knobs and a journal.

It speaks Stripe's wire format (error envelope, Request-Id, Idempotency-Key replay, 429 reason
headers) so the runner can be demonstrated, tested and benchmarked without a network.

Customers are implicit: every well-formed `cus_X` has `accounts_per_customer` accounts
`fca_Xa0`, `fca_Xa1`, ... which `GET /v1/financial_connections/accounts` lists in that order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import string
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qsl

from aiohttp import ClientError, ClientSession, web
from aiohttp.typedefs import Handler

from bulkdisconnect.model import is_valid_account_id
from bulkdisconnect.serving import serve_app

DEFAULT_STRIPE_VERSION = "2026-10-28.endive"
FORM = "application/x-www-form-urlencoded"
DISCONNECT_ROUTE = "/v1/financial_connections/accounts/{account}/disconnect"
LIST_ROUTE = "/v1/financial_connections/accounts"
_CUSTOMER_PATTERN = re.compile(r"cus_[A-Za-z0-9]+")
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


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Fault knobs and account universe of a sandbox; probabilities are per request."""

    latency_ms: float = 0.0  # added to every API answer
    jitter_ms: float = 0.0  # latency is uniform in latency ± jitter, floored at 0
    p500: float = 0.0
    p429: float = 0.0  # code rate_limit, reason endpoint-rate
    p_lock_timeout: float = 0.0  # 429 code lock_timeout, Stripe-Should-Retry: true
    p_drop: float = 0.0  # close the connection without answering
    p_hang: float = 0.0  # say nothing for hang_seconds, then close
    hang_seconds: float = 3600.0
    rate_limit: float | None = None  # most requests let in per sliding second (global-rate)
    accounts: frozenset[str] | None = None  # if set, only these account IDs exist
    missing: frozenset[str] = frozenset()  # account (or customer) IDs that do not exist
    accounts_per_customer: int = 3  # accounts every implicit customer has
    disconnected_per_customer: int = 0  # the first this many of them start disconnected
    livemode_accounts: bool = False  # accounts live in live mode, so test keys don't see them
    api_key: str | None = None  # if set, the only key accepted
    revoke_after: int | None = None  # answered API calls before the key stops working
    seed: int | None = None  # of the fault and jitter random numbers
    webhook_url: str | None = None  # where to send financial_connections.account.disconnected
    webhook_secret: str | None = None  # signs those events (Stripe-Signature)

    def __post_init__(self) -> None:
        faults = (self.p500, self.p429, self.p_lock_timeout, self.p_drop, self.p_hang)
        if not all(0.0 <= p <= 1.0 for p in faults) or sum(faults) > 1.0:
            raise ValueError("fault probabilities must each be in [0, 1] and sum to at most 1")
        if min(self.latency_ms, self.jitter_ms, self.hang_seconds) < 0:
            raise ValueError("latency_ms, jitter_ms and hang_seconds must be >= 0")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 requests/s, or None for no limit")
        if min(self.accounts_per_customer, self.disconnected_per_customer) < 0:
            raise ValueError("accounts_per_customer and disconnected_per_customer must be >= 0")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One request as the sandbox saw it; the API key itself is never kept."""

    at: float  # time.monotonic() on arrival
    method: str
    path: str  # raw, as received
    account_id: str | None  # from the disconnect route, decoded; None for a list call
    idempotency_key: str | None
    stripe_account: str | None
    stripe_version: str | None
    user_agent: str | None
    content_type: str | None
    authorized: bool  # an Authorization header was present
    status: int  # 0 when no answer was sent
    replayed: bool
    fault: str | None  # drop, hang, p500, p429, lock_timeout, rate_limit or revoked
    request_id: str | None = None
    done_at: float = 0.0  # time.monotonic() when the answer was sent (or the request given up)


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


@dataclass(frozen=True, slots=True)
class _Saved:
    signature: Signature
    answer: _Answer
    request_id: str


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


class Sandbox:
    """The sandbox's state (journal, idempotency cache, accounts) and its aiohttp app."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._lock = threading.Lock()  # the journal is read from other threads
        self._journal: list[JournalEntry] = []
        self._rng = random.Random(self.config.seed)
        self._saved: dict[str, _Saved] = {}
        self._in_flight: dict[str, Signature] = {}
        self._disconnected: set[str] = set()
        self._answered = 0  # API calls answered, for revoke_after
        self._window: deque[float] = deque()  # arrival times of requests the limiter let in
        self._deliveries: set[asyncio.Task[None]] = set()  # webhook events on their way
        self._webhook_session: ClientSession | None = None
        self.events_delivered = 0
        self.events_failed = 0

    def configure(self, **changes: Any) -> SandboxConfig:
        """Replace some knobs (SandboxConfig field names) while serving; returns the new config."""
        self.config = dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self._rng.seed(self.config.seed)
        return self.config

    def reset(self) -> None:
        """Forget every request: journal, idempotency cache, accounts, counters, rate window."""
        # Fresh objects rather than clear(): a handler running on the server thread keeps its own.
        with self._lock:
            self._journal = []
        self._saved, self._in_flight, self._disconnected = {}, {}, set()
        self._answered = 0
        self._window = deque()
        self._rng.seed(self.config.seed)

    def journal_snapshot(self) -> list[JournalEntry]:
        """A copy of the journal, in completion order (sort by `at` for arrival order)."""
        with self._lock:
            return list(self._journal)

    def disconnected_accounts(self) -> frozenset[str]:
        """Accounts that a disconnect call has disconnected since the last reset."""
        return frozenset(self._disconnected)

    def make_app(self) -> web.Application:
        """The aiohttp application: the API routes, control routes and a Stripe-style 404."""
        app = web.Application(middlewares=[self._journal_middleware])
        app.router.add_get("/_sandbox/journal", self._get_journal)
        app.router.add_post("/_sandbox/config", self._post_config)
        app.router.add_post("/_sandbox/reset", self._post_reset)
        app.router.add_post(DISCONNECT_ROUTE, self._disconnect)
        app.router.add_get(LIST_ROUTE, self._list)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        app.on_cleanup.append(self._close_webhooks)
        return app

    async def run(
        self, *, host: str = "127.0.0.1", port: int = 0, ready: Callable[[str], None] | None = None
    ) -> None:
        """Serve this sandbox until cancelled; `ready` gets the bound URL once listening."""
        await serve_app(
            self.make_app(), host=host, port=port, shutdown_timeout=_SHUTDOWN_GRACE, ready=ready
        )

    @web.middleware
    async def _journal_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path in _CONTROL_PATHS:
            return await handler(request)
        note = _Note(time.monotonic(), _request_id())
        request[_NOTE] = note
        status = 0
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own refusals, e.g. 413 for a huge body
            status = exc.status
            raise
        else:
            status = 0 if note.dropped else response.status
            return response
        finally:
            if not note.journaled:
                self._record(request, note, status)

    def _record(self, request: web.Request, note: _Note, status: int) -> None:
        note.journaled = True
        headers = request.headers
        entry = JournalEntry(
            at=note.at,
            method=request.method,
            path=request.raw_path,
            account_id=request.match_info.get("account"),
            idempotency_key=headers.get("Idempotency-Key"),
            stripe_account=headers.get("Stripe-Account"),
            stripe_version=headers.get("Stripe-Version"),
            user_agent=headers.get("User-Agent"),
            content_type=headers.get("Content-Type"),
            authorized="Authorization" in headers,
            status=status,
            replayed=note.replayed,
            fault=note.fault,
            request_id=note.request_id,
            done_at=time.monotonic(),
        )
        with self._lock:
            self._journal.append(entry)

    async def _disconnect(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_api(request, self._execute)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_api(request, self._list_page)

    async def _serve_api(
        self,
        request: web.Request,
        execute: Callable[[web.Request, SandboxConfig, _Note], Awaitable[_Answer]],
    ) -> web.StreamResponse:
        """Auth, faults, rate limit and latency, shared by every API route, around `execute`."""
        note = request[_NOTE]
        config = self.config  # one view of the knobs for the whole request
        answer = self._authenticate(request, config, note)
        if answer is None:
            note.fault = fault = self._draw_fault(config)
            if fault in ("drop", "hang"):
                note.dropped = True
                if fault == "hang":
                    self._record(request, note, 0)  # now: the answer may never come
                    await asyncio.sleep(config.hang_seconds)
                else:
                    await self._delay(config)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=499)  # aiohttp fails to write it, quietly
            if fault is not None:
                answer = _FAULTS[fault]
            elif not self._admit(config, note.at):
                note.fault = "rate_limit"
                answer = _FAULTS["rate_limit"]
        if answer is None:
            answer = await execute(request, config, note)  # it waits out the latency itself
        else:
            await self._delay(config)
        self._answered += 1
        return _respond(request, note, answer)

    def _authenticate(
        self, request: web.Request, config: SandboxConfig, note: _Note
    ) -> _Answer | None:
        header = request.headers.get("Authorization")
        if header is None:
            return _NO_KEY
        key = _key_from(header)
        match = _KEY_PATTERN.fullmatch(key)
        if match is None or (config.api_key is not None and key != config.api_key):
            return _invalid_key(key)
        if config.revoke_after is not None and self._answered >= config.revoke_after:
            note.fault = "revoked"
            return _invalid_key(key)
        note.mode = match[1]
        return None

    def _draw_fault(self, config: SandboxConfig) -> str | None:
        faults = (
            ("drop", config.p_drop),
            ("hang", config.p_hang),
            ("p500", config.p500),
            ("p429", config.p429),
            ("lock_timeout", config.p_lock_timeout),
        )
        if not any(p for _, p in faults):
            return None
        # One draw per request keeps a seeded run's fault sequence easy to reason about.
        draw = self._rng.random()
        for fault, p in faults:
            if draw < p:
                return fault
            draw -= p
        return None

    def _admit(self, config: SandboxConfig, now: float) -> bool:
        if config.rate_limit is None:
            return True
        window = self._window
        while window and window[0] + 1.0 <= now:  # the same half-open window as max_in_window
            window.popleft()
        if len(window) + 1 > config.rate_limit:
            return False
        window.append(now)
        return True

    async def _delay(self, config: SandboxConfig) -> None:
        latency, jitter = config.latency_ms, config.jitter_ms
        if jitter:
            latency = max(0.0, self._rng.uniform(latency - jitter, latency + jitter))
        if latency > 0:
            await asyncio.sleep(latency / 1000)

    async def _execute(self, request: web.Request, config: SandboxConfig, note: _Note) -> _Answer:
        account = request.match_info["account"]
        params, early = _parse_form(request, await request.read())
        key = request.headers.get("Idempotency-Key")
        # Stripe scopes idempotency keys to the account acted on (and the key's mode).
        slot = f"{request.headers.get('Stripe-Account', '')}|{key}"
        signature = (request.raw_path, params)
        if early is None and key is not None:
            early = self._check_key(key, slot, signature, note)
        if early is not None or key is None:
            await self._delay(config)
            return early if early is not None else self._lookup(account, config, note)
        in_flight = self._in_flight
        in_flight[slot] = signature
        try:
            await self._delay(config)
            answer = self._lookup(account, config, note)
            # Stripe saves the first answer once endpoint execution began: 200 and 404 here.
            self._saved[slot] = _Saved(signature, answer, note.request_id)
            return answer
        finally:
            in_flight.pop(slot, None)

    def _check_key(self, key: str, slot: str, signature: Signature, note: _Note) -> _Answer | None:
        saved = self._saved.get(slot)
        first = saved.signature if saved is not None else self._in_flight.get(slot)
        if first is None:
            return None
        if first != signature:
            differs = (
                f"for the same endpoint they were first used for ('{first[0]}' vs '{signature[0]}')"
                if first[0] != signature[0]
                else "with the same parameters they were first used with"
            )
            return _error(
                400,
                f"Keys for idempotent requests can only be used {differs}. Try using a key other "
                f"than '{key}' if you meant to execute a different request.",
                kind="idempotency_error",
            )
        if saved is None:
            return _error(
                409,
                "There is currently another in-progress request using this Idempotent Key (that "
                "probably means you submitted twice, and the other request is still going "
                f"through): {key}. Please try again later.",
                kind="idempotency_error",
                code="idempotency_key_in_use",
            )
        note.replayed = True
        replay = (("Idempotent-Replayed", "true"), ("Original-Request", saved.request_id))
        return saved.answer._replace(headers=saved.answer.headers + replay)

    def _lookup(self, account: str, config: SandboxConfig, note: _Note) -> _Answer:
        exists = _exists(account, config)
        account_mode = "live" if config.livemode_accounts else "test"
        if not exists or note.mode != account_mode:
            hint = (
                f"; a similar object exists in {account_mode} mode, but a {note.mode} mode key "
                "was used to make this request."
            )
            return _error(
                404,
                f"No such financial connections account: '{account}'{hint if exists else ''}",
                code="resource_missing",
                param="account",
            )
        newly = account not in self._disconnected and not _born_disconnected(account, config)
        self._disconnected.add(account)
        body = _account_json(account, livemode=config.livemode_accounts)
        if newly and config.webhook_url and config.webhook_secret:
            # Stripe emits the event when the status changes, after answering the request.
            task = asyncio.get_running_loop().create_task(
                self._deliver(config.webhook_url, config.webhook_secret, body, note)
            )
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return _Answer(200, body.encode())

    async def _list_page(self, request: web.Request, config: SandboxConfig, note: _Note) -> _Answer:
        """One page of a customer's accounts, in ID order, as Stripe's list envelope."""
        await self._delay(config)
        query = request.rel_url.query
        for name in query:
            if name in _UNSUPPORTED_LIST_PARAMS:
                message = f"The sandbox does not support {name}; list by account_holder[customer]."
                return _error(400, message, param=name)
            if name not in _LIST_PARAMS and not _EXPAND_PARAM.fullmatch(name):
                message = f"Received unknown parameter: {name}"
                return _error(400, message, code="parameter_unknown", param=name)
        customer = query.get("account_holder[customer]", "")
        if not customer:
            return _error(
                400,
                "Missing required param: account_holder[customer].",
                code="parameter_missing",
                param="account_holder",
            )
        raw_limit = query.get("limit", "10")
        limit = int(raw_limit) if re.fullmatch(r"[0-9]{1,4}", raw_limit) else 0
        if not 1 <= limit <= 100:
            message = f"Invalid limit: must be an integer between 1 and 100, not '{raw_limit}'."
            return _error(400, message, code="parameter_invalid_integer", param="limit")
        account_mode = "live" if config.livemode_accounts else "test"
        exists = bool(_CUSTOMER_PATTERN.fullmatch(customer)) and customer not in config.missing
        if not exists or note.mode != account_mode:
            hint = (
                f"; a similar object exists in {account_mode} mode, but a {note.mode} mode key "
                "was used to make this request."
            )
            return _error(
                404,
                f"No such customer: '{customer}'{hint if exists else ''}",
                code="resource_missing",
                param="account_holder[customer]",
            )
        prefix = f"fca_{customer[4:]}a"
        start = 0
        if (after := query.get("starting_after")) is not None:
            index = _account_index(after, prefix, config)
            if index is None:
                return _error(
                    400,
                    f"No such financial connections account: '{after}'",
                    code="resource_missing",
                    param="starting_after",
                )
            start = index + 1
        page = list(itertools.islice(_customer_accounts(prefix, start, config), limit + 1))
        data = ", ".join(
            _account_json(
                account,
                livemode=config.livemode_accounts,
                customer=customer,
                status="disconnected"
                if account in self._disconnected or _born_disconnected(account, config)
                else "active",
            )
            for account in page[:limit]
        )
        has_more = "true" if len(page) > limit else "false"
        body = (
            f'{{"object": "list", "data": [{data}], "has_more": {has_more}, "url": "{LIST_ROUTE}"}}'
        )
        return _Answer(200, body.encode())

    async def _deliver(self, url: str, secret: str, account: str, note: _Note) -> None:
        """POST one signed financial_connections.account.disconnected event, retrying a little."""
        from bulkdisconnect.webhook import sign

        event = {
            "id": f"evt_{_request_id()[4:]}",
            "object": "event",
            "api_version": DEFAULT_STRIPE_VERSION,
            "created": int(time.time()),
            "livemode": self.config.livemode_accounts,
            "pending_webhooks": 1,
            "request": {"id": note.request_id, "idempotency_key": None},
            "type": "financial_connections.account.disconnected",
            "data": {"object": json.loads(account)},
        }
        payload = json.dumps(event).encode()
        if self._webhook_session is None:
            self._webhook_session = ClientSession()
        for attempt in range(3):
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": sign(payload, secret),
            }
            try:
                async with self._webhook_session.post(url, data=payload, headers=headers) as r:
                    if r.status < 300:
                        self.events_delivered += 1
                        return
            except (ClientError, OSError):
                pass
            await asyncio.sleep(0.2 * 2**attempt)
        self.events_failed += 1

    async def _close_webhooks(self, _app: web.Application) -> None:
        for task in list(self._deliveries):
            task.cancel()
        if self._webhook_session is not None:
            await self._webhook_session.close()
            self._webhook_session = None

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        note = request.get(_NOTE) or _Note(time.monotonic(), _request_id())
        await self._delay(self.config)
        message = (
            f"Unrecognized request URL ({request.method}: {request.path}). Please see "
            "https://stripe.com/docs or we can help at https://support.stripe.com/."
        )
        return _respond(request, note, _error(404, message))

    async def _get_journal(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([dataclasses.asdict(e) for e in self.journal_snapshot()])

    async def _post_config(self, request: web.Request) -> web.StreamResponse:
        try:
            config = self.configure(**_config_changes(await request.json()))
        except (ValueError, TypeError) as exc:
            body = {"error": {"message": str(exc), "type": "invalid_request_error"}}
            return web.json_response(body, status=400)
        return web.json_response(
            {k: sorted(v) if isinstance(v, frozenset) else v for k, v in vars(config).items()}
        )

    async def _post_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"reset": True})


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


def _config_changes(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError("expected a JSON object of SandboxConfig fields")
    names = {f.name for f in dataclasses.fields(SandboxConfig)}
    if unknown := raw.keys() - names:
        raise ValueError(f"unknown sandbox settings {sorted(unknown)}; known: {sorted(names)}")
    changes = dict(raw)
    for name in ("accounts", "missing"):
        if changes.get(name) is not None:
            if not isinstance(changes[name], list):
                raise TypeError(f"{name} must be a list of account IDs")
            changes[name] = frozenset(map(str, changes[name]))
    return changes


async def serve(
    config: SandboxConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve a fresh sandbox until cancelled; `ready` gets the bound URL once listening."""
    await Sandbox(config).run(host=host, port=port, ready=ready)


class SandboxThread:
    """A sandbox on its own event loop in a daemon thread, as a context manager."""

    def __init__(
        self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.sandbox = Sandbox(config)
        self.url = ""
        self._address = (host, port)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._main, name="sandbox", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("the sandbox did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the sandbox did not start: {self._error}") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join()

    def _main(self) -> None:
        try:
            with contextlib.suppress(asyncio.CancelledError):
                asyncio.run(self._serve())
        except Exception as exc:  # noqa: BLE001 - handed to the thread waiting in __enter__
            self._error = exc
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        host, port = self._address
        await self.sandbox.run(host=host, port=port, ready=self._ready)

    def _ready(self, url: str) -> None:
        self.url = url
        self._started.set()


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most `times` in any half-open window [t, t + window): the rate a server saw."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] + window <= t:
            start += 1
        best = max(best, end - start + 1)
    return best


def max_concurrent(journal: Iterable[JournalEntry]) -> int:
    """The most requests the server was working on at one moment."""
    events = sorted(
        [(e.at, 1) for e in journal] + [(e.done_at, -1) for e in journal],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    busy = peak = 0
    for _, step in events:
        busy += step
        peak = max(peak, busy)
    return peak


def account_calls(journal: Iterable[JournalEntry]) -> Counter[str]:
    """How many disconnect requests reached the sandbox for each account ID."""
    return Counter(e.account_id for e in journal if e.account_id is not None)


def load_account_ids(path: str | Path) -> frozenset[str]:
    """Account IDs from a file, one a line; blank lines and `#` comments are skipped."""
    with Path(path).open(encoding="utf-8") as lines:
        return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))
