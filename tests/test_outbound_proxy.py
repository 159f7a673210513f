"""The upstream side honours the standard proxy variables (HTTP_PROXY, HTTPS_PROXY,
NO_PROXY), as a service behind a corporate egress proxy needs.

The client reads them when it builds its HTTP client; each case runs in its own Python
process with its own environment, leaving this process's alone. The "proxy" is a socket
in this test that records the request head it gets and answers it; upstream host names
end in `.invalid`, so a request that went anywhere but the proxy would fail to resolve.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import FAKE_KEYS, request_in_child

from keyfailover.testing import MockUpstream

KEY = FAKE_KEYS[0]


@dataclass
class RecordingProxy:
    """A loopback listener that records each request head and answers `reply`."""

    reply: bytes
    heads: list[str] = field(default_factory=list)
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                self.heads.append(head.split(b"\r\n\r\n")[0].decode("latin-1"))
                conn.sendall(self.reply)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def answer(status: str, body: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


REPLY = json.dumps({"id": "msg_via_proxy", "type": "message"}).encode()


@pytest.fixture
def proxy() -> Iterator[RecordingProxy]:
    p = RecordingProxy(answer("200 OK", REPLY))
    yield p
    p.close()


def run_child(base_url: str, **env: str) -> dict[str, object]:
    return request_in_child(base_url, KEY, **env)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_http_upstream_goes_through_the_proxy(proxy: RecordingProxy, variable: str) -> None:
    out = run_child("http://api.upstream.invalid", **{variable: proxy.url})
    assert out == {"status": 200, "body": REPLY.decode()}
    [head] = proxy.heads
    # A forward proxy gets the absolute URL, with the key it has to pass on.
    assert head.startswith("POST http://api.upstream.invalid/v1/messages HTTP/1.1\r\n")
    fields = [line.split(":", 1) for line in head.split("\r\n")[1:]]
    assert [v.strip() for k, v in fields if k.lower() == "x-api-key"] == [KEY]


def test_https_upstream_tunnels_with_connect_and_the_proxy_never_sees_the_key() -> None:
    # The proxy refuses the tunnel: the request fails, but what it was asked is what counts.
    refusing = RecordingProxy(answer("403 Forbidden"))
    try:
        out = run_child("https://api.upstream.invalid", HTTPS_PROXY=refusing.url)
    finally:
        refusing.close()
    [head] = refusing.heads
    assert head.startswith("CONNECT api.upstream.invalid:443 HTTP/1.1\r\n")
    assert KEY not in head
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
