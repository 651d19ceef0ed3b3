"""The retry classifier over Stripe's answers, the backoff policy, and the one retry loop."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdisconnect.client import Answer, _answer
from bulkdisconnect.errors import AuthenticationError, WrongModeError
from bulkdisconnect.model import Outcome, RunStats
from bulkdisconnect.retry import Action, RetryPolicy, classify, classify_list
from bulkdisconnect.stopping import Stop
from tests.support import no_wait, retrier

WRONG_MODE_MESSAGE = (
    "No such financialconnections.account: 'fca_1'; a similar object exists in live mode, "
    "but a test mode key was used to make this request."
)


def account(status: str) -> bytes:
    """A Stripe-shaped Financial Connections account body."""
    return json.dumps(
        {
            "id": "fca_1MqXyZ2eZvKYlo2C",
            "object": "financial_connections.account",
            "category": "cash",
            "livemode": False,
            "status": status,
            "institution_name": "StripeBank",
        }
    ).encode()


def error(kind: str, message: str, code: str | None = None, **extra: Any) -> bytes:
    """A Stripe-shaped error body."""
    body: dict[str, Any] = {"type": kind, "message": message, **extra}
    if code is not None:
        body["code"] = code
    return json.dumps({"error": body}).encode()


def wire(status: int, body: bytes, **headers: str) -> Answer:
    """An Answer parsed by the client from a status, headers and body."""
    return _answer(status, {"Request-Id": "req_123", **headers}, body)


# -- classify over Answer values built directly -----------------------------------------------


@pytest.mark.parametrize(
    ("answer", "action", "outcome"),
    [
        (Answer(200, account_status="disconnected"), Action.FINAL, Outcome.DISCONNECTED),
        (Answer(200, account_status="active"), Action.FINAL, Outcome.FAILED),
        (Answer(200, account_status=None), Action.FINAL, Outcome.FAILED),
        (Answer(200, transport_error="UnreadableBody"), Action.RETRY, None),
        (Answer(404, error_code="resource_missing"), Action.FINAL, Outcome.NOT_FOUND),
        (
            Answer(404, error_code="resource_missing", error_message=WRONG_MODE_MESSAGE),
            Action.FATAL,
            None,
        ),
        (Answer(401, error_type="invalid_request_error"), Action.FATAL, None),
        (Answer(403, error_type="invalid_request_error"), Action.FATAL, None),
        (Answer(409, error_type="idempotency_error"), Action.RETRY, None),
        (Answer(429, error_code="rate_limit"), Action.RETRY, None),
        (Answer(500, error_type="api_error"), Action.RETRY, None),
        (Answer(503), Action.RETRY, None),
        (Answer(0, transport_error="ServerDisconnectedError"), Action.RETRY, None),
        (Answer(0, transport_error="TimeoutError"), Action.RETRY, None),
        (Answer(500, should_retry=False), Action.READ_BACK, None),
        (Answer(409, should_retry=False), Action.FINAL, Outcome.FAILED),
        (Answer(400, should_retry=True), Action.RETRY, None),
        (Answer(400, error_type="invalid_request_error"), Action.FINAL, Outcome.FAILED),
        (Answer(400, error_code="api_key_expired"), Action.FATAL, None),
        (Answer(401, error_code="api_key_expired", should_retry=True), Action.FATAL, None),
    ],
)
def test_classify_answers(answer: Answer, action: Action, outcome: Outcome | None) -> None:
    """Each kind of answer maps to its documented action and outcome."""
    decision = classify(answer)
    assert decision.action is action
    assert decision.outcome == outcome


def test_active_account_is_failed_with_a_reason() -> None:
    """A 200 whose account is not disconnected fails with unexpected_account_status."""
    decision = classify(Answer(200, account_status="active"))
    assert decision.error_code == "unexpected_account_status"
    assert decision.error_message is not None
    assert "'active'" in decision.error_message


# -- classify over answers parsed from Stripe-shaped wire data --------------------------------


def test_wire_disconnected() -> None:
    """A 200 with a disconnected account body is a final disconnect carrying the request ID."""
    answer = wire(200, account("disconnected"))
    assert answer.request_id == "req_123"
    assert classify(answer).outcome is Outcome.DISCONNECTED


@pytest.mark.parametrize("status", [None, 7, {"value": "disconnected"}])
def test_wire_status_that_is_not_a_string_is_not_a_disconnect(status: object) -> None:
    """Only the string "disconnected" counts; any other JSON value fails the account."""
    body = account("disconnected").replace(
        b'"status": "disconnected"', f'"status": {json.dumps(status)}'.encode()
    )
    assert body != account("disconnected")
    decision = classify(wire(200, body))
    assert (decision.action, decision.outcome) == (Action.FINAL, Outcome.FAILED)


def test_wire_still_active() -> None:
    """A 200 with an active account body is final failed with unexpected_account_status."""
    decision = classify(wire(200, account("active")))
    assert (decision.action, decision.outcome) == (Action.FINAL, Outcome.FAILED)
    assert decision.error_code == "unexpected_account_status"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"[1, 2]",
        b'"x"',
        b'{"status": "disconnected"',  # cut off
        b'{"status": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested too deep to decode
    ],
)
def test_wire_unreadable_200_is_retried(body: bytes) -> None:
    """A 200 whose body is not a JSON object is not trusted as a result: it is retried."""
    answer = wire(200, body)
    assert answer.transport_error == "UnreadableBody"
    assert classify(answer).action is Action.RETRY


def test_wire_not_found() -> None:
    """A 404 resource_missing is a final not_found."""
    body = error(
        "invalid_request_error",
        "No such financialconnections.account: 'fca_1'",
        "resource_missing",
        param="account",
    )
    answer = wire(404, body)
    assert answer.error_code == "resource_missing"
    assert classify(answer).outcome is Outcome.NOT_FOUND


def test_wire_wrong_mode_is_fatal() -> None:
    """A 404 saying a similar object exists in the other mode stops the run."""
    answer = wire(404, error("invalid_request_error", WRONG_MODE_MESSAGE, "resource_missing"))
    assert classify(answer).action is Action.FATAL


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, error("invalid_request_error", "Invalid API Key provided: sk_test_****1234")),
        (401, error("invalid_request_error", "Expired API Key provided", "api_key_expired")),
        (
            403,
            error(
                "invalid_request_error",
                "The provided key does not have the required permissions",
                "secret_key_required",
            ),
        ),
    ],
)
def test_wire_auth_failures_are_fatal(status: int, body: bytes) -> None:
    """401 and 403 answers stop the run: every further call would fail the same way."""
    assert classify(wire(status, body)).action is Action.FATAL


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (409, error("idempotency_error", "Keys for idempotent requests can only be used..."), {}),
        (
            429,
            error("invalid_request_error", "Too many requests", "rate_limit"),
            {"Stripe-Rate-Limited-Reason": "global-rate"},
        ),
        (429, error("invalid_request_error", "lock timeout", "lock_timeout"), {}),
        (500, error("api_error", "Something went wrong on Stripe's end."), {}),
        (503, b"<html>Service Unavailable</html>", {}),
    ],
)
def test_wire_transient_failures_are_retried(
    status: int, body: bytes, headers: dict[str, str]
) -> None:
    """Conflicts, rate limits and server errors are retried."""
    assert classify(wire(status, body, **headers)).action is Action.RETRY


def test_wire_rate_limited_reason_is_kept() -> None:
    """The Stripe-Rate-Limited-Reason header is carried on the answer."""
    answer = wire(
        429,
        error("invalid_request_error", "Too many", "rate_limit"),
        **{"Stripe-Rate-Limited-Reason": "endpoint-rate"},
    )
    assert answer.rate_limited_reason == "endpoint-rate"


def test_wire_should_retry_false_on_a_500_is_read_back() -> None:
    """Stripe-Should-Retry: false on a 500: saved under the key, so not retried with it; the
    account is read back (a read's own 500 is a failure: a GET has no key to save it under)."""
    body = error("api_error", "Something went wrong")
    answer = wire(500, body, **{"Stripe-Should-Retry": "false"})
    assert answer.should_retry is False
    assert classify(answer).action is Action.READ_BACK
    decision = classify_list(answer)
    assert (decision.action, decision.outcome) == (Action.FINAL, Outcome.FAILED)


def test_wire_should_retry_true_overrides_400() -> None:
    """Stripe-Should-Retry: true on a 400 makes it retried."""
    body = error("invalid_request_error", "Try again", "processing_error")
    answer = wire(400, body, **{"Stripe-Should-Retry": "true"})
    assert answer.should_retry is True
    assert classify(answer).action is Action.RETRY


def test_wire_plain_400_is_final_failure() -> None:
    """A 400 invalid_request_error is a final failure carrying Stripe's code and message."""
    body = error("invalid_request_error", "This account cannot be disconnected", "account_invalid")
    answer = wire(400, body)
    assert (answer.error_type, answer.error_code) == ("invalid_request_error", "account_invalid")
    assert answer.error_message == "This account cannot be disconnected"
    decision = classify(answer)
    assert (decision.action, decision.outcome) == (Action.FINAL, Outcome.FAILED)


def test_wire_expired_key_code_is_fatal_whatever_the_status() -> None:
    """An api_key_expired code stops the run even on a status that would otherwise be final."""
    body = error("invalid_request_error", "Expired API Key provided", "api_key_expired")
    assert classify(wire(400, body)).action is Action.FATAL


# -- backoff policy ---------------------------------------------------------------------------


def test_delay_grows_exponentially() -> None:
    """Before the cap, each failed attempt doubles the delay's range."""
    policy = RetryPolicy(max_attempts=5, initial_delay=1.0, max_delay=1000.0)
    for attempt in range(1, 8):
        base = 2.0 ** (attempt - 1)
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays)


@pytest.mark.parametrize("attempt", [7, 10, 60, 1100])
def test_delay_is_capped(attempt: int) -> None:
    """However many attempts failed, the delay never exceeds max_delay."""
    policy = RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=20.0)
    assert 10.0 <= policy.delay(attempt) <= 20.0


@given(
    st.integers(min_value=1, max_value=40),
    st.floats(min_value=0.001, max_value=10.0),
    st.floats(min_value=0.0, max_value=100.0),
)
def test_jitter_stays_in_half_to_full_base(attempt: int, initial: float, cap: float) -> None:
    """The jittered delay is always within [0.5, 1] x the capped exponential base."""
    policy = RetryPolicy(max_attempts=5, initial_delay=initial, max_delay=cap)
    base = min(initial * 2.0 ** (attempt - 1), cap)
    assert base * 0.5 <= policy.delay(attempt) <= base


@pytest.mark.parametrize("attempt", [1, 2, 5, 30])
def test_no_wait_policy_waits_zero(attempt: int) -> None:
    """The zero-wait policy used by tests never sleeps."""
    assert no_wait().delay(attempt) == 0.0


# -- the retry loop ---------------------------------------------------------------------------


def scripted(*answers: Answer) -> tuple[list[Answer], Any]:
    """A `send` that returns `answers` one call at a time, and the list of those it gave."""
    given: list[Answer] = []

    async def send() -> Answer:
        given.append(answers[len(given)])
        return given[-1]

    return given, send


OK = Answer(200, account_status="disconnected")
BUSY = Answer(500, error_type="api_error")


@pytest.mark.anyio
async def test_the_loop_retries_until_final_and_counts_each_retry() -> None:
    """Retryable answers are attempted again; the final one ends the loop; retries counted."""
    stats = RunStats()
    _, send = scripted(BUSY, Answer(429, error_code="rate_limit"), OK)
    attempted = await retrier(no_wait(5), stats=stats).call(send, about="fca_1")
    assert attempted is not None
    assert (attempted.answer, attempted.attempts, attempted.decision.outcome) == (
        OK,
        3,
        Outcome.DISCONNECTED,
    )
    assert (stats.requests, stats.retries, stats.rate_limited) == (3, 2, 1)


@pytest.mark.anyio
async def test_the_loop_gives_up_after_max_attempts() -> None:
    """An answer still retryable after the last attempt is returned for the caller to fail."""
    given, send = scripted(BUSY, BUSY, BUSY, OK)
    attempted = await retrier(no_wait(3)).call(send, about="fca_1")
    assert attempted is not None
    assert (attempted.attempts, attempted.decision.action, len(given)) == (3, Action.RETRY, 3)


@pytest.mark.anyio
async def test_a_refusal_raises_the_error_classify_built() -> None:
    """A 401 raises the AuthenticationError of classify's decision, naming Stripe's words."""
    refused = Answer(401, error_message="Invalid API Key provided: sk_test_****")
    assert isinstance(classify(refused).refusal, AuthenticationError)
    _, send = scripted(refused)
    with pytest.raises(AuthenticationError, match="Invalid API Key provided"):
        await retrier().call(send, about="fca_1")
    wrong_mode = Answer(
        404,
        error_code="resource_missing",
        error_message="No such account; a similar object exists in live mode, but a test mode "
        "key was used to make this request.",
    )
    assert isinstance(classify(wrong_mode).refusal, WrongModeError)


@pytest.mark.anyio
async def test_a_stop_ends_the_back_off_and_sends_nothing_more() -> None:
    """A stop during a back-off returns None at once: the next attempt is never sent."""
    stop = Stop()
    given, send = scripted(BUSY, OK)
    loop = retrier(RetryPolicy(max_attempts=5, initial_delay=3600, max_delay=3600), stop=stop)

    async def stop_soon() -> None:
        while not given:
            await anyio.lowlevel.checkpoint()
        stop.request()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_soon)
        with anyio.fail_after(10):  # far below the hour of back-off
            assert await loop.call(send, about="fca_1") is None
    assert given == [BUSY]


@pytest.mark.anyio
async def test_a_stop_before_an_attempt_sends_nothing() -> None:
    """Once a stop is asked for, the loop admits no attempt at all."""
    stop = Stop()
    stop.request()
    given, send = scripted(OK)
    assert await retrier(stop=stop).call(send, about="fca_1") is None
    assert given == []


def test_list_pages_are_final_and_the_rest_classified_as_disconnects() -> None:
    """For list calls a 200 page is final; errors mean what they mean for a disconnect."""
    assert classify_list(Answer(200)).action is Action.FINAL
    assert classify_list(Answer(200, transport_error="UnreadableBody")).action is Action.RETRY
    assert classify_list(BUSY).action is Action.RETRY
    assert classify_list(Answer(401)).action is Action.FATAL
