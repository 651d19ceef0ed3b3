"""Progress: a bar on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import anyio
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bulkdisconnect.model import Outcome, RunStats

log = structlog.get_logger("bulkdisconnect")


async def show_progress(
    stats: RunStats, *, stream: TextIO | None = None, log_every: float = 10.0
) -> None:
    """Render progress until cancelled; a bar on a terminal, else a log line every `log_every`."""
    stream = stream or sys.stderr
    if stream.isatty():
        await _bar(stats, Console(file=stream))
    else:
        await _log_lines(stats, log_every)


def _describe(stats: RunStats, started: float) -> str:
    elapsed = max(time.monotonic() - started, 1e-9)
    return (
        f"{stats.requests / elapsed:6.1f} req/s (target {stats.current_rate:g}, "
        f"{stats.concurrency} in flight)  "
        f"ok {stats.outcomes[Outcome.DISCONNECTED]}  "
        f"404 {stats.outcomes[Outcome.NOT_FOUND]}  "
        f"failed {stats.outcomes[Outcome.FAILED]}  retries {stats.retries}"
    )


async def _bar(stats: RunStats, console: Console) -> None:
    started = time.monotonic()
    columns = (
        TextColumn("[bold]disconnecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=stats.planned)
        try:
            while True:
                bar.update(task, completed=stats.done, description=_describe(stats, started))
                await anyio.sleep(0.25)
        finally:
            bar.update(task, completed=stats.done, description=_describe(stats, started))


async def _log_lines(stats: RunStats, every: float) -> None:
    started = time.monotonic()
    while True:
        await anyio.sleep(every)
        log.info(
            "bulkdisconnect.progress",
            done=stats.done,
            planned=stats.planned,
            rate=round(stats.requests / (time.monotonic() - started), 1),
            target_rate=round(stats.current_rate, 2),
            concurrency=stats.concurrency,
            retries=stats.retries,
            **{o.value: n for o, n in stats.outcomes.items()},
        )
