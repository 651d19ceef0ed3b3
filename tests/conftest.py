"""Shared fixtures: the loopback sandbox, a workspace for CLI runs, and PostgreSQL.

PostgreSQL comes from $BD_TEST_PG, else the server at 127.0.0.1:5432 when it answers, else a
throwaway server that pytest-postgresql starts with pg_ctl when the binaries are installed
(and we are not root, which PostgreSQL refuses). Without any, the PostgreSQL tests are
skipped with one line saying how to enable them; BD_REQUIRE_PG=1 (set by .ci/run) turns that
skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from pytest_postgresql import factories

from bulkdisconnect.logs import mask_url
from bulkdisconnect.sandbox import SandboxThread
from tests.support import Workspace

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
postgresql_proc = factories.postgresql_proc(port=None)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio: aiohttp and asyncpg are asyncio-only."""
    return "asyncio"


# -- PostgreSQL -------------------------------------------------------------------------------


def _answers(url: str) -> bool:
    """Whether a PostgreSQL server takes a connection at `url` within a few seconds."""

    async def connect() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=3)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        await conn.close()
        return True

    return anyio.run(connect, backend="asyncio")


def _without_postgresql(reason: str) -> None:
    message = f"PostgreSQL tests skipped: {reason}; set BD_TEST_PG=postgresql://USER@HOST/DB"
    if os.environ.get("BD_REQUIRE_PG"):
        pytest.fail(f"{message} (BD_REQUIRE_PG is set: they must run)", pytrace=False)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per reason tests were skipped, with how many (pytest's -rs lists each test)."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"{count} skipped: {reason}", yellow=True)


@pytest.fixture(scope="session")
def pg_url(request: pytest.FixtureRequest) -> str:
    """The URL of a PostgreSQL server the tests may create schemas and tables in."""
    if explicit := os.environ.get("BD_TEST_PG"):
        if not _answers(explicit):
            _without_postgresql(f"BD_TEST_PG={mask_url(explicit)} does not answer")
        return explicit
    if _answers(DEFAULT_PG):
        return DEFAULT_PG
    if shutil.which("pg_ctl") is None:
        _without_postgresql("no server at 127.0.0.1:5432 and no pg_ctl to start one")
    if os.geteuid() == 0:
        _without_postgresql("no server at 127.0.0.1:5432, and PostgreSQL refuses to run as root")
    server = request.getfixturevalue("postgresql_proc")
    return f"postgresql://{server.user}@{server.host}:{server.port}/postgres"


@pytest.fixture
def pg_state(pg_url: str) -> Iterator[str]:
    """A PostgreSQL store URL with a fresh schema of its own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield f"{pg_url}?schema={schema}"

    async def drop() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    anyio.run(drop, backend="asyncio")


# -- Chromium ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless Chromium that loads the HTML report (Debian's `chromium`, or $BD_CHROMIUM).

    Without one the tests that need it are skipped with one line; BD_REQUIRE_CHROMIUM=1 (set
    by .ci/run, which installs it) turns that skip into a failure.
    """
    explicit = os.environ.get("BD_CHROMIUM")
    found = explicit or shutil.which("chromium") or shutil.which("chromium-browser")
    if found and os.access(found, os.X_OK):
        return found
    where = f"BD_CHROMIUM={explicit} is not executable" if explicit else "no chromium on PATH"
    message = f"Chromium tests skipped: {where}; apt-get install chromium"
    if os.environ.get("BD_REQUIRE_CHROMIUM"):
        pytest.fail(f"{message} (BD_REQUIRE_CHROMIUM is set: they must run)", pytrace=False)
    pytest.skip(message)


# -- the sandbox and a workspace --------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxThread]:
    """One sandbox for the session, on a free loopback port."""
    with SandboxThread() as server:
        yield server


DEFAULT_KNOBS: dict[str, object] = {
    "latency_ms": 0.0,
    "jitter_ms": 0.0,
    "p500": 0.0,
    "p429": 0.0,
    "p_lock_timeout": 0.0,
    "p_drop": 0.0,
    "p_hang": 0.0,
    "hang_seconds": 3600.0,
    "rate_limit": None,
    "rate_limits": {},
    "accounts": None,
    "missing": frozenset(),
    "livemode_accounts": False,
    "api_key": None,
    "revoke_after": None,
    "revoked_accounts": frozenset(),
    "seed": 1,
    "accounts_per_customer": 3,
    "disconnected_per_customer": 0,
    "webhook_url": None,
    "webhook_secret": None,
    "p500_saved": 0.0,
    "inactive": frozenset(),
    "event_delay_seconds": 0.0,
    "event_delay_share": 1.0,
    "event_drop_share": 0.0,
    "reactivate_share": 0.0,
}


@pytest.fixture
def sandbox(sandbox_server: SandboxThread) -> Iterator[SandboxThread]:
    """The session's sandbox, reset to a clean default before and after each test."""
    sandbox_server.sandbox.reset()
    sandbox_server.sandbox.configure(**DEFAULT_KNOBS)
    yield sandbox_server
    sandbox_server.sandbox.reset()
    sandbox_server.sandbox.configure(**DEFAULT_KNOBS)


@pytest.fixture
def ws(tmp_path: Path, sandbox: SandboxThread) -> Workspace:
    """A workspace whose runs talk to the sandbox."""
    return Workspace(root=tmp_path, api_base=sandbox.url)
