"""Webhook events the sandbox sends, as Stripe does after a disconnect: signed, retried."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import ClientError, ClientSession

from bulkdisconnect.sandbox.wire import DEFAULT_STRIPE_VERSION, _request_id

DISCONNECTED = "financial_connections.account.disconnected"
DELIVERY_ATTEMPTS = 10


class EventSender:
    """Delivers `financial_connections.account.disconnected` events in the background."""

    def __init__(self) -> None:
        self._deliveries: set[asyncio.Task[None]] = set()
        self._session: ClientSession | None = None
        self.delivered = 0
        self.failed = 0

    def send_disconnected(
        self, url: str, secret: str, account_json: str, *, livemode: bool, request_id: str
    ) -> None:
        """Queue the event for one account (called from a request handler)."""
        event = {
            "id": f"evt_{_request_id()[4:]}",
            "object": "event",
            "api_version": DEFAULT_STRIPE_VERSION,
            "created": int(time.time()),
            "livemode": livemode,
            "pending_webhooks": 1,
            "request": {"id": request_id, "idempotency_key": None},
            "type": DISCONNECTED,
            "data": {"object": json.loads(account_json)},
        }
        task = asyncio.get_running_loop().create_task(
            self._deliver(url, secret, json.dumps(event).encode())
        )
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, secret: str, payload: bytes) -> None:
        from bulkdisconnect.webhook import sign

        if self._session is None:
            self._session = ClientSession()
        # Stripe retries a failed delivery for days with exponential backoff; here for about
        # half a minute, enough for a receiver started after its job was planned.
        for attempt in range(DELIVERY_ATTEMPTS):
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": sign(payload, secret),
            }
            try:
                async with self._session.post(url, data=payload, headers=headers) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return
            except (ClientError, OSError):
                pass
            await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
        self.failed += 1

    async def aclose(self) -> None:
        """Drop what is still on its way and close the HTTP session."""
        for task in list(self._deliveries):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
