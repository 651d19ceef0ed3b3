"""The client's wire requests, as a real HTTP server on loopback receives them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import pytest
from aiohttp import web

from bulkdisconnect.client import STRIPE_VERSION, StripeClient, make_session
from tests.support import client_settings

KEY = "sk_test_client0000000000000000"
ACCOUNT = {"id": "fca_1", "object": "financial_connections.account", "status": "disconnected"}


@dataclass
class Received:
    """What the server saw of each request: method, path, query, headers and body."""

    requests: list[tuple[str, str, str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Received]]:
    """A loopback server answering every path under /stripe like Stripe would."""
    received = Received()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received.requests.append(
            (request.method, request.path, request.query_string, dict(request.headers), body)
        )
        if request.method == "GET":
            return web.json_response(
                {"object": "list", "data": [ACCOUNT], "has_more": False},
                headers={"Request-Id": "req_list"},
            )
        return web.json_response(ACCOUNT, headers={"Request-Id": "req_1"})

    app = web.Application()
    app.router.add_route("*", "/stripe/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/stripe", received
    finally:
        await runner.cleanup()


@pytest.mark.anyio
@pytest.mark.parametrize("trailing", ["", "/"])
async def test_disconnect_is_an_empty_keyed_post_under_the_base_path(
    server: tuple[str, Received], trailing: str
) -> None:
    """The POST goes under the base URL's own path, with an empty form body and the key."""
    base, received = server
    settings = client_settings(base + trailing, api_key=KEY)
    async with make_session(settings) as session:
        answer = await StripeClient(session, settings).disconnect("fca_1", "bulkdisconnect-k1")
    assert (answer.status, answer.account_status, answer.request_id) == (
        200,
        "disconnected",
        "req_1",
    )
    [(method, path, query, headers, body)] = received.requests
    assert (method, path, query, body) == (
        "POST",
        "/stripe/v1/financial_connections/accounts/fca_1/disconnect",
        "",
        b"",
    )
    assert headers["Content-Length"] == "0"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Idempotency-Key"] == "bulkdisconnect-k1"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Stripe-Version"] == STRIPE_VERSION  # pinned unless --stripe-version says
    assert "Cookie" not in headers


@pytest.mark.anyio
async def test_list_is_a_get_with_the_customer_under_the_base_path(
    server: tuple[str, Received],
) -> None:
    """The list call keeps the base path, sends its query and no Content-Type."""
    base, received = server
    settings = client_settings(base, api_key=KEY)
    async with make_session(settings) as session:
        page = await StripeClient(session, settings).list_accounts("cus_1", limit=10)
    assert page.accounts == [("fca_1", "disconnected")]
    assert not page.has_more
    [(method, path, query, headers, _)] = received.requests
    assert (method, path) == ("GET", "/stripe/v1/financial_connections/accounts")
    assert parse_qs(query) == {"account_holder[customer]": ["cus_1"], "limit": ["10"]}
    assert "Content-Type" not in headers
