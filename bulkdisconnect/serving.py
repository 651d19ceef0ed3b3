"""Serving an aiohttp application: what the sandbox and the webhook receiver share."""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable

import anyio
from aiohttp import web

from bulkdisconnect.errors import UsageError

# What stops a server run from the command line: Ctrl-C, or the SIGTERM of a scheduler.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    ready: Callable[[str], None] | None = None,
    stop_signals: tuple[signal.Signals, ...] = (),
) -> str | None:
    """Serve `app` until cancelled, or until one of `stop_signals` (main thread only) comes.

    `ready` gets the bound base URL once it listens; returns the name of the signal that
    stopped it. A port that cannot be bound is a UsageError naming it.
    """
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise UsageError(_cannot_listen(host, port, exc)) from None
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:  # IPv6
            bound_host = f"[{bound_host}]"
        if ready is not None:
            ready(f"http://{bound_host}:{bound_port}")
        if not stop_signals:
            await anyio.sleep_forever()
        with anyio.open_signal_receiver(*stop_signals) as signals:
            async for signum in signals:
                return signal.Signals(signum).name
        return None
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use: pick another with --port (0 picks a free one)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
