"""The proxy's policy (the core's Gateway) as a caller meets it through FailoverProxy
under uvicorn: what is refused before any upstream call, what crosses unchanged,
and configuration mistakes caught at construction. Raw sockets where an HTTP
client would tidy the request up first.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from conftest import FAKE_KEYS, make_client

import keyfailover as kf
from keyfailover import _logging
from keyfailover.asgi import FailoverProxy
from keyfailover.testing import MockUpstream, Reply, serve_asgi, serve_native
from keyfailover.transport import FailoverTransport

TOKEN = "kf-team-token-alpha"
MESSAGE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=["uvicorn", "native"])
def proxy_url(request: pytest.FixtureRequest, up: MockUpstream) -> Iterator[str]:
    """A proxy in front of `up` on either front end."""
    client, _ = make_client(up.url + "/prefix", "anthropic", 2)
    serve = serve_asgi if request.param == "uvicorn" else serve_native
    with serve(FailoverProxy(client, client_tokens=[TOKEN])) as url:
        yield url


def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Sends `head` (and `body`) as is; returns status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), headers, rest


def request_head(method: str, target: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: proxy", f"x-api-key: {TOKEN}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_a_content_length_upstream_repeats_goes_on_once(up, proxy_url):
    up.enqueue(
        Reply.raw(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
            b"content-length: 2\r\n\r\n{}",
            close=False,
        )
    )
    host, port = proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request_head("POST", "/v1/messages", "content-length: 2") + b"{}")
        data = b""
        while not data.endswith(b"\r\n\r\n{}"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200")
    assert [line.lower() for line in lines if line.lower().startswith(b"content-length")] == [
        b"content-length: 2"
    ]


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
def test_connect_and_trace_are_405_without_an_upstream_call(up, proxy_url, method):
    target = "upstream.example:443" if method == "CONNECT" else "/v1/messages"
    status, headers, body = raw_request(proxy_url, request_head(method, target))
    assert status in (400, 405)  # uvicorn itself may refuse an authority-form CONNECT
    if method == "TRACE":
        assert status == 405
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert up.requests == []


def test_a_websocket_upgrade_is_refused_without_an_upstream_call(up, proxy_url):
    head = request_head(
        "GET",
        "/v1/realtime",
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-version: 13",
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    # Both front ends answer the handshake as the gateway does (uvicorn through the ASGI
    # extension `websocket.http.response`): 400 in the provider's envelope.
    status, _, body = raw_request(proxy_url, head)
    assert status == 400
    assert json.loads(body)["error"]["message"] == "protocol upgrades (websocket) cannot be proxied"
    tokenless = head.replace(f"x-api-key: {TOKEN}\r\n".encode(), b"")
    status, _, body = raw_request(proxy_url, tokenless)
    assert status == 401
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert up.requests == []
    # The same through the HTTP path (as an ASGI server without websocket support sends it).
    with httpx.Client(base_url=proxy_url, headers={"x-api-key": TOKEN}) as http:
        response = http.get("/v1/realtime", headers={"upgrade": "websocket"})
    assert response.status_code == 400
    assert "websocket" in response.json()["error"]["message"]
    assert up.requests == []


@pytest.mark.parametrize("coding", ["gzip, chunked", "x-custom, chunked"])
def test_a_body_in_a_transfer_coding_other_than_chunked_is_501_without_an_upstream_call(
    up, proxy_url, coding, request
):
    """The server can take the chunks apart, not the coding under them: sent on, the
    body would reach the upstream coded with nothing to say so."""
    head = request_head("POST", "/v1/messages", f"transfer-encoding: {coding}")
    status, headers, body = raw_request(proxy_url, head, b"5\r\nhello\r\n0\r\n\r\n")
    if status == 400:  # uvicorn's h11 parser refuses it first, as it may
        assert request.node.callspec.params["proxy_url"] == "uvicorn"
    else:
        assert status == 501
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error"
        assert coding.split(",")[0] in error["message"]
        assert headers["connection"] == "close"
    assert up.requests == []
    # The server goes on: the next request is forwarded.
    httpx.post(proxy_url + "/v1/messages", json=MESSAGE, headers={"x-api-key": TOKEN})
    assert [r.path for r in up.requests] == ["/prefix/v1/messages"]


@pytest.mark.parametrize(
    "target", ["/../admin", "/%2e%2e/admin", "/v1/../../admin", "/.%2E/admin", "/a\\..\\admin"]
)
def test_targets_that_leave_the_upstream_prefix_are_400(up, proxy_url, target):
    status, _, body = raw_request(proxy_url, request_head("GET", target))
    assert status == 400, body
    assert up.requests == []


def test_dot_segments_inside_the_prefix_are_resolved(up, proxy_url):
    raw_request(proxy_url, request_head("GET", "/v1/x/../models"))
    assert [r.path for r in up.requests] == ["/prefix/v1/models"]


def test_header_bytes_cross_unchanged(up, proxy_url):
    head = request_head("POST", "/v1/messages", "x-foo: caf\xe9", "content-length: 2")
    raw_request(proxy_url, head, b"{}")
    sent = up.requests[0].header("x-foo")  # MockUpstream decodes header bytes as Latin-1
    assert sent is not None
    assert sent.encode("latin-1") == b"caf\xe9", "not re-encoded as UTF-8"


def test_response_header_bytes_cross_unchanged(up, proxy_url):
    up.enqueue(Reply.raw(b"HTTP/1.1 200 OK\r\nx-bar: na\xefve\r\ncontent-length: 2\r\n\r\n{}"))
    status, headers, body = raw_request(
        proxy_url, request_head("POST", "/v1/messages", "content-length: 2"), b"{}"
    )
    assert (status, body) == (200, b"{}")
    assert headers["x-bar"].encode("latin-1") == b"na\xefve"


def test_a_bare_string_of_client_tokens_is_refused(up):
    client, _ = make_client(up)
    for tokens in ["team-token", b"team-token"]:
        with pytest.raises(kf.ConfigError, match="not a single string"):
            FailoverProxy(client, client_tokens=tokens)  # type: ignore[arg-type]
    for bad, match in [([], "empty"), (["ok", " "], "blank"), ([42], "must be str")]:
        with pytest.raises(kf.ConfigError, match=match):
            FailoverProxy(client, client_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(kf.ConfigError, match="one of the pool's keys") as excinfo:
        FailoverProxy(client, client_tokens=[FAKE_KEYS[0]])
    assert FAKE_KEYS[0] not in str(excinfo.value)


def test_a_single_character_is_not_a_token(up):
    client, _ = make_client(up)
    with serve_asgi(FailoverProxy(client, client_tokens=["team-token"])) as url:
        response = httpx.post(url + "/v1/messages", headers={"x-api-key": "t"}, json={})
    assert response.status_code == 401
    assert up.requests == []


@pytest.mark.parametrize(
    ("client", "match"),
    [
        ("pool", "not KeyPool: wrap the pool"),
        ("string", "a FailoverClient is needed, not str"),
    ],
)
def test_failover_proxy_checks_its_client(client: str, match: str):
    given: Any = kf.KeyPool(FAKE_KEYS[:1]) if client == "pool" else "http://x"
    with pytest.raises(kf.ConfigError, match=match):
        FailoverProxy(given)


def test_max_body_bytes_must_not_be_negative(up):
    with pytest.raises(kf.ConfigError, match="max_body_bytes"):
        FailoverProxy(make_client(up)[0], max_body_bytes=-1)


def test_base_url_credentials_are_refused_and_never_shown():
    pool = kf.KeyPool(FAKE_KEYS[:1])
    with pytest.raises(kf.ConfigError, match="must not contain credentials") as excinfo:
        kf.FailoverClient(pool, base_url="https://user:hunter2@api.example.com")
    assert "hunter2" not in str(excinfo.value)
    assert "https://***@api.example.com" in str(excinfo.value)


def test_a_key_in_a_bad_base_url_is_masked():
    pool = kf.KeyPool(FAKE_KEYS[:1])
    with pytest.raises(kf.ConfigError) as excinfo:
        kf.FailoverClient(pool, base_url=f"https://api.example.com/{FAKE_KEYS[0]}?x=1")
    assert FAKE_KEYS[0] not in str(excinfo.value)
    assert pool.key("key-0").hint in str(excinfo.value)


@pytest.mark.parametrize("base", ["", "/v1", "/v1/"])
def test_the_openai_sdk_works_with_and_without_v1_in_base_url(up, base):
    client, _ = make_client(up.url + base, "openai", 1)
    transport_client = openai.OpenAI(
        api_key="unused",
        max_retries=0,
        http_client=httpx2.Client(transport=FailoverTransport(client)),
    )
    reply = transport_client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    assert [r.path for r in up.requests] == ["/v1/chat/completions"]


@pytest.fixture(params=["uvicorn", "native"])
def serve_proxy(request: pytest.FixtureRequest, up: MockUpstream) -> Iterator[Any]:
    """Serves a FailoverProxy in front of `up`, built with the options given, on either
    front end: `serve_proxy(**options)` is a context manager yielding its URL."""
    serve = serve_asgi if request.param == "uvicorn" else serve_native

    def start(**options: Any) -> Any:
        client, _ = make_client(up.url, "anthropic", 2)
        return serve(FailoverProxy(client, client_tokens=[TOKEN], **options))

    return start


def read_all(sock: socket.socket) -> bytes:
    """What arrives until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_request_body_that_stops_coming_is_408_and_the_connection_closes(up, serve_proxy):
    with serve_proxy(body_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = request_head("POST", "/v1/messages", "content-length: 100")
            sock.sendall(head + b'{"model":')  # and then nothing
            started = time.monotonic()
            answer = read_all(sock)  # ends: the server closed the connection
            took = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"408", answer
    assert b"connection: close" in rest.lower()
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "invalid_request_error"
    assert "paused for longer than 0.5 s" in body["error"]["message"]
    assert 0.4 < took < 3
    assert up.requests == []


@pytest.mark.parametrize("seconds", [0, -1, float("inf"), float("nan"), 86_401])
def test_body_timeout_must_be_above_0_and_at_most_a_day(up, seconds):
    client, _ = make_client(up.url, "anthropic", 2)
    with pytest.raises(kf.ConfigError, match="body_timeout must be"):
        FailoverProxy(client, body_timeout=seconds)


def test_a_slow_but_steady_body_is_not_cut_off(up, serve_proxy):
    with serve_proxy(body_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            body = json.dumps(MESSAGE).encode()
            sock.sendall(request_head("POST", "/v1/messages", f"content-length: {len(body)}"))
            for i in range(0, len(body), 10):  # 0.3 s apart, 1.5 s and more in all
                time.sleep(0.3 if i < 50 else 0)
                sock.sendall(body[i : i + 10])
            status_line = sock.recv(65536).partition(b"\r\n")[0]
    assert status_line.split()[1] == b"200"
    assert up.requests[0].json() == MESSAGE


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ((), 401),  # no client token
        ((f"x-api-key: {TOKEN}", "content-length: 5000"), 413),
    ],
)
def test_a_refused_request_is_not_asked_for_its_body(up, serve_proxy, extra, status):
    """A client that waits for `100 Continue` before it sends its body gets the refusal
    instead, never an invitation to upload a body that would be thrown away."""
    with serve_proxy(max_body_bytes=1000) as url:
        host, port = url.removeprefix("http://").split(":")
        head = ["POST /v1/messages HTTP/1.1", "host: proxy", "expect: 100-continue"]
        if not extra:
            head.append("content-length: 10")
        head += extra
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            first = sock.recv(65536)
    assert first.split()[1] == str(status).encode(), first
    assert b"100 Continue" not in first
    assert up.requests == []


def test_a_body_cut_short_by_the_server_is_never_sent_upstream(up):
    """If the ASGI server hands over less than the Content-Length announced (uvicorn's
    httptools parser does, for a request that asks for a protocol upgrade), the request
    is refused rather than sent upstream with a pool key and a body that is not the
    caller's."""
    client, _ = make_client(up.url, "anthropic", 2)
    proxy = FailoverProxy(client, client_tokens=[TOKEN])
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
        "query_string": b"",
        "headers": [(b"x-api-key", TOKEN.encode()), (b"content-length", b"81")],
    }
    sent: list[dict[str, Any]] = []

    received: list[int] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        if len(received) > 1:  # as a server does: nothing more until the client leaves
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(proxy(scope, receive, send))
    assert sent[0]["status"] == 400
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert "Content-Length says 81" in body["error"]["message"]
    assert up.requests == []


def test_a_reload_callbacks_error_shows_no_pool_key(up, serve_proxy, caplog):
    """The callback's message is passed on, to the caller and the admin log, with every
    pool key in it replaced by its hint."""

    def reload() -> list[str]:
        raise ValueError(f"the new file repeats {FAKE_KEYS[0]}")

    with caplog.at_level("INFO"), serve_proxy(reload=reload) as url:
        answer = httpx.post(url + "/_keyfailover/reload", headers={"x-api-key": TOKEN})
        _logging.flush()
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert message.startswith("reload failed: ")
    assert "the new file repeats sk-" in message
    assert FAKE_KEYS[0] not in answer.text
    logged = [r.getMessage() for r in caplog.records if r.name == "keyfailover.admin"]
    assert any("failed: the reload callback raised" in line for line in logged), logged
    failed = [r for r in caplog.records if r.name == "keyfailover.admin" and "failed" in r.msg]
    assert failed
    assert {r.levelname for r in failed} == {"WARNING"}, "a failed action is a warning"
    assert not [line for line in logged if FAKE_KEYS[0] in line]


async def async_keys() -> list[str]:
    return FAKE_KEYS[:1]


@pytest.mark.parametrize(
    ("reload", "message"),
    [
        (async_keys, "not an async one"),
        ("keys.json", "a callable returning the keys, not str"),
    ],
)
def test_a_reload_callback_that_cannot_return_keys_is_refused_at_once(up, reload, message):
    client, _ = make_client(up.url, "anthropic", 1)
    with pytest.raises(kf.ConfigError, match=message):
        FailoverProxy(client, client_tokens=[TOKEN], reload=reload)


def test_a_reload_callback_returning_an_awaitable_gets_a_clear_error(up, serve_proxy, recwarn):
    class Keys:  # a callable object whose __call__ is async: not seen until called
        async def __call__(self) -> list[str]:
            return FAKE_KEYS[:1]

    with serve_proxy(reload=Keys()) as url:
        answer = httpx.post(url + "/_keyfailover/reload", headers={"x-api-key": TOKEN})
    assert answer.status_code == 400
    assert "returned an awaitable" in answer.json()["error"]["message"]
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@pytest.mark.parametrize("front_end", ["uvicorn", "native"])
def test_a_body_still_coming_when_the_grace_period_ends_gets_503(up, front_end):
    client, _ = make_client(up.url, "anthropic", 2)
    proxy = FailoverProxy(client, client_tokens=[TOKEN])
    serve = serve_asgi if front_end == "uvicorn" else functools.partial(serve_native, grace=0.5)
    with serve(proxy) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(request_head("POST", "/v1/messages", "content-length: 100") + b"{")
        time.sleep(0.3)  # the body is being read
        started = time.monotonic()
        if front_end == "uvicorn":
            proxy.shutdown()  # what `serve` does once the grace period is over
        # native: leaving `serve_native` shuts the server down, with 0.5 s of grace
    with sock:
        answer = read_all(sock)
    assert answer.split()[1] == b"503", answer
    assert b"the server is shutting down" in answer
    assert time.monotonic() - started < 3
    assert up.requests == []


def test_options_asterisk_is_refused_without_an_upstream_call(up, proxy_url):
    status, _, body = raw_request(proxy_url, request_head("OPTIONS", "*"))
    assert status == 400, body
    assert "must start with '/'" in json.loads(body)["error"]["message"]
    assert up.requests == []
