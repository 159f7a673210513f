"""Tests of keyfailover.transport: the official SDKs and plain httpx2/httpx clients over it.

Everything runs against MockUpstream on loopback with fake keys. Async tests are
plain test functions that call `asyncio.run` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qs

import anthropic
import httpx
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from conftest import FAKE_KEYS, make_client, run
from openai.types.chat import ChatCompletionMessageParam

import keyfailover as kf
from keyfailover.testing import (
    DEFAULT_TEXT,
    MockUpstream,
    RecordedRequest,
    Reply,
    anthropic_stream_events,
    openai_stream_chunks,
)
from keyfailover.transport import AsyncFailoverTransport, FailoverTransport

KEYS = FAKE_KEYS[:2]
SDK_KEY = "sk-sdk-own-key-that-must-never-leak"
MODEL = "claude-test"
MESSAGES: list[MessageParam] = [{"role": "user", "content": "Hi"}]
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
# Long enough that a stream at CHUNK_DELAY per event takes far longer than the tests wait.
LONG_TEXT = " ".join(f"word{i}" for i in range(300))
CHUNK_DELAY = 0.05


@pytest.fixture
def claude_client(up: MockUpstream) -> kf.FailoverClient:
    return make_client(up, "anthropic")[0]


@pytest.fixture
def pool(claude_client: kf.FailoverClient) -> kf.KeyPool:
    return claude_client.pool


@pytest.fixture
def gpt_client(up: MockUpstream, pool: kf.KeyPool) -> kf.FailoverClient:
    """An OpenAI-flavoured client on the same pool as `claude_client`."""
    return kf.FailoverClient(pool, base_url=up.url, provider="openai")


@asynccontextmanager
async def async_claude(client: kf.FailoverClient) -> AsyncIterator[anthropic.AsyncAnthropic]:
    http = httpx2.AsyncClient(transport=AsyncFailoverTransport(client))
    async with anthropic.AsyncAnthropic(api_key=SDK_KEY, http_client=http, max_retries=0) as sdk:
        yield sdk


@contextmanager
def sync_claude(client: kf.FailoverClient) -> Iterator[anthropic.Anthropic]:
    http = httpx2.Client(transport=FailoverTransport(client))
    with anthropic.Anthropic(api_key=SDK_KEY, http_client=http, max_retries=0) as sdk:
        yield sdk


@asynccontextmanager
async def async_gpt(client: kf.FailoverClient) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx2.AsyncClient(transport=AsyncFailoverTransport(client))
    async with openai.AsyncOpenAI(api_key=SDK_KEY, http_client=http, max_retries=0) as sdk:
        yield sdk


@contextmanager
def sync_gpt(client: kf.FailoverClient) -> Iterator[openai.OpenAI]:
    http = httpx2.Client(transport=FailoverTransport(client))
    with openai.OpenAI(api_key=SDK_KEY, http_client=http, max_retries=0) as sdk:
        yield sdk


def credentials(up: MockUpstream) -> list[str | None]:
    return [request.credential for request in up.requests]


def assert_no_sdk_key(request: RecordedRequest) -> None:
    """The SDK's own api_key reached upstream in no header."""
    assert all(SDK_KEY not in value for _, value in request.headers), request


def rate_limit_everywhere(up: MockUpstream, provider: str) -> None:
    """key-0 answers 429 with Retry-After 3, key-1 with Retry-After 5."""
    for key, seconds in zip(KEYS, ("3", "5"), strict=True):
        up.set_reply(
            key,
            Reply.error(
                429,
                "rate_limit_error",
                "slow down",
                provider=provider,
                headers={"retry-after": seconds},
            ),
        )


def revoke_everywhere(up: MockUpstream, provider: str) -> None:
    for key in KEYS:
        up.set_reply(key, Reply.error(401, "authentication_error", "invalid x", provider=provider))


def dropped_early(up: MockUpstream) -> bool:
    """Whether the last request's connection was dropped before its reply was complete.

    Callers check it while they still hold the closed response (and everything
    under it), so that only the close, not garbage collection, can have dropped it.
    """
    return up.wait_for(is_dropped_early)


async def dropped_early_async(up: MockUpstream) -> bool:
    return await up.wait_for_async(is_dropped_early)


def is_dropped_early(up: MockUpstream) -> bool:
    last = up.requests[-1]
    return last.disconnected and not last.completed


# --------------------------------------------------------------------------
# anthropic SDK (httpx2)
# --------------------------------------------------------------------------


def test_anthropic_async_create_uses_the_pool_key_only(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    async def main() -> tuple[anthropic.types.Message, str]:
        async with async_claude(claude_client) as sdk:
            message = await sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
            return message, sdk.default_headers["anthropic-version"]

    message, version = run(main())

    assert message.content[0].type == "text"
    assert message.content[0].text == DEFAULT_TEXT
    (request,) = up.requests
    assert request.credential == KEYS[0]
    assert request.header("x-api-key") == KEYS[0]
    assert request.header("authorization") is None
    assert_no_sdk_key(request)
    assert request.header("anthropic-version") == version  # the SDK's headers pass through
    assert (request.method, request.path) == ("POST", "/v1/messages")
    assert request.json()["messages"] == MESSAGES


def test_anthropic_async_streaming(up: MockUpstream, claude_client: kf.FailoverClient) -> None:
    async def main() -> tuple[str, str]:
        async with async_claude(claude_client) as sdk:
            events = await sdk.messages.create(
                model=MODEL, max_tokens=16, messages=MESSAGES, stream=True
            )
            deltas = [
                event.delta.text
                async for event in events
                if event.type == "content_block_delta" and event.delta.type == "text_delta"
            ]
            async with sdk.messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES) as s:
                final = await s.get_final_text()
            return "".join(deltas), final

    assert run(main()) == (DEFAULT_TEXT, DEFAULT_TEXT)
    assert [r.json()["stream"] for r in up.requests] == [True, True]
    assert credentials(up) == [KEYS[0], KEYS[0]]
    assert all(r.completed for r in up.requests)


def test_anthropic_async_failover_after_429(
    up: MockUpstream, pool: kf.KeyPool, claude_client: kf.FailoverClient
) -> None:
    up.set_reply(
        KEYS[0], Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "30"})
    )

    async def main() -> tuple[str, dict[str, Any]]:
        async with async_claude(claude_client) as sdk:
            raw = await sdk.messages.with_raw_response.create(
                model=MODEL, max_tokens=16, messages=MESSAGES
            )
            block = (await raw.parse()).content[0]
            assert block.type == "text"
            return block.text, raw.http_response.extensions["keyfailover"]

    text, info = run(main())

    assert text == DEFAULT_TEXT
    assert credentials(up) == [KEYS[0], KEYS[1]]
    first, second = up.requests
    assert first.body == second.body != b""  # the body was resent whole
    assert pool.key("key-0").state == kf.KeyState.TEMPORARY
    assert pool.key("key-1").state == kf.KeyState.VALID
    assert info == {"attempts": 2, "key_label": "key-1", "exhausted": False}


def test_anthropic_async_rate_limit_error_when_pool_exhausted(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    rate_limit_everywhere(up, "anthropic")

    async def main() -> list[anthropic.RateLimitError]:
        errors = []
        async with async_claude(claude_client) as sdk:
            for _ in range(2):
                with pytest.raises(anthropic.RateLimitError) as excinfo:
                    await sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
                errors.append(excinfo.value)
        return errors

    first, second = run(main())

    assert first.status_code == 429
    assert first.response.headers["retry-after"] == "3"  # the shortest cooldown
    assert "all configured keys are rate-limited" in first.message
    assert first.response.extensions["keyfailover"]["exhausted"] is True
    # The second call found every key cooling down: answered without going upstream.
    assert credentials(up) == [KEYS[0], KEYS[1]]
    assert second.status_code == 429
    assert second.response.headers["retry-after"] in ("2", "3")


def test_anthropic_async_all_keys_revoked_is_502(
    up: MockUpstream, pool: kf.KeyPool, claude_client: kf.FailoverClient
) -> None:
    revoke_everywhere(up, "anthropic")

    async def main() -> None:
        async with async_claude(claude_client) as sdk:
            await sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)

    with pytest.raises(anthropic.InternalServerError) as excinfo:
        run(main())

    assert excinfo.value.status_code == 502
    assert "all configured keys failed authentication" in excinfo.value.message
    assert "retry-after" not in excinfo.value.response.headers
    assert credentials(up) == KEYS
    assert pool.states() == [kf.KeyState.PERMANENT, kf.KeyState.PERMANENT]


def test_anthropic_query_string_reaches_upstream(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    async def main() -> None:
        async with async_claude(claude_client) as sdk:
            await sdk.messages.create(
                model=MODEL,
                max_tokens=16,
                messages=MESSAGES,
                extra_query={"trace": "a b/c", "beta": "true"},
            )

    run(main())

    (request,) = up.requests
    assert request.path == "/v1/messages"
    assert parse_qs(request.query) == {"trace": ["a b/c"], "beta": ["true"]}


def test_anthropic_async_stream_closed_early_drops_upstream(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    up.enqueue(Reply.sse(anthropic_stream_events(LONG_TEXT), chunk_delay=CHUNK_DELAY))

    async def main() -> tuple[str, bool]:
        async with async_claude(claude_client) as sdk:
            async with sdk.messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES) as stream:
                texts = stream.text_stream
                first = await anext(texts)
            return first, await dropped_early_async(up)

    assert run(main()) == ("word0 ", True)


def test_anthropic_sync_create_stream_and_failover(
    up: MockUpstream, pool: kf.KeyPool, claude_client: kf.FailoverClient
) -> None:
    with sync_claude(claude_client) as sdk:
        message = sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
        with sdk.messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES) as stream:
            streamed = stream.get_final_text()
        up.set_reply(KEYS[0], Reply.error(429, "rate_limit_error", "slow"))
        failed_over = sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)

    assert message.content[0].type == "text"
    assert message.content[0].text == DEFAULT_TEXT
    assert streamed == DEFAULT_TEXT
    assert failed_over.content[0].type == "text"
    assert failed_over.content[0].text == DEFAULT_TEXT
    assert credentials(up) == [KEYS[0], KEYS[0], KEYS[0], KEYS[1]]
    assert pool.key("key-0").state == kf.KeyState.TEMPORARY
    for request in up.requests:
        assert_no_sdk_key(request)


def test_anthropic_sync_exhaustion_errors(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    rate_limit_everywhere(up, "anthropic")
    with sync_claude(claude_client) as sdk, pytest.raises(anthropic.RateLimitError) as excinfo:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    assert excinfo.value.response.headers["retry-after"] == "3"

    revoked, _ = make_client(up)
    revoke_everywhere(up, "anthropic")
    with sync_claude(revoked) as sdk, pytest.raises(anthropic.InternalServerError) as err:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
    assert err.value.status_code == 502


def test_anthropic_sync_stream_closed_early_drops_upstream(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    up.enqueue(Reply.sse(anthropic_stream_events(LONG_TEXT), chunk_delay=CHUNK_DELAY))
    with sync_claude(claude_client) as sdk:
        with sdk.messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES) as stream:
            texts = stream.text_stream
            first = next(texts)
        assert first == "word0 "
        assert dropped_early(up)


def test_anthropic_broken_body_is_a_connection_error(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    body = json.dumps({"type": "message", "content": []}).encode()
    up.enqueue(Reply(headers={"content-type": "application/json"}, body=body, break_after=10))

    async def main() -> None:
        async with async_claude(claude_client) as sdk:
            await sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)

    with pytest.raises(anthropic.APIConnectionError) as excinfo:
        run(main())
    assert isinstance(excinfo.value.__cause__, httpx2.RemoteProtocolError)


def test_anthropic_sdk_default_clients_accept_the_transports(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    # The SDKs reject any object with an `httpx` class in its MRO, transports included.
    async def main() -> anthropic.types.Message:
        http = anthropic.DefaultAsyncHttpxClient(transport=AsyncFailoverTransport(claude_client))
        async with anthropic.AsyncAnthropic(api_key=SDK_KEY, http_client=http) as sdk:
            return await sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)

    assert run(main()).content[0].type == "text"
    sync_http = anthropic.DefaultHttpxClient(transport=FailoverTransport(claude_client))
    with anthropic.Anthropic(api_key=SDK_KEY, http_client=sync_http) as sdk:
        assert sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES).id
    openai.DefaultHttpxClient(transport=FailoverTransport(claude_client)).close()
    assert credentials(up) == [KEYS[0], KEYS[0]]
    for cls in (AsyncFailoverTransport, FailoverTransport):
        assert all(klass.__module__.partition(".")[0] != "httpx" for klass in cls.__mro__)


# --------------------------------------------------------------------------
# openai SDK (httpx2)
# --------------------------------------------------------------------------


def test_openai_async_create_and_stream(up: MockUpstream, gpt_client: kf.FailoverClient) -> None:
    async def main() -> tuple[str | None, str]:
        async with async_gpt(gpt_client) as sdk:
            completion = await sdk.chat.completions.create(model=MODEL, messages=CHAT)
            stream = await sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
            return completion.choices[0].message.content, "".join(pieces)

    assert run(main()) == (DEFAULT_TEXT, DEFAULT_TEXT)
    assert [r.path for r in up.requests] == ["/v1/chat/completions"] * 2
    for request in up.requests:
        assert request.header("authorization") == f"Bearer {KEYS[0]}"
        assert request.header("x-api-key") is None
        assert_no_sdk_key(request)


def test_openai_async_failover_and_exhaustion(
    up: MockUpstream, pool: kf.KeyPool, gpt_client: kf.FailoverClient
) -> None:
    up.set_reply(
        KEYS[0],
        Reply.error(
            429, "rate_limit_exceeded", "slow", provider="openai", headers={"retry-after": "30"}
        ),
    )

    async def main() -> tuple[str | None, openai.RateLimitError]:
        async with async_gpt(gpt_client) as sdk:
            completion = await sdk.chat.completions.create(model=MODEL, messages=CHAT)
            rate_limit_everywhere(up, "openai")
            pool.key("key-0").reset()
            with pytest.raises(openai.RateLimitError) as excinfo:
                await sdk.chat.completions.create(model=MODEL, messages=CHAT)
            return completion.choices[0].message.content, excinfo.value

    text, error = run(main())

    assert text == DEFAULT_TEXT
    assert credentials(up) == [KEYS[0], KEYS[1], KEYS[0], KEYS[1]]
    assert pool.states() == [kf.KeyState.TEMPORARY, kf.KeyState.TEMPORARY]
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "3"
    assert "rate-limited" in error.message


def test_openai_async_all_keys_revoked_is_502(
    up: MockUpstream, gpt_client: kf.FailoverClient
) -> None:
    revoke_everywhere(up, "openai")

    async def main() -> None:
        async with async_gpt(gpt_client) as sdk:
            await sdk.chat.completions.create(model=MODEL, messages=CHAT)

    with pytest.raises(openai.InternalServerError) as excinfo:
        run(main())
    assert excinfo.value.status_code == 502
    assert "all configured keys failed authentication" in excinfo.value.message
    assert credentials(up) == KEYS


def test_openai_async_stream_closed_early_drops_upstream(
    up: MockUpstream, gpt_client: kf.FailoverClient
) -> None:
    up.enqueue(Reply.sse(openai_stream_chunks(LONG_TEXT), chunk_delay=CHUNK_DELAY))

    async def main() -> tuple[list[str | None], bool]:
        async with async_gpt(gpt_client) as sdk:
            stream = await sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
            chunks = aiter(stream)
            pieces = [(await anext(chunks)).choices[0].delta.content for _ in range(2)]
            await stream.close()
            return pieces, await dropped_early_async(up)

    assert run(main()) == (["", "word0 "], True)


def test_openai_sync_create_stream_and_errors(
    up: MockUpstream, pool: kf.KeyPool, gpt_client: kf.FailoverClient
) -> None:
    with sync_gpt(gpt_client) as sdk:
        completion = sdk.chat.completions.create(model=MODEL, messages=CHAT)
        with sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True) as stream:
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        rate_limit_everywhere(up, "openai")
        with pytest.raises(openai.RateLimitError) as excinfo:
            sdk.chat.completions.create(model=MODEL, messages=CHAT, extra_query={"x": "1"})

    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert streamed == DEFAULT_TEXT
    assert excinfo.value.response.headers["retry-after"] == "3"
    assert credentials(up) == [KEYS[0], KEYS[0], KEYS[0], KEYS[1]]
    assert up.requests[-1].query == "x=1"
    for request in up.requests:
        assert_no_sdk_key(request)


def test_openai_sync_stream_closed_early_drops_upstream(
    up: MockUpstream, gpt_client: kf.FailoverClient
) -> None:
    up.enqueue(Reply.sse(openai_stream_chunks(LONG_TEXT), chunk_delay=CHUNK_DELAY))
    with sync_gpt(gpt_client) as sdk:
        stream = sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
        chunks = iter(stream)
        pieces = [next(chunks).choices[0].delta.content for _ in range(2)]
        stream.close()
        assert pieces == ["", "word0 "]
        assert dropped_early(up)


# --------------------------------------------------------------------------
# Plain httpx2 and httpx clients
# --------------------------------------------------------------------------

URL = "https://api.anthropic.com/v1/messages"
PAYLOAD = {"model": MODEL, "max_tokens": 16, "messages": MESSAGES}


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_plain_async_client_gets_its_own_flavour(
    up: MockUpstream, claude_client: kf.FailoverClient, module: Any
) -> None:
    async def main() -> Any:
        async with module.AsyncClient(transport=AsyncFailoverTransport(claude_client)) as http:
            response = await http.post(URL + "?beta=true", json=PAYLOAD)
            await response.aread()
            return response

    response = run(main())

    assert type(response) is module.Response
    assert response.status_code == 200
    assert response.json()["content"][0]["text"] == DEFAULT_TEXT
    assert response.headers["content-type"] == "application/json"
    (request,) = up.requests
    assert (request.path, request.query, request.credential) == (
        "/v1/messages",
        "beta=true",
        KEYS[0],
    )
    assert request.json() == PAYLOAD


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_plain_sync_client_gets_its_own_flavour(
    up: MockUpstream, claude_client: kf.FailoverClient, module: Any
) -> None:
    with module.Client(transport=FailoverTransport(claude_client)) as http:
        response = http.post(URL, json=PAYLOAD, headers={"x-api-key": SDK_KEY})
        with http.stream("POST", URL, json={**PAYLOAD, "stream": True}) as streamed:
            body = b"".join(streamed.iter_bytes())

    assert type(response) is module.Response
    assert response.status_code == 200
    assert response.json()["content"][0]["text"] == DEFAULT_TEXT
    assert streamed.headers["content-type"] == "text/event-stream"
    assert b"event: message_stop" in body
    assert credentials(up) == [KEYS[0], KEYS[0]]  # the caller's x-api-key was not used (BYOK)
    assert_no_sdk_key(up.requests[0])


def test_raw_path_and_query_keep_their_encoding(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    url = "https://api.anthropic.com/v1/models/a%2Fb?q=a%2Fb%20c&beta=true&empty="
    with httpx2.Client(transport=FailoverTransport(claude_client)) as http:
        assert http.get(url).status_code == 404  # the mock has no such route
    (request,) = up.requests
    assert (request.method, request.path, request.query) == (
        "GET",
        "/v1/models/a%2Fb",
        "q=a%2Fb%20c&beta=true&empty=",
    )


def test_request_headers_forwarded_without_credentials_or_hop_by_hop(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    headers = {
        "x-api-key": "caller-key",
        "authorization": "Bearer caller-token",
        "connection": "keep-alive, x-hop",
        "x-hop": "1",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "x-custom": "kept",
        "anthropic-beta": "tools-2024",
    }
    with httpx2.Client(transport=FailoverTransport(claude_client)) as http:
        http.post(URL, json=PAYLOAD, headers=headers)
    (request,) = up.requests
    names = {name for name, _ in request.headers}
    assert request.credential == KEYS[0]
    assert request.header("x-api-key") == KEYS[0]
    assert request.header("authorization") is None
    assert not names & {"x-hop", "keep-alive", "te"}
    assert request.header("x-custom") == "kept"
    assert request.header("anthropic-beta") == "tools-2024"
    assert request.header("host") == up.url.removeprefix("http://")
    assert all("caller" not in value for _, value in request.headers)


def test_non_ascii_response_header_round_trips(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    up.enqueue(Reply.json({"ok": True}, headers={"x-note": "café"}))
    with httpx2.Client(transport=FailoverTransport(claude_client)) as http:
        response = http.post(URL, json=PAYLOAD)
    assert response.headers["x-note"] == "café"
    assert response.json() == {"ok": True}


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_async_body_streams_unbuffered_and_early_close_drops_upstream(
    up: MockUpstream, claude_client: kf.FailoverClient, module: Any
) -> None:
    up.enqueue(Reply.sse(anthropic_stream_events(LONG_TEXT), chunk_delay=CHUNK_DELAY))

    async def main() -> tuple[bytes, bool, bool]:
        async with module.AsyncClient(transport=AsyncFailoverTransport(claude_client)) as http:
            request = http.build_request("POST", URL, json={**PAYLOAD, "stream": True})
            response = await http.send(request, stream=True)
            chunks = response.aiter_raw()
            first = await anext(chunks)
            # The first event is here while upstream is still sending the rest.
            still_sending = not up.requests[-1].completed
            await response.aclose()
            return first, still_sending, await dropped_early_async(up)

    first, still_sending, dropped = run(main())
    assert first.startswith(b"event: message_start")
    assert still_sending
    assert dropped


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_sync_body_streams_unbuffered_and_early_close_drops_upstream(
    up: MockUpstream, claude_client: kf.FailoverClient, module: Any
) -> None:
    up.enqueue(Reply.sse(anthropic_stream_events(LONG_TEXT), chunk_delay=CHUNK_DELAY))
    with module.Client(transport=FailoverTransport(claude_client)) as http:
        request = http.build_request("POST", URL, json={**PAYLOAD, "stream": True})
        response = http.send(request, stream=True)
        chunks = response.iter_raw()
        first = next(chunks)
        assert first.startswith(b"event: message_start")
        assert not up.requests[-1].completed  # upstream is still sending the rest
        response.close()
        assert dropped_early(up)


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_broken_body_raises_remote_protocol_error(
    up: MockUpstream, claude_client: kf.FailoverClient, module: Any
) -> None:
    body = json.dumps({"text": "x" * 100}).encode()
    broken = Reply(headers={"content-type": "application/json"}, body=body, break_after=20)
    up.enqueue(broken, broken)

    async def main() -> None:
        async with module.AsyncClient(transport=AsyncFailoverTransport(claude_client)) as http:
            await http.post(URL, json=PAYLOAD)

    with pytest.raises(module.RemoteProtocolError) as async_error:
        run(main())
    with (
        module.Client(transport=FailoverTransport(claude_client)) as http,
        pytest.raises(module.RemoteProtocolError) as sync_error,
    ):
        http.post(URL, json=PAYLOAD)

    for error in (async_error.value, sync_error.value):
        assert isinstance(error.__cause__, kf.UpstreamError)
        assert str(error) == str(error.__cause__) != ""
        assert error.request.url == URL
    assert credentials(up) == [KEYS[0], KEYS[0]]


def test_exhausted_pool_answers_without_going_upstream(
    up: MockUpstream, pool: kf.KeyPool, claude_client: kf.FailoverClient
) -> None:
    for label in ("key-0", "key-1"):
        pool.key(label).mark_temporary(7.5)
    with httpx2.Client(transport=FailoverTransport(claude_client)) as http:
        response = http.post(URL, json=PAYLOAD)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "8"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.extensions["keyfailover"] == {
        "attempts": 0,
        "key_label": None,
        "exhausted": True,
    }
    assert up.requests == []


def test_streamed_request_body_is_read_whole_and_resent_on_failover(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    up.set_reply(KEYS[0], Reply.error(429, "rate_limit_error", "slow"))
    payload = json.dumps(PAYLOAD).encode()

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 7):
            yield payload[start : start + 7]

    async def main() -> int:
        async with httpx2.AsyncClient(transport=AsyncFailoverTransport(claude_client)) as http:
            response = await http.post(URL, content=body())
            return response.status_code

    assert run(main()) == 200
    assert credentials(up) == KEYS
    assert [request.body for request in up.requests] == [payload, payload]


def test_concurrent_sdk_calls_share_one_transport(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    async def main() -> list[str]:
        async with async_claude(claude_client) as sdk:
            messages = await asyncio.gather(
                *(
                    sdk.messages.create(
                        model=f"model-{i}", max_tokens=16, messages=MESSAGES, stream=False
                    )
                    for i in range(8)
                )
            )
        return [message.model for message in messages]

    assert run(main()) == [f"model-{i}" for i in range(8)]
    assert sorted(request.json()["model"] for request in up.requests) == sorted(
        f"model-{i}" for i in range(8)
    )


def test_cancelling_a_call_drops_upstream(
    up: MockUpstream, claude_client: kf.FailoverClient
) -> None:
    up.enqueue(Reply(body=b"{}", stall=30))

    async def main() -> bool:
        async with async_claude(claude_client) as sdk:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    sdk.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES), 0.3
                )
            return await up.wait_for_async(lambda u: u.requests[-1].disconnected)

    assert run(main())


def test_sse_stream_breaking_midway_ends_with_the_sdks_error(
    up: MockUpstream, claude_client: kf.FailoverClient, gpt_client: kf.FailoverClient
) -> None:
    # SSE bodies do not raise transport errors: the client ends them with an error event.
    up.enqueue(
        Reply.sse(anthropic_stream_events("one two three four"), break_after=4),
        Reply.sse(openai_stream_chunks("one two three four"), break_after=3),
    )

    claude_texts: list[str] = []
    gpt_texts: list[str | None] = []

    async def read_claude(sdk: anthropic.AsyncAnthropic) -> None:
        async with sdk.messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES) as stream:
            async for text in stream.text_stream:
                claude_texts.append(text)

    async def read_gpt(sdk: openai.AsyncOpenAI) -> None:
        chunks = await sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
        async for chunk in chunks:
            gpt_texts.append(chunk.choices[0].delta.content)

    async def main() -> None:
        async with async_claude(claude_client) as claude, async_gpt(gpt_client) as gpt:
            with pytest.raises(anthropic.APIStatusError, match="upstream stream broke"):
                await read_claude(claude)
            with pytest.raises(openai.APIError, match="upstream stream broke"):
                await read_gpt(gpt)

    run(main())
    assert claude_texts == ["one ", "two "]
    assert gpt_texts == ["", "one ", "two "]


def test_transport_rejects_requests_of_other_libraries(claude_client: kf.FailoverClient) -> None:
    with pytest.raises(TypeError, match=r"httpx2\.Request or httpx\.Request"):
        FailoverTransport(claude_client).handle_request(object())  # type: ignore[call-overload]


# --------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_import_httpx() -> None:
    out = _python(
        """
        import sys
        import keyfailover.transport as t
        print("httpx" in sys.modules, [c.__module__ for c in t.AsyncFailoverTransport.__mro__])
        """
    )
    assert out == "False ['keyfailover.transport', 'httpx2', 'builtins']"


@pytest.mark.parametrize(
    ("blocked", "base_module"),
    [
        (["httpx2"], "httpx"),
        (["httpx2", "httpx"], "builtins"),
    ],
)
def test_import_without_optional_dependencies(blocked: list[str], base_module: str) -> None:
    out = _python(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # makes `import name` raise ImportError
        from keyfailover.transport import AsyncFailoverTransport, FailoverTransport
        print(AsyncFailoverTransport.__mro__[1].__module__, FailoverTransport.__mro__[1].__module__)
        """
    )
    assert out == f"{base_module} {base_module}"
