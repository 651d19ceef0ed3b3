"""Progress: a bar on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import anyio
import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

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
        f"{stats.requests / elapsed:.1f} req/s, target {stats.current_rate:g} · "
        f"{stats.concurrency} in flight · ok {stats.outcomes[Outcome.DISCONNECTED]} · "
        f"404 {stats.outcomes[Outcome.NOT_FOUND]} · failed {stats.outcomes[Outcome.FAILED]} · "
        f"retries {stats.retries}"
    )


async def _bar(stats: RunStats, console: Console) -> None:
    """The bar on one line, the figures on the next: each fits an 80-column terminal."""
    started = time.monotonic()
    bar = Progress(
        TextColumn("[bold]disconnecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task("", total=stats.planned)

    def render() -> Group:
        bar.update(task, completed=stats.done)
        figures = Text(_describe(stats, started), overflow="ellipsis", no_wrap=True)
        return Group(bar, figures)

    # Live moves log lines written meanwhile above the display (stderr is redirected).
    with Live(render(), console=console, auto_refresh=False) as live:
        try:
            while True:
                await anyio.sleep(0.25)
                live.update(render(), refresh=True)
        finally:
            live.update(render(), refresh=True)


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
