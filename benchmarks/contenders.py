"""The alternatives bulkdisconnect is measured against, each run as its own process.

python -m benchmarks.contenders bare|bare-tuned|sdk|paced URL IDS_FILE CONCURRENCY|RATE
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from benchmarks.harness import API_KEY

PATH = "/v1/financial_connections/accounts/{}/disconnect"


async def bare_loop(url: str, ids: list[str], concurrency: int, *, tuned: bool = False) -> None:
    """The ceiling of this stack: aiohttp and nothing else (no store, no limiter, no retry).

    `tuned` sends the same bytes the way bulkdisconnect's client does: no cookie jar, the URL
    built without reparsing, no body payload object (aiohttp still sends Content-Length: 0).
    """
    import aiohttp
    import yarl

    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Stripe-Version": "2026-10-28.endive",
        "User-Agent": "bare/1.0",
    }
    pending = iter(ids)
    connector = aiohttp.TCPConnector(limit=concurrency)
    jar = aiohttp.DummyCookieJar() if tuned else None
    base = yarl.URL(url)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as session:

        async def worker() -> None:
            for account in pending:
                # The same wire request as everyone else's, idempotency key included: the
                # sandbox does more work for a keyed request, and that must not skew the ratio.
                keyed = {**headers, "Idempotency-Key": f"bare-{account}"}
                if tuned:
                    target = base.with_path(PATH.format(account), encoded=True)
                    async with session.post(target, headers=keyed) as r:
                        await r.read()
                else:
                    plain = url + PATH.format(account)
                    async with session.post(plain, headers=keyed, data=b"") as r:
                        await r.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def paced_loop(url: str, ids: list[str], rate: int) -> None:
    """The floor of waiting at an operating point: aiohttp sending `rate` requests a second,
    evenly, a task per request, one sleeper (no store, no limiter, no retry)."""
    import aiohttp
    import yarl

    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Stripe-Version": "2026-10-28.endive",
        "User-Agent": "bare/1.0",
    }
    base = yarl.URL(url)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s:

        async def one(account: str) -> None:
            target = base.with_path(PATH.format(account), encoded=True)
            keyed = {**headers, "Idempotency-Key": f"paced-{account}"}
            async with s.post(target, headers=keyed) as r:
                await r.read()

        loop = asyncio.get_running_loop()
        started, tasks = loop.time(), []
        for n, account in enumerate(ids):
            await asyncio.sleep(max(0.0, started + n / rate - loop.time()))
            tasks.append(asyncio.ensure_future(one(account)))
        await asyncio.gather(*tasks)


async def stripe_sdk(url: str, ids: list[str], concurrency: int) -> None:
    """The official SDK's async client, gathered under a semaphore (its documented usage)."""
    import stripe

    client = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": url},
        http_client=stripe.AIOHTTPClient(),
        max_network_retries=0,
    )
    semaphore = asyncio.Semaphore(concurrency)

    async def one(account: str) -> None:
        async with semaphore:
            await client.v1.financial_connections.accounts.disconnect_async(account)

    await asyncio.gather(*(one(account) for account in ids))


def main() -> None:
    """Run one contender to completion."""
    kind, url, ids_path, concurrency = sys.argv[1:5]
    ids = Path(ids_path).read_text().split()
    contenders: dict[str, Callable[[str, list[str], int], Coroutine[Any, Any, None]]] = {
        "bare": bare_loop,
        "bare-tuned": functools.partial(bare_loop, tuned=True),
        "sdk": stripe_sdk,
        "paced": paced_loop,
    }
    asyncio.run(contenders[kind](url, ids, int(concurrency)))


if __name__ == "__main__":
    main()
