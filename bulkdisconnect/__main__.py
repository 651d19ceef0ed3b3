"""`python -m bulkdisconnect`."""

from __future__ import annotations

from bulkdisconnect.cli import main

main()
