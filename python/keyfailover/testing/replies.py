"""`Reply`: what MockUpstream sends for one request, faults included."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bodies import SseEvent, _sse_chunk

HeadersLike = Mapping[str, str] | Sequence[tuple[str, str]]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _header_pairs(headers: HeadersLike) -> list[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else [(n, v) for n, v in headers]


def _with_defaults(defaults: dict[str, str], headers: HeadersLike | None) -> list[tuple[str, str]]:
    """`defaults` overridden (case-insensitively) by `headers`."""
    extra = _header_pairs(headers or {})
    given = {name.lower() for name, _ in extra}
    return [(n, v) for n, v in defaults.items() if n not in given] + extra


def _to_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


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
        """A reply from a JSON-like dict, as in a scenario file (docs/mock-upstream.md).

        Keys: the dataclass fields (a str body is UTF-8 encoded; a list body
        is a list of str chunks), plus at most one of ``"json": <value>``,
        ``"error": {"type", "message", "provider"?}`` (status defaults to
        500) and ``"sse": [[event, data] | data, ...]``. Raises ValueError
        naming the field when `spec` is not a valid reply.
        """
        from .scenario import reply_from_spec

        return reply_from_spec(spec)
