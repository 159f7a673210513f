"""Hermetic Anthropic/OpenAI-shaped upstream for tests.

`MockUpstream` is a small HTTP/1.1 server on loopback. It runs its own asyncio
event loop in a daemon thread, so it serves sync tests and async tests alike
without touching the test's own loop. It uses only the standard library.

    with MockUpstream() as up:
        up.set_reply("sk-ant-key-0", Reply.error(429, "rate_limit_error", "slow down"))
        up.enqueue(Reply.json({"ok": True}))
        ...                       # point a client at up.url
        assert up.requests[0].credential == "sk-ant-key-0"

Reply selection for each request: the one-shot queue first (consumed in
order), else the reply set for the request's credential (`x-api-key`, else the
`Authorization: Bearer` token), else the default reply:

* ``POST /v1/messages``: an Anthropic Messages response (an SSE stream when
  the request JSON has ``"stream": true``);
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": 10}``;
* ``POST /v1/chat/completions``: an OpenAI chat completion (or chunk stream);
* ``GET /v1/models``: an OpenAI-shaped list when the request has neither an
  ``x-api-key`` nor an ``anthropic-version`` header, else an Anthropic page;
* anything else: 404 with an Anthropic-shaped error body.

The ``/v1`` prefix is optional, so the OpenAI SDK works with either
``base_url=up.url`` or ``base_url=up.url + "/v1"``.

`MockUpstream.wait_for(predicate)` polls from sync code, `wait_for_async` from
async code. As a pytest plugin (entry point ``pytest11``), this module also
provides the function-scoped fixture `mock_upstream`.

The server treats the client's end of input (FIN) as the client going away:
it stops whatever reply is in flight and marks it `disconnected`. A client
that half-closes its socket after sending a request gets no response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is optional at run time
    pytest = None  # type: ignore[assignment]

__all__ = [
    "MockUpstream",
    "RecordedRequest",
    "Reply",
    "anthropic_message",
    "anthropic_stream_events",
    "openai_chat_completion",
    "openai_stream_chunks",
    "serve_asgi",
]

HeadersLike = Mapping[str, str] | Sequence[tuple[str, str]]
# An SSE event: (event name or None, data) or bare data; dict data is sent as JSON.
SseEvent = tuple[str | None, Any] | Mapping[str, Any] | str

DEFAULT_TEXT = "Hello from mock"
DEFAULT_MODEL = "mock-model"


# --------------------------------------------------------------------------
# Response body builders
# --------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _pieces(text: str) -> list[str]:
    """Split text into word-sized pieces that join back to it."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def anthropic_message(
    text: str = DEFAULT_TEXT,
    model: str = DEFAULT_MODEL,
    content: list[dict[str, Any]] | None = None,
    *,
    input_tokens: int = 10,
) -> dict[str, Any]:
    """A Messages API response body; `content` replaces the single text block."""
    blocks = content if content is not None else [{"type": "text", "text": text}]
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": len(_pieces(text))},
    }


def anthropic_stream_events(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL, *, input_tokens: int = 10
) -> list[tuple[str, dict[str, Any]]]:
    """The `(event, data)` pairs of a streamed Messages API response."""
    pieces = _pieces(text)
    start = anthropic_message("", model, content=[], input_tokens=input_tokens)
    start["stop_reason"] = None
    start["usage"]["output_tokens"] = 1
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]
    for piece in pieces:
        delta = {"type": "text_delta", "text": piece}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


def openai_chat_completion(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL, *, prompt_tokens: int = 10
) -> dict[str, Any]:
    """A chat.completion response body."""
    completion_tokens = len(_pieces(text))
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def openai_stream_chunks(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL
) -> list[dict[str, Any]]:
    """The chat.completion.chunk objects of a streamed completion (without the final ``[DONE]``)."""
    chunk_id, created = _new_id("chatcmpl-"), int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": piece}) for piece in _pieces(text)),
        chunk({}, "stop"),
    ]


def _anthropic_models() -> dict[str, Any]:
    models = [
        {
            "type": "model",
            "id": model_id,
            "display_name": model_id,
            "created_at": "2025-01-01T00:00:00Z",
            "lifecycle": "active",
        }
        for model_id in (DEFAULT_MODEL, "mock-model-large")
    ]
    return {
        "data": models,
        "has_more": False,
        "first_id": models[0]["id"],
        "last_id": models[-1]["id"],
    }


def _openai_models() -> dict[str, Any]:
    models = [
        {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "mock"}
        for model_id in (DEFAULT_MODEL, "mock-model-large")
    ]
    return {"object": "list", "data": models}


def _sse_chunk(event: SseEvent) -> bytes:
    name, data = event if isinstance(event, tuple) else (None, event)
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = [] if name is None else [f"event: {name}"]
    lines += [f"data: {line}" for line in text.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def _header_pairs(headers: HeadersLike) -> list[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else [(n, v) for n, v in headers]


def _with_defaults(defaults: dict[str, str], headers: HeadersLike | None) -> list[tuple[str, str]]:
    """`defaults` overridden (case-insensitively) by `headers`."""
    extra = _header_pairs(headers or {})
    given = {name.lower() for name, _ in extra}
    return [(n, v) for n, v in defaults.items() if n not in given] + extra


def _to_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


# --------------------------------------------------------------------------
# Reply and RecordedRequest
# --------------------------------------------------------------------------


@dataclass
class Reply:
    """What the server sends for one request, including injected faults.

    A `bytes` body is sent with Content-Length; a list body is sent with
    ``Transfer-Encoding: chunked``, one chunk per item (str bodies and chunks
    are UTF-8 encoded on construction). The server owns the
    framing headers (content-length, transfer-encoding); a ``connection:
    close`` header in `headers` makes it close the connection after the reply.

    Faults:
      * `reset_before_head`: after `stall`, close the socket with a TCP reset
        without sending anything.
      * `stall`: seconds to wait before sending the head. A client that goes
        away meanwhile is noticed at once (`RecordedRequest.disconnected`).
      * `chunk_delay`: seconds between body chunks of a list body.
      * `break_after`: for a list body, send only this many chunks and then
        close the connection without the terminating zero-size chunk; for a
        bytes body, send only this many bytes of it (at most ``len(body) - 1``)
        and then close.
    """

    status: int = 200
    headers: HeadersLike = field(default_factory=dict)
    body: bytes | list[bytes] = b""
    reset_before_head: bool = False
    stall: float = 0.0
    chunk_delay: float = 0.0
    break_after: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.body, list | tuple):
            self.body = [_to_bytes(chunk) for chunk in self.body]
        else:
            self.body = _to_bytes(self.body)
        if (
            self.stall < 0
            or self.chunk_delay < 0
            or (self.break_after is not None and self.break_after < 0)
        ):
            raise ValueError("stall, chunk_delay and break_after must not be negative")

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: HeadersLike | None = None) -> Reply:
        """A JSON reply."""
        return cls(
            status=status,
            headers=_with_defaults({"content-type": "application/json"}, headers),
            body=_dumps(obj),
        )

    @classmethod
    def error(
        cls,
        status: int,
        type: str,
        message: str,
        *,
        provider: str = "anthropic",
        headers: HeadersLike | None = None,
    ) -> Reply:
        """An error reply in the Anthropic (default) or OpenAI envelope."""
        if provider == "anthropic":
            body: dict[str, Any] = {"type": "error", "error": {"type": type, "message": message}}
        elif provider == "openai":
            body = {"error": {"message": message, "type": type, "param": None, "code": type}}
        else:
            raise ValueError(f"unknown provider {provider!r}; expected 'anthropic' or 'openai'")
        return cls.json(body, status=status, headers=headers)

    @classmethod
    def sse(
        cls,
        events: Sequence[SseEvent],
        status: int = 200,
        headers: HeadersLike | None = None,
        chunk_delay: float = 0.0,
        break_after: int | None = None,
    ) -> Reply:
        """A server-sent-events stream, one chunk per event.

        Items are ``(event_name, data)`` pairs (Anthropic style) or bare data
        (OpenAI style, e.g. a chunk dict or ``"[DONE]"``); dict data is JSON.
        """
        return cls(
            status=status,
            headers=_with_defaults(
                {"content-type": "text/event-stream", "cache-control": "no-cache"}, headers
            ),
            body=[_sse_chunk(event) for event in events],
            chunk_delay=chunk_delay,
            break_after=break_after,
        )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Reply:
        """A reply from a JSON-like dict.

        Keys: the dataclass fields (a str body is UTF-8 encoded; a list body
        is a list of str chunks), plus at most one of ``"json": <value>``,
        ``"error": {"type", "message", "provider"?}`` (status defaults to
        500) and ``"sse": [[event, data] | data, ...]``.
        """
        unknown = set(spec) - _REPLY_KEYS
        if unknown:
            raise ValueError(f"unknown reply keys: {sorted(unknown)}")
        kinds = [key for key in ("json", "error", "sse", "body") if key in spec]
        if len(kinds) > 1:
            raise ValueError(f"a reply takes only one of json/error/sse/body, got {kinds}")
        if "json" in spec:
            reply = cls.json(spec["json"])
        elif "error" in spec:
            err = spec["error"]
            reply = cls.error(
                spec.get("status", 500),
                err["type"],
                err["message"],
                provider=err.get("provider", "anthropic"),
            )
        elif "sse" in spec:
            reply = cls.sse(
                [tuple(item) if isinstance(item, list) else item for item in spec["sse"]]
            )
        else:
            reply = cls()
        fields: dict[str, Any] = {
            "status": reply.status,
            "headers": _with_defaults(dict(_header_pairs(reply.headers)), spec.get("headers")),
            "body": reply.body,
        }
        for key in ("status", "body", "reset_before_head", "stall", "chunk_delay", "break_after"):
            if key in spec:
                fields[key] = spec[key]
        return cls(**fields)


_REPLY_KEYS = {
    "status",
    "headers",
    "body",
    "reset_before_head",
    "stall",
    "chunk_delay",
    "break_after",
    "json",
    "error",
    "sse",
}


@dataclass(repr=False, slots=True)
class RecordedRequest:
    """One request as the server received it.

    `completed` becomes true once the whole response has been written;
    `disconnected` once the client has closed the connection before that.
    The repr leaves out header values and the credential.
    """

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    credential: str | None
    completed: bool = False
    disconnected: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        credential = None if self.credential is None else "<redacted>"
        return (
            f"RecordedRequest(method={self.method!r}, path={self.path!r}, query={self.query!r}, "
            f"headers={[name for name, _ in self.headers]!r}, body=<{len(self.body)} bytes>, "
            f"credential={credential}, completed={self.completed}, "
            f"disconnected={self.disconnected})"
        )


def _credential(headers: list[tuple[str, str]]) -> str | None:
    api_key = authorization = None
    for name, value in headers:
        if name == "x-api-key" and api_key is None:
            api_key = value
        elif name == "authorization" and authorization is None:
            authorization = value
    if api_key is not None:
        return api_key
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _default_reply(request: RecordedRequest) -> Reply:
    method, path = request.method, request.path
    if path.startswith("/v1/"):
        path = path[3:]
    if method == "POST" and path in ("/messages", "/chat/completions"):
        provider = "anthropic" if path == "/messages" else "openai"
        payload = _json_object(request.body)
        if payload is None:
            return Reply.error(
                400, "invalid_request_error", "body must be a JSON object", provider=provider
            )
        model = str(payload.get("model") or DEFAULT_MODEL)
        stream = payload.get("stream") is True
        if provider == "anthropic":
            if stream:
                return Reply.sse(anthropic_stream_events(model=model))
            return Reply.json(anthropic_message(model=model))
        if stream:
            return Reply.sse([*openai_stream_chunks(model=model), "[DONE]"])
        return Reply.json(openai_chat_completion(model=model))
    if method == "POST" and path == "/messages/count_tokens":
        return Reply.json({"input_tokens": 10})
    if method == "GET" and path == "/models":
        openai_style = (
            request.header("x-api-key") is None and request.header("anthropic-version") is None
        )
        return Reply.json(_openai_models() if openai_style else _anthropic_models())
    return Reply.error(404, "not_found_error", f"no route for {method} {request.path}")


# --------------------------------------------------------------------------
# HTTP/1.1 request parsing
# --------------------------------------------------------------------------

_MAX_HEAD = 64 * 1024
_MAX_PIPELINE = 64
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[\x21-\x7e]+")
_HEADER_LINE = re.compile(  # name: value, without control characters in the value
    r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*"
)
_SPECIAL_HEADERS = {"host", "transfer-encoding", "content-length", "connection", "expect"}
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")


class _BadRequest(Exception):
    pass


@dataclass(slots=True)
class _Head:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    keep_alive: bool
    chunked: bool
    length: int
    expect_continue: bool


def _parse_head(raw: bytes) -> _Head:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
        raise _BadRequest("malformed request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest("unsupported HTTP version")
    if "://" in target:  # absolute-form: keep only the path and query
        rest = target.split("://", 1)[1]
        start = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = "/" + rest[start:].lstrip("/")
    elif not target.startswith("/") and target != "*":
        raise _BadRequest("malformed request target")
    path, _, query = target.partition("?")

    headers: list[tuple[str, str]] = []
    special: dict[str, str] = {}  # the headers that matter here, repeated ones comma-joined
    for line in lines[1:]:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise _BadRequest("malformed header line")
        name, value = match[1].lower(), match[2]
        headers.append((name, value))
        if name in _SPECIAL_HEADERS:
            special[name] = f"{special[name]},{value}" if name in special else value

    if version == "HTTP/1.1" and "host" not in special:
        raise _BadRequest("missing Host header")
    chunked, length = False, 0
    if "transfer-encoding" in special:
        encodings = special["transfer-encoding"].lower().split(",")
        if "content-length" in special or encodings[-1].strip() != "chunked":
            raise _BadRequest("unsupported Transfer-Encoding")
        if version != "HTTP/1.1":
            raise _BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        chunked = True
    elif "content-length" in special:
        lengths = {item.strip() for item in special["content-length"].split(",")}
        if len(lengths) != 1 or not _DIGITS.fullmatch(next(iter(lengths))):
            raise _BadRequest("invalid Content-Length")
        length = int(lengths.pop())
    connection = special.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    expect_continue = "100-continue" in special.get("expect", "").lower()
    return _Head(method, path, query, headers, keep_alive, chunked, length, expect_continue)


class _RequestParser:
    """Incremental parser: feed bytes, get back the requests completed so far."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: _Head | None = None
        self._chunk_left: int | None = None  # None: expecting a size line; -1: in trailers
        self._chunks = bytearray()
        self.done = False  # a request asked to close, or the input was malformed
        self.wants_continue = False  # a head with "Expect: 100-continue" awaits its body

    def feed(self, data: bytes) -> tuple[list[tuple[_Head, bytes]], str | None]:
        """Requests completed by `data`, and an error message if the input became malformed."""
        requests: list[tuple[_Head, bytes]] = []
        if self.done:
            return requests, None
        self._buf += data
        try:
            while not self.done:
                request = self._next()
                if request is None:
                    break
                requests.append(request)
                self.done = not request[0].keep_alive
        except _BadRequest as exc:
            self.done = True
            return requests, str(exc)
        return requests, None

    def _next(self) -> tuple[_Head, bytes] | None:
        buf = self._buf
        if self._head is None:
            while buf.startswith(b"\r\n"):  # tolerate blank lines between requests
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _BadRequest("request head too large")
                return None
            self._head = _parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            self.wants_continue = self._head.expect_continue
        head = self._head
        if head.chunked:
            body = self._chunked_body()
            if body is None:
                return None
        else:
            if len(buf) < head.length:
                return None
            body = bytes(buf[: head.length])
            del buf[: head.length]
        self._head = None
        self.wants_continue = False
        return head, body

    def _chunked_body(self) -> bytes | None:
        buf = self._buf
        while True:
            if self._chunk_left is None or self._chunk_left == -1:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > _MAX_HEAD:
                        raise _BadRequest("chunk size line too long")
                    return None
                line = bytes(buf[:eol])
                del buf[: eol + 2]
                if self._chunk_left == -1:  # trailer section; an empty line ends the body
                    if not line:
                        body = bytes(self._chunks)
                        self._chunks.clear()
                        self._chunk_left = None
                        return body
                    continue
                size = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size):
                    raise _BadRequest("invalid chunk size")
                self._chunk_left = int(size, 16) or -1
            else:
                if len(buf) < self._chunk_left + 2:
                    return None
                if buf[self._chunk_left : self._chunk_left + 2] != b"\r\n":
                    raise _BadRequest("chunk data not followed by CRLF")
                self._chunks += buf[: self._chunk_left]
                del buf[: self._chunk_left + 2]
                self._chunk_left = None


# --------------------------------------------------------------------------
# Response writing
# --------------------------------------------------------------------------

_REASONS = {status.value: status.phrase for status in HTTPStatus} | {529: "Overloaded"}
_SERVER_HEADERS = {"content-length", "transfer-encoding", "connection"}


def _render(reply: Reply, head_only: bool, keep_alive: bool) -> tuple[bytes, list[bytes]]:
    """The response head and the body pieces to write (separately when delayed)."""
    status = reply.status
    headers = _header_pairs(reply.headers)
    no_body = head_only or status < 200 or status in (204, 304)
    if isinstance(reply.body, bytes):
        body = reply.body
        framing = "" if status < 200 or status == 204 else f"content-length: {len(body)}\r\n"
        if reply.break_after is not None:
            body = body[: min(reply.break_after, max(len(body) - 1, 0))]
        pieces = [body]
    else:
        framing = "transfer-encoding: chunked\r\n"
        chunks = reply.body if reply.break_after is None else reply.body[: reply.break_after]
        pieces = [b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b"" for chunk in chunks]
        if reply.break_after is None:
            pieces[-1:] = [(pieces[-1] if pieces else b"") + b"0\r\n\r\n"]
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"]
    lines += [
        f"{name}: {value}\r\n" for name, value in headers if name.lower() not in _SERVER_HEADERS
    ]
    lines.append(framing)
    if not keep_alive:
        lines.append("connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode(), [] if no_body else pieces


def _asks_to_close(headers: HeadersLike) -> bool:
    return any(
        name.lower() == "connection" and "close" in value.lower()
        for name, value in _header_pairs(headers)
    )


@dataclass(slots=True)
class _Work:
    request: RecordedRequest | None  # None: answer with 400 and close
    keep_alive: bool
    head_only: bool
    error: str = ""


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order."""

    _transport: asyncio.Transport

    def __init__(self, upstream: MockUpstream) -> None:
        self._upstream = upstream
        self._parser = _RequestParser()
        self._pending: deque[_Work] = deque()
        self._current: RecordedRequest | None = None  # request whose reply is being sent
        self._task: asyncio.Task[None] | None = None  # sends a delayed reply
        self._closed = False
        self._closed_by_server = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._upstream._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        requests, error = self._parser.feed(data)
        for head, body in requests:
            request = RecordedRequest(
                head.method, head.path, head.query, head.headers, body, _credential(head.headers)
            )
            self._upstream._record(request)
            self._pending.append(_Work(request, head.keep_alive, head.method == "HEAD"))
        if error is not None:
            self._pending.append(_Work(None, False, False, error))
        if self._parser.wants_continue:
            self._parser.wants_continue = False
            if not self._pending and self._task is None:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(self._pending) > _MAX_PIPELINE and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._process()

    def eof_received(self) -> bool | None:
        return None  # the client went away: close (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if not self._closed_by_server:
            for request in (self._current, *(work.request for work in self._pending)):
                if request is not None and not request.completed:
                    request.disconnected = True
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
        self._upstream._connections.discard(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # replying

    def _process(self) -> None:
        while self._pending and self._task is None and not self._closed:
            work = self._pending.popleft()
            if work.request is None:
                self._send_bad_request(work.error)
                return
            self._current = work.request
            self._start_reply(work, work.request, self._upstream._select_reply(work.request))
            if self._task is None:
                self._current = None
        if self._reading_paused and len(self._pending) <= _MAX_PIPELINE // 2 and not self._closed:
            self._reading_paused = False
            self._transport.resume_reading()

    def _start_reply(self, work: _Work, request: RecordedRequest, reply: Reply) -> None:
        if reply.stall > 0 or reply.chunk_delay > 0:
            self._task = asyncio.get_running_loop().create_task(
                self._reply_slowly(work, request, reply)
            )
            self._task.add_done_callback(self._on_slow_reply_done)
        elif reply.reset_before_head:
            self.reset()
        else:
            keep_alive = self._keeps_alive(work, reply)
            head, pieces = _render(reply, work.head_only, keep_alive)
            # Mark before writing: the client may read the reply and look at once.
            request.completed = reply.break_after is None
            self._transport.write(head + b"".join(pieces))
            if not keep_alive:
                self.close()

    async def _reply_slowly(self, work: _Work, request: RecordedRequest, reply: Reply) -> None:
        if reply.stall > 0:
            await asyncio.sleep(reply.stall)
        if reply.reset_before_head:
            self.reset()
            return
        keep_alive = self._keeps_alive(work, reply)
        head, pieces = _render(reply, work.head_only, keep_alive)
        writes = [head + pieces[0], *pieces[1:]] if pieces else [head]
        for index, data in enumerate(writes):
            if index and reply.chunk_delay > 0:
                await asyncio.sleep(reply.chunk_delay)
            if index == len(writes) - 1:
                request.completed = reply.break_after is None
            self._transport.write(data)
            if self._writing_paused:
                self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
        if not keep_alive:
            self.close()

    def _on_slow_reply_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        self._current = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.close(abort=True)
            raise error
        self._process()

    @staticmethod
    def _keeps_alive(work: _Work, reply: Reply) -> bool:
        return work.keep_alive and reply.break_after is None and not _asks_to_close(reply.headers)

    def _send_bad_request(self, message: str) -> None:
        reply = Reply.error(400, "invalid_request_error", f"malformed HTTP request: {message}")
        head, pieces = _render(reply, head_only=False, keep_alive=False)
        self._transport.write(head + b"".join(pieces))
        self.close()

    def close(self, abort: bool = False) -> None:
        """Close from the server side (flushing what was written unless `abort`)."""
        self._closed = self._closed_by_server = True
        if abort:
            self._transport.abort()
        else:
            self._transport.close()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), dropping anything unsent."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close(abort=True)


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class MockUpstream:
    """An Anthropic/OpenAI-shaped HTTP/1.1 server on loopback, in a background thread.

    Use as a context manager, or call `start()` / `stop()` (both idempotent).
    All public methods are thread-safe.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()  # guards the three collections below
        self._requests: list[RecordedRequest] = []
        self._queue: deque[Reply] = deque()
        self._replies: dict[str, Reply] = {}
        self._lifecycle = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()  # touched only on the server's loop

    # lifecycle

    def start(self) -> MockUpstream:
        """Start serving (no-op when already started); returns self."""
        with self._lifecycle:
            if self._loop is not None:
                return self
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="keyfailover-mock-upstream", daemon=True
            )
            thread.start()
            try:
                server = asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=10)
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._loop, self._thread, self._server = loop, thread, server
            self._port = server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving and close all connections (no-op when not running)."""
        with self._lifecycle:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return
            self._loop = self._thread = None
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                if not thread.is_alive():
                    loop.close()

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: _Connection(self),
            self.host,
            self._requested_port,
            reuse_address=True,
            backlog=1024,
        )

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close(abort=True)
        await asyncio.sleep(0)  # let connection_lost run
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def port(self) -> int:
        """The bound port (the last one, once stopped)."""
        if self._port is None:
            raise RuntimeError("MockUpstream has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL such as ``http://127.0.0.1:PORT`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        state = f"url={self.url!r}" if self._loop is not None else "stopped"
        return f"MockUpstream({state})"

    # scripting replies

    def set_reply(self, credential: str, reply: Reply | None) -> None:
        """Answer every request with `credential` with `reply` (None removes the override)."""
        with self._lock:
            if reply is None:
                self._replies.pop(credential, None)
            else:
                self._replies[credential] = reply

    def enqueue(self, *replies: Reply) -> None:
        """Add one-shot replies, used in order (one per request) before any other reply."""
        with self._lock:
            self._queue.extend(replies)

    def load_scenario(self, scenario: Mapping[str, Any] | str | os.PathLike[str]) -> None:
        """Apply ``{"replies": {credential: reply dict | null}, "queue": [reply dict, ...]}``.

        `scenario` is the dict itself or the path of a JSON file holding it;
        reply dicts are as for `Reply.from_dict`.
        """
        data: Mapping[str, Any] = (
            scenario if isinstance(scenario, Mapping) else json.loads(Path(scenario).read_text())
        )
        unknown = set(data) - {"replies", "queue"}
        if unknown:
            raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
        replies = {
            credential: None if spec is None else Reply.from_dict(spec)
            for credential, spec in data.get("replies", {}).items()
        }
        queue = [Reply.from_dict(spec) for spec in data.get("queue", [])]
        for credential, reply in replies.items():
            self.set_reply(credential, reply)
        self.enqueue(*queue)

    def clear(self) -> None:
        """Forget recorded requests, queued replies and per-credential replies."""
        with self._lock:
            self._requests.clear()
            self._queue.clear()
            self._replies.clear()

    # inspecting requests

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, in arrival order (a new list each time)."""
        with self._lock:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[MockUpstream], object], timeout: float = 5.0) -> bool:
        """Poll until `predicate(self)` is true; False if `timeout` seconds pass first.

        Exceptions raised by `predicate` propagate.
        """
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    async def wait_for_async(
        self, predicate: Callable[[MockUpstream], object], timeout: float = 5.0
    ) -> bool:
        """Like `wait_for`, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    # called on the server's loop

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _select_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            reply = (
                self._replies.get(request.credential) if request.credential is not None else None
            )
        return reply if reply is not None else _default_reply(request)


@contextlib.contextmanager
def serve_asgi(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs an ASGI app under uvicorn in a background thread; yields its URL.

    For end-to-end tests of a `FailoverProxy` (or a FastAPI app mounting one)
    with a real HTTP server on loopback. Needs uvicorn (the `server` extra).
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="auto")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="keyfailover-serve-asgi", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.005)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)


if pytest is not None:

    @pytest.fixture
    def mock_upstream() -> Iterator[MockUpstream]:
        """A started `MockUpstream`, stopped after the test."""
        with MockUpstream() as upstream:
            yield upstream
