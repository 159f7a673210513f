"""FailoverClient with streaming (SSE) responses: failover on a key-specific first event,
relaying streams unchanged, errors before and after a stream starts, cancellation, and
`sse_error_event`.

The seed's failover table runs in streaming mode too, in test_failover.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import time
import weakref
import zlib
from typing import Any

import pytest
from conftest import (
    AUTH_FAILED,
    FAKE_KEYS,
    RATE_LIMITED,
    free_port,
    header,
    make_client,
    run,
    seen,
    states,
    until_next_month,
)

import keyfailover as kf
from keyfailover.testing import MockUpstream, Reply, anthropic_stream_events, openai_stream_chunks

KEYS = FAKE_KEYS[:2]
PROVIDERS = ["anthropic", "openai"]
PATH = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
SSE = {"content-type": "text/event-stream"}


def stream_body(provider: str) -> bytes:
    return json.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    ).encode()


def success_events(provider: str) -> list[Any]:
    if provider == "anthropic":
        return list(anthropic_stream_events())
    return [*openai_stream_chunks(), "[DONE]"]


def success_stream(provider: str, **kw: Any) -> Reply:
    return Reply.sse(success_events(provider), **kw)


def wire(reply: Reply) -> list[bytes]:
    """The body chunks the mock sends for `reply`."""
    assert isinstance(reply.body, list)
    return reply.body


def envelope(provider: str, type_: str, message: str = "upstream says no") -> dict[str, Any]:
    if provider == "anthropic":
        return {"type": "error", "error": {"type": type_, "message": message}}
    return {"error": {"message": message, "type": type_, "param": None, "code": type_}}


def error_event(provider: str, data: dict[str, Any]) -> Any:
    """An SSE error event item for Reply.sse, in the provider's style."""
    return ("error", data) if provider == "anthropic" else data


def check_error_event(provider: str, event: bytes, type_: str = "api_error") -> str:
    """Asserts `event` is one SSE error event in the provider's shape; returns its message."""
    assert event.endswith(b"\n\n")
    lines = event[:-2].decode().split("\n")
    if provider == "anthropic":
        assert lines[0] == "event: error"
        lines = lines[1:]
    assert len(lines) == 1
    assert lines[0].startswith("data: ")
    data = json.loads(lines[0][len("data: ") :])
    if provider == "anthropic":
        assert set(data) == {"type", "error"}
        assert data["type"] == "error"
        assert set(data["error"]) == {"type", "message"}
    else:
        assert set(data) == {"error"}
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["param"] is None
    assert data["error"]["type"] == type_
    message = str(data["error"]["message"])
    assert message
    assert not any(key in message for key in KEYS)
    return message


async def collect(resp: kf.Response) -> list[bytes]:
    return [chunk async for chunk in resp]


async def stream_request(client: kf.FailoverClient, provider: str) -> kf.Response:
    return await client.request(
        "POST",
        PATH[provider],
        headers={"content-type": "application/json", "accept": "text/event-stream"},
        body=stream_body(provider),
    )


# --------------------------------------------------------------------------
# A key-specific first event fails over; anything else is relayed unchanged
# --------------------------------------------------------------------------

KEY_FAILURE_EVENTS = [
    pytest.param("anthropic", envelope("anthropic", "rate_limit_error"), "temporary", 60.0,
                 "rate_limited", id="anthropic-rate_limit_error"),
    pytest.param("anthropic", envelope("anthropic", "authentication_error"), "permanent", 0.0,
                 "revoked", id="anthropic-authentication_error"),
    pytest.param("anthropic", envelope("anthropic", "permission_error"), "permanent", 0.0,
                 "revoked", id="anthropic-permission_error"),
    pytest.param("anthropic",
                 {"type": "error", "error": {"type": "rate_limit_error", "message": "cap",
                                             "details": {"error_code":
                                                         "enforced_spend_limit_reached"}}},
                 "temporary", None, "quota_exhausted", id="anthropic-spend_limit"),
    pytest.param("openai",
                 {"error": {"message": "x", "type": "requests", "param": None,
                            "code": "rate_limit_exceeded"}},
                 "temporary", 60.0, "rate_limited", id="openai-rate_limit_exceeded"),
    pytest.param("openai", envelope("openai", "insufficient_quota"), "temporary", 3600.0,
                 "quota_exhausted", id="openai-insufficient_quota"),
    pytest.param("openai",
                 {"error": {"message": "x", "type": "invalid_request_error", "param": None,
                            "code": "invalid_api_key"}},
                 "permanent", 0.0, "revoked", id="openai-invalid_api_key"),
]  # fmt: skip


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize(("provider", "data", "state", "cooldown", "reason"), KEY_FAILURE_EVENTS)
def test_key_specific_first_event_fails_over(
    up: MockUpstream,
    provider: str,
    data: dict[str, Any],
    state: str,
    cooldown: float | None,
    reason: str,
    sync: bool,
) -> None:
    client, pool = make_client(up, provider)
    up.set_reply(KEYS[0], Reply.sse([error_event(provider, data)]))
    good = success_stream(provider)
    up.set_reply(KEYS[1], good)

    async def scenario() -> tuple[kf.Response, bytes]:
        resp = await stream_request(client, provider)
        return resp, b"".join(await collect(resp))

    if sync:
        resp = client.request_sync("POST", PATH[provider], body=stream_body(provider))
        body = b"".join(resp)
    else:
        resp, body = run(scenario())

    assert (resp.status, resp.attempts, resp.key_label) == (200, 2, "key-1")
    assert header(resp, "content-type") == "text/event-stream"
    assert body == b"".join(wire(good)), "key-1's stream, complete and unchanged"
    assert json.dumps(data, separators=(",", ":")).encode() not in body
    assert seen(up) == ["key-0", "key-1"]
    assert states(pool) == [state, "valid"]
    expected = until_next_month() if cooldown is None else cooldown  # None: a spend limit
    assert pool.key("key-0").cooldown_remaining == pytest.approx(expected, abs=5)
    assert client.stats()[reason] == 1


RATE_LIMIT_EVENT = (
    b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":"x"}}\n\n'
)


@pytest.mark.parametrize(
    ("reply", "cooldown"),
    [
        pytest.param(Reply(headers=SSE, body=[b": ping\n\n", RATE_LIMIT_EVENT]), 60.0,
                     id="after_a_comment"),
        pytest.param(Reply(headers=SSE, body=[RATE_LIMIT_EVENT[:30], RATE_LIMIT_EVENT[30:]],
                           chunk_delay=0.05), 60.0, id="split_across_chunks"),
        pytest.param(Reply(headers=SSE, body=[RATE_LIMIT_EVENT.replace(b"\n", b"\r\n")]), 60.0,
                     id="crlf"),
        pytest.param(Reply(headers={**SSE, "retry-after": "7"}, body=[RATE_LIMIT_EVENT]), 7.0,
                     id="retry_after_on_the_head"),
    ],
)  # fmt: skip
def test_first_event_framing(up: MockUpstream, reply: Reply, cooldown: float) -> None:
    client, pool = make_client(up, "anthropic")
    up.set_reply(KEYS[0], reply)
    resp = run(stream_request(client, "anthropic"))
    assert (resp.status, resp.key_label) == (200, "key-1")
    assert pool.key("key-0").state == kf.KeyState.TEMPORARY
    assert pool.key("key-0").cooldown_remaining == pytest.approx(cooldown)


NON_KEY_ERRORS = [
    pytest.param("anthropic", envelope("anthropic", "overloaded_error"), id="anthropic-overloaded"),
    pytest.param("anthropic", envelope("anthropic", "api_error"), id="anthropic-api_error"),
    pytest.param("openai", envelope("openai", "server_error"), id="openai-server_error"),
    pytest.param("openai", {"error": {"message": "x", "type": "invalid_request_error",
                                      "param": "model", "code": "model_not_found"}},
                 id="openai-model_not_found"),
]  # fmt: skip


@pytest.mark.parametrize(("provider", "data"), NON_KEY_ERRORS)
def test_non_key_error_event_relayed_unchanged(
    up: MockUpstream, provider: str, data: dict[str, Any]
) -> None:
    client, pool = make_client(up, provider)
    reply = Reply.sse([error_event(provider, data), *success_events(provider)[:2]])
    up.set_reply(KEYS[0], reply)

    async def scenario() -> tuple[kf.Response, list[bytes]]:
        resp = await stream_request(client, provider)
        return resp, await collect(resp)

    resp, chunks = run(scenario())
    assert (resp.status, resp.attempts, resp.key_label) == (200, 1, "key-0")
    assert b"".join(chunks) == b"".join(wire(reply))
    assert chunks[0].startswith(wire(reply)[0]), "the peeked event comes first, unchanged"
    assert states(pool) == ["valid", "valid"]
    assert client.stats()["attempts"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_key_echoed_in_a_streams_first_error_event_is_replaced_by_its_hint(
    up: MockUpstream, provider: str
) -> None:
    """An error event that is not the key's is relayed, with any of the pool's keys in it
    replaced by its hint, as in an error body; so are the stream's later events."""
    client, pool = make_client(up, provider)
    echoed = envelope(provider, "overloaded_error", f"busy, key {KEYS[0]} and {KEYS[1]}")
    reply = Reply.sse([error_event(provider, echoed), error_event(provider, echoed)])
    up.set_reply(KEYS[0], reply)

    async def scenario() -> bytes:
        return b"".join(await collect(await stream_request(client, provider)))

    body = run(scenario())
    hints = [key["hint"] for key in pool.snapshot()]
    expected = b"".join(wire(reply))
    for key, hint in zip(KEYS, hints, strict=True):
        expected = expected.replace(key.encode(), hint.encode())
    assert body == expected
    assert not any(key.encode() in body for key in KEYS)


def test_stream_relayed_byte_for_byte_in_whole_events(up: MockUpstream) -> None:
    """Comments, CRLF and events split across network chunks all pass through unchanged."""
    client, _ = make_client(up, "anthropic", 1)
    events = [b": ping\r\n\r\n", *wire(success_stream("anthropic"))]
    events[2] = events[2].replace(b"\n", b"\r\n")
    sent = [events[0], events[1][:7], events[1][7:] + events[2][:5], events[2][5:], *events[3:]]
    up.enqueue(Reply(headers=SSE, body=sent, chunk_delay=0.01))

    async def scenario() -> list[bytes]:
        return await collect(await stream_request(client, "anthropic"))

    chunks = run(scenario())
    assert b"".join(chunks) == b"".join(events)
    assert all(chunk.endswith((b"\n\n", b"\r\n\r\n")) for chunk in chunks), "whole events only"


def test_stream_is_relayed_as_it_arrives(up: MockUpstream) -> None:
    client, _ = make_client(up, "openai", 1)
    up.enqueue(success_stream("openai", chunk_delay=0.15))  # 6 events: >= 0.75 s in all

    async def scenario() -> tuple[float, float]:
        start = time.monotonic()
        resp = await stream_request(client, "openai")
        await resp.__anext__()
        first = time.monotonic() - start
        await resp.read()
        return first, time.monotonic() - start

    first, total = run(scenario())
    assert total >= 0.7
    assert first < 0.5, "the first event is not held back until the stream ends"


# --------------------------------------------------------------------------
# Errors before the stream starts: plain HTTP, never an SSE event with status 200
# --------------------------------------------------------------------------


PRE_STREAM = [
    # name, reply for key-0 (None: upstream unreachable), status, error type, exhausted, state
    ("stalled_before_first_event", Reply(headers=SSE, body=[b"", b"data: {}\n\n"], chunk_delay=5),
     504, "timeout_error", False, "valid"),
    ("broken_before_first_event", Reply.sse([("message_start", {})], break_after=0), 502,
     "api_error", False, "valid"),
    ("head_stalled", Reply(stall=5), 504, "timeout_error", False, "valid"),
    ("connection_refused", None, 502, "api_error", False, "valid"),
    ("upstream_400", Reply.error(400, "invalid_request_error", "bad"), 400,
     "invalid_request_error", False, "valid"),
    ("upstream_529", Reply.error(529, "overloaded_error", "busy"), 529, "overloaded_error", False,
     "valid"),
    ("all_keys_rate_limited",
     Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "4"}), 429,
     "rate_limit_error", True, "temporary"),
    ("all_keys_revoked", Reply.error(401, "authentication_error", "bad key"), 502, "api_error",
     True, "permanent"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "status", "type_", "exhausted", "state"),
    [pytest.param(*case[1:], id=case[0]) for case in PRE_STREAM],
)
def test_pre_stream_errors_are_plain_http(
    up: MockUpstream, reply: Reply | None, status: int, type_: str, exhausted: bool, state: str
) -> None:
    base_url = up.url if reply is not None else f"http://127.0.0.1:{free_port()}"
    client, pool = make_client(base_url, "anthropic", 1, timeout=0.3)
    if reply is not None:
        up.set_reply(KEYS[0], reply)

    async def scenario() -> tuple[kf.Response, bytes, float]:
        start = time.monotonic()
        resp = await stream_request(client, "anthropic")
        elapsed = time.monotonic() - start
        return resp, await resp.read(), elapsed

    resp, body, elapsed = run(scenario())
    assert elapsed < 2
    assert resp.status == status
    assert header(resp, "content-type") == "application/json"
    assert not body.startswith((b"event:", b"data:"))
    assert json.loads(body)["error"]["type"] == type_
    assert resp.exhausted is exhausted
    assert header(resp, "retry-after") == ("4" if status == 429 else None)
    assert states(pool) == [state]


# --------------------------------------------------------------------------
# A stream broken after it started ends with one error event
# --------------------------------------------------------------------------


def broken_stream(provider: str, mid_event: bool) -> tuple[Reply, bytes]:
    """A stream that breaks after two whole events (and, if `mid_event`, half a third)."""
    events = wire(success_stream(provider))
    relayed = b"".join(events[:2])
    sent = [*events[:2], events[2][:12], events[2][12:]] if mid_event else events
    reply = Reply(headers=SSE, body=sent, break_after=3 if mid_event else 2, chunk_delay=0.01)
    return reply, relayed


@pytest.mark.parametrize("how", ["async_iter", "async_read", "sync_iter", "sync_read"])
@pytest.mark.parametrize("mid_event", [False, True], ids=["at_event_boundary", "mid_event"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_broken_stream_ends_with_an_error_event(
    up: MockUpstream, provider: str, mid_event: bool, how: str
) -> None:
    client, pool = make_client(up, provider, 1)
    reply, relayed = broken_stream(provider, mid_event)
    up.enqueue(reply)

    if how.startswith("sync"):
        sresp = client.request_sync("POST", PATH[provider], body=stream_body(provider))
        assert sresp.status == 200
        body = sresp.read() if how == "sync_read" else b"".join(sresp)
    else:

        async def scenario() -> bytes:
            resp = await stream_request(client, provider)
            assert resp.status == 200
            if how == "async_read":
                return await resp.read()
            return b"".join(await collect(resp))

        body = run(scenario())

    assert body.startswith(relayed)
    event = body[len(relayed) :]
    message = check_error_event(provider, event)  # one event, nothing after it
    assert "broke" in message
    assert states(pool) == ["valid"]


def test_nothing_after_the_final_error_event(up: MockUpstream) -> None:
    client, _ = make_client(up, "openai", 1)
    reply, relayed = broken_stream("openai", mid_event=False)
    up.enqueue(reply)

    async def scenario() -> bytes:
        resp = await stream_request(client, "openai")
        body = b"".join(await collect(resp))
        assert await collect(resp) == [], "iteration stays ended"
        assert await resp.read() == b""
        return body

    body = run(scenario())
    assert body.startswith(relayed)
    check_error_event("openai", body[len(relayed) :])


def responses_api_events(end: str | None) -> list[Any]:
    """A Responses API stream (`POST /v1/responses`): named events, no `[DONE]`; ending
    with `end` (one of its final events) or, for None, cut before it."""
    events: list[Any] = [
        ("response.created", {"type": "response.created", "sequence_number": 0}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
    ]
    if end is not None:
        events.append((end, {"type": end, "sequence_number": 2}))
    return events


@pytest.mark.parametrize("end", ["response.completed", "response.incomplete", "response.failed"])
def test_a_responses_api_stream_ends_with_its_own_final_event(up: MockUpstream, end: str) -> None:
    """Close-delimited, where only the final event tells a whole stream from a cut one:
    the Responses API's own ends count, with no `[DONE]` after them."""
    client, _ = make_client(up, "openai", 1)
    whole = Reply.sse(responses_api_events(end), framing="close")
    up.enqueue(whole)
    up.enqueue(Reply.sse(responses_api_events(None), framing="close"))

    async def scenario() -> bytes:
        resp = await client.request("POST", "/v1/responses", body=stream_body("openai"))
        return b"".join(await collect(resp))

    assert run(scenario()) == b"".join(wire(whole))
    cut = run(scenario())
    assert cut.startswith(b"".join(wire(whole)[:2]))
    message = check_error_event("openai", cut[len(b"".join(wire(whole)[:2])) :])
    assert "before its final event" in message


# --------------------------------------------------------------------------
# A stream upstream content-coded although asked for identity
# --------------------------------------------------------------------------


def coded(reply: Reply, coding: str, garbage_at: int | None = None) -> Reply:
    """`reply` with its body chunks in `coding`, flushed after each (as a server coding
    a stream does), and a Content-Encoding header saying so; with `garbage_at`, that
    chunk is bytes that do not decode."""
    compressor = zlib.compressobj(wbits={"gzip": 31, "deflate": 15}[coding])
    chunks = [compressor.compress(c) + compressor.flush(zlib.Z_SYNC_FLUSH) for c in wire(reply)]
    chunks[-1] += compressor.flush()
    if garbage_at is not None:
        chunks[garbage_at] = b"\xff not the coding at all \xff"
    headers = [*dict(reply.headers).items(), ("content-encoding", coding)]
    return dataclasses.replace(reply, body=chunks, headers=headers)


async def read_stream(client: kf.FailoverClient, provider: str) -> tuple[kf.Response, bytes]:
    resp = await stream_request(client, provider)
    chunks = await collect(resp)
    assert all(chunk.endswith(b"\n\n") for chunk in chunks), "whole events only"
    return resp, b"".join(chunks)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_coded_stream_is_relayed_decoded_in_whole_events(
    up: MockUpstream, provider: str, coding: str
) -> None:
    client, pool = make_client(up, provider, 1)
    plain = success_stream(provider)
    up.enqueue(coded(plain, coding))
    resp, body = run(read_stream(client, provider))
    assert resp.status == 200
    assert body == b"".join(wire(plain))
    assert header(resp, "content-encoding") is None
    assert header(resp, "content-length") is None
    assert header(resp, "content-type") == "text/event-stream"
    assert states(pool) == ["valid"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_coded_first_event_that_is_a_key_failure_fails_over(
    up: MockUpstream, provider: str
) -> None:
    client, pool = make_client(up, provider)
    failure = Reply.sse([error_event(provider, envelope(provider, "rate_limit_error"))])
    up.set_reply(KEYS[0], coded(failure, "gzip"))
    good = success_stream(provider)
    up.set_reply(KEYS[1], good)
    resp, body = run(read_stream(client, provider))
    assert (resp.status, body) == (200, b"".join(wire(good)))
    assert seen(up) == ["key-0", "key-1"]
    assert states(pool) == ["temporary", "valid"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_coded_stream_cut_short_ends_with_an_error_event(up: MockUpstream, provider: str) -> None:
    client, _ = make_client(up, provider, 1)
    plain = success_stream(provider, break_after=3)
    up.enqueue(coded(plain, "gzip"))
    resp, body = run(read_stream(client, provider))
    assert resp.status == 200
    relayed = b"".join(wire(plain)[:3])
    assert body.startswith(relayed)
    assert "broke" in check_error_event(provider, body[len(relayed) :])


@pytest.mark.parametrize("garbage_at", [0, 2])
def test_a_coded_stream_that_does_not_decode_ends_with_an_error_event(
    up: MockUpstream, garbage_at: int
) -> None:
    client, pool = make_client(up, "anthropic", 1)
    plain = success_stream("anthropic")
    up.enqueue(coded(plain, "gzip", garbage_at=garbage_at))
    resp, body = run(read_stream(client, "anthropic"))
    assert resp.status == 200
    relayed = b"".join(wire(plain)[:garbage_at])
    assert body.startswith(relayed)
    message = check_error_event("anthropic", body[len(relayed) :])
    assert "gzip body does not decode" in message
    assert states(pool) == ["valid"]  # the coding says nothing about the key


def test_a_stream_in_a_coding_it_cannot_read_is_relayed_as_it_came(up: MockUpstream) -> None:
    """Brotli is not taken apart: the bytes and the header go through unread (as events
    they cannot be checked, nor ended with an error event)."""
    client, _ = make_client(up, "anthropic", 1)
    sent = [b"\x8b\x01\x80opaque", b"\n\n\x03 more", b"\x00 end"]
    up.enqueue(Reply(headers={**SSE, "content-encoding": "br"}, body=sent, chunk_delay=0.01))

    async def scenario() -> tuple[kf.Response, bytes]:
        resp = await stream_request(client, "anthropic")
        return resp, b"".join(await collect(resp))

    resp, body = run(scenario())
    assert (resp.status, body) == (200, b"".join(sent))
    assert header(resp, "content-encoding") == "br"


# --------------------------------------------------------------------------
# The agentic continuation, streaming
# --------------------------------------------------------------------------


def tool_use_stream(provider: str) -> Reply:
    if provider == "anthropic":
        start = anthropic_stream_events()[0]
        return Reply.sse(
            [
                start,
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "tool_use", "id": "toolu_01",
                                                           "name": "get_weather", "input": {}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "input_json_delta",
                                                   "partial_json": '{"city":"Paris"}'}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                   "usage": {"output_tokens": 5}}),
                ("message_stop", {"type": "message_stop"}),
            ]
        )  # fmt: skip
    first, *_, last = openai_stream_chunks("")
    first["choices"][0]["delta"] = {
        "role": "assistant",
        "tool_calls": [{"index": 0, "id": "call_01", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
    }  # fmt: skip
    last["choices"][0]["finish_reason"] = "tool_calls"
    return Reply.sse([first, last, "[DONE]"])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("continuation_429s", "seen_keys", "final_states"),
    [
        pytest.param([], ["key-0", "key-0"], ["valid", "valid"], id="happy_path"),
        pytest.param(["5"], ["key-0", "key-0", "key-1"], ["temporary", "valid"],
                     id="agentic_failover_to_k1"),
        pytest.param(["5", "3"], ["key-0", "key-0", "key-1"], ["temporary", "temporary"],
                     id="agentic_all_keys_fail"),
    ],
)  # fmt: skip
def test_agentic_continuation_streaming(
    up: MockUpstream,
    provider: str,
    continuation_429s: list[str],
    seen_keys: list[str],
    final_states: list[str],
) -> None:
    client, pool = make_client(up, provider)
    up.enqueue(tool_use_stream(provider))
    rate_type = "rate_limit_error" if provider == "anthropic" else "rate_limit_exceeded"
    up.enqueue(
        *(
            Reply.error(429, rate_type, "slow", provider=provider, headers={"retry-after": ra})
            for ra in continuation_429s
        )
    )

    async def scenario() -> tuple[bytes, kf.Response, bytes]:
        first = await stream_request(client, provider)
        tool_turn = await first.read()
        assert (first.status, first.key_label) == (200, "key-0")
        second = await stream_request(client, provider)  # the continuation: its own walker
        return tool_turn, second, await second.read()

    tool_turn, resp, body = run(scenario())
    assert b"get_weather" in tool_turn
    assert seen(up) == seen_keys
    assert states(pool) == final_states
    if len(continuation_429s) < 2:
        assert (resp.status, resp.key_label) == (200, seen_keys[-1])
        assert body.endswith(wire(success_stream(provider))[-1])
        return

    # The pool is exhausted before the continuation's stream started: plain HTTP 429.
    assert (resp.status, resp.exhausted) == (429, True)
    assert header(resp, "retry-after") == "3"
    assert json.loads(body)["error"]["message"] == RATE_LIMITED
    # A gateway already streaming the tool loop to its caller ends that stream with:
    event = kf.sse_error_event(kf.TransientExhaustion(3.0), provider=provider)
    assert check_error_event(provider, event, "rate_limit_error") == RATE_LIMITED


# --------------------------------------------------------------------------
# Cancellation closes the upstream connection at once
# --------------------------------------------------------------------------


def slow_stream() -> Reply:
    return Reply.sse([("ping", {"i": i}) for i in range(100)], chunk_delay=0.1)


async def disconnected(up: MockUpstream) -> bool:
    """Whether upstream saw the last request's connection close within a second."""
    return await up.wait_for_async(lambda u: u.requests[-1].disconnected, timeout=1)


@pytest.mark.parametrize("how", ["aclose", "async_with", "drop"])
def test_closing_a_stream_disconnects_upstream(up: MockUpstream, how: str) -> None:
    client, _ = make_client(up, "anthropic", 1)
    up.enqueue(slow_stream())

    async def scenario() -> None:
        resp = await stream_request(client, "anthropic")
        if how == "async_with":
            async with resp:
                assert (await resp.__anext__()).startswith(b"event: ping")
        else:
            assert (await resp.__anext__()).startswith(b"event: ping")
        if how == "aclose":
            await resp.aclose()
        if how != "drop":
            assert resp.closed
            assert await collect(resp) == [], "a closed response yields nothing more"
            assert await resp.read() == b""
        del resp
        gc.collect()
        assert await disconnected(up)
        assert not up.requests[-1].completed

    run(scenario())


def test_dropping_an_unread_stream_disconnects_upstream(up: MockUpstream) -> None:
    client, _ = make_client(up, "openai", 1)
    up.enqueue(slow_stream())

    async def scenario() -> None:
        resp = await stream_request(client, "openai")
        assert resp.status == 200
        del resp
        assert await disconnected(up)

    run(scenario())


def test_close_wakes_a_task_waiting_for_a_chunk(up: MockUpstream) -> None:
    client, _ = make_client(up, "anthropic", 1)
    up.enqueue(Reply(headers=SSE, body=[b"data: 1\n\n", b"data: 2\n\n"], chunk_delay=30))

    async def scenario() -> None:
        resp = await stream_request(client, "anthropic")
        assert await resp.__anext__() == b"data: 1\n\n"
        reader = asyncio.ensure_future(collect(resp))
        await asyncio.sleep(0.05)
        assert not reader.done()
        await resp.aclose()
        assert await asyncio.wait_for(reader, 1) == []
        assert await disconnected(up)

    run(scenario())


@pytest.mark.parametrize("how", ["cancel", "wait_for"])
def test_cancelling_a_pending_request_disconnects_upstream(up: MockUpstream, how: str) -> None:
    client, pool = make_client(up, "anthropic", 1)
    up.enqueue(Reply(stall=30))

    async def scenario() -> None:
        if how == "cancel":
            task = asyncio.ensure_future(stream_request(client, "anthropic"))
            assert await up.wait_for_async(lambda u: len(u.requests) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream_request(client, "anthropic"), 0.2)
        assert await disconnected(up)

    run(scenario())
    assert states(pool) == ["valid"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_request_left_pending_when_its_loop_closes_disconnects_upstream(
    up: MockUpstream, loop: str
) -> None:
    """`asyncio.run` cancels the tasks left when its coroutine returns, not futures: a
    request left pending (as the loser of `asyncio.wait(..., FIRST_COMPLETED)` is)
    outlives its loop. Its answer, when it comes, is dropped at once (the upstream sees
    the connection close), and the loop is freed with its descriptors, not held by a
    queue that nothing will take from again."""
    import uvloop

    client, pool = make_client(up, "anthropic", 1)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def leave_a_request_pending() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        client.request(
            "POST",
            PATH["anthropic"],
            headers={"content-type": "application/json", "accept": "text/event-stream"},
            body=stream_body("anthropic"),
        )
        assert await up.wait_for_async(lambda u: len(u.requests) == len(loops))

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    run_loop = asyncio.run if loop == "asyncio" else uvloop.run
    run_loop(leave_a_request_pending())  # the runtime's threads and first sockets
    assert up.wait_for(lambda u: u.requests[0].completed or u.requests[0].disconnected)
    gc.collect()
    before = descriptors()
    for _ in range(3):
        up.enqueue(Reply.sse([("ping", {"i": i}) for i in range(100)], stall=0.2, chunk_delay=0.1))
        run_loop(leave_a_request_pending())
    # Each answer came after its loop had closed (the stall), and was dropped.
    assert up.wait_for(lambda u: all(r.disconnected for r in u.requests[1:]), timeout=5)
    assert not any(r.completed for r in up.requests[1:])
    # A reference that a tokio thread let go of is let go of in Python at the next call
    # into keyfailover (pyo3 defers it to a thread holding the GIL).
    assert states(pool) == ["valid"]
    gc.collect()
    assert [ref() for ref in loops] == [None] * 4
    assert descriptors() <= before
    assert pool.snapshot()[0]["in_flight"] == 0


@pytest.mark.parametrize("how", ["close", "with", "drop"])
def test_closing_a_sync_stream_disconnects_upstream(up: MockUpstream, how: str) -> None:
    client, _ = make_client(up, "openai", 1)
    up.enqueue(slow_stream())
    resp = client.request_sync("POST", PATH["openai"], body=stream_body("openai"))
    if how == "with":
        with resp:
            assert next(resp).startswith(b"event: ping")
    else:
        assert next(resp).startswith(b"event: ping")
    if how == "close":
        resp.close()
    if how != "drop":
        assert resp.closed
        assert list(resp) == []
    del resp
    assert up.wait_for(lambda u: u.requests[-1].disconnected, timeout=1)


# --------------------------------------------------------------------------
# sse_error_event
# --------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    ("error", "type_", "message"),
    [
        (kf.TransientExhaustion(3.0), "rate_limit_error", RATE_LIMITED),
        (kf.TransientExhaustion(0.0), "rate_limit_error", RATE_LIMITED),
        (kf.PermanentExhaustion(), "api_error", AUTH_FAILED),
        (kf.UpstreamError("upstream stream broke"), "api_error", "upstream stream broke"),
        (kf.UpstreamError('a "quoted"\nmessage'), "api_error", 'a "quoted"\nmessage'),
    ],
    ids=["transient", "transient_zero", "permanent", "upstream", "upstream_escaped"],
)
def test_sse_error_event(provider: str, error: Exception, type_: str, message: str) -> None:
    event = kf.sse_error_event(error, provider=provider)
    assert isinstance(event, bytes)
    assert check_error_event(provider, event, type_) == message
    prefix = b"event: error\ndata: {" if provider == "anthropic" else b'data: {"error":{'
    assert event.startswith(prefix)


def test_sse_error_event_rejects_other_errors() -> None:
    with pytest.raises(TypeError):
        kf.sse_error_event(ValueError("not ours"), provider="anthropic")
    with pytest.raises(kf.ConfigError, match="provider"):
        kf.sse_error_event(kf.PermanentExhaustion(), provider="azure")
