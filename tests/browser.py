"""A headless Chromium driven over the DevTools protocol, for the HTML report's tests.

The protocol runs over a pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on file
descriptors 3 and 4), so there is no port to find and no WebSocket client to install. The
browser is also pointed at a proxy that does not exist, and each page emulates being offline:
a page that tried to fetch anything could not, and `requests` shows that it tried.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Port 9 (discard) on loopback: nothing listens there, so every fetch through it fails.
DEAD_PROXY = "127.0.0.1:9"
TIMEOUT = 30.0
TRAMPOLINE = """
import fcntl, os, sys
ends = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
os.dup2(ends[0], 3)
os.dup2(ends[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class BrowserError(Exception):
    """The browser answered a command with an error, or did not answer in time."""


@dataclass
class Loaded:
    """What loading one page showed."""

    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, CSP reports


class Chromium:
    """One headless browser process; `page()` opens a tab to drive."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # The browser reads commands on fd 3 and writes answers on fd 4: a small Python
        # trampoline puts the pipe's ends there (no preexec_fn in a process with threads).
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                TRAMPOLINE,
                str(to_browser),
                str(from_browser),
                binary,
                "--headless",
                "--no-sandbox",  # root in CI; the pages are our own files
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--proxy-server={DEAD_PROXY}",
                "--proxy-bypass-list=<-loopback>",
                "about:blank",
            ],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._write)
        os.close(self._read)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; events that come meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result
            self._events.append(answer)

    def wait_for(self, method: str, session: str) -> dict[str, Any]:
        """The first event `method` of the session (already received, or the next)."""
        while True:
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event
            self._events.append(self._receive())

    def events(self, session: str) -> list[dict[str, Any]]:
        """Take the session's events received so far."""
        mine = [e for e in self._events if e.get("sessionId") == session]
        self._events = [e for e in self._events if e.get("sessionId") != session]
        return mine

    def page(self, *, width: int = 1200, height: int = 900) -> Page:
        """A new tab, offline, recording its requests and errors."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session)
        self.call(
            "Network.emulateNetworkConditions",
            session,
            offline=True,
            latency=0,
            downloadThroughput=-1,
            uploadThroughput=-1,
        )
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return Page(self, session)

    def _receive(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._read], [], [], max(left, 0))
            if not ready:
                raise BrowserError(f"the browser did not answer within {TIMEOUT:g} s")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise BrowserError("the browser closed the pipe (did it start?)")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        answer: dict[str, Any] = json.loads(message)
        return answer


class Page:
    """One tab of the browser."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self._browser = browser
        self._session = session

    def load(self, url: str) -> Loaded:
        """Navigate to `url`, wait for its load event; what it requested and what went wrong."""
        self._browser.events(self._session)  # forget what came before
        self._browser.call("Page.navigate", self._session, url=url)
        self._browser.wait_for("Page.loadEventFired", self._session)
        self.evaluate("1")  # a round trip: the console messages of the load have come
        loaded = Loaded()
        for event in self._browser.events(self._session):
            method, params = event["method"], event["params"]
            if method == "Network.requestWillBeSent":
                loaded.requests.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                loaded.errors.append(str(params["exceptionDetails"].get("text")))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                loaded.errors.append(" ".join(str(a.get("value")) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                loaded.errors.append(params["entry"]["text"])
        return loaded

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (DevTools' own evaluation: the
        page's Content-Security-Policy, which forbids scripts, does not apply to it)."""
        result = self._browser.call(
            "Runtime.evaluate", self._session, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page (not only the viewport) as a PNG."""
        size = self._browser.call("Page.getLayoutMetrics", self._session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self._browser.call(
            "Page.captureScreenshot",
            self._session,
            format="png",
            clip=clip,
            captureBeyondViewport=True,
        )
        path.write_bytes(base64.b64decode(shot["data"]))
