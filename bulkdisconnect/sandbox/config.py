"""The sandbox's knobs: faults, account universe, webhooks; and the files that fill them."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A connected account's ID as the sandbox takes it in knobs (and in account_holder[account]).
CONNECTED_ACCOUNT_PATTERN = re.compile(r"acct_[A-Za-z0-9]+")


@dataclass(frozen=True, kw_only=True)
class SandboxConfig:
    """Fault knobs and account universe of a sandbox; probabilities are per request.

    A Stripe account is the `Stripe-Account` header of a request: an `acct_…` ID, or "" (no
    header) for the platform itself. Mappings are taken as given and never changed.
    """

    latency_ms: float = 0.0  # added to every API answer
    jitter_ms: float = 0.0  # latency is uniform in latency ± jitter, floored at 0
    p500: float = 0.0  # before execution: nothing happens, nothing is saved under the key
    # The disconnect executes, then answers 500 (Stripe-Should-Retry: false), saved under the
    # Idempotency-Key so every retry with it gets the same 500; on other routes no fault.
    p500_saved: float = 0.0
    p429: float = 0.0  # code rate_limit, reason endpoint-rate
    p_lock_timeout: float = 0.0  # 429 code lock_timeout, Stripe-Should-Retry: true
    p_drop: float = 0.0  # close the connection without answering
    p_hang: float = 0.0  # say nothing for hang_seconds, then close
    hang_seconds: float = 3600.0
    # Most requests let in per sliding second, for each Stripe account separately (global-rate),
    # as Stripe meters them; rate_limits overrides it for some (acct_… or "" for the platform).
    rate_limit: float | None = None
    rate_limits: Mapping[str, float] = field(default_factory=dict)
    # If set, only these account IDs exist: a set holds the platform's own accounts, a mapping
    # names the Stripe account that owns each one ("" = the platform). Unset: every well-formed
    # ID exists under every Stripe account.
    accounts: frozenset[str] | Mapping[str, str] | None = None
    missing: frozenset[str] = frozenset()  # account, customer or acct_ IDs that do not exist
    inactive: frozenset[str] = frozenset()  # accounts whose status is inactive until disconnected
    accounts_per_customer: int = 3  # accounts every implicit holder (customer, acct_) has
    disconnected_per_customer: int = 0  # the first this many of them start disconnected
    livemode_accounts: bool = False  # accounts live in live mode, so test keys don't see them
    api_key: str | None = None  # if set, the only key accepted
    revoke_after: int | None = None  # answered API calls before the key stops working
    # Connected accounts that took the platform's access away: 403 account_invalid for any
    # request with one of them in its Stripe-Account header.
    revoked_accounts: frozenset[str] = frozenset()
    # Per-account shares, drawn from the seed and the account ID (see `drawn`), so the same
    # accounts are picked on every run: their disconnected events are never emitted (neither
    # listed by GET /v1/events nor sent to webhook_url); they appear in the list only
    # event_delay_seconds (the sandbox's clock) after the disconnect; a retrieve after their
    # first disconnect reports them active again (a later disconnect holds).
    event_drop_share: float = 0.0
    event_delay_share: float = 1.0
    event_delay_seconds: float = 0.0
    reactivate_share: float = 0.0
    seed: int | None = None  # of the fault and jitter random numbers, and of the shares above
    webhook_url: str | None = None  # where to send financial_connections.account.disconnected
    webhook_secret: str | None = None  # signs those events (Stripe-Signature)

    def __post_init__(self) -> None:
        faults = (
            self.p500,
            self.p500_saved,
            self.p429,
            self.p_lock_timeout,
            self.p_drop,
            self.p_hang,
        )
        if not all(0.0 <= p <= 1.0 for p in faults) or sum(faults) > 1.0:
            raise ValueError("fault probabilities must each be in [0, 1] and sum to at most 1")
        shares = {
            "event_drop_share": self.event_drop_share,
            "event_delay_share": self.event_delay_share,
            "reactivate_share": self.reactivate_share,
        }
        for name, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if min(self.latency_ms, self.jitter_ms, self.hang_seconds, self.event_delay_seconds) < 0:
            raise ValueError(
                "latency_ms, jitter_ms, hang_seconds and event_delay_seconds must be >= 0"
            )
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 requests/s, or None for no limit")
        for account, limit in self.rate_limits.items():
            if account and not CONNECTED_ACCOUNT_PATTERN.fullmatch(account):
                raise ValueError(f"rate_limits keys must be acct_… IDs or '', got {account!r}")
            if not limit > 0:
                raise ValueError(f"rate_limits[{account!r}] must be > 0 requests/s, got {limit}")
        for account in self.revoked_accounts:
            if not CONNECTED_ACCOUNT_PATTERN.fullmatch(account):
                raise ValueError(f"revoked_accounts must be acct_… IDs, got {account!r}")
        if min(self.accounts_per_customer, self.disconnected_per_customer) < 0:
            raise ValueError("accounts_per_customer and disconnected_per_customer must be >= 0")


def _config_changes(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError("expected a JSON object of SandboxConfig fields")
    names = {f.name for f in dataclasses.fields(SandboxConfig)}
    if unknown := raw.keys() - names:
        raise ValueError(f"unknown sandbox settings {sorted(unknown)}; known: {sorted(names)}")
    changes = dict(raw)
    for name in ("accounts", "missing", "inactive", "revoked_accounts"):
        value = changes.get(name)
        if name == "accounts" and isinstance(value, dict):  # account ID -> its Stripe account
            changes[name] = {str(k): _owner(v, f"accounts[{k!r}]") for k, v in value.items()}
        elif value is not None:
            if not isinstance(value, list):
                raise TypeError(f"{name} must be a list of IDs")
            changes[name] = frozenset(map(str, value))
    if (limits := changes.get("rate_limits")) is not None:
        if not isinstance(limits, dict) or not all(
            isinstance(n, int | float) and not isinstance(n, bool) for n in limits.values()
        ):
            raise TypeError("rate_limits must be an object of Stripe account -> requests/s")
        changes["rate_limits"] = {str(k): float(v) for k, v in limits.items()}
    return changes


def drawn(share: float, seed: int | None, knob: str, ident: str) -> bool:
    """Whether the per-ID knob `knob` of this `share` picks `ident`: the same for the same seed.

    A hash rather than the fault RNG, so the pick depends neither on the order of requests nor
    on how many there were: a test can tell in advance which accounts a share picks.
    """
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}|{knob}|{ident}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


def _owner(value: object, where: str) -> str:
    """A Stripe account owning an account: an acct_ ID, or "" (None too) for the platform."""
    owner = "" if value is None else str(value).strip()
    if owner and not CONNECTED_ACCOUNT_PATTERN.fullmatch(owner):
        raise ValueError(f"{where}: the Stripe account must be acct_… or empty, got {value!r}")
    return owner


def _lines(path: Path) -> list[tuple[int, str]]:
    """The trimmed lines of a file with their numbers, without blanks and `#` comments."""
    with path.open(encoding="utf-8", newline="") as lines:
        return [
            (number, s)
            for number, line in enumerate(lines, start=1)
            if (s := line.strip()) and not s.startswith("#")
        ]


def load_account_ids(path: str | Path) -> frozenset[str]:
    """Account IDs from a file, one a line; blank lines and `#` comments are skipped."""
    return frozenset(line for _, line in _lines(Path(path)))


def load_accounts(path: str | Path) -> frozenset[str] | dict[str, str]:
    """The `accounts` knob from a file: IDs one a line (the platform's own), or a CSV whose header
    names `account_id` and `stripe_account` columns (the account's owner; empty = the platform).

    Raises ValueError naming the file and line of a bad owner or of an ID given two owners.
    """
    path = Path(path)
    lines = _lines(path)
    header = [name.strip() for name in next(csv.reader([lines[0][1]]))] if lines else []
    if "account_id" not in header and "stripe_account" not in header:
        return frozenset(line for _, line in lines)
    if "account_id" not in header:
        raise ValueError(f"{path}: the CSV header has no account_id column")
    owners: dict[str, str] = {}
    for number, line in lines[1:]:
        row = dict(zip(header, next(csv.reader([line])), strict=False))
        where = f"{path}, line {number}"
        account = row.get("account_id", "").strip()
        owner = _owner(row.get("stripe_account"), where)
        if account and owners.setdefault(account, owner) != owner:
            raise ValueError(
                f"{where}: {account} is listed under both {owners[account] or 'the platform'} "
                f"and {owner or 'the platform'}"
            )
    return owners if any(owners.values()) else frozenset(owners)


def parse_rate_limits(items: Iterable[str]) -> dict[str, float]:
    """`acct_…=N` items (the CLI's --rate-limit-for) as the `rate_limits` knob."""
    limits: dict[str, float] = {}
    for item in items:
        account, equals, number = item.partition("=")
        try:
            limit = float(number)
        except ValueError:
            limit = 0.0
        if not equals or not CONNECTED_ACCOUNT_PATTERN.fullmatch(account) or not limit > 0:
            raise ValueError(f"expected acct_…=N with N > 0 requests/s, got {item!r}")
        limits[account] = limit
    return limits
