"""What the tests share besides fixtures: the workspace a CLI runs in, waiting, constants.

Fixtures live in conftest.py; test modules import helpers from here, never from each other.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from bulkdisconnect.cli import main
from bulkdisconnect.client import ClientSettings
from bulkdisconnect.config import default
from bulkdisconnect.limiter import Meters, RateLimiter
from bulkdisconnect.model import RunStats
from bulkdisconnect.retry import Retrier, RetryPolicy
from bulkdisconnect.stopping import Stop

API_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
# Fast, deterministic runs: no backoff wait, no progress display.
FAST = ["--retry-delay", "0", "--retry-max-delay", "0", "--no-progress"]


@dataclass(frozen=True)
class Result:
    """What a CLI invocation left behind."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass
class Workspace:
    """A folder to run jobs in, with helpers to write inputs and read the store."""

    root: Path
    api_base: str

    def ids(self, count: int, prefix: str = "acct") -> list[str]:
        """`count` distinct well-formed account IDs."""
        return [f"fca_{prefix}{n:06d}" for n in range(count)]

    def write(self, name: str, lines: Sequence[str]) -> Path:
        """Write one value a line to a file in the workspace."""
        path = self.root / name
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a run needs: key and sandbox URL."""
        return {"STRIPE_API_KEY": API_KEY, "STRIPE_API_BASE": self.api_base, **extra}

    def run(
        self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
    ) -> Result:
        """Run the CLI in-process (fast) from the workspace folder."""
        runner = CliRunner()
        cwd = Path.cwd()
        os.chdir(self.root)
        try:
            outcome = runner.invoke(
                main, list(args), env=env if env is not None else self.env(), input=stdin
            )
        finally:
            os.chdir(cwd)
        if outcome.exception is not None and not isinstance(outcome.exception, SystemExit):
            raise outcome.exception
        return Result(outcome.exit_code, outcome.stdout, outcome.stderr)

    def spawn(
        self, *args: str, env: dict[str, str] | None = None, limits: str = ""
    ) -> subprocess.Popen[str]:
        """Start the CLI as a real subprocess (for signals, kill -9 and concurrent runs);
        `limits` are `ulimit` options for it (the shell sets them: no preexec_fn in a
        process that runs threads)."""
        command = [sys.executable, "-m", "bulkdisconnect", *args]
        if limits:
            command = ["/bin/sh", "-c", f'ulimit {limits} && exec "$@"', "sh", *command]
        return subprocess.Popen(
            command,
            cwd=self.root,
            env={**os.environ, **(env if env is not None else self.env())},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def state(self, job: str) -> Path:
        """The default store path of a job."""
        return self.root / "state" / f"{job}.sqlite"

    def outcomes(self, job: str, state: Path | None = None) -> dict[str, str | None]:
        """account_id -> outcome, read straight from the SQLite file."""
        with sqlite3.connect(state or self.state(job)) as db:
            rows = db.execute(
                "SELECT account_id, outcome FROM accounts WHERE job = ?", (job,)
            ).fetchall()
        return dict(rows)

    def rows(self, job: str) -> list[sqlite3.Row]:
        """Every stored column of every account of the job."""
        db = sqlite3.connect(self.state(job))
        db.row_factory = sqlite3.Row
        try:
            return db.execute("SELECT * FROM accounts WHERE job = ?", (job,)).fetchall()
        finally:
            db.close()


def recorded(state: Path) -> int:
    """How many accounts hold an outcome in the store right now (0 if not created yet)."""
    if not state.exists():
        return 0
    try:
        with sqlite3.connect(state, timeout=5) as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM accounts WHERE outcome IS NOT NULL"
            ).fetchone()
    except sqlite3.OperationalError:  # schema not there yet
        return 0
    return int(count)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll until predicate() is true, or fail: for what another process does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting")


def client_settings(api_base: str, **changes: object) -> ClientSettings:
    """The ClientSettings a run with default settings builds, with `changes`."""
    settings: dict[str, object] = {
        "api_base": api_base,
        "api_key": API_KEY,
        "stripe_account": None,
        "stripe_version": None,
        "connect_timeout": default("connect_timeout"),
        "total_timeout": default("timeout"),
        "pool_size": 20,
        "proxy": None,
        "ca_bundle": None,
    }
    return ClientSettings(**{**settings, **changes})  # type: ignore[arg-type]


def no_wait(max_attempts: int = 5) -> RetryPolicy:
    """A retry policy with no back-off wait, for fast tests."""
    return RetryPolicy(max_attempts=max_attempts, initial_delay=0.0, max_delay=0.0)


def retrier(
    policy: RetryPolicy | None = None,
    *,
    rate: float = float("inf"),
    stop: Stop | None = None,
    stats: RunStats | None = None,
) -> Retrier:
    """The retry loop a run builds, over real meters (no rate limit unless told)."""
    stats = stats if stats is not None else RunStats()
    stop = stop if stop is not None else Stop()
    meters = Meters(RateLimiter(rate), concurrency=None, stats=stats, stop=stop)
    return Retrier(policy=policy or no_wait(), meter=meters, stop=stop, stats=stats)


class FakeClock:
    """A clock that only moves when a test (or a sleep on it) moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock on."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """A sleep on this clock: it moves the clock on, then lets other tasks run."""
        import anyio.lowlevel

        self.now += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback, in a thread: what an egress proxy does for TLS.

    It records each tunnel's target, and with `credentials` ("user:password") answers 407 to a
    CONNECT without the matching Proxy-Authorization.
    """

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials
        self.tunnels: list[str] = []  # "host:port" of each tunnel opened
        self.refused = 0
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()
        self._server: asyncio.Server

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._tunnel, "127.0.0.1", 0))
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _close(self) -> None:
        """Stop listening, and end the tunnels still open (their sockets closed)."""
        self._server.close()
        tunnels = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tunnels:
            task.cancel()
        await asyncio.gather(*tunnels, return_exceptions=True)
        await self._server.wait_closed()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
        expected = (
            "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if self.credentials
            else None
        )
        given = next(
            (
                line.split(":", 1)[1].strip()
                for line in head.split("\r\n")
                if line.lower().startswith("proxy-authorization:")
            ),
            None,
        )
        if method != "CONNECT" or given != expected:
            self.refused += 1
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        self.tunnels.append(target)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            writer.close()
            upstream_writer.close()
