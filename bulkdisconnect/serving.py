"""Serving an aiohttp application: what the sandbox and the webhook receiver share.

aiohttp on its own keeps a connection that never finishes its headers until its keep-alive
timeout (an hour by default), and accepts connections until the process runs out of
descriptors: a few hundred slow clients then keep every other request out. So `serve_app`
listens through a guard, a protocol factory around aiohttp's own (`web.Server`), which

- closes a new connection whose first request's headers are not in after `header_timeout`;
- serves at most a number of connections derived from RLIMIT_NOFILE (`connection_budget`); at
  that cap a new connection evicts the one that has waited longest without a request in hand
  (new, or idle between requests), and is itself closed only if every other one is busy.

Later requests on a kept-alive connection fall under aiohttp's keep-alive timeout, set to
KEEPALIVE_TIMEOUT. A slow body is the application's to time out where it reads it (webhook.py).
"""

from __future__ import annotations

import asyncio
import errno
import resource
import signal
import ssl
import sys
from collections.abc import Callable

import anyio
import structlog
from aiohttp import web

from bulkdisconnect.errors import UsageError

# What stops a server run from the command line: Ctrl-C, or the SIGTERM of a scheduler.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A new connection must deliver its first request's headers within this. Clients of these
# servers (Stripe, a proxy, our own runs) send them at once; uvicorn, for one, gives a
# connection 5 s without a request (timeout_keep_alive).
HEADER_TIMEOUT = 5.0  # seconds
# Idle between requests (aiohttp's `web.run_app` default): above the 60 s idle timeout of common
# load balancers, so that they close an idle connection rather than race a request against us.
KEEPALIVE_TIMEOUT = 75.0  # seconds
# Each costs a descriptor and a few tens of KiB; far above what Stripe's deliveries or a
# run's connection pool need.
MAX_CONNECTIONS = 1024
# Descriptors the process holds besides connections: stdio, the event loop's selector and
# wake-up pipe, the listening socket, the store (SQLite's file, -wal and -shm, or a PostgreSQL
# pool of 6), and what libraries open. A receiver on SQLite holds 10 (measured).
OTHER_DESCRIPTORS = 32
BACKLOG = 128  # aiohttp's default listen backlog

log = structlog.get_logger("bulkdisconnect")


def connection_budget(descriptors: int) -> tuple[int, int]:
    """The connection cap and the listen backlog that fit in `descriptors` (RLIMIT_NOFILE).

    Half of what OTHER_DESCRIPTORS leaves goes to connections. The other half is for sockets
    the guard has not placed or not yet closed: asyncio accepts up to `backlog` at a time, and
    under a flood three such batches are in flight (accepted, being placed, evicted but open
    until the loop's next turn), so the backlog is an eighth of it.
    """
    spare = max(descriptors - OTHER_DESCRIPTORS, 16)
    return min(MAX_CONNECTIONS, spare // 2), min(BACKLOG, spare // 8)


def _descriptor_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


class _Connection(asyncio.Protocol):
    """One connection: aiohttp's RequestHandler, with the guard told when it opens and closes."""

    __slots__ = ("_guard", "handler", "timer")

    def __init__(self, guard: _Guard, handler: web.RequestHandler) -> None:
        self._guard = guard
        self.handler = handler
        self.timer: asyncio.TimerHandle | None = None  # the header deadline, until a request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)
        self._guard.opened(self)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.forget(self)
        self.handler.connection_lost(exc)


class _Guard:
    """The connections of one server: closes slow headers, makes room at the cap."""

    def __init__(self, server: web.Server, *, header_timeout: float, max_connections: int) -> None:
        self._server = server
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._loop = asyncio.get_running_loop()
        self._open: dict[web.RequestHandler, _Connection] = {}
        # Those without a request in hand (new, or between requests), longest waiting first.
        self._waiting: dict[_Connection, None] = {}
        self._warned = False
        # A RequestHandler copies the server's handler when it is made: wrap it before listening.
        self._inner = server.request_handler
        server.request_handler = self._handle

    def protocol(self) -> _Connection:
        """The protocol of a new connection (the factory `loop.create_server` calls)."""
        return _Connection(self, self._server())

    def opened(self, connection: _Connection) -> None:
        """Start the header deadline of a new connection; over the cap, evict one."""
        self._open[connection.handler] = connection
        self._waiting[connection] = None
        connection.timer = self._loop.call_later(self._header_timeout, self._drop, connection)
        if len(self._open) > self._max_connections:
            if not self._warned:
                self._warned = True
                log.warning(
                    "bulkdisconnect.serving.full",
                    max_connections=self._max_connections,
                    hint="new connections evict those waiting longest; raise `ulimit -n` to"
                    " serve more at once",
                )
            # The newcomer waits too: it is the one closed when every other one is busy.
            self._drop(next(iter(self._waiting)))

    def _drop(self, connection: _Connection) -> None:
        self.forget(connection)
        connection.handler.force_close()

    def forget(self, connection: _Connection) -> None:
        """Stop counting a connection that is closing."""
        self._open.pop(connection.handler, None)
        self._waiting.pop(connection, None)
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = self._open.get(request.protocol)
        if connection is None:  # being dropped: aiohttp still answers what it parsed
            return await self._inner(request)
        if connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None
        self._waiting.pop(connection, None)
        try:
            return await self._inner(request)
        finally:
            if connection.handler in self._open:
                self._waiting[connection] = None


async def serve_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    ready: Callable[[str], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (),
    header_timeout: float = HEADER_TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> str | None:
    """Serve `app` until cancelled, or until one of `stop_signals` (main thread only) comes.

    `ready` gets the bound base URL once it listens (https with `tls`, a server context
    holding the certificate); returns the name of the signal that
    stopped it. A port that cannot be bound is a UsageError naming it. Slow clients and the
    connection cap are handled as the module docstring says.
    """
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )
    await runner.setup()
    listener: asyncio.Server | None = None
    # The stop signals are listened for before "ready" is said: a supervisor may signal then.
    with anyio.open_signal_receiver(*stop_signals) as signals:
        try:
            assert runner.server is not None
            max_connections, backlog = connection_budget(_descriptor_limit())
            guard = _Guard(
                runner.server, header_timeout=header_timeout, max_connections=max_connections
            )
            try:
                listener = await asyncio.get_running_loop().create_server(
                    guard.protocol, host, port, backlog=backlog, ssl=tls
                )
            except OSError as exc:
                raise UsageError(_cannot_listen(host, port, exc)) from None
            bound_host, bound_port = listener.sockets[0].getsockname()[:2]
            if ":" in bound_host:  # IPv6
                bound_host = f"[{bound_host}]"
            if ready is not None:
                ready(f"{'https' if tls else 'http'}://{bound_host}:{bound_port}")
            if not stop_signals:
                await anyio.sleep_forever()
            async for signum in signals:
                return signal.Signals(signum).name
            return None
        finally:
            with anyio.CancelScope(shield=True):
                if listener is not None:
                    listener.close()
                await runner.cleanup()  # closing every connection cancels its header deadline


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use: pick another with --port (0 picks a free one)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
