"""The proxy's policy (the core's Gateway) as a caller meets it through FailoverProxy
under uvicorn: what is refused before any upstream call, what crosses unchanged,
and configuration mistakes caught at construction. Raw sockets where an HTTP
client would tidy the request up first.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from conftest import FAKE_KEYS, make_client

import keyfailover as kf
from keyfailover.asgi import FailoverProxy
from keyfailover.testing import MockUpstream, Reply, serve_asgi, serve_native
from keyfailover.transport import FailoverTransport

TOKEN = "kf-team-token-alpha"


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


@pytest.mark.parametrize("method", ["CONNECT", "TRACE"])
def test_connect_and_trace_are_405_without_an_upstream_call(up, proxy_url, method):
    target = "upstream.example:443" if method == "CONNECT" else "/v1/messages"
    status, _, body = raw_request(proxy_url, request_head(method, target))
    assert status in (400, 405)  # uvicorn itself may refuse an authority-form CONNECT
    if method == "TRACE":
        assert status == 405
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
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
    status, _, _ = raw_request(proxy_url, head)
    assert status in (400, 403, 404)  # uvicorn may answer a websocket handshake itself
    assert up.requests == []
    # The same through the HTTP path (as an ASGI server without websocket support sends it).
    with httpx.Client(base_url=proxy_url, headers={"x-api-key": TOKEN}) as http:
        response = http.get("/v1/realtime", headers={"upgrade": "websocket"})
    assert response.status_code == 400
    assert "websocket" in response.json()["error"]["message"]
    assert up.requests == []


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
