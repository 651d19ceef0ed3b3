"""The sandbox's events, retrieve and read-back knobs, and where it now answers as Stripe does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from click.testing import CliRunner

from bulkdisconnect.cli import main
from bulkdisconnect.client import STRIPE_VERSION
from bulkdisconnect.sandbox import (
    ACCOUNT_ROUTE,
    DISCONNECTED,
    EVENTS_ROUTE,
    FORM,
    REACTIVATED,
    STRIPE_VERSIONS,
    SandboxConfig,
    SandboxThread,
    account_calls,
    drawn,
)

KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
# Built at run time so no live-looking key is ever committed (secret scanners flag them).
LIVE_KEY = "sk_" + "live_" + "51HxYzAbCdEfGh9876"
SECRET = "whsec_test_0123456789abcdef"  # noqa: S105 - a test secret
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": FORM}
EVENT_ID = re.compile(r"evt_[A-Za-z0-9]{24}")
# What the spec's `event` requires (financial_connections_subset.json), and what we fill besides.
EVENT_FIELDS = {
    "id", "object", "api_version", "created", "data", "livemode", "pending_webhooks", "request",
    "type",
}  # fmt: skip
START = 1000.0
DAY = 86_400


class FakeClock:
    """A clock the test moves by hand: event delays, retention and rate windows follow it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


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
def clock() -> FakeClock:
    """The clock of this module's sandbox."""
    return FakeClock()


@pytest.fixture(scope="module")
def running(clock: FakeClock) -> Iterator[SandboxThread]:
    """One sandbox thread for this module, on the module's fake clock."""
    with SandboxThread(clock=clock) as thread:
        yield thread


@pytest.fixture
def sandbox(running: SandboxThread, clock: FakeClock) -> Iterator[SandboxThread]:
    """The module's sandbox with default knobs, nothing recorded and the clock at START."""
    running.sandbox.config = SandboxConfig()
    running.sandbox.reset()
    clock.now = START
    yield running
    running.sandbox.config = SandboxConfig()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test."""
    async with aiohttp.ClientSession() as client:
        yield client


def headers_for(
    *, stripe_account: str | None = None, key: str = KEY, idempotency_key: str | None = None
) -> dict[str, str]:
    """The default headers, with a Stripe-Account, another API key or an Idempotency-Key."""
    headers = {**HEADERS, "Authorization": f"Bearer {key}"}
    if stripe_account is not None:
        headers["Stripe-Account"] = stripe_account
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    params: list[tuple[str, str]] | dict[str, str] | None = None,
) -> Reply:
    """One request with the default headers (or `headers`); the JSON answer decoded."""
    sent = HEADERS if headers is None else headers
    async with session.request(method, url, headers=sent, params=params) as response:
        return Reply(response.status, dict(response.headers), await response.json())


async def disconnect(
    session: aiohttp.ClientSession, thread: SandboxThread, account: str, **headers: Any
) -> Reply:
    """POST to the disconnect route of `account` (headers as `headers_for` takes them)."""
    url = f"{thread.url}/v1/financial_connections/accounts/{account}/disconnect"
    return await request(session, "POST", url, headers=headers_for(**headers))


async def retrieve(
    session: aiohttp.ClientSession, thread: SandboxThread, account: str, **headers: Any
) -> Reply:
    """GET the account (headers as `headers_for` takes them)."""
    url = thread.url + ACCOUNT_ROUTE.format(account=account)
    return await request(session, "GET", url, headers=headers_for(**headers))


async def events(
    session: aiohttp.ClientSession,
    thread: SandboxThread,
    params: list[tuple[str, str]] | dict[str, str] | None = None,
    **headers: Any,
) -> Reply:
    """GET /v1/events with `params` (headers as `headers_for` takes them)."""
    url = thread.url + EVENTS_ROUTE
    return await request(session, "GET", url, headers=headers_for(**headers), params=params)


def accounts_of(reply: Reply) -> list[str]:
    """The account IDs of the events of one page, in the order listed."""
    assert reply.status == 200, reply.body
    return [event["data"]["object"]["id"] for event in reply.body["data"]]


# -- GET /v1/events ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_disconnect_records_one_event_listed_newest_first(
    sandbox: SandboxThread, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    """Each first disconnect records one event (ID, request, key, created) listed newest first;
    replays and repeats record none."""
    replies = []
    for n, account in enumerate(("fca_a", "fca_b", "fca_c")):
        replies.append(await disconnect(session, sandbox, account, idempotency_key=f"k{n}"))
        clock.now += 1
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k0")).status == 200
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k9")).status == 200
    page = await events(session, sandbox)
    assert set(page.body) == {"object", "data", "has_more", "url"}
    assert (page.body["object"], page.body["has_more"], page.body["url"]) == (
        "list",
        False,
        "/v1/events",
    )
    assert accounts_of(page) == ["fca_c", "fca_b", "fca_a"]
    listed = list(reversed(page.body["data"]))
    for n, (event, reply) in enumerate(zip(listed, replies, strict=True)):
        assert set(event) == EVENT_FIELDS  # no `account`: the platform's own
        assert EVENT_ID.fullmatch(event["id"])
        assert (event["object"], event["type"], event["livemode"]) == ("event", DISCONNECTED, False)
        assert event["request"] == {"id": reply.headers["Request-Id"], "idempotency_key": f"k{n}"}
        assert event["data"]["object"] == reply.body  # the account as the disconnect left it
        assert event["data"]["object"]["status"] == "disconnected"
    created = [event["created"] for event in listed]
    assert created == [created[0], created[0] + 1, created[0] + 2]
    assert created[0] == int(sandbox.sandbox.unix_time() - 3)  # the clock moved 3 s since


@pytest.mark.anyio
async def test_events_are_kept_per_stripe_account_and_mode(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """The Stripe-Account header selects whose events are listed, each carrying `account`; a key
    of the other mode sees none of them."""
    await disconnect(session, sandbox, "fca_p")
    await disconnect(session, sandbox, "fca_a", stripe_account="acct_A")
    platform = await events(session, sandbox)
    connected = await events(session, sandbox, stripe_account="acct_A")
    assert accounts_of(platform) == ["fca_p"]
    assert "account" not in platform.body["data"][0]
    assert accounts_of(connected) == ["fca_a"]
    assert connected.body["data"][0]["account"] == "acct_A"
    assert accounts_of(await events(session, sandbox, stripe_account="acct_B")) == []
    assert accounts_of(await events(session, sandbox, key=LIVE_KEY)) == []


@pytest.mark.anyio
async def test_events_filter_by_type_and_created(
    sandbox: SandboxThread, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    """type (wildcards too), types[] and created[gt|gte|lt|lte] or created select the events."""
    sandbox.sandbox.configure(reactivate_share=1.0)  # each disconnect: disconnected + reactivated
    for account in ("fca_0", "fca_1", "fca_2"):
        await disconnect(session, sandbox, account)
        clock.now += 10
    everything = await events(session, sandbox)
    assert [e["type"] for e in everything.body["data"]] == [REACTIVATED, DISCONNECTED] * 3
    first = everything.body["data"][-1]["created"]
    by_type = await events(session, sandbox, {"type": DISCONNECTED})
    assert accounts_of(by_type) == ["fca_2", "fca_1", "fca_0"]
    assert {e["type"] for e in by_type.body["data"]} == {DISCONNECTED}
    types = await events(session, sandbox, [("types[]", REACTIVATED)])
    assert {e["type"] for e in types.body["data"]} == {REACTIVATED}
    indexed = await events(session, sandbox, [("types[0]", REACTIVATED), ("types[1]", "x.y")])
    assert indexed.body == types.body
    wildcard = await events(session, sandbox, {"type": "financial_connections.account.*"})
    assert len(wildcard.body["data"]) == 6
    assert accounts_of(await events(session, sandbox, {"type": "customer.*"})) == []
    for params, expected in (
        ({"created[gte]": first + 10}, ["fca_2", "fca_1"]),
        ({"created[gt]": first + 10}, ["fca_2"]),
        ({"created[lt]": first + 10}, ["fca_0"]),
        ({"created[lte]": first + 10}, ["fca_1", "fca_0"]),
        ({"created": first + 10}, ["fca_1"]),
        ({"created[gt]": first, "created[lt]": first + 20}, ["fca_1"]),
    ):
        query = {"type": DISCONNECTED, **{k: str(v) for k, v in params.items()}}
        assert accounts_of(await events(session, sandbox, query)) == expected, params


@pytest.mark.anyio
async def test_events_page_with_starting_after_and_ending_before(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """limit (default 10) pages newest first; starting_after goes older, ending_before newer."""
    accounts = [f"fca_{n:02d}" for n in range(25)]
    for account in accounts:
        await disconnect(session, sandbox, account)
    newest_first = accounts[::-1]
    pages, after = [], None
    while True:
        page = await events(session, sandbox, {"starting_after": after} if after else None)
        pages.append(page)
        if not page.body["has_more"]:
            break
        after = page.body["data"][-1]["id"]
    assert [len(p.body["data"]) for p in pages] == [10, 10, 5]
    assert [a for p in pages for a in accounts_of(p)] == newest_first
    back = await events(session, sandbox, {"ending_before": pages[1].body["data"][0]["id"]})
    assert (accounts_of(back), back.body["has_more"]) == (newest_first[:10], False)
    params = {"ending_before": pages[0].body["data"][9]["id"], "limit": "3"}
    near = await events(session, sandbox, params)
    assert (accounts_of(near), near.body["has_more"]) == (newest_first[6:9], True)
    big = await events(session, sandbox, {"limit": "100"})
    assert (accounts_of(big), big.body["has_more"]) == (newest_first, False)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"limit": "0"}, "limit", "parameter_invalid_integer"),
        ({"limit": "101"}, "limit", "parameter_invalid_integer"),
        ({"created[gte]": "yesterday"}, "created[gte]", "parameter_invalid_integer"),
        ({"starting_after": "evt_nope"}, "starting_after", "resource_missing"),
        ({"ending_before": "evt_nope"}, "ending_before", "resource_missing"),
        ({"starting_after": "evt_a", "ending_before": "evt_b"}, "starting_after", None),
        ({"type": DISCONNECTED, "types[]": DISCONNECTED}, "type", None),
        ({"delivery_success": "true"}, "delivery_success", None),
        ({"colour": "blue"}, "colour", "parameter_unknown"),
    ],
)
async def test_events_refuse_bad_parameters(
    sandbox: SandboxThread,
    session: aiohttp.ClientSession,
    params: dict[str, str],
    param: str,
    code: str | None,
) -> None:
    """A bad limit, created bound, cursor or combination, or an unknown parameter is a 400."""
    reply = await events(session, sandbox, params)
    assert reply.status == 400
    assert (reply.error["type"], reply.error["param"], reply.error.get("code")) == (
        "invalid_request_error",
        param,
        code,
    )


@pytest.mark.anyio
async def test_delayed_events_appear_late_and_below_newer_ones(
    sandbox: SandboxThread, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    """event_delay_seconds holds back the events of the accounts event_delay_share picks; a late
    one is listed by its `created`, below events listed before it."""
    sandbox.sandbox.configure(event_delay_seconds=30.0)
    await disconnect(session, sandbox, "fca_all")
    clock.now += 29.9
    assert accounts_of(await events(session, sandbox)) == []
    clock.now += 0.1
    assert accounts_of(await events(session, sandbox)) == ["fca_all"]
    sandbox.sandbox.reset()
    accounts = [f"fca_{n:02d}" for n in range(30)]
    late = {a for a in accounts if drawn(0.4, 11, "event_delay", a)}
    assert 0 < len(late) < len(accounts)
    sandbox.sandbox.configure(event_delay_seconds=100.0, event_delay_share=0.4, seed=11)
    for account in accounts:
        await disconnect(session, sandbox, account)
        clock.now += 1
    first = await events(session, sandbox, {"limit": "100"})
    assert accounts_of(first) == [a for a in accounts[::-1] if a not in late]
    newest_seen = accounts_of(first)[0]
    clock.now += 100
    # Paging only toward events newer than the newest seen misses the late ones created before.
    newer = await events(session, sandbox, {"ending_before": first.body["data"][0]["id"]})
    assert accounts_of(newer) == [a for a in accounts[::-1] if a in late and a > newest_seen]
    assert any(a in late for a in accounts if a < newest_seen)
    again = await events(session, sandbox, {"limit": "100"})
    assert accounts_of(again) == accounts[::-1]


@pytest.mark.anyio
async def test_dropped_events_are_neither_listed_nor_sent(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """event_drop_share keeps the events of the accounts the seed picks out of the list and the
    webhook; the webhook sends the very events the list shows."""
    received: list[bytes] = []
    expected = anyio.Event()
    accounts = [f"fca_{n:02d}" for n in range(40)]
    dropped = {a for a in accounts if drawn(0.3, 5, "event_drop", a)}
    assert 0 < len(dropped) < len(accounts)

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.read())
        if len(received) == len(accounts) - len(dropped):
            expected.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/webhook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        sandbox.sandbox.configure(
            event_drop_share=0.3,
            seed=5,
            webhook_url=f"http://127.0.0.1:{port}/webhook",
            webhook_secret=SECRET,
        )
        for account in accounts:
            await disconnect(session, sandbox, account)
        assert sandbox.sandbox.dropped_events() == dropped
        listed = await events(session, sandbox, {"limit": "100"})
        assert sorted(accounts_of(listed)) == sorted(set(accounts) - dropped)
        with anyio.fail_after(10):
            await expected.wait()
        sent = sorted((json.loads(body) for body in received), key=lambda e: e["id"])
        assert sent == sorted(listed.body["data"], key=lambda e: e["id"])
        assert {e["pending_webhooks"] for e in sent} == {1}
    finally:
        await runner.cleanup()
        sandbox.sandbox.configure(webhook_url=None, webhook_secret=None)


@pytest.mark.anyio
async def test_events_are_listed_for_30_days(
    sandbox: SandboxThread, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    """An event older than 30 days is no longer listed, as Stripe keeps them 30 days."""
    await disconnect(session, sandbox, "fca_old")
    clock.now += 30 * DAY - 1
    assert accounts_of(await events(session, sandbox)) == ["fca_old"]
    clock.now += 2
    assert accounts_of(await events(session, sandbox)) == []


@pytest.mark.anyio
async def test_reads_go_through_the_rate_limit(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Event lists and retrieves count against the Stripe account's rate limit like disconnects."""
    sandbox.sandbox.configure(rate_limit=2)
    statuses = [(await events(session, sandbox)).status for _ in range(2)]
    statuses.append((await retrieve(session, sandbox, "fca_a")).status)
    assert statuses == [200, 200, 429]
    assert [e.fault for e in sandbox.sandbox.journal_snapshot()] == [None, None, "rate_limit"]


# -- GET /v1/financial_connections/accounts/{id} ---------------------------------------------


@pytest.mark.anyio
async def test_retrieve_reports_the_status_the_account_has_now(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A retrieve answers the account with its status now: active, inactive or disconnected."""
    sandbox.sandbox.configure(inactive=frozenset({"fca_idle"}), disconnected_per_customer=1)
    before = await retrieve(session, sandbox, "fca_x")
    assert (before.status, before.body["object"], before.body["status"]) == (
        200,
        "financial_connections.account",
        "active",
    )
    assert (await retrieve(session, sandbox, "fca_idle")).body["status"] == "inactive"
    born = await retrieve(session, sandbox, "fca_Ha0")
    assert born.body["status"] == "disconnected"
    assert born.body["account_holder"] == {"customer": "cus_H", "type": "customer"}
    for account in ("fca_x", "fca_idle"):
        answer = await disconnect(session, sandbox, account)
        after = await retrieve(session, sandbox, account)
        assert after.body == answer.body
        assert after.body["status"] == "disconnected"
    assert accounts_of(await events(session, sandbox)) == ["fca_idle", "fca_x"]
    journal = sandbox.sandbox.journal_snapshot()
    assert account_calls(journal) == {"fca_x": 1, "fca_idle": 1}  # disconnects only
    assert account_calls(journal, ("GET",)) == {"fca_x": 2, "fca_idle": 2, "fca_Ha0": 1}


@pytest.mark.anyio
async def test_retrieve_of_an_unknown_or_foreign_account_is_404(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Unknown IDs and another Stripe account's accounts get 404 resource_missing; a key of the
    other mode gets the hint; unknown parameters are a 400."""
    sandbox.sandbox.configure(accounts={"fca_p": "", "fca_a": "acct_A"})
    assert (await retrieve(session, sandbox, "fca_a", stripe_account="acct_A")).status == 200
    assert (await retrieve(session, sandbox, "fca_p")).status == 200
    for account, stripe_account in (("fca_zz", None), ("fca_a", None), ("fca_p", "acct_A")):
        reply = await retrieve(session, sandbox, account, stripe_account=stripe_account)
        assert reply.status == 404
        assert (reply.error["code"], reply.error["param"], reply.error["message"]) == (
            "resource_missing",
            "account",
            f"No such financial connections account: '{account}'",
        )
    live = await retrieve(session, sandbox, "fca_p", key=LIVE_KEY)
    assert live.error["message"].endswith("but a live mode key was used to make this request.")
    url = sandbox.url + ACCOUNT_ROUTE.format(account="fca_p")
    unknown = await request(session, "GET", url, params={"status": "active"})
    assert (unknown.status, unknown.error["code"]) == (400, "parameter_unknown")
    assert (await request(session, "GET", url, params={"expand[]": "ownership"})).status == 200


@pytest.mark.anyio
async def test_reactivate_share_turns_disconnected_accounts_back_to_active(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """The accounts reactivate_share picks read back active after their first disconnect (with a
    reactivated event); their next disconnect holds."""
    sandbox.sandbox.configure(reactivate_share=0.5, seed=3)
    accounts = [f"fca_{n:02d}" for n in range(30)]
    picked = {a for a in accounts if drawn(0.5, 3, "reactivate", a)}
    assert 0 < len(picked) < len(accounts)
    for account in accounts:
        assert (await disconnect(session, sandbox, account)).body["status"] == "disconnected"
    statuses = {a: (await retrieve(session, sandbox, a)).body["status"] for a in accounts}
    assert {a for a, s in statuses.items() if s == "active"} == picked
    assert sandbox.sandbox.reactivated_accounts() == picked
    reactivated = await events(session, sandbox, {"type": REACTIVATED, "limit": "100"})
    assert set(accounts_of(reactivated)) == picked
    assert {e["data"]["object"]["status"] for e in reactivated.body["data"]} == {"active"}
    again = sorted(picked)[0]
    await disconnect(session, sandbox, again)
    assert (await retrieve(session, sandbox, again)).body["status"] == "disconnected"
    disconnects = await events(session, sandbox, {"type": DISCONNECTED, "limit": "100"})
    assert accounts_of(disconnects).count(again) == 2


# -- fidelity: answers as Stripe gives them -------------------------------------------------


@pytest.mark.anyio
async def test_a_saved_500_is_replayed_after_the_disconnect_happened(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """p500_saved disconnects, answers 500 with Stripe-Should-Retry: false and replays that 500
    to every retry with the key; a new key gets the account, with no second event."""
    sandbox.sandbox.configure(p500_saved=1.0)
    first = await disconnect(session, sandbox, "fca_a", idempotency_key="k")
    assert first.status == 500
    assert first.error["type"] == "api_error"
    assert first.headers["Stripe-Should-Retry"] == "false"
    retry = await disconnect(session, sandbox, "fca_a", idempotency_key="k")
    assert (retry.status, retry.body) == (500, first.body)
    assert retry.headers["Stripe-Should-Retry"] == "false"
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.headers["Original-Request"] == first.headers["Request-Id"]
    assert (await retrieve(session, sandbox, "fca_a")).body["status"] == "disconnected"
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k2")).status == 500
    sandbox.sandbox.configure(p500_saved=0.0)
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k3")).status == 200
    listed = await events(session, sandbox)
    assert [e["request"] for e in listed.body["data"]] == [
        {"id": first.headers["Request-Id"], "idempotency_key": "k"}
    ]
    journal = sandbox.sandbox.journal_snapshot()
    faults = [e.fault for e in journal if e.method == "POST"]
    assert faults == ["p500_saved", None, "p500_saved", None]  # the replay executed nothing


@pytest.mark.anyio
async def test_the_early_500_still_leaves_the_account_alone(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """p500 answers before anything is done: nothing saved, so a retry with the key executes."""
    sandbox.sandbox.configure(p500=1.0)
    early = await disconnect(session, sandbox, "fca_a", idempotency_key="k")
    assert early.status == 500
    assert "Stripe-Should-Retry" not in early.headers
    sandbox.sandbox.configure(p500=0.0, p500_saved=1.0)
    assert (await retrieve(session, sandbox, "fca_a")).body["status"] == "active"  # not on reads
    sandbox.sandbox.configure(p500_saved=0.0)
    retry = await disconnect(session, sandbox, "fca_a", idempotency_key="k")
    assert retry.status == 200
    assert "Idempotent-Replayed" not in retry.headers


@pytest.mark.anyio
async def test_a_revoked_key_is_401_api_key_expired(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Once revoke_after calls were answered the key gets Stripe's 401 api_key_expired."""
    sandbox.sandbox.configure(revoke_after=1)
    assert (await disconnect(session, sandbox, "fca_a")).status == 200
    reply = await events(session, sandbox)
    assert reply.status == 401
    assert reply.error == {
        "code": "api_key_expired",
        "doc_url": "https://stripe.com/docs/error-codes/api-key-expired",
        "message": "Expired API Key provided: sk_test_" + "*" * 20 + "p7dc",
        "type": "invalid_request_error",
    }
    assert sandbox.sandbox.journal_snapshot()[-1].fault == "revoked"


@pytest.mark.anyio
async def test_idempotency_keys_are_scoped_by_mode_and_stripe_account(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """The same key on another path is refused only within one mode and one Stripe account."""
    assert (await disconnect(session, sandbox, "fca_a", idempotency_key="k")).status == 200
    live = await disconnect(session, sandbox, "fca_b", idempotency_key="k", key=LIVE_KEY)
    assert live.error["code"] == "resource_missing"  # executed: the account is a test-mode one
    other = await disconnect(
        session, sandbox, "fca_c", idempotency_key="k", stripe_account="acct_A"
    )
    assert other.status == 200
    same = await disconnect(session, sandbox, "fca_d", idempotency_key="k")
    assert (same.status, same.error["type"]) == (400, "idempotency_error")
    assert sandbox.sandbox.disconnected_accounts() == {"fca_a", "fca_c"}


@pytest.mark.anyio
async def test_post_answers_echo_the_idempotency_key(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """Every answer to a POST with an Idempotency-Key carries it back; no key, no header."""
    sandbox.sandbox.configure(missing=frozenset({"fca_gone"}))
    answers = [
        await disconnect(session, sandbox, "fca_a", idempotency_key="k-1"),
        await disconnect(session, sandbox, "fca_a", idempotency_key="k-1"),
        await disconnect(session, sandbox, "fca_gone", idempotency_key="k-2"),
    ]
    assert [(a.status, a.headers["Idempotency-Key"]) for a in answers] == [
        (200, "k-1"),
        (200, "k-1"),
        (404, "k-2"),
    ]
    assert "Idempotency-Key" not in (await disconnect(session, sandbox, "fca_a")).headers
    read = await retrieve(session, sandbox, "fca_a", idempotency_key="k-3")
    assert "Idempotency-Key" not in read.headers


@pytest.mark.anyio
async def test_errors_carry_the_request_log_url(
    sandbox: SandboxThread, clock: FakeClock, session: aiohttp.ClientSession
) -> None:
    """An error to an accepted key links its request in the Dashboard's logs of the key's mode;
    a replay keeps the first request's link; a 401 has none."""
    test = await disconnect(session, sandbox, "fca_x", idempotency_key="k", key=LIVE_KEY)
    clock.now += 5
    replay = await disconnect(session, sandbox, "fca_x", idempotency_key="k", key=LIVE_KEY)
    request_id = test.headers["Request-Id"]
    assert re.fullmatch(
        rf"https://dashboard\.stripe\.com/logs/{request_id}\?t=\d+", test.error["request_log_url"]
    )
    assert replay.error["request_log_url"] == test.error["request_log_url"]
    sandbox.sandbox.configure(missing=frozenset({"fca_gone"}))
    gone = await retrieve(session, sandbox, "fca_gone")
    logged = gone.error["request_log_url"]
    assert logged.startswith(f"https://dashboard.stripe.com/test/logs/{gone.headers['Request-Id']}")
    assert int(logged.rpartition("?t=")[2]) == pytest.approx(sandbox.sandbox.unix_time(), abs=2)
    bad_key = await retrieve(session, sandbox, "fca_gone", key="sk_test_")
    assert bad_key.status == 401
    assert "request_log_url" not in bad_key.error


@pytest.mark.anyio
async def test_an_unknown_stripe_version_is_400(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """A Stripe-Version Stripe never released is refused before anything runs; the client's
    pinned version, the spec's and none at all are accepted."""
    assert STRIPE_VERSION in STRIPE_VERSIONS
    url = f"{sandbox.url}/v1/financial_connections/accounts/fca_a/disconnect"
    for version in ("2019-2-19", "2026-10-28", "2099-01-01.zzz"):
        reply = await request(session, "POST", url, headers={**HEADERS, "Stripe-Version": version})
        assert reply.status == 400
        assert reply.error["message"] == f"Invalid Stripe API version: {version}"
        assert reply.headers["Stripe-Version"] == STRIPE_VERSION
    assert sandbox.sandbox.disconnected_accounts() == frozenset()
    for version in (STRIPE_VERSION, "2026-07-29.dahlia", "2023-08-16"):
        reply = await request(session, "POST", url, headers={**HEADERS, "Stripe-Version": version})
        assert (reply.status, reply.headers["Stripe-Version"]) == (200, version)
    assert (await request(session, "POST", url)).status == 200


# -- knobs: the share, the config and the command ---------------------------------------------


def test_drawn_picks_about_the_share_the_same_for_the_same_seed() -> None:
    """A share picks about that share of IDs, the same ones for the same seed and knob."""
    ids = [f"fca_{n}" for n in range(10_000)]
    picked = {i for i in ids if drawn(0.3, 1, "event_drop", i)}
    assert 2_800 < len(picked) < 3_200
    assert picked == {i for i in ids if drawn(0.3, 1, "event_drop", i)}
    assert picked != {i for i in ids if drawn(0.3, 2, "event_drop", i)}
    assert picked != {i for i in ids if drawn(0.3, 1, "reactivate", i)}
    assert not any(drawn(0.0, 1, "k", i) for i in ids)
    assert all(drawn(1.0, 1, "k", i) for i in ids)


def test_the_new_knobs_are_checked() -> None:
    """Shares outside [0, 1], a negative delay and faults summing above 1 are refused by name."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"event_drop_share": 1.5}, "event_drop_share"),
        ({"event_delay_share": -0.1}, "event_delay_share"),
        ({"reactivate_share": 2.0}, "reactivate_share"),
        ({"event_delay_seconds": -1.0}, "event_delay_seconds"),
        ({"p500_saved": 0.6, "p500": 0.6}, "fault probabilities"),
    ]
    for bad, named in cases:
        with pytest.raises(ValueError, match=named):
            SandboxConfig(**bad)


def test_sandbox_command_refuses_a_bad_share() -> None:
    """A share outside [0, 1] on the command line exits 2, naming it."""
    result = CliRunner().invoke(main, ["sandbox", "--event-drop-share", "1.5"])
    assert result.exit_code == 2
    assert "event_drop_share" in result.output


def test_sandbox_command_passes_the_new_knobs(tmp_path: Path) -> None:
    """`bulkdisconnect sandbox` serves with the knobs its new flags set, as /_sandbox/config
    shows them."""
    inactive = tmp_path / "inactive.txt"
    inactive.write_text("fca_idle\n", encoding="utf-8")
    flags = [
        "--p500-saved", "0.1", "--event-delay-seconds", "5", "--event-delay-share", "0.5",
        "--event-drop-share", "0.2", "--reactivate-share", "0.3", "--inactive", str(inactive),
        "--seed", "4",
    ]  # fmt: skip
    with subprocess.Popen(
        [sys.executable, "-m", "bulkdisconnect", "sandbox", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "SANDBOX_API_KEY": ""},
    ) as process:
        config = _served_config(process)
    assert {k: config[k] for k in ("p500_saved", "event_delay_seconds", "event_delay_share")} == {
        "p500_saved": 0.1,
        "event_delay_seconds": 5.0,
        "event_delay_share": 0.5,
    }
    assert (config["event_drop_share"], config["reactivate_share"], config["seed"]) == (0.2, 0.3, 4)
    assert config["inactive"] == ["fca_idle"]


def _served_config(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The knobs of the sandbox `process` serves (from /_sandbox/config); it is stopped after."""
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = re.fullmatch(r"sandbox listening on (\S+)\n", line)
        assert url is not None, line

        async def knobs() -> dict[str, Any]:
            async with (
                aiohttp.ClientSession() as client,
                client.post(f"{url[1]}/_sandbox/config", json={}) as response,
            ):
                body: dict[str, Any] = await response.json()
                return body

        return anyio.run(knobs)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.anyio
async def test_the_new_knobs_over_http(
    sandbox: SandboxThread, session: aiohttp.ClientSession
) -> None:
    """/_sandbox/config takes the event and read-back knobs, `inactive` as a list of IDs."""
    knobs = {"inactive": ["fca_idle"], "reactivate_share": 0.25, "event_delay_seconds": 2}
    async with session.post(f"{sandbox.url}/_sandbox/config", json=knobs) as response:
        assert response.status == 200
    assert sandbox.sandbox.config.inactive == {"fca_idle"}
    assert (await retrieve(session, sandbox, "fca_idle")).body["status"] == "inactive"
    bad = {"event_drop_share": -1}
    async with session.post(f"{sandbox.url}/_sandbox/config", json=bad) as response:
        assert response.status == 400
