"""FailoverClient against MockUpstream: the seed gateway's failover tables, BYOK, pool state
across requests, forwarding, error mappings, stats and secrets.

Streaming-specific behaviour (first-event failover, broken streams, cancellation, SSE error
events) is in test_failover_streaming.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import (
    AUTH_FAILED,
    FAKE_KEYS,
    LABEL,
    RATE_LIMITED,
    LoopbackServer,
    free_port,
    header,
    make_client,
    read_head,
    run,
    seen,
    states,
    until_next_month,
)

import keyfailover as kf
from keyfailover.testing import (
    MockUpstream,
    Reply,
    anthropic_message,
    openai_chat_completion,
)

KEYS = FAKE_KEYS[:3]
BYOK = "sk-user-own-byok-key-0123456789abcdef"


@dataclass(frozen=True)
class Api:
    """What differs between the providers, as a test sees it."""

    provider: str
    path: str
    rate_limit_type: str
    auth_type: str
    done_marker: bytes  # the last event of a successful stream

    def __str__(self) -> str:
        return self.provider

    def body(self, stream: bool = False, **extra: Any) -> bytes:
        return json.dumps(
            {"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}], **extra}
            | ({"stream": True} if stream else {})
        ).encode()

    def error(self, status: int, type_: str, retry_after: str | None = None) -> Reply:
        headers = {"retry-after": retry_after} if retry_after is not None else None
        return Reply.error(
            status, type_, "upstream says no", provider=self.provider, headers=headers
        )

    def sent_key(self, headers: list[tuple[str, str]]) -> str | None:
        """The pool key the client put in the request headers it sent upstream."""
        values = dict(headers)
        if self.provider == "anthropic":
            assert "authorization" not in values
            return values.get("x-api-key")
        assert "x-api-key" not in values
        scheme, _, token = values["authorization"].partition(" ")
        assert scheme == "Bearer"
        return token

    def check_success(self, body: bytes, stream: bool) -> None:
        if stream:
            assert body.endswith(self.done_marker), body[-200:]
            return
        payload = json.loads(body)
        if self.provider == "anthropic":
            assert payload["content"][0]["text"] == "Hello from mock"
        else:
            assert payload["choices"][0]["message"]["content"] == "Hello from mock"


ANTHROPIC = Api(
    "anthropic",
    "/v1/messages",
    "rate_limit_error",
    "authentication_error",
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
)
OPENAI = Api(
    "openai", "/v1/chat/completions", "rate_limit_exceeded", "invalid_api_key", b"data: [DONE]\n\n"
)
APIS = [ANTHROPIC, OPENAI]


def check_envelope(api: Api, body: bytes, type_: str, message: str | None = None) -> str:
    """Asserts `body` is the provider's error envelope of `type_`; returns the message."""
    payload = json.loads(body)
    if api.provider == "anthropic":
        assert set(payload) == {"type", "error"}
        assert payload["type"] == "error"
        assert set(payload["error"]) == {"type", "message"}
    else:
        assert set(payload) == {"error"}
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        assert payload["error"]["param"] is None
        assert isinstance(payload["error"]["code"], str)
    assert payload["error"]["type"] == type_
    if message is not None:
        assert payload["error"]["message"] == message
    return str(payload["error"]["message"])


@contextlib.contextmanager
def raw_server(payload: bytes) -> Iterator[int]:
    """A one-shot TCP server: reads a request head (or a TLS hello), answers `payload`, closes."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), server.accept()[0] as conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and not data.startswith(b"\x16"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.sendall(payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        thread.join(10)
        server.close()


async def call(
    client: kf.FailoverClient,
    api: Api,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    credential: str | None = None,
) -> tuple[kf.Response, bytes]:
    resp = await client.request(
        "POST",
        api.path,
        headers={"content-type": "application/json", **(headers or {})},
        body=api.body(stream) if body is None else body,
        credential=credential,
    )
    return resp, await resp.read()


# --------------------------------------------------------------------------
# The seed's failover table, for both providers, blocking and streaming
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    keys: int
    # key index -> (status, "rate_limit" | "auth" | error type, retry-after)
    replies: dict[int, tuple[int, str, str | None]]
    status: int
    seen: list[int]
    states: list[str]
    retry_after: str | None = None
    exhausted: bool = False
    message: str | None = None  # of the synthesized error
    stats: dict[str, int] = field(default_factory=dict)


FAILOVER_CASES = [
    Case("single_valid_key", 1, {}, 200, [0], ["valid"]),
    Case(
        "failover_after_429",
        2,
        {0: (429, "rate_limit", "5")},
        200,
        [0, 1],
        ["temporary", "valid"],
        stats={"rate_limited": 1},
    ),
    Case(
        "failover_after_401",
        2,
        {0: (401, "auth", None)},
        200,
        [0, 1],
        ["permanent", "valid"],
        stats={"revoked": 1},
    ),
    # Billing errors are fixed by paying: the quota cooldown, not retirement.
    Case(
        "failover_after_402",
        2,
        {0: (402, "billing_error", None)},
        200,
        [0, 1],
        ["temporary", "valid"],
        stats={"quota_exhausted": 1},
    ),
    Case(
        "failover_after_403",
        2,
        {0: (403, "permission_error", None)},
        200,
        [0, 1],
        ["permanent", "valid"],
        stats={"revoked": 1},
    ),
    Case(
        "all_keys_rate_limited",
        3,
        {0: (429, "rate_limit", "5"), 1: (429, "rate_limit", "3"), 2: (429, "rate_limit", "10")},
        429,
        [0, 1, 2],
        ["temporary"] * 3,
        retry_after="3",
        exhausted=True,
        message=RATE_LIMITED,
        stats={"rate_limited": 3, "exhausted_transient": 1},
    ),
    Case(
        "all_keys_unauthorized",
        2,
        {0: (401, "auth", None), 1: (401, "auth", None)},
        502,
        [0, 1],
        ["permanent"] * 2,
        exhausted=True,
        message=AUTH_FAILED,
        stats={"revoked": 2, "exhausted_permanent": 1},
    ),
    Case(
        "revoked_and_rate_limited_is_transient",
        2,
        {0: (403, "permission_error", None), 1: (429, "rate_limit", "7")},
        429,
        [0, 1],
        ["permanent", "temporary"],
        retry_after="7",
        exhausted=True,
        message=RATE_LIMITED,
        stats={"revoked": 1, "rate_limited": 1, "exhausted_transient": 1},
    ),
    Case("server_error_no_failover", 2, {0: (500, "api_error", None)}, 500, [0], ["valid"] * 2),
    Case(
        "bad_request_no_failover",
        2,
        {0: (400, "invalid_request_error", None)},
        400,
        [0],
        ["valid"] * 2,
    ),
    Case("not_found_no_failover", 2, {0: (404, "not_found_error", None)}, 404, [0], ["valid"] * 2),
    Case(
        "overloaded_no_failover",
        2,
        {0: (529, "overloaded_error", "5")},
        529,
        [0],
        ["valid"] * 2,
        retry_after="5",  # upstream's, relayed: a 529 says nothing about the key
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
@pytest.mark.parametrize("api", APIS, ids=str)
@pytest.mark.parametrize("case", FAILOVER_CASES, ids=lambda c: c.name)
def test_failover_table(up: MockUpstream, api: Api, stream: bool, case: Case) -> None:
    client, pool = make_client(up, api.provider, case.keys)
    upstream_bodies = {}
    for index, (status, kind, retry_after) in case.replies.items():
        type_ = {"rate_limit": api.rate_limit_type, "auth": api.auth_type}.get(kind, kind)
        reply = api.error(status, type_, retry_after)
        upstream_bodies[index] = reply.body
        up.set_reply(KEYS[index], reply)

    resp, body = run(call(client, api, stream=stream))

    assert resp.status == case.status
    assert header(resp, "retry-after") == case.retry_after
    assert seen(up) == [f"key-{i}" for i in case.seen]
    assert [api.sent_key(r.headers) for r in up.requests] == [KEYS[i] for i in case.seen]
    assert states(pool) == case.states
    assert resp.attempts == len(case.seen)
    assert resp.exhausted is case.exhausted
    assert resp.key_label == f"key-{case.seen[-1]}"
    for index, (status, _, retry_after) in case.replies.items():
        if status == 429:  # cooled down for as long as its Retry-After said
            assert pool.key(f"key-{index}").cooldown_remaining == float(retry_after or 60)

    if case.status == 200:
        content_type = "text/event-stream" if stream else "application/json"
        assert header(resp, "content-type") == content_type
        api.check_success(body, stream)
    else:
        # Errors before any stream started are plain HTTP, never an SSE event.
        assert header(resp, "content-type") == "application/json"
        assert not body.startswith((b"event:", b"data:"))
        if case.exhausted:
            check_envelope(
                api, body, "rate_limit_error" if case.status == 429 else "api_error", case.message
            )
        else:
            assert body == upstream_bodies[case.seen[-1]], "upstream's error relayed unchanged"

    stats = client.stats()
    expected = {
        "requests": 1,
        "attempts": len(case.seen),
        "byok": 0,
        "rate_limited": 0,
        "quota_exhausted": 0,
        "revoked": 0,
        "unreachable": 0,
        "exhausted_transient": 0,
        "exhausted_permanent": 0,
        "upstream_errors": 0,
    } | case.stats
    assert stats == expected


@pytest.mark.parametrize(
    ("provider", "status", "type_", "message"),
    [
        (
            "anthropic",
            401,
            "authentication_error",
            "CORS requests are not allowed for this Organization because of the "
            "`anthropic-dangerous-direct-browser-access` header being absent.",
        ),
        (
            "openai",
            403,
            "unsupported_country_region_territory",
            "Country, region, or territory not supported",
        ),
    ],
    ids=["anthropic-401-cors", "openai-403-country"],
)
def test_a_refusal_the_provider_says_is_not_the_keys_is_relayed_and_retires_nothing(
    up: MockUpstream, provider: str, status: int, type_: str, message: str
) -> None:
    """Anthropic's 401 to a request with a browser's `Origin` and OpenAI's 403 to a
    country it does not serve are documented as not the key's: every key would get the
    same. Retiring keys for them would take the whole pool down for good."""
    client, pool = make_client(up, provider, 2)
    reply = Reply.error(status, type_, message, provider=provider)
    up.enqueue(reply, reply)

    async def call() -> tuple[int, bytes, int]:
        resp = await client.request(
            "POST", "/v1/messages", headers={"origin": "https://app.example"}, body=b"{}"
        )
        return resp.status, await resp.read(), resp.attempts

    assert run(call()) == (status, reply.body, 1)
    assert states(pool) == ["valid", "valid"]
    assert run(call()) == (status, reply.body, 1), "and again: the pool is not exhausted"
    assert len(up.requests) == 2


@pytest.mark.parametrize("api", APIS, ids=str)
def test_sync_failover_table_subset(up: MockUpstream, api: Api) -> None:
    """request_sync fails over and exhausts exactly as request does."""
    client, pool = make_client(up, api.provider, 3)
    up.set_reply(KEYS[0], api.error(429, api.rate_limit_type, "5"))
    up.set_reply(KEYS[1], api.error(401, api.auth_type))

    with client.request_sync("POST", api.path, body=api.body()) as resp:
        assert (resp.status, resp.attempts, resp.key_label) == (200, 3, "key-2")
        assert not resp.exhausted
        api.check_success(resp.read(), stream=False)
    assert states(pool) == ["temporary", "permanent", "valid"]

    up.set_reply(KEYS[2], api.error(429, api.rate_limit_type, "2"))
    resp = client.request_sync("POST", api.path, body=api.body(stream=True))
    assert (resp.status, resp.attempts, resp.exhausted) == (429, 1, True)
    assert header(resp, "retry-after") == "2"
    check_envelope(api, b"".join(resp), "rate_limit_error", RATE_LIMITED)
    assert seen(up) == ["key-0", "key-1", "key-2", "key-2"]


# --------------------------------------------------------------------------
# Cooldowns and exhaustion
# --------------------------------------------------------------------------

# 429 bodies that say the quota or spend cap is used up, whatever Retry-After says.
QUOTA_BODIES = {
    "openai_insufficient_quota": {
        "error": {
            "message": "quota",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    },
    "anthropic_spend_limit": {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "spend cap",
            "details": {"error_code": "enforced_spend_limit_reached"},
        },
    },
}


@pytest.mark.parametrize(
    ("reply", "cooldown", "reason"),
    [
        pytest.param(
            ANTHROPIC.error(429, "rate_limit_error", "5"), 5.0, "rate_limited", id="retry_after"
        ),
        pytest.param(
            Reply.error(429, "rate_limit_error", "x", headers={"retry-after-ms": "1500"}),
            1.5,
            "rate_limited",
            id="retry_after_ms",
        ),
        pytest.param(
            ANTHROPIC.error(429, "rate_limit_error"), 60.0, "rate_limited", id="default_cooldown"
        ),
        pytest.param(
            Reply.json(
                QUOTA_BODIES["openai_insufficient_quota"], status=429, headers={"retry-after": "5"}
            ),
            3600.0,
            "quota_exhausted",
            id="openai_insufficient_quota",
        ),
        # The same from an upstream that gzips its error body although asked not to.
        pytest.param(
            Reply(
                status=429,
                headers={"retry-after": "5", "content-encoding": "gzip"},
                body=gzip.compress(json.dumps(QUOTA_BODIES["openai_insufficient_quota"]).encode()),
            ),
            3600.0,
            "quota_exhausted",
            id="openai_insufficient_quota_gzip",
        ),
        # A monthly spend limit renews at 00:00 UTC on the 1st of the next month.
        pytest.param(
            Reply.json(
                QUOTA_BODIES["anthropic_spend_limit"], status=429, headers={"retry-after": "5"}
            ),
            None,
            "quota_exhausted",
            id="anthropic_spend_limit",
        ),
    ],
)
def test_cooldown_of_a_rate_limited_key(
    up: MockUpstream, clock: kf.ManualClock, reply: Reply, cooldown: float | None, reason: str
) -> None:
    client, pool = make_client(up, ANTHROPIC.provider, 2, clock=clock)
    up.set_reply(KEYS[0], reply)

    resp, _ = run(call(client, ANTHROPIC))
    assert (resp.status, resp.key_label) == (200, "key-1")
    key = pool.key("key-0")
    assert key.state == kf.KeyState.TEMPORARY
    if cooldown is None:
        assert key.cooldown_remaining == pytest.approx(until_next_month(), abs=5)
        cooldown = key.cooldown_remaining
    assert key.cooldown_remaining == pytest.approx(cooldown)
    assert client.stats()[reason] == 1

    up.set_reply(KEYS[0], None)
    clock.advance(cooldown - 0.001)
    assert run(call(client, ANTHROPIC))[0].key_label == "key-1", "still cooling down"
    clock.advance(0.001)
    assert run(call(client, ANTHROPIC))[0].key_label == "key-0", "back in service"
    assert seen(up) == ["key-0", "key-1", "key-1", "key-0"]


@pytest.mark.parametrize("api", APIS, ids=str)
def test_exhausted_pool_is_answered_without_upstream_call(
    up: MockUpstream, clock: kf.ManualClock, api: Api
) -> None:
    client, pool = make_client(up, api.provider, 3, clock=clock)
    for key, retry_after in zip(KEYS, ["5", "3", "10"], strict=True):
        up.set_reply(key, api.error(429, api.rate_limit_type, retry_after))
    assert header(run(call(client, api))[0], "retry-after") == "3"

    clock.advance(1.5)  # smallest remaining cooldown: 1.5 s, rounded up
    resp, body = run(call(client, api, stream=True))
    assert (resp.status, resp.attempts, resp.exhausted) == (429, 0, True)
    assert resp.key_label is None
    assert header(resp, "retry-after") == "2"
    check_envelope(api, body, "rate_limit_error", RATE_LIMITED)
    assert len(up.requests) == 3, "no upstream call"
    assert client.stats()["exhausted_transient"] == 2

    for key in KEYS:
        pool.key(LABEL[key]).mark_permanent()
    resp, body = run(call(client, api))
    assert (resp.status, resp.attempts, resp.exhausted) == (502, 0, True)
    assert header(resp, "retry-after") is None
    check_envelope(api, body, "api_error", AUTH_FAILED)


def test_exhaustion_always_has_retry_after_of_at_least_one(up: MockUpstream) -> None:
    """A key that recovered after this walk tried it is no promise: Retry-After: 1."""
    client, pool = make_client(up, ANTHROPIC.provider, 2)
    up.set_reply(KEYS[0], ANTHROPIC.error(429, "rate_limit_error", "5"))
    slow_429 = dataclasses.replace(ANTHROPIC.error(429, "rate_limit_error", "5"), stall=0.3)
    up.set_reply(KEYS[1], slow_429)

    async def scenario() -> tuple[kf.Response, bytes]:
        task = asyncio.ensure_future(call(client, ANTHROPIC))
        assert await up.wait_for_async(lambda u: len(u.requests) == 2)
        pool.key("key-0").reset()  # key-0 is valid again, but this walker has tried it
        return await task

    resp, body = run(scenario())
    assert (resp.status, resp.exhausted) == (429, True)
    assert header(resp, "retry-after") == "1"
    check_envelope(ANTHROPIC, body, "rate_limit_error", RATE_LIMITED)


def test_a_key_whose_cooldown_ends_during_the_walk_is_tried_before_giving_up(
    up: MockUpstream,
) -> None:
    """key-0 cooled for 50 ms, key-1 answers its own 429 after 150 ms: key-0 serves."""
    pool = kf.KeyPool(KEYS[:2])  # the real clock
    client = kf.FailoverClient(pool, base_url=up.url)
    pool.key("key-0").mark_temporary(0.05)
    up.set_reply(KEYS[1], dataclasses.replace(ANTHROPIC.error(429, "rate_limit_error"), stall=0.15))
    resp, body = run(call(client, ANTHROPIC))
    assert (resp.status, resp.key_label, resp.attempts) == (200, "key-0", 2)
    assert seen(up) == ["key-1", "key-0"]
    ANTHROPIC.check_success(body, stream=False)


# --------------------------------------------------------------------------
# BYOK
# --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
@pytest.mark.parametrize("api", APIS, ids=str)
def test_byok_is_one_attempt_and_leaves_the_pool_alone(
    up: MockUpstream, api: Api, stream: bool
) -> None:
    client, pool = make_client(up, api.provider, 2)
    reply = api.error(429, api.rate_limit_type, "5")
    up.set_reply(BYOK, reply)
    stray = {"x-api-key": "sk-stray-header-key-0000", "authorization": "Bearer sk-stray-0000"}

    resp, body = run(call(client, api, stream=stream, headers=stray, credential=BYOK))

    assert resp.status == 429
    assert header(resp, "retry-after") == "5", "upstream's retry-after passed through"
    assert body == reply.body, "upstream's error returned as is"
    assert (resp.attempts, resp.key_label, resp.exhausted) == (1, None, False)
    assert seen(up) == [BYOK]
    sent = up.requests[0]
    sent_in = "x-api-key" if api.provider == "anthropic" else "authorization"
    expected = BYOK if sent_in == "x-api-key" else f"Bearer {BYOK}"
    assert sent.header(sent_in) == expected, "in the provider's auth header"
    other = "authorization" if sent_in == "x-api-key" else "x-api-key"
    assert sent.header(other) is None, "only the chosen credential goes upstream"
    assert states(pool) == ["valid", "valid"]
    assert all(key.cooldown_remaining == 0 for key in map(pool.key, ["key-0", "key-1"]))
    assert client.stats() == {
        "requests": 1,
        "attempts": 1,
        "byok": 1,
        "rate_limited": 0,
        "quota_exhausted": 0,
        "revoked": 0,
        "unreachable": 0,
        "exhausted_transient": 0,
        "exhausted_permanent": 0,
        "upstream_errors": 0,
    }


@pytest.mark.parametrize("status", [200, 401])
def test_byok_success_and_auth_failure_relayed(up: MockUpstream, status: int) -> None:
    client, pool = make_client(up, OPENAI.provider, 1)
    if status != 200:
        up.set_reply(BYOK, OPENAI.error(401, "invalid_api_key"))
    resp = client.request_sync("POST", OPENAI.path, body=OPENAI.body(), credential=BYOK)
    assert (resp.status, resp.attempts, resp.key_label) == (status, 1, None)
    body = resp.read()
    if status == 200:
        OPENAI.check_success(body, stream=False)
    else:
        check_envelope(OPENAI, body, "invalid_api_key")
    assert seen(up) == [BYOK]
    assert states(pool) == ["valid"]


@pytest.mark.parametrize("credential", ["", "  "])
def test_an_empty_byok_credential_is_refused(up: MockUpstream, credential: str) -> None:
    client, _ = make_client(up, OPENAI.provider, 1)
    with pytest.raises(kf.InvalidRequestError, match="the credential is empty"):
        client.request_sync("POST", OPENAI.path, body=OPENAI.body(), credential=credential)
    assert up.requests == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_byok_body_broken_before_its_first_byte_is_a_502(up: MockUpstream, framing: str) -> None:
    """Not judged, but no answer either: the caller's own key gets the same 502 as a
    connection closed before the head, not a 200 whose body breaks at once."""
    client, pool = make_client(up, OPENAI.provider, 1)
    body = json.dumps({"id": "chatcmpl-1"}).encode()
    up.set_reply(BYOK, Reply(body=body, framing=framing, break_after_bytes=0))
    resp = client.request_sync("POST", OPENAI.path, body=OPENAI.body(), credential=BYOK)
    assert (resp.status, resp.attempts, resp.key_label) == (502, 1, None)
    message = check_envelope(OPENAI, resp.read(), "api_error")
    assert "broke before its first byte" in message
    assert seen(up) == [BYOK]
    assert states(pool) == ["valid"]


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": ""},
        {"x-api-key": "   "},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Bearer "},
        {"x-api-key": "sk-callers-own-0000"},
        {"authorization": "Bearer sk-callers-own-0000"},
        {"api-key": "azure-0000", "x-goog-api-key": "gemini-0000"},
    ],
    ids=[
        "empty_x_api_key",
        "blank_x_api_key",
        "basic_auth",
        "empty_bearer",
        "x_api_key",
        "bearer",
        "other_providers",
    ],
)
def test_credential_headers_are_never_forwarded_without_credential(
    up: MockUpstream, headers: dict[str, str]
) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    resp, _ = run(call(client, ANTHROPIC, headers=headers))
    assert (resp.status, resp.key_label) == (200, "key-0")
    assert seen(up) == ["key-0"]
    sent = up.requests[0]
    assert ANTHROPIC.sent_key(sent.headers) == KEYS[0]
    for name in ("authorization", "api-key", "x-goog-api-key"):
        assert sent.header(name) is None, name
    assert client.stats()["byok"] == 0


# --------------------------------------------------------------------------
# Pool state across requests, and the agentic continuation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS, ids=str)
def test_pool_state_kept_across_requests(up: MockUpstream, clock: kf.ManualClock, api: Api) -> None:
    client, pool = make_client(up, api.provider, 2, clock=clock)
    up.set_reply(KEYS[0], api.error(429, api.rate_limit_type, "5"))

    labels = [run(call(client, api))[0].key_label for _ in range(2)]
    assert labels == ["key-1", "key-1"]
    assert seen(up) == ["key-0", "key-1", "key-1"], "the second request skips the cooling key"
    assert states(pool) == ["temporary", "valid"]

    up.set_reply(KEYS[0], None)
    clock.advance(5)
    assert run(call(client, api))[0].key_label == "key-0"
    assert client.stats()["rate_limited"] == 1


def tool_turn(api: Api) -> Reply:
    if api.provider == "anthropic":
        message = anthropic_message(
            content=[
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ]
        )
        message["stop_reason"] = "tool_use"
        return Reply.json(message)
    completion = openai_chat_completion()
    completion["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_01",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    completion["choices"][0]["finish_reason"] = "tool_calls"
    return Reply.json(completion)


def continuation(api: Api) -> bytes:
    """The request that sends the tool result back."""
    if api.provider == "anthropic":
        messages = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"}],
            },
        ]
    else:
        messages = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_01",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_01", "content": "sunny"},
        ]
    return json.dumps({"model": "mock-model", "messages": messages}).encode()


AGENTIC_CASES = [
    pytest.param([], ["key-0", "key-0"], 200, ["valid", "valid"], id="happy_path"),
    pytest.param(
        [(429, "5")],
        ["key-0", "key-0", "key-1"],
        200,
        ["temporary", "valid"],
        id="agentic_failover_to_k1",
    ),
    pytest.param(
        [(429, "5"), (429, "3")],
        ["key-0", "key-0", "key-1"],
        429,
        ["temporary", "temporary"],
        id="agentic_all_keys_fail",
    ),
]


@pytest.mark.parametrize("api", APIS, ids=str)
@pytest.mark.parametrize(
    ("continuation_replies", "seen_keys", "final_status", "final_states"), AGENTIC_CASES
)
def test_agentic_continuation(
    up: MockUpstream,
    api: Api,
    continuation_replies: list[tuple[int, str]],
    seen_keys: list[str],
    final_status: int,
    final_states: list[str],
) -> None:
    """Each turn of a tool loop is its own request with its own walker."""
    client, pool = make_client(up, api.provider, 2)
    up.enqueue(tool_turn(api))
    up.enqueue(*(api.error(s, api.rate_limit_type, ra) for s, ra in continuation_replies))

    first, first_body = run(call(client, api))
    assert (first.status, first.key_label) == (200, "key-0")
    assert b"get_weather" in first_body

    resp, body = run(call(client, api, body=continuation(api)))
    assert resp.status == final_status
    assert seen(up) == seen_keys
    assert states(pool) == final_states
    assert {r.body for r in up.requests[1:]} == {continuation(api)}
    if final_status == 200:
        api.check_success(body, stream=False)
        assert resp.attempts == len(seen_keys) - 1
    else:
        assert (resp.exhausted, resp.attempts) == (True, 2)
        assert header(resp, "retry-after") == "3"
        check_envelope(api, body, "rate_limit_error", RATE_LIMITED)


def test_concurrent_requests_fail_over_independently(up: MockUpstream) -> None:
    client, pool = make_client(up, ANTHROPIC.provider, 2)
    up.set_reply(KEYS[0], dataclasses.replace(ANTHROPIC.error(429, "rate_limit_error"), stall=0.1))

    async def many() -> list[tuple[kf.Response, bytes]]:
        return await asyncio.gather(*(call(client, ANTHROPIC) for _ in range(8)))

    results = run(many())
    assert [(r.status, r.key_label) for r, _ in results] == [(200, "key-1")] * 8
    assert states(pool) == ["temporary", "valid"]
    assert seen(up).count("key-1") == 8


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_every_concurrent_request_completes(up: MockUpstream, stream: bool) -> None:
    # Many awaitables finishing at once: none may be lost between the tokio
    # threads that finish them and the event loop that awaits them.
    client, _ = make_client(up, ANTHROPIC.provider, 1)

    async def rounds() -> list[int]:
        statuses = []
        for _ in range(20):
            calls = (call(client, ANTHROPIC, stream=stream) for _ in range(16))
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
            statuses += [resp.status for resp, body in results if body]
        return statuses

    assert run(rounds()) == [200] * 320


# --------------------------------------------------------------------------
# What goes upstream
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        bytes(range(256)) * 400,
        bytearray(b'{"binary": "\x00\xff"}'),
        '{"text": "h\u00e9llo \u20ac"}',
    ],
    ids=["bytes_100k", "bytearray", "str"],
)
def test_body_resent_byte_for_byte(up: MockUpstream, body: bytes | bytearray | str) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 3)
    up.set_reply(KEYS[0], ANTHROPIC.error(429, "rate_limit_error", "5"))
    up.set_reply(KEYS[1], ANTHROPIC.error(401, "authentication_error"))
    up.set_reply(KEYS[2], Reply.json({"ok": True}))

    resp = client.request_sync("POST", "/v1/messages", body=body)
    assert (resp.status, resp.attempts) == (200, 3)
    expected = body.encode() if isinstance(body, str) else bytes(body)
    assert [r.body for r in up.requests] == [expected] * 3
    assert {r.header("content-length") for r in up.requests} == {str(len(expected))}


def test_path_and_query_forwarded_on_every_attempt(up: MockUpstream) -> None:
    client, _ = make_client(up, OPENAI.provider, 2)
    up.set_reply(KEYS[0], OPENAI.error(429, "rate_limit_exceeded"))
    resp = client.request_sync("GET", "/v1/models?limit=5&after_id=a%2Fb&flag")
    assert resp.status == 200
    assert [(r.method, r.path, r.query) for r in up.requests] == [
        ("GET", "/v1/models", "limit=5&after_id=a%2Fb&flag")
    ] * 2


def test_base_url_path_prefix_is_kept(up: MockUpstream) -> None:
    client, _ = make_client(up.url + "/proxy/", ANTHROPIC.provider, 1)
    resp = client.request_sync("GET", "/v1/models?x=1")
    assert resp.status == 404  # the mock has no such route: relayed as is
    assert (up.requests[0].path, up.requests[0].query) == ("/proxy/v1/models", "x=1")


@pytest.mark.parametrize("api", APIS, ids=str)
def test_pool_key_goes_in_the_provider_header(up: MockUpstream, api: Api) -> None:
    client, _ = make_client(up, api.provider, 1)
    run(call(client, api, headers={"anthropic-version": "2023-06-01", "X-Trace": "t-1"}))
    sent = up.requests[0]
    assert api.sent_key(sent.headers) == KEYS[0]
    assert sent.header("anthropic-version") == "2023-06-01"
    assert sent.header("x-trace") == "t-1"
    assert sent.header("content-type") == "application/json"


HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def test_hop_by_hop_request_headers_not_forwarded(up: MockUpstream) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 2)
    up.set_reply(KEYS[0], ANTHROPIC.error(429, "rate_limit_error"))
    headers = [
        ("Connection", "keep-alive, X-Hop-Secret"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"),
        ("X-Hop-Secret", "named by Connection"),
        ("Host", "evil.example"),
        ("X-End-To-End", "kept"),
    ]
    resp = client.request_sync("POST", "/v1/messages", headers=headers, body=ANTHROPIC.body())
    assert resp.status == 200
    assert len(up.requests) == 2
    for sent in up.requests:
        names = {name for name, _ in sent.headers}
        assert not names & (HOP_BY_HOP | {"x-hop-secret"}), names
        assert sent.header("x-end-to-end") == "kept"
        assert sent.header("host") == f"127.0.0.1:{up.port}"


def test_hop_by_hop_response_headers_removed(up: MockUpstream) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    up.enqueue(
        Reply(
            headers=[
                ("Content-Type", "application/json"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "x-checksum"),
                ("Upgrade", "h2c"),
                ("Connection", "close"),
                ("X-Custom-Header", "Kept"),
            ],
            body=[b'{"ok":', b"true}"],  # chunked: transfer-encoding on the wire
        )
    )
    resp, body = run(call(client, ANTHROPIC))
    assert resp.headers == [("content-type", "application/json"), ("x-custom-header", "Kept")]
    assert json.loads(body) == {"ok": True}


def test_headers_named_by_connection_removed_from_the_response() -> None:
    payload = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close, X-Hop\r\n"
        b"x-hop: private\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\n{}"
    )
    with raw_server(payload) as port:
        client, _ = make_client(f"http://127.0.0.1:{port}", ANTHROPIC.provider, 1)
        resp = client.request_sync("GET", "/v1/models")
        assert resp.status == 200
        assert resp.headers == [
            ("content-type", "application/json"),
            ("x-kept", "yes"),
            ("content-length", "2"),
        ]
        assert resp.read() == b"{}"


@pytest.mark.parametrize(
    ("method", "path", "headers", "match"),
    [
        ("GE T", "/v1/models", None, "method"),
        ("GET", "v1/models", None, "must start with '/'"),
        ("GET", "/v1/models", {"bad header": "x"}, "header name"),
        ("GET", "/v1/models", {"x-api-key": f"{BYOK}\n"}, "x-api-key"),
    ],
)
def test_malformed_requests_raise_invalid_request_error_without_secrets(
    up: MockUpstream, method: str, path: str, headers: dict[str, str] | None, match: str
) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    with pytest.raises(kf.InvalidRequestError, match=match) as excinfo:
        client.request_sync(method, path, headers=headers)
    assert BYOK not in str(excinfo.value)
    assert up.requests == []
    assert client.stats()["requests"] == 0


def test_a_pool_key_in_a_bad_request_or_setting_is_never_echoed(up: MockUpstream) -> None:
    """A key where a method, header name or value, provider, name or base URL goes (a
    caller's mistake), or in text that is not valid UTF-8 (a lone surrogate, as text decoded
    with surrogateescape holds): the error is a KeyfailoverError that masks it, not one
    that echoes it, as Python's UnicodeEncodeError would."""
    client, pool = make_client(up, ANTHROPIC.provider, 2)
    key = KEYS[0]
    bad_requests = [
        (key + " ", "/v1", None),
        ("GET", "/v1", {key + " ": "1"}),
        ("GET", "/v1", {"x-h": key + "\udc80"}),
        ("GET", "/v1", {key + "\udc80": "1"}),
    ]
    raised: list[BaseException] = []
    for method, path, headers in bad_requests:
        with pytest.raises(kf.InvalidRequestError) as info:
            client.request_sync(method, path, headers=headers)
        raised.append(info.value)
    bad_settings = [
        lambda: kf.FailoverClient(pool, base_url=up.url, provider=key),
        lambda: kf.FailoverClient(pool, base_url=up.url, name=key),
        lambda: kf.FailoverClient(pool, base_url=f"{up.url}/{key}"),
        lambda: kf.KeyPool(KEYS[:2], strategy=key),
        lambda: kf.KeyPool([key + "\udc80"]),
        lambda: kf.KeyPool({"a\udc80": key}),
        lambda: kf.Key(key + "\udc80"),
        lambda: pool.reload([key, KEYS[1] + "\udc80"]),
        lambda: kf.parse_keys(f"{key}\n{KEYS[1]}\udc80"),
    ]
    for make in bad_settings:
        with pytest.raises(kf.ConfigError) as info:
            make()
        raised.append(info.value)
    with pytest.raises(kf.UnknownKeyError) as info:
        pool.key(key + "\udc80")
    raised.append(info.value)
    for error in raised:
        shown = f"{error}{error!r}{error.args}"
        assert not any(k in shown for k in KEYS), shown
    assert up.requests == []
    assert states(pool) == ["valid", "valid"]


@pytest.mark.parametrize("suffix", ["\n", " ", "\t"])
def test_a_base_url_with_whitespace_is_refused(up: MockUpstream, suffix: str) -> None:
    """Read from a file with its newline: refused at once, not accepted and then joined
    wrongly (`/v1/v1/...`) or blamed on every request's path."""
    pool = kf.KeyPool(KEYS[:1])
    with pytest.raises(kf.ConfigError, match="whitespace or a control character"):
        kf.FailoverClient(pool, base_url=f"{up.url}/v1{suffix}")


def test_a_response_header_named_after_a_key_is_not_relayed(up: MockUpstream) -> None:
    """A value is scrubbed; a name cannot be, and goes. Azure's keys (32 lower-case hex
    digits) are valid header names as they are."""
    key = "0123456789abcdef0123456789abcdef"
    pool = kf.KeyPool([key])
    client = kf.FailoverClient(pool, base_url=up.url)
    up.set_reply(key, Reply.json({}, headers={f"x-{key}": "1", "x-kept": "yes"}))
    resp = client.request_sync("POST", "/v1/messages", body=b"{}")
    assert resp.status == 200
    names = [name for name, _ in resp.headers]
    assert "x-kept" in names
    assert not any(key in name for name in names), names


# --------------------------------------------------------------------------
# Error mappings: upstream unreachable, slow or broken
# --------------------------------------------------------------------------


def assert_upstream_failure(
    api: Api, resp: kf.Response | kf.SyncResponse, body: bytes, status: int, *causes: str
) -> None:
    assert resp.status == status
    assert not resp.exhausted
    assert header(resp, "content-type") == "application/json"
    kind = "api_error" if status == 502 else "timeout_error"
    message = check_envelope(api, body, kind)
    for cause in causes:
        assert cause in message.lower(), message
    for key in KEYS:
        assert key not in message


@pytest.mark.parametrize("api", APIS, ids=str)
def test_connection_refused_is_502_naming_the_cause(api: Api) -> None:
    client, pool = make_client(f"http://127.0.0.1:{free_port()}", api.provider, 2)
    resp, body = run(call(client, api, stream=True))
    assert_upstream_failure(api, resp, body, 502, "connect", "refused")
    assert resp.attempts == 1, "no failover: the next key would not fare better"
    assert states(pool) == ["valid", "valid"]
    assert client.stats()["upstream_errors"] == 1


def test_dns_failure_is_502_naming_the_cause() -> None:
    client, pool = make_client(
        "http://keyfailover-test.invalid", ANTHROPIC.provider, 1, connect_timeout=5
    )
    resp, body = run(call(client, ANTHROPIC))
    assert_upstream_failure(ANTHROPIC, resp, body, 502, "dns")
    assert states(pool) == ["valid"]


def test_tls_failure_is_502_naming_the_cause() -> None:
    with raw_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        client, pool = make_client(f"https://127.0.0.1:{port}", OPENAI.provider, 1)
        resp, body = run(call(client, OPENAI))
    assert_upstream_failure(OPENAI, resp, body, 502, "connect", "corrupt message")
    assert states(pool) == ["valid"]


def test_connect_timeout_is_502_not_504() -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=0))
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        client, pool = make_client(
            f"http://127.0.0.1:{port}", ANTHROPIC.provider, 1, connect_timeout=0.2, timeout=30
        )
        start = time.monotonic()
        resp, body = run(call(client, ANTHROPIC))
        assert time.monotonic() - start < 5
    assert_upstream_failure(ANTHROPIC, resp, body, 502, "connect")
    assert "30 s" not in body.decode()
    assert states(pool) == ["valid"]


class ClosesAfterEachAnswer(LoopbackServer):
    """Answers one request per connection as if keeping it alive, then closes it: what an
    upstream's keep-alive timeout does to a pooled connection left idle."""

    def __init__(self) -> None:
        self.connections = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        read_head(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        )
        # Closes gracefully: whatever of the request is still unread is read, so the close
        # is a FIN, not a reset.
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass


def test_a_pooled_connection_the_upstream_closed_is_not_used_again() -> None:
    with ClosesAfterEachAnswer() as up:
        client, pool = make_client(up.url, ANTHROPIC.provider, 1)
        for _ in range(3):
            resp, body = run(call(client, ANTHROPIC))
            assert (resp.status, body) == (200, b"{}")
            time.sleep(0.2)  # the upstream's close arrives while the connection is idle
        up.close()
        assert up.connections == 3
    assert client.stats()["upstream_errors"] == 0
    assert states(pool) == ["valid"]


def test_requests_one_after_another_share_one_upstream_connection(up: MockUpstream) -> None:
    """Whatever the answer (a reply, an error relayed, a stream, a 429 failed over), once
    its body has been read the connection serves the next request."""
    client, pool = make_client(up, ANTHROPIC.provider, 2)
    up.enqueue(
        Reply.json({"n": 1}),
        Reply.error(400, "invalid_request_error", "bad"),
        Reply.sse([("message_stop", {"type": "message_stop"})]),
        Reply.error(429, "rate_limit_error", "slow down", headers={"retry-after": "30"}),
        Reply.json({"n": 2}),
        Reply(status=204, body=b""),
    )
    seen = []
    for stream in (False, False, True, False, False):
        resp, _ = run(call(client, ANTHROPIC, stream=stream))
        seen.append(resp.status)
    assert seen == [200, 400, 200, 200, 204]
    assert sorted(states(pool)) == ["temporary", "valid"]
    assert len(up.requests) == 6
    assert up.connections_accepted == 1


@pytest.mark.parametrize("api", APIS, ids=str)
def test_reset_before_head_is_502(up: MockUpstream, api: Api) -> None:
    client, pool = make_client(up, api.provider, 2)
    up.enqueue(Reply(reset_before_head=True))
    resp, body = run(call(client, api))
    assert_upstream_failure(api, resp, body, 502, "reset")
    assert (resp.attempts, len(up.requests)) == (1, 1)
    assert states(pool) == ["valid", "valid"]


@pytest.mark.parametrize("api", APIS, ids=str)
def test_no_head_within_timeout_is_504_quickly(up: MockUpstream, api: Api) -> None:
    client, pool = make_client(up, api.provider, 2, timeout=0.3)
    up.enqueue(Reply(stall=10))
    start = time.monotonic()
    resp, body = run(call(client, api))
    assert time.monotonic() - start < 2
    assert_upstream_failure(api, resp, body, 504, "0.3 s")
    assert (resp.attempts, len(up.requests)) == (1, 1)
    assert states(pool) == ["valid", "valid"]
    assert up.wait_for(lambda u: u.requests[0].disconnected, 2), "connection dropped"
    assert client.stats()["upstream_errors"] == 1


def broken_json_reply() -> Reply:
    body = json.dumps({"content": "x" * 5000}).encode()
    return Reply(headers={"content-type": "application/json"}, body=body, break_after=100)


def test_json_body_broken_after_head_raises_upstream_error(up: MockUpstream) -> None:
    client, pool = make_client(up, ANTHROPIC.provider, 1)
    up.enqueue(broken_json_reply(), broken_json_reply())

    async def scenario() -> None:
        resp = await client.request("POST", "/v1/messages", body=ANTHROPIC.body())
        assert resp.status == 200
        with pytest.raises(kf.UpstreamError) as excinfo:
            await resp.read()
        assert isinstance(excinfo.value, kf.KeyfailoverError)
        assert not any(key in str(excinfo.value) for key in KEYS)

        resp = await client.request("POST", "/v1/messages", body=ANTHROPIC.body())
        received = b""
        with pytest.raises(kf.UpstreamError):  # noqa: PT012 - chunks arrive before the break
            async for chunk in resp:
                received += chunk
        assert len(received) <= 100

    run(scenario())
    assert states(pool) == ["valid"]


def test_json_body_broken_after_head_raises_upstream_error_sync(up: MockUpstream) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    up.enqueue(broken_json_reply(), broken_json_reply())
    resp = client.request_sync("POST", "/v1/messages", body=ANTHROPIC.body())
    with pytest.raises(kf.UpstreamError):
        resp.read()
    resp = client.request_sync("POST", "/v1/messages", body=ANTHROPIC.body())
    with pytest.raises(kf.UpstreamError):
        list(resp)


# --------------------------------------------------------------------------
# Responses, stats and secrets
# --------------------------------------------------------------------------


def test_response_reading_styles(up: MockUpstream) -> None:
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    up.enqueue(Reply(headers={"content-type": "application/json"}, body=[b'{"a":', b"1}"]))

    async def scenario() -> None:
        async with await client.request("POST", "/v1/messages", body=b"{}") as resp:
            assert b"".join([chunk async for chunk in resp]) == b'{"a":1}'
            assert await resp.read() == b"", "a consumed body reads empty"
        assert resp.closed

    run(scenario())
    with client.request_sync("POST", "/v1/messages", body=ANTHROPIC.body()) as resp:
        assert json.loads(b"".join(resp))["type"] == "message"
    assert resp.closed


def test_a_responses_awaitables_work_with_asyncio_and_anext(up: MockUpstream) -> None:
    """What `__anext__`, `__aenter__` and `aclose` return is awaited like a coroutine
    whether its outcome is known at once or not: by asyncio's helpers, and by
    `anext(response, default)`, which the end of a body raised early crashed."""
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    up.enqueue(Reply.json({"a": 1}), broken_json_reply())

    async def scenario() -> None:
        resp = await client.request("POST", "/v1/messages", body=b"{}")
        assert await asyncio.ensure_future(resp.__aenter__()) is resp
        assert await asyncio.wait_for(resp.__anext__(), 5) == b'{"a":1}'
        assert await anext(resp, None) is None
        assert await anext(resp, "end") == "end", "and again"
        with pytest.raises(StopAsyncIteration):
            await resp.__anext__()
        assert await asyncio.gather(resp.aclose(), resp.aclose()) == [None, None]
        assert resp.closed

        resp = await client.request("POST", "/v1/messages", body=b"{}")
        with pytest.raises(kf.UpstreamError):  # noqa: PT012 - chunks arrive before the break
            while await anext(resp, None) is not None:
                pass

    run(scenario())


def test_a_read_cancelled_midway_loses_nothing(up: MockUpstream) -> None:
    """`wait_for(resp.read(), t)` timing out after some of the body came: the next read
    returns all of it, not silently what came after."""
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    pieces = [b'{"a":"' + b"x" * 50, b"y" * 50, b'"}']
    up.enqueue(Reply(headers={"content-type": "application/json"}, body=pieces, chunk_delay=0.3))

    async def scenario() -> None:
        resp = await client.request("POST", "/v1/messages", body=b"{}")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.read(), 0.45)
        assert await resp.read() == b"".join(pieces)

    run(scenario())


@pytest.mark.parametrize("read", ["anext", "read"])
@pytest.mark.parametrize("cut", [False, True])
def test_a_read_cancelled_as_its_wait_ends_loses_nothing(
    up: MockUpstream, read: str, cut: bool
) -> None:
    """A wait for the body cancelled in the instant its chunks arrive (the runtime
    has them, the loop has not yet run on): the next read returns them, or raises the
    break that came, and never silently goes on without them."""
    client, _ = make_client(up, ANTHROPIC.provider, 1)
    pieces = [b'{"a":"' + b"x" * 50, b"y" * 50, b'"}']
    up.enqueue(
        Reply(
            headers={"content-type": "application/json"},
            body=pieces,
            chunk_delay=0.2,
            break_after=2 if cut else None,
        )
    )

    async def scenario() -> None:
        resp = await client.request("POST", "/v1/messages", body=b"{}")
        first = await resp.__anext__()
        assert first == pieces[0]
        waiting = asyncio.ensure_future(resp.__anext__() if read == "anext" else resp.read())
        await asyncio.sleep(0)  # the wait starts
        time.sleep(0.7)  # the loop is busy while the rest of the body (or its break) arrives  # noqa: ASYNC251
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        if cut:
            with pytest.raises(kf.UpstreamError):  # noqa: PT012 - chunks come first
                rest = b""
                async for chunk in resp:
                    rest += chunk
            assert rest == pieces[1]
        else:
            assert first + await resp.read() == b"".join(pieces)

    run(scenario())


def test_stats_count_every_outcome(up: MockUpstream) -> None:
    client, pool = make_client(up, ANTHROPIC.provider, 3)
    up.set_reply(KEYS[0], ANTHROPIC.error(429, "rate_limit_error", "5"))
    up.set_reply(KEYS[1], Reply.json(QUOTA_BODIES["anthropic_spend_limit"], status=429))
    up.set_reply(KEYS[2], ANTHROPIC.error(401, "authentication_error"))

    assert run(call(client, ANTHROPIC))[0].status == 429  # 3 attempts, transient exhaustion
    assert run(call(client, ANTHROPIC))[0].status == 429  # 0 attempts
    assert run(call(client, ANTHROPIC, credential=BYOK))[0].status == 200
    pool.key("key-0").reset()
    up.enqueue(Reply(reset_before_head=True))
    assert run(call(client, ANTHROPIC))[0].status == 502
    pool.key("key-0").mark_permanent()
    pool.key("key-1").mark_permanent()
    assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 502

    assert client.stats() == {
        "requests": 5,
        "attempts": 5,
        "byok": 1,
        "rate_limited": 1,
        "quota_exhausted": 1,
        "revoked": 1,
        "unreachable": 0,
        "exhausted_transient": 2,
        "exhausted_permanent": 1,
        "upstream_errors": 1,
    }


def test_secrets_never_in_anything_the_client_produces(up: MockUpstream) -> None:
    texts: list[str] = []

    def collect(resp: kf.Response | kf.SyncResponse, body: bytes) -> None:
        texts.extend([repr(resp), repr(resp.headers), body.decode("latin-1")])

    for api in APIS:
        client, pool = make_client(up, api.provider, 3)
        texts.append(repr(client))
        up.set_reply(KEYS[0], api.error(429, api.rate_limit_type, "5"))
        up.set_reply(KEYS[1], api.error(401, api.auth_type))
        collect(*run(call(client, api)))  # failover
        up.set_reply(KEYS[2], api.error(403, "permission_error"))
        collect(*run(call(client, api, stream=True)))  # exhausted (transient)
        pool.key("key-0").mark_permanent()
        collect(*run(call(client, api)))  # exhausted (permanent)
        pool.key("key-2").reset()
        up.set_reply(KEYS[2], None)
        up.enqueue(Reply(reset_before_head=True))
        collect(*run(call(client, api)))  # connection failure
        up.enqueue(Reply.sse([("message_start", {})], break_after=1))
        collect(*run(call(client, api, stream=True)))  # broken stream: error event
        up.enqueue(broken_json_reply())
        with pytest.raises(kf.UpstreamError) as excinfo:
            client.request_sync("POST", api.path, body=api.body()).read()
        texts.extend([str(excinfo.value), repr(excinfo.value)])
        collect(*run(call(client, api, credential=BYOK)))
        texts.extend([repr(pool), repr(pool.snapshot()), repr(pool.walker())])
        texts.extend(repr(pool.key(f"key-{i}")) for i in range(3))
        down, _ = make_client(f"http://127.0.0.1:{free_port()}", api.provider, 1)
        collect(*run(call(down, api)))
        up.clear()

    produced = "\n".join(texts)
    assert "rate-limited" in produced  # sanity: the scenarios ran
    assert "failed authentication" in produced
    for secret in [*KEYS, BYOK]:
        assert secret not in produced
        assert secret[8:-4] not in produced, "not even the middle of a key"
