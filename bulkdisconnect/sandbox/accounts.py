"""The sandbox's accounts: the status each one has now, and the routes that read them."""

from __future__ import annotations

import itertools

from multidict import MultiMapping

from bulkdisconnect.model import CUSTOMER_ID_PATTERN
from bulkdisconnect.sandbox.config import CONNECTED_ACCOUNT_PATTERN, SandboxConfig, drawn
from bulkdisconnect.sandbox.wire import (
    _LIST_PARAMS,
    _UNSUPPORTED_LIST_PARAMS,
    LIST_ROUTE,
    _account_index,
    _account_json,
    _Answer,
    _born_disconnected,
    _error,
    _exists,
    _holder_accounts,
    _holder_of,
    _holder_prefix,
    _limit,
    _list_body,
    _missing,
    _Note,
    _unknown_param,
)


class AccountStates:
    """What disconnects changed: the accounts disconnected, and those active again since."""

    def __init__(self) -> None:
        self.disconnected: set[str] = set()
        self.reactivated: set[str] = set()  # disconnected, then active again
        self._settled: set[str] = set()  # reactivated once already: a later disconnect holds

    def status(self, account: str, config: SandboxConfig) -> str:
        """The account's status now: active, inactive or disconnected."""
        if account in self.reactivated:
            return "active"
        if account in self.disconnected or _born_disconnected(account, config):
            return "disconnected"
        return "inactive" if account in config.inactive else "active"

    def disconnect(self, account: str, config: SandboxConfig) -> tuple[bool, bool]:
        """Disconnect `account`: whether its status changed, and whether the reactivate_share
        knob turns it back to active right after (only the first time it is disconnected)."""
        changed = self.status(account, config) != "disconnected"
        self.disconnected.add(account)
        self.reactivated.discard(account)
        if not changed or account in self._settled:
            return changed, False
        if not drawn(config.reactivate_share, config.seed, "reactivate", account):
            return changed, False
        self.reactivated.add(account)
        self._settled.add(account)
        return changed, True

    def account_json(
        self,
        account: str,
        config: SandboxConfig,
        *,
        holder: str | None = None,
        status: str | None = None,
    ) -> str:
        """The account object as JSON, with its status now unless `status` says otherwise."""
        return _account_json(
            account,
            livemode=config.livemode_accounts,
            status=status if status is not None else self.status(account, config),
            holder=holder if holder is not None else _holder_of(account),
        )

    def retrieve(
        self, account: str, query: MultiMapping[str], owner: str, config: SandboxConfig, note: _Note
    ) -> _Answer:
        """GET /v1/financial_connections/accounts/{account} for Stripe account `owner`."""
        bad = _unknown_param(query, frozenset())
        if bad is not None:
            return bad
        exists = _exists(account, config, owner)
        missing = _missing("financial connections account", account, exists, config, note)
        if missing is not None:
            return missing
        return _Answer(200, self.account_json(account, config).encode())

    def list_page(
        self, query: MultiMapping[str], owner: str, config: SandboxConfig, note: _Note
    ) -> _Answer:
        """One page of a holder's accounts (a customer's or a connected account's), in ID order,
        as Stripe's list envelope; only those Stripe account `owner` owns."""
        bad = _unknown_param(query, _LIST_PARAMS, _UNSUPPORTED_LIST_PARAMS)
        if bad is not None:
            return bad
        customer = query.get("account_holder[customer]", "")
        holder_account = query.get("account_holder[account]", "")
        if customer and holder_account:  # "mutually exclusive" (stripe/openapi)
            message = (
                "You may only specify one of these parameters: account_holder[account], "
                "account_holder[customer]."
            )
            return _error(400, message, param="account_holder")
        if not customer and not holder_account:
            return _error(
                400,
                "Missing required param: account_holder[customer].",
                code="parameter_missing",
                param="account_holder",
            )
        limit = _limit(query)
        if isinstance(limit, _Answer):
            return limit
        if customer:
            holder, kind, param = customer, "customer", "account_holder[customer]"
            well_formed = CUSTOMER_ID_PATTERN.fullmatch(customer)
        else:
            holder, kind, param = holder_account, "account", "account_holder[account]"
            well_formed = CONNECTED_ACCOUNT_PATTERN.fullmatch(holder_account)
        exists = well_formed is not None and holder not in config.missing
        missing = _missing(kind, holder, exists, config, note, param=param)
        if missing is not None:
            return missing
        prefix = _holder_prefix(holder)
        start = 0
        if (after := query.get("starting_after")) is not None:
            index = _account_index(after, prefix, config, owner)
            if index is None:
                return _error(
                    400,
                    f"No such financial connections account: '{after}'",
                    code="resource_missing",
                    param="starting_after",
                )
            start = index + 1
        page = list(itertools.islice(_holder_accounts(prefix, start, config, owner), limit + 1))
        data = (self.account_json(account, config, holder=holder) for account in page[:limit])
        return _Answer(200, _list_body(data, len(page) > limit, LIST_ROUTE))
