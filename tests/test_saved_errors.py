"""A 500 Stripe saved under the Idempotency-Key: every retry with the key gets it back, so the
account is read back instead, and asked again under a new key only if still connected."""

from __future__ import annotations

from collections import defaultdict

from bulkdisconnect.model import idempotency_key
from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, Workspace


def exchanges(sandbox: SandboxThread) -> dict[str, list[tuple[str, int, str | None]]]:
    """account ID -> its requests in arrival order: (method, status, idempotency key)."""
    seen: dict[str, list[tuple[str, int, str | None]]] = defaultdict(list)
    for e in sorted(sandbox.sandbox.journal_snapshot(), key=lambda e: e.at):
        if e.account_id:
            seen[e.account_id].append((e.method, e.status, e.idempotency_key))
    return seen


def test_a_saved_500_is_read_back_and_recorded_disconnected(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Every disconnect executes, then answers a 500 saved under its key: each account is read
    back once (never retried with the same key) and ends disconnected, none failed."""
    ids = ws.ids(30)
    sandbox.sandbox.configure(p500_saved=1.0)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--rate", "500", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    for account, calls in exchanges(sandbox).items():
        key = idempotency_key("ids", account)
        assert calls == [("POST", 500, key), ("GET", 200, None)], calls
    rows = {row["account_id"]: row for row in ws.rows("ids")}
    assert {rows[i]["attempts"] for i in ids} == {2}
    assert {rows[i]["error_code"] for i in ids} == {None}


def test_an_account_read_back_connected_is_asked_again_under_the_next_key(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Read back active after a saved 500: asked again under the key's next generation (a
    derived key: a rerun goes through the same ones), then read back disconnected."""
    ids = ws.ids(10)
    sandbox.sandbox.configure(p500_saved=1.0, reactivate_share=1.0)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--rate", "500", *FAST)
    assert result.exit_code == 0, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    for account, calls in exchanges(sandbox).items():
        first, second = idempotency_key("ids", account), idempotency_key("ids", account, "", 1)
        assert first != second
        assert calls == [
            ("POST", 500, first),
            ("GET", 200, None),
            ("POST", 500, second),
            ("GET", 200, None),
        ], calls


def test_never_more_than_max_attempts_requests_an_account(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Read-backs count as attempts: with --max-attempts 3, an account read back connected gets
    one more disconnect and ends failed with the saved 500, after exactly 3 requests."""
    ids = ws.ids(5)
    sandbox.sandbox.configure(p500_saved=1.0, reactivate_share=1.0)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", "--max-attempts", "3", *FAST)
    assert result.exit_code == 1, result.stderr
    assert ws.outcomes("ids") == dict.fromkeys(ids, "failed")
    assert {len(calls) for calls in exchanges(sandbox).values()} == {3}
    rows = ws.rows("ids")
    assert {(r["attempts"], r["http_status"], r["error_code"]) for r in rows} == {
        (3, 500, "api_error")
    }
