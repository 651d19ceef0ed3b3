"""The exception tree and the exit-code table.

    BulkDisconnectError            every error the CLI turns into an exit code
    ├── UsageError                 bad flag, job file or input: nothing was called (exit 2)
    │   └── InputError             the input cannot be read or a row is malformed
    ├── LockHeldError              another live run holds this job's lock (exit 4)
    ├── RunRefusedError            the API refused the run as a whole (exit 5)
    │   ├── AuthenticationError    401 / 403 / expired key: fix the key
    │   ├── WrongModeError         the key's mode (test/live) is not the accounts' mode
    │   ├── UnreachableError       no connection to the API could be made at all
    │   └── BreakerTrippedError    most answers were failures or resource_missing
    └── StoreError                 the state store failed mid-run (exit 6)

Interruption by a signal is not an exception: the runner returns ExitCode.INTERRUPTED.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a scheduler sees; one code per thing it can act on."""

    OK = 0  # every valid account ended disconnected or not_found
    SOME_FAILED = 1  # finished, but some accounts are failed or invalid_id
    USAGE = 2  # fix the flags, job file or input; nothing was called
    INTERRUPTED = 3  # SIGINT/SIGTERM; a rerun resumes
    LOCKED = 4  # another run holds this job's lock
    REFUSED = 5  # the API refused the run as a whole; fix the key/config and rerun
    STORE_FAILED = 6  # the state store failed; nothing was lost, a rerun resumes

    @property
    def meaning(self) -> str:
        """What happened, in the words a summary shows next to the number."""
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "every valid account disconnected or not found",
    ExitCode.SOME_FAILED: "some accounts failed or were invalid",
    ExitCode.USAGE: "usage, configuration or input error",
    ExitCode.INTERRUPTED: "interrupted; a rerun resumes",
    ExitCode.LOCKED: "another run holds the job, or this run lost its lease",
    ExitCode.REFUSED: "the API refused the run",
    ExitCode.STORE_FAILED: "the store failed; nothing was lost, a rerun resumes",
}


class BulkDisconnectError(Exception):
    """Base of every error with an exit code."""

    exit_code: ExitCode = ExitCode.USAGE


class UsageError(BulkDisconnectError):
    """A bad flag, job file or environment value; nothing was called."""

    exit_code = ExitCode.USAGE


class InputError(UsageError):
    """The input cannot be read, or a row of it is malformed."""


class LockHeldError(BulkDisconnectError):
    """Another live run holds this job's lock."""

    exit_code = ExitCode.LOCKED


class RunRefusedError(BulkDisconnectError):
    """The API refused the run as a whole; no account was marked failed for it."""

    exit_code = ExitCode.REFUSED


class AuthenticationError(RunRefusedError):
    """The API key is missing, bad, revoked, expired or lacks permission."""


class WrongModeError(RunRefusedError):
    """The key's mode (test/live) does not match the accounts' mode."""


class UnreachableError(RunRefusedError):
    """No request of the run ever reached the API (refused, DNS, TLS, connect timeout)."""


class BreakerTrippedError(RunRefusedError):
    """Most answers were failures or resource_missing after the minimum sample."""


class StoreError(BulkDisconnectError):
    """The state store failed (I/O, disk full, lock timeout, lost database) mid-run.

    Nothing is lost: an answer that was not recorded leaves its account pending, and a rerun
    calls it again under the same idempotency key.
    """

    exit_code = ExitCode.STORE_FAILED
