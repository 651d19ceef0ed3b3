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
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from bulkdisconnect.cli import main
from bulkdisconnect.sandbox import (
    FORM,
    LIST_ROUTE,
    JournalEntry,
    Sandbox,
    SandboxConfig,
    SandboxThread,
    account_calls,
    load_account_ids,
    load_accounts,
    max_in_window,
    parse_rate_limits,
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
        """The `error` object of a Stripe error envelope, but its request_log_url (which names
        the request: see test_sandbox_stripe.py)."""
        assert set(self.body) == {"error"}
        error: dict[str, Any] = self.body["error"]
        return {name: value for name, value in error.items() if name != "request_log_url"}


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


# -- Stripe accounts: ownership, a rate limit each, revoked access, holders -------------------


class FakeClock:
    """A clock the test moves by hand: the sandbox's rate windows follow it, not the machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked() -> Iterator[tuple[SandboxThread, FakeClock]]:
    """A sandbox of its own whose clock the test moves."""
    clock = FakeClock()
    with SandboxThread(clock=clock) as thread:
        yield thread, clock


def as_account(stripe_account: str | None) -> dict[str, str]:
    """The default headers, with `Stripe-Account` when one is given."""
    return HEADERS if stripe_account is None else {**HEADERS, "Stripe-Account": stripe_account}


async def list_accounts(
    session: aiohttp.ClientSession,
    thread: SandboxThread,
    params: dict[str, str],
    stripe_account: str | None = None,
) -> Reply:
    """GET the list route with `params` (as `stripe_account`, if given)."""
    headers = {"Authorization": HEADERS["Authorization"]}
    if stripe_account is not None:
        headers["Stripe-Account"] = stripe_account
    async with session.get(thread.url + LIST_ROUTE, params=params, headers=headers) as response:
        return Reply(response.status, dict(response.headers), await response.json())


def listed(reply: Reply) -> list[str]:
    """The account IDs of one list page."""
    return [account["id"] for account in reply.body["data"]]


@pytest.mark.anyio
async def test_an_account_exists_only_under_the_stripe_account_that_owns_it(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Another Stripe account's account gets the very 404 a missing account gets."""
    owners = {"fca_p": "", "fca_a": "acct_A", "fca_b": "acct_B"}
    sandbox.sandbox.configure(accounts=owners)
    gone = await disconnect(session, sandbox, "fca_zz", headers=as_account("acct_A"))
    assert gone.status == 404
    for account, stripe_account in (("fca_p", None), ("fca_a", "acct_A"), ("fca_b", "acct_B")):
        reply = await disconnect(session, sandbox, account, headers=as_account(stripe_account))
        assert (reply.status, reply.body["id"]) == (200, account)
    for account, stripe_account in (("fca_a", None), ("fca_a", "acct_B"), ("fca_p", "acct_A")):
        reply = await disconnect(session, sandbox, account, headers=as_account(stripe_account))
        assert reply.status == 404
        assert reply.error == {
            **gone.error,
            "message": f"No such financial connections account: '{account}'",
        }
    assert gone.error == {
        "code": "resource_missing",
        "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
        "message": "No such financial connections account: 'fca_zz'",
        "param": "account",
        "type": "invalid_request_error",
    }
    # A plain list of IDs is the platform's own; without the knob every ID is everyone's.
    sandbox.sandbox.configure(accounts=frozenset({"fca_p"}))
    assert (await disconnect(session, sandbox, "fca_p", headers=as_account("acct_A"))).status == 404
    assert (await disconnect(session, sandbox, "fca_p")).status == 200
    sandbox.sandbox.configure(accounts=None)
    assert (await disconnect(session, sandbox, "fca_q", headers=as_account("acct_Z"))).status == 200


def test_load_accounts_reads_ids_or_a_csv_of_owners(tmp_path: Path) -> None:
    """A plain file is the platform's IDs; a CSV maps each ID to its Stripe account."""
    plain = tmp_path / "ids.txt"
    plain.write_text("# platform\nfca_a\n\nfca_b\n", encoding="utf-8")
    assert load_accounts(plain) == frozenset({"fca_a", "fca_b"})
    owners = tmp_path / "owners.csv"
    owners.write_text(
        "stripe_account,account_id\nacct_A,fca_a\n,fca_p\n# a comment\n acct_B , fca_b \n",
        encoding="utf-8",
    )
    assert load_accounts(owners) == {"fca_a": "acct_A", "fca_p": "", "fca_b": "acct_B"}
    reordered = tmp_path / "reordered.csv"
    reordered.write_text("account_id,note,stripe_account\nfca_a,x,\nfca_b,y\n", encoding="utf-8")
    assert load_accounts(reordered) == frozenset({"fca_a", "fca_b"})  # nobody but the platform
    for name, text, error in (
        ("bad.csv", "stripe_account,account_id\nacct_A,fca_a\nacct-B,fca_b\n", r"bad.csv, line 3"),
        ("twice.csv", "stripe_account,account_id\nacct_A,fca_a\n,fca_a\n", "both acct_A and"),
        ("no_id.csv", "stripe_account,id\nacct_A,fca_a\n", "no account_id column"),
    ):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=error):
            load_accounts(path)


@pytest.mark.anyio
async def test_rate_limit_is_a_budget_per_stripe_account(
    clocked: tuple[SandboxThread, FakeClock], session: aiohttp.ClientSession
) -> None:
    """`rate_limit` caps each Stripe account (the platform is one) in its own sliding second."""
    thread, clock = clocked
    thread.sandbox.configure(rate_limit=2)

    async def burst(stripe_account: str | None, count: int) -> list[int]:
        headers = as_account(stripe_account)
        return [
            (await disconnect(session, thread, f"fca_{n}", headers=headers)).status
            for n in range(count)
        ]

    for stripe_account in (None, "acct_A", "acct_B"):
        assert await burst(stripe_account, 3) == [200, 200, 429]
    reply = await disconnect(session, thread, "fca_x", headers=as_account("acct_B"))
    assert reply.status == 429
    assert reply.headers["Stripe-Rate-Limited-Reason"] == "global-rate"
    assert reply.error == {
        "code": "rate_limit",
        "doc_url": "https://stripe.com/docs/error-codes/rate-limit",
        "message": "Request rate limit exceeded. You can learn more about rate limits here "
        "https://stripe.com/docs/rate-limits.",
        "type": "invalid_request_error",
    }
    clock.now += 0.999
    assert await burst("acct_A", 1) == [429]
    clock.now += 0.001  # one second after the first requests: their slots are free again
    assert await burst("acct_A", 3) == [200, 200, 429]
    assert await burst(None, 1) == [200]
    journal = thread.sandbox.journal_snapshot()
    limited = [e for e in journal if e.status == 429]
    assert {e.fault for e in limited} == {"rate_limit"}
    for stripe_account in (None, "acct_A", "acct_B"):
        accepted = [e.at for e in journal if e.status == 200 and e.stripe_account == stripe_account]
        assert max_in_window(accepted) == 2


@pytest.mark.anyio
async def test_rate_limits_override_the_limit_of_one_account(
    clocked: tuple[SandboxThread, FakeClock], session: aiohttp.ClientSession
) -> None:
    """`rate_limits` gives one Stripe account its own cap; the others keep `rate_limit`."""
    thread, _ = clocked
    thread.sandbox.configure(rate_limit=2, rate_limits={"acct_Slow": 1, "acct_Fast": 4})

    async def admitted(stripe_account: str | None) -> int:
        headers = as_account(stripe_account)
        replies = [await disconnect(session, thread, "fca_a", headers=headers) for _ in range(6)]
        return sum(r.status == 200 for r in replies)

    assert [await admitted(a) for a in ("acct_Slow", "acct_Fast", "acct_Other", None)] == [
        1,
        4,
        2,
        2,
    ]
    # Without a general limit only the named account is capped.
    thread.sandbox.reset()
    thread.sandbox.configure(rate_limit=None, rate_limits={"acct_Slow": 1})
    assert [await admitted(a) for a in ("acct_Slow", "acct_Other", None)] == [1, 6, 6]


@pytest.mark.anyio
async def test_revoked_account_is_403_account_invalid(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A revoked Stripe-Account gets Stripe's 403 account_invalid, key masked; others go on."""
    sandbox.sandbox.configure(revoked_accounts=frozenset({"acct_Gone"}))
    reply = await disconnect(
        session, sandbox, "fca_a", headers=as_account("acct_Gone"), idempotency_key="k"
    )
    assert reply.status == 403
    assert reply.error == {
        "code": "account_invalid",
        "doc_url": "https://stripe.com/docs/error-codes/account-invalid",
        "message": "The provided key 'sk_test_********************p7dc' does not have access to "
        "account 'acct_Gone' (or that account does not exist). Application access may have been "
        "revoked.",
        "type": "invalid_request_error",
    }
    listing = await list_accounts(
        session, sandbox, {"account_holder[customer]": "cus_a"}, "acct_Gone"
    )
    assert listing.status == 403
    assert listing.error["code"] == "account_invalid"
    assert (
        await disconnect(session, sandbox, "fca_a", headers=as_account("acct_Ok"))
    ).status == 200
    assert (await disconnect(session, sandbox, "fca_a")).status == 200
    # Refused before the endpoint ran, so nothing was saved under the key.
    sandbox.sandbox.configure(revoked_accounts=frozenset())
    again = await disconnect(
        session, sandbox, "fca_a", headers=as_account("acct_Gone"), idempotency_key="k"
    )
    assert again.status == 200
    assert "Idempotent-Replayed" not in again.headers
    journal = sandbox.sandbox.journal_snapshot()
    assert [(e.stripe_account, e.status, e.fault) for e in journal] == [
        ("acct_Gone", 403, "account_invalid"),
        ("acct_Gone", 403, "account_invalid"),
        ("acct_Ok", 200, None),
        (None, 200, None),
        ("acct_Gone", 200, None),
    ]
    assert KEY not in repr(journal)


@pytest.mark.anyio
async def test_journal_records_the_stripe_account_header(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Each journal entry holds the request's Stripe-Account, None without one, over HTTP too."""
    await disconnect(session, sandbox, "fca_a")
    await disconnect(session, sandbox, "fca_a", headers=as_account("acct_A"))
    await list_accounts(session, sandbox, {"account_holder[account]": "acct_H"}, "acct_B")
    journal = sandbox.sandbox.journal_snapshot()
    assert [(e.method, e.stripe_account) for e in journal] == [
        ("POST", None),
        ("POST", "acct_A"),
        ("GET", "acct_B"),
    ]
    async with session.get(f"{sandbox.url}/_sandbox/journal") as response:
        entries = await response.json()
    assert [e["stripe_account"] for e in entries] == [None, "acct_A", "acct_B"]


@pytest.mark.anyio
async def test_list_by_account_holder_pages_through_its_accounts(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """account_holder[account] lists a connected account's implicit accounts, page by page."""
    sandbox.sandbox.configure(accounts_per_customer=12, disconnected_per_customer=1)
    await disconnect(session, sandbox, "fca_H1h3")
    first = await list_accounts(session, sandbox, {"account_holder[account]": "acct_H1"})
    assert first.status == 200
    assert listed(first) == [f"fca_H1h{i}" for i in range(10)]  # default limit 10
    assert first.body["has_more"] is True
    statuses = [account["status"] for account in first.body["data"]]
    assert statuses[:5] == ["disconnected", "active", "active", "disconnected", "active"]
    assert {tuple(a["account_holder"].items()) for a in first.body["data"]} == {
        (("account", "acct_H1"), ("type", "account"))
    }
    assert set(first.body["data"][0]) == ACCOUNT_FIELDS
    params = {"account_holder[account]": "acct_H1", "starting_after": "fca_H1h9", "limit": "5"}
    second = await list_accounts(session, sandbox, params)
    assert (listed(second), second.body["has_more"]) == (["fca_H1h10", "fca_H1h11"], False)
    # Customer and connected-account holders never share an account ID.
    customer = await list_accounts(session, sandbox, {"account_holder[customer]": "cus_H1"})
    assert listed(customer)[:2] == ["fca_H1a0", "fca_H1a1"]
    # Listed are the accounts the requesting Stripe account owns.
    sandbox.sandbox.configure(accounts={"fca_H1h0": "", "fca_H1h1": "acct_P", "fca_H1h2": "acct_P"})
    mine = await list_accounts(session, sandbox, {"account_holder[account]": "acct_H1"})
    assert listed(mine) == ["fca_H1h0"]
    params = {"account_holder[account]": "acct_H1", "limit": "1"}
    page = await list_accounts(session, sandbox, params, "acct_P")
    assert (listed(page), page.body["has_more"]) == (["fca_H1h1"], True)
    page = await list_accounts(session, sandbox, {**params, "starting_after": "fca_H1h1"}, "acct_P")
    assert (listed(page), page.body["has_more"]) == (["fca_H1h2"], False)


BOTH_HOLDERS = (
    "You may only specify one of these parameters: account_holder[account], "
    "account_holder[customer]."
)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"account_holder[account]": "acct_A", "account_holder[customer]": "cus_A"},
            (400, "account_holder", BOTH_HOLDERS),
        ),
        (
            {"account_holder[account]": "acct_a-b"},
            (404, "account_holder[account]", "No such account: 'acct_a-b'"),
        ),
        (
            {"account_holder[account]": "acct_gone"},
            (404, "account_holder[account]", "No such account: 'acct_gone'"),
        ),
        (
            {"account_holder[account]": "acct_A", "starting_after": "fca_Aa0"},
            (400, "starting_after", "No such financial connections account: 'fca_Aa0'"),
        ),
    ],
)
async def test_list_by_account_holder_refuses_bad_requests(
    sandbox: SandboxThread,
    session: aiohttp.ClientSession,
    params: dict[str, str],
    expected: tuple[int, str, str],
) -> None:
    """Both holders at once, an unknown holder account or a foreign cursor are refused."""
    sandbox.sandbox.configure(missing=frozenset({"acct_gone"}))
    reply = await list_accounts(session, sandbox, params)
    assert (reply.status, reply.error["param"], reply.error["message"]) == expected
    assert reply.error["type"] == "invalid_request_error"
    if reply.status == 404:
        assert reply.error["code"] == "resource_missing"


@pytest.mark.anyio
async def test_account_knobs_over_http(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """`/_sandbox/config` takes owners as an object, per-account limits and revoked accounts."""
    knobs = {
        "accounts": {"fca_a": "acct_A", "fca_p": None},
        "rate_limits": {"acct_A": 5},
        "revoked_accounts": ["acct_Gone"],
    }
    async with session.post(f"{sandbox.url}/_sandbox/config", json=knobs) as response:
        assert response.status == 200
        body = await response.json()
    assert body["accounts"] == {"fca_a": "acct_A", "fca_p": ""}
    assert body["rate_limits"] == {"acct_A": 5.0}
    assert body["revoked_accounts"] == ["acct_Gone"]
    assert sandbox.sandbox.config.revoked_accounts == {"acct_Gone"}
    for bad in (
        {"accounts": {"fca_a": "acct-A"}},
        {"rate_limits": {"acct_A": 0}},
        {"rate_limits": {"cus_A": 1}},
        {"rate_limits": ["acct_A"]},
        {"revoked_accounts": ["cus_A"]},
    ):
        async with session.post(f"{sandbox.url}/_sandbox/config", json=bad) as response:
            assert response.status == 400, bad


def test_rate_limits_and_revoked_accounts_are_checked() -> None:
    """--rate-limit-for takes acct_…=N with N > 0; the knobs refuse what is not an acct_ ID."""
    assert parse_rate_limits(["acct_A=5", "acct_B=0.5", "acct_A=7"]) == {
        "acct_A": 7.0,
        "acct_B": 0.5,
    }
    for bad in ("acct_A", "acct_A=", "acct_A=x", "acct_A=0", "acct_A=nan", "cus_A=1", "=3"):
        with pytest.raises(ValueError, match="acct_…=N"):
            parse_rate_limits([bad])
    for knobs in (
        {"rate_limits": {"acct_A": -1.0}},
        {"rate_limits": {"acct_A/x": 1.0}},
        {"revoked_accounts": frozenset({""})},
    ):
        with pytest.raises(ValueError, match="must"):
            SandboxConfig(**knobs)


def test_sandbox_command_refuses_bad_account_options(tmp_path: Path) -> None:
    """Bad --rate-limit-for, --revoked-account or --accounts rows exit 2, naming them."""
    owners = tmp_path / "owners.csv"
    owners.write_text("stripe_account,account_id\nnot-an-account,fca_a\n", encoding="utf-8")
    runner = CliRunner()
    for args, named in (
        (["--rate-limit-for", "acct_A=fast"], "acct_A=fast"),
        (["--revoked-account", "fca_a"], "fca_a"),
        (["--accounts", str(owners)], "line 2"),
    ):
        result = runner.invoke(main, ["sandbox", "--port", "0", *args])
        assert result.exit_code == 2, result.output
        assert named in result.output
