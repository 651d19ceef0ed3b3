"""Running a sandbox: `serve` in the current event loop, `SandboxThread` on a loop of its own."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from bulkdisconnect.sandbox.config import SandboxConfig
from bulkdisconnect.sandbox.server import Sandbox


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
