"""Tests of keyfailover.testing.MockUpstream, through httpx, raw sockets and the official SDKs."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from conftest import FAKE_KEYS, run
from openai.types.chat import ChatCompletionMessageParam

from keyfailover.testing import (
    MockUpstream,
    RecordedRequest,
    Reply,
    anthropic_message,
    anthropic_stream_events,
    openai_chat_completion,
    openai_stream_chunks,
)

ANTHROPIC_KEY, OTHER_KEY, OPENAI_KEY = FAKE_KEYS[:3]
MESSAGES: list[MessageParam] = [{"role": "user", "content": "Hi"}]
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def claude(up: MockUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key=ANTHROPIC_KEY, base_url=up.url, max_retries=0) as client:
        yield client


@pytest.fixture
def gpt(up: MockUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=OPENAI_KEY, base_url=up.url + "/v1", max_retries=0) as client:
        yield client


@pytest.fixture
def http(up: MockUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.url, timeout=5.0) as client:
        yield client


def connect(up: MockUpstream) -> socket.socket:
    return socket.create_connection(("127.0.0.1", up.port), timeout=5.0)


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response: status, headers (lowercased names), decoded body."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(stream.readline().split(b";")[0], 16):
            body += stream.read(size)
            assert stream.readline() == b"\r\n"
        assert stream.readline() == b"\r\n"
    else:
        body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def get(path: str = "/v1/models", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: mock\r\nx-api-key: {ANTHROPIC_KEY}\r\n{extra}\r\n".encode()
    )


# ----------------------------------------------------------------- default replies and the SDKs


def test_anthropic_sdk_parses_default_message(
    up: MockUpstream, claude: anthropic.Anthropic
) -> None:
    message = claude.messages.create(model="claude-test", max_tokens=16, messages=MESSAGES)

    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from mock"
    assert message.model == "claude-test"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 10
    [request] = up.requests
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.credential == ANTHROPIC_KEY
    assert request.json()["max_tokens"] == 16
    assert request.completed
    assert not request.disconnected


def test_anthropic_sdk_parses_default_stream(up: MockUpstream, claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="claude-test", max_tokens=16, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from mock"
    assert final.content[0].type == "text"
    assert final.content[0].text == "Hello from mock"
    assert (final.model, final.stop_reason) == ("claude-test", "end_turn")

    events = claude.messages.create(model="m", max_tokens=16, messages=MESSAGES, stream=True)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert all(request.json()["stream"] is True for request in up.requests)


def test_anthropic_sdk_count_tokens_and_models(claude: anthropic.Anthropic) -> None:
    count = claude.messages.count_tokens(model="claude-test", messages=MESSAGES)
    assert count.input_tokens == 10
    models = list(claude.models.list())
    assert models
    assert all(model.type == "model" for model in models)


def test_openai_sdk_parses_default_completion_and_stream(
    up: MockUpstream, gpt: openai.OpenAI
) -> None:
    completion = gpt.chat.completions.create(model="gpt-test", messages=CHAT)
    assert completion.choices[0].message.content == "Hello from mock"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-test"

    chunks = list(gpt.chat.completions.create(model="gpt-test", messages=CHAT, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "Hello from mock"
    assert chunks[-1].choices[0].finish_reason == "stop"

    assert [model.object for model in gpt.models.list()] == ["model", "model"]
    assert [r.path for r in up.requests] == ["/v1/chat/completions"] * 2 + ["/v1/models"]
    assert {r.credential for r in up.requests} == {OPENAI_KEY}


def test_sdks_parse_replies_made_with_the_builders(
    up: MockUpstream, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    up.enqueue(
        Reply.json(anthropic_message(text="Custom reply", model="claude-x")),
        Reply.sse(anthropic_stream_events(text="Streamed  reply!")),
        Reply.json(openai_chat_completion(text="OpenAI reply")),
        Reply.sse([*openai_stream_chunks(text="OpenAI stream"), "[DONE]"]),
    )

    message = claude.messages.create(model="ignored", max_tokens=16, messages=MESSAGES)
    assert message.content[0].type == "text"
    assert (message.content[0].text, message.model) == ("Custom reply", "claude-x")
    with claude.messages.stream(model="m", max_tokens=16, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "Streamed  reply!"
    completion = gpt.chat.completions.create(model="m", messages=CHAT)
    assert completion.choices[0].message.content == "OpenAI reply"
    chunks = gpt.chat.completions.create(model="m", messages=CHAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "OpenAI stream"


def test_anthropic_content_blocks_builder() -> None:
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert anthropic_message(content=blocks)["content"] == blocks
    assert anthropic_message(text="x")["content"] == [{"type": "text", "text": "x"}]


def test_unknown_route_is_404_with_anthropic_error(http: httpx.Client) -> None:
    response = http.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "not_found_error"


def test_streams_are_chunked_event_streams_and_single_bodies_have_length(
    http: httpx.Client,
) -> None:
    body = {"model": "m", "max_tokens": 1, "messages": MESSAGES}
    single = http.post("/v1/messages", json=body)
    assert single.headers["content-length"] == str(len(single.content))
    assert single.headers["content-type"] == "application/json"

    streamed = http.post("/v1/messages", json={**body, "stream": True})
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert streamed.headers["content-type"] == "text/event-stream"
    assert streamed.text.startswith("event: message_start\ndata: {")


# ----------------------------------------------------------------- choosing replies


def test_per_credential_reply_persists_until_removed(
    up: MockUpstream, claude: anthropic.Anthropic
) -> None:
    limited = Reply.error(429, "rate_limit_error", "rate limited", headers={"retry-after": "5"})
    up.set_reply(ANTHROPIC_KEY, limited)

    for _ in range(2):
        with pytest.raises(anthropic.RateLimitError) as caught:
            claude.messages.create(model="m", max_tokens=16, messages=MESSAGES)
        assert caught.value.response.headers["retry-after"] == "5"
        assert caught.value.body == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "rate limited"},
        }
    other = claude.with_options(api_key=OTHER_KEY)
    assert other.messages.create(model="m", max_tokens=16, messages=MESSAGES).content

    up.set_reply(ANTHROPIC_KEY, None)
    assert claude.messages.create(model="m", max_tokens=16, messages=MESSAGES).content
    assert [r.credential for r in up.requests] == [ANTHROPIC_KEY] * 2 + [OTHER_KEY, ANTHROPIC_KEY]


def test_openai_error_envelope(up: MockUpstream, gpt: openai.OpenAI) -> None:
    up.set_reply(OPENAI_KEY, Reply.error(401, "invalid_api_key", "bad key", provider="openai"))
    with pytest.raises(openai.AuthenticationError) as caught:
        gpt.chat.completions.create(model="m", messages=CHAT)
    assert caught.value.code == "invalid_api_key"
    assert caught.value.body == {
        "message": "bad key",
        "type": "invalid_api_key",
        "param": None,
        "code": "invalid_api_key",
    }


def test_queue_takes_precedence_and_is_consumed_in_order(
    up: MockUpstream, http: httpx.Client
) -> None:
    up.set_reply(ANTHROPIC_KEY, Reply.error(500, "api_error", "boom"))
    up.enqueue(Reply.json({"n": 1}))
    up.enqueue(Reply.json({"n": 2}, status=201), Reply(status=202, body=b"three"))
    headers = {"x-api-key": ANTHROPIC_KEY}

    responses = [http.get("/anything", headers=headers) for _ in range(4)]

    assert [r.status_code for r in responses] == [200, 201, 202, 500]
    assert [r.content for r in responses[:3]] == [b'{"n":1}', b'{"n":2}', b"three"]
    assert responses[3].json()["error"]["type"] == "api_error"


def test_queue_applies_to_every_credential_and_to_none(
    up: MockUpstream, http: httpx.Client
) -> None:
    up.enqueue(Reply.json({"n": 1}), Reply.json({"n": 2}))
    assert http.get("/x").json() == {"n": 1}
    assert http.get("/x", headers={"authorization": "Bearer k"}).json() == {"n": 2}
    assert http.get("/x").status_code == 404


# ----------------------------------------------------------------- recorded requests


def test_recorded_request_fields(up: MockUpstream, http: httpx.Client) -> None:
    http.post(
        "/v1/messages/batches?beta=true&limit=2",
        content=b'{"a": 1}',
        headers={"Authorization": "Bearer sk-bearer-secret", "X-Custom": "Yes"},
    )

    [request] = up.requests
    assert isinstance(request, RecordedRequest)
    assert request.method == "POST"
    assert request.path == "/v1/messages/batches"
    assert request.query == "beta=true&limit=2"
    assert request.body == b'{"a": 1}'
    assert request.json() == {"a": 1}
    assert request.credential == "sk-bearer-secret"
    assert request.header("X-CUSTOM") == "Yes"
    assert request.header("missing") is None
    assert ("x-custom", "Yes") in request.headers
    assert all(name == name.lower() for name, _ in request.headers)
    assert "sk-bearer-secret" not in repr(request)
    assert "Bearer" not in repr(request)


def test_credential_prefers_x_api_key_over_bearer(up: MockUpstream, http: httpx.Client) -> None:
    http.get("/a", headers={"x-api-key": "from-x-api-key", "authorization": "Bearer from-bearer"})
    http.get("/b", headers={"authorization": "Basic dXNlcjpwYXNz"})
    http.get("/c")
    assert [r.credential for r in up.requests] == ["from-x-api-key", None, None]
    assert "from-x-api-key" not in repr(up.requests)


def test_every_providers_credential_is_recognised(up: MockUpstream, http: httpx.Client) -> None:
    http.get("/a", headers={"api-key": "azure-key"})
    http.get("/b", headers={"x-goog-api-key": "gemini-key"})
    http.get("/c", params={"alt": "sse", "key": "gemini%key"})
    http.get("/d", headers={"x-goog-api-key": "header-wins"}, params={"key": "query"})
    assert [r.credential for r in up.requests] == [
        "azure-key",
        "gemini-key",
        "gemini%key",
        "header-wins",
    ]
    up.set_reply("gemini%key", Reply.gemini_error(429, "RESOURCE_EXHAUSTED"))
    assert http.get("/e", params={"key": "gemini%key"}).status_code == 429


def test_gemini_default_replies(up: MockUpstream, http: httpx.Client) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    path = "/v1beta/models/gemini-2.5-flash"
    answer = http.post(f"{path}:generateContent", json=body).json()
    assert answer["candidates"][0]["content"]["parts"][0]["text"] == "Hello from mock"
    assert answer["candidates"][0]["finishReason"] == "STOP"
    assert answer["modelVersion"] == "gemini-2.5-flash"
    sse = http.post(f"{path}:streamGenerateContent", params={"alt": "sse"}, json=body)
    assert sse.headers["content-type"] == "text/event-stream"
    chunks = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == "Hello from mock"
    assert [c["candidates"][0].get("finishReason") for c in chunks] == [None, None, "STOP"]
    array = http.post(f"{path}:streamGenerateContent", json=body)
    assert array.headers["content-type"] == "application/json"
    assert len(array.json()) == 3, "without alt=sse, one JSON array"
    assert http.post(f"{path}:countTokens", json=body).json() == {"totalTokens": 10}
    models = http.get("/v1beta/models").json()["models"]
    assert models[0]["name"] == "models/mock-model"
    missing = http.post(f"{path}:nothing", json=body)
    assert missing.status_code == 404
    assert missing.json()["error"]["status"] == "NOT_FOUND"
    bad = http.post(f"{path}:generateContent", content=b"[")
    assert (bad.status_code, bad.json()["error"]["status"]) == (400, "INVALID_ARGUMENT")


def test_azure_and_openai_compatible_routes(up: MockUpstream) -> None:
    azure = openai.AzureOpenAI(
        azure_endpoint=up.url, api_key="azure-key", api_version="2024-10-21", max_retries=0
    )
    answer = azure.chat.completions.create(model="my-deployment", messages=CHAT)
    assert answer.model == "my-deployment"
    assert up.requests[-1].path == "/openai/deployments/my-deployment/chat/completions"
    assert up.requests[-1].query == "api-version=2024-10-21"
    assert up.requests[-1].credential == "azure-key"
    stream = azure.chat.completions.create(model="my-deployment", messages=CHAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        "Hello from mock"
    )
    for base_url in (up.url + "/openai/v1", up.url + "/v1beta/openai"):
        client = openai.OpenAI(api_key="k", base_url=base_url, max_retries=0)
        answer = client.chat.completions.create(model="m", messages=CHAT)
        assert answer.choices[0].message.content == "Hello from mock"


def test_error_envelopes_of_every_provider() -> None:
    gemini = json.loads(
        Reply.gemini_error(
            429,
            "RESOURCE_EXHAUSTED",
            retry_delay="10s",
            quota_id="GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        ).body  # type: ignore[arg-type]
    )["error"]
    assert (gemini["code"], gemini["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert gemini["message"].startswith("You exceeded your current quota")
    types = [d["@type"].rsplit(".", 1)[1] for d in gemini["details"]]
    assert types == ["QuotaFailure", "RetryInfo"]
    assert gemini["details"][0]["violations"][0]["quotaId"].startswith("GenerateRequestsPerDay")
    assert gemini["details"][1]["retryDelay"] == "10s"
    invalid = json.loads(
        Reply.gemini_error(400, "INVALID_ARGUMENT", reason="API_KEY_INVALID").body  # type: ignore[arg-type]
    )["error"]
    assert invalid["message"] == "API key not valid. Please pass a valid API key."
    assert invalid["details"][0]["reason"] == "API_KEY_INVALID"
    azure = json.loads(Reply.error(429, "429", "slow", provider="azure_openai").body)  # type: ignore[arg-type]
    assert azure == {"error": {"code": "429", "message": "slow"}}
    plain = json.loads(Reply.error(503, "UNAVAILABLE", "busy", provider="gemini").body)  # type: ignore[arg-type]
    assert plain == {"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}
    with pytest.raises(ValueError, match="expected one of anthropic, openai, azure_openai, gemini"):
        Reply.error(400, "x", "y", provider="azure")


def test_gemini_errors_in_scenarios(up: MockUpstream, http: httpx.Client) -> None:
    up.load_scenario(
        {
            "replies": {
                "AIza-limited": {
                    "status": 429,
                    "error": {
                        "type": "RESOURCE_EXHAUSTED",
                        "message": "slow",
                        "provider": "gemini",
                        "retry_delay": "7s",
                    },
                }
            }
        }
    )
    answer = http.post(
        "/v1beta/models/m:generateContent", headers={"x-goog-api-key": "AIza-limited"}, json={}
    )
    assert answer.status_code == 429
    assert answer.json()["error"]["details"][0]["retryDelay"] == "7s"
    with pytest.raises(ValueError, match=r'queue\[0\]\.error\.retry_delay: only for "provider"'):
        up.load_scenario({"queue": [{"error": {"type": "t", "message": "m", "retry_delay": "1s"}}]})


def test_requests_is_a_copy_and_clear_forgets_everything(
    up: MockUpstream, http: httpx.Client
) -> None:
    up.set_reply(ANTHROPIC_KEY, Reply(status=418))
    up.enqueue(Reply(status=204))
    http.get("/x")
    snapshot = up.requests
    snapshot.clear()
    assert len(up.requests) == 1

    up.clear()
    assert up.requests == []
    assert http.get("/x", headers={"x-api-key": ANTHROPIC_KEY}).status_code == 404


def test_chunked_request_body_is_decoded(up: MockUpstream, http: httpx.Client) -> None:
    http.post("/upload", content=iter([b"hello ", b"chunked ", b"world"]))
    [request] = up.requests
    assert request.header("transfer-encoding") == "chunked"
    assert request.body == b"hello chunked world"


def test_chunked_request_body_with_extensions_and_trailers(up: MockUpstream) -> None:
    raw = (
        b"POST /upload HTTP/1.1\r\nHost: mock\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\nA\r\n, chunked!\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    with connect(up) as sock, sock.makefile("rb") as stream:
        for i in range(0, len(raw), 7):  # arrive in small pieces
            sock.sendall(raw[i : i + 7])
            time.sleep(0.001)
        status, _, _ = read_response(stream)
    assert status == 404
    assert up.requests[0].body == b"hello, chunked!"


def test_expect_100_continue(up: MockUpstream) -> None:
    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: mock\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(b"body")
        status, _, _ = read_response(stream)
    assert status == 404
    assert up.requests[0].body == b"body"


# ----------------------------------------------------------------- connections


def test_keep_alive_reuses_one_connection(up: MockUpstream) -> None:
    with connect(up) as sock, sock.makefile("rb") as stream:
        for _ in range(3):
            sock.sendall(get())
            status, headers, body = read_response(stream)
            assert status == 200
            assert "connection" not in headers
            assert json.loads(body)["data"]
    assert len(up.requests) == 3
    assert all(r.completed for r in up.requests)


def test_pipelined_requests_are_answered_in_order(up: MockUpstream) -> None:
    up.enqueue(
        Reply(body=b"first"),
        Reply(body=[b"sec", b"ond"], stall=0.1, chunk_delay=0.05),
        Reply(body=b"third"),
    )
    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(get("/1") + get("/2") + get("/3"))
        bodies = [read_response(stream)[2] for _ in range(3)]
    assert bodies == [b"first", b"second", b"third"]
    assert [r.path for r in up.requests] == ["/1", "/2", "/3"]


def test_connection_close_is_honored(up: MockUpstream) -> None:
    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(get(extra="Connection: close\r\n") + get("/ignored"))
        status, headers, _ = read_response(stream)
        assert status == 200
        assert headers["connection"] == "close"
        assert stream.read() == b""  # closed; the request after "close" is not served
    assert [r.path for r in up.requests] == ["/v1/models"]


def test_http_1_0_closes_by_default(up: MockUpstream) -> None:
    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        status, headers, _ = read_response(stream)
        assert (status, headers["connection"]) == (200, "close")
        assert stream.read() == b""


MALFORMED = {
    "garbage request line": b"NOT-HTTP\r\n\r\n",
    "bad header line": b"GET / HTTP/1.1\r\nHost: mock\r\nno colon here\r\n\r\n",
    "missing Host": b"GET / HTTP/1.1\r\n\r\n",
    "bad content-length": b"POST / HTTP/1.1\r\nHost: mock\r\nContent-Length: 1x\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "unknown version": b"GET / HTTP/2.0\r\nHost: mock\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_gets_400_and_close(up: MockUpstream, raw: bytes) -> None:
    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(get() + raw)
        assert read_response(stream)[0] == 200  # the valid request before it is served
        status, headers, body = read_response(stream)
        assert status == 400
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        assert stream.read() == b""
    assert [r.path for r in up.requests] == ["/v1/models"]


# ----------------------------------------------------------------- faults


def test_reset_before_head(up: MockUpstream, claude: anthropic.Anthropic) -> None:
    up.enqueue(Reply(reset_before_head=True))
    with connect(up) as sock:
        sock.sendall(get())
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)

    up.set_reply(ANTHROPIC_KEY, Reply(reset_before_head=True))
    with pytest.raises(anthropic.APIConnectionError):
        claude.messages.create(model="m", max_tokens=16, messages=MESSAGES)
    assert len(up.requests) == 2
    assert not any(r.completed or r.disconnected for r in up.requests)


def test_client_timeout_during_stall_marks_disconnected_promptly(
    up: MockUpstream, http: httpx.Client
) -> None:
    up.enqueue(Reply(stall=30.0))
    with pytest.raises(httpx.ReadTimeout):
        http.get("/slow", timeout=0.2)
    gave_up = time.monotonic()

    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2.0)
    assert time.monotonic() - gave_up < 0.5
    assert not up.requests[0].completed
    assert http.get("/next").status_code == 404  # the server is still healthy


def test_dropping_a_slow_stream_marks_disconnected(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply.sse([{"i": i} for i in range(100)], chunk_delay=0.1))
    with http.stream("GET", "/stream") as response:
        first = next(response.iter_raw())
        assert first.startswith(b"data: {")
    dropped = time.monotonic()

    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2.0)
    assert time.monotonic() - dropped < 0.5
    assert not up.requests[0].completed


def test_break_after_cuts_a_chunked_stream(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply.sse([("tick", {"i": i}) for i in range(5)], break_after=2))
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("GET", "/stream") as response,
    ):
        received.extend(line for line in response.iter_lines() if line.startswith("data:"))
    assert received == ['data: {"i":0}', 'data: {"i":1}']
    assert not up.requests[0].completed
    assert not up.requests[0].disconnected


def test_break_after_cuts_a_content_length_body(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply(body=b"x" * 100, break_after=10), Reply(body=b"y" * 100, break_after=10))
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/short")

    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(get())
        assert stream.readline() == b"HTTP/1.1 200 OK\r\n"
        head = b"".join(iter(stream.readline, b"\r\n"))
        assert b"content-length: 100\r\n" in head
        assert stream.read() == b"y" * 10


def test_chunk_delay_spaces_out_the_chunks(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply.sse(["a", "b", "c"], chunk_delay=0.15))
    arrivals: list[tuple[str, float]] = []
    with http.stream("GET", "/stream") as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append((line, time.monotonic()))
    assert [line for line, _ in arrivals] == ["data: a", "data: b", "data: c"]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(arrivals)]
    assert all(gap >= 0.1 for gap in gaps), gaps
    assert up.requests[0].completed


def test_stall_delays_the_head(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply.json({"late": True}, headers={"x-extra": "1"}))
    up.enqueue(Reply(stall=0.3, body=b"late"))
    assert http.get("/x").headers["x-extra"] == "1"
    started = time.monotonic()
    assert http.get("/x").content == b"late"
    assert time.monotonic() - started >= 0.25


# ----------------------------------------------------------------- faults: the bytes on the wire


def exchange(up: MockUpstream, request: bytes | None = None) -> list[tuple[float, bytes]]:
    """Sends `request` (a GET by default) on a new connection and reads until the server
    closes it: the pieces received, each with its arrival time after the request."""
    with connect(up) as sock:
        sock.sendall(get() if request is None else request)
        start = time.monotonic()
        pieces = []
        while data := sock.recv(65536):
            pieces.append((time.monotonic() - start, data))
    return pieces


def received(up: MockUpstream, request: bytes | None = None) -> bytes:
    return b"".join(data for _, data in exchange(up, request))


CLOSE = "Connection: close\r\n"  # for a reply that would keep the connection open


def test_close_delimited_body(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply(headers={"content-type": "text/plain"}, body=b"hello", framing="close"))
    assert received(up) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nhello"
    )
    assert up.requests[0].completed

    up.enqueue(Reply(body=[b"one ", b"two"], framing="close", chunk_delay=0.01))
    response = http.get("/x")
    assert "content-length" not in response.headers
    assert "transfer-encoding" not in response.headers
    assert response.content == b"one two"  # the client takes the close as the end


def test_close_delimited_sse_stream_whole_and_cut_mid_event(
    up: MockUpstream, http: httpx.Client
) -> None:
    events = [("ping", {"i": i}) for i in range(3)]
    whole = Reply.sse(events, framing="close")
    stream = b"".join(whole.body)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"connection: close\r\n\r\n"
    )
    up.enqueue(whole)
    assert received(up) == head + stream
    assert up.requests[-1].completed

    first_event = whole.body[0]
    assert isinstance(first_event, bytes)
    cut = len(first_event) + 13  # inside the second event
    up.enqueue(Reply.sse(events, framing="close", break_after_bytes=cut))
    assert received(up) == head + stream[:cut]
    assert stream[:cut].endswith(b"event: ping\nd")
    assert not up.requests[-1].completed

    up.enqueue(Reply.sse(events, framing="close", break_after_bytes=cut))
    with http.stream("GET", "/stream") as response:
        assert b"".join(response.iter_raw()) == stream[:cut]  # nothing tells it was cut


def test_content_length_body_closed_mid_body(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply.json({"text": "x" * 40}, break_after_bytes=10))
    data = received(up)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length: 51\r\n" in head + b"\r\n"
    assert b"connection: close" in head
    assert body == b'{"text":"x'
    assert not up.requests[0].completed

    up.enqueue(Reply.json({"text": "x" * 40}, break_after_bytes=10))
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/x")


def test_chunked_body_closed_before_the_terminating_chunk(up: MockUpstream) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    up.enqueue(
        Reply(body=[b"ab", b"cd"], break_after=2),  # whole chunks, no last chunk
        Reply(body=[b"ab", b"cd"], break_after_bytes=4),  # the same, by content bytes
        Reply(body=[b"ab", b"cd"], break_after_bytes=3),  # inside the second chunk
    )
    assert received(up) == chunked + b"2\r\nab\r\n2\r\ncd\r\n"
    assert received(up) == chunked + b"2\r\nab\r\n2\r\ncd"
    assert received(up) == chunked + b"2\r\nab\r\n2\r\nc"
    assert not any(r.completed for r in up.requests)


def test_json_body_chunked_and_list_body_with_length(up: MockUpstream) -> None:
    up.enqueue(
        Reply.json({"a": 1}, framing="chunked", headers={"connection": "close"}),
        Reply(body=[b"ab", b"cd"], framing="length", chunk_delay=0.2, headers=[("x-n", "1")]),
    )
    assert received(up) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
        b'connection: close\r\n\r\n7\r\n{"a":1}\r\n0\r\n\r\n'
    )
    pieces = exchange(up, get(extra=CLOSE))
    assert b"".join(data for _, data in pieces) == (
        b"HTTP/1.1 200 OK\r\nx-n: 1\r\ncontent-length: 4\r\nconnection: close\r\n\r\nabcd"
    )
    assert pieces[0][1].endswith(b"\r\n\r\nab")  # "cd" came 0.2 s later
    assert pieces[-1][0] >= 0.15
    assert all(r.completed for r in up.requests)


def test_broken_chunk_size_line(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply(body=[b"ab", b"cd", b"ef"], bad_chunk_at=1))
    assert received(up) == (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        b"2\r\nab\r\nzz\r\ncd\r\n"
    )
    assert not up.requests[0].completed
    up.enqueue(Reply(body=[b"x"], bad_chunk_at=0))
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/x")


@pytest.mark.parametrize("after", [0, 4])
def test_stall_body_sends_the_head_then_waits(up: MockUpstream, after: int) -> None:
    up.enqueue(Reply(body=b"0123456789", stall_body=0.3, stall_body_after=after))
    pieces = exchange(up, get(extra=CLOSE))
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\n"
    assert b"".join(data for _, data in pieces) == head + b"0123456789"
    assert pieces[0][1] == head + b"0123456789"[:after]
    assert pieces[-1][0] >= 0.25
    assert up.requests[0].completed


def test_stall_body_inside_a_chunk(up: MockUpstream) -> None:
    up.enqueue(Reply(body=[b"abc", b"def"], stall_body=0.3, stall_body_after=4))
    pieces = exchange(up, get(extra=CLOSE))
    assert pieces[0][1].endswith(b"\r\n\r\n3\r\nabc\r\n3\r\nd")
    assert pieces[-1][0] >= 0.25
    assert b"".join(data for _, data in pieces).endswith(b"3\r\nd" + b"ef\r\n0\r\n\r\n")


def test_client_leaving_during_stall_body_is_noticed(up: MockUpstream, http: httpx.Client) -> None:
    up.enqueue(Reply.json({"late": True}, stall_body=30))
    with pytest.raises(httpx.ReadTimeout):
        http.get("/x", timeout=0.3)
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2)
    assert not up.requests[0].completed


def test_trickle_sends_the_head_at_once_and_the_body_byte_by_byte(up: MockUpstream) -> None:
    up.enqueue(Reply(status=429, headers={"retry-after": "5"}, body=b"slow!", trickle=0.1))
    pieces = exchange(up, get(extra=CLOSE))
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 5\r\ncontent-length: 5\r\n"
        b"connection: close\r\n\r\n"
    )
    assert b"".join(data for _, data in pieces) == head + b"slow!"
    assert pieces[0] == (pytest.approx(0, abs=0.09), head), "the head at once"
    # Body byte k leaves k * 0.1 s after the head: never faster than that, whatever the
    # client's own delays (which can only merge bytes into fewer, later reads).
    received_so_far = 0
    for at, data in pieces[1:]:
        received_so_far += len(data)
        assert received_so_far <= at / 0.1 + 0.05, pieces
    assert len(pieces) >= 4, pieces
    assert pieces[-1][0] >= 0.45
    assert up.requests[0].completed


RAW_REPLIES = {
    "garbage": b"\x00\xff\xfenot HTTP at all\r\n\r\n",
    "odd_status_line": b"HTTP/1.1 999 Weird\r\ncontent-length: 2\r\n\r\nok",
    "101_without_upgrade": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    "huge_headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(200))
    + b"content-length: 0\r\n\r\n",
    "redirect": b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:9/v1/messages\r\n"
    b"content-length: 0\r\n\r\n",
}


@pytest.mark.parametrize("data", RAW_REPLIES.values(), ids=RAW_REPLIES)
def test_raw_reply_sends_exactly_its_bytes_and_closes(up: MockUpstream, data: bytes) -> None:
    up.enqueue(Reply.raw(data))
    assert received(up) == data
    assert up.requests[0].completed


def test_raw_reply_can_keep_the_connection_open(up: MockUpstream) -> None:
    up.enqueue(Reply.raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi", close=False))
    with connect(up) as sock, sock.makefile("rb") as stream:
        sock.sendall(get())
        assert read_response(stream) == (200, {"content-length": "2"}, b"hi")
        sock.sendall(get())
        assert read_response(stream)[0] == 200  # the default reply, same connection
    assert len(up.requests) == 2


def test_close_closes_without_saying_so(up: MockUpstream) -> None:
    up.enqueue(Reply(body=b"bye", close=True))
    assert received(up) == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye"
    assert up.requests[0].completed
    assert not up.requests[0].disconnected


def test_new_faults_from_a_scenario(up: MockUpstream) -> None:
    up.load_scenario(
        {
            "queue": [
                {"raw": "HTTP/1.1 999 Weird\r\n\r\n"},
                {"body": "abc", "framing": "close"},
                {"sse": [{"i": 1}, {"i": 2}], "framing": "close", "break_after_bytes": 19},
                {"body": ["ab", "cd"], "bad_chunk_at": 1},
                {"status": 429, "body": "no", "trickle": 0.01, "stall_body": 0.01, "close": True},
            ]
        }
    )
    assert received(up) == b"HTTP/1.1 999 Weird\r\n\r\n"
    assert received(up).endswith(b"connection: close\r\n\r\nabc")
    assert received(up).endswith(b'connection: close\r\n\r\ndata: {"i":1}\n\ndata')
    assert received(up).endswith(b"\r\n\r\n2\r\nab\r\nzz\r\ncd\r\n")
    assert received(up) == b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\nno"


BAD_FAULTS = {
    "framing_unknown": (
        {"queue": [{"body": "x", "framing": "gzip"}]},
        'queue[0].framing: expected one of length, chunked, close, got "gzip"',
    ),
    "bad_chunk_at_of_a_length_body": (
        {"queue": [{"body": "x", "bad_chunk_at": 0}]},
        "queue[0]: bad_chunk_at needs a chunked body",
    ),
    "bad_chunk_at_past_the_chunks": (
        {"queue": [{"body": ["a", "b"], "bad_chunk_at": 2}]},
        "queue[0]: bad_chunk_at: the body has only 2 chunks",
    ),
    "stall_body_after_past_the_end": (
        {"queue": [{"body": "abc", "stall_body": 1, "stall_body_after": 4}]},
        "queue[0]: stall_body_after is past the end of the body",
    ),
    "raw_with_headers": (
        {"queue": [{"raw": "x", "headers": {"a": "b"}}]},
        "queue[0].headers: not used by a raw reply, which is sent as it is",
    ),
    "raw_not_a_string": ({"queue": [{"raw": 5}]}, "queue[0].raw: expected a string, got 5"),
    "trickle_negative": (
        {"queue": [{"trickle": -0.5}]},
        "queue[0].trickle: expected a number of seconds (0 or more), got -0.5",
    ),
    "close_not_a_bool": (
        {"queue": [{"close": 1}]},
        "queue[0].close: expected true or false, got 1",
    ),
}


@pytest.mark.parametrize(("scenario", "message"), BAD_FAULTS.values(), ids=BAD_FAULTS)
def test_bad_fault_options_in_scenarios(
    up: MockUpstream, scenario: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        up.load_scenario(scenario)


def test_fault_options_are_checked_in_python_too() -> None:
    with pytest.raises(ValueError, match="framing must be one of"):
        Reply(framing="gzip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad_chunk_at needs a chunked body"):
        Reply(body=b"x", bad_chunk_at=0)
    with pytest.raises(ValueError, match="trickle must not be negative"):
        Reply(trickle=-1)
    with pytest.raises(ValueError, match="a raw reply takes no status, body"):
        Reply(status=500, body=b"x", raw_data=b"HTTP/1.1 200 OK\r\n\r\n")
    assert Reply.raw("é").raw_data == "é".encode()


# ----------------------------------------------------------------- scenarios


SCENARIO = {
    "replies": {
        "sk-limited": {
            "error": {"type": "rate_limit_error", "message": "slow down"},
            "status": 429,
            "headers": {"retry-after": "7"},
        },
        "sk-openai-dead": {
            "error": {"type": "invalid_api_key", "message": "no", "provider": "openai"},
            "status": 401,
        },
    },
    "queue": [
        {"json": {"first": True}, "status": 201},
        {"sse": [["ping", {"type": "ping"}], {"x": 1}, "[DONE]"], "break_after": 2},
        {"body": "plain text", "status": 503, "headers": [["content-type", "text/plain"]]},
    ],
}


@pytest.mark.parametrize("from_file", [False, True], ids=["dict", "file"])
def test_load_scenario(up: MockUpstream, tmp_path: Path, from_file: bool) -> None:
    if from_file:
        path = tmp_path / "scenario.json"
        path.write_text(json.dumps(SCENARIO))
        up.load_scenario(path)
    else:
        up.load_scenario(SCENARIO)

    with httpx.Client(base_url=up.url) as http:
        first = http.get("/q")
        assert (first.status_code, first.json()) == (201, {"first": True})
        lines: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError), http.stream("GET", "/q") as response:
            lines.extend(response.iter_lines())
        assert lines[:3] == ["event: ping", 'data: {"type":"ping"}', ""]
        third = http.get("/q")
        assert (third.status_code, third.text) == (503, "plain text")
        assert third.headers["content-type"] == "text/plain"

        limited = http.get("/v1/models", headers={"x-api-key": "sk-limited"})
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "7"
        assert limited.json()["error"] == {"type": "rate_limit_error", "message": "slow down"}
        dead = http.get("/v1/models", headers={"authorization": "Bearer sk-openai-dead"})
        assert dead.status_code == 401
        assert dead.json()["error"]["code"] == "invalid_api_key"


def test_the_scenario_example_in_the_docs_loads(up: MockUpstream) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "mock-upstream.md").read_text()
    [example] = re.findall(r"```json\n(.*?)```", doc, re.DOTALL)
    up.load_scenario(json.loads(example))
    with httpx.Client(base_url=up.url) as http:
        assert http.get("/x").json() == {"first": True}


def test_the_python_examples_in_the_docs_run() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "mock-upstream.md").read_text()
    examples = [
        code
        for code in re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
        if code.startswith(("from ", "import "))  # whole programs, not fragments
    ]
    assert any("genai" in code for code in examples)
    for code in examples:
        exec(compile(code, "docs/mock-upstream.md", "exec"), {"__name__": "docs_example"})


def test_scenario_errors_are_reported() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        Reply.from_dict({"jsn": {}})
    with pytest.raises(ValueError, match="only one of"):
        Reply.from_dict({"json": {}, "body": "x"})
    with pytest.raises(ValueError, match="unknown field"):
        MockUpstream().load_scenario({"reply": {}})
    with pytest.raises(ValueError, match="negative"):
        Reply(stall=-1)


KNOWN_REPLY_FIELDS = (
    "bad_chunk_at, body, break_after, break_after_bytes, chunk_delay, close, error, framing, "
    "headers, json, raw, reset_before_head, sse, stall, stall_body, stall_body_after, status, "
    "trickle"
)

# scenario -> the whole error message
BAD_SCENARIOS = {
    "error_without_message": (
        {"replies": {"sk-x": {"error": {"type": "rate_limit_error"}, "status": 429}}},
        'replies["sk-x"].error.message: required for an error reply',
    ),
    "error_without_type_long_credential_masked": (
        {"replies": {FAKE_KEYS[0]: {"error": {"message": "slow down"}}}},
        'replies["sk-a...0000"].error.type: required for an error reply',
    ),
    "error_message_not_a_string": (
        {"queue": [{"error": {"type": "api_error", "message": ["a"]}}]},
        "queue[0].error.message: expected a string, got a list",
    ),
    "error_not_an_object": (
        {"queue": [{"error": "boom"}]},
        'queue[0].error: expected an object, got "boom"',
    ),
    "error_unknown_field": (
        {"queue": [{"error": {"type": "t", "message": "m", "code": 1}}]},
        "queue[0].error.code: unknown field; expected one of type, message, provider, "
        "retry_delay, quota_id, reason",
    ),
    "error_unknown_provider": (
        {"queue": [{"error": {"type": "t", "message": "m", "provider": "azure"}}]},
        "queue[0].error.provider: expected one of anthropic, openai, azure_openai, gemini, "
        'got "azure"',
    ),
    "status_as_string": (
        {"queue": [{"status": "429"}]},
        'queue[0].status: expected an HTTP status (100-999), got "429"',
    ),
    "status_out_of_range": (
        {"queue": [{"json": {}, "status": 1000}]},
        "queue[0].status: expected an HTTP status (100-999), got 1000",
    ),
    "status_bool": (
        {"queue": [{"status": True}]},
        "queue[0].status: expected an HTTP status (100-999), got true",
    ),
    "unknown_reply_field": (
        {"queue": [{}, {"jsn": {}}]},
        f"queue[1].jsn: unknown field; expected one of {KNOWN_REPLY_FIELDS}",
    ),
    "two_kinds": (
        {"queue": [{"json": {}, "body": "x"}]},
        "queue[0]: takes only one of json, error, sse, body, raw; got json and body",
    ),
    "header_value_not_a_string": (
        {"queue": [{"headers": {"retry-after": 5}}]},
        'queue[0].headers["retry-after"]: expected a header value: a string without CR, LF '
        "or NUL, got 5",
    ),
    "header_value_with_newline": (
        {"queue": [{"headers": [["x-a", "1\r\nx-b: 2"]]}]},
        "queue[0].headers[0]: expected a header value: a string without CR, LF or NUL, "
        'got "1\\r\\nx-b: 2"',
    ),
    "header_name_with_space": (
        {"queue": [{"headers": {"bad name": "x"}}]},
        'queue[0].headers["bad name"]: expected a header name (letters, digits and '
        '!#$%&\'*+-.^_`|~), got "bad name"',
    ),
    "header_pair_too_short": (
        {"queue": [{"headers": [["x-a"]]}]},
        "queue[0].headers[0]: expected a [name, value] pair, got a list",
    ),
    "headers_not_a_container": (
        {"queue": [{"headers": "x-a: 1"}]},
        'queue[0].headers: expected an object or a list of [name, value] pairs, got "x-a: 1"',
    ),
    "negative_stall": (
        {"queue": [{"stall": -1}]},
        "queue[0].stall: expected a number of seconds (0 or more), got -1",
    ),
    "chunk_delay_as_string": (
        {"queue": [{"chunk_delay": "0.1"}]},
        'queue[0].chunk_delay: expected a number of seconds, got "0.1"',
    ),
    "fractional_break_after": (
        {"queue": [{"break_after": 1.5}]},
        "queue[0].break_after: expected a whole number (0 or more), got 1.5",
    ),
    "reset_before_head_not_a_bool": (
        {"queue": [{"reset_before_head": "yes"}]},
        'queue[0].reset_before_head: expected true or false, got "yes"',
    ),
    "body_chunk_not_a_string": (
        {"queue": [{"body": ["a", 1]}]},
        "queue[0].body[1]: expected a string, got 1",
    ),
    "sse_not_a_list": (
        {"queue": [{"sse": "data: x"}]},
        'queue[0].sse: expected a list of events, got "data: x"',
    ),
    "sse_pair_of_three": (
        {"queue": [{"sse": ["[DONE]", ["ping", {}, 1]]}]},
        "queue[0].sse[1]: expected [event, data]: 2 items, got 3",
    ),
    "sse_event_name_not_a_string": (
        {"queue": [{"sse": [[5, {}]]}]},
        "queue[0].sse[0][0]: expected an event name or null, got 5",
    ),
    "null_in_queue": ({"queue": [None]}, "queue[0]: expected an object, got null"),
    "queue_not_a_list": ({"queue": {}}, "queue: expected a list of replies, got an object"),
    "replies_not_an_object": ({"replies": []}, "replies: expected an object, got a list"),
    "empty_credential": (
        {"replies": {"": {}}},
        'replies[""]: a credential must be a non-empty string',
    ),
    "unknown_scenario_field": (
        {"reply": {}},
        'reply: unknown field; a scenario has "replies" and "queue"',
    ),
}


@pytest.mark.parametrize(("scenario", "message"), BAD_SCENARIOS.values(), ids=BAD_SCENARIOS)
def test_bad_scenarios_are_reported_naming_the_field(
    up: MockUpstream, tmp_path: Path, scenario: dict[str, Any], message: str
) -> None:
    exactly = f"^{re.escape(message)}$"
    with pytest.raises(ValueError, match=exactly):
        up.load_scenario(scenario)
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    with pytest.raises(ValueError, match=exactly):
        up.load_scenario(path)
    assert FAKE_KEYS[0] not in message


def test_a_bad_scenario_changes_nothing(up: MockUpstream, http: httpx.Client) -> None:
    up.set_reply("sk-kept", Reply.json({"kept": True}))
    bad = {
        "replies": {"sk-kept": None, "sk-new": {"json": {}}},
        "queue": [{"json": {"first": True}}, {"status": 0}],
    }
    with pytest.raises(ValueError, match=r"^queue\[1\]\.status: "):
        up.load_scenario(bad)
    assert http.get("/x").status_code == 404, "nothing was queued"
    assert http.get("/x", headers={"x-api-key": "sk-kept"}).json() == {"kept": True}
    assert http.get("/x", headers={"x-api-key": "sk-new"}).status_code == 404


def test_reply_from_dict_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"^reply\.error\.message: required for an error reply$"):
        Reply.from_dict({"error": {"type": "rate_limit_error"}})
    with pytest.raises(ValueError, match=r"^reply: expected an object, got a list$"):
        Reply.from_dict([])  # type: ignore[arg-type]


def test_scenario_file_that_is_not_json_or_not_an_object(up: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "scenario.json"
    path.write_text('{"queue": [}')
    with pytest.raises(ValueError, match=r"^not valid JSON: Expecting value: line 1 column 12"):
        up.load_scenario(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"^scenario: expected an object, got a list$"):
        up.load_scenario(path)
    with pytest.raises(FileNotFoundError):
        up.load_scenario(tmp_path / "missing.json")


# ----------------------------------------------------------------- lifecycle and concurrency


def test_start_and_stop_are_idempotent() -> None:
    up = MockUpstream()
    assert up.start() is up
    url = up.url
    up.start()
    assert up.url == url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    assert httpx.get(url + "/v1/models").status_code == 200
    up.stop()
    up.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/models")


def test_stop_closes_open_connections() -> None:
    with MockUpstream() as up, connect(up) as sock:
        up.enqueue(Reply(stall=30.0))
        sock.sendall(get())
        assert up.wait_for(lambda u: len(u.requests) == 1)
        up.stop()
        assert sock.recv(1024) == b""
        assert not up.requests[0].disconnected  # the server closed it, not the client


def test_wait_for_gives_up_after_timeout(up: MockUpstream) -> None:
    started = time.monotonic()
    assert not up.wait_for(lambda u: False, timeout=0.05)
    assert 0.05 <= time.monotonic() - started < 1.0
    assert up.wait_for(lambda u: True, timeout=0)


def test_async_clients_are_served_without_blocking_their_loop(up: MockUpstream) -> None:
    up.enqueue(Reply(stall=0.5))

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=up.url) as client:
            slow = asyncio.create_task(client.get("/slow"))
            assert await up.wait_for_async(lambda u: len(u.requests) == 1)
            fast = await asyncio.gather(*(client.get(f"/fast/{i}") for i in range(20)))
            assert not slow.done()  # the others did not wait behind it
            return [(await slow).status_code] + [r.status_code for r in fast]

    assert run(main()) == [200] + [404] * 20


def test_threads_with_their_own_credentials(up: MockUpstream) -> None:
    for n in range(8):
        up.set_reply(f"key-{n}", Reply.json({"key": n}))

    def worker(n: int) -> list[int]:
        with httpx.Client(base_url=up.url, headers={"x-api-key": f"key-{n}"}) as client:
            return [client.get("/x").json()["key"] for _ in range(25)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert results == [[n] * 25 for n in range(8)]
    assert len(up.requests) == 200


def test_pytest_plugin_fixture(mock_upstream: MockUpstream) -> None:
    # Provided by the pytest11 entry point, with no import here.
    assert httpx.get(mock_upstream.url + "/v1/models").status_code == 200
    assert len(mock_upstream.requests) == 1
