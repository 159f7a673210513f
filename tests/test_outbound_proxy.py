"""The upstream side honours the standard proxy variables (HTTP_PROXY, HTTPS_PROXY,
ALL_PROXY, NO_PROXY), as a service behind a corporate egress proxy needs.

The client reads them when it builds its HTTP client; each case runs in its own Python
process with its own environment, leaving this process's alone. The "proxy" is a socket
in this test that records the request head it gets and answers it; upstream host names
end in `.invalid`, so a request that went anywhere but the proxy would fail to resolve.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import FAKE_KEYS, LoopbackServer, read_head, request_in_child

from keyfailover.testing import MockUpstream

KEY = FAKE_KEYS[0]


class RecordingProxy(LoopbackServer):
    """Records the head of each request it gets and answers `reply`."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.heads: list[tuple[str, dict[str, str]]] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.heads.append(read_head(conn))
        conn.sendall(self.reply)


def answer(status: str, body: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


REPLY = json.dumps({"id": "msg_via_proxy", "type": "message"}).encode()


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    with RecordingProxy(answer("200 OK", REPLY)) as p:
        yield p


def run_child(base_url: str, **env: str) -> dict[str, object]:
    return request_in_child(base_url, KEY, **env)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_http_upstream_goes_through_the_proxy(proxy: RecordingProxy, variable: str) -> None:
    out = run_child("http://api.upstream.invalid", **{variable: proxy.url})
    assert out == {"status": 200, "body": REPLY.decode()}
    [(line, fields)] = proxy.heads
    # A forward proxy gets the absolute URL, with the key it has to pass on.
    assert line == "POST http://api.upstream.invalid/v1/messages HTTP/1.1"
    assert fields["host"] == "api.upstream.invalid"  # HTTP/1.1 names the host in absolute form too
    assert fields["x-api-key"] == KEY


def test_https_upstream_tunnels_with_connect_and_the_proxy_never_sees_the_key() -> None:
    # The proxy refuses the tunnel: the request fails, but what it was asked is what counts.
    with RecordingProxy(answer("403 Forbidden")) as refusing:
        out = run_child("https://api.upstream.invalid", HTTPS_PROXY=refusing.url)
    [(line, fields)] = refusing.heads
    assert line == "CONNECT api.upstream.invalid:443 HTTP/1.1"
    assert KEY not in repr(fields)
    # The upstream could not be reached: a 502 that says so, with no key in it.
    assert out["status"] == 502
    assert "tunnel" in str(out["body"])
    assert KEY not in str(out["body"])


def test_no_proxy_sends_straight_to_the_upstream(proxy: RecordingProxy) -> None:
    with MockUpstream() as up:
        out = run_child(up.url, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1")
        assert out["status"] == 200
        assert len(up.requests) == 1
    assert proxy.heads == []


def with_credentials(url: str, user: str = "egress", password: str = "s3cret") -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


BASIC = "Basic " + base64.b64encode(b"egress:s3cret").decode()


def test_a_forward_proxys_credentials_go_with_each_request(proxy: RecordingProxy) -> None:
    out = run_child("http://api.upstream.invalid", HTTP_PROXY=with_credentials(proxy.url))
    assert out["status"] == 200
    [(line, fields)] = proxy.heads
    assert line.startswith("POST http://api.upstream.invalid/")
    assert fields["proxy-authorization"] == BASIC


def test_a_tunnels_credentials_go_in_the_connect_only() -> None:
    with RecordingProxy(answer("407 Proxy Authentication Required")) as refusing:
        out = run_child("https://api.upstream.invalid", HTTPS_PROXY=with_credentials(refusing.url))
    [(line, fields)] = refusing.heads
    assert line == "CONNECT api.upstream.invalid:443 HTTP/1.1"
    assert fields["proxy-authorization"] == BASIC
    assert out["status"] == 502
    assert "proxy authorization required" in str(out["body"])
    # The password is no more the caller's business than the key is.
    assert "s3cret" not in str(out["body"])


def test_a_socks_proxy_is_refused_with_a_reason_not_sent_http(proxy: RecordingProxy) -> None:
    out = run_child("http://api.upstream.invalid", ALL_PROXY=proxy.url.replace("http", "socks5", 1))
    assert out["status"] == 502
    assert "socks5 proxies are not supported" in str(out["body"])
    assert proxy.heads == []


class SilentProxy(LoopbackServer):
    """Reads a request head, then never answers (until the test ends)."""

    def __init__(self) -> None:
        self.heads: list[tuple[str, dict[str, str]]] = []
        self.done = threading.Event()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.heads.append(read_head(conn))
        self.done.wait(30)


def test_a_tunnel_that_never_opens_fails_within_the_connect_timeout() -> None:
    with SilentProxy() as silent:
        start = time.monotonic()
        out = run_child_timed(
            "https://api.upstream.invalid", HTTPS_PROXY=silent.url, connect_timeout=0.5
        )
        took = time.monotonic() - start
        silent.done.set()
    [(line, _)] = silent.heads
    assert line == "CONNECT api.upstream.invalid:443 HTTP/1.1"
    # The connect timeout covers the tunnel, not only the TCP connection to the proxy:
    # a 502 that says so, long before the 30 s request timeout.
    assert out["status"] == 502
    assert "connect timeout" in str(out["body"])
    assert took < 15


def run_child_timed(base_url: str, *, connect_timeout: float, **env: str) -> dict[str, object]:
    return request_in_child(base_url, KEY, timeout=30.0, connect_timeout=connect_timeout, **env)
