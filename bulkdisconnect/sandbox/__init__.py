"""A local stand-in for Stripe's disconnect and list endpoints, with fault knobs and a journal.

It speaks Stripe's wire format (error envelope, Request-Id, Idempotency-Key replay, 429 reason
headers) so the runner can be demonstrated, tested and benchmarked without a network.

Account holders are implicit: every well-formed customer `cus_X` has `accounts_per_customer`
accounts `fca_Xa0`, `fca_Xa1`, ..., and every connected account `acct_Y` as many `fca_Yh0`,
`fca_Yh1`, ..., which `GET /v1/financial_connections/accounts` lists in that order
(`account_holder[customer]=cus_X`, `account_holder[account]=acct_Y`).

Stripe accounts are told apart by the `Stripe-Account` header (none: the platform). The
`accounts` knob may say which one owns each account (another's gets 404 resource_missing); each
has its own server-side rate limit; a revoked one gets 403 account_invalid.

    config.py   SandboxConfig: faults, account universe, webhooks; the files behind the knobs
    wire.py     Stripe's envelopes, messages and the account object
    server.py   Sandbox (state, routes, fault pipeline), serve, SandboxThread
    journal.py  JournalEntry and the measures taken from it (rate, concurrency)
"""

from __future__ import annotations

from bulkdisconnect.sandbox.config import (
    SandboxConfig,
    load_account_ids,
    load_accounts,
    parse_rate_limits,
)
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
    "load_accounts",
    "max_concurrent",
    "max_in_window",
    "parse_rate_limits",
    "serve",
]
