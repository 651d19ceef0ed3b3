"""What every benchmark needs: a sandbox in its own process, ID files, timed child processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

API_KEY = "sk_test_bench0000000000000000"
WORK = Path(__file__).parent / ".work"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Sandbox:
    """A `bulkdisconnect sandbox` child process and its control endpoints."""

    url: str
    process: subprocess.Popen[str]

    def control(self, path: str, payload: object | None = None) -> object:
        """GET (or POST `payload` as JSON to) one of the sandbox's /_sandbox routes."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 - our own loopback sandbox
            f"{self.url}/_sandbox/{path}",
            data=data,
            method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return json.loads(response.read() or b"null")

    def reset(self, **knobs: object) -> None:
        """Clear the journal and state, then set these knobs (the rest back to defaults)."""
        self.control("reset", {})
        defaults: dict[str, object] = {
            "latency_ms": 0.0,
            "jitter_ms": 0.0,
            "rate_limit": None,
            "rate_limits": {},
            "p500": 0.0,
            "p429": 0.0,
            "p_hang": 0.0,
            "hang_seconds": 3600.0,
        }
        self.control("config", {**defaults, **knobs})

    def arrivals_by_account(self) -> dict[str, list[tuple[float, int]]]:
        """(arrival time, status) of every disconnect since the last reset, per Stripe-Account
        header ('' without one), in arrival order."""
        journal = self.control("journal")
        assert isinstance(journal, list)
        by_account: dict[str, list[tuple[float, int]]] = {}
        for entry in sorted(journal, key=lambda entry: entry["at"]):
            if entry["account_id"]:
                by_account.setdefault(entry["stripe_account"] or "", []).append(
                    (entry["at"], entry["status"])
                )
        return by_account

    def arrivals(self) -> list[tuple[float, int]]:
        """(arrival time, status) of every request since the last reset, in arrival order."""
        journal = self.control("journal")
        assert isinstance(journal, list)
        return sorted((entry["at"], entry["status"]) for entry in journal)

    def first_calls(self) -> tuple[list[float], int]:
        """When each account's first request arrived, in order, and how many requests hung."""
        journal = self.control("journal")
        assert isinstance(journal, list)
        first: dict[str, float] = {}
        for entry in sorted(journal, key=lambda entry: entry["at"]):
            first.setdefault(entry["account_id"], entry["at"])
        return sorted(first.values()), sum(1 for e in journal if e["fault"] == "hang")


@contextmanager
def sandbox() -> Iterator[Sandbox]:
    """Start the sandbox in its own process (its own core), on a free port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bulkdisconnect", "sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://[\d.:]+", line)
    if not match:
        process.kill()
        raise RuntimeError(f"the sandbox did not start: {line!r}")
    try:
        yield Sandbox(match.group(0), process)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a slow shutdown must not cost the figures
            process.kill()
            process.communicate()


def owned_file(accounts: int, per_account: int) -> Path:
    """A .csv input of `accounts` connected accounts x `per_account` IDs, sorted by account
    (the worst order for head-of-line blocking)."""
    WORK.mkdir(exist_ok=True)
    path = WORK / f"owned-{accounts}x{per_account}.csv"
    if not path.exists():
        with path.open("w") as out:
            out.write("stripe_account,account_id\n")
            out.writelines(
                f"acct_bench{a:04d},fca_bench{a:04d}x{n:06d}\n"
                for a in range(accounts)
                for n in range(per_account)
            )
    return path


def ids_file(count: int, *, name: str | None = None) -> Path:
    """A .txt input of `count` distinct IDs (cached in the work folder)."""
    WORK.mkdir(exist_ok=True)
    path = WORK / (name or f"ids-{count}.txt")
    if not path.exists():
        with path.open("w") as out:
            out.writelines(f"fca_bench{n:09d}\n" for n in range(count))
    return path


@dataclass(frozen=True)
class Timed:
    """A finished child process: its wall time, peak RSS and exit code."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    cpu_seconds: float = 0.0  # user + system time of the child


def timed(
    args: Sequence[str], *, env: dict[str, str] | None = None, stop_after: float | None = None
) -> Timed:
    """Run a child to completion (or SIGTERM it after `stop_after` s); wall time and peak RSS."""
    started = time.monotonic()
    process = subprocess.Popen(
        list(args),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # Peak memory is the kernel's high-water mark for the child's own address space
    # (VmHWM), polled until it exits. Not wait4's ru_maxrss: Linux carries the parent's
    # peak over fork and exec, so every child would report at least this process's size.
    deadline = None if stop_after is None else started + stop_after
    peak_kb = 0
    while True:
        peak_kb = max(peak_kb, _high_water_kb(process.pid))
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() >= deadline:
            process.send_signal(signal.SIGTERM)
            deadline = None
        time.sleep(0.02)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stdout is not None
    with process.stdout:  # small: a plan line and a summary
        stdout = process.stdout.read()
    return Timed(
        seconds=time.monotonic() - started,
        peak_rss_mb=peak_kb / 1024,
        returncode=process.returncode,
        stdout=stdout,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )


def _high_water_kb(pid: int) -> int:
    """The process's peak resident set so far, in KiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def bulkdisconnect_workers(
    count: int, *args: str, url: str, state: str, job: str = "bench"
) -> list[Timed]:
    """Run `count` identical `bulkdisconnect run --join` processes at once; their results."""
    command = [
        sys.executable,
        "-m",
        "bulkdisconnect",
        "run",
        "--join",
        "--job",
        job,
        *args,
        "--state",
        state,
        "--no-progress",
    ]
    env = {"STRIPE_API_KEY": API_KEY, "STRIPE_API_BASE": url}
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: timed(command, env=env), range(count)))


def postgres_available() -> bool:
    """Whether the benchmark's PostgreSQL answers."""

    async def ping() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(ping())
    except (OSError, asyncpg.PostgresError):
        return False
    return True


@contextmanager
def postgres_state(name: str) -> Iterator[str]:
    """A store URL with a fresh schema, dropped afterwards."""
    schema = f"{name}_{time.time_ns()}"
    try:
        yield f"{PG_URL}?schema={schema}"
    finally:
        asyncio.run(drop_schema(schema))


async def drop_schema(schema: str) -> None:
    """Drop a benchmark's schema and everything in it."""
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def claiming_cost(count: int) -> tuple[float, float, float]:
    """µs per account to claim and to record through a PostgreSQL store; to claim in SQLite."""
    from bulkdisconnect.model import ItemResult, Outcome
    from bulkdisconnect.planning import plan_input
    from bulkdisconnect.store import open_store
    from bulkdisconnect.store.core import SqlStore

    accounts = [f"fca_claim{n:09d}" for n in range(count)]

    async def chunks() -> AsyncIterator[list[str]]:
        yield accounts

    async def drain(store: SqlStore, page: int) -> tuple[float, float]:
        """Claim a page, record it, and again, as a worker does; seconds in each, per account."""
        await plan_input(store, "bench", chunks(), retry_failed=False)
        await store.acquire_lock("bench", "r1", stale_after=3600)  # only a holder claims
        claiming = recording = 0.0
        done = 0
        while True:
            started = time.perf_counter()
            batch = await store.claim("bench", "r1", limit=page)
            claiming += time.perf_counter() - started
            if not batch:
                break
            results = [ItemResult(a, Outcome.DISCONNECTED, attempts=1) for a in batch]
            started = time.perf_counter()
            await store.record("bench", "r1", results)
            recording += time.perf_counter() - started
            done += len(batch)
        assert done == count
        return claiming / count * 1e6, recording / count * 1e6

    async def measure() -> tuple[float, float, float]:
        schema = f"claims_{time.time_ns()}"
        pg = await open_store(f"{PG_URL}?schema={schema}")
        try:
            claim, record = await drain(pg, 100)
        finally:
            await pg.aclose()
            await drop_schema(schema)
        lite = await open_store(fresh_state("claims"))
        try:
            sqlite_claim, _ = await drain(lite, 500)
        finally:
            await lite.aclose()
        return claim, record, sqlite_claim

    return asyncio.run(measure())


def bulkdisconnect(
    *args: str,
    url: str,
    state: Path,
    stop_after: float | None = None,
    env: dict[str, str] | None = None,
) -> Timed:
    """Run `bulkdisconnect run` against the sandbox with a fresh or given store."""
    return timed(
        [
            sys.executable,
            "-m",
            "bulkdisconnect",
            "run",
            *args,
            "--state",
            str(state),
            "--no-progress",
        ],
        env={"STRIPE_API_KEY": API_KEY, "STRIPE_API_BASE": url, **(env or {})},
        stop_after=stop_after,
    )


def steady_rate(arrivals: Sequence[tuple[float, int]]) -> float:
    """Requests per second between the first and the last arrival."""
    if len(arrivals) < 2:
        return 0.0
    return (len(arrivals) - 1) / (arrivals[-1][0] - arrivals[0][0])


def fresh_state(name: str) -> Path:
    """A store path that does not exist yet."""
    WORK.mkdir(exist_ok=True)
    return WORK / f"{name}-{time.time_ns()}.sqlite"


def machine() -> str:
    """One line naming the machine, for RESULTS.md."""
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} cores, {memory:.0f} GiB, Python {sys.version.split()[0]}, {os.uname().sysname}"
