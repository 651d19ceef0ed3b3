"""Retrying calls to Stripe: the policy as data, the one classifier, and the one retry loop.

`Retrier.call` is used by disconnects and list calls alike: each attempt passes the run's
meters, every answer is classified, a retryable one waits out a capped, jittered back-off
that a stop signal cuts short, and every retry is counted. An answer that refuses the run
as a whole raises the `RunRefusedError` that `classify` built for it.
"""

from __future__ import annotations

import enum
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import anyio
import structlog

from bulkdisconnect.client import Answer
from bulkdisconnect.errors import AuthenticationError, RunRefusedError, WrongModeError
from bulkdisconnect.limiter import Meters, RateLimiter, Ticket
from bulkdisconnect.metrics import RunMetrics
from bulkdisconnect.model import Outcome, RunStats
from bulkdisconnect.stopping import Stop

log = structlog.get_logger("bulkdisconnect")

# Stripe's resource_missing message when the object exists in the other mode, e.g.
# "...; a similar object exists in live mode, but a test mode key was used to make this request."
WRONG_MODE = re.compile(r"similar object exists in (live|test) mode")
FATAL_CODES = frozenset({"api_key_expired", "platform_api_key_expired", "secret_key_required"})


class Action(enum.Enum):
    """What to do after an attempt."""

    FINAL = "final"  # record `outcome`
    RETRY = "retry"  # try again after a backoff, if attempts remain
    # Stripe saved this 5xx under the Idempotency-Key (Stripe-Should-Retry: false): every retry
    # with the key gets it again; only reading the account back tells what happened.
    READ_BACK = "read_back"
    FATAL = "fatal"  # stop the whole run: the key or its mode is wrong


@dataclass(frozen=True, slots=True)
class Decision:
    """The classifier's verdict on one answer."""

    action: Action
    outcome: Outcome | None = None
    error_code: str | None = None  # overrides the answer's code (e.g. a 200 not disconnected)
    error_message: str | None = None
    refusal: RunRefusedError | None = None  # FATAL: the error that stops the run
    # The platform has no access to the connected account: its other accounts fail alike.
    refuses_account: bool = False


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many attempts an account gets and how long to wait between them.

    Backoff is capped exponential with jitter in [0.5, 1] x delay, the shape of Stripe's own
    SDK (stripe-python `_http_client._sleep_time_seconds`), with a larger cap because a batch
    job can afford to wait where an interactive request cannot.
    """

    max_attempts: int
    initial_delay: float
    max_delay: float

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the `failed_attempts`-th failed attempt."""
        exponent = min(failed_attempts - 1, 62)  # 2.0 ** 1024 overflows; the cap binds long before
        base = min(self.initial_delay * 2.0**exponent, self.max_delay)
        return base * _JITTER.uniform(0.5, 1.0)


_JITTER = random.Random()


DISCONNECTED = Decision(Action.FINAL, Outcome.DISCONNECTED)  # the common verdict, made once
ACCOUNT_REFUSED = Decision(Action.FINAL, Outcome.FAILED, refuses_account=True)
SAVED_ERROR = Decision(Action.READ_BACK)


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
    if status == 403 and answer.error_code == "account_invalid":
        return ACCOUNT_REFUSED
    if status in (401, 403) or answer.error_code in FATAL_CODES:
        return Decision(Action.FATAL, refusal=_key_refused(answer))
    if status == 404 and answer.error_code == "resource_missing":
        if answer.error_message and WRONG_MODE.search(answer.error_message):
            return Decision(
                Action.FATAL,
                refusal=WrongModeError(
                    f"the API key's mode does not match the accounts': {answer.error_message}"
                ),
            )
        return Decision(Action.FINAL, Outcome.NOT_FOUND)
    if answer.should_retry is not None:
        if answer.should_retry:
            return Decision(Action.RETRY)
        return SAVED_ERROR if status >= 500 else _failed(answer)
    if status == 0 or answer.transport_error or status in (409, 429) or status >= 500:
        return Decision(Action.RETRY)
    return _failed(answer)


LISTED = Decision(Action.FINAL)  # a page of a list call, or an object read


def classify_list(answer: Answer) -> Decision:
    """Decide what a read's answer means (a list page, an account read back): a 200 is
    final, the rest as `classify` (a 5xx is not saved under any key: a GET has none)."""
    if answer.status == 200 and answer.transport_error is None:
        return LISTED
    decision = classify(answer)
    return _failed(answer) if decision.action is Action.READ_BACK else decision


def _failed(answer: Answer) -> Decision:
    return Decision(Action.FINAL, Outcome.FAILED)


def _key_refused(answer: Answer) -> AuthenticationError:
    """The run-fatal error for a refused key; Stripe's own message says what is wrong."""
    code = f", {answer.error_code}" if answer.error_code else ""
    return AuthenticationError(
        f"the API refused the key (HTTP {answer.status}{code}): "
        f"{answer.error_message or 'no message'}; fix STRIPE_API_KEY / --api-key-file and rerun"
    )


_DONE = (Action.FINAL, Action.READ_BACK)


class Meter(Protocol):
    """What every attempt passes before it goes out, and learns from after (limiter.Meters)."""

    async def admit(self) -> Ticket | None:
        """Wait for the attempt's turn; its ticket, or None, holding nothing, if the run
        stopped first."""
        ...

    def release(self, ticket: Ticket) -> None:
        """The attempt is over: give back what `admit` took (once), note how long it took."""
        ...

    def observe(self, ticket: Ticket, answer: Answer) -> None:
        """Learn from a released attempt's answer and how long it took."""
        ...


class Attempted(NamedTuple):
    """How a call's attempts ended: its last answer, that answer's verdict, how many."""

    answer: Answer
    decision: Decision
    attempts: int
    first_attempt_at: float  # wall clock, for the audit


@dataclass(kw_only=True, eq=False)
class Retrier:
    """The one retry loop for calls to Stripe (see the module docstring)."""

    policy: RetryPolicy
    meter: Meter
    stop: Stop
    stats: RunStats
    metrics: RunMetrics | None = None

    async def call(
        self,
        send: Callable[[], Awaitable[Answer]],
        *,
        about: str,
        judge: Callable[[Answer], Decision] = classify,
        meter: Meter | None = None,
        ticket: Ticket | None = None,
        max_attempts: int | None = None,
    ) -> Attempted | None:
        """Attempt `send` until an answer is final or the attempts are spent; None if the
        run stopped first (nothing more was sent). Raises the refusal of a fatal answer.

        `about` names what is called (an account, a customer) in the retry log lines;
        `judge` classifies its answers (`classify_list` for list calls); `meter` is the
        account's budget (default: the run's own); `ticket`, the first attempt's, already
        admitted through it; `max_attempts`, the attempts left of the policy's (an account's
        read-back and its retries under a new key share them).
        """
        meter = meter or self.meter
        max_attempts = max_attempts or self.policy.max_attempts
        first_attempt_at = time.time()
        attempts = 0
        while True:
            if ticket is None:
                ticket = await meter.admit()
                if ticket is None:
                    return None
            try:
                answer = await send()
            finally:
                meter.release(ticket)
            attempts += 1
            meter.observe(ticket, answer)
            ticket = None
            decision = judge(answer)
            if decision.action is Action.FATAL:
                assert decision.refusal is not None
                raise decision.refusal
            if decision.action in _DONE or attempts >= max_attempts:
                return Attempted(answer, decision, attempts, first_attempt_at)
            if not await self._back_off(answer, attempts, about):
                return None

    async def _back_off(self, answer: Answer, attempts: int, about: str) -> bool:
        """Count and log a retry, and wait before it; False if the run stopped meanwhile."""
        delay = self.policy.delay(attempts)
        self.stats.retries += 1
        if self.metrics is not None:
            self.metrics.retry()
        log.debug(
            "bulkdisconnect.retry",
            about=about,
            attempt=attempts,
            delay=round(delay, 3),
            **answer.described(),
        )
        with self.stop.cancels():
            await anyio.sleep(delay)
        return not self.stop.requested.is_set()


class Pace(Protocol):
    """How fast and how patiently a command calls Stripe (a run's, reconcile's, verify's)."""

    @property
    def rate(self) -> float: ...
    @property
    def total_rate(self) -> float | None: ...
    @property
    def concurrency(self) -> int | None: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def retry_delay(self) -> float: ...
    @property
    def retry_max_delay(self) -> float: ...


def metered(
    pace: Pace, *, stats: RunStats, stop: Stop, metrics: RunMetrics | None = None
) -> tuple[Meters, Retrier]:
    """A command's meters (each Stripe account's budget at `rate`, the total cap) and the
    retry loop through them, which list calls, reads and disconnects share."""
    total = None if pace.total_rate is None else RateLimiter(pace.total_rate)
    meters = Meters(
        RateLimiter(pace.rate),
        concurrency=pace.concurrency,
        stats=stats,
        stop=stop,
        metrics=metrics,
        total=total,
    )
    policy = RetryPolicy(
        max_attempts=pace.max_attempts,
        initial_delay=pace.retry_delay,
        max_delay=pace.retry_max_delay,
    )
    return meters, Retrier(policy=policy, meter=meters, stop=stop, stats=stats, metrics=metrics)
