"""Store calls that ride out a database failing in passing: what both parts of `SqlStore`
(core.py and evidence.py) are built on.

A call marked `@guarded` is tried again while the database's errors are transient (a restart,
a failover, terminated connections, a lock held by another process), for up to OUTAGE seconds,
and otherwise fails as StoreError naming the store and the cause.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import anyio
import structlog

from bulkdisconnect.errors import StoreError
from bulkdisconnect.store.dialect import Dialect

log = structlog.get_logger("bulkdisconnect")
P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound="Guarded")

# How long a store call rides out a database that fails in passing (a restart, a failover,
# terminated connections, a lock held by another process) before the run stops with exit 6.
OUTAGE = 15.0
RETRY_DELAY = (0.1, 2.0)  # the first wait between tries, and the longest


def guarded(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A store call that is tried again through a passing outage, else fails as StoreError.

    Every call so marked is safe to repeat: writes are idempotent (fenced records, ON
    CONFLICT inserts), so a reply lost after the commit is harmless.
    """

    @functools.wraps(method)
    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._retried(method.__name__, lambda: method(self, *args, **kwargs))

    return call


class Guarded:
    """A store over a dialect whose calls ride out passing failures (shared behaviour)."""

    def __init__(self, dialect: Dialect, layout: int) -> None:
        self._dialect = dialect
        self._read = dialect.reader
        self._layout = layout  # the store's layout: an older one only when opened read-only

    @property
    def description(self) -> str:
        """Where the store is, fit for output."""
        return self._dialect.description

    async def _retried(self, operation: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()`, tried again while its errors are transient, for up to OUTAGE seconds."""
        dialect = self._dialect
        delay, longest = RETRY_DELAY
        started: float | None = None
        while True:
            try:
                return await attempt()
            except dialect.errors as exc:
                now = time.monotonic()
                started = now if started is None else started
                if not dialect.transient(exc) or now + delay - started > OUTAGE:
                    raise self._failure(operation, exc) from exc
                log.warning(
                    "bulkdisconnect.store.retry",
                    operation=operation,
                    error=dialect.describe(exc),
                    retry_in=delay,
                )
            await anyio.sleep(delay)
            delay = min(2 * delay, longest)

    @contextmanager
    def _failing(self, operation: str) -> Iterator[None]:
        """The database's errors inside, as StoreError (what cannot simply be tried again)."""
        try:
            yield
        except self._dialect.errors as exc:
            raise self._failure(operation, exc) from exc

    def _failure(self, operation: str, exc: Exception) -> StoreError:
        dialect = self._dialect
        advice = "" if dialect.corrupted(exc) else "; nothing was lost, a rerun resumes"
        return StoreError(
            f"the state store {self.description} failed ({operation}): "
            f"{dialect.describe(exc)}{advice}"
        )
