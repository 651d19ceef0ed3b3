"""Events as Stripe keeps them after a change of status: listed by GET /v1/events, and sent
signed to a webhook URL. One builder makes both, so the list and the webhook agree."""

from __future__ import annotations

import asyncio
import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from aiohttp import ClientError, ClientSession
from multidict import MultiMapping

from bulkdisconnect.sandbox.wire import (
    DEFAULT_STRIPE_VERSION,
    EVENTS_ROUTE,
    _account_json,
    _Answer,
    _error,
    _holder_of,
    _limit,
    _list_body,
    _object_id,
    _unknown_param,
)

DISCONNECTED = "financial_connections.account.disconnected"
REACTIVATED = "financial_connections.account.reactivated"
DELIVERY_ATTEMPTS = 10
RETENTION_SECONDS = 30 * 86_400  # Stripe lists the events of the last 30 days
_EVENT_PARAMS = frozenset(
    {
        "type",
        "created",
        "created[gt]",
        "created[gte]",
        "created[lt]",
        "created[lte]",
        "limit",
        "starting_after",
        "ending_before",
    }
)
_TYPES_PARAM = re.compile(r"types\[\d*\]")  # types[]=… or, as the SDKs send it, types[0]=…
_MAX_TYPES = 20
_INTEGER = re.compile(r"-?[0-9]{1,12}")


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event of the log: what GET /v1/events filters on and what its JSON is made of (kept
    as fields, rendered when listed or sent: a million events stay a few hundred MB)."""

    id: str
    type: str
    created: int  # unix time, as in the event
    visible_at: float  # the sandbox's clock from which GET /v1/events lists it
    account_id: str  # data.object.id
    status: str  # data.object.status: the account as the change left it
    livemode: bool
    stripe_account: str  # "" = the platform's own event
    request_id: str | None
    idempotency_key: str | None
    pending_webhooks: int

    @property
    def body(self) -> str:
        """The event as JSON, the same each time."""
        return event_json(
            event_id=self.id,
            kind=self.type,
            created=self.created,
            account_json=_account_json(
                self.account_id,
                livemode=self.livemode,
                status=self.status,
                holder=_holder_of(self.account_id),
            ),
            livemode=self.livemode,
            request_id=self.request_id,
            idempotency_key=self.idempotency_key,
            stripe_account=self.stripe_account,
            pending_webhooks=self.pending_webhooks,
        )


def event_json(
    *,
    event_id: str,
    kind: str,
    created: int,
    account_json: str,
    livemode: bool,
    request_id: str | None,
    idempotency_key: str | None,
    stripe_account: str,
    pending_webhooks: int,
) -> str:
    """An event as Stripe renders it (spec `event`) around an account object's JSON; `account`
    only for a connected account's event ("" = the platform's)."""
    head: dict[str, object] = {"id": event_id, "object": "event"}
    if stripe_account:
        head["account"] = stripe_account
    head |= {"api_version": DEFAULT_STRIPE_VERSION, "created": created}
    tail = {
        "livemode": livemode,
        "pending_webhooks": pending_webhooks,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": kind,
    }
    # Spliced rather than dumped whole: the account object is already JSON.
    return f'{json.dumps(head)[:-1]}, "data": {{"object": {account_json}}}, {json.dumps(tail)[1:]}'


@dataclass(slots=True)
class _Stream:
    """One mode's and Stripe account's events, oldest first, with what paging looks up."""

    events: list[StoredEvent] = field(default_factory=list)
    created: list[int] = field(default_factory=list)  # never decreasing: bisected
    index: dict[str, int] = field(default_factory=dict)


class EventLog:
    """The events of each Stripe account ("" = the platform) in each mode, as Stripe keeps them."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], _Stream] = {}

    def record(
        self,
        *,
        kind: str,
        mode: str,
        stripe_account: str,
        created: int,
        visible_at: float,
        account_id: str,
        status: str,
        request_id: str | None,
        idempotency_key: str | None,
        pending_webhooks: int,
    ) -> StoredEvent:
        """Build an event (`evt_` and 24 characters, as Stripe's IDs) and keep it."""
        stream = self._streams.setdefault((mode, stripe_account), _Stream())
        if stream.created:  # a clock that stepped back must not unsort the list
            created = max(created, stream.created[-1])
        event = StoredEvent(
            id=_object_id("evt_", 24),
            type=kind,
            created=created,
            visible_at=visible_at,
            account_id=account_id,
            status=status,
            livemode=mode == "live",
            stripe_account=stripe_account,
            request_id=request_id,
            idempotency_key=idempotency_key,
            pending_webhooks=pending_webhooks,
        )
        stream.index[event.id] = len(stream.events)
        stream.events.append(event)
        stream.created.append(created)
        return event

    def events(self, stripe_account: str = "", mode: str = "test") -> list[StoredEvent]:
        """A copy of a Stripe account's events, oldest first, listed yet or not."""
        stream = self._streams.get((mode, stripe_account))
        return list(stream.events) if stream is not None else []

    def page(
        self,
        query: MultiMapping[str],
        *,
        mode: str,
        stripe_account: str,
        now: float,
        wall: float,
    ) -> _Answer:
        """GET /v1/events: one page, newest first, of the events visible at clock `now` (unix
        time `wall`) that the query's type, created and cursor parameters select."""
        wanted = _event_query(query, int(wall) - RETENTION_SECONDS)
        if isinstance(wanted, _Answer):
            return wanted
        stream = self._streams.get((mode, stripe_account), _Stream())
        low = bisect_left(stream.created, wanted.low)
        high = bisect_right(stream.created, wanted.high)
        for param, cursor in (("starting_after", wanted.after), ("ending_before", wanted.before)):
            if cursor is None:
                continue
            at = stream.index.get(cursor)
            if at is None:
                return _error(
                    400, f"No such event: '{cursor}'", code="resource_missing", param=param
                )
            if param == "starting_after":
                high = min(high, at)
            else:
                low = max(low, at + 1)
        newer = wanted.before is not None  # a page toward newer events, still newest first
        span = range(low, high) if newer else range(high - 1, low - 1, -1)
        picked: list[StoredEvent] = []
        for at in span:
            event = stream.events[at]
            if event.visible_at <= now and wanted.types(event.type):
                picked.append(event)
                if len(picked) > wanted.limit:
                    break
        page = picked[: wanted.limit]
        if newer:
            page.reverse()
        more = len(picked) > wanted.limit
        return _Answer(200, _list_body((e.body for e in page), more, EVENTS_ROUTE))


class _EventQuery(NamedTuple):
    """What a GET /v1/events query asks for; `low` and `high` bound `created`, inclusive."""

    types: Callable[[str], bool]
    limit: int
    low: int
    high: int
    after: str | None
    before: str | None


def _event_query(query: MultiMapping[str], oldest: int) -> _EventQuery | _Answer:
    """The query's parameters, or the 400 for the first bad one; `created` from `oldest` on."""
    types = [value for name, value in query.items() if _TYPES_PARAM.fullmatch(name)]
    names = [name for name in query if not _TYPES_PARAM.fullmatch(name)]
    bad = _unknown_param(names, _EVENT_PARAMS, frozenset({"delivery_success"}))
    if bad is not None:
        return bad
    if "type" in query and types:
        message = "You may only specify one of these parameters: type, types."
        return _error(400, message, param="type")
    if len(types) > _MAX_TYPES:
        message = f"You may pass at most {_MAX_TYPES} types, not {len(types)}."
        return _error(400, message, param="types")
    if "starting_after" in query and "ending_before" in query:
        message = "You may only specify one of these parameters: ending_before, starting_after."
        return _error(400, message, param="starting_after")
    limit = _limit(query)
    if isinstance(limit, _Answer):
        return limit
    bounds = _created_bounds(query, oldest)
    if isinstance(bounds, _Answer):
        return bounds
    return _EventQuery(
        _matcher(types or query.getall("type", [])),
        limit,
        *bounds,
        query.get("starting_after"),
        query.get("ending_before"),
    )


def _created_bounds(query: MultiMapping[str], oldest: int) -> tuple[int, int] | _Answer:
    """The inclusive range of `created` that created, created[gt|gte|lt|lte] allow."""
    low, high = oldest, 2**63
    for name in ("created", "created[gt]", "created[gte]", "created[lt]", "created[lte]"):
        if (raw := query.get(name)) is None:
            continue
        if not _INTEGER.fullmatch(raw):
            return _error(
                400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
            )
        value = int(raw)
        if name in ("created", "created[gte]", "created[gt]"):
            low = max(low, value + (name == "created[gt]"))
        if name in ("created", "created[lte]", "created[lt]"):
            high = min(high, value - (name == "created[lt]"))
    return low, high


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether an event type is one of `patterns` (`*` any, `a.b.*` any under a.b.; none: all)."""
    exact: set[str] = set()
    prefixes: list[str] = []
    for pattern in patterns:
        if pattern == "*":
            return lambda _kind: True
        if pattern.endswith(".*"):
            prefixes.append(pattern[:-1])
        else:
            exact.add(pattern)
    if not exact and not prefixes:
        return lambda _kind: True
    return lambda kind: kind in exact or any(kind.startswith(p) for p in prefixes)


class EventSender:
    """Delivers events to a webhook URL in the background, retried as Stripe does (briefly)."""

    def __init__(self) -> None:
        self._deliveries: set[asyncio.Task[None]] = set()
        self._session: ClientSession | None = None
        self.delivered = 0
        self.failed = 0

    def send(self, url: str, secret: str, payload: bytes) -> None:
        """Queue one event (its JSON) for delivery; called from a request handler."""
        task = asyncio.get_running_loop().create_task(self._deliver(url, secret, payload))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, secret: str, payload: bytes) -> None:
        from bulkdisconnect.webhook import sign

        if self._session is None:
            self._session = ClientSession()
        # Stripe retries a failed delivery for days with exponential backoff; here for about
        # half a minute, enough for a receiver started after its job was planned.
        for attempt in range(DELIVERY_ATTEMPTS):
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": sign(payload, secret),
            }
            try:
                async with self._session.post(url, data=payload, headers=headers) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return
            except (ClientError, OSError):
                pass
            await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
        self.failed += 1

    async def aclose(self) -> None:
        """Drop what is still on its way and close the HTTP session."""
        for task in list(self._deliveries):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
