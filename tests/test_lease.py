"""Holding a lease on a fake clock: what ends a run's hold, and with which error."""

from __future__ import annotations

import anyio
import pytest

from bulkdisconnect.errors import LockHeldError, StoreError
from bulkdisconnect.lease import Lease
from bulkdisconnect.limiter import RateLimiter
from bulkdisconnect.store import Beat
from tests.support import FakeClock


class Holder:
    """A lease store whose heartbeats answer as told: a beat, lost (None), or never."""

    def __init__(self, *answers: Beat | str | None) -> None:
        self.answers = list(answers)
        self.beats = 0

    async def heartbeat(self, job: str, owner: str) -> Beat | None:
        self.beats += 1
        answer = self.answers.pop(0) if self.answers else Beat(workers=1, ready=True)
        if answer == "never":
            await anyio.sleep_forever()
        assert not isinstance(answer, str)
        return answer


def lease(store: Holder, clock: FakeClock) -> Lease:
    return Lease(
        store=store,
        job="j",
        owner="r1",
        lease=30.0,
        join=False,
        limiter=RateLimiter(10.0, clock=clock),
        sleep=clock.sleep,
    )


@pytest.mark.anyio
async def test_a_lease_found_lost_stops_the_run_with_exit_4() -> None:
    clock = FakeClock()
    store = Holder(Beat(workers=1, ready=True), Beat(workers=1, ready=True), None)
    with pytest.raises(LockHeldError, match="taken over"):
        async with lease(store, clock).hold():
            await anyio.sleep_forever()
    assert store.beats == 3


@pytest.mark.anyio
async def test_a_store_that_does_not_answer_a_heartbeat_stops_the_run_with_exit_6() -> None:
    """Silence is not a takeover: nobody could take over through a store that does not
    answer, and a rerun resumes (exit 6, which schedulers retry; 4 can end a Job's index)."""
    clock = FakeClock()
    store = Holder(Beat(workers=1, ready=True), "never")
    with pytest.raises(StoreError, match="no heartbeat got through for 15s"):
        async with lease(store, clock).hold():
            await anyio.sleep_forever()
    assert store.beats == 2


@pytest.mark.anyio
async def test_heartbeats_that_answer_keep_the_run_going() -> None:
    clock = FakeClock()
    store = Holder()
    async with lease(store, clock).hold():
        while store.beats < 10:
            await clock.sleep(1.0)
    assert store.beats >= 10
