"""The fault matrix: what a caller sees when upstream (or, for the proxy, the caller itself)
misbehaves, through each front end:

- ``async``: ``await client.request(...)``, then the body read chunk by chunk;
- ``sync``: ``client.request_sync(...)``, then the same;
- ``proxy``: ``FailoverProxy`` under uvicorn (``serve_asgi``) and on the native server
  (``serve_native``), driven by httpx.

Each row of UPSTREAM_FAULTS runs through all three front ends. What is checked is what a
user would check: the status; that the body is whole, ends with the provider's SSE error
event, or breaks visibly (an exception; through the proxy, an HTTP protocol error), so that
a broken body never looks complete; that nothing waits past the configured timeouts; that no
pool key shows in anything produced (bodies, headers, exception messages, reprs, log
records); and which keys got marked. The client-side faults (proxy only) follow the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import pytest
from conftest import FAKE_KEYS, free_port, make_client, run, states

import keyfailover as kf
from keyfailover import _logging
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
HINTS = {key: kf.KeyPool([key]).key("key-0").hint for key in KEYS}
FRONT_ENDS = ("async", "sync", "proxy", "native")
PATH = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}

TIMEOUT = 1.0  # the client's timeout in most rows: small, so that a hang shows
STALL = 10.0  # how long a stalling upstream stalls: far past TIMEOUT
QUICK = 2.0  # seconds a fault answered at once may take, on a busy machine
BOUNDED = TIMEOUT + 2.0  # seconds a fault bounded by TIMEOUT may take

# --------------------------------------------------------------------------
# What upstream sends
# --------------------------------------------------------------------------

JSON_BODY = json.dumps(anthropic_message("many words " * 200), separators=(",", ":")).encode()
JSON_TYPE = {"content-type": "application/json"}
EVENTS: dict[str, list[Any]] = {
    "anthropic": list(anthropic_stream_events("one two three four")),
    "openai": [*openai_stream_chunks("one two three four"), "[DONE]"],
}
STEADY_EVENTS = anthropic_stream_events("one")  # six events
# The last event of a complete stream.
FINAL_EVENT = {
    "anthropic": b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    "openai": b"data: [DONE]\n\n",
}


def json_reply(**faults: Any) -> Reply:
    """A 2.4 KB Messages response, sent with Content-Length unless `faults` say otherwise."""
    return Reply(headers=JSON_TYPE, body=JSON_BODY, **faults)


def chunked_json_reply(**faults: Any) -> Reply:
    """The same body in two chunks."""
    return Reply(headers=JSON_TYPE, body=[JSON_BODY[:50], JSON_BODY[50:]], **faults)


def sse_reply(provider: str = "anthropic", **faults: Any) -> Reply:
    """A complete stream of the provider's events, one chunk per event."""
    return Reply.sse(EVENTS[provider], **faults)


def sse_bytes(events: int, provider: str = "anthropic") -> int:
    """The length of the first `events` events on the wire."""
    return sum(map(len, sse_reply(provider).body[:events]))


def raw_head(status_line: bytes, *headers: bytes, body: bytes = b"{}") -> bytes:
    """A whole response as raw bytes, with a JSON body."""
    lines = [status_line, b"content-type: application/json", *headers]
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def sent_body(reply: Reply) -> bytes:
    return reply.body if isinstance(reply.body, bytes) else b"".join(reply.body)


def echo_keys(split: bool) -> Reply:
    """A 400 whose body names both pool keys (as some providers echo a bad key); `split`:
    in two chunks (so without content-length), cut in the middle of a key."""
    message = f"invalid key {KEYS[0]}, also tried {KEYS[1]}"
    body = sent_body(Reply.error(400, "invalid_request_error", message))
    if not split:
        return Reply(status=400, headers=JSON_TYPE, body=body)
    cut = body.index(KEYS[0].encode()) + 10
    return Reply(status=400, headers=JSON_TYPE, body=[body[:cut], body[cut:]], chunk_delay=0.05)


def scrubbed(reply: Reply) -> bytes:
    body = sent_body(reply)
    for key, hint in HINTS.items():
        body = body.replace(key.encode(), hint.encode())
    return body


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

# How the body the caller gets ends.
WHOLE = "whole"  # upstream's answer relayed, complete (and `body` if given)
ENVELOPE = "envelope"  # an error of keyfailover's own, in the provider's envelope
BROKEN = "broken"  # the head, then a body that breaks visibly
SSE_ERROR = "sse_error"  # a 200 stream ending with the provider's SSE error event


@dataclass(frozen=True)
class Case:
    id: str
    replies: tuple[Reply, ...]  # queued: one per upstream request
    status: int
    ends: str
    error_type: str = ""  # ENVELOPE: its error type
    cause: str = ""  # ENVELOPE: a phrase of its message (lowercase)
    body: bytes | None = None  # WHOLE: the body expected (default: the last reply's)
    headers: tuple[tuple[str, str], ...] = ()  # WHOLE: response headers expected as they are
    stream: bool = False  # the request asks for a stream
    provider: str = "anthropic"
    attempts: int = 1
    # The pool's snapshot after the request: (state, cooldown_remaining) of key-0 and key-1.
    keys: tuple[tuple[str, float], ...] = (("valid", 0.0), ("valid", 0.0))
    dropped: tuple[int, ...] = ()  # upstream requests the client must hang up on
    timeout: float = TIMEOUT
    within: float = QUICK  # seconds the whole exchange may take
    refused: bool = False  # nothing listens upstream
    # The proxy's caller is an httpx that takes heads over its default 100 KB.
    big_head_client: bool = False
    xfail: dict[str, str] = field(default_factory=dict)  # front end -> known defect


def envelope(case_id: str, *replies: Reply, status: int = 502, **kw: Any) -> Case:
    """keyfailover's own error instead of a response: 502 `api_error` unless told."""
    kw.setdefault("error_type", "api_error")
    return Case(case_id, replies, status, ENVELOPE, **kw)


def timed_out(case_id: str, *replies: Reply, **kw: Any) -> Case:
    """No head (or, for a stream, no first event) within the timeout: 504, soon after it."""
    kw.setdefault("dropped", (len(replies) - 1,))
    return envelope(case_id, *replies, status=504, error_type="timeout_error", within=BOUNDED, **kw)


def whole(case_id: str, *replies: Reply, status: int = 200, **kw: Any) -> Case:
    return Case(case_id, replies, status, WHOLE, **kw)


def broken(case_id: str, *replies: Reply, **kw: Any) -> Case:
    return Case(case_id, replies, 200, BROKEN, **kw)


def sse_error(case_id: str, *replies: Reply, **kw: Any) -> Case:
    return Case(case_id, replies, 200, SSE_ERROR, stream=True, **kw)


STALLING_HEAD = Reply(stall=STALL)
HUGE_HEAD_200K = raw_head(
    b"HTTP/1.1 200 OK", *(b"x-big-%d: %s" % (i, b"v" * 4000) for i in range(50))
)
HUGE_HEAD_1M = raw_head(b"HTTP/1.1 200 OK", b"x-big: " + b"v" * 1_000_000)
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n"
# RFC 9112, section 6.3: the chunked framing wins, and the wrong length must not be relayed.
LENGTH_BESIDE_CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 3\r\n"
    b'transfer-encoding: chunked\r\n\r\ne\r\n{"text":"abc"}\r\n0\r\n\r\n'
)
SLOW_429 = Reply.error(429, "rate_limit_error", "slow down " * 10, trickle=0.5)
REVOKED = Reply.error(401, "authentication_error", "invalid x-api-key")
RATE_LIMITED_7S = Reply.error(429, "rate_limit_error", "slow down", headers={"retry-after": "7"})
COOLING_7S = (("temporary", 7.0), ("valid", 0.0))

UPSTREAM_FAULTS = [
    # ---- no usable response head: 502 or 504, nothing marked, no failover
    envelope("connection_refused", refused=True, cause="refused"),
    envelope("reset_before_head", Reply(reset_before_head=True), cause="reset"),
    envelope("reset_before_head_openai", Reply(reset_before_head=True), provider="openai"),
    envelope("close_before_head", Reply.raw(b""), cause="closed"),
    envelope("garbage_instead_of_a_response", Reply.raw(b"\x00\xffnot HTTP at all\r\n\r\n")),
    timed_out("stall_before_head", STALLING_HEAD, cause=f"within {TIMEOUT:g} s"),
    # A stream whose first event does not come: nothing reached the caller yet, a plain 504.
    timed_out("stall_before_first_event", sse_reply(stall_body=STALL), stream=True),
    envelope("sse_bad_chunk_before_first_event", sse_reply(bad_chunk_at=0), stream=True),
    envelope("huge_headers_1m", Reply.raw(HUGE_HEAD_1M), cause="too large"),
    # ---- odd heads: statuses outside 200..599 are 502; a 1xx before the final head is HTTP
    envelope("status_999", Reply.raw(raw_head(b"HTTP/1.1 999 Weird", body=b"ok")), cause="999"),
    envelope("status_101_unasked", Reply.raw(SWITCHING), cause="101"),
    envelope("status_100_then_close", Reply.raw(b"HTTP/1.1 100 Continue\r\n\r\n")),
    whole("status_103_then_200", Reply.raw(EARLY_HINTS + raw_head(b"HTTP/1.1 200 OK")), body=b"{}"),
    # The proxy relays a 200 KB head as it is; httpx takes heads up to 100 KB unless told.
    whole(
        "huge_headers_200k",
        Reply.raw(HUGE_HEAD_200K),
        body=b"{}",
        headers=(("x-big-49", "v" * 4000),),
        big_head_client=True,
    ),
    whole("length_beside_chunked", Reply.raw(LENGTH_BESIDE_CHUNKED), body=b'{"text":"abc"}'),
    whole(
        "no_content_with_a_length",
        Reply.raw(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"),
        status=204,
        body=b"",
    ),
    whole(
        "redirect_relayed_not_followed",  # followed, upstream would see a second request
        Reply.json({"moved": True}, status=302, headers={"location": "/v1/elsewhere"}),
        status=302,
        headers=(("location", "/v1/elsewhere"),),
    ),
    # ---- a JSON body that breaks after the head: never a clean short body
    # A body that breaks before its first byte: nothing reached the caller, a plain 502.
    envelope("json_length_cut_before_first_byte", json_reply(break_after_bytes=0), cause="body"),
    envelope(
        "json_chunked_cut_before_first_byte",
        json_reply(framing="chunked", break_after_bytes=0),
        cause="body",
    ),
    envelope("json_bad_first_chunk", chunked_json_reply(bad_chunk_at=0), cause="body"),
    broken("json_length_cut", json_reply(break_after_bytes=100)),
    broken("json_chunked_cut", json_reply(framing="chunked", break_after_bytes=100)),
    broken(
        "json_chunked_without_last_chunk",
        json_reply(framing="chunked", break_after_bytes=len(JSON_BODY)),
    ),
    broken("json_bad_chunk", chunked_json_reply(bad_chunk_at=1)),
    broken(
        "json_stall_mid_body",
        json_reply(stall_body=STALL, stall_body_after=100),
        dropped=(0,),
        within=BOUNDED,
    ),
    # ---- a stream that breaks after its first event: the provider's SSE error event
    sse_error("sse_chunked_cut_between_events", sse_reply(break_after=3)),
    sse_error("sse_chunked_cut_mid_event", sse_reply(break_after_bytes=sse_bytes(3) + 10)),
    sse_error(
        "sse_close_delimited_cut_mid_event",
        sse_reply(framing="close", break_after_bytes=sse_bytes(3) + 10),
    ),
    sse_error(
        "sse_close_delimited_cut_between_events",
        sse_reply(framing="close", break_after_bytes=sse_bytes(3)),
    ),
    sse_error(
        "sse_openai_close_delimited_cut_mid_event",
        sse_reply("openai", framing="close", break_after_bytes=sse_bytes(3, "openai") + 10),
        provider="openai",
    ),
    sse_error(
        "sse_openai_chunked_cut_between_events",
        sse_reply("openai", break_after=2),
        provider="openai",
    ),
    sse_error("sse_bad_chunk", sse_reply(bad_chunk_at=3)),
    sse_error(
        "sse_stall_mid_stream",
        sse_reply(stall_body=STALL, stall_body_after=sse_bytes(2)),
        dropped=(0,),
        within=BOUNDED,
    ),
    # ---- slow is not broken: the timeout bounds each wait, not the whole body
    whole("sse_close_delimited_whole", sse_reply(framing="close"), stream=True),
    whole(
        "sse_slow_but_steady",
        Reply.sse(STEADY_EVENTS, chunk_delay=0.4),  # 2 s in all, never 1 s without data
        stream=True,
        timeout=1.0,
        within=2.0 + QUICK,
    ),
    # ---- error bodies: relayed, with any pool key masked
    whole(
        "error_body_echoing_keys",
        echo_keys(split=False),
        status=400,
        body=scrubbed(echo_keys(split=False)),
    ),
    whole(
        "error_body_echoing_keys_split_across_chunks",
        echo_keys(split=True),
        status=400,
        body=scrubbed(echo_keys(split=True)),
    ),
    # ---- marking: a slow 429 body does not hold failover for the whole timeout
    whole(
        "slow_429_body",
        SLOW_429,
        Reply.json({"ok": True}),
        attempts=2,
        keys=(("temporary", 60.0), ("valid", 0.0)),  # no Retry-After: the default cooldown
        dropped=(0,),
        timeout=10.0,
        within=2.5,
    ),
    whole(
        "rate_limit_body_cut",  # a 429 is a 429, whole or not
        Reply.error(429, "rate_limit_error", "slow down", break_after=10),
        Reply.json({"ok": True}),
        attempts=2,
        keys=(("temporary", 60.0), ("valid", 0.0)),
    ),
    # ---- a fault after a failover marks nothing more
    envelope(
        "auth_failure_then_reset",
        REVOKED,
        Reply(reset_before_head=True),
        attempts=2,
        keys=(("permanent", 0.0), ("valid", 0.0)),
    ),
    timed_out("rate_limit_then_stall", RATE_LIMITED_7S, STALLING_HEAD, attempts=2, keys=COOLING_7S),
]


# --------------------------------------------------------------------------
# The front ends
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a front end gave its caller."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes  # all that arrived, up to a break
    error: BaseException | None  # what reading the body raised; None: it ended cleanly
    elapsed: float
    texts: list[str]  # reprs and messages, for the leak check

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def request_body(case: Case) -> bytes:
    payload: dict[str, Any] = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
    }
    if case.stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


def via_async(client: kf.FailoverClient, case: Case) -> Outcome:
    async def go() -> Outcome:
        start = time.monotonic()
        resp = await client.request(
            "POST", PATH[case.provider], headers=JSON_TYPE, body=request_body(case)
        )
        received, error = b"", None
        try:
            async for chunk in resp:
                received += chunk
        except kf.KeyfailoverError as exc:
            error = exc
        finally:
            await resp.aclose()
        elapsed = time.monotonic() - start
        return Outcome(resp.status, resp.headers, received, error, elapsed, [repr(resp)])

    return run(go())


def via_sync(client: kf.FailoverClient, case: Case) -> Outcome:
    start = time.monotonic()
    resp = client.request_sync(
        "POST", PATH[case.provider], headers=JSON_TYPE, body=request_body(case)
    )
    received, error = b"", None
    try:
        for chunk in resp:
            received += chunk
    except kf.KeyfailoverError as exc:
        error = exc
    finally:
        resp.close()
    elapsed = time.monotonic() - start
    return Outcome(resp.status, resp.headers, received, error, elapsed, [repr(resp)])


def via_proxy(url: str, case: Case) -> Outcome:
    start = time.monotonic()
    received, error = b"", None
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST", url + PATH[case.provider], headers=JSON_TYPE, content=request_body(case)
        ) as resp,
    ):
        try:
            for chunk in resp.iter_raw():
                received += chunk
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            error = exc
    elapsed = time.monotonic() - start
    return Outcome(resp.status_code, resp.headers.multi_items(), received, error, elapsed, [])


# --------------------------------------------------------------------------
# Fixtures: one uvicorn for the module, a new proxy behind it per test
# --------------------------------------------------------------------------


class Switch:
    """An ASGI app passing each request to the app of the moment."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the server's own, not a test's
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


@dataclass
class Proxy:
    url: str
    app: FailoverProxy
    client: kf.FailoverClient
    pool: kf.KeyPool


@pytest.fixture
def start_proxy(up: MockUpstream, server: tuple[str, Switch]) -> Iterator[Callable[..., Proxy]]:
    """Serves a new FailoverProxy in front of `up` (or `base_url`) on `front_end`:
    "uvicorn" (behind the shared uvicorn server) or "native" (the native server
    `keyfailover serve` runs)."""
    url, switch = server
    with contextlib.ExitStack() as stack:

        def start(
            front_end: str, base_url: str | None = None, provider: str = "anthropic", **options: Any
        ) -> Proxy:
            timeout = options.pop("timeout", TIMEOUT)
            client, pool = make_client(base_url or up, provider, timeout=timeout)
            app = FailoverProxy(client, **options)
            if front_end == "uvicorn":
                switch.app = app
                return Proxy(url, app, client, pool)
            return Proxy(stack.enter_context(serve_native(app)), app, client, pool)

        yield start


@pytest.fixture(params=["uvicorn", "native"])
def proxy(
    request: pytest.FixtureRequest, start_proxy: Callable[..., Proxy]
) -> Callable[..., Proxy]:
    """`start_proxy` on each front end in turn."""
    return functools.partial(start_proxy, request.param)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, server: Any) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record, uvicorn's included (its loggers do not propagate to the root).

    Depends on `server`: uvicorn's logging set-up would remove the handler added here."""
    caplog.set_level(logging.DEBUG)
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        uvicorn_log.removeHandler(caplog.handler)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def leaks(texts: Iterable[str]) -> list[str]:
    """Pieces (8 characters) of any pool key found in `texts`."""
    text = "\n".join(texts)
    return sorted({k[i : i + 8] for k in KEYS for i in range(len(k) - 7) if k[i : i + 8] in text})


def log_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(record) for record in caplog.records]


def error_payload(provider: str, data: bytes) -> dict[str, Any]:
    """The provider's error envelope in `data`, checked for shape."""
    payload = json.loads(data)
    assert isinstance(payload, dict)
    if provider == "anthropic":
        assert set(payload) == {"type", "error"}
        assert payload["type"] == "error"
        assert set(payload["error"]) == {"type", "message"}
    else:
        assert set(payload) == {"error"}
        assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"]
    return payload


def split_error_event(provider: str, body: bytes) -> tuple[bytes, dict[str, Any]]:
    """`body` as (the events before, the payload of the final SSE error event)."""
    assert body.endswith(b"\n\n"), body[-200:]
    before, _, last = body[:-2].rpartition(b"\n\n")
    lines = last.decode().split("\n")
    if provider == "anthropic":
        assert lines[0] == "event: error", last
        lines = lines[1:]
    assert len(lines) == 1, last
    assert lines[0].startswith("data: "), last
    return (before + b"\n\n" if before else b""), error_payload(
        provider, lines[0].removeprefix("data: ").encode()
    )


def check_body(case: Case, front_end: str, out: Outcome) -> None:
    sent = sent_body(case.replies[-1]) if case.replies else b""
    if case.ends == ENVELOPE:
        assert out.error is None
        assert out.header("content-type") == "application/json"
        error = error_payload(case.provider, out.body)["error"]
        assert error["type"] == case.error_type
        assert case.cause in error["message"].lower(), error["message"]
    elif case.ends == WHOLE:
        assert out.error is None, out.error
        assert out.body == (sent if case.body is None else case.body)
        length = out.header("content-length")
        assert length is None or int(length) == len(out.body), "content-length is the body's"
        for name, value in case.headers:
            assert out.header(name) == value, name
    elif case.ends == BROKEN:
        # Never a clean end: the client raises; through the proxy, the HTTP client sees
        # the connection end before the body does.
        through_proxy = front_end in ("proxy", "native")
        expected = httpx.TransportError if through_proxy else kf.UpstreamError
        assert isinstance(out.error, expected), out.error
        assert sent.startswith(out.body), "what arrived is upstream's, unchanged"
        assert len(out.body) <= len(sent)
    elif case.ends == SSE_ERROR:
        assert out.error is None
        assert out.header("content-type") == "text/event-stream"
        before, error = split_error_event(case.provider, out.body)
        assert error["error"]["type"] == "api_error"
        assert sent.startswith(before), "the whole events before the break, unchanged"
        assert FINAL_EVENT[case.provider] not in out.body
    else:  # pragma: no cover
        raise AssertionError(case.ends)


def params(cases: list[Case]) -> list[Any]:
    return [
        pytest.param(
            case,
            front_end,
            id=f"{case.id}-{front_end}",
            marks=[pytest.mark.xfail(strict=True, reason=case.xfail[front_end])]
            if front_end in case.xfail
            else [],
        )
        for case in cases
        for front_end in FRONT_ENDS
    ]


@pytest.mark.parametrize(("case", "front_end"), params(UPSTREAM_FAULTS))
def test_upstream_fault(
    up: MockUpstream,
    start_proxy: Callable[..., Proxy],
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    case: Case,
    front_end: str,
) -> None:
    base_url = f"http://127.0.0.1:{free_port()}" if case.refused else up.url
    up.enqueue(*case.replies)
    if case.big_head_client:
        monkeypatch.setattr(httpcore.HTTP11Connection, "MAX_INCOMPLETE_EVENT_SIZE", 2**20)
    if front_end in ("proxy", "native"):
        server = "uvicorn" if front_end == "proxy" else "native"
        served = start_proxy(server, base_url, case.provider, timeout=case.timeout)
        client, pool = served.client, served.pool
        out = via_proxy(served.url, case)
        out.texts.append(repr(served.app))
        if case.ends == BROKEN:  # the server aborted the response, and said so
            said = "uvicorn.error" if server == "uvicorn" else "keyfailover.proxy"
            _logging.flush()
            assert any(record.name == said for record in logs.records)
    else:
        client, pool = make_client(base_url, case.provider, timeout=case.timeout)
        out = (via_async if front_end == "async" else via_sync)(client, case)

    assert out.status == case.status
    check_body(case, front_end, out)
    assert out.elapsed < case.within, f"took {out.elapsed:.2f} s"
    snapshot = pool.snapshot()
    assert tuple((k["state"], k["cooldown_remaining"]) for k in snapshot) == case.keys
    assert len(up.requests) == (0 if case.refused else case.attempts)
    stats = client.stats()
    assert (stats["requests"], stats["attempts"]) == (1, case.attempts)
    assert stats["upstream_errors"] == (1 if case.ends == ENVELOPE else 0)
    if case.dropped:
        assert up.wait_for(
            lambda u: all(u.requests[i].disconnected for i in case.dropped), timeout=2
        ), "the upstream request was not dropped"
    texts = [
        out.body.decode("latin-1"),
        repr(out.headers),
        str(out.error),
        repr(out.error),
        *out.texts,
        repr(client),
        repr(pool),
        repr(snapshot),
        *log_texts(logs),
    ]
    assert leaks(texts) == []


# --------------------------------------------------------------------------
# Client-side faults, through the proxy
# --------------------------------------------------------------------------

MESSAGE = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def check_untouched(served: Proxy) -> None:
    assert states(served.pool) == ["valid", "valid"]


def test_client_disconnect_before_the_head_drops_the_upstream_request(
    up: MockUpstream, proxy: Callable[..., Proxy], logs: pytest.LogCaptureFixture
) -> None:
    up.enqueue(Reply.json(anthropic_message(), stall=STALL))
    served = proxy(timeout=30)
    start = time.monotonic()
    with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post(served.url + "/v1/messages", json=MESSAGE)
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2)
    assert time.monotonic() - start < QUICK
    check_untouched(served)
    assert leaks(log_texts(logs)) == []


def test_client_disconnect_mid_stream_closes_the_upstream_connection(
    up: MockUpstream, proxy: Callable[..., Proxy], logs: pytest.LogCaptureFixture
) -> None:
    events = anthropic_stream_events(" ".join(["word"] * 40))
    up.enqueue(Reply.sse(events, chunk_delay=0.2))  # about 9 s in all
    served = proxy()
    with (
        httpx.Client(timeout=5) as http,
        http.stream("POST", served.url + "/v1/messages", json={**MESSAGE, "stream": True}) as resp,
    ):
        assert resp.status_code == 200
        assert next(resp.iter_raw()).startswith(b"event: message_start")
        left = time.monotonic()
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2)
    assert time.monotonic() - left < 1.0
    assert not up.requests[0].completed
    check_untouched(served)
    assert leaks(log_texts(logs)) == []


@contextlib.contextmanager
def raw_connection(url: str, data: bytes) -> Iterator[socket.socket]:
    """A connection to `url` that sent `data` and stays open."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        yield sock


def read_response(sock: socket.socket) -> bytes:
    """One response (with a content-length) as raw bytes."""
    data = b""
    while True:
        head, end_of_head, body = data.partition(b"\r\n\r\n")
        if end_of_head:
            fields = dict(line.partition(b":")[::2] for line in head.lower().split(b"\r\n")[1:])
            if len(body) >= int(fields.get(b"content-length", b"0")):
                return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


SLOW_REQUESTS = {
    "half_a_head": b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\ncontent-",
    "head_and_half_a_body": (
        b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\n\r\n" + b'{"model": '
    ),
}


@pytest.mark.parametrize("partial", SLOW_REQUESTS.values(), ids=SLOW_REQUESTS.keys())
def test_a_slow_request_does_not_starve_others(
    up: MockUpstream, proxy: Callable[..., Proxy], partial: bytes
) -> None:
    served = proxy()
    with raw_connection(served.url, partial):

        async def others() -> list[int]:
            async with httpx.AsyncClient(timeout=5) as http:
                calls = [http.post(served.url + "/v1/messages", json=MESSAGE) for _ in range(20)]
                return [r.status_code for r in await asyncio.gather(*calls)]

        start = time.monotonic()
        assert run(others()) == [200] * 20
        assert time.monotonic() - start < QUICK
    assert len(up.requests) == 20, "the partial request never went upstream"
    check_untouched(served)


def chunked_upload() -> Iterator[bytes]:
    for _ in range(4):
        yield b"x" * 400


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("how", ["content_length", "chunked", "announced_only"])
def test_oversized_body_is_413_without_upstream_call(
    up: MockUpstream, proxy: Callable[..., Proxy], how: str, provider: str
) -> None:
    served = proxy(provider=provider, max_body_bytes=1000)
    url = served.url + PATH[provider]
    start = time.monotonic()
    if how == "announced_only":  # a proxy waiting for the body would time out here
        head = b"POST %s HTTP/1.1\r\nHost: proxy\r\ncontent-length: 1000000\r\n\r\n" % (
            PATH[provider].encode()
        )
        with raw_connection(served.url, head) as sock:
            answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 413 ")
        body = answer.partition(b"\r\n\r\n")[2]
    else:
        with httpx.Client(timeout=5) as http:
            content = b"x" * 1001 if how == "content_length" else chunked_upload()
            resp = http.post(url, content=content)
        assert ("content-length" in resp.request.headers) is (how == "content_length")
        assert resp.status_code == 413
        assert resp.headers["content-type"] == "application/json"
        body = resp.content
    assert error_payload(provider, body)["error"]["type"] == "request_too_large"
    assert time.monotonic() - start < QUICK
    assert up.requests == []
    assert served.client.stats()["requests"] == 0
