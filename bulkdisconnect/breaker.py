"""The failure breaker: stop a run whose answers are mostly failures or resource_missing.

Modelled on S3 Batch Operations, which fails a job once more than 50 % of its tasks have failed
after at least 1,000 tasks. Mostly-404 answers are what a test-mode key sent against live-mode
accounts (or the wrong Stripe-Account) looks like, so they trip it too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from bulkdisconnect.model import Outcome

BAD = frozenset({Outcome.FAILED, Outcome.NOT_FOUND})


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """After `min_sample` answers, trip when more than `threshold` of the last ones were bad."""

    min_sample: int
    threshold: float  # 1.0 disables the breaker


class FailureBreaker:
    """Watches final outcomes over a sliding window of the last `min_sample` answers."""

    def __init__(self, settings: BreakerSettings) -> None:
        self._settings = settings
        self._window: deque[Outcome] = deque(maxlen=settings.min_sample)
        self._bad = 0

    def observe(self, outcome: Outcome) -> bool:
        """Count one final outcome; True when the breaker trips."""
        window = self._window
        if len(window) == window.maxlen and window[0] in BAD:
            self._bad -= 1
        window.append(outcome)
        if outcome in BAD:
            self._bad += 1
        return (
            len(window) == window.maxlen
            and self._settings.threshold < 1.0
            and self._bad > self._settings.threshold * len(window)
        )

    def diagnosis(self) -> str:
        """Why it tripped, in words that point at the likely fix."""
        not_found = sum(1 for o in self._window if o is Outcome.NOT_FOUND)
        failed = sum(1 for o in self._window if o is Outcome.FAILED)
        total = len(self._window)
        if not_found >= failed:
            return (
                f"{not_found} of the last {total} accounts were not found: check that the key's "
                "mode (test/live) and --stripe-account match the accounts"
            )
        return f"{failed} of the last {total} accounts failed"
