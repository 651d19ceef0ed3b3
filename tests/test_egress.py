"""Reaching Stripe from a locked-down cluster: through an egress proxy, trusting a corporate
CA, over real TLS on loopback (certificates from trustme), never showing the proxy's password."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from bulkdisconnect.sandbox import SandboxThread
from tests.support import FAST, ConnectProxy, Workspace

pytestmark = pytest.mark.slow

PASSWORD = "s3cr3t-proxy-pass"  # noqa: S105 - the test proxy's


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A corporate CA: the TLS sandbox's certificate is issued by it, and nothing trusts it."""
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_sandbox(ca: trustme.CA) -> Iterator[SandboxThread]:
    """A sandbox served over TLS on loopback with a certificate of the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with SandboxThread(tls=context) as server:
        yield server


@pytest.fixture
def tls_ws(tmp_path: Path, tls_sandbox: SandboxThread) -> Workspace:
    tls_sandbox.sandbox.reset()
    return Workspace(root=tmp_path, api_base=tls_sandbox.url)


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "corporate-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def sandbox_address(tls_ws: Workspace) -> str:
    return tls_ws.api_base.removeprefix("https://")


def test_a_run_through_the_proxy_trusting_the_corporate_ca(tls_ws: Workspace, ca_file: str) -> None:
    ids = tls_ws.ids(30)
    tls_ws.write("ids.txt", ids)
    with ConnectProxy(f"bd:{PASSWORD}") as proxy:
        proxy_url = proxy.url.replace("http://", f"http://bd:{PASSWORD}@")
        result = tls_ws.run(
            "run", "--input", "ids.txt", "--proxy", proxy_url, "--ca-bundle", ca_file, *FAST
        )
    assert result.exit_code == 0, result.stderr
    assert tls_ws.outcomes("ids") == dict.fromkeys(ids, "disconnected")
    assert proxy.tunnels
    assert set(proxy.tunnels) == {sandbox_address(tls_ws)}
    assert PASSWORD not in result.stdout + result.stderr


def test_without_the_ca_the_certificate_is_refused_and_nothing_marked_failed(
    tls_ws: Workspace,
) -> None:
    tls_ws.write("ids.txt", tls_ws.ids(5))
    result = tls_ws.run("run", "--input", "ids.txt", *FAST)
    assert result.exit_code == 5, result.stderr
    assert "certificate" in result.stderr.lower()
    assert set(tls_ws.outcomes("ids").values()) == {None}


def test_the_environment_names_the_proxy_and_no_proxy_bypasses_it(
    tls_ws: Workspace, ca_file: str
) -> None:
    tls_ws.write("ids.txt", tls_ws.ids(10))
    with ConnectProxy() as proxy:
        env = tls_ws.env(HTTPS_PROXY=proxy.url, SSL_CERT_FILE=ca_file)
        through = tls_ws.run("run", "--input", "ids.txt", "--job", "through", *FAST, env=env)
        tunnels = len(proxy.tunnels)
        env = {**env, "NO_PROXY": "127.0.0.1,localhost"}
        around = tls_ws.run("run", "--input", "ids.txt", "--job", "around", *FAST, env=env)
    assert (through.exit_code, around.exit_code) == (0, 0), through.stderr + around.stderr
    assert tunnels >= 1
    assert len(proxy.tunnels) == tunnels  # the second run went around it


def test_a_proxy_that_refuses_the_login_is_one_line_without_the_password(
    tls_ws: Workspace, ca_file: str
) -> None:
    tls_ws.write("ids.txt", tls_ws.ids(5))
    with ConnectProxy(f"bd:{PASSWORD}") as proxy:
        wrong = proxy.url.replace("http://", "http://bd:not-the-password@")
        result = tls_ws.run(
            "run", "--input", "ids.txt", "--proxy", wrong, "--ca-bundle", ca_file, *FAST
        )
    assert result.exit_code == 5, result.stderr
    assert proxy.refused >= 1
    assert "not-the-password" not in result.stdout + result.stderr
    assert set(tls_ws.outcomes("ids").values()) == {None}


def test_a_ca_bundle_that_is_not_one_is_exit_2(tls_ws: Workspace, tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    tls_ws.write("ids.txt", tls_ws.ids(2))
    result = tls_ws.run("run", "--input", "ids.txt", "--ca-bundle", str(bogus), *FAST)
    assert result.exit_code == 2
    assert "ca_bundle" in result.stderr or "--ca-bundle" in result.stderr


def test_the_sandbox_serves_https_with_a_certificate_and_its_key(
    tls_ws: Workspace, ca: trustme.CA, tmp_path: Path
) -> None:
    """`sandbox --tls-cert/--tls-key`: both or neither; a certificate without its key is exit 2."""
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    alone = tls_ws.run("sandbox", "--port", "0", "--tls-cert", str(tmp_path / "cert.pem"))
    assert alone.exit_code == 2
    assert "--tls-cert and --tls-key go together" in alone.stderr
