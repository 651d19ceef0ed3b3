"""The sandbox's request journal and what tests and benchmarks measure from it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One request as the sandbox saw it; the API key itself is never kept."""

    at: float  # the sandbox's clock (time.monotonic() unless faked) on arrival
    method: str
    path: str  # raw, as received
    # From the disconnect or retrieve route, decoded; None for a list call.
    account_id: str | None
    idempotency_key: str | None
    stripe_account: str | None  # the Stripe-Account header; None without one (the platform)
    stripe_version: str | None
    user_agent: str | None
    content_type: str | None
    authorized: bool  # an Authorization header was present
    status: int  # 0 when no answer was sent
    replayed: bool
    # drop, hang, p500, p500_saved (executed, then 500), p429, lock_timeout, rate_limit,
    # revoked (the key) or account_invalid (a revoked Stripe-Account)
    fault: str | None
    request_id: str | None = None
    done_at: float = 0.0  # the clock when the answer was sent (or the request given up)


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most `times` in any half-open window [t, t + window): the rate a server saw."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] + window <= t:
            start += 1
        best = max(best, end - start + 1)
    return best


def max_concurrent(journal: Iterable[JournalEntry]) -> int:
    """The most requests the server was working on at one moment."""
    events = sorted(
        [(e.at, 1) for e in journal] + [(e.done_at, -1) for e in journal],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    busy = peak = 0
    for _, step in events:
        busy += step
        peak = max(peak, busy)
    return peak


def account_calls(
    journal: Iterable[JournalEntry], methods: Collection[str] = ("POST",)
) -> Counter[str]:
    """How many disconnect requests (by default; "GET" counts retrieves) reached the sandbox for
    each account ID."""
    return Counter(
        e.account_id for e in journal if e.account_id is not None and e.method in methods
    )
