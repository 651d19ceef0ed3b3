"""Idempotency-Key handling as Stripe does it: answers saved once execution began, replayed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from bulkdisconnect.sandbox.wire import Signature, _Answer, _error, _Note


@dataclass(frozen=True, slots=True)
class _Saved:
    signature: Signature
    answer: _Answer
    request_id: str


class IdempotencyCache:
    """Answers saved under Idempotency-Keys, and the keys whose first request still runs.

    Stripe scopes a key to the Stripe account acted on and to the API key's mode, so a slot is
    the three of them.
    """

    def __init__(self) -> None:
        self._saved: dict[str, _Saved] = {}
        self._in_flight: dict[str, Signature] = {}

    @staticmethod
    def slot(mode: str, stripe_account: str, key: str) -> str:
        """Where a key's answer is kept: per mode and Stripe account ("" = the platform)."""
        return f"{mode}|{stripe_account}|{key}"

    def check(self, key: str, slot: str, signature: Signature, note: _Note) -> _Answer | None:
        """The saved answer to replay, a 400 for other parameters, a 409 while the first request
        runs, or None for a key not used yet."""
        saved = self._saved.get(slot)
        first = saved.signature if saved is not None else self._in_flight.get(slot)
        if first is None:
            return None
        if first != signature:
            differs = (
                f"for the same endpoint they were first used for ('{first[0]}' vs '{signature[0]}')"
                if first[0] != signature[0]
                else "with the same parameters they were first used with"
            )
            return _error(
                400,
                f"Keys for idempotent requests can only be used {differs}. Try using a key other "
                f"than '{key}' if you meant to execute a different request.",
                kind="idempotency_error",
            )
        if saved is None:
            return _error(
                409,
                "There is currently another in-progress request using this Idempotent Key (that "
                "probably means you submitted twice, and the other request is still going "
                f"through): {key}. Please try again later.",
                kind="idempotency_error",
                code="idempotency_key_in_use",
            )
        note.replayed = True
        replay = (("Idempotent-Replayed", "true"), ("Original-Request", saved.request_id))
        return saved.answer._replace(headers=saved.answer.headers + replay)

    @contextlib.contextmanager
    def running(self, slot: str, signature: Signature) -> Iterator[None]:
        """Mark the key's first request as running (a second one gets 409) until it ends."""
        self._in_flight[slot] = signature
        try:
            yield
        finally:
            self._in_flight.pop(slot, None)

    def save(self, slot: str, signature: Signature, answer: _Answer, request_id: str) -> None:
        """Keep the first answer given once execution began, 500s included, for replays."""
        self._saved[slot] = _Saved(signature, answer, request_id)
