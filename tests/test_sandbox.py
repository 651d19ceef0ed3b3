"""The sandbox speaks Stripe's dialect over real loopback HTTP and journals every request."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from bulkdisconnect.sandbox import (
    FORM,
    JournalEntry,
    Sandbox,
    SandboxConfig,
    SandboxThread,
    account_calls,
    load_account_ids,
    max_in_window,
    serve,
)

KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
# Built at run time so no live-looking key is ever committed (secret scanners flag them).
LIVE_KEY = "sk_" + "live_" + "51HxYzAbCdEfGh9876"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": FORM}
# The fields of Stripe's fixture account (stripe/openapi fixtures3.json).
ACCOUNT_FIELDS = {
    "account_holder", "account_numbers", "balance", "balance_refresh", "category", "created",
    "display_name", "id", "institution_name", "last4", "livemode", "object", "ownership",
    "ownership_refresh", "permissions", "status", "subcategory", "subscriptions",
    "supported_payment_method_types", "transaction_refresh",
}  # fmt: skip


class Reply:
    """Status, headers and decoded JSON body of one answer."""

    def __init__(self, status: int, headers: dict[str, str], body: Any) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def error(self) -> dict[str, Any]:
        """The `error` object of a Stripe error envelope."""
        assert set(self.body) == {"error"}
        error: dict[str, Any] = self.body["error"]
        return error


@pytest.fixture(scope="module")
def running() -> Iterator[SandboxThread]:
    """One sandbox thread for this module, on a free loopback port."""
    with SandboxThread() as thread:
        yield thread


@pytest.fixture
def sandbox(running: SandboxThread) -> Iterator[SandboxThread]:
    """The module's sandbox with default knobs and an empty journal."""
    running.sandbox.config = SandboxConfig()
    running.sandbox.reset()
    yield running
    running.sandbox.config = SandboxConfig()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test."""
    async with aiohttp.ClientSession() as client:
        yield client


def disconnect_url(base: str, account: str) -> str:
    """The disconnect URL of an account under a base URL."""
    return f"{base}/v1/financial_connections/accounts/{account}/disconnect"


async def call(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    headers: dict[str, str] | None = None,
    idempotency_key: str | None = None,
    data: bytes = b"",
) -> Reply:
    """POST with the default headers (or `headers`) and decode the JSON answer."""
    sent = dict(HEADERS if headers is None else headers)
    if idempotency_key is not None:
        sent["Idempotency-Key"] = idempotency_key
    async with session.post(url, headers=sent, data=data) as response:
        return Reply(response.status, dict(response.headers), await response.json())


async def disconnect(
    session: aiohttp.ClientSession, thread: SandboxThread, account: str, **kwargs: Any
) -> Reply:
    """POST to the disconnect route of `account`."""
    return await call(session, disconnect_url(thread.url, account), **kwargs)


@pytest.mark.anyio
async def test_disconnect_answers_the_account_object(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A disconnect answers 200 with the full account object, a Request-Id and the version."""
    headers = {**HEADERS, "Stripe-Version": "2024-06-20"}
    first = await disconnect(session, sandbox, "fca_1Abc", headers=headers)
    again = await disconnect(session, sandbox, "fca_1Abc")
    assert first.status == again.status == 200
    assert set(first.body) == ACCOUNT_FIELDS
    assert first.body["id"] == "fca_1Abc"
    assert first.body["object"] == "financial_connections.account"
    assert first.body["status"] == again.body["status"] == "disconnected"
    assert first.body["livemode"] is False
    assert first.body["created"] == again.body["created"]
    assert first.headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"req_[A-Za-z0-9]{14}", first.headers["Request-Id"])
    assert first.headers["Request-Id"] != again.headers["Request-Id"]
    assert first.headers["Stripe-Version"] == "2024-06-20"
    assert again.headers["Stripe-Version"]
    assert sandbox.sandbox.disconnected_accounts() == {"fca_1Abc"}


@pytest.mark.anyio
async def test_unknown_account_is_resource_missing(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Accounts outside `accounts` or inside `missing` get Stripe's 404 resource_missing."""
    sandbox.sandbox.configure(accounts=frozenset({"fca_a", "fca_b"}), missing=frozenset({"fca_b"}))
    assert (await disconnect(session, sandbox, "fca_a")).status == 200
    for account in ("fca_b", "fca_c"):
        reply = await disconnect(session, sandbox, account)
        assert reply.status == 404
        assert reply.error == {
            "code": "resource_missing",
            "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
            "message": f"No such financial connections account: '{account}'",
            "param": "account",
            "type": "invalid_request_error",
        }


@pytest.mark.anyio
async def test_livemode_mismatch_names_the_other_mode(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A key of the other mode gets 404 whose message says where the account really is."""
    live_headers = {**HEADERS, "Authorization": f"Bearer {LIVE_KEY}"}
    reply = await disconnect(session, sandbox, "fca_x", headers=live_headers)
    assert reply.status == 404
    assert reply.error["message"] == (
        "No such financial connections account: 'fca_x'; a similar object exists in test mode, "
        "but a live mode key was used to make this request."
    )
    sandbox.sandbox.configure(livemode_accounts=True)
    reply = await disconnect(session, sandbox, "fca_x")
    assert reply.error["message"].endswith(
        "a similar object exists in live mode, but a test mode key was used to make this request."
    )
    reply = await disconnect(session, sandbox, "fca_x", headers=live_headers)
    assert reply.status == 200
    assert reply.body["livemode"] is True


@pytest.mark.anyio
async def test_missing_or_bad_key_is_401_and_never_journaled(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """No key, a malformed key or a key other than `api_key` get 401; the key is never stored."""
    no_key = await disconnect(session, sandbox, "fca_a", headers={"Content-Type": FORM})
    assert no_key.status == 401
    assert no_key.error["type"] == "invalid_request_error"
    assert no_key.error["message"].startswith("You did not provide an API key.")
    sandbox.sandbox.configure(api_key="sk_test_TheOnlyGoodKey")
    for bad in ("Bearer nonsense", f"Bearer {KEY}", "Token sk_test_x"):
        reply = await disconnect(
            session, sandbox, "fca_a", headers={**HEADERS, "Authorization": bad}
        )
        assert reply.status == 401
        assert reply.error["message"].startswith("Invalid API Key provided: ")
    assert reply.error["message"] != f"Invalid API Key provided: {KEY}"
    good = {**HEADERS, "Authorization": "Bearer sk_test_TheOnlyGoodKey"}
    assert (await disconnect(session, sandbox, "fca_a", headers=good)).status == 200
    masked = (await disconnect(session, sandbox, "fca_a")).error["message"]
    assert masked == "Invalid API Key provided: sk_test_" + "*" * 20 + "p7dc"
    journal = sandbox.sandbox.journal_snapshot()
    assert [e.authorized for e in journal] == [False, True, True, True, True, True]
    assert "TheOnlyGoodKey" not in repr(journal)
    assert KEY not in repr(journal)


@pytest.mark.anyio
async def test_basic_auth_carries_the_key_as_user_name(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """HTTP basic auth with the key as user name is accepted, as Stripe does."""
    basic = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    reply = await disconnect(session, sandbox, "fca_a", headers={**HEADERS, "Authorization": basic})
    assert reply.status == 200
    garbled = {**HEADERS, "Authorization": "Basic !!!"}
    assert (await disconnect(session, sandbox, "fca_a", headers=garbled)).status == 401


@pytest.mark.anyio
async def test_key_is_revoked_after_the_configured_calls(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """After `revoke_after` answered calls every later call gets 401 with fault `revoked`."""
    sandbox.sandbox.configure(revoke_after=2)
    statuses = [(await disconnect(session, sandbox, f"fca_{i}")).status for i in range(4)]
    assert statuses == [200, 200, 401, 401]
    assert [e.fault for e in sandbox.sandbox.journal_snapshot()] == [
        None,
        None,
        "revoked",
        "revoked",
    ]


@pytest.mark.anyio
async def test_form_content_type_is_required(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A POST without the form Content-Type or with unknown parameters is a 400."""
    bare = {"Authorization": f"Bearer {KEY}"}
    reply = await disconnect(session, sandbox, "fca_a", headers=bare)
    assert reply.status == 400
    assert reply.error["type"] == "invalid_request_error"
    json_type = {**bare, "Content-Type": "application/json"}
    assert (await disconnect(session, sandbox, "fca_a", headers=json_type)).status == 400
    charset = {**bare, "Content-Type": f"{FORM}; charset=utf-8"}
    assert (await disconnect(session, sandbox, "fca_a", headers=charset)).status == 200
    expand = await disconnect(session, sandbox, "fca_a", data=b"expand[]=ownership")
    assert expand.status == 200
    unknown = await disconnect(session, sandbox, "fca_a", data=b"status=active")
    assert unknown.status == 400
    assert unknown.error["code"] == "parameter_unknown"
    assert unknown.error["param"] == "status"


@pytest.mark.anyio
async def test_idempotent_retry_replays_the_first_answer(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A reused Idempotency-Key on the same path gets the saved status and body back, marked."""
    first = await disconnect(session, sandbox, "fca_a", idempotency_key="k-1")
    replay = await disconnect(session, sandbox, "fca_a", idempotency_key="k-1")
    fresh = await disconnect(session, sandbox, "fca_a", idempotency_key="k-2")
    assert first.status == replay.status == fresh.status == 200
    assert replay.body == first.body
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Original-Request"] == first.headers["Request-Id"]
    assert "Idempotent-Replayed" not in first.headers
    assert "Idempotent-Replayed" not in fresh.headers
    # A 404 is saved too: the account appearing later does not change the replay.
    sandbox.sandbox.configure(missing=frozenset({"fca_gone"}))
    gone = await disconnect(session, sandbox, "fca_gone", idempotency_key="k-3")
    sandbox.sandbox.configure(missing=frozenset())
    assert (await disconnect(session, sandbox, "fca_gone", idempotency_key="k-3")).body == gone.body
    journal = sandbox.sandbox.journal_snapshot()
    assert [e.replayed for e in journal] == [False, True, False, False, True]
    assert [e.idempotency_key for e in journal] == ["k-1", "k-1", "k-2", "k-3", "k-3"]


@pytest.mark.anyio
async def test_key_reused_on_another_path_is_an_idempotency_error(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """The same Idempotency-Key on a different account's path is a 400 idempotency_error."""
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k")).status == 200
    reply = await disconnect(session, sandbox, "fca_b", idempotency_key="k")
    assert reply.status == 400
    assert reply.error["type"] == "idempotency_error"
    assert "Keys for idempotent requests can only be used" in reply.error["message"]
    assert "fca_b" not in sandbox.sandbox.disconnected_accounts()


@pytest.mark.anyio
async def test_key_in_flight_is_409(sandbox: SandboxThread, session: aiohttp.ClientSession) -> None:
    """A second request with a key whose first request is still running gets 409."""
    sandbox.sandbox.configure(latency_ms=400)

    async def later() -> Reply:
        await anyio.sleep(0.15)
        return await disconnect(session, sandbox, "fca_a", idempotency_key="k")

    first, second = await asyncio.gather(
        disconnect(session, sandbox, "fca_a", idempotency_key="k"), later()
    )
    assert first.status == 200
    assert second.status == 409
    assert second.error["code"] == "idempotency_key_in_use"
    assert second.error["message"].startswith(
        "There is currently another in-progress request using this Idempotent Key"
    )
    sandbox.sandbox.configure(latency_ms=0)
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k")).body == first.body


@pytest.mark.anyio
async def test_seeded_faults_give_stripe_envelopes_and_are_not_saved(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """p500 and p429 answer Stripe's envelopes in a seeded order and are never replayed."""
    sandbox.sandbox.configure(p500=0.5, p429=0.5, seed=7)
    replies = [await disconnect(session, sandbox, "fca_a", idempotency_key="k") for _ in range(12)]
    assert {r.status for r in replies} == {500, 429}
    for reply in replies:
        if reply.status == 500:
            assert reply.error["type"] == "api_error"
        else:
            assert reply.error["code"] == "rate_limit"
            assert reply.headers["Stripe-Rate-Limited-Reason"] == "endpoint-rate"
        assert "Idempotent-Replayed" not in reply.headers
    sandbox.sandbox.reset()
    again = [await disconnect(session, sandbox, "fca_a") for _ in range(12)]
    assert [r.status for r in again] == [r.status for r in replies]
    sandbox.sandbox.configure(p500=0, p429=0)
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k")).status == 200
    assert {e.fault for e in sandbox.sandbox.journal_snapshot()} == {"p500", "p429", None}


@pytest.mark.anyio
async def test_lock_timeout_advises_a_retry(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A lock_timeout is a 429 with Stripe-Should-Retry: true and no rate-limit reason."""
    sandbox.sandbox.configure(p_lock_timeout=1.0)
    reply = await disconnect(session, sandbox, "fca_a")
    assert reply.status == 429
    assert reply.error["code"] == "lock_timeout"
    assert reply.headers["Stripe-Should-Retry"] == "true"
    assert "Stripe-Rate-Limited-Reason" not in reply.headers


@pytest.mark.anyio
async def test_drop_and_hang_close_the_connection_without_an_answer(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A dropped or hung request ends with a closed connection and is journaled with status 0."""
    sandbox.sandbox.configure(p_drop=1.0)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await disconnect(session, sandbox, "fca_a")
    sandbox.sandbox.configure(p_drop=0.0, p_hang=1.0, hang_seconds=0.2)
    with anyio.fail_after(5), pytest.raises(aiohttp.ServerDisconnectedError):
        await disconnect(session, sandbox, "fca_b")
    journal = sandbox.sandbox.journal_snapshot()
    assert [(e.account_id, e.status, e.fault) for e in journal] == [
        ("fca_a", 0, "drop"),
        ("fca_b", 0, "hang"),
    ]


@pytest.mark.anyio
async def test_rate_limit_rejects_beyond_the_sliding_second(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Over `rate_limit` in a sliding second answers 429 global-rate; accepted ones fit the cap."""
    sandbox.sandbox.configure(rate_limit=10)
    replies = await asyncio.gather(*(disconnect(session, sandbox, f"fca_{i}") for i in range(30)))
    limited = [r for r in replies if r.status == 429]
    assert len(limited) == 20
    assert all(r.headers["Stripe-Rate-Limited-Reason"] == "global-rate" for r in limited)
    assert all(r.error["code"] == "rate_limit" for r in limited)
    journal = sandbox.sandbox.journal_snapshot()
    accepted = [e.at for e in journal if e.fault is None]
    assert len(accepted) == 10
    assert max_in_window(accepted) == 10
    assert {e.fault for e in journal if e.status == 429} == {"rate_limit"}


@pytest.mark.anyio
async def test_unknown_route_is_journaled_with_its_raw_path(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Any other route answers Stripe's 404 and is journaled with the raw path it arrived on."""
    raw = "/v1/financial_connections/accounts/fca_a%2F..%2Fx/refresh?q=%0d"
    reply = await call(session, URL(sandbox.url + raw, encoded=True))
    assert reply.status == 404
    assert reply.error["type"] == "invalid_request_error"
    assert reply.error["message"].startswith("Unrecognized request URL (POST: /v1/")
    encoded = await disconnect(session, sandbox, "fca_a%2F..%2Fx")
    assert encoded.status == 404
    assert encoded.error["code"] == "resource_missing"
    journal = sandbox.sandbox.journal_snapshot()
    assert [(e.path, e.account_id) for e in journal] == [
        (raw, None),
        ("/v1/financial_connections/accounts/fca_a%2F..%2Fx/disconnect", "fca_a/../x"),
    ]
    assert account_calls(journal) == {"fca_a/../x": 1}


@pytest.mark.anyio
async def test_control_routes_over_http(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """`/_sandbox/config`, `/_sandbox/journal` and `/_sandbox/reset` work over HTTP, unjournaled."""
    base = sandbox.url + "/_sandbox"
    async with session.post(f"{base}/config", json={"missing": ["fca_gone"], "p500": 0}) as r:
        assert r.status == 200
        assert (await r.json())["missing"] == ["fca_gone"]
    async with session.post(f"{base}/config", json={"no_such_knob": 1}) as r:
        assert r.status == 400
    async with session.post(f"{base}/config", json={"p500": 2}) as r:
        assert r.status == 400
    assert sandbox.sandbox.config.missing == {"fca_gone"}
    assert (await disconnect(session, sandbox, "fca_gone", idempotency_key="k")).status == 404
    async with session.get(f"{base}/journal") as r:
        entries = await r.json()
    assert [(e["account_id"], e["status"], e["idempotency_key"]) for e in entries] == [
        ("fca_gone", 404, "k")
    ]
    assert set(entries[0]) == {f.name for f in dataclasses.fields(JournalEntry)}
    async with session.post(f"{base}/reset") as r:
        assert r.status == 200
    assert sandbox.sandbox.journal_snapshot() == []


@pytest.mark.anyio
async def test_serve_reports_its_url_and_stops_when_cancelled(
    session: aiohttp.ClientSession,
) -> None:
    """`serve` binds a free port, calls `ready` with its URL and stops on cancellation."""
    urls: list[str] = []
    listening = anyio.Event()

    def ready(url: str) -> None:
        urls.append(url)
        listening.set()

    config = SandboxConfig(missing=frozenset({"fca_m"}))
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: serve(config, ready=ready))
        with anyio.fail_after(5):
            await listening.wait()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", urls[0])
        async with session.post(disconnect_url(urls[0], "fca_m"), headers=HEADERS) as response:
            assert response.status == 404
        group.cancel_scope.cancel()


def test_sandbox_config_rejects_impossible_knobs() -> None:
    """Probabilities outside [0, 1] or summing above 1 and negative latency are refused."""
    for bad in ({"p500": 1.5}, {"p500": 0.6, "p_drop": 0.6}, {"latency_ms": -1}, {"rate_limit": 0}):
        with pytest.raises(ValueError, match="must"):
            SandboxConfig(**bad)
    assert Sandbox().config == SandboxConfig()


def test_max_in_window_counts_a_half_open_window() -> None:
    """Times exactly one window apart never share a window."""
    assert max_in_window([]) == 0
    assert max_in_window([0.0, 1.0, 2.0]) == 1
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.2]) == 4
    assert max_in_window([3.0, 0.1, 0.2], window=0.5) == 2


@given(
    st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=30),
    st.floats(min_value=0.01, max_value=3),
)
def test_max_in_window_matches_brute_force(times: list[float], window: float) -> None:
    """max_in_window equals counting every window that starts at one of the times."""
    brute = max((sum(t <= x < t + window for x in times) for t in times), default=0)
    assert max_in_window(times, window) == brute


def test_load_account_ids_skips_blanks_and_comments(tmp_path: Path) -> None:
    """An ID file yields its trimmed IDs, without blank lines or `#` comments."""
    path = tmp_path / "ids.txt"
    path.write_text("# gone\nfca_a\n\n  fca_b  \nfca_a\n", encoding="utf-8")
    assert load_account_ids(path) == {"fca_a", "fca_b"}
