"""Gemini and Azure OpenAI: failover, streams and exhaustion in each provider's own terms,
with the official SDKs as clients (google-genai, openai.AzureOpenAI) through the ASGI
proxy and the transports; OpenAI-compatible presets' rate-limit headers; `serve --provider`."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import httpx2
import openai
import pytest
from conftest import AUTH_FAILED, FAKE_KEYS, RATE_LIMITED, free_port, header, seen, states
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

import keyfailover as kf
from keyfailover import _serve, cli
from keyfailover.asgi import FailoverProxy
from keyfailover.testing import Limit, MockUpstream, Reply, serve_asgi
from keyfailover.transport import FailoverTransport

KEYS = FAKE_KEYS[:3]
TOKEN = "team-token"
MODEL = "gemini-2.5-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
BODY = b'{"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}'
AZURE_VERSION = "2024-10-21"
AZURE_CHAT = f"/openai/deployments/gpt-4o-prod/chat/completions?api-version={AZURE_VERSION}"
CHAT_BODY = b'{"messages": [{"role": "user", "content": "Hi"}]}'


def gemini_client(
    up: MockUpstream | str, n: int = 2, clock: kf.ManualClock | None = None
) -> tuple[kf.FailoverClient, kf.KeyPool]:
    pool = kf.KeyPool(KEYS[:n], clock=clock or kf.ManualClock())
    base_url = up if isinstance(up, str) else up.url
    return kf.FailoverClient(pool, base_url=base_url, provider="gemini"), pool


def azure_client(up: MockUpstream, n: int = 2) -> tuple[kf.FailoverClient, kf.KeyPool]:
    pool = kf.KeyPool(KEYS[:n], clock=kf.ManualClock())
    return kf.FailoverClient(pool, base_url=up.url, provider="azure_openai"), pool


def gemini_envelope(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"code", "message", "status"}
    return dict(payload["error"])


def until_pacific_midnight() -> float:
    now = datetime.now(ZoneInfo("America/Los_Angeles"))
    tomorrow = (now + timedelta(days=1)).date()
    midnight = datetime(
        tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=ZoneInfo("America/Los_Angeles")
    )
    return midnight.timestamp() - now.timestamp()


@pytest.fixture
def proxied() -> Iterator[Any]:
    """Starts a FailoverProxy (client tokens: TOKEN) for a client under uvicorn."""
    servers: list[Any] = []

    def start(client: kf.FailoverClient) -> str:
        server = serve_asgi(FailoverProxy(client, client_tokens=[TOKEN]))
        servers.append(server)
        return server.__enter__()

    yield start
    for server in servers:
        server.__exit__(None, None, None)


# --------------------------------------------------------------------------
# Gemini: the rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [GENERATE, STREAM], ids=["blocking", "streaming"])
def test_gemini_429_cools_for_retry_delay_and_fails_over(up: MockUpstream, path: str) -> None:
    up.set_reply(KEYS[0], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="17s"))
    client, pool = gemini_client(up)
    resp = client.request_sync("POST", path, body=BODY)
    body = resp.read()
    assert (resp.status, resp.key_label, resp.attempts) == (200, "key-1", 2)
    assert seen(up) == ["key-0", "key-1"]
    assert pool.key("key-0").cooldown_remaining == 17.0, "RetryInfo.retryDelay"
    if path == STREAM:
        events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
        assert json.loads(events[-1][6:])["candidates"][0]["finishReason"] == "STOP"
        assert b'"error"' not in body
    else:
        assert json.loads(body)["candidates"][0]["content"]["parts"][0]["text"] == (
            "Hello from mock"
        )
    # The key went in x-goog-api-key, the caller's own never.
    request = up.requests[1]
    assert request.header("x-goog-api-key") == KEYS[1]
    assert request.header("authorization") is None


def test_retry_after_wins_over_retry_delay_and_a_message_names_the_wait(up: MockUpstream) -> None:
    up.set_reply(
        KEYS[0],
        Reply.gemini_error(
            429, "RESOURCE_EXHAUSTED", retry_delay="17s", headers={"retry-after": "4"}
        ),
    )
    up.set_reply(
        KEYS[1],
        Reply.gemini_error(
            429, "RESOURCE_EXHAUSTED", "Quota exceeded for metric. Please retry in 10h17m."
        ),
    )
    client, pool = gemini_client(up, 3)
    assert client.request_sync("POST", GENERATE, body=BODY).status == 200
    assert pool.key("key-0").cooldown_remaining == 4.0
    assert pool.key("key-1").cooldown_remaining == 10 * 3600 + 17 * 60


def test_a_per_day_quota_cools_until_midnight_pacific(up: MockUpstream) -> None:
    up.set_reply(
        KEYS[0],
        Reply.gemini_error(
            429,
            "RESOURCE_EXHAUSTED",
            retry_delay="10s",
            quota_id="GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        ),
    )
    client, pool = gemini_client(up)
    assert client.request_sync("POST", GENERATE, body=BODY).status == 200
    assert abs(pool.key("key-0").cooldown_remaining - until_pacific_midnight()) < 5
    assert client.stats()["quota_exhausted"] == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply.gemini_error(400, "INVALID_ARGUMENT", reason="API_KEY_INVALID"),
        Reply.gemini_error(
            400, "INVALID_ARGUMENT", "API key expired. Please renew the API key.",
            reason="API_KEY_INVALID",
        ),
        Reply.gemini_error(
            403, "PERMISSION_DENIED", "Your API key was reported as leaked. Please use another "
            "API key.",
        ),
        Reply.gemini_error(401, "UNAUTHENTICATED", "Request had invalid authentication."),
    ],
    ids=["invalid", "expired", "leaked", "unauthenticated"],
)  # fmt: skip
def test_invalid_or_expired_keys_are_retired(up: MockUpstream, reply: Reply) -> None:
    up.set_reply(KEYS[0], reply)
    client, pool = gemini_client(up)
    resp = client.request_sync("POST", GENERATE, body=BODY)
    assert (resp.status, resp.key_label) == (200, "key-1")
    assert states(pool) == ["permanent", "valid"]


@pytest.mark.parametrize(
    "reply",
    [
        Reply.gemini_error(400, "INVALID_ARGUMENT", "* contents: contents is not specified"),
        Reply.gemini_error(
            403, "PERMISSION_DENIED",
            "You do not have permission to access the File abc or it may not exist.",
        ),
        Reply.gemini_error(500, "INTERNAL"),
        Reply.gemini_error(503, "UNAVAILABLE"),
    ],
    ids=["bad-request", "file-permission", "500", "503"],
)  # fmt: skip
def test_errors_that_are_not_the_keys_are_relayed(up: MockUpstream, reply: Reply) -> None:
    up.set_reply(KEYS[0], reply)
    client, pool = gemini_client(up)
    resp = client.request_sync("POST", GENERATE, body=BODY)
    assert (resp.status, resp.attempts) == (reply.status, 1)
    assert resp.read() == reply.body
    assert states(pool) == ["valid", "valid"]


@pytest.mark.parametrize("path", [GENERATE, STREAM], ids=["blocking", "streaming"])
def test_gemini_exhaustion_answers_in_googles_envelope(up: MockUpstream, path: str) -> None:
    up.set_reply(KEYS[0], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="9s"))
    up.set_reply(KEYS[1], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="5s"))
    client, _ = gemini_client(up)
    resp = client.request_sync("POST", path, body=BODY)
    assert (resp.status, resp.exhausted) == (429, True)
    assert header(resp, "retry-after") == "5"
    assert gemini_envelope(resp.read()) == {
        "code": 429,
        "message": RATE_LIMITED,
        "status": "RESOURCE_EXHAUSTED",
    }
    up.clear()
    for key in KEYS[:2]:
        up.set_reply(key, Reply.gemini_error(400, "INVALID_ARGUMENT", reason="API_KEY_INVALID"))
    client, _ = gemini_client(up)
    resp = client.request_sync("POST", path, body=BODY)
    assert (resp.status, resp.exhausted) == (502, True)
    assert gemini_envelope(resp.read()) == {
        "code": 502,
        "message": AUTH_FAILED,
        "status": "UNAVAILABLE",
    }


def test_a_broken_gemini_stream_ends_with_a_gemini_error_event(up: MockUpstream) -> None:
    chunks = [
        {"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}}]},
        {"candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": "STOP"}]},
    ]
    client, _ = gemini_client(up, 1)
    # Close-delimited, cut before the chunk with finishReason: a break.
    up.enqueue(Reply.sse(chunks[:1], framing="close"))
    body = client.request_sync("POST", STREAM, body=BODY).read()
    last = body.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    error = gemini_envelope(last[6:])
    assert (error["code"], error["status"]) == (502, "UNAVAILABLE")
    assert "before its final event" in error["message"]
    # The same stream with its last chunk is complete as it is.
    up.enqueue(Reply.sse(chunks, framing="close"))
    body = client.request_sync("POST", STREAM, body=BODY).read()
    assert b'"error"' not in body
    assert body.rstrip().endswith(b'"finishReason":"STOP"}]}')


@pytest.mark.parametrize("name", ["key", "k%65y", "%6Bey", "KEY"])
def test_a_key_in_the_query_is_never_forwarded(up: MockUpstream, name: str) -> None:
    """However its name is spelled: Google decodes the name, and a caller's key sent
    beside the pool's could get the pool's key judged invalid."""
    client, _ = gemini_client(up, 1)
    caller_key = "AIzaSyCallersOwnKey-0123456789abcdefgh"
    resp = client.request_sync("POST", f"{STREAM}&{name}={caller_key}", body=BODY)
    assert resp.status == 200
    request = up.requests[0]
    assert request.query == "alt=sse"
    assert request.credential == KEYS[0]
    assert caller_key not in repr(up.requests) + str(request.headers)


# --------------------------------------------------------------------------
# Gemini: the official SDKs
# --------------------------------------------------------------------------


def genai_client(base_url: str, **options: Any) -> genai.Client:
    return genai.Client(
        api_key=TOKEN, http_options=genai_types.HttpOptions(base_url=base_url, **options)
    )


def test_google_genai_through_the_proxy(up: MockUpstream, proxied: Any) -> None:
    up.set_reply(KEYS[0], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="30s"))
    client, pool = gemini_client(up)
    sdk = genai_client(proxied(client))
    answer = sdk.models.generate_content(model=MODEL, contents="Hi")
    assert answer.text == "Hello from mock"
    streamed = "".join(
        chunk.text or "" for chunk in sdk.models.generate_content_stream(model=MODEL, contents="Hi")
    )
    assert streamed == "Hello from mock"
    assert seen(up) == ["key-0", "key-1", "key-1"]
    assert up.requests[2].query == "alt=sse"
    assert all(r.header("x-goog-api-key") != TOKEN for r in up.requests)

    # Exhausted: the SDK raises its usual errors, with Google's status.
    up.set_reply(KEYS[1], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="7s"))
    for call in (
        lambda: sdk.models.generate_content(model=MODEL, contents="Hi"),
        lambda: list(sdk.models.generate_content_stream(model=MODEL, contents="Hi")),
    ):
        with pytest.raises(genai_errors.ClientError) as raised:
            call()
        assert (raised.value.code, raised.value.status) == (429, "RESOURCE_EXHAUSTED")
        assert raised.value.message == RATE_LIMITED
        assert raised.value.response.headers["retry-after"] == "7"
    pool.key("key-0").mark_permanent()
    pool.key("key-1").mark_permanent()
    with pytest.raises(genai_errors.ServerError) as failed:
        sdk.models.generate_content(model=MODEL, contents="Hi")
    assert (failed.value.code, failed.value.message) == (502, AUTH_FAILED)


def test_google_genai_sees_a_broken_stream_as_a_server_error(
    up: MockUpstream, proxied: Any
) -> None:
    chunk = {"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}}]}
    up.enqueue(Reply.sse([chunk, chunk], break_after=1))
    client, _ = gemini_client(up, 1)
    sdk = genai_client(proxied(client))
    stream = sdk.models.generate_content_stream(model=MODEL, contents="Hi")
    assert next(stream).text == "Hel"
    with pytest.raises(genai_errors.ServerError) as raised:
        next(stream)
    assert raised.value.code == 502
    assert raised.value.status == "UNAVAILABLE"


def test_google_genai_through_the_transport(up: MockUpstream) -> None:
    leaked = "Your API key was reported as leaked. Please use another API key."
    up.set_reply(KEYS[0], Reply.gemini_error(403, "PERMISSION_DENIED", leaked))
    client, pool = gemini_client(up)
    sdk = genai_client(
        "https://generativelanguage.googleapis.com",
        httpx_client=httpx2.Client(transport=FailoverTransport(client)),
    )
    assert sdk.models.generate_content(model=MODEL, contents="Hi").text == "Hello from mock"
    assert states(pool) == ["permanent", "valid"]
    assert up.requests[-1].path.endswith(f"/models/{MODEL}:generateContent")


def test_the_openai_sdk_on_geminis_openai_compatible_endpoint(
    up: MockUpstream, proxied: Any
) -> None:
    up.set_reply(KEYS[0], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="3s"))
    client, pool = gemini_client(up)
    sdk = openai.OpenAI(base_url=proxied(client) + "/v1beta/openai/", api_key=TOKEN)
    completion = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content == "Hello from mock"
    request = up.requests[-1]
    assert request.path == "/v1beta/openai/chat/completions"
    assert request.header("authorization") == f"Bearer {KEYS[1]}"
    assert request.header("x-goog-api-key") is None
    assert pool.key("key-0").cooldown_remaining == 3.0


# --------------------------------------------------------------------------
# Azure OpenAI
# --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_azure_deployments_fail_over_on_retry_after_ms(up: MockUpstream, stream: bool) -> None:
    up.set_reply(
        KEYS[0],
        Reply.error(
            429,
            "429",
            "Requests to the ChatCompletions_Create Operation have exceeded the token rate limit.",
            provider="azure_openai",
            headers={"retry-after": "2", "retry-after-ms": "1500"},
        ),
    )
    client, pool = azure_client(up)
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": stream})
    resp = client.request_sync("POST", AZURE_CHAT, body=body)
    content = resp.read()
    assert (resp.status, resp.key_label) == (200, "key-1")
    assert pool.key("key-0").cooldown_remaining == 1.5, "retry-after-ms"
    request = up.requests[-1]
    assert request.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert request.query == f"api-version={AZURE_VERSION}"
    assert request.header("api-key") == KEYS[1]
    assert request.header("authorization") is None
    assert (
        content.endswith(b"data: [DONE]\n\n")
        if stream
        else json.loads(content)["model"] == ("gpt-4o-prod")
    )


def azure_sdk(base_url: str, **options: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=base_url, api_key=TOKEN, api_version=AZURE_VERSION, max_retries=0,
        **options,
    )  # fmt: skip


def test_azure_openai_sdk_through_the_proxy(up: MockUpstream, proxied: Any) -> None:
    denied = "Access denied due to invalid subscription key or wrong API endpoint."
    up.set_reply(KEYS[0], Reply.error(401, "401", denied, provider="azure_openai"))
    client, pool = azure_client(up)
    sdk = azure_sdk(proxied(client))
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    answer = sdk.chat.completions.create(model="gpt-4o-prod", messages=messages)
    assert answer.choices[0].message.content == "Hello from mock"
    stream = sdk.chat.completions.create(model="gpt-4o-prod", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        "Hello from mock"
    )
    assert states(pool) == ["permanent", "valid"]
    assert {r.query for r in up.requests} == {f"api-version={AZURE_VERSION}"}
    assert all(r.header("api-key") != TOKEN for r in up.requests)

    up.set_reply(KEYS[1], Reply.error(429, "429", "slow down", provider="azure_openai",
                                      headers={"retry-after": "6"}))  # fmt: skip
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.chat.completions.create(model="gpt-4o-prod", messages=messages)
    assert limited.value.response.headers["retry-after"] == "6"
    assert limited.value.body == {  # the OpenAI envelope, which the SDK reads
        "message": RATE_LIMITED,
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    pool.key("key-1").mark_permanent()
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.chat.completions.create(model="gpt-4o-prod", messages=messages)
    assert failed.value.status_code == 502


def test_azure_openai_sdk_through_the_transport(up: MockUpstream) -> None:
    up.set_reply(KEYS[0], Reply.error(429, "429", "slow", provider="azure_openai"))
    client, _ = azure_client(up)
    sdk = azure_sdk(
        "https://example-resource.openai.azure.com",
        http_client=httpx2.Client(transport=FailoverTransport(client)),
    )
    answer = sdk.chat.completions.create(
        model="gpt-4o-prod", messages=[{"role": "user", "content": "Hi"}]
    )
    assert answer.choices[0].message.content == "Hello from mock"
    assert seen(up) == ["key-0", "key-1"]
    assert up.requests[-1].path == "/openai/deployments/gpt-4o-prod/chat/completions"


@pytest.mark.parametrize("path", ["/openai", "/openai/v1"])
def test_an_endpoint_given_with_the_paths_start_is_not_doubled(up: MockUpstream, path: str) -> None:
    """Azure's endpoint as its portal shows it for the v1 API (`.../openai/v1/`), or
    with `/openai`: the SDK's paths start with that, and go there once."""
    pool = kf.KeyPool(KEYS[:1])
    client = kf.FailoverClient(pool, base_url=up.url + path + "/", provider="azure_openai")
    sdk = openai.OpenAI(
        base_url="https://example-resource.openai.azure.com/openai/v1/",
        api_key="unused",
        http_client=httpx2.Client(transport=FailoverTransport(client)),
        max_retries=0,
    )
    sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert up.requests[-1].path == "/openai/v1/chat/completions"


# --------------------------------------------------------------------------
# Per-key endpoints
# --------------------------------------------------------------------------


def endpoints_pool(**endpoints: str | None) -> kf.KeyPool:
    keys = {
        label: kf.Key(KEYS[i], base_url=url) for i, (label, url) in enumerate(endpoints.items())
    }
    return kf.KeyPool(keys)


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_a_regional_outage_fails_over_to_the_next_keys_endpoint(
    up: MockUpstream, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    pool = endpoints_pool(eastus=dead, westus=up.url)
    client = kf.FailoverClient(pool, base_url=dead, provider="azure_openai")
    body = json.dumps({"messages": [], "stream": stream})
    with caplog.at_level(logging.INFO, logger="keyfailover"):
        resp = client.request_sync("POST", AZURE_CHAT, body=body)
        content = resp.read()
    assert (resp.status, resp.key_label, resp.attempts) == (200, "westus", 2)
    assert content.endswith(b"data: [DONE]\n\n") if stream else b"Hello from mock" in content
    assert [a["reason"] for a in resp.attempt_log] == ["unreachable", None]
    assert [r.credential for r in up.requests] == [KEYS[1]]
    assert pool.key("eastus").state == kf.KeyState.TEMPORARY
    assert 10 < pool.key("eastus").cooldown_remaining <= 15
    assert client.stats()["unreachable"] == 1
    metrics = client.metrics()
    assert (
        'keyfailover_key_transitions_total{pool="azure_openai",key="eastus",reason="unreachable"} 1'
        in metrics
    )
    record = next(r for r in caplog.records if r.name == "keyfailover.pool")
    assert record.reason == "unreachable"  # type: ignore[attr-defined]
    assert "key eastus (sk-a...0000) of pool azure_openai cools down" in record.getMessage()
    assert KEYS[0] not in record.getMessage()
    # The next requests go to westus at once.
    resp = client.request_sync("POST", AZURE_CHAT, body=body)
    assert (resp.status, resp.attempts) == (200, 1)


def test_a_504_from_a_keys_own_endpoint_fails_over(up: MockUpstream) -> None:
    with MockUpstream() as gateway:
        gateway.enqueue(Reply(status=504, body=b"upstream request timeout"))
        pool = endpoints_pool(eastus=gateway.url, westus=up.url)
        client = kf.FailoverClient(pool, base_url=up.url, provider="openai")
        resp = client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY)
        assert (resp.status, resp.key_label) == (200, "westus")
        assert [a["status"] for a in resp.attempt_log] == [504, 200]
        assert pool.key("eastus").state == kf.KeyState.TEMPORARY


def test_every_key_on_one_dead_endpoint_is_a_502_as_before() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = kf.FailoverClient(kf.KeyPool(KEYS[:2]), base_url=dead, provider="openai")
    resp = client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY)
    assert (resp.status, resp.attempts, resp.exhausted) == (502, 1, False)
    assert "could not connect" in json.loads(resp.read())["error"]["message"]
    assert states(client.pool) == ["valid", "valid"]
    # Every key on its own endpoint, all of them dead: the last failure, not a 429.
    pool = endpoints_pool(a=dead, b=f"http://127.0.0.1:{free_port()}")
    client = kf.FailoverClient(pool, base_url=dead, provider="openai")
    resp = client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY)
    assert (resp.status, resp.attempts, resp.exhausted) == (502, 2, False)


def test_while_every_keys_endpoint_cools_down_the_pool_says_unreachable_not_rate_limited(
    up: MockUpstream,
) -> None:
    pool = endpoints_pool(a=f"http://127.0.0.1:{free_port()}", b=f"http://127.0.0.1:{free_port()}")
    client = kf.FailoverClient(pool, base_url=up.url, provider="openai")
    assert client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY).status == 502
    resp = client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY)
    assert (resp.status, resp.attempts, resp.exhausted) == (502, 0, True)
    assert 1 <= int(header(resp, "retry-after") or 0) <= 15
    error = json.loads(resp.read())["error"]
    assert error["message"] == "the endpoints of all configured keys are unreachable"
    assert error["type"] == "api_error"
    assert up.requests == [], "nothing went to the client's endpoint"
    with pytest.raises(kf.UnreachableExhaustion) as caught:
        pool.walker().next()
    assert isinstance(caught.value, kf.TransientExhaustion)
    assert 14 < caught.value.retry_after <= 15
    assert str(caught.value).startswith("the endpoints of all configured keys are unreachable")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (type(copy), str(copy), copy.retry_after) == (
        kf.UnreachableExhaustion,
        str(caught.value),
        caught.value.retry_after,
    )
    # What a stream that meets it ends with.
    event = kf.sse_error_event(caught.value, provider="openai")
    assert b"the endpoints of all configured keys are unreachable" in event
    # A rate limit on either key makes it the rate-limited pool's 429.
    pool.key("a").mark_temporary(60)
    resp = client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY)
    assert (resp.status, resp.exhausted) == (429, True)
    assert "rate-limited" in json.loads(resp.read())["error"]["message"]


def test_byok_is_sent_once_to_the_clients_base_url(up: MockUpstream) -> None:
    with MockUpstream() as own:
        pool = endpoints_pool(eastus=own.url)
        client = kf.FailoverClient(pool, base_url=up.url, provider="azure_openai")
        resp = client.request_sync("POST", AZURE_CHAT, body=CHAT_BODY, credential="callers-key")
        assert resp.status == 200
        assert [r.header("api-key") for r in up.requests] == ["callers-key"]
        assert own.requests == []


def test_keys_file_endpoints_are_used(up: MockUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    keys = kf.parse_keys(f"eastus={KEYS[0]} base_url={dead}\nwestus={KEYS[1]} base_url={up.url}\n")
    client = kf.FailoverClient(kf.KeyPool(keys), base_url=dead, provider="azure_openai")
    resp = client.request_sync("POST", AZURE_CHAT, body=CHAT_BODY)
    assert (resp.status, resp.key_label) == (200, "westus")


# --------------------------------------------------------------------------
# OpenAI-compatible presets: their rate-limit headers
# --------------------------------------------------------------------------

PRESET_HEADERS = {
    "groq": ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "7.66s"}, 7.66),
    "mistral": ({"ratelimitbysize-remaining": "0", "ratelimitbysize-reset": "43"}, 43.0),
    "together": ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "2"}, 2.0),
}


@pytest.mark.parametrize("preset", sorted(PRESET_HEADERS))
def test_preset_rate_limit_headers_move_off_a_used_up_key(up: MockUpstream, preset: str) -> None:
    headers, cooldown = PRESET_HEADERS[preset]
    up.set_reply(KEYS[0], Reply.json({"id": "x", "choices": []}, headers=headers))
    clock = kf.ManualClock()
    client = kf.FailoverClient(
        kf.KeyPool(KEYS[:2], clock=clock), base_url=up.url + "/v1", provider="openai"
    )
    assert client.request_sync("POST", "/chat/completions", body=CHAT_BODY).key_label == "key-0"
    assert client.pool.key("key-0").cooldown_remaining == pytest.approx(cooldown, abs=0.01)
    assert client.request_sync("POST", "/chat/completions", body=CHAT_BODY).key_label == "key-1"
    assert seen(up) == ["key-0", "key-1"], "no 429 round trip"


def test_openrouters_upstream_rate_limit_is_relayed_without_cooling_the_key(
    up: MockUpstream,
) -> None:
    upstream_limited = {
        "error": {
            "message": "Provider returned error",
            "code": 429,
            "metadata": {"raw": "temporarily rate-limited upstream", "provider_name": "Venice"},
        }
    }
    up.set_reply(KEYS[0], Reply.json(upstream_limited, status=429))
    client = kf.FailoverClient(kf.KeyPool(KEYS[:2]), base_url=up.url, provider="openai")
    resp = client.request_sync("POST", "/v1/chat/completions", body=CHAT_BODY)
    assert (resp.status, resp.attempts) == (429, 1)
    assert states(client.pool) == ["valid", "valid"]


# --------------------------------------------------------------------------
# keyfailover serve --provider
# --------------------------------------------------------------------------


def serve_client(monkeypatch: pytest.MonkeyPatch, keys: str, *extra: str) -> kf.FailoverClient:
    started: dict[str, Any] = {}
    monkeypatch.setenv("KF_TEST_KEYS", keys)
    monkeypatch.setattr(
        _serve, "run_native", lambda proxy, sock, args: started.update(app=proxy, sock=sock)
    )
    assert cli.main(["serve", "--keys-env", "KF_TEST_KEYS", "--port", "0", *extra]) == 0
    started["sock"].close()
    return started["app"].client  # type: ignore[no-any-return]


def test_serve_knows_the_new_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    gemini = serve_client(monkeypatch, KEYS[0], "--provider", "gemini")
    assert (gemini.provider, gemini.base_url) == (
        "gemini",
        "https://generativelanguage.googleapis.com",
    )
    azure = serve_client(
        monkeypatch,
        f"east={KEYS[0]} base_url=https://east.openai.azure.com\n"
        f"west={KEYS[1]} base_url=https://west.openai.azure.com",
        "--provider",
        "azure_openai",
    )
    assert (azure.provider, azure.base_url) == ("azure_openai", "https://east.openai.azure.com")
    given = serve_client(
        monkeypatch,
        KEYS[0],
        "--provider",
        "azure_openai",
        "--upstream",
        "https://x.openai.azure.com",
    )
    assert given.base_url == "https://x.openai.azure.com"


def test_serve_azure_without_an_endpoint_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KF_TEST_KEYS", f"{KEYS[0]},{KEYS[1]}")
    assert cli.main(["serve", "--keys-env", "KF_TEST_KEYS", "--provider", "azure_openai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--provider azure_openai needs --upstream URL" in err[0]
    assert "base_url=URL on every key" in err[0]
    assert KEYS[0] not in err[0]


def test_no_key_leaks_in_gemini_answers(up: MockUpstream) -> None:
    """A Gemini error body echoing the key it was sent is scrubbed, as for the others."""
    up.set_reply(
        KEYS[0],
        Reply.gemini_error(400, "INVALID_ARGUMENT", f"Bad request for key {KEYS[0]}"),
    )
    client, _ = gemini_client(up, 1)
    body = client.request_sync("POST", GENERATE, body=BODY).read()
    assert KEYS[0].encode() not in body
    assert b"sk-a...0000" in body


def test_mock_upstream_limits_answer_gemini_requests_as_gemini_does() -> None:
    with MockUpstream(limits={KEYS[0]: Limit(requests=1, window=30)}) as up:
        send = lambda: httpx.post(  # noqa: E731
            up.url + GENERATE, headers={"x-goog-api-key": KEYS[0]}, content=BODY
        )
        assert send().status_code == 200
        spent = send()
        assert spent.status_code == 429
        assert "retry-after" not in spent.headers
        error = spent.json()["error"]
        assert error["status"] == "RESOURCE_EXHAUSTED"
        delay = next(d["retryDelay"] for d in error["details"] if "RetryInfo" in d["@type"])
        assert 25 < float(delay.rstrip("s")) <= 30
