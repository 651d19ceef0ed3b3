"""Planning an input into a job: staged whole and counted, approved, then merged at once.

    source --chunks--> a staging table --count--> approve? --commit--> the job (one transaction)

The whole source is read and counted before the job changes, so the safety rails
(--max-accounts, the live-key confirmation) can still refuse it and leave the job as it was.
Memory stays flat: the staging table is on disk, and chunks are read one at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from bulkdisconnect.model import Owned, Settled
from bulkdisconnect.store import PlanCounts

# Values per chunk while planning: one worker-thread trip and one staging transaction each.
# 1,000 cost ~15 % of a million-ID resume in those trips; 10,000 values are ~1 MB in memory.
PLAN_CHUNK = 10_000


class StagedPlan(Protocol):
    """An input being staged for one job; leaving its `stage` block without commit discards it."""

    async def add(self, chunk: Sequence[str | Owned | Settled]) -> None:
        """Stage a chunk of raw values (with their connected account, or settled by the
        source)."""
        ...

    async def count(self) -> PlanCounts:
        """What merging would find and leave to call; changes nothing."""
        ...

    async def commit(self) -> None:
        """Merge the staged input into the job in one transaction."""
        ...


class PlanStore(Protocol):
    """What planning needs of the store."""

    def stage(
        self, job: str, *, retry_failed: bool, stripe_account: str | None
    ) -> AbstractAsyncContextManager[StagedPlan]:
        """A staging handle for `job`; rows naming `stripe_account` are the job's own."""
        ...


async def plan_input(
    store: PlanStore,
    job: str,
    chunks: AsyncIterator[Sequence[str | Owned | Settled]],
    *,
    retry_failed: bool,
    stripe_account: str | None = None,
    approve: Callable[[PlanCounts], None] | None = None,
    commit: bool = True,
) -> PlanCounts:
    """Stage and count a whole input, let `approve` refuse it (by raising), then merge it.

    Without `commit` (a dry run) the input is only counted.
    """
    async with store.stage(job, retry_failed=retry_failed, stripe_account=stripe_account) as staged:
        async for chunk in chunks:
            await staged.add(chunk)
        counts = await staged.count()
        if approve is not None:
            approve(counts)
        if commit:
            await staged.commit()
    return counts
