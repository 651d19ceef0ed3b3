"""The progress display on a real terminal (a pseudo-terminal of 80 columns)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios

import pytest

from bulkdisconnect.sandbox import SandboxThread
from tests.support import Workspace

pytestmark = pytest.mark.slow
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_terminal(ws: Workspace, *args: str, columns: int) -> str:
    """Run the CLI on a pseudo-terminal `columns` wide; everything it wrote there."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, with the terminal as stdin, stdout and stderr
        os.chdir(ws.root)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        os.execve(  # noqa: S606 - our own CLI, no shell
            sys.executable, [sys.executable, "-m", "bulkdisconnect", *args], {**env, **ws.env()}
        )
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, "no output for 30 s"
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.waitpid(pid, 0)
    return out.decode()


def test_bar_and_log_lines_fit_an_80_column_terminal(ws: Workspace, sandbox: SandboxThread) -> None:
    """On 80 columns the bar keeps its label and every line fits: figures on a line of
    their own, and throttle log lines printed whole above the display."""
    ws.write("ids.txt", ws.ids(100))
    sandbox.sandbox.configure(latency_ms=20, p429=0.05, seed=3)
    out = run_on_terminal(ws, "run", "--input", "ids.txt", "--rate", "60", columns=80)
    lines = [ANSI.sub("", line) for line in re.split(r"[\r\n]", out)]
    first = next(n for n, line in enumerate(lines) if line.startswith("disconnecting"))
    last = next(n for n, line in enumerate(lines) if line.startswith("run of job"))
    while_shown = lines[first:last]
    assert all(len(line) <= 80 for line in while_shown), max(while_shown, key=len)
    assert any(line.startswith("disconnecting ━") for line in lines)
    throttles = [line for line in while_shown if "bulkdisconnect.throttle" in line]
    assert throttles
    assert all("reason=" in line for line in throttles)  # not wrapped onto a second line
    assert any(
        re.search(r"req/s, target .* in flight · ok \d+ · 404 0 · failed 0", line) for line in lines
    )
