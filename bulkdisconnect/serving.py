"""Serving an aiohttp application until cancelled: what the sandbox and the webhook share."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from aiohttp import web


async def serve_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `app` until cancelled; `ready` gets the bound base URL once it listens."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:  # IPv6
            bound_host = f"[{bound_host}]"
        if ready is not None:
            ready(f"http://{bound_host}:{bound_port}")
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
