"""The webhook receiver against slow clients, hostile IDs and jobs sharing a store: a real
process, real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdisconnect.sandbox import SandboxThread
from bulkdisconnect.serving import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    OTHER_DESCRIPTORS,
    connection_budget,
)
from bulkdisconnect.webhook import BODY_TIMEOUT, DISCONNECTED, sign
from tests.support import FAST, Workspace

pytestmark = pytest.mark.slow
SECRET = "whsec_test_0123456789abcdef"  # noqa: S105 - a test secret
JOB = "ids"  # the job a run of ids.txt plans
DESCRIPTORS = 256  # the receiver's `ulimit -n` where it is limited
SLOW_CLIENTS = 300  # more connections than that limit allows
# Verdicts on a busy machine: a slow client must be gone within this many of its timeouts.
MARGIN = 3


@dataclass(frozen=True)
class Receiver:
    """A running `bulkdisconnect webhook` process: where it listens, where it logs."""

    url: str
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        """Host and port of the listening socket."""
        parts = urllib.parse.urlsplit(self.url)
        assert parts.hostname is not None
        assert parts.port is not None
        return parts.hostname, parts.port


@contextlib.contextmanager
def receiver(
    ws: Workspace, *state: str, descriptors: int | None = None, job: str = JOB
) -> Iterator[Receiver]:
    """Start the receiver for `job` on a free port (under `ulimit -n descriptors` if given),
    and stop it with SIGTERM afterwards."""
    command = [sys.executable, "-m", "bulkdisconnect", "webhook", "--job", job, "--port", "0"]
    command += state
    if descriptors is not None:  # a shell sets the limit, then becomes the receiver
        command = ["/bin/sh", "-c", f'ulimit -n {descriptors} && exec "$@"', "sh", *command]
    log = ws.root / f"receiver-{job}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            command,
            cwd=ws.root,
            env={**os.environ, "STRIPE_WEBHOOK_SECRET": SECRET},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "webhook listening on" in line, log.read_text()
        yield Receiver(line.split()[-1], log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def planned(ws: Workspace, *state: str) -> list[str]:
    """Three accounts of JOB, planned and disconnected by a run against the sandbox."""
    ids = ws.ids(3)
    ws.write("ids.txt", ids)
    result = ws.run("run", "--input", "ids.txt", *state, *FAST)
    assert result.exit_code == 0, result.stderr
    return ids


def deliver(url: str, event_id: str, account: str) -> tuple[int, str]:
    """POST a signed disconnected event as Stripe would; the status and body of the answer
    (status 0 and the reason if no answer came within 10 s)."""
    body = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": DISCONNECTED,
            "data": {"object": {"id": account}},
        }
    ).encode()
    headers = {"Content-Type": "application/json", "Stripe-Signature": sign(body, SECRET)}
    request = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def status(ws: Workspace, *state: str) -> str:
    """What `status` prints for JOB."""
    return ws.run("status", "--job", JOB, *state).stdout


def connect(address: tuple[str, int], first_bytes: bytes) -> socket.socket:
    """A client connection to the receiver that has sent `first_bytes` and then nothing."""
    # A flood overflows the listen backlog: the kernel then retries a SYN after 1, 3, 7 s...
    client = socket.create_connection(address, timeout=30)
    client.sendall(first_bytes)
    return client


def until_closed(clients: Sequence[socket.socket], deadline: float) -> list[bytes | None]:
    """What each client received until the receiver closed its connection, or None for those
    still open at `deadline` (time.monotonic)."""
    received = {client.fileno(): b"" for client in clients}
    still_open = set(received)
    with selectors.DefaultSelector() as selector:
        for client in clients:
            client.setblocking(False)
            selector.register(client, selectors.EVENT_READ)
        while still_open and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                try:
                    chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[key.fd] += chunk
                else:
                    still_open.discard(key.fd)
                    selector.unregister(key.fileobj)
    return [None if c.fileno() in still_open else received[c.fileno()] for c in clients]


def test_a_delivery_is_answered_while_more_slow_clients_than_descriptors_hold_connections(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Under `ulimit -n 256`, 300 clients that never finish their headers do not keep out a
    valid delivery (200, recorded), are all closed by the receiver within a few header
    timeouts, and never run it out of descriptors."""
    ids = planned(ws)
    slow: list[socket.socket] = []
    with receiver(ws, descriptors=DESCRIPTORS) as hook:
        try:
            # extend() keeps each one as it comes, for the finally to close if a connect fails.
            partial = b"POST /webhook HTTP/1.1\r\nHost: rece"
            slow.extend(connect(hook.address, partial) for _ in range(SLOW_CLIENTS))
            flooded = time.monotonic()
            answer = deliver(hook.url, "evt_during_the_flood", ids[0])
            assert answer[0] == 200, answer
            assert json.loads(answer[1]) == {"received": True, "result": "confirmed"}
            left = until_closed(slow, flooded + MARGIN * HEADER_TIMEOUT)
        finally:
            for client in slow:
                client.close()
        assert [n for n, got in enumerate(left) if got is None] == []
        assert all(got == b"" for got in left)  # closed without an answer to half a request
        # And it still answers once they are gone.
        assert deliver(hook.url, "evt_after_the_flood", ids[1])[0] == 200
    assert "Too many open files" not in hook.log.read_text()
    assert "confirmed 2, unconfirmed 1" in status(ws)


def test_a_body_that_stalls_is_answered_408_and_closed(
    ws: Workspace, sandbox: SandboxThread
) -> None:
    """Clients that send their headers but stall in the body get 408 and their connection
    closed within a few body timeouts, while a valid delivery is answered meanwhile."""
    ids = planned(ws)
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\n"
        b'Content-Length: 400\r\n\r\n{"id": "evt_'
    )
    with receiver(ws) as hook:
        stalled = [connect(hook.address, head) for _ in range(5)]
        try:
            sent = time.monotonic()
            answer = deliver(hook.url, "evt_meanwhile", ids[0])
            assert answer[0] == 200, answer
            got = until_closed(stalled, sent + MARGIN * BODY_TIMEOUT)
        finally:
            for client in stalled:
                client.close()
    assert None not in got, "a stalled body kept its connection open"
    for reply in got:
        assert reply is not None
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert b"body" in reply.partition(b"\r\n\r\n")[2]
    assert "confirmed 1, unconfirmed 2" in status(ws)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_an_id_with_a_control_character_gets_400_before_the_store(
    ws: Workspace, sandbox: SandboxThread, request: pytest.FixtureRequest, store: str
) -> None:
    """A signed event whose event ID holds a NUL or another control character, or whose
    account ID holds a NUL, gets 400 naming the field on either store, and records nothing."""
    state = [] if store == "sqlite" else ["--state", request.getfixturevalue("pg_state")]
    ids = planned(ws, *state)
    with receiver(ws, *state) as hook:
        for event_id, account, field in [
            ("evt_\x00", ids[0], "event id"),
            ("evt_1\x00", ids[0], "event id"),
            ("evt_\x1b[2J", ids[0], "event id"),
            ("evt_\n", ids[0], "event id"),
            ("evt_nul_account", ids[0] + "\x00", "data.object.id"),
        ]:
            code, body = deliver(hook.url, event_id, account)
            assert code == 400, (event_id, account, code, body)
            assert field in json.loads(body)["error"]
        assert deliver(hook.url, "evt_ok", ids[1])[0] == 200
    assert "confirmed 1, unconfirmed 2" in status(ws, *state)


@given(st.integers(min_value=64, max_value=2**24))
def test_the_connection_cap_fits_in_the_descriptor_limit(descriptors: int) -> None:
    """The cap, three accept batches in flight and the other descriptors never exceed
    RLIMIT_NOFILE, and the cap is at least a quarter of it up to MAX_CONNECTIONS."""
    cap, backlog = connection_budget(descriptors)
    assert cap + 3 * backlog + OTHER_DESCRIPTORS <= descriptors
    assert backlog >= 1
    assert min(descriptors // 4, MAX_CONNECTIONS) <= cap <= MAX_CONNECTIONS


def test_one_event_confirms_the_account_for_every_job_of_a_shared_store(
    ws: Workspace, sandbox: SandboxThread, pg_state: str
) -> None:
    """Two jobs in one PostgreSQL schema hold the same account; Stripe sends the one event to
    both endpoints: each receiver confirms it for its own job (replays are per job)."""
    ids = ws.ids(3)
    ws.write("ids.txt", ids)
    for job in ("retention", "offboarding"):
        result = ws.run("run", "--job", job, "--input", "ids.txt", "--state", pg_state, *FAST)
        assert result.exit_code == 0, result.stderr
    with (
        receiver(ws, "--state", pg_state, job="retention") as first,
        receiver(ws, "--state", pg_state, job="offboarding") as second,
    ):
        for hook in (first, second):
            status, body = deliver(hook.url, "evt_to_every_endpoint", ids[1])
            assert (status, json.loads(body)["result"]) == (200, "confirmed")
            status, body = deliver(hook.url, "evt_to_every_endpoint", ids[1])
            assert (status, json.loads(body)["result"]) == (200, "replayed")
    for job in ("retention", "offboarding"):
        shown = ws.run("status", "--job", job, "--state", pg_state).stdout
        assert "confirmed 1, unconfirmed 2" in shown, shown
