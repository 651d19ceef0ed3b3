"""A run's counters sampled over time into the store, for the HTML report's charts.

Every SAMPLE_EVERY seconds while the run works, and once more when it stops, the run's
cumulative counters (requests, 429 answers, disconnects, the pacer's target rate) become one
row of `samples`: a few rows a minute whatever the job's size, so that the report can draw
the request rate against the target and the 429s over time without one point per account.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio
import structlog

from bulkdisconnect.errors import StoreError
from bulkdisconnect.model import Outcome, RunStats

log = structlog.get_logger("bulkdisconnect")

SAMPLE_EVERY = 5.0
# The last sample waits at most this long for the store, on a run's way out.
LAST_SAMPLE_WITHIN = 2.0


class SampleStore(Protocol):
    """Where samples go."""

    async def record_sample(
        self,
        job: str,
        run_id: str,
        *,
        at: float,
        requests: int,
        rate_limited: int,
        disconnected: int,
        target_rate: float,
    ) -> None:
        """Keep a run's cumulative counters at `at` (epoch seconds)."""
        ...


async def keep_sampling(
    store: SampleStore, job: str, run_id: str, stats: RunStats, *, every: float = SAMPLE_EVERY
) -> None:
    """Sample `stats` now and every `every` seconds until cancelled, then once more.

    A sample the store does not take is logged and skipped: the charts lose a point, the
    run loses nothing.
    """
    try:
        while True:
            await _sample(store, job, run_id, stats)
            await anyio.sleep(every)
    finally:
        with anyio.move_on_after(LAST_SAMPLE_WITHIN, shield=True):
            await _sample(store, job, run_id, stats)


async def _sample(store: SampleStore, job: str, run_id: str, stats: RunStats) -> None:
    try:
        await store.record_sample(
            job,
            run_id,
            at=time.time(),
            requests=stats.requests,
            rate_limited=stats.rate_limited,
            disconnected=stats.outcomes[Outcome.DISCONNECTED],
            target_rate=stats.current_rate,
        )
    except StoreError as exc:
        log.warning("bulkdisconnect.sample.skipped", job=job, run_id=run_id, reason=str(exc))
