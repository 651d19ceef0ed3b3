"""The sandbox's knobs: faults, account universe, webhooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Fault knobs and account universe of a sandbox; probabilities are per request."""

    latency_ms: float = 0.0  # added to every API answer
    jitter_ms: float = 0.0  # latency is uniform in latency ± jitter, floored at 0
    p500: float = 0.0
    p429: float = 0.0  # code rate_limit, reason endpoint-rate
    p_lock_timeout: float = 0.0  # 429 code lock_timeout, Stripe-Should-Retry: true
    p_drop: float = 0.0  # close the connection without answering
    p_hang: float = 0.0  # say nothing for hang_seconds, then close
    hang_seconds: float = 3600.0
    rate_limit: float | None = None  # most requests let in per sliding second (global-rate)
    accounts: frozenset[str] | None = None  # if set, only these account IDs exist
    missing: frozenset[str] = frozenset()  # account (or customer) IDs that do not exist
    accounts_per_customer: int = 3  # accounts every implicit customer has
    disconnected_per_customer: int = 0  # the first this many of them start disconnected
    livemode_accounts: bool = False  # accounts live in live mode, so test keys don't see them
    api_key: str | None = None  # if set, the only key accepted
    revoke_after: int | None = None  # answered API calls before the key stops working
    seed: int | None = None  # of the fault and jitter random numbers
    webhook_url: str | None = None  # where to send financial_connections.account.disconnected
    webhook_secret: str | None = None  # signs those events (Stripe-Signature)

    def __post_init__(self) -> None:
        faults = (self.p500, self.p429, self.p_lock_timeout, self.p_drop, self.p_hang)
        if not all(0.0 <= p <= 1.0 for p in faults) or sum(faults) > 1.0:
            raise ValueError("fault probabilities must each be in [0, 1] and sum to at most 1")
        if min(self.latency_ms, self.jitter_ms, self.hang_seconds) < 0:
            raise ValueError("latency_ms, jitter_ms and hang_seconds must be >= 0")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 requests/s, or None for no limit")
        if min(self.accounts_per_customer, self.disconnected_per_customer) < 0:
            raise ValueError("accounts_per_customer and disconnected_per_customer must be >= 0")


def _config_changes(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError("expected a JSON object of SandboxConfig fields")
    names = {f.name for f in dataclasses.fields(SandboxConfig)}
    if unknown := raw.keys() - names:
        raise ValueError(f"unknown sandbox settings {sorted(unknown)}; known: {sorted(names)}")
    changes = dict(raw)
    for name in ("accounts", "missing"):
        if changes.get(name) is not None:
            if not isinstance(changes[name], list):
                raise TypeError(f"{name} must be a list of account IDs")
            changes[name] = frozenset(map(str, changes[name]))
    return changes


def load_account_ids(path: str | Path) -> frozenset[str]:
    """Account IDs from a file, one a line; blank lines and `#` comments are skipped."""
    with Path(path).open(encoding="utf-8") as lines:
        return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))
