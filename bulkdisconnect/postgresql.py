"""What the SQL source and the PostgreSQL store share: connection errors in one line."""

from __future__ import annotations

CONNECT_TIMEOUT = 10.0  # seconds: an unreachable server fails instead of hanging


def describe_error(exc: BaseException) -> str:
    """Why talking to PostgreSQL failed, in one line that never quotes a password."""
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.message)  # the server's words, without its HINT line
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, ValueError) and not isinstance(exc, asyncpg.InterfaceError):
        # asyncpg's own text can quote a piece of a badly encoded password.
        return "malformed URL (percent-encode special characters in the password)"
    return " ".join(str(exc).split())
