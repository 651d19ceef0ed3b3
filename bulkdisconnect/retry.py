"""Retry policy as data, and the one classifier that turns an `Answer` into a decision."""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass

from bulkdisconnect.client import Answer
from bulkdisconnect.model import Outcome

# Stripe's resource_missing message when the object exists in the other mode, e.g.
# "...; a similar object exists in live mode, but a test mode key was used to make this request."
WRONG_MODE = re.compile(r"similar object exists in (live|test) mode")
FATAL_CODES = frozenset({"api_key_expired", "platform_api_key_expired", "secret_key_required"})


class Action(enum.Enum):
    """What to do after an attempt."""

    FINAL = "final"  # record `outcome`
    RETRY = "retry"  # try again after a backoff, if attempts remain
    FATAL = "fatal"  # stop the whole run: the key or its mode is wrong


@dataclass(frozen=True, slots=True)
class Decision:
    """The classifier's verdict on one answer."""

    action: Action
    outcome: Outcome | None = None
    error_code: str | None = None  # overrides the answer's code (e.g. a 200 not disconnected)
    error_message: str | None = None


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many attempts an account gets and how long to wait between them.

    Backoff is capped exponential with jitter in [0.5, 1] x delay, the shape of Stripe's own
    SDK (stripe-python `_http_client._sleep_time_seconds`), with a larger cap because a batch
    job can afford to wait where an interactive request cannot.
    """

    max_attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the `failed_attempts`-th failed attempt."""
        exponent = min(failed_attempts - 1, 62)  # 2.0 ** 1024 overflows; the cap binds long before
        base = min(self.initial_delay * 2.0**exponent, self.max_delay)
        return base * _JITTER.uniform(0.5, 1.0)


_JITTER = random.Random()
NO_WAIT = RetryPolicy(initial_delay=0.0, max_delay=0.0)


DISCONNECTED = Decision(Action.FINAL, Outcome.DISCONNECTED)  # the common verdict, made once


def classify(answer: Answer) -> Decision:
    """Decide what an answer means: final outcome, retry, or stop the run."""
    status = answer.status
    if status == 200 and answer.transport_error is None:
        if answer.account_status == "disconnected":
            return DISCONNECTED
        return Decision(
            Action.FINAL,
            Outcome.FAILED,
            error_code="unexpected_account_status",
            error_message=f"the API answered 200 but the account status is "
            f"{answer.account_status!r}, not 'disconnected'",
        )
    if status in (401, 403) or answer.error_code in FATAL_CODES:
        return Decision(Action.FATAL)
    if status == 404 and answer.error_code == "resource_missing":
        if answer.error_message and WRONG_MODE.search(answer.error_message):
            return Decision(Action.FATAL)
        return Decision(Action.FINAL, Outcome.NOT_FOUND)
    if answer.should_retry is not None:
        return Decision(Action.RETRY) if answer.should_retry else _failed(answer)
    if status == 0 or answer.transport_error or status in (409, 429) or status >= 500:
        return Decision(Action.RETRY)
    return _failed(answer)


def _failed(answer: Answer) -> Decision:
    return Decision(Action.FINAL, Outcome.FAILED)
