"""Adaptive control end to end: converge below the sandbox's server-side limit, recover after."""

from __future__ import annotations

import json

import pytest

from bulkdisconnect.sandbox import SandboxThread, max_in_window
from tests.support import Workspace, recorded, wait_for

pytestmark = pytest.mark.slow


def test_rate_converges_below_a_server_limit_and_recovers_when_it_is_lifted(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Under a 40/s server limit the run settles near it with few 429s; lifted, it speeds up."""
    ids = ws.ids(700)
    ws.write("ids.txt", ids)
    sandbox.sandbox.configure(rate_limit=40)
    proc = ws.spawn(
        "run",
        "--input",
        "ids.txt",
        "--rate",
        "100",
        "--retry-delay",
        "0.05",
        "--max-attempts",
        "20",
        "--no-progress",
    )
    wait_for(lambda: recorded(ws.state("ids")) >= 200, timeout=30)
    limited = sandbox.sandbox.journal_snapshot()
    sandbox.sandbox.configure(rate_limit=None)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")

    start = min(e.at for e in limited)
    settled = [e for e in limited if e.at - start >= 2.0]  # after the first two seconds
    rejected = sum(1 for e in settled if e.status == 429)
    assert rejected / len(settled) < 0.15
    accepted = [e.at for e in settled if e.status == 200]
    span = max(accepted) - min(accepted)
    assert len(accepted) / span >= 0.75 * 40  # it used most of the limit

    throttles = [json.loads(line) for line in stderr.splitlines() if "throttle" in line]
    assert throttles
    assert throttles[0]["rate"] == 50  # the first second can at most halve the target
    assert all(t["rate"] < 40 for t in throttles[1:])  # then it settles below the limit

    journal = sandbox.sandbox.journal_snapshot()
    last = [e.at for e in journal if e.at >= max(e.at for e in journal) - 1.5]
    assert max_in_window(last) > 1.4 * 40  # recovered well past the old limit
    assert max_in_window([e.at for e in journal]) <= 100
