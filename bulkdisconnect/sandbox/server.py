"""The sandbox server: state, routes and the fault pipeline (running.py runs it)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
import signal
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping

from bulkdisconnect.sandbox.accounts import AccountStates
from bulkdisconnect.sandbox.config import SandboxConfig, _config_changes, drawn
from bulkdisconnect.sandbox.events import DISCONNECTED, REACTIVATED, EventLog, EventSender
from bulkdisconnect.sandbox.idempotency import IdempotencyCache
from bulkdisconnect.sandbox.journal import JournalEntry
from bulkdisconnect.sandbox.wire import (
    _CONTROL_PATHS,
    _FAULTS,
    _KEY_PATTERN,
    _NO_KEY,
    _NOTE,
    _SAVED_500,
    _SHUTDOWN_GRACE,
    ACCOUNT_ROUTE,
    DISCONNECT_ROUTE,
    EVENTS_ROUTE,
    LIST_ROUTE,
    STRIPE_VERSIONS,
    _Answer,
    _bad_version,
    _error,
    _exists,
    _expired_key,
    _invalid_key,
    _key_from,
    _missing,
    _no_access,
    _Note,
    _parse_form,
    _request_id,
    _respond,
    _with_log_url,
)
from bulkdisconnect.serving import serve_app


class Sandbox:
    """The sandbox's state (journal, idempotency cache, accounts, events) and its aiohttp app."""

    def __init__(
        self, config: SandboxConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._clock = clock  # arrival times, for the journal and the rate limit; tests fake it
        # Unix time at clock() == 0: an event's `created` moves with the clock, fake or not.
        self._epoch = time.time() - clock()
        self._lock = threading.Lock()  # the journal is read from other threads
        self._journal: list[JournalEntry] = []
        self._rng = random.Random(self.config.seed)
        self._keys = IdempotencyCache()
        self.accounts = AccountStates()
        self._answered = 0  # API calls answered, for revoke_after
        # Per Stripe account ("" = the platform): arrival times of requests the limiter let in.
        self._windows: dict[str, deque[float]] = {}
        self.event_log = EventLog()  # what GET /v1/events lists
        self._dropped: set[str] = set()  # accounts whose event event_drop_share swallowed
        self.events = EventSender()  # webhook events, when a webhook_url is configured

    def configure(self, **changes: Any) -> SandboxConfig:
        """Replace some knobs (SandboxConfig field names) while serving; returns the new config."""
        self.config = dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self._rng.seed(self.config.seed)
        return self.config

    def reset(self) -> None:
        """Forget every request: journal, idempotency cache, accounts, events, counters, rate
        window."""
        # Fresh objects rather than clear(): a handler running on the server thread keeps its own.
        with self._lock:
            self._journal = []
        self._keys, self.accounts = IdempotencyCache(), AccountStates()
        self._answered = 0
        self._windows = {}
        self.event_log, self._dropped = EventLog(), set()
        self._rng.seed(self.config.seed)

    def journal_snapshot(self) -> list[JournalEntry]:
        """A copy of the journal, in completion order (sort by `at` for arrival order)."""
        with self._lock:
            return list(self._journal)

    def disconnected_accounts(self) -> frozenset[str]:
        """Accounts that a disconnect call has disconnected since the last reset."""
        return frozenset(self.accounts.disconnected)

    def reactivated_accounts(self) -> frozenset[str]:
        """Disconnected accounts that reactivate_share turned back to active (for now)."""
        return frozenset(self.accounts.reactivated)

    def dropped_events(self) -> frozenset[str]:
        """Accounts whose events event_drop_share kept from being emitted."""
        return frozenset(self._dropped)

    def unix_time(self) -> float:
        """The sandbox's clock as unix time: what an event's `created` says now."""
        return self._epoch + self._clock()

    def make_app(self) -> web.Application:
        """The aiohttp application: the API routes, control routes and a Stripe-style 404."""
        app = web.Application(middlewares=[self._journal_middleware])
        app.router.add_get("/_sandbox/journal", self._get_journal)
        app.router.add_post("/_sandbox/config", self._post_config)
        app.router.add_post("/_sandbox/reset", self._post_reset)
        app.router.add_post(DISCONNECT_ROUTE, self._disconnect)
        app.router.add_get(LIST_ROUTE, self._list)
        app.router.add_get(ACCOUNT_ROUTE, self._retrieve)
        app.router.add_get(EVENTS_ROUTE, self._events)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        app.on_cleanup.append(self._close_events)
        return app

    async def run(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ready: Callable[[str], None] | None = None,
        stop_signals: tuple[signal.Signals, ...] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Serve this sandbox until cancelled or signalled (see `serve_app`); `ready` gets
        the bound URL once listening (https with `tls`)."""
        await serve_app(
            self.make_app(),
            host=host,
            port=port,
            shutdown_timeout=_SHUTDOWN_GRACE,
            ready=ready,
            stop_signals=stop_signals,
            tls=tls,
        )

    @web.middleware
    async def _journal_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path in _CONTROL_PATHS:
            return await handler(request)
        note = _Note(self._clock(), _request_id())
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
            done_at=self._clock(),
        )
        with self._lock:
            self._journal.append(entry)

    async def _disconnect(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_api(request, self._execute)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_api(request, self._read(self.accounts.list_page))

    async def _retrieve(self, request: web.Request) -> web.StreamResponse:
        account = request.match_info["account"]

        def retrieve(
            query: MultiMapping[str], owner: str, config: SandboxConfig, note: _Note
        ) -> _Answer:
            return self.accounts.retrieve(account, query, owner, config, note)

        return await self._serve_api(request, self._read(retrieve))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        def page(
            query: MultiMapping[str], owner: str, _config: SandboxConfig, note: _Note
        ) -> _Answer:
            now = self._clock()
            return self.event_log.page(
                query, mode=note.mode, stripe_account=owner, now=now, wall=self._epoch + now
            )

        return await self._serve_api(request, self._read(page))

    def _read(
        self, answer: Callable[[MultiMapping[str], str, SandboxConfig, _Note], _Answer]
    ) -> Callable[[web.Request, SandboxConfig, _Note], Awaitable[_Answer]]:
        """A GET route's execution: the latency, then `answer` from the query and the owner."""

        async def execute(request: web.Request, config: SandboxConfig, note: _Note) -> _Answer:
            await self._delay(config)
            owner = request.headers.get("Stripe-Account", "")
            return answer(request.rel_url.query, owner, config, note)

        return execute

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
            if fault == "p500_saved" and request.method != "POST":
                note.fault = fault = None  # a read has nothing to execute and save
            if fault is not None and fault != "p500_saved":  # that one executes first
                answer = _FAULTS[fault]
            elif not self._admit(config, note.at, request.headers.get("Stripe-Account", "")):
                note.fault = "rate_limit"
                answer = _FAULTS["rate_limit"]
        if answer is None:
            answer = await execute(request, config, note)  # it waits out the latency itself
        else:
            await self._delay(config)
        self._answered += 1
        return _respond(request, note, self._logged(answer, note))

    def _logged(self, answer: _Answer, note: _Note) -> _Answer:
        """An error to a known key carries its request_log_url, as Stripe's do."""
        if not note.authenticated:
            return answer
        return _with_log_url(answer, note.request_id, note.mode, self._epoch + note.at)

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
            return _expired_key(key)
        note.mode = match[1]
        note.authenticated = True
        account = request.headers.get("Stripe-Account")
        if account is not None and account in config.revoked_accounts:
            note.fault = "account_invalid"
            return _no_access(key, account)
        version = request.headers.get("Stripe-Version")
        if version is not None and version not in STRIPE_VERSIONS:
            return _bad_version(version)
        return None

    def _draw_fault(self, config: SandboxConfig) -> str | None:
        faults = (
            ("drop", config.p_drop),
            ("hang", config.p_hang),
            ("p500", config.p500),
            ("p500_saved", config.p500_saved),
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

    def _admit(self, config: SandboxConfig, now: float, owner: str) -> bool:
        """Whether Stripe account `owner`'s limit lets a request in: Stripe meters each one."""
        limit = config.rate_limits.get(owner, config.rate_limit)
        if limit is None:
            return True
        window = self._windows.get(owner)
        if window is None:
            window = self._windows[owner] = deque()
        while window and window[0] + 1.0 <= now:  # the same half-open window as max_in_window
            window.popleft()
        if len(window) + 1 > limit:
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
        owner = request.headers.get("Stripe-Account", "")
        keys = self._keys  # the cache this request began with, even across a reset
        slot = keys.slot(note.mode, owner, key or "")
        signature = (request.raw_path, params)
        if early is None and key is not None:
            early = keys.check(key, slot, signature, note)
        if early is not None:
            if note.fault == "p500_saved":
                note.fault = None  # refused or replayed: nothing executed to fail after
            await self._delay(config)
            return early
        if key is None:
            await self._delay(config)
            return self._lookup(account, owner, config, note, key)
        with keys.running(slot, signature):
            await self._delay(config)
            answer = self._logged(self._lookup(account, owner, config, note, key), note)
            keys.save(slot, signature, answer, note.request_id)
            return answer

    def _lookup(
        self, account: str, owner: str, config: SandboxConfig, note: _Note, key: str | None
    ) -> _Answer:
        """Disconnect `account` for Stripe account `owner`; another's account is missing to it.
        The p500_saved fault answers 500 once the account is disconnected."""
        exists = _exists(account, config, owner)
        missing = _missing("financial connections account", account, exists, config, note)
        if missing is not None:
            if note.fault == "p500_saved":
                note.fault = None
            return missing
        changed, reactivated = self.accounts.disconnect(account, config)
        # The answer and the event show the account as the disconnect left it.
        body = self.accounts.account_json(account, config, status="disconnected")
        if changed:  # Stripe emits an event when the status changes
            emit = functools.partial(self._emit, account=account, owner=owner, config=config)
            emit(DISCONNECTED, "disconnected", note=note, key=key)
            if reactivated:
                emit(REACTIVATED, "active", note=note, key=None)
        return _SAVED_500 if note.fault == "p500_saved" else _Answer(200, body.encode())

    def _emit(
        self,
        kind: str,
        status: str,
        *,
        account: str,
        owner: str,
        config: SandboxConfig,
        note: _Note,
        key: str | None,
    ) -> None:
        """Record an account's event for GET /v1/events and send a disconnect to the webhook,
        unless event_drop_share swallows it; event_delay_* hold back when it is listed."""
        if drawn(config.event_drop_share, config.seed, "event_drop", account):
            self._dropped.add(account)
            return
        now = self._clock()
        late = drawn(config.event_delay_share, config.seed, "event_delay", account)
        secret = config.webhook_secret
        webhook = config.webhook_url if secret and kind == DISCONNECTED else None
        event = self.event_log.record(
            kind=kind,
            mode=note.mode,
            stripe_account=owner,
            created=int(self._epoch + now),
            visible_at=now + (config.event_delay_seconds if late else 0.0),
            account_id=account,
            status=status,
            request_id=note.request_id if kind == DISCONNECTED else None,
            idempotency_key=key,
            pending_webhooks=1 if webhook else 0,
        )
        if webhook and secret:
            # Sent after the answer is on its way, as Stripe does.
            self.events.send(webhook, secret, event.body.encode())

    async def _close_events(self, _app: web.Application) -> None:
        await self.events.aclose()

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        note = request.get(_NOTE) or _Note(self._clock(), _request_id())
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
        return web.json_response({k: _as_json(v) for k, v in vars(config).items()})

    async def _post_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"reset": True})


def _as_json(value: object) -> object:
    """A knob's value as JSON takes it: sets as sorted lists, mappings as objects."""
    if isinstance(value, frozenset):
        return sorted(value)
    return dict(value) if isinstance(value, Mapping) else value
