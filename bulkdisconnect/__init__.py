"""Disconnect Stripe Financial Connections accounts in bulk, safely, at the rate limit's edge."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bulkdisconnect")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"
