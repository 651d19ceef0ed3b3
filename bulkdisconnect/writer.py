"""The result writer: the single task that records outcomes, in batches, never one by one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from bulkdisconnect.model import ItemResult


class RecordStore(Protocol):
    """What the writer needs of the store."""

    async def record(self, job: str, run_id: str, results: Sequence[ItemResult]) -> None:
        """Record a batch of outcomes in one write."""
        ...


@dataclass(eq=False)
class ResultWriter:
    """Buffers results and writes them in one transaction per batch or per interval."""

    store: RecordStore
    job: str
    run_id: str
    batch_size: int = 500
    interval: float = 0.5  # seconds: the longest a result waits in the buffer
    _buffer: list[ItemResult] = field(default_factory=list, init=False)
    _full: anyio.Event = field(default_factory=anyio.Event, init=False)
    _room: anyio.Event = field(default_factory=anyio.Event, init=False)

    def __post_init__(self) -> None:
        self._room.set()

    def put(self, result: ItemResult) -> bool:
        """Queue one result without waiting; True if the caller should wait for `room`."""
        buffer = self._buffer
        buffer.append(result)
        if len(buffer) < self.batch_size:
            return False
        self._full.set()
        if len(buffer) < 4 * self.batch_size:
            return False
        if self._room.is_set():
            self._room = anyio.Event()
        return True

    async def room(self) -> None:
        """Wait until the buffer is back under its high-water mark."""
        await self._room.wait()

    async def run(self) -> None:
        """Write a batch whenever one fills or the interval passes; runs until cancelled."""
        while True:
            with anyio.move_on_after(self.interval):
                await self._full.wait()
            self._full = anyio.Event()
            await self._write_batch()

    async def flush(self) -> None:
        """Write everything buffered so far."""
        while self._buffer:
            await self._write_batch()

    @property
    def unwritten(self) -> int:
        """Results not written (yet): after a failed flush, accounts that stay pending."""
        return len(self._buffer)

    async def _write_batch(self) -> None:
        """Write what is buffered now (up to four batches' worth), in one transaction.

        One write, not a loop until the buffer is empty: results keep arriving while a
        write yields, and chasing them wrote ~11 rows per transaction (measured: 1,750
        transactions for 20,000 accounts instead of 40).
        """
        batch = self._buffer[: self.batch_size * 4]
        if batch:
            # A batch is dropped from the buffer once written; cancelled (a stop that cannot
            # wait for a stalled store), it is kept, and writing it again changes nothing
            # that was written: a record lands once, under the claim it was made under.
            await self.store.record(self.job, self.run_id, batch)
            del self._buffer[: len(batch)]
        if len(self._buffer) < 4 * self.batch_size:
            self._room.set()
        if len(self._buffer) >= self.batch_size:
            self._full.set()
