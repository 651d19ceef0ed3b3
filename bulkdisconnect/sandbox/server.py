"""The sandbox server: state, routes, the fault pipeline, and running it in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import re
import signal
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web
from aiohttp.typedefs import Handler

from bulkdisconnect.model import CUSTOMER_ID_PATTERN
from bulkdisconnect.sandbox.config import (
    CONNECTED_ACCOUNT_PATTERN,
    SandboxConfig,
    _config_changes,
)
from bulkdisconnect.sandbox.events import EventSender
from bulkdisconnect.sandbox.journal import JournalEntry
from bulkdisconnect.sandbox.wire import (
    _CONTROL_PATHS,
    _EXPAND_PARAM,
    _FAULTS,
    _KEY_PATTERN,
    _LIST_PARAMS,
    _NO_KEY,
    _NOTE,
    _SHUTDOWN_GRACE,
    _UNSUPPORTED_LIST_PARAMS,
    DISCONNECT_ROUTE,
    LIST_ROUTE,
    Signature,
    _account_index,
    _account_json,
    _Answer,
    _born_disconnected,
    _error,
    _exists,
    _holder_accounts,
    _holder_prefix,
    _invalid_key,
    _key_from,
    _no_access,
    _Note,
    _parse_form,
    _request_id,
    _respond,
)
from bulkdisconnect.serving import serve_app


@dataclass(frozen=True, slots=True)
class _Saved:
    signature: Signature
    answer: _Answer
    request_id: str


class Sandbox:
    """The sandbox's state (journal, idempotency cache, accounts) and its aiohttp app."""

    def __init__(
        self, config: SandboxConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._clock = clock  # arrival times, for the journal and the rate limit; tests fake it
        self._lock = threading.Lock()  # the journal is read from other threads
        self._journal: list[JournalEntry] = []
        self._rng = random.Random(self.config.seed)
        self._saved: dict[str, _Saved] = {}
        self._in_flight: dict[str, Signature] = {}
        self._disconnected: set[str] = set()
        self._answered = 0  # API calls answered, for revoke_after
        # Per Stripe account ("" = the platform): arrival times of requests the limiter let in.
        self._windows: dict[str, deque[float]] = {}
        self.events = EventSender()  # webhook events, when a webhook_url is configured

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
        self._windows = {}
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
            elif not self._admit(config, note.at, request.headers.get("Stripe-Account", "")):
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
        account = request.headers.get("Stripe-Account")
        if account is not None and account in config.revoked_accounts:
            note.fault = "account_invalid"
            return _no_access(key, account)
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
        # Stripe scopes idempotency keys to the account acted on (and the key's mode).
        slot = f"{owner}|{key}"
        signature = (request.raw_path, params)
        if early is None and key is not None:
            early = self._check_key(key, slot, signature, note)
        if early is not None or key is None:
            await self._delay(config)
            return early if early is not None else self._lookup(account, owner, config, note)
        in_flight = self._in_flight
        in_flight[slot] = signature
        try:
            await self._delay(config)
            answer = self._lookup(account, owner, config, note)
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

    def _lookup(self, account: str, owner: str, config: SandboxConfig, note: _Note) -> _Answer:
        """Disconnect `account` for Stripe account `owner`; another's account is missing to it."""
        exists = _exists(account, config, owner)
        missing = _missing("financial connections account", account, exists, config, note)
        if missing is not None:
            return missing
        newly = account not in self._disconnected and not _born_disconnected(account, config)
        self._disconnected.add(account)
        body = _account_json(account, livemode=config.livemode_accounts)
        if newly and config.webhook_url and config.webhook_secret:
            # Stripe emits the event when the status changes, after answering the request.
            self.events.send_disconnected(
                config.webhook_url,
                config.webhook_secret,
                body,
                livemode=config.livemode_accounts,
                request_id=note.request_id,
            )
        return _Answer(200, body.encode())

    async def _list_page(self, request: web.Request, config: SandboxConfig, note: _Note) -> _Answer:
        """One page of a holder's accounts (a customer's or a connected account's), in ID order,
        as Stripe's list envelope; only those the requesting Stripe account owns."""
        await self._delay(config)
        query = request.rel_url.query
        for name in query:
            if name in _UNSUPPORTED_LIST_PARAMS:
                message = (
                    f"The sandbox does not support {name}; list by account_holder[customer] "
                    "or account_holder[account]."
                )
                return _error(400, message, param=name)
            if name not in _LIST_PARAMS and not _EXPAND_PARAM.fullmatch(name):
                message = f"Received unknown parameter: {name}"
                return _error(400, message, code="parameter_unknown", param=name)
        customer = query.get("account_holder[customer]", "")
        holder_account = query.get("account_holder[account]", "")
        if customer and holder_account:  # "mutually exclusive" (stripe/openapi)
            message = (
                "You may only specify one of these parameters: account_holder[account], "
                "account_holder[customer]."
            )
            return _error(400, message, param="account_holder")
        if not customer and not holder_account:
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
        if customer:
            holder, kind, param = customer, "customer", "account_holder[customer]"
            well_formed = CUSTOMER_ID_PATTERN.fullmatch(customer)
        else:
            holder, kind, param = holder_account, "account", "account_holder[account]"
            well_formed = CONNECTED_ACCOUNT_PATTERN.fullmatch(holder_account)
        exists = well_formed is not None and holder not in config.missing
        missing = _missing(kind, holder, exists, config, note, param=param)
        if missing is not None:
            return missing
        owner = request.headers.get("Stripe-Account", "")
        prefix = _holder_prefix(holder)
        start = 0
        if (after := query.get("starting_after")) is not None:
            index = _account_index(after, prefix, config, owner)
            if index is None:
                return _error(
                    400,
                    f"No such financial connections account: '{after}'",
                    code="resource_missing",
                    param="starting_after",
                )
            start = index + 1
        page = list(itertools.islice(_holder_accounts(prefix, start, config, owner), limit + 1))
        data = ", ".join(
            _account_json(
                account,
                livemode=config.livemode_accounts,
                holder=holder,
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


async def serve(
    config: SandboxConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[str], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (),
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serve a fresh sandbox until cancelled or signalled; `ready` gets the bound URL."""
    await Sandbox(config).run(host=host, port=port, ready=ready, stop_signals=stop_signals, tls=tls)


class SandboxThread:
    """A sandbox on its own event loop in a daemon thread, as a context manager."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sandbox = Sandbox(config, clock=clock)
        self.url = ""
        self._address = (host, port)
        self._tls = tls
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
        await self.sandbox.run(host=host, port=port, ready=self._ready, tls=self._tls)

    def _ready(self, url: str) -> None:
        self.url = url
        self._started.set()


def _as_json(value: object) -> object:
    """A knob's value as JSON takes it: sets as sorted lists, mappings as objects."""
    if isinstance(value, frozenset):
        return sorted(value)
    return dict(value) if isinstance(value, Mapping) else value


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
