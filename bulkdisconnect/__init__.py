"""Disconnect Stripe Financial Connections accounts in bulk, safely, at the rate limit's edge."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Looked up when asked for, not on import: `python -m bulkdisconnect` imports this
    # package before anything else, and its stop signals must be caught early (early.py).
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bulkdisconnect")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "0.0.0"
