"""A local stand-in for Stripe's disconnect and list endpoints, with fault knobs and a journal.

It speaks Stripe's wire format (error envelope, Request-Id, Idempotency-Key replay, 429 reason
headers) so the runner can be demonstrated, tested and benchmarked without a network.

Customers are implicit: every well-formed `cus_X` has `accounts_per_customer` accounts
`fca_Xa0`, `fca_Xa1`, ... which `GET /v1/financial_connections/accounts` lists in that order.

    config.py   SandboxConfig: faults, account universe, webhooks
    wire.py     Stripe's envelopes, messages and the account object
    server.py   Sandbox (state, routes, fault pipeline), serve, SandboxThread
    journal.py  JournalEntry and the measures taken from it (rate, concurrency)
"""

from __future__ import annotations

from bulkdisconnect.sandbox.config import SandboxConfig, load_account_ids
from bulkdisconnect.sandbox.journal import (
    JournalEntry,
    account_calls,
    max_concurrent,
    max_in_window,
)
from bulkdisconnect.sandbox.server import Sandbox, SandboxThread, serve
from bulkdisconnect.sandbox.wire import (
    DEFAULT_STRIPE_VERSION,
    DISCONNECT_ROUTE,
    FORM,
    LIST_ROUTE,
)

__all__ = [
    "DEFAULT_STRIPE_VERSION",
    "DISCONNECT_ROUTE",
    "FORM",
    "LIST_ROUTE",
    "JournalEntry",
    "Sandbox",
    "SandboxConfig",
    "SandboxThread",
    "account_calls",
    "load_account_ids",
    "max_concurrent",
    "max_in_window",
    "serve",
]
