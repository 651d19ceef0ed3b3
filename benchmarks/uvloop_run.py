"""`bulkdisconnect` on uvloop's event loop, for the ceiling benchmark's uvloop row."""

from __future__ import annotations

import asyncio

import uvloop

from bulkdisconnect.cli import main

if __name__ == "__main__":
    # anyio.run creates its loop through the policy, so this swaps the loop underneath it.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main()
