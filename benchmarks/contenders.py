"""The alternatives bulkdisconnect is measured against, each run as its own process.

python -m benchmarks.contenders bare|sdk URL IDS_FILE CONCURRENCY
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from benchmarks.harness import API_KEY

PATH = "/v1/financial_connections/accounts/{}/disconnect"


async def bare_loop(url: str, ids: list[str], concurrency: int) -> None:
    """The ceiling of this stack: aiohttp and nothing else (no store, no limiter, no retry)."""
    import aiohttp

    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/x-www-form-urlencoded",
        "Stripe-Version": "2026-10-28.endive",
        "User-Agent": "bare/1.0",
    }
    pending = iter(ids)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for account in pending:
                # The same wire request as everyone else's, idempotency key included: the
                # sandbox does more work for a keyed request, and that must not skew the ratio.
                keyed = {**headers, "Idempotency-Key": f"bare-{account}"}
                async with session.post(url + PATH.format(account), headers=keyed, data=b"") as r:
                    await r.read()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


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
    contender = {"bare": bare_loop, "sdk": stripe_sdk}[kind]
    asyncio.run(contender(url, ids, int(concurrency)))


if __name__ == "__main__":
    main()
