"""The only module that knows Stripe's wire format: one call in, one typed answer out."""

from __future__ import annotations

import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import aiohttp
import msgspec
from yarl import URL

from bulkdisconnect import __version__
from bulkdisconnect.model import (
    CUSTOMER_ID_PATTERN,
    is_valid_account_id,
    is_valid_stripe_account,
)

# The API version this tool was written and tested against; --stripe-version overrides it.
STRIPE_VERSION = "2026-10-28.endive"
FORM = "application/x-www-form-urlencoded"
MAX_PAGE = 100  # Stripe's largest list page


class Answer(NamedTuple):
    """What one HTTP attempt produced; `status` is 0 when no HTTP answer arrived.

    A NamedTuple, like ItemResult: one is made per request.
    """

    status: int
    account_status: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    request_id: str | None = None
    should_retry: bool | None = None  # Stripe-Should-Retry, when present
    rate_limited_reason: str | None = None  # Stripe-Rate-Limited-Reason, when present
    transport_error: str | None = None  # exception name for a failed exchange or bad body
    # Why no connection could be made at all (refused, DNS, TLS, connect timeout), naming
    # the host: a run whose requests all end here is misconfigured, not unlucky.
    connect_error: str | None = None

    def described(self) -> dict[str, object]:
        """The answer's fields worth a log line about it."""
        return {
            "status": self.status,
            "code": self.error_code or self.transport_error,
            "message": self.error_message,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class ListAnswer:
    """One page of a holder's accounts: (id, status) pairs, or the `answer` saying why not."""

    answer: Answer
    accounts: list[tuple[str, str]] = field(default_factory=list)
    has_more: bool = False


class ListedEvent(NamedTuple):
    """One event of GET /v1/events: what reconciling a job reads of it."""

    id: str  # evt_...
    type: str
    created: int  # unix seconds, Stripe's clock
    account_id: str | None  # data.object.id, when it is a string


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of events, newest first, or the `answer` saying why not."""

    answer: Answer
    events: list[ListedEvent] = field(default_factory=list)
    has_more: bool = False


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """How to reach Stripe: base URL, credentials, headers, timeouts and pool size."""

    api_base: str
    api_key: str
    stripe_account: str | None
    stripe_version: str | None  # None: STRIPE_VERSION
    connect_timeout: float
    total_timeout: float
    pool_size: int
    proxy: str | None  # --proxy; None: HTTPS_PROXY / HTTP_PROXY unless NO_PROXY says not
    ca_bundle: str | None  # --ca-bundle; None: the system's CAs (or SSL_CERT_FILE)


class StripeClient:
    """Calls the disconnect and list endpoints over an injected aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, settings: ClientSettings) -> None:
        self._session = session
        self._base = URL(settings.api_base.rstrip("/") + "/")
        self._headers = {
            "Authorization": f"Bearer {settings.api_key}",
            "Content-Type": FORM,
            "Stripe-Version": settings.stripe_version or STRIPE_VERSION,
            "User-Agent": f"bulkdisconnect/{__version__} aiohttp/{aiohttp.__version__}",
        }
        if settings.stripe_account:
            self._headers["Stripe-Account"] = settings.stripe_account
        # A GET has no body, so no Content-Type (Stripe's SDKs send it on POSTs only).
        self._get_headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}

    async def disconnect(
        self, account_id: str, idempotency_key: str, stripe_account: str = ""
    ) -> Answer:
        """POST /v1/financial_connections/accounts/{id}/disconnect; never raises for I/O.

        `stripe_account` sends the request on behalf of that connected account ('': the
        settings' own, if any).
        """
        # Defence in depth: the planner already refuses such values, but nothing that is not
        # a plain account ID may ever be put into a URL path.
        if not is_valid_account_id(account_id):
            raise ValueError(f"refusing to call the API with an invalid account ID {account_id!r}")
        # Built from parts already known safe, so yarl neither parses nor quotes it again; and
        # no `data`: aiohttp then sends the same empty body (Content-Length: 0) without
        # building a payload object. Both measured in benchmarks/PROFILE.md.
        url = self._base.with_path(
            f"{self._base.path}v1/financial_connections/accounts/{account_id}/disconnect",
            encoded=True,
        )
        headers = {**self._headers, "Idempotency-Key": idempotency_key}
        if stripe_account:
            if not is_valid_stripe_account(stripe_account):
                raise ValueError(f"refusing to send an invalid Stripe-Account {stripe_account!r}")
            headers["Stripe-Account"] = stripe_account
        try:
            async with self._session.post(url, headers=headers) as response:
                body = await response.read()
                return _answer(response.status, response.headers, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _failed_exchange(exc)

    async def list_accounts(
        self,
        holder: str,
        *,
        stripe_account: str = "",
        starting_after: str | None = None,
        limit: int = MAX_PAGE,
    ) -> ListAnswer:
        """GET /v1/financial_connections/accounts of one account holder; never raises for I/O.

        `holder` is a customer (cus_..., listed by `account_holder[customer]`) or a connected
        account (acct_..., by `account_holder[account]`); `stripe_account` sends the call on
        behalf of that connected account ('': the settings' own, if any), as a platform lists
        the accounts that live on a connected account.
        """
        if CUSTOMER_ID_PATTERN.fullmatch(holder) is not None:
            params = {"account_holder[customer]": holder}
        elif is_valid_stripe_account(holder):
            params = {"account_holder[account]": holder}
        else:
            raise ValueError(f"refusing to list accounts of an invalid account holder {holder!r}")
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        params["limit"] = str(limit)
        if starting_after is not None:
            params["starting_after"] = starting_after
        url = self._base / "v1/financial_connections/accounts"
        answer, body = await self._get(url, stripe_account, params)
        if answer.status != 200 or answer.transport_error is not None:
            return ListAnswer(answer)
        payload = _list_payload(body)
        page = None if payload is None else _page(payload)
        if page is None:  # a 200 that is not a list of accounts: retried like an unreadable body
            return ListAnswer(answer._replace(transport_error="UnreadableBody"))
        return ListAnswer(answer, *page)

    async def list_events(
        self,
        kind: str,
        *,
        created_gte: int,
        stripe_account: str = "",
        starting_after: str | None = None,
        limit: int = MAX_PAGE,
    ) -> EventPage:
        """GET /v1/events of one type created at or after `created_gte` (unix seconds), newest
        first, after the `starting_after` event (toward older ones); never raises for I/O.

        `stripe_account` lists that connected account's events ('': the settings' own).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        params = {"type": kind, "created[gte]": str(created_gte), "limit": str(limit)}
        if starting_after is not None:
            params["starting_after"] = starting_after
        answer, body = await self._get(self._base / "v1/events", stripe_account, params)
        if answer.status != 200 or answer.transport_error is not None:
            return EventPage(answer)
        page = _event_page(body)
        if page is None:  # a 200 that is not a list of events: retried like an unreadable body
            return EventPage(answer._replace(transport_error="UnreadableBody"))
        return EventPage(answer, *page)

    async def retrieve_account(self, account_id: str, stripe_account: str = "") -> Answer:
        """GET /v1/financial_connections/accounts/{id}: the account's status now (in
        `account_status`); never raises for I/O.

        `stripe_account` reads it on behalf of that connected account ('': the settings' own).
        """
        if not is_valid_account_id(account_id):
            raise ValueError(f"refusing to call the API with an invalid account ID {account_id!r}")
        url = self._base.with_path(
            f"{self._base.path}v1/financial_connections/accounts/{account_id}", encoded=True
        )
        answer, _ = await self._get(url, stripe_account)
        return answer

    async def _get(
        self, url: URL, stripe_account: str, params: dict[str, str] | None = None
    ) -> tuple[Answer, bytes]:
        """One GET on behalf of `stripe_account` ('': the settings' own): its answer and body
        (empty when the exchange failed); never raises for I/O."""
        try:
            async with self._session.get(
                url, headers=self._headers_for(stripe_account), params=params
            ) as response:
                body = await response.read()
                return _answer(response.status, response.headers, body), body
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _failed_exchange(exc), b""

    def _headers_for(self, stripe_account: str) -> dict[str, str]:
        """A GET's headers, on behalf of `stripe_account` if given (else the settings')."""
        if not stripe_account:
            return self._get_headers
        if not is_valid_stripe_account(stripe_account):
            raise ValueError(f"refusing to send an invalid Stripe-Account {stripe_account!r}")
        return {**self._get_headers, "Stripe-Account": stripe_account}


def _failed_exchange(exc: BaseException) -> Answer:
    """The answer for an exchange that raised: which exception, and why no connection if so."""
    connect_error = None
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        connect_error = " ".join(str(exc).split()) or type(exc).__name__
    elif isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy refused the tunnel
        connect_error = f"the proxy answered {exc.status} {exc.message} to CONNECT"
    return Answer(status=0, transport_error=type(exc).__name__, connect_error=connect_error)


class _Body(msgspec.Struct):
    """The two fields of an answer body the tool reads; the rest are skipped, not built."""

    status: Any = None  # the account object's status
    error: Any = None  # Stripe's error envelope


_BODY = msgspec.json.Decoder(_Body)


def _answer(status: int, headers: Any, body: bytes) -> Answer:
    """The answer an HTTP exchange amounts to (an unreadable body is a transport error)."""
    request_id = headers.get("Request-Id")
    try:
        decoded: _Body | None = _BODY.decode(body)
    except (msgspec.DecodeError, RecursionError):  # not JSON, or not a JSON object
        decoded = None
    if status == 200 and decoded is not None and decoded.error is None:
        # The common case, kept short: a 200 carries no retry or rate-limit headers to read.
        return Answer(status, _text(decoded.status), request_id=request_id)
    should_retry = headers.get("Stripe-Should-Retry")
    common: dict[str, Any] = {
        "request_id": request_id,
        "should_retry": None if should_retry is None else should_retry == "true",
        "rate_limited_reason": headers.get("Stripe-Rate-Limited-Reason"),
    }
    if decoded is None:
        return Answer(status=status, transport_error="UnreadableBody", **common)
    error = decoded.error
    if isinstance(error, dict):
        return Answer(
            status=status,
            error_type=_text(error.get("type")),
            error_code=_text(error.get("code")),
            error_message=_text(error.get("message")),
            **common,
        )
    return Answer(status=status, account_status=_text(decoded.status), **common)


def _list_payload(body: bytes) -> dict[str, Any] | None:
    """The decoded JSON object of a list page, or None if the body is not one."""
    try:
        payload = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def _page(payload: dict[str, Any]) -> tuple[list[tuple[str, str]], bool] | None:
    """(id, status) pairs and has_more from a list envelope; None if it is not one."""
    data, has_more = payload.get("data"), payload.get("has_more")
    if payload.get("object") != "list" or not isinstance(data, list):
        return None
    if not isinstance(has_more, bool):
        return None
    accounts = []
    for item in data:
        if not isinstance(item, dict):
            return None
        account_id, status = item.get("id"), item.get("status")
        if not isinstance(account_id, str) or not isinstance(status, str):
            return None
        accounts.append((account_id, status))
    return accounts, has_more


class _EventObject(msgspec.Struct):
    id: Any = None


class _EventData(msgspec.Struct):
    object: _EventObject | None = None


class _Event(msgspec.Struct):
    id: Any = None
    type: Any = None
    created: Any = None
    data: _EventData | None = None


class _Events(msgspec.Struct):
    object: Any = None
    data: list[_Event] | None = None
    has_more: Any = None


_EVENTS = msgspec.json.Decoder(_Events)


def _event_page(body: bytes) -> tuple[list[ListedEvent], bool] | None:
    """Events and has_more from a list envelope; None if it is not one (or an event lacks a
    string ID and type, or an integer `created`)."""
    try:
        payload = _EVENTS.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    if payload.object != "list" or payload.data is None or not isinstance(payload.has_more, bool):
        return None
    events = []
    for event in payload.data:
        created = event.created
        if not (isinstance(event.id, str) and event.id and isinstance(event.type, str)):
            return None
        if not isinstance(created, int) or isinstance(created, bool):
            return None
        account = event.data.object if event.data is not None else None
        account_id = account.id if account is not None else None
        events.append(
            ListedEvent(
                event.id, event.type, created, account_id if isinstance(account_id, str) else None
            )
        )
    return events, payload.has_more


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class Reach(Protocol):
    """How a command reaches Stripe: the settings a run and `reconcile`/`verify` share."""

    @property
    def api_base(self) -> str: ...
    @property
    def stripe_account(self) -> str | None: ...
    @property
    def stripe_version(self) -> str | None: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def proxy(self) -> str | None: ...
    @property
    def ca_bundle(self) -> str | None: ...


@asynccontextmanager
async def open_client(reach: Reach, *, api_key: str, pool_size: int) -> AsyncIterator[StripeClient]:
    """A client over one HTTP session (its pool `pool_size` connections) for a command."""
    settings = ClientSettings(
        api_base=reach.api_base,
        api_key=api_key,
        stripe_account=reach.stripe_account,
        stripe_version=reach.stripe_version,
        connect_timeout=reach.connect_timeout,
        total_timeout=reach.timeout,
        pool_size=pool_size,
        proxy=reach.proxy,
        ca_bundle=reach.ca_bundle,
    )
    async with make_session(settings) as session:
        yield StripeClient(session, settings)


def make_session(settings: ClientSettings) -> aiohttp.ClientSession:
    """One session per run, its connection pool sized to the concurrency, through the proxy
    (if any) and trusting the CA bundle (if any). TLS is always verified."""
    # Made per session, not aiohttp's made at import: SSL_CERT_FILE is read now, as OpenSSL
    # reads it for any tool. Verification is always on.
    tls = ssl.create_default_context(cafile=settings.ca_bundle)
    connector = aiohttp.TCPConnector(
        limit=settings.pool_size, limit_per_host=settings.pool_size, ssl=tls
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.total_timeout, sock_connect=settings.connect_timeout
    )
    # Stripe's API keeps no cookies; a real jar would filter and store them on every request.
    # The proxy is found once, here: aiohttp's trust_env would look it (and ~/.netrc) up on
    # every request, and could add a netrc login that clashes with the Bearer key.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        raise_for_status=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        proxy=settings.proxy or environment_proxy(settings.api_base),
    )


def environment_proxy(api_base: str) -> str | None:
    """The proxy HTTPS_PROXY / HTTP_PROXY (or their lower-case forms) name for `api_base`,
    unless NO_PROXY exempts its host: as curl and Stripe's SDKs read them."""
    parts = urllib.parse.urlsplit(api_base)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)
