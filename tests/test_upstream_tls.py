"""HTTPS upstreams: certificates are verified against the system's roots (or those that
SSL_CERT_FILE or SSL_CERT_DIR name instead, as with OpenSSL); an upstream that cannot
prove who it is never gets a request, let alone a key; HTTP/2 is used when the upstream
offers it in the TLS handshake (ALPN), as the providers' APIs do.

The upstream is a TLS listener in this test with a certificate for 127.0.0.1 from a CA
made here; the cases that trust that CA run in a child process, with SSL_CERT_FILE set.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from conftest import (
    FAKE_KEYS,
    LoopbackServer,
    free_port,
    make_client,
    read_head,
    request_in_child,
    run,
    states,
    wait_listening,
)

from keyfailover.testing.pki import Pki, write_pki

KEY = FAKE_KEYS[0]
REPLY = json.dumps({"id": "msg_over_tls", "type": "message"}).encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, and a certificate it signed for 127.0.0.1 (IP SAN)."""
    return write_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Seen:
    """What the TLS upstream saw on one connection."""

    alpn: str | None = None
    handshake_error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class TlsUpstream(LoopbackServer):
    """Answers each request with 200 and REPLY over HTTP/1.1 or, when the client picks it
    by ALPN and `alpn` offers it, HTTP/2; records each connection in `seen`."""

    scheme = "https"

    def __init__(self, pki: Pki, alpn: list[str]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.cert, pki.key)
        self.context.set_alpn_protocols(alpn)
        self.seen: list[Seen] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        seen = Seen()
        self.seen.append(seen)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError as e:  # an ssl.SSLError, or the client resetting the connection
            seen.handshake_error = str(e)
            return
        with tls:
            seen.alpn = tls.selected_alpn_protocol()
            if seen.alpn == "h2":
                self._h2(tls, seen)
            else:
                self._http1(tls, seen)

    @staticmethod
    def _http1(conn: ssl.SSLSocket, seen: Seen) -> None:
        _, seen.headers = read_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(REPLY)}\r\nconnection: close\r\n\r\n".encode()
            + REPLY
        )

    def _h2(self, conn: ssl.SSLSocket, seen: Seen) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        refused: set[int] = set()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    for name, value in event.headers:
                        seen.headers[_text(name)] = _text(value)
                    if not self.answers(h2c, conn, event.stream_id):
                        refused.add(event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id not in refused:
                    h2c.send_headers(
                        event.stream_id,
                        [
                            (":status", "200"),
                            ("content-type", "application/json"),
                            ("content-length", str(len(REPLY))),
                        ],
                    )
                    h2c.send_data(event.stream_id, REPLY, end_stream=True)
                elif isinstance(event, h2.events.DataReceived) and event.stream_id not in refused:
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if h2c.state_machine.state is h2.connection.ConnectionState.CLOSED:
                return
            # Until the client goes (its process ends): closing at once could reset the
            # connection before the client has read the answer.
            conn.sendall(h2c.data_to_send())

    def answers(self, h2c: h2.connection.H2Connection, conn: ssl.SSLSocket, stream: int) -> bool:
        """Whether the HTTP/2 request on `stream` gets an answer (subclasses refuse some)."""
        return True


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
def upstream(pki: Pki, request: pytest.FixtureRequest) -> Iterator[TlsUpstream]:
    alpn: list[str] = getattr(request, "param", ["http/1.1"])
    with TlsUpstream(pki, alpn) as server:
        yield server


def test_an_upstream_with_an_unknown_ca_is_refused_before_any_request(
    upstream: TlsUpstream,
) -> None:
    client, pool = make_client(upstream.url, "anthropic", 1)

    async def call() -> tuple[int, bytes]:
        resp = await client.request(
            "POST", "/v1/messages", headers=[("content-type", "application/json")], body=b"{}"
        )
        return resp.status, await resp.read()

    status, body = run(call())
    assert status == 502
    assert "certificate" in body.decode().lower()
    assert KEY not in body.decode()
    # The handshake failed: the upstream never got a request, so never a key. (The client
    # has its answer as soon as it sends its alert; the server may still be reading it.)
    upstream.close()
    assert upstream.seen
    assert all(s.handshake_error for s in upstream.seen), upstream.seen
    assert all(not s.headers for s in upstream.seen)
    assert states(pool) == ["valid"]


@pytest.mark.parametrize(
    ("upstream", "http2", "protocol"),
    [
        (["http/1.1"], True, "http/1.1"),
        (["h2", "http/1.1"], True, "h2"),
        (["h2", "http/1.1"], False, "http/1.1"),
    ],
    indirect=["upstream"],
    ids=["http1", "h2", "h2-offered-client-http1-only"],
)
def test_a_trusted_upstream_gets_the_request_over_the_protocol_it_offers(
    pki: Pki, upstream: TlsUpstream, http2: bool, protocol: str
) -> None:
    """HTTP/2 when the upstream offers it, unless the client is built with http2=False."""
    out = request_in_child(upstream.url, KEY, http2=http2, SSL_CERT_FILE=str(pki.ca))
    assert out == {"status": 200, "body": REPLY.decode()}
    [seen] = upstream.seen
    assert seen.handshake_error is None
    assert seen.alpn == protocol
    assert seen.headers["x-api-key"] == KEY


@pytest.mark.parametrize(
    ("upstream", "http2", "connections"),
    [(["h2", "http/1.1"], True, 1), (["http/1.1"], True, 20), (["h2", "http/1.1"], False, 20)],
    indirect=["upstream"],
    ids=["h2", "http1", "h2-offered-client-http1-only"],
)
def test_a_burst_on_a_cold_pool_shares_one_http2_connection(
    pki: Pki, upstream: TlsUpstream, http2: bool, connections: int
) -> None:
    """20 requests at once, before any connection exists: over HTTP/2 they wait for the
    first one's connection and share it, rather than each opening one that carries one
    request; an HTTP/1 upstream (which closes after each answer) gets one each, and none
    is left waiting; nor is any with a client built with http2=False, which offers only
    HTTP/1.1. (This upstream serves one connection at a time: a second HTTP/2
    connection would wait, and time out, behind the first, which stays open.)"""
    out = request_in_child(
        upstream.url,
        KEY,
        requests=20,
        timeout=20,
        connect_timeout=20,
        http2=http2,
        SSL_CERT_FILE=str(pki.ca),
    )
    assert out["all"] == [{"status": 200, "body": REPLY.decode()}] * 20
    assert [seen.handshake_error for seen in upstream.seen] == [None] * connections
    assert {seen.alpn for seen in upstream.seen} == {"h2" if connections == 1 else "http/1.1"}


@pytest.mark.parametrize(
    ("how", "protocol"),
    [("flag", "h2"), ("flag", "http/1.1"), ("config", "h2"), ("config", "http/1.1")],
)
@pytest.mark.parametrize("upstream", [["h2", "http/1.1"]], indirect=True)
def test_serve_offers_http2_upstream_unless_told_not_to(
    pki: Pki, upstream: TlsUpstream, tmp_path: Path, how: str, protocol: str
) -> None:
    """`keyfailover serve --no-http2`, or `http2 = false` in a route of its config, asks an
    upstream that offers HTTP/2 for HTTP/1.1."""
    port = free_port()
    if how == "flag":
        options = ["--keys-env", "KF_TLS_KEYS", "--upstream", upstream.url]
        options += ["--no-http2"] if protocol == "http/1.1" else []
    else:
        setting = "http2 = false\n" if protocol == "http/1.1" else ""
        (tmp_path / "kf.toml").write_text(
            f'[routes.a]\npath = "/"\nupstream = "{upstream.url}"\nkeys_env = "KF_TLS_KEYS"\n'
            + setting
        )
        options = ["--config", str(tmp_path / "kf.toml")]
    env = {**os.environ, "KF_TLS_KEYS": KEY, "SSL_CERT_FILE": str(pki.ca)}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--port", str(port), *options],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(proc, port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/messages", b"{}", {"content-type": "application/json"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, REPLY)
        conn.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    [seen] = upstream.seen
    assert seen.alpn == protocol
    assert seen.headers["x-api-key"] == KEY


class RefusingH2Upstream(TlsUpstream):
    """An HTTP/2 upstream that refuses its first request unprocessed, as a server does when
    it rotates its connections: with RST_STREAM(REFUSED_STREAM), or with a graceful GOAWAY
    that leaves the request out, then closes. Every later request gets 200 and REPLY."""

    def __init__(self, pki: Pki, how: str) -> None:
        self.how = how
        self.requests = 0
        super().__init__(pki, ["h2"])

    def answers(self, h2c: h2.connection.H2Connection, conn: ssl.SSLSocket, stream: int) -> bool:
        self.requests += 1
        if self.requests > 1:
            return True
        if self.how == "goaway":
            h2c.close_connection(error_code=0, last_stream_id=0)
            conn.sendall(h2c.data_to_send())
            # As a server does, the connection stays until the client closes it: closing
            # with its request unread would reset it instead.
            while conn.recv(65536):
                pass
        else:
            h2c.reset_stream(stream, h2.errors.ErrorCodes.REFUSED_STREAM)
        return False


@pytest.mark.parametrize("how", ["refused_stream", "goaway"])
def test_a_request_an_h2_upstream_refused_unprocessed_is_sent_again(pki: Pki, how: str) -> None:
    with RefusingH2Upstream(pki, how) as upstream:
        out = request_in_child(upstream.url, KEY, SSL_CERT_FILE=str(pki.ca))
    # The caller sees the answer to the second try, not the refusal.
    assert out == {"status": 200, "body": REPLY.decode()}
    assert upstream.requests == 2
    # A GOAWAY ends its connection: the second try opens another.
    assert len(upstream.seen) == (2 if how == "goaway" else 1)


class FewStreamsH2Upstream(LoopbackServer):
    """An HTTP/2 upstream that allows `per_connection` streams open at once on a connection
    (SETTINGS_MAX_CONCURRENT_STREAMS; more is a protocol error), serves each connection on
    a thread of its own, and holds every answer until `together` requests are open at once
    over all its connections, or `hold` seconds passed: answers that can only come once
    others have ended, as a stream's do."""

    scheme = "https"
    threaded = True

    def __init__(self, pki: Pki, per_connection: int, together: int, hold: float) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.cert, pki.key)
        self.context.set_alpn_protocols(["h2"])
        self.per_connection, self.together, self.hold = per_connection, together, hold
        self.lock = threading.Lock()
        self.open = self.most_open = self.most_per_connection = self.connections = 0
        self.errors: list[str] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with self.context.wrap_socket(conn, server_side=True) as tls:
            with self.lock:
                self.connections += 1
            try:
                self._h2(tls)
            except h2.exceptions.ProtocolError as e:
                self.errors.append(repr(e))

    def _h2(self, conn: ssl.SSLSocket) -> None:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.per_connection},
        )
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        conn.settimeout(0.02)
        held: list[int] = []
        mine = 0
        since = time.monotonic()
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
                if not data:
                    return
            except TimeoutError:
                data = b""
            for event in h2c.receive_data(data) if data else []:
                if isinstance(event, h2.events.RequestReceived):
                    mine += 1
                    with self.lock:
                        self.open += 1
                        self.most_open = max(self.most_open, self.open)
                        self.most_per_connection = max(self.most_per_connection, mine)
                    since = time.monotonic()
                elif isinstance(event, h2.events.StreamEnded):
                    held.append(event.stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            with self.lock:
                release = self.most_open >= self.together
            if held and (release or time.monotonic() - since > self.hold):
                for stream in held:
                    h2c.send_headers(
                        stream,
                        [
                            (":status", "200"),
                            ("content-type", "application/json"),
                            ("content-length", str(len(REPLY))),
                        ],
                    )
                    h2c.send_data(stream, REPLY, end_stream=True)
                mine -= len(held)
                with self.lock:
                    self.open -= len(held)
                held.clear()
            conn.sendall(h2c.data_to_send())


def test_requests_beyond_the_streams_an_h2_connection_allows_go_on_more_connections(
    pki: Pki,
) -> None:
    """The providers' APIs allow some number of streams open at once on one HTTP/2
    connection (100 or more). Requests beyond it would wait in line on a shared
    connection behind streams that may stay open for minutes: they go on another
    connection instead, each connection kept within what the upstream allows. Here 2 a
    connection, and 6 requests at once after a first (which learns the limit): every one
    is open upstream at the same time, none waiting for another to end."""
    with FewStreamsH2Upstream(pki, per_connection=2, together=6, hold=3.0) as upstream:
        out = request_in_child(
            upstream.url, KEY, requests=6, warm=True, timeout=20, SSL_CERT_FILE=str(pki.ca)
        )
    assert out["all"] == [{"status": 200, "body": REPLY.decode()}] * 6
    assert upstream.errors == []
    assert upstream.most_open == 6
    assert upstream.most_per_connection == 2
    assert upstream.connections >= 3
