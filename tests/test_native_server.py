"""The native server (`keyfailover serve`'s default) on its own: the bad input it must
survive with a clear answer (malformed requests, huge heads, slowloris, too many
connections, HTTP/1.0, pipelining, broken bodies), HTTP/2 cleartext, the access log,
the same answers as the ASGI app under uvicorn for one request table, and a graceful
shutdown with 50 streams in flight.

The shared proxy behaviour (failover, limits, tokens, disconnects) runs against both
front ends in test_asgi.py, test_fault_matrix.py and test_proxy_policy.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import FAKE_KEYS, make_client

from keyfailover.asgi import FailoverProxy
from keyfailover.testing import (
    MockUpstream,
    Reply,
    anthropic_message,
    anthropic_stream_events,
    serve_asgi,
    serve_native,
)

MESSAGE: dict[str, Any] = {
    "model": "mock-model",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
BODY = json.dumps(MESSAGE).encode()


@pytest.fixture
def native(up: MockUpstream) -> Iterator[Callable[..., str]]:
    """Starts the native server over a two-key proxy in front of `up`; returns its URL."""
    with contextlib.ExitStack() as stack:

        def start(proxy_options: dict[str, Any] | None = None, **server_options: Any) -> str:
            app = FailoverProxy(make_client(up)[0], **(proxy_options or {}))
            return stack.enter_context(serve_native(app, **server_options))

        yield start


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(url: str, timeout: float = 5) -> socket.socket:
    return socket.create_connection(address(url), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


class Responses:
    """Reads the responses of one connection in turn (several may arrive at once)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"closed after {self.data!r}"
        self.data += chunk

    def next(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """One response with a content-length: status line, headers (lower-case), body."""
        while b"\r\n\r\n" not in self.data:
            self._more()
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        fields = {n.strip().lower(): v.strip() for n, _, v in (x.partition(b":") for x in lines)}
        length = int(fields[b"content-length"])
        while len(self.data) < length:
            self._more()
        body, self.data = self.data[:length], self.data[length:]
        return status, fields, body


def read_response(sock: socket.socket) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The one response expected on `sock`."""
    responses = Responses(sock)
    response = responses.next()
    assert responses.data == b"", "more than one response arrived"
    return response


def post(
    path: str = "/v1/messages", body: bytes = BODY, version: str = "1.1", **extra: str
) -> bytes:
    headers = {"host": "proxy", "content-type": "application/json"}
    headers["content-length"] = str(len(body))
    headers.update(extra)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST {path} HTTP/{version}\r\n{head}\r\n".encode() + body


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes `sock` within `seconds`, and what it sent before."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        pass
    return True, data


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost x\r\n\r\n",  # no colon
        b"POST /v1/messages HTTP/9.9\r\nhost: x\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS hello
    ],
    ids=["garbage", "header-without-colon", "http-9.9", "two-lengths", "negative-length", "tls"],
)
def test_a_malformed_request_gets_400_and_the_server_goes_on(up, native, request_bytes):
    url = native()
    with connect(url) as sock:
        sock.sendall(request_bytes)
        closed, data = closed_within(sock, 5)
    assert closed
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert up.requests == []
    up.enqueue(Reply.json(anthropic_message()))
    assert httpx.post(url + "/v1/messages", json=MESSAGE).status_code == 200


@pytest.mark.parametrize("hosts", [[], ["proxy", "other"]], ids=["no-host", "two-hosts"])
def test_an_http_1_1_request_without_exactly_one_host_gets_400(up, native, hosts):
    url = native()
    head = "".join(f"host: {host}\r\n" for host in hosts)
    without = f"POST /v1/messages HTTP/1.1\r\n{head}content-length: {len(BODY)}\r\n\r\n"
    with connect(url) as sock:
        sock.sendall(without.encode() + BODY)
        status, _, body = read_response(sock)
        assert status == b"HTTP/1.1 400 Bad Request"
        message = json.loads(body)["error"]["message"]
        assert message == "an HTTP/1.1 request needs exactly one Host header"
        # Nothing went upstream, and the connection goes on.
        assert up.requests == []
        sock.sendall(post())
        assert read_response(sock)[0] == b"HTTP/1.1 200 OK"
    # HTTP/1.0 has no Host requirement.
    with connect(url) as sock:
        sock.sendall(post(version="1.0").replace(b"host: proxy\r\n", b""))
        closed, data = closed_within(sock, 5)
    assert closed
    assert data.startswith(b"HTTP/1.0 200 "), data
    assert len(up.requests) == 2


def test_oversized_headers_get_431(up, native):
    url = native(max_header_bytes=16 * 1024)
    with connect(url) as sock:
        sock.sendall(post(**{"x-padding": "a" * 32 * 1024}))
        closed, data = closed_within(sock, 5)
    assert closed
    assert data.startswith(b"HTTP/1.1 431 "), data
    assert up.requests == []
    # Heads under the limit are served.
    response = httpx.post(url + "/v1/messages", json=MESSAGE, headers={"x-padding": "a" * 8000})
    assert response.status_code == 200


def test_a_request_head_not_finished_within_the_header_timeout_closes_the_connection(up, native):
    url = native(header_timeout=1.0)
    with connect(url) as trickling, connect(url) as silent, connect(url) as idle:
        started = time.monotonic()
        silent.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
        trickling.sendall(b"P")
        # A keep-alive connection after a request also closes once idle that long.
        idle.sendall(post())
        assert read_response(idle)[0] == b"HTTP/1.1 200 OK"
        for byte in b"OST /v1/messages HTTP/1.1\r\nhost: x\r\n":
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                trickling.sendall(bytes([byte]))
        for sock in (silent, trickling, idle):
            closed, data = closed_within(sock, 3)
            assert closed
            assert b"200" not in data
        assert time.monotonic() - started < 4
    assert len(up.requests) == 1


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def h2_request_then_idle(sock: socket.socket) -> int:
    """An HTTP/2 request on `sock` (prior knowledge), read to its end; its status."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    head = [(":method", "POST"), (":path", "/v1/messages"), (":scheme", "http"),
            (":authority", "proxy"), ("content-type", "application/json")]  # fmt: skip
    conn.send_headers(1, head)
    conn.send_data(1, BODY, end_stream=True)
    sock.sendall(conn.data_to_send())
    status = 0
    while True:
        data = sock.recv(65536)
        assert data, "closed before the answer"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sock.sendall(conn.data_to_send())
                return status
        sock.sendall(conn.data_to_send())


def test_connections_that_send_no_request_are_closed_after_the_header_timeout(up, native):
    """hyper's header timeout starts once it knows HTTP/1 from HTTP/2: a client that sends
    nothing, or only the start of the HTTP/2 preface, never started it, nor does an
    HTTP/2 preface with no request. Each such connection would hold one of the server's
    connections for good, and a few fill `--limit-concurrency`: they close after the
    header timeout. An HTTP/2 connection that has sent a request stays, as a keep-alive
    connection does."""
    pytest.importorskip("h2")
    url = native(header_timeout=1.0, max_connections=4)
    with (
        connect(url) as silent,
        connect(url) as ambiguous,
        connect(url) as preface,
        connect(url) as served,
    ):
        started = time.monotonic()
        ambiguous.sendall(b"P")  # as the HTTP/2 preface begins
        preface.sendall(H2_PREFACE + H2_EMPTY_SETTINGS)
        assert h2_request_then_idle(served) == 200
        # They hold every connection the server takes meanwhile.
        with connect(url) as fifth:
            closed, data = closed_within(fifth, 2)
        assert closed
        assert data.startswith(b"HTTP/1.1 503 ")
        for sock in (silent, ambiguous, preface):
            closed, _ = closed_within(sock, 3)
            assert closed
        assert time.monotonic() - started < 4
        assert closed_within(served, 0.5) == (False, b"")
        # Once closed, they hold none.
        assert httpx.post(url + "/v1/messages", json=MESSAGE).status_code == 200
    assert len(up.requests) == 2


def test_an_http2_answer_a_slow_client_still_reads_arrives_whole(up, native):
    """An answer a slow HTTP/2 reader takes longer than the header timeout to read, long
    after hyper has all of it, arrives whole, in whole frames."""
    pytest.importorskip("h2")
    import h2.config
    import h2.connection
    import h2.settings

    url = native(header_timeout=1.0)
    big = b"x" * 2_500_000
    up.enqueue(Reply(body=big, headers={"content-type": "application/octet-stream"}))
    with connect(url, timeout=10) as sock:
        # A small receive buffer: the server has more to write than the sockets hold.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(2**31 - 1 - 65535)
        head = [(":method", "POST"), (":path", "/v1/messages"), (":scheme", "http"),
                (":authority", "proxy"), ("content-type", "application/json")]  # fmt: skip
        conn.send_headers(1, head)
        conn.send_data(1, BODY, end_stream=True)
        sock.sendall(conn.data_to_send() + b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
        buffer, received, ended = b"", 0, False
        started = time.monotonic()
        while not ended:
            time.sleep(0.08)  # at most 800 KB/s: the last MB takes over a second to read
            data = sock.recv(64 * 1024)
            assert data, f"closed after {received} bytes"
            buffer += data
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3]):
                length, kind, flags = int.from_bytes(buffer[:3]), buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9]) & 0x7FFFFFFF
                if kind == 0 and stream == 1:  # DATA
                    received += length
                    ended = ended or bool(flags & 1)
                buffer = buffer[9 + length :]
        assert received == len(big)
        assert time.monotonic() - started > 1.5, "read slower than the header timeout"


def test_a_long_http2_answer_is_not_cut_by_the_header_timeout(up, native):
    """Idle means no request in flight: an HTTP/2 stream that takes longer than the
    header timeout to finish, with pauses, is not cut."""
    url = native(header_timeout=1.0)
    up.enqueue(Reply.sse(anthropic_stream_events("a b c d"), chunk_delay=0.6))
    with httpx.Client(http1=False, http2=True, timeout=10) as http:
        stream = http.post(url + "/v1/messages", json={**MESSAGE, "stream": True})
        assert stream.http_version == "HTTP/2"
        assert stream.text.rstrip().endswith('data: {"type":"message_stop"}')
        # The connection went on being served all along.
        assert http.post(url + "/v1/messages", json=MESSAGE).status_code == 200


def test_connections_over_the_limit_get_503_and_are_closed_not_queued(up, native):
    url = native(max_connections=2)
    with connect(url) as first, connect(url) as second:
        for sock in (first, second):
            sock.sendall(post())
            assert read_response(sock)[0] == b"HTTP/1.1 200 OK"
        with connect(url) as third:
            closed, data = closed_within(third, 2)
        assert closed
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["message"] == "too many connections: try again shortly"
        # The connections already open go on being served.
        first.sendall(post())
        assert read_response(first)[0] == b"HTTP/1.1 200 OK"
    # Once one closes, a new connection is served.
    deadline = time.monotonic() + 5
    while True:
        try:
            response = httpx.post(url + "/v1/messages", json=MESSAGE)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert response.status_code == 200
    assert len(up.requests) == 4


def test_an_http_1_0_client_gets_its_answer_and_the_connection_closes(up, native):
    url = native()
    up.enqueue(Reply.json(anthropic_message("hello")))
    with connect(url) as sock:
        sock.sendall(post(version="1.0"))
        closed, data = closed_within(sock, 5)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert json.loads(body)["content"][0]["text"] == "hello"


def test_an_http_1_0_client_gets_a_whole_stream_delimited_by_the_close(up, native):
    url = native()
    reply = Reply.sse(anthropic_stream_events("one two three"), chunk_delay=0.01)
    up.enqueue(reply)
    with connect(url) as sock:
        sock.sendall(post(body=json.dumps({**MESSAGE, "stream": True}).encode(), version="1.0"))
        closed, data = closed_within(sock, 5)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert isinstance(reply.body, list)
    assert body == b"".join(reply.body)


def test_pipelined_requests_are_answered_in_order(up, native):
    url = native()
    for word in ("first", "second", "third"):
        up.enqueue(Reply.json(anthropic_message(word)))
    with connect(url) as sock:
        health_check = b"GET /_keyfailover/health HTTP/1.1\r\nhost: x\r\n\r\n"
        sock.sendall(post() + post() + health_check)
        responses = Responses(sock)
        texts = [json.loads(responses.next()[2])["content"][0]["text"] for _ in range(2)]
        status, _, health = responses.next()
    assert texts == ["first", "second"]
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(health)["status"] == "ok"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not a chunk size
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the chunk
    ],
    ids=["bad-size", "missing-crlf"],
)
def test_a_broken_chunked_body_is_400_without_an_upstream_call(up, native, body):
    url = native()
    with connect(url) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" + body
        )
        closed, data = closed_within(sock, 5)
    assert closed
    head, _, body_bytes = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body_bytes)["error"]["message"] == "the request body could not be read"
    assert up.requests == []


def test_a_body_cut_short_by_the_client_never_reaches_upstream(up, native):
    url = native()
    with connect(url) as sock:
        sock.sendall(post()[:-10])
        sock.shutdown(socket.SHUT_WR)
        closed_within(sock, 5)
    time.sleep(0.2)
    assert up.requests == []
    assert httpx.post(url + "/v1/messages", json=MESSAGE).status_code == 200


def test_a_body_over_the_limit_that_stalls_gets_413_at_once_and_a_close(up, native):
    url = native(proxy_options={"max_body_bytes": 1000})
    with connect(url) as sock:
        sock.sendall(post(body=b"x" * 1500)[:-400])  # 1,100 bytes sent, 400 never
        started = time.monotonic()
        closed, data = closed_within(sock, 5)
    assert closed
    assert time.monotonic() - started < 2
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 413 ")
    assert b"connection: close" in head
    assert up.requests == []


def test_a_body_over_the_limit_sent_whole_keeps_the_connection(up, native):
    url = native(proxy_options={"max_body_bytes": 1000})
    with connect(url) as sock:
        sock.sendall(post(body=b"x" * 5000))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 413 ")
        sock.sendall(post())
        assert read_response(sock)[0] == b"HTTP/1.1 200 OK"
    assert len(up.requests) == 1


def test_an_upgrade_request_is_refused_and_the_connection_closed(up, native):
    # (uvicorn answers upgrades itself, before the app, so this is the native server's own.)
    url = native()
    with connect(url) as sock:
        sock.sendall(
            b"GET /v1/messages HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n"
            b"upgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"sec-websocket-version: 13\r\n\r\n"
        )
        closed, data = closed_within(sock, 5)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["message"] == "protocol upgrades (websocket) cannot be proxied"
    assert up.requests == []


def test_http2_cleartext_with_prior_knowledge(up, native):
    pytest.importorskip("h2")
    url = native()
    up.enqueue(Reply.json(anthropic_message("over h2")))
    up.enqueue(Reply.sse(anthropic_stream_events("one two")))
    with httpx.Client(http1=False, http2=True) as http:
        response = http.post(url + "/v1/messages", json=MESSAGE)
        stream = http.post(url + "/v1/messages", json={**MESSAGE, "stream": True})
    assert response.http_version == "HTTP/2"
    assert response.json()["content"][0]["text"] == "over h2"
    assert stream.text.rstrip().endswith('data: {"type":"message_stop"}')
    # An HTTP/1.1-only server refuses the HTTP/2 preface.
    only_h1 = native(http2=False)
    with httpx.Client(http1=False, http2=True) as http, pytest.raises(httpx.TransportError):
        http.post(only_h1 + "/v1/messages", json=MESSAGE)


# --------------------------------------------------------------------------
# Access log
# --------------------------------------------------------------------------


def access_lines(capfd: pytest.CaptureFixture[str], count: int) -> list[str]:
    """The access log goes to stderr from a writer thread: wait for `count` lines."""
    lines: list[str] = []
    deadline = time.monotonic() + 5
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        lines += capfd.readouterr().err.splitlines()
    return lines


def test_the_access_log_has_one_line_per_request(up, native, capfd):
    url = native(access_log="text")
    up.enqueue(Reply.error(429, "rate_limit_error", "slow down"), Reply.json(anthropic_message()))
    assert httpx.post(url + "/v1/messages?beta=true", json=MESSAGE).status_code == 200
    assert httpx.get(url + "/_keyfailover/health").status_code == 200
    lines = access_lines(capfd, 2)
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "INFO keyfailover.proxy: POST /v1/messages -> 200 (attempts=2, key=key-1, "
    )
    assert lines[0].endswith(" ms)")
    assert lines[1].startswith("INFO keyfailover.proxy: GET /_keyfailover/health -> 200 (")
    assert all(key not in "\n".join(lines) for key in FAKE_KEYS)


def test_a_key_percent_encoded_in_a_path_is_neither_logged_nor_answered(up, native, capfd):
    """Escaped (one character or all), a key in a path is still a key: the access log and
    the admin area's 404 show the path decoded, the key replaced by its hint."""
    url = native(access_log="text")
    key = FAKE_KEYS[0]
    escaped = [key[:-1] + f"%{ord(key[-1]):02X}", "".join(f"%{b:02x}" for b in key.encode())]
    for path in escaped:
        answer = httpx.get(f"{url}/_keyfailover/{path}")
        assert answer.status_code == 404
        assert key not in answer.text
        assert "no admin endpoint" in answer.text
    lines = access_lines(capfd, 2)
    assert len(lines) == 2, lines
    assert all(key not in line and "..." in line for line in lines), lines


def test_the_access_log_in_json(up, native, capfd):
    url = native(access_log="json")
    assert httpx.post(url + "/v1/messages", json=MESSAGE).status_code == 200
    (line,) = access_lines(capfd, 1)
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "keyfailover.proxy"
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/messages"
    assert entry["status"] == 200
    assert entry["attempts"] == 1
    assert entry["key"] == "key-0"
    assert entry["duration_ms"] >= 0
    assert entry["message"].startswith("POST /v1/messages -> 200 (attempts=1, key=key-0, ")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("/_keyfailover", "is in an admin area"),
        ("/v1/_keyfailover/x", "is in an admin area"),
        ("/a b", "URL path"),
        ("/a%2Fb", "URL path"),
    ],
)
def test_a_route_where_no_request_reaches_it_or_over_an_admin_area_is_refused(up, prefix, message):
    from keyfailover import ConfigError
    from keyfailover._native import Server

    app = FailoverProxy(make_client(up)[0])
    with pytest.raises(ConfigError, match=message):
        Server([(prefix, app.gateway)])


def test_an_unknown_access_log_format_is_a_clear_error(up):
    from keyfailover import ConfigError
    from keyfailover._native import Server

    app = FailoverProxy(make_client(up)[0])
    with pytest.raises(ConfigError, match="access log format"):
        Server([("", app.gateway)], access_log="xml")


# --------------------------------------------------------------------------
# The same answers as the ASGI app
# --------------------------------------------------------------------------

TOKEN = "kf-team-token-alpha"
RATE_LIMITED = Reply.error(429, "rate_limit_error", "slow down", headers={"retry-after": "7"})
REVOKED = Reply.error(401, "authentication_error", "invalid x-api-key")

# (name, method, path, headers, body, upstream replies)
TABLE: list[tuple[str, str, str, dict[str, str], bytes, list[Reply]]] = [
    ("ok", "POST", "/v1/messages", {}, BODY, [Reply.json(anthropic_message("hi"))]),
    (
        "stream",
        "POST",
        "/v1/messages",
        {},
        json.dumps({**MESSAGE, "stream": True}).encode(),
        [Reply.sse(anthropic_stream_events("one two three"))],
    ),
    ("failover", "POST", "/v1/messages", {}, BODY, [RATE_LIMITED, Reply.json(anthropic_message())]),
    (
        "passed-through-400",
        "POST",
        "/v1/messages",
        {},
        BODY,
        [Reply.error(400, "invalid_request_error", "max_tokens: required")],
    ),
    ("no-token", "POST", "/v1/messages", {"x-api-key": "kf-wrong"}, BODY, []),
    (
        "bearer-beside-the-token",
        "POST",
        "/v1/messages",
        {"authorization": "Bearer sk-own"},
        BODY,
        [Reply.json(anthropic_message())],
    ),
    ("too-large", "POST", "/v1/messages", {}, b"x" * 2000, []),
    ("trace", "TRACE", "/v1/messages", {}, b"", []),
    ("escape", "GET", "/v1/../../etc/passwd", {}, b"", []),
    ("health", "GET", "/_keyfailover/health", {}, b"", []),
    ("unknown-admin", "GET", "/_keyfailover/nothing", {}, b"", []),
    ("admin-method", "DELETE", "/_keyfailover/keys", {}, b"", []),
    ("get-models", "GET", "/v1/models?limit=2", {}, b"", [Reply.json({"data": []})]),
    ("head", "HEAD", "/v1/models", {}, b"", [Reply.json({"data": []})]),
    ("all-limited", "POST", "/v1/messages", {}, BODY, [RATE_LIMITED]),  # key-0 cools already
    ("exhausted", "POST", "/v1/messages", {}, BODY, []),
    ("all-revoked", "POST", "/v1/messages", {}, BODY, []),
]
IGNORED = {"date", "server"}


def raw_exchange(url: str, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """Sends one request as written (no client normalising it) and reads to the close."""
    fields = {"host": "proxy", "x-api-key": TOKEN, "connection": "close", **headers}
    if body or method == "POST":
        fields["content-length"] = str(len(body))
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    with connect(url) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        return read_all(sock)


def normalised(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = sorted(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in lines)
        if name.strip().lower().decode() not in IGNORED
    )
    if (b"transfer-encoding", b"chunked") in headers:
        body = dechunk(body)
    # The status code, not the reason phrase (h11 and hyper word 413 differently).
    return status.split(b" ")[1], headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2 :]


def test_both_front_ends_answer_a_request_table_alike():
    """Status, headers (minus Date and Server) and body, byte for byte."""
    answers: dict[str, list[tuple[str, Any]]] = {}
    for front_end in ("uvicorn", "native"):
        with MockUpstream() as up:
            client, pool = make_client(up)
            app = FailoverProxy(client, client_tokens=[TOKEN], max_body_bytes=1000)
            server = serve_asgi(app, http="h11") if front_end == "uvicorn" else serve_native(app)
            with server as url:
                answers[front_end] = []
                for name, method, path, headers, body, replies in TABLE:
                    if name == "all-revoked":
                        for label in ("key-0", "key-1"):
                            pool.key(label).reset()
                        up.set_reply(FAKE_KEYS[0], REVOKED)
                        up.set_reply(FAKE_KEYS[1], REVOKED)
                    up.enqueue(*replies)
                    raw = raw_exchange(url, method, path, headers, body)
                    answers[front_end].append((name, normalised(raw)))
    for (name, uvicorn_answer), (_, native_answer) in zip(
        answers["uvicorn"], answers["native"], strict=True
    ):
        assert native_answer == uvicorn_answer, name
    statuses = {name: answer[0] for name, answer in answers["native"]}
    assert statuses == {
        "ok": b"200",
        "stream": b"200",
        "failover": b"200",
        "passed-through-400": b"400",
        "no-token": b"401",
        "bearer-beside-the-token": b"200",
        "too-large": b"413",
        "trace": b"405",
        "escape": b"400",
        "health": b"200",
        "unknown-admin": b"404",
        "admin-method": b"405",
        "get-models": b"200",
        "head": b"200",
        "all-limited": b"429",
        "exhausted": b"429",
        "all-revoked": b"502",
    }
    # A whole body goes out with its length; HEAD's length without the body.
    native = dict(answers["native"])
    for name, body in (("get-models", b'{"data":[]}'), ("head", b"")):
        _, headers, sent = native[name]
        assert (b"content-length", b"11") in headers, name
        assert sent == body, name


# --------------------------------------------------------------------------
# Graceful shutdown of `keyfailover serve`
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sigterm_with_50_streams_in_flight_finishes_them_or_ends_them_with_an_error_event(
    up: MockUpstream,
):
    """25 streams end within --grace and arrive whole; 25 would take a minute and end,
    past the grace period, with an SSE error event. The process exits 0."""
    short = anthropic_stream_events(" ".join(["word"] * 10))  # about 1.3 s at 0.1 s a chunk
    long = anthropic_stream_events(" ".join(["word"] * 10))
    for i in range(50):
        up.enqueue(Reply.sse(short if i % 2 == 0 else long, chunk_delay=0.1 if i % 2 == 0 else 5))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--upstream", up.url,
         "--keys-env", "K", "--port", str(port), "--grace", "3"],
        env={**os.environ, "K": FAKE_KEYS[0]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        bodies: dict[int, bytes] = {}
        first_bytes = threading.Barrier(51, timeout=20)

        def stream(i: int) -> None:
            body = json.dumps({**MESSAGE, "stream": True, "metadata": {"user_id": str(i)}})
            with connect(url, timeout=30) as sock:
                sock.sendall(post(body=body.encode(), connection="close"))
                data = sock.recv(65536)
                first_bytes.wait()
                bodies[i] = data + read_all(sock)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(50)]
        for thread in threads:
            thread.start()
        first_bytes.wait()  # every stream has its head and first event
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(20)
        _, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert 3 <= elapsed < 8, elapsed
    assert len(bodies) == 50
    whole = ended = 0
    for data in bodies.values():
        head, _, chunked = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        text = dechunk(chunked).decode()
        events = [block.split("\n")[0] for block in text.strip().split("\n\n")]
        assert events[0] == "event: message_start"
        if events[-1] == "event: message_stop":
            whole += 1
        else:
            assert events[-1] == "event: error", text
            assert "shutting down" in text.rsplit("\n\n", 2)[-2]
            ended += 1
    assert (whole, ended) == (25, 25)
    assert "stopped" in err
