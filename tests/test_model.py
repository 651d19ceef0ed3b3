"""Account ID validation and idempotency keys: what may reach a URL and what a retry resends."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdisconnect.model import MAX_ACCOUNT_ID_LENGTH, idempotency_key, is_valid_account_id

SAFE = re.compile(r"fca_[A-Za-z0-9_]*")


@pytest.mark.parametrize(
    "value",
    [
        "fca_1",
        "fca_1MqXyZ2eZvKYlo2C0123abcd",
        "fca_ABCxyz789",
        "fca_" + "a" * (MAX_ACCOUNT_ID_LENGTH - 4),
    ],
)
def test_accepts_plain_account_ids(value: str) -> None:
    """`fca_` followed by ASCII letters and digits, up to the length cap, is a valid ID."""
    assert is_valid_account_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "fca_../../v1/customers",
        "fca_1?x=1",
        "fca_1#frag",
        "fca_a/b",
        "fca_a%2F",
        "fca_a b",
        "fca_a\tb",
        " fca_1",
        "fca_1 ",
        "fca_1\n",
        "fca_1\r\n",
        "fca_\u00e4",
        "fca_\u0661",  # Arabic-Indic digit one: a unicode digit, not an ASCII one
        "fca_1\x00",
        "",
        "fca_",
        "FCA_1",
        "fca-1",
        "acct_1",
        "fca_a_b",
        "fca_" + "a" * (MAX_ACCOUNT_ID_LENGTH - 3),
    ],
)
def test_rejects_hostile_or_malformed_values(value: str) -> None:
    """Path, query, whitespace, unicode, empty, wrong-case and over-long values are refused."""
    assert not is_valid_account_id(value)


@given(st.text())
def test_accepted_values_are_url_safe_for_any_text(value: str) -> None:
    """Whatever text is offered, an accepted value holds only [A-Za-z0-9_] and starts with fca_."""
    if is_valid_account_id(value):
        assert SAFE.fullmatch(value) is not None
        assert value.isascii()
        assert len(value) <= MAX_ACCOUNT_ID_LENGTH


@given(st.from_regex(r"fca_[A-Za-z0-9_/?%#.\-\s]{0,20}", fullmatch=True))
def test_accepted_prefixed_values_are_url_safe(value: str) -> None:
    """Values shaped like IDs but salted with URL metacharacters are accepted only when clean."""
    assert is_valid_account_id(value) == (re.fullmatch(r"fca_[A-Za-z0-9]+", value) is not None)


def test_idempotency_key_is_pinned() -> None:
    """The key of a (job, account) never changes between versions: a rerun after an upgrade
    must send the key the first run sent, or Stripe would act twice instead of replaying."""
    assert (
        idempotency_key("purge-2026-11", "fca_1MtR4sA5bCdEfGh")
        == "bulkdisconnect-463db23d25a1c255f3bbff843eddd7ba"
    )


def test_idempotency_key_is_deterministic() -> None:
    """The key for (job, account) is the same on every call, so a retry resends the same key."""
    assert idempotency_key("purge", "fca_1") == idempotency_key("purge", "fca_1")


def test_idempotency_key_differs_across_accounts_and_jobs() -> None:
    """Different accounts, or the same account in different jobs, get different keys."""
    keys = {
        idempotency_key("purge", "fca_1"),
        idempotency_key("purge", "fca_2"),
        idempotency_key("other", "fca_1"),
        # A naive concatenation would make these two collide.
        idempotency_key("purge1", "fca_"),
        idempotency_key("purge", "1fca_"),
    }
    assert len(keys) == 5


@given(st.text(max_size=300), st.text(max_size=300))
def test_idempotency_key_fits_stripe_limit(job: str, account_id: str) -> None:
    """Every key is at most 255 characters, Stripe's Idempotency-Key limit, and plain ASCII."""
    key = idempotency_key(job, account_id)
    assert len(key) <= 255
    assert key.isascii()
    assert key.isprintable()
