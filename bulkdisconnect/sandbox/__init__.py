"""A local stand-in for Stripe's Financial Connections and Events endpoints, with fault knobs and
a journal.

It speaks Stripe's wire format (error envelope with request_log_url, Request-Id, Idempotency-Key
replay scoped by mode and Stripe account, 429 reason headers, Stripe-Version checked) so the
runner can be demonstrated, tested and benchmarked without a network. Routes: disconnect
(POST .../accounts/{id}/disconnect), retrieve (GET .../accounts/{id}), list by holder
(GET .../accounts) and GET /v1/events.

Account holders are implicit: every well-formed customer `cus_X` has `accounts_per_customer`
accounts `fca_Xa0`, `fca_Xa1`, ..., and every connected account `acct_Y` as many `fca_Yh0`,
`fca_Yh1`, ..., which `GET /v1/financial_connections/accounts` lists in that order
(`account_holder[customer]=cus_X`, `account_holder[account]=acct_Y`).

Stripe accounts are told apart by the `Stripe-Account` header (none: the platform). The
`accounts` knob may say which one owns each account (another's gets 404 resource_missing); each
has its own server-side rate limit; a revoked one gets 403 account_invalid.

A disconnect that changes an account's status records a financial_connections.account.disconnected
event under the Stripe account that made it (and the key's mode); the webhook sender sends that
same event. Knobs delay or drop the events of a share of accounts and turn a share of
disconnected accounts back to active, picked by the seed and the account ID (`drawn`).

    config.py       SandboxConfig: faults, account universe, events, webhooks; knob files
    wire.py         Stripe's envelopes, messages and the account object
    accounts.py     AccountStates: each account's status; the retrieve and list routes
    events.py       EventLog (GET /v1/events) and EventSender (webhooks), one event builder
    idempotency.py  IdempotencyCache: answers saved under a key, replayed
    server.py       Sandbox (state, routes, fault pipeline)
    running.py      serve, SandboxThread
    journal.py      JournalEntry and the measures taken from it (rate, concurrency)
"""

from __future__ import annotations

from bulkdisconnect.sandbox.config import (
    SandboxConfig,
    drawn,
    load_account_ids,
    load_accounts,
    parse_rate_limits,
)
from bulkdisconnect.sandbox.events import DISCONNECTED, REACTIVATED, StoredEvent
from bulkdisconnect.sandbox.journal import (
    JournalEntry,
    account_calls,
    max_concurrent,
    max_in_window,
)
from bulkdisconnect.sandbox.running import SandboxThread, serve
from bulkdisconnect.sandbox.server import Sandbox
from bulkdisconnect.sandbox.wire import (
    ACCOUNT_ROUTE,
    DEFAULT_STRIPE_VERSION,
    DISCONNECT_ROUTE,
    EVENTS_ROUTE,
    FORM,
    LIST_ROUTE,
    STRIPE_VERSIONS,
)

__all__ = [
    "ACCOUNT_ROUTE",
    "DEFAULT_STRIPE_VERSION",
    "DISCONNECTED",
    "DISCONNECT_ROUTE",
    "EVENTS_ROUTE",
    "FORM",
    "LIST_ROUTE",
    "REACTIVATED",
    "STRIPE_VERSIONS",
    "JournalEntry",
    "Sandbox",
    "SandboxConfig",
    "SandboxThread",
    "StoredEvent",
    "account_calls",
    "drawn",
    "load_account_ids",
    "load_accounts",
    "max_concurrent",
    "max_in_window",
    "parse_rate_limits",
    "serve",
]
