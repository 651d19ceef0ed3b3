"""Shared fixtures: a real loopback sandbox, job runners (in-process and as a subprocess)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg
import pytest
from click.testing import CliRunner

from bulkdisconnect.cli import main
from bulkdisconnect.sandbox import SandboxThread

API_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
# Fast, deterministic runs: no backoff wait, no progress display.
FAST = ["--retry-delay", "0", "--retry-max-delay", "0", "--no-progress"]
# The PostgreSQL this machine runs (trust auth); each test gets its own schema in it.
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_state() -> Iterator[str]:
    """A PostgreSQL store URL with a fresh schema of its own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield f"{PG_URL}?schema={schema}"

    async def drop() -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    anyio.run(drop, backend="asyncio")


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxThread]:
    """One sandbox for the session, on a free loopback port."""
    with SandboxThread() as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxThread) -> Iterator[SandboxThread]:
    """The session's sandbox, reset to a clean default before each test."""
    sandbox_server.sandbox.reset()
    sandbox_server.sandbox.configure(**DEFAULT_KNOBS)
    yield sandbox_server
    sandbox_server.sandbox.reset()
    sandbox_server.sandbox.configure(**DEFAULT_KNOBS)


DEFAULT_KNOBS: dict[str, object] = {
    "latency_ms": 0.0,
    "jitter_ms": 0.0,
    "p500": 0.0,
    "p429": 0.0,
    "p_lock_timeout": 0.0,
    "p_drop": 0.0,
    "p_hang": 0.0,
    "rate_limit": None,
    "accounts": None,
    "missing": frozenset(),
    "livemode_accounts": False,
    "api_key": None,
    "revoke_after": None,
    "seed": 1,
    "accounts_per_customer": 3,
    "disconnected_per_customer": 0,
    "webhook_url": None,
    "webhook_secret": None,
}


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

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start the CLI as a real subprocess (for signals, kill -9 and concurrent runs)."""
        return subprocess.Popen(
            [sys.executable, "-m", "bulkdisconnect", *args],
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


@pytest.fixture
def ws(tmp_path: Path, sandbox: SandboxThread) -> Workspace:
    """A workspace whose runs talk to the sandbox."""
    return Workspace(root=tmp_path, api_base=sandbox.url)
