"""The way out of a run: how long its store calls may take once it stops, fails or hurries."""

from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import pytest

from bulkdisconnect.stopping import HURRIED, LAST_CALL, STOP_DEADLINE, Stop


@pytest.mark.anyio
async def test_a_run_that_ends_well_gives_its_store_the_time_it_takes() -> None:
    stop = Stop()
    with stop.bounded() as scope:
        assert scope.shield
        assert scope.deadline == math.inf


@pytest.mark.anyio
async def test_a_stopped_runs_store_calls_share_one_deadline_each_with_a_last_call() -> None:
    stop = Stop()
    stop.request()
    started = anyio.current_time()
    with stop.bounded() as first:
        assert first.deadline == pytest.approx(started + STOP_DEADLINE, abs=0.1)
    with stop.bounded() as second:
        assert second.deadline == first.deadline  # shared, not one each
    stop._wind_down_by = anyio.current_time() - 1  # as if the calls had taken it all
    with stop.bounded() as late:
        assert late.deadline == pytest.approx(anyio.current_time() + LAST_CALL, abs=0.1)


@pytest.mark.anyio
async def test_a_failing_run_is_bounded_as_a_stopped_one() -> None:
    stop = Stop()
    stop.failed()
    with stop.bounded() as scope:
        assert scope.deadline == pytest.approx(anyio.current_time() + STOP_DEADLINE, abs=0.1)


@pytest.mark.anyio
async def test_a_second_signal_shortens_the_calls_under_way_and_to_come() -> None:
    stop = Stop()
    stop.request()
    with stop.bounded() as under_way:
        stop.hasten()
        hurried_by = anyio.current_time() + HURRIED
        assert under_way.deadline == pytest.approx(hurried_by, abs=0.1)
    stop._wind_down_by = anyio.current_time() - 1
    with stop.bounded() as to_come:
        assert to_come.deadline < anyio.current_time()  # no last call once hurried
        await anyio.lowlevel.checkpoint()
    assert to_come.cancelled_caught


@pytest.mark.anyio
async def test_a_stop_bounds_the_store_calls_already_under_way() -> None:
    """A healthy end's last call, unbounded, is bounded once a signal comes or the run fails."""
    for stopping in ("request", "failed"):
        stop = Stop()
        with stop.bounded() as under_way:
            assert under_way.deadline == math.inf
            getattr(stop, stopping)()
            expected = anyio.current_time() + STOP_DEADLINE
            assert under_way.deadline == pytest.approx(expected, abs=0.1)
