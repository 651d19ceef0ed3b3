"""Listing customers' accounts: the sandbox's list route, the client's list call, the source."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from bulkdisconnect.client import StripeClient, make_session
from bulkdisconnect.errors import (
    AuthenticationError,
    InputError,
    RunRefusedError,
    UsageError,
    WrongModeError,
)
from bulkdisconnect.model import Outcome, Owned, RunStats, Settled
from bulkdisconnect.retry import RetryPolicy
from bulkdisconnect.sandbox import LIST_ROUTE, JournalEntry, SandboxThread, max_in_window
from bulkdisconnect.sources.customers import (
    CustomerBook,
    CustomersSource,
    Holder,
    read_customers,
    read_holder_accounts,
)
from bulkdisconnect.store import open_store
from tests.support import API_KEY, client_settings, no_wait, retrier


@pytest.fixture(autouse=True)
def universe(sandbox: SandboxThread) -> Iterator[SandboxThread]:
    """The shared sandbox with the default customer universe, restored afterwards."""
    defaults = {"accounts_per_customer": 3, "disconnected_per_customer": 0}
    sandbox.sandbox.configure(**defaults)
    yield sandbox
    sandbox.sandbox.configure(**defaults)


@pytest.fixture
async def client(sandbox: SandboxThread, anyio_backend: str) -> AsyncIterator[StripeClient]:
    """A StripeClient on a real session, talking to the sandbox."""
    settings = client_settings(sandbox.url)
    async with make_session(settings) as session:
        yield StripeClient(session, settings)


def source(
    client: StripeClient,
    customers: Sequence[str | Holder],
    *,
    rate: float = float("inf"),
    policy: RetryPolicy | None = None,
    book: CustomerBook | None = None,
) -> CustomersSource:
    """A CustomersSource over `client` (a bare ID: a customer of the run's own account) with no
    rate limit and no backoff unless told."""
    holders = [Holder.customer(c) if isinstance(c, str) else c for c in customers]
    return CustomersSource(
        holders, client=client, retrier=retrier(policy or no_wait(), rate=rate), book=book
    )


Value = str | Owned | Settled


async def drain(src: CustomersSource, size: int = 1000) -> list[Sequence[Value]]:
    """Every chunk the source yields."""
    return [chunk async for chunk in src.chunks(size)]


def flat(chunks: list[Sequence[Value]]) -> list[Value]:
    """The chunks' values in order."""
    return [value for chunk in chunks for value in chunk]


def list_calls(sandbox: SandboxThread) -> list[JournalEntry]:
    """The journal's list requests, in arrival order."""
    journal = sorted(sandbox.sandbox.journal_snapshot(), key=lambda e: e.at)
    return [e for e in journal if e.method == "GET" and e.path.startswith(LIST_ROUTE)]


def query(entry: JournalEntry) -> dict[str, str]:
    """The query parameters of a journaled request."""
    return {k: v[0] for k, v in parse_qs(urlsplit(entry.path).query).items()}


@pytest.mark.anyio
async def test_pages_through_a_customer_in_order(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """250 accounts take 3 list calls, each after the previous page's last ID, in order."""
    sandbox.sandbox.configure(accounts_per_customer=250)
    values = flat(await drain(source(client, ["cus_Big1"])))
    assert values == [f"fca_Big1a{i}" for i in range(250)]
    calls = list_calls(sandbox)
    assert [query(e).get("starting_after") for e in calls] == [None, "fca_Big1a99", "fca_Big1a199"]
    assert all(query(e)["account_holder[customer]"] == "cus_Big1" for e in calls)
    assert all(query(e)["limit"] == "100" for e in calls)
    assert all(e.account_id is None and e.idempotency_key is None for e in calls)
    assert all(e.status == 200 and e.content_type is None for e in calls)


@pytest.mark.anyio
async def test_exactly_one_page_takes_one_call(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """A customer with exactly 100 accounts is listed in one call (has_more is false)."""
    sandbox.sandbox.configure(accounts_per_customer=100)
    assert len(flat(await drain(source(client, ["cus_x"])))) == 100
    assert len(list_calls(sandbox)) == 1


@pytest.mark.anyio
async def test_disconnected_accounts_come_out_settled(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """Accounts listed as disconnected (from the start or by a call) are Settled, others IDs."""
    sandbox.sandbox.configure(accounts_per_customer=4, disconnected_per_customer=2)
    answer = await client.disconnect("fca_abca2", "key-1")
    assert answer.status == 200
    values = flat(await drain(source(client, ["cus_abc"])))
    done = Outcome.DISCONNECTED
    assert values == [
        Settled("fca_abca0", done),
        Settled("fca_abca1", done),
        Settled("fca_abca2", done),
        "fca_abca3",
    ]


@pytest.mark.anyio
async def test_several_customers_deduplicated_in_order_and_chunked(client: StripeClient) -> None:
    """Customers are listed once each in first-seen order, and chunks never exceed `size`."""
    src = source(client, ["cus_b", "cus_a", "cus_b", "cus_c"])
    assert src.description == "3 customers"
    chunks = await drain(src, size=2)
    assert [len(chunk) for chunk in chunks] == [2, 2, 2, 2, 1]
    expected = [f"fca_{c}a{i}" for c in "bac" for i in range(3)]
    assert flat(chunks) == expected
    assert source(client, ["cus_a"]).description == "1 customer"


@pytest.mark.anyio
async def test_the_book_skips_customers_listed_before_and_remembers_the_new_ones(
    sandbox: SandboxThread, client: StripeClient, tmp_path: Path
) -> None:
    """A customer an earlier plan listed is not listed again; one counts as handed over only
    once the consumer asked past its last account, and is remembered when told."""
    store = await open_store(tmp_path / "s.sqlite")
    try:
        await store.remember_listed("job", ["cus_done"])
        book = CustomerBook("job")
        book.bind(store)
        src = source(client, ["cus_one", "cus_done", "cus_two"], book=book)
        handed_over: list[list[str]] = []
        async for chunk in src.chunks(size=4):
            handed_over.append(list(book.handed_over))
            assert chunk
        assert handed_over == [[], ["cus_one"]]
        assert book.handed_over == ["cus_one", "cus_two"]
        assert book.skipped == 1
        await book.remember()
        assert [await store.listed_before("job", c) for c in ("cus_one", "cus_two")] == [True, True]
        assert not await store.listed_before("other", "cus_one")
    finally:
        await store.aclose()
    assert {query(e)["account_holder[customer]"] for e in list_calls(sandbox)} == {
        "cus_one",
        "cus_two",
    }


@pytest.mark.anyio
async def test_customer_without_accounts_is_still_handed_over(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """A customer with no accounts yields nothing but counts as listed."""
    sandbox.sandbox.configure(accounts_per_customer=0)
    book = CustomerBook("job")
    assert await drain(source(client, ["cus_empty"], book=book)) == []
    assert book.handed_over == ["cus_empty"]


@pytest.mark.anyio
async def test_list_calls_pass_through_the_rate_limiter(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """With RateLimiter(20), 30 list calls never put more than 20 in any second."""
    customers = [f"cus_r{n}" for n in range(30)]
    values = flat(await drain(source(client, customers, rate=20)))
    assert len(values) == 90
    calls = list_calls(sandbox)
    assert len(calls) == 30
    assert max_in_window([e.at for e in calls]) <= 20


@pytest.mark.anyio
async def test_server_errors_are_retried(sandbox: SandboxThread, client: StripeClient) -> None:
    """Under 40 % 500s and 20 % lock timeouts every account still comes out, once, in order."""
    sandbox.sandbox.configure(accounts_per_customer=250, p500=0.4, p_lock_timeout=0.2, seed=7)
    policy = RetryPolicy(max_attempts=30, initial_delay=0, max_delay=0)
    values = flat(await drain(source(client, ["cus_p", "cus_q"], policy=policy)))
    assert values == [f"fca_{c}a{i}" for c in "pq" for i in range(250)]
    faults = [e.fault for e in list_calls(sandbox)]
    assert faults.count(None) == 6
    assert "p500" in faults
    assert "lock_timeout" in faults


@pytest.mark.anyio
async def test_retries_are_bounded(sandbox: SandboxThread, client: StripeClient) -> None:
    """A list call failing every attempt ends the run after `max_attempts` calls."""
    sandbox.sandbox.configure(p500=1.0)
    policy = RetryPolicy(max_attempts=3, initial_delay=0, max_delay=0)
    with pytest.raises(RunRefusedError, match=r"cus_z failed 3 times.*HTTP 500 api_error"):
        await drain(source(client, ["cus_z"], policy=policy))
    assert len(list_calls(sandbox)) == 3


@pytest.mark.anyio
async def test_bad_key_is_an_authentication_error(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """A 401 on a list call stops at once with Stripe's message."""
    sandbox.sandbox.configure(api_key="sk_test_someoneElse")
    with pytest.raises(AuthenticationError, match="Invalid API Key provided"):
        await drain(source(client, ["cus_a"]))
    assert len(list_calls(sandbox)) == 1


@pytest.mark.anyio
async def test_revoked_key_stops_listing(sandbox: SandboxThread, client: StripeClient) -> None:
    """The revoke_after knob counts list calls and then refuses them with 401."""
    sandbox.sandbox.configure(revoke_after=2)
    with pytest.raises(AuthenticationError):
        await drain(source(client, ["cus_a", "cus_b", "cus_c"]))
    assert [e.fault for e in list_calls(sandbox)] == [None, None, "revoked"]


@pytest.mark.anyio
async def test_missing_customer_is_a_usage_error(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """A customer Stripe does not know ends the run naming it, after one call."""
    sandbox.sandbox.configure(missing=frozenset({"cus_gone"}))
    with pytest.raises(UsageError, match="no such customer cus_gone: No such customer: 'cus_gone'"):
        await drain(source(client, ["cus_gone"]))
    assert len(list_calls(sandbox)) == 1


@pytest.mark.anyio
async def test_customer_in_the_other_mode_is_a_wrong_mode_error(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """Listing a live-mode customer with a test key is a WrongModeError, not a missing one."""
    sandbox.sandbox.configure(livemode_accounts=True)
    with pytest.raises(WrongModeError, match="similar object exists in live mode"):
        await drain(source(client, ["cus_live"]))


@pytest.mark.anyio
async def test_malformed_customer_never_reaches_the_api(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """The client refuses a malformed customer ID, and so does the source, before any call."""
    for bad in ["cus_", "cus_a/b", "cus_a?limit=1", "acct_", " cus_a", "cus_é", "fca_1"]:
        with pytest.raises(ValueError, match="invalid account holder"):
            await client.list_accounts(bad)
        with pytest.raises(InputError):
            source(client, [bad])
    with pytest.raises(InputError, match="not a Stripe customer ID"):
        source(client, ["acct_1"])  # a connected account is a holder of its own kind
    with pytest.raises(ValueError, match="invalid Stripe-Account"):
        await client.list_accounts("cus_a", stripe_account="acct_a/b")
    bad_holders = [
        Holder.customer("cus_a", "acct_a-b"),
        Holder("acct_A", "acct_B", is_account=True),
        Holder.account("acct_a-b"),
        Holder.customer("acct_1"),
    ]
    for holder in bad_holders:
        with pytest.raises(InputError):
            source(client, [holder])
    with pytest.raises(ValueError, match="limit"):
        await client.list_accounts("cus_a", limit=101)
    assert sandbox.sandbox.journal_snapshot() == []


@pytest.mark.anyio
async def test_list_accounts_never_raises_for_io(sandbox: SandboxThread) -> None:
    """A dropped connection is status 0 with a transport error, not an exception."""
    sandbox.sandbox.configure(p_drop=1.0)
    settings = client_settings(sandbox.url)
    async with make_session(settings) as session:
        page = await StripeClient(session, settings).list_accounts("cus_a")
    assert page.answer.status == 0
    assert page.answer.transport_error
    assert page.accounts == []


def test_read_customers(tmp_path: Path) -> None:
    """Customer files skip blanks and comments, keep order and duplicates, and strip a BOM."""
    path = tmp_path / "customers.txt"
    path.write_text("\ufeffcus_a\n\n# a comment\n  cus_b  \ncus_a\n", encoding="utf-8")
    assert read_customers(path) == [Holder("cus_a", ""), Holder("cus_b", ""), Holder("cus_a", "")]


def test_read_customers_names_the_bad_line(tmp_path: Path) -> None:
    """A malformed ID is an InputError naming the file and line; a missing file too."""
    path = tmp_path / "customers.txt"
    path.write_text("cus_a\n# ok\nfca_notacustomer\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"customers.txt, line 3: 'fca_notacustomer'"):
        read_customers(path)
    with pytest.raises(InputError, match="not found"):
        read_customers(tmp_path / "absent.txt")


def test_read_customers_csv_with_their_connected_accounts(tmp_path: Path) -> None:
    """A CSV header names customer_id and stripe_account (any order, other columns ignored);
    an empty stripe_account is the run's own account."""
    path = tmp_path / "customers.csv"
    path.write_text(
        "email,stripe_account,customer_id\n"
        "a@example.com,acct_1X,cus_a\n"
        "# a comment\n"
        "b@example.com,,cus_b\n"
        '"c, the third",acct_2Y , cus_c\n',
        encoding="utf-8",
    )
    assert read_customers(path) == [
        Holder("cus_a", "acct_1X"),
        Holder("cus_b", ""),
        Holder("cus_c", "acct_2Y"),
    ]
    only = tmp_path / "only.csv"
    only.write_text("customer_id\ncus_a\n", encoding="utf-8")
    assert read_customers(only) == [Holder("cus_a", "")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("customer_id,stripe_account\ncus_a,acct_a-b\n", r"line 2: 'acct_a-b' is not a Stripe acc"),
        ("customer_id,stripe_account\ncus_a,cus_b\n", r"line 2: 'cus_b' is not a Stripe account"),
        ("customer_id,stripe_account\nacct_1,\n", r"line 2: 'acct_1' is not a Stripe customer"),
        ("customer_id,stripe_account\ncus_a\n", r"line 2: 1 cells where the header has 2"),
        ("id,stripe_account\ncus_a,acct_1\n", r"line 1: a customers CSV needs a customer_id"),
    ],
)
def test_read_customers_csv_names_the_bad_line(tmp_path: Path, text: str, message: str) -> None:
    """A bad connected account, customer, row width or header is an InputError naming the line."""
    path = tmp_path / "customers.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_customers(path)


def test_read_holder_accounts(tmp_path: Path) -> None:
    """Holder files hold one acct_ ID a line (a stripe_account header skipped); each is listed
    under its own header; a bad line or a missing file is an InputError naming it."""
    path = tmp_path / "holders.txt"
    path.write_text("stripe_account\nacct_1A\n\n# gone\n acct_2B \n", encoding="utf-8")
    assert read_holder_accounts(path) == [
        Holder.account("acct_1A"),
        Holder.account("acct_2B"),
    ]
    path.write_text("acct_1A\ncus_a\n", encoding="utf-8")
    with pytest.raises(
        InputError, match=r"holders.txt, line 2: 'cus_a' is not a Stripe account ID"
    ):
        read_holder_accounts(path)
    with pytest.raises(InputError, match="holder accounts file not found"):
        read_holder_accounts(tmp_path / "absent.txt")


# -- the sandbox's list route, over plain HTTP --------------------------------------------------


async def get(sandbox: SandboxThread, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """GET the list route with the test key and `params`; status and decoded body."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(sandbox.url + LIST_ROUTE, params=params, headers=headers) as response,
    ):
        body: dict[str, Any] = await response.json()
        return response.status, body


@pytest.mark.anyio
async def test_list_route_answers_stripes_envelope(sandbox: SandboxThread) -> None:
    """The list route answers {object, data, has_more, url} with full account objects."""
    sandbox.sandbox.configure(accounts_per_customer=12, disconnected_per_customer=1)
    status, body = await get(sandbox, {"account_holder[customer]": "cus_E1"})
    assert status == 200
    assert set(body) == {"object", "data", "has_more", "url"}
    assert body["object"] == "list"
    assert body["url"] == LIST_ROUTE
    assert body["has_more"] is True
    data = body["data"]
    assert [a["id"] for a in data] == [f"fca_E1a{i}" for i in range(10)]  # default limit 10
    assert [a["status"] for a in data[:2]] == ["disconnected", "active"]
    assert data[1]["object"] == "financial_connections.account"
    assert data[1]["account_holder"] == {"customer": "cus_E1", "type": "customer"}
    status, body = await get(
        sandbox, {"account_holder[customer]": "cus_E1", "starting_after": "fca_E1a9", "limit": "5"}
    )
    assert (status, [a["id"] for a in body["data"]], body["has_more"]) == (
        200,
        ["fca_E1a10", "fca_E1a11"],
        False,
    )
    entry = sandbox.sandbox.journal_snapshot()[-1]
    assert (entry.method, entry.account_id, entry.status) == ("GET", None, 200)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "status", "param"),
    [
        ({}, 400, "account_holder"),
        ({"account_holder[customer]": "cus_a", "limit": "0"}, 400, "limit"),
        ({"account_holder[customer]": "cus_a", "limit": "101"}, 400, "limit"),
        ({"account_holder[customer]": "cus_a", "limit": "ten"}, 400, "limit"),
        ({"account_holder[customer]": "cus_a", "starting_after": "fca_ba0"}, 400, "starting_after"),
        ({"account_holder[customer]": "cus_a", "starting_after": "fca_aa3"}, 400, "starting_after"),
        (
            {"account_holder[customer]": "cus_a", "starting_after": "fca_aa01"},
            400,
            "starting_after",
        ),
        ({"account_holder[customer]": "cus_a", "colour": "red"}, 400, "colour"),
        ({"account_holder[customer]": "cus_a", "ending_before": "x"}, 400, "ending_before"),
        ({"account_holder[customer]": "cus_a-b"}, 404, "account_holder[customer]"),
        ({"account_holder[customer]": "cus_gone"}, 404, "account_holder[customer]"),
    ],
)
async def test_list_route_refuses_bad_requests(
    sandbox: SandboxThread, params: dict[str, str], status: int, param: str
) -> None:
    """Missing or bad parameters are 400s and unknown customers 404s, naming the parameter."""
    sandbox.sandbox.configure(missing=frozenset({"cus_gone"}))
    got, body = await get(sandbox, params)
    assert got == status
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    if status == 404:
        assert body["error"]["code"] == "resource_missing"
        assert body["error"]["message"].startswith("No such customer: ")


@pytest.mark.anyio
async def test_listed_accounts_respect_the_account_knobs(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """Accounts excluded by `accounts` or `missing` are not listed, as the POST route 404s them."""
    sandbox.sandbox.configure(accounts_per_customer=5, missing=frozenset({"fca_ka1"}))
    values = flat(await drain(source(client, ["cus_k"])))
    assert values == ["fca_ka0", "fca_ka2", "fca_ka3", "fca_ka4"]
    sandbox.sandbox.configure(accounts=frozenset({"fca_ka3"}), missing=frozenset())
    assert flat(await drain(source(client, ["cus_k"]))) == ["fca_ka3"]


# -- holders of connected accounts ---------------------------------------------------------------


@pytest.mark.anyio
async def test_connected_account_holders_come_out_owned_and_listed_under_their_header(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """A connected account and a customer of another are each listed under their Stripe
    account, and their accounts come out Owned (or Settled) under it; the run's own customer
    stays a bare ID, listed without a header."""
    sandbox.sandbox.configure(accounts_per_customer=2, disconnected_per_customer=1)
    holders: list[str | Holder] = [
        Holder.account("acct_H"),
        Holder.customer("cus_c", "acct_X"),
        "cus_own",
    ]
    src = source(client, holders)
    assert src.description == "2 customers and 1 connected account"
    assert source(client, [Holder.account("acct_H")]).description == "1 connected account"
    done = Outcome.DISCONNECTED
    assert flat(await drain(src)) == [
        Settled("fca_Hh0", done, "acct_H"),
        Owned("fca_Hh1", "acct_H"),
        Settled("fca_ca0", done, "acct_X"),
        Owned("fca_ca1", "acct_X"),
        Settled("fca_owna0", done),
        "fca_owna1",
    ]
    assert [(query(e), e.stripe_account) for e in list_calls(sandbox)] == [
        ({"account_holder[account]": "acct_H", "limit": "100"}, "acct_H"),
        ({"account_holder[customer]": "cus_c", "limit": "100"}, "acct_X"),
        ({"account_holder[customer]": "cus_own", "limit": "100"}, None),
    ]


@pytest.mark.anyio
async def test_a_refused_connected_account_is_listed_no_further(
    sandbox: SandboxThread, client: StripeClient
) -> None:
    """After a 403 account_invalid, the other holders of that Stripe account are skipped
    without a call, it is reported refused, and only the others count as listed."""
    sandbox.sandbox.configure(revoked_accounts=frozenset({"acct_Gone"}))
    book = CustomerBook("job")
    holders = [
        Holder.customer("cus_a", "acct_Gone"),
        Holder.account("acct_Gone"),
        Holder.customer("cus_b", "acct_Gone"),
        Holder.account("acct_Ok"),
    ]
    stats = RunStats()
    src = CustomersSource(
        holders, client=client, retrier=retrier(no_wait(), stats=stats), book=book
    )
    assert flat(await drain(src)) == [Owned(f"fca_Okh{i}", "acct_Ok") for i in range(3)]
    assert [e.stripe_account for e in list_calls(sandbox)] == ["acct_Gone", "acct_Ok"]
    assert book.handed_over == ["acct_Ok"]
    refused = stats.refused
    assert list(refused) == ["acct_Gone"]
    assert refused["acct_Gone"].startswith("listing its accounts: account_invalid: ")
