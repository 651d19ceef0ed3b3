"""What the tests share besides fixtures: the workspace a CLI runs in, waiting, constants.

Fixtures live in conftest.py; test modules import helpers from here, never from each other.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
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
