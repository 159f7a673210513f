"""FailoverProxy end to end: a real uvicorn on loopback in front of MockUpstream, driven by
the official anthropic and openai SDKs and by raw httpx; ASGI details (lifespan, websocket,
a broken body) through a tiny in-process ASGI driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import uvicorn
from conftest import FAKE_KEYS, make_client, run
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from keyfailover import KeyPool, UpstreamError
from keyfailover.asgi import FailoverProxy
from keyfailover.testing import (
    MockUpstream,
    Reply,
    anthropic_message,
    anthropic_stream_events,
    openai_stream_chunks,
    serve_asgi,
    serve_native,
)

KEYS = FAKE_KEYS[:2]
TOKEN, OTHER_TOKEN = "kf-team-token-alpha", "kf-team-token-beta"
USER_KEY = "sk-caller-own-key-5f3c2a1b"
MESSAGE: dict[str, Any] = {
    "model": "mock-model",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}
CHAT: dict[str, Any] = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
PATH = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
BODY = {"anthropic": MESSAGE, "openai": CHAT}


@dataclasses.dataclass
class Proxy:
    url: str
    app: FailoverProxy
    pool: KeyPool


def make_proxy(up: MockUpstream, provider: str = "anthropic", **options: Any) -> FailoverProxy:
    return FailoverProxy(make_client(up, provider)[0], **options)


class Switch:
    """An ASGI app passing each request to the app of the moment: one uvicorn for all tests."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the server's, not a test's
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Switch]]:
    switch = Switch()
    with serve_asgi(switch) as url:
        yield url, switch


@pytest.fixture(params=["uvicorn", "native"])
def serve(
    request: pytest.FixtureRequest, up: MockUpstream, server: tuple[str, Switch]
) -> Iterator[Callable[..., Proxy]]:
    """Serves a new FailoverProxy (in front of `up`) on either front end: the ASGI app
    behind the shared uvicorn server, or the native server `keyfailover serve` runs.
    Every test using it runs against both, so they must answer alike."""
    url, switch = server
    with contextlib.ExitStack() as stack:

        def start(provider: str = "anthropic", **options: Any) -> Proxy:
            app = make_proxy(up, provider, **options)
            if request.param == "uvicorn":
                switch.app = app
                return Proxy(url, app, app.client.pool)
            return Proxy(stack.enter_context(serve_native(app)), app, app.client.pool)

        yield start


@contextlib.contextmanager
def serve_with_root_path(app: Any, root_path: str) -> Iterator[str]:
    """`serve_asgi` with uvicorn's --root-path (as behind a prefix-stripping reverse proxy)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", root_path=root_path)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def rate_limited(provider: str = "anthropic", seconds: int = 30) -> Reply:
    return Reply.error(
        429,
        "rate_limit_error",
        "slow down",
        provider=provider,
        headers={"retry-after": f"{seconds}"},
    )


def anthropic_sdk(
    url: str, api_key: str | None = "sk-caller-placeholder", **kw: Any
) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, **kw)


def openai_sdk(url: str, api_key: str = "sk-caller-placeholder") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def leaked_secrets(response: httpx.Response) -> list[str]:
    """Pieces (8+ characters) of any pool key in the response's headers or body."""
    text = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items()) + response.text
    return [key[i : i + 8] for key in KEYS for i in range(len(key) - 7) if key[i : i + 8] in text]


def assert_envelope(provider: str, response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if provider == "anthropic":
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == error_type
    assert body["error"]["message"]


def credentials_seen(up: MockUpstream) -> list[str | None]:
    return [request.credential for request in up.requests]


# --------------------------------------------------------------------------
# Forwarding with failover, both SDKs
# --------------------------------------------------------------------------


def test_anthropic_sdk_fails_over_blocking_and_streaming(up, serve):
    up.set_reply(KEYS[0], rate_limited())
    proxy = serve()
    with anthropic_sdk(proxy.url) as client:
        message = client.messages.create(**MESSAGE)
        with client.messages.stream(**MESSAGE) as stream:
            text = stream.get_final_text()
    assert message.content[0].text == "Hello from mock"
    assert text == "Hello from mock"
    # key-0 was tried once, then cooled down; key-1 served both requests.
    assert credentials_seen(up) == [KEYS[0], KEYS[1], KEYS[1]]
    assert [r.path for r in up.requests] == ["/v1/messages"] * 3
    assert json.loads(up.requests[2].body)["stream"] is True
    assert proxy.pool.health()["keys"] == {"valid": 1, "temporary": 1, "permanent": 0}


def test_openai_sdk_fails_over_blocking_and_streaming(up, serve):
    up.set_reply(KEYS[0], rate_limited("openai"))
    proxy = serve("openai")
    with openai_sdk(proxy.url) as client:
        completion = client.chat.completions.create(**CHAT)
        chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert completion.choices[0].message.content == "Hello from mock"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from mock"
    assert credentials_seen(up) == [KEYS[0], KEYS[1], KEYS[1]]
    assert up.requests[1].header("authorization") == f"Bearer {KEYS[1]}"
    assert [r.path for r in up.requests] == ["/v1/chat/completions"] * 3


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_exhausted_pool_reaches_the_sdk_as_rate_limit_error(up, serve, provider):
    for key in KEYS:
        up.set_reply(key, rate_limited(provider, seconds=30))
    proxy = serve(provider)
    if provider == "anthropic":
        with anthropic_sdk(proxy.url) as client, pytest.raises(anthropic.RateLimitError) as info:
            client.messages.create(**MESSAGE)
    else:
        with openai_sdk(proxy.url) as client, pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**CHAT)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "30"
    assert "all configured keys are rate-limited" in str(info.value)
    assert credentials_seen(up) == KEYS
    assert proxy.pool.health()["status"] == "exhausted"


def test_sse_chunks_are_relayed_as_they_arrive(up, serve):
    reply = Reply.sse(anthropic_stream_events("one two three four five"), chunk_delay=0.05)
    up.enqueue(reply)
    proxy = serve()
    arrivals: list[float] = []
    received = b""
    with (
        httpx.Client() as http,
        http.stream("POST", proxy.url + "/v1/messages", json={**MESSAGE, "stream": True}) as resp,
    ):
        assert resp.headers["content-type"] == "text/event-stream"
        for chunk in resp.iter_raw():
            arrivals.append(time.monotonic())
            received += chunk
    assert received == b"".join(reply.body)  # type: ignore[arg-type]
    # Ten events 0.05 s apart: a buffering proxy would deliver them all at once.
    assert len(arrivals) >= 3
    assert arrivals[-1] - arrivals[0] > 0.3


# --------------------------------------------------------------------------
# Client tokens and BYOK
# --------------------------------------------------------------------------


def test_client_tokens_are_accepted_in_either_header_and_never_forwarded(up, serve, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    proxy = serve(client_tokens=[TOKEN, OTHER_TOKEN])
    with anthropic_sdk(proxy.url, api_key=TOKEN) as client:  # x-api-key
        assert client.messages.create(**MESSAGE).content[0].text == "Hello from mock"
    with anthropic_sdk(proxy.url, api_key=None, auth_token=OTHER_TOKEN) as client:  # Bearer
        assert client.messages.create(**MESSAGE).content[0].text == "Hello from mock"
    assert credentials_seen(up) == [KEYS[0], KEYS[0]]
    for request in up.requests:
        assert request.header("authorization") is None
        assert not any(TOKEN in v or OTHER_TOKEN in v for _, v in request.headers)


def test_openai_sdk_with_client_token(up, serve):
    proxy = serve("openai", client_tokens=[TOKEN])
    with openai_sdk(proxy.url, api_key=TOKEN) as client:
        assert client.chat.completions.create(**CHAT).choices[0].message.content
    assert up.requests[0].header("authorization") == f"Bearer {KEYS[0]}"


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_wrong_or_missing_client_token_is_401_without_upstream_call(up, serve, provider):
    proxy = serve(provider, client_tokens=[TOKEN])
    url = proxy.url + PATH[provider]
    with httpx.Client() as http:
        responses = [
            http.post(url, json=BODY[provider]),
            http.post(url, json=BODY[provider], headers={"x-api-key": "not-the-token"}),
            http.post(url, json=BODY[provider], headers={"authorization": f"Bearer {TOKEN}x"}),
            http.post(url, json=BODY[provider], headers={"authorization": f"Basic {TOKEN}"}),
        ]
    for response in responses:
        assert_envelope(provider, response, 401, "authentication_error")
    if provider == "anthropic":
        with (
            anthropic_sdk(proxy.url, api_key="wrong") as client,
            pytest.raises(anthropic.AuthenticationError),
        ):
            client.messages.create(**MESSAGE)
    else:
        with (
            openai_sdk(proxy.url, api_key="wrong") as client,
            pytest.raises(openai.AuthenticationError) as info,
        ):
            client.chat.completions.create(**CHAT)
        assert info.value.code == "invalid_api_key"
    assert up.requests == []


@pytest.mark.parametrize(
    ("tokens", "allow_byok", "sent", "upstream_sees"),
    [
        (None, False, USER_KEY, KEYS[0]),  # stripped, the pool serves
        (None, False, None, KEYS[0]),
        (None, True, USER_KEY, USER_KEY),  # the caller's own key
        (None, True, None, KEYS[0]),
        ([TOKEN], True, USER_KEY, USER_KEY),
        ([TOKEN], True, TOKEN, KEYS[0]),
        ([TOKEN], False, TOKEN, KEYS[0]),
    ],
)
def test_what_upstream_sees_as_credential(up, serve, tokens, allow_byok, sent, upstream_sees):
    proxy = serve(client_tokens=tokens, allow_byok=allow_byok)
    headers = {} if sent is None else {"x-api-key": sent}
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/messages", json=MESSAGE, headers=headers)
    assert response.status_code == 200
    assert credentials_seen(up) == [upstream_sees]


def test_byok_bearer_reaches_openai_upstream(up, serve):
    proxy = serve("openai", client_tokens=[TOKEN], allow_byok=True)
    with openai_sdk(proxy.url, api_key=USER_KEY) as client:
        client.chat.completions.create(**CHAT)
    assert up.requests[0].header("authorization") == f"Bearer {USER_KEY}"


def test_byok_is_a_single_attempt_that_leaves_the_pool_alone(up, serve):
    up.set_reply(USER_KEY, Reply.error(429, "rate_limit_error", "your own key is slow"))
    proxy = serve(allow_byok=True)
    with (
        anthropic_sdk(proxy.url, api_key=USER_KEY) as client,
        pytest.raises(anthropic.RateLimitError, match="your own key is slow"),
    ):
        client.messages.create(**MESSAGE)
    assert credentials_seen(up) == [USER_KEY]
    assert proxy.pool.health() == {
        "status": "ok",
        "keys": {"valid": 2, "temporary": 0, "permanent": 0},
    }


# --------------------------------------------------------------------------
# Body limit
# --------------------------------------------------------------------------


def test_announced_oversized_body_is_refused_before_it_arrives(up, serve):
    proxy = serve(max_body_bytes=1000)
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\ncontent-type: application/json\r\n"
            b"content-length: 1000000\r\n\r\n"
        )
        # Nothing of the body is sent: a proxy that waited for it would time out here.
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 ")
    assert up.requests == []


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_body_over_the_limit_is_413_without_upstream_call(up, serve, provider):
    proxy = serve(provider, max_body_bytes=1000)
    url = proxy.url + PATH[provider]

    def chunked_upload() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * 400

    with httpx.Client() as http:
        announced = http.post(url, content=b"x" * 1001)
        counted = http.post(url, content=chunked_upload())
        assert "content-length" not in counted.request.headers  # really a chunked upload
        assert_envelope(provider, announced, 413, "request_too_large")
        assert_envelope(provider, counted, 413, "request_too_large")
        assert up.requests == []
        # At the limit exactly, the body goes through whole.
        http.post(url, content=b"y" * 1000)
        http.post(url, content=iter([b"z" * 500, b"z" * 500]))
    assert [r.body for r in up.requests] == [b"y" * 1000, b"z" * 1000]


# --------------------------------------------------------------------------
# Admin endpoints
# --------------------------------------------------------------------------


def test_admin_reports_health_and_masked_keys(up, serve):
    proxy = serve()
    with httpx.Client(base_url=proxy.url) as http:
        assert http.get("/_keyfailover/health").json() == {
            "status": "ok",
            "keys": {"valid": 2, "temporary": 0, "permanent": 0},
        }
        up.set_reply(KEYS[0], rate_limited())
        http.post("/v1/messages", json=MESSAGE)
        health = http.get("/_keyfailover/health")
        keys = http.get("/_keyfailover/keys")
        up.set_reply(KEYS[1], rate_limited())
        http.post("/v1/messages", json=MESSAGE)
        exhausted = http.get("/_keyfailover/health?verbose=1")
    assert health.json() == {
        "status": "degraded",
        "keys": {"valid": 1, "temporary": 1, "permanent": 0},
    }
    assert exhausted.json()["status"] == "exhausted"
    snapshot = keys.json()["keys"]
    assert [(k["label"], k["state"]) for k in snapshot] == [
        ("key-0", "temporary"),
        ("key-1", "valid"),
    ]
    assert snapshot[0]["cooldown_remaining"] == 30
    assert all(k["hint"].startswith("sk-a") for k in snapshot)
    for response in (health, keys, exhausted):
        assert response.headers["content-type"] == "application/json"
        assert leaked_secrets(response) == []
    # Admin requests are answered by the proxy itself.
    assert [r.path for r in up.requests] == ["/v1/messages"] * 3


def test_admin_is_guarded_by_client_tokens(up, serve):
    proxy = serve(client_tokens=[TOKEN], allow_byok=True)
    with httpx.Client(base_url=proxy.url) as http:
        refused = [
            http.get("/_keyfailover/health"),
            http.get("/_keyfailover/keys", headers={"x-api-key": "wrong"}),
            # A BYOK credential may call upstream, but not the admin endpoints.
            http.get("/_keyfailover/keys", headers={"x-api-key": USER_KEY}),
        ]
        health = http.get("/_keyfailover/health", headers={"x-api-key": TOKEN})
        keys = http.get("/_keyfailover/keys", headers={"authorization": f"Bearer {TOKEN}"})
        unknown = http.post("/_keyfailover/health", headers={"x-api-key": TOKEN})
    for response in refused:
        assert_envelope("anthropic", response, 401, "authentication_error")
    assert health.json()["status"] == "ok"
    assert len(keys.json()["keys"]) == 2
    assert_envelope("anthropic", unknown, 405, "invalid_request_error")
    assert unknown.headers["allow"] == "GET, HEAD"
    assert up.requests == []


def test_admin_false_forwards_admin_paths_upstream(up, serve):
    proxy = serve(admin=False)
    with httpx.Client() as http:
        response = http.get(proxy.url + "/_keyfailover/keys")
    assert response.status_code == 404  # MockUpstream's answer, not the key list
    assert "keys" not in response.json()
    assert [(r.method, r.path, r.credential) for r in up.requests] == [
        ("GET", "/_keyfailover/keys", KEYS[0])
    ]


# --------------------------------------------------------------------------
# Paths, query strings, methods and headers
# --------------------------------------------------------------------------


def test_other_routes_query_strings_and_methods_pass_through(up, serve):
    proxy = serve()
    with anthropic_sdk(proxy.url) as client:
        count = client.messages.count_tokens(model="mock-model", messages=MESSAGE["messages"])
        models = client.models.list(limit=2)
    assert count.input_tokens == 10
    assert [m.id for m in models.data] == ["mock-model", "mock-model-large"]
    with httpx.Client(base_url=proxy.url) as http:
        http.get("/v1/models?after_id=a%2Fb&limit=5&x=%20")
        http.delete("/v1/files/file%2F01")
        http.put("/v1/things/1", content=b"payload")
    seen = [(r.method, r.path, r.query) for r in up.requests]
    assert seen == [
        ("POST", "/v1/messages/count_tokens", ""),
        ("GET", "/v1/models", "limit=2"),
        ("GET", "/v1/models", "after_id=a%2Fb&limit=5&x=%20"),  # raw, as the caller sent it
        ("DELETE", "/v1/files/file%2F01", ""),
        ("PUT", "/v1/things/1", ""),
    ]
    assert up.requests[-1].body == b"payload"
    assert all(r.credential == KEYS[0] for r in up.requests)


def test_hop_by_hop_headers_are_dropped_both_ways(up, serve):
    up.enqueue(
        Reply.json(
            anthropic_message(),
            headers={
                "x-upstream": "kept",
                "keep-alive": "timeout=5",
                "proxy-authenticate": "Basic",
                "trailer": "x-checksum",
            },
        )
    )
    proxy = serve()
    with httpx.Client() as http:
        response = http.post(
            proxy.url + "/v1/messages",
            json=MESSAGE,
            headers={
                "connection": "keep-alive, x-hop-nominated",
                "x-hop-nominated": "dropped",
                "keep-alive": "timeout=5",
                "te": "trailers",
                "proxy-authorization": "Basic c2VjcmV0",
                "x-custom": "kept",
                "anthropic-version": "2023-06-01",
            },
        )
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "kept"
    for name in ("keep-alive", "proxy-authenticate", "trailer"):
        assert name not in response.headers
    sent = {name for name, _ in up.requests[0].headers}
    assert up.requests[0].header("x-custom") == "kept"
    assert up.requests[0].header("anthropic-version") == "2023-06-01"
    assert sent.isdisjoint({"keep-alive", "te", "proxy-authorization", "x-hop-nominated"})
    assert up.requests[0].header("connection") in (None, "keep-alive")


# --------------------------------------------------------------------------
# Mounting in FastAPI / Starlette, root_path
# --------------------------------------------------------------------------


def fastapi_app(up: MockUpstream) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    app.mount("/anthropic", make_proxy(up, "anthropic"))
    app.mount("/openai", make_proxy(up, "openai"))
    return app


def test_mounted_in_fastapi(up):
    up.set_reply(KEYS[0], rate_limited())
    with serve_asgi(fastapi_app(up)) as url:
        with anthropic_sdk(url + "/anthropic") as client:
            message = client.messages.create(**MESSAGE)
            with client.messages.stream(**MESSAGE) as stream:
                text = stream.get_final_text()
        with openai_sdk(url + "/openai") as oai:
            completion = oai.chat.completions.create(**CHAT)
        with httpx.Client(base_url=url) as http:
            health = http.get("/anthropic/_keyfailover/health").json()
            models = http.get("/anthropic/v1/models?limit=1")
            own_route = http.get("/healthz").json()
    assert message.content[0].text == text == "Hello from mock"
    assert completion.choices[0].message.content == "Hello from mock"
    # Each mount has its own pool (same keys here): each fails over from key-0 once.
    assert [(r.path, r.query, r.credential) for r in up.requests] == [
        ("/v1/messages", "", KEYS[0]),
        ("/v1/messages", "", KEYS[1]),
        ("/v1/messages", "", KEYS[1]),
        ("/v1/chat/completions", "", KEYS[0]),
        ("/v1/chat/completions", "", KEYS[1]),
        ("/v1/models", "limit=1", KEYS[1]),
    ]
    assert health["keys"] == {"valid": 1, "temporary": 1, "permanent": 0}
    assert models.status_code == 200
    assert own_route == {"ok": True}


def test_the_access_log_shows_the_path_with_its_mount(up, caplog):
    """Two mounts of the proxy log apart, as the native server's routes do."""
    app = FastAPI()
    app.mount("/prod", make_proxy(up))
    app.mount("/test", make_proxy(up))
    caplog.set_level(logging.INFO, logger="keyfailover.proxy")
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        assert http.get("/prod/v1/models").status_code == 200
        assert http.get("/test/_keyfailover/health").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "keyfailover.proxy"]
    assert [line.split(" -> ")[0] for line in lines] == [
        "GET /prod/v1/models",
        "GET /test/_keyfailover/health",
    ]


@pytest.mark.parametrize(
    ("headers", "version", "status"),
    [
        ([], "1.1", 400),
        ([(b"host", b"a"), (b"host", b"b")], "1.1", 400),
        ([(b"host", b"a"), (b"x-padding", b"p" * 70_000)], "1.1", 431),
        ([], "2", 200),
        ([(b"host", b"a")], "1.1", 200),
    ],
    ids=["no-host", "two-hosts", "head-over-64k", "http2-without-host", "fine"],
)
def test_a_head_the_native_server_refuses_is_refused_under_any_asgi_server(
    up, headers, version, status
):
    """uvicorn's default parser (httptools) lets through an HTTP/1.1 request without
    exactly one Host and a head of any size, which the native server's hyper refuses:
    FailoverProxy refuses them alike, before any upstream call or key."""
    scope = http_scope("/v1/messages", [(b"content-type", b"application/json"), *headers])
    scope["http_version"] = version
    sent: list[Any] = []
    run(drive(make_proxy(up), scope, [{"type": "http.request", "body": b"{}"}], sent))
    got, body = sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    assert got == status, body
    if status != 200:
        assert up.requests == []
        message = json.loads(body)["error"]["message"]
        assert message == (
            "request head exceeds the limit of 65536 bytes"
            if status == 431
            else "an HTTP/1.1 request needs exactly one Host header"
        )


def test_mount_below_a_server_root_path_and_nested_mounts(up):
    app = fastapi_app(up)
    with serve_with_root_path(app, "/api") as url, anthropic_sdk(url + "/anthropic") as client:
        client.messages.create(**MESSAGE)  # the reverse proxy in front stripped "/api"
    outer = Starlette(routes=[Mount("/gateway", app=app)])
    with serve_asgi(outer) as url, openai_sdk(url + "/gateway/openai") as oai:
        oai.chat.completions.create(**CHAT)
    assert [r.path for r in up.requests] == ["/v1/messages", "/v1/chat/completions"]


def test_mount_path_that_needs_percent_encoding(up):
    app = FastAPI()
    app.mount("/team proxy", make_proxy(up))
    with serve_asgi(app) as url, httpx.Client() as http:
        response = http.get(url + "/team%20proxy/v1/files/a%2Fb?x=%20")
    assert response.status_code == 404  # MockUpstream has no such route
    assert [(r.path, r.query) for r in up.requests] == [("/v1/files/a%2Fb", "x=%20")]


# --------------------------------------------------------------------------
# Disconnects and broken upstream bodies
# --------------------------------------------------------------------------


# The upstream request is dropped within 100 ms of the client leaving; the slack is the
# test's own (polling, and thread scheduling on a busy machine). Measured: about 2 ms.
DROPPED_WITHIN = 0.1 + 0.05


def test_client_disconnect_mid_stream_closes_upstream(up, serve):
    events = anthropic_stream_events(" ".join(["word"] * 40))
    up.enqueue(Reply.sse(events, chunk_delay=0.1))  # about 4.5 s in all
    proxy = serve()
    with httpx.Client() as http:
        with http.stream(
            "POST", proxy.url + "/v1/messages", json={**MESSAGE, "stream": True}
        ) as resp:
            assert next(resp.iter_raw()).startswith(b"event: message_start")
        left = time.monotonic()
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2)
    assert time.monotonic() - left < DROPPED_WITHIN
    assert not up.requests[0].completed


def test_client_disconnect_before_the_response_head_closes_upstream(up, serve):
    slow = dataclasses.replace(Reply.json(anthropic_message()), stall=5)  # a blocking call
    up.enqueue(slow)
    proxy = serve()
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(MESSAGE).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert up.wait_for(lambda u: len(u.requests) == 1)
        time.sleep(0.05)
    left = time.monotonic()
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2)
    assert time.monotonic() - left < DROPPED_WITHIN


BROKEN_TEXT = json.dumps(anthropic_message("many words " * 200))


def broken_json(chunked: bool) -> Reply:
    """A JSON body whose connection breaks partway through."""
    json_type = {"content-type": "application/json"}
    if chunked:  # no content-length: only the missing last chunk tells the body is cut short
        return Reply(headers=json_type, body=[BROKEN_TEXT[:50], BROKEN_TEXT[50:]], break_after=1)
    return Reply(headers=json_type, body=BROKEN_TEXT, break_after=100)


@pytest.mark.parametrize("chunked", [False, True])
def test_broken_json_body_aborts_the_connection(up, serve, chunked):
    proxy = serve()
    up.enqueue(broken_json(chunked))
    with httpx.Client() as http, pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post(proxy.url + "/v1/messages", json=MESSAGE)
    up.enqueue(broken_json(chunked))
    with anthropic_sdk(proxy.url) as client, pytest.raises(anthropic.APIConnectionError):
        client.messages.create(**MESSAGE)
    assert len(up.requests) == 2  # the break is not a key failure: no retry with another key


def test_broken_sse_stream_ends_with_an_error_event(up, serve):
    events = anthropic_stream_events("one two three four")
    up.enqueue(Reply.sse(events, break_after=3))
    proxy = serve()
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/messages", json={**MESSAGE, "stream": True})
    assert response.status_code == 200
    blocks = response.text.strip().split("\n\n")
    assert [b.split("\n")[0] for b in blocks[:3]] == [
        "event: message_start",
        "event: content_block_start",
        "event: content_block_delta",
    ]
    name, data = blocks[-1].split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error"
    assert error["error"]["type"] == "api_error"
    assert len(blocks) == 4

    up.enqueue(Reply.sse(events, break_after=3))
    with (
        anthropic_sdk(proxy.url) as client,
        client.messages.stream(**MESSAGE) as stream,
        pytest.raises(anthropic.APIStatusError, match="api_error"),
    ):
        stream.get_final_text()


def test_broken_openai_stream_ends_with_an_error_event(up, serve):
    up.enqueue(Reply.sse([*openai_stream_chunks("a b c d"), "[DONE]"], break_after=2))
    proxy = serve("openai")
    with openai_sdk(proxy.url) as client, pytest.raises(openai.APIError):
        list(client.chat.completions.create(**CHAT, stream=True))


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_upstream_failure_is_answered_in_the_provider_envelope(up, serve, provider):
    up.enqueue(Reply(reset_before_head=True))
    proxy = serve(provider)
    with httpx.Client() as http:
        response = http.post(proxy.url + PATH[provider], json=BODY[provider])
    assert_envelope(provider, response, 502, "api_error")
    assert len(up.requests) == 1  # a broken connection says nothing about the key


# --------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------


def test_pool_keys_never_appear_in_what_the_proxy_returns(up, serve):
    proxy = serve(max_body_bytes=10_000)
    with httpx.Client(base_url=proxy.url) as http:
        responses = [http.post("/v1/messages", json=MESSAGE), http.get("/nowhere")]
        up.set_reply(KEYS[0], rate_limited())
        responses.append(http.post("/v1/messages", json={**MESSAGE, "stream": True}))
        up.set_reply(KEYS[1], Reply.error(401, "authentication_error", "invalid x-api-key"))
        responses.append(http.post("/v1/messages", json=MESSAGE))  # exhausted
        responses += [
            http.get("/_keyfailover/health"),
            http.get("/_keyfailover/keys"),
            http.post("/v1/messages", content=b"x" * 10_001),
        ]
    assert [r.status_code for r in responses] == [200, 404, 200, 429, 200, 200, 413]
    for response in responses:
        assert leaked_secrets(response) == []


def test_an_upstream_error_echoing_a_pool_key_is_not_relayed(up, serve):
    for key in KEYS:  # as OpenAI answers a revoked key
        error = {
            "message": f"Incorrect API key provided: {key}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        up.set_reply(key, Reply.json({"error": error}, status=401))
    proxy = serve("openai")
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/chat/completions", json=CHAT)
    assert_envelope("openai", response, 502, "api_error")
    assert leaked_secrets(response) == []
    assert proxy.pool.health()["keys"]["permanent"] == 2


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_an_error_body_upstream_content_coded_is_decoded_and_scrubbed(up, serve, coding):
    """Upstream is asked for `Accept-Encoding: identity`; one that codes its error body
    anyway (echoing the key) must not slip the key past the scrubber inside the coding."""
    body = json.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": f"bad {KEYS[0]}"}}
    ).encode()
    coded = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    up.enqueue(Reply(status=400, headers={"content-encoding": coding}, body=coded))
    proxy = serve()
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/messages", json=MESSAGE)
    assert response.status_code == 400
    assert "content-encoding" not in response.headers
    hints = [key["hint"] for key in proxy.pool.snapshot()]
    assert response.json()["error"]["message"] == f"bad {hints[0]}"
    assert leaked_secrets(response) == []


def test_an_error_event_stream_upstream_content_coded_is_decoded_and_scrubbed(up, serve):
    """An error answered as an event stream, gzipped unasked: relayed decoded, in whole,
    with the echoed key replaced by its hint and no error event of keyfailover's added."""
    error = {"type": "error", "error": {"type": "overloaded_error", "message": f"bad {KEYS[0]}"}}
    event = b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
    headers = {"content-encoding": "gzip", "content-type": "text/event-stream"}
    up.enqueue(Reply(status=529, headers=headers, body=gzip.compress(event)))
    proxy = serve()
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/messages", json={**MESSAGE, "stream": True})
    assert response.status_code == 529
    assert "content-encoding" not in response.headers
    hint = proxy.pool.snapshot()[0]["hint"]
    assert response.content == event.replace(KEYS[0].encode(), hint.encode())
    assert leaked_secrets(response) == []


def test_an_empty_error_body_marked_content_coded_is_relayed_empty(up, serve):
    up.enqueue(Reply(status=404, headers={"content-encoding": "gzip"}, body=b""))
    proxy = serve()
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/messages", json=MESSAGE)
    assert response.status_code == 404
    assert response.content == b""
    assert "content-encoding" not in response.headers


def test_an_error_body_in_a_coding_that_cannot_be_checked_is_not_relayed(up, serve):
    up.enqueue(
        Reply(status=400, headers={"content-encoding": "br"}, body=b"\x8b\x01\x80opaque\x03")
    )
    proxy = serve()
    with httpx.Client() as http:
        response = http.post(proxy.url + "/v1/messages", json=MESSAGE)
    assert_envelope("anthropic", response, 502, "api_error")
    assert "(br)" in response.json()["error"]["message"]


# --------------------------------------------------------------------------
# ASGI details, in process
# --------------------------------------------------------------------------


async def drive(
    app: Any, scope: dict[str, Any], inbox: list[dict[str, Any]], sent: list[Any]
) -> None:
    """Calls `app` with `inbox` as the messages it receives (then nothing more, as from a
    client still connected), collecting what it sends in `sent`."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in inbox:
        queue.put_nowait(message)

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, queue.get, send)


def http_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An HTTP/1.1 request's scope, with `headers` as given (the Host among them, which
    an HTTP/1.1 request needs)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
    }


def test_lifespan_startup_and_shutdown(up):
    sent: list[Any] = []
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    run(drive(make_proxy(up), {"type": "lifespan", "asgi": {"version": "3.0"}}, inbox, sent))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_websocket_scope_is_closed(up):
    scope = {"type": "websocket", "path": "/v1/messages", "headers": [], "query_string": b""}
    sent: list[Any] = []
    run(drive(make_proxy(up), scope, [{"type": "websocket.connect"}], sent))
    assert [m["type"] for m in sent] == ["websocket.close"]
    assert up.requests == []


def test_header_upstream_cannot_take_is_400_in_the_envelope(up):
    scope = http_scope("/v1/chat/completions", [(b"host", b"proxy"), (b"bad header", b"x")])
    sent: list[Any] = []
    inbox = [{"type": "http.request", "body": json.dumps(CHAT).encode()}]
    run(drive(make_proxy(up, "openai"), scope, inbox, sent))
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "invalid_request_error"
    assert "bad header" in error["message"]
    assert up.requests == []


def test_upstream_error_in_a_json_body_starts_no_second_response(up):
    up.enqueue(broken_json(chunked=False))
    scope = http_scope(
        "/v1/messages", [(b"host", b"proxy"), (b"content-type", b"application/json")]
    )
    sent: list[Any] = []
    inbox = [{"type": "http.request", "body": json.dumps(MESSAGE).encode()}]
    with pytest.raises(UpstreamError):  # the server then aborts the connection
        run(drive(make_proxy(up), scope, inbox, sent))
    assert [m["type"] for m in sent].count("http.response.start") == 1
    assert sent[0]["status"] == 200
    assert all(m["more_body"] for m in sent[1:])  # never ended as if complete
    assert b"".join(m["body"] for m in sent[1:]) == BROKEN_TEXT[:100].encode()


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_both_uvicorn_http_implementations_relay_blocking_and_streaming(up, http):
    """httptools (what `uvicorn[standard]` brings) takes header names only as bytes."""
    up.set_reply(
        FAKE_KEYS[0], Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "30"})
    )
    with serve_asgi(make_proxy(up), http=http) as url:
        blocking = httpx.post(url + "/v1/messages", json={"model": "m", "messages": []})
        assert blocking.status_code == 200
        assert blocking.headers["content-type"] == "application/json"
        assert blocking.json()["type"] == "message"
        body = {"model": "m", "messages": [], "stream": True}
        with httpx.stream("POST", url + "/v1/messages", json=body) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert "message_stop" in streamed.read().decode()


def test_raw_header_names_and_values_are_bytes(up):
    client, _ = make_client(up)
    response = client.request_sync("POST", "/v1/messages", body=b"{}")
    response.read()
    assert response.raw_headers
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in response.raw_headers)
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in response.headers)


@pytest.mark.parametrize("front_end", ["uvicorn", "native"])
def test_a_client_leaving_the_event_stream_ends_it(up, front_end):
    """The dashboard's stream never ends by itself: a closed tab must end it, or
    a graceful shutdown waits for it."""
    serve = serve_asgi if front_end == "uvicorn" else serve_native
    with serve(make_proxy(up)) as url:
        with httpx.stream("GET", url + "/_keyfailover/events") as events:
            assert next(events.iter_lines()) == "event: state"
        time.sleep(0.3)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3
