"""`Reply`: what MockUpstream sends for one request, faults included."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

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


PROVIDERS = ("anthropic", "openai", "azure_openai", "gemini")

# The Gemini API's wording for common errors.
_GEMINI_MESSAGES = {
    "RESOURCE_EXHAUSTED": "You exceeded your current quota, please check your plan and "
    "billing details.",
    "API_KEY_INVALID": "API key not valid. Please pass a valid API key.",
    "PERMISSION_DENIED": "The caller does not have permission",
    "UNAVAILABLE": "The model is overloaded. Please try again later.",
    "INTERNAL": "An internal error has occurred.",
}

Framing = Literal["length", "chunked", "close"]
FRAMINGS: tuple[Framing, ...] = ("length", "chunked", "close")


@dataclass
class Reply:
    """What the server sends for one request, including injected faults.

    A `bytes` body is sent with Content-Length; a list body is sent with
    ``Transfer-Encoding: chunked``, one chunk per item (str bodies and chunks
    are UTF-8 encoded on construction); `framing` overrides either. The
    server owns the framing headers (content-length, transfer-encoding,
    connection); a ``connection: close`` header in `headers` makes it close
    the connection after the reply.

    Faults before the head:
      * `stall`: seconds to wait before sending the head. A client that goes
        away meanwhile (or during any later wait) is noticed at once
        (`RecordedRequest.disconnected`).
      * `reset_before_head`: after `stall`, close the socket with a TCP reset
        without sending anything.

    Framing and cuts (a cut reply closes the connection after it, and its
    request is never `completed`):
      * `framing`: ``"length"`` (Content-Length, also for a list body, whose
        chunks are then written one by one), ``"chunked"`` (also for a bytes
        body: one chunk) or ``"close"``: no Content-Length and no chunked
        encoding; the body ends when the server closes the connection.
      * `break_after`: for a list body, send only this many chunks and then
        close the connection (without the terminating zero-size chunk when
        chunked); for a bytes body, send only this many bytes of it (at most
        ``len(body) - 1``) and then close.
      * `break_after_bytes`: send only this many bytes of the body's content,
        whatever its type and framing, and then close: a cut inside a chunk
        leaves it shorter than its size line says; a cut at the end of the
        content still leaves out a chunked body's terminating chunk.
      * `bad_chunk_at`: chunked framing only: the chunk with this index gets
        an invalid size line (``zz``); the connection closes after it.
      * `close`: close the connection after the reply without announcing it
        in a ``connection: close`` header (not a cut).

    Timing of the body:
      * `chunk_delay`: seconds between the chunks of a list body.
      * `stall_body`: seconds to wait once the head and the first
        `stall_body_after` bytes of the body's content are sent (0: before
        any of the body).
      * `trickle`: send the body one byte at a time, this many seconds apart
        (the head arrives at once), e.g. a 429 whose body takes a minute.

    `Reply.raw(data)` sends `data` as it is instead of a response (after
    `stall`, spaced by `trickle`), then closes unless told otherwise.
    """

    status: int = 200
    headers: HeadersLike = field(default_factory=dict)
    body: bytes | list[bytes] = b""
    reset_before_head: bool = False
    stall: float = 0.0
    chunk_delay: float = 0.0
    break_after: int | None = None
    framing: Framing | None = None
    break_after_bytes: int | None = None
    bad_chunk_at: int | None = None
    stall_body: float = 0.0
    stall_body_after: int = 0
    trickle: float = 0.0
    close: bool = False
    raw_data: bytes | None = None

    def __post_init__(self) -> None:
        if isinstance(self.body, list | tuple):
            self.body = [_to_bytes(chunk) for chunk in self.body]
        else:
            self.body = _to_bytes(self.body)
        if self.raw_data is not None:
            self.raw_data = _to_bytes(self.raw_data)
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.framing is not None and self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(FRAMINGS)}, not {self.framing!r}")
        chunks = [self.body] if isinstance(self.body, bytes) else self.body
        if self.bad_chunk_at is not None:
            if self.effective_framing != "chunked":
                raise ValueError("bad_chunk_at needs a chunked body")
            if self.bad_chunk_at >= len(chunks):
                raise ValueError(f"bad_chunk_at: the body has only {len(chunks)} chunks")
        if self.stall_body_after > sum(map(len, chunks)):
            raise ValueError("stall_body_after is past the end of the body")
        if self.raw_data is not None:
            used = [name for name in _NOT_FOR_RAW if getattr(self, name) != _DEFAULTS[name]]
            if used:
                raise ValueError(f"a raw reply takes no {', '.join(used)}")

    @property
    def effective_framing(self) -> Framing:
        """`framing`, or the one the body's type implies."""
        if self.framing is not None:
            return self.framing
        return "length" if isinstance(self.body, bytes) else "chunked"

    @classmethod
    def raw(cls, data: bytes | str, close: bool = True) -> Reply:
        """Sends exactly `data` (str: UTF-8) for the request, then closes the connection
        unless `close` is false: garbage, odd status lines such as ``HTTP/1.1 999 Weird``,
        a 101 to a request that asked for no upgrade, huge headers, anything."""
        return cls(raw_data=_to_bytes(data), close=close)

    @classmethod
    def json(
        cls, obj: Any, status: int = 200, headers: HeadersLike | None = None, **faults: Any
    ) -> Reply:
        """A JSON reply; `faults` are other fields, such as ``stall_body=5``."""
        return cls(
            status=status,
            headers=_with_defaults({"content-type": "application/json"}, headers),
            body=_dumps(obj),
            **faults,
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
        **faults: Any,
    ) -> Reply:
        """An error reply in the provider's envelope; `faults` are other fields, such as
        ``trickle=1.0`` for a body that takes its time.

        * ``"anthropic"`` (default): ``{"type": "error", "error": {"type", "message"}}``;
        * ``"openai"``: ``{"error": {"message", "type", "param", "code"}}``, `type` as
          both type and code;
        * ``"azure_openai"``: Azure's ``{"error": {"code", "message"}}``, `type` as the
          code (Azure uses the status, e.g. ``"429"``, or a name such as
          ``"content_filter"``);
        * ``"gemini"``: Google's ``{"error": {"code", "message", "status"}}``, `type` as
          the status (``"RESOURCE_EXHAUSTED"``); `Reply.gemini_error` adds details.
        """
        body: dict[str, Any]
        if provider == "anthropic":
            body = {"type": "error", "error": {"type": type, "message": message}}
        elif provider == "openai":
            body = {"error": {"message": message, "type": type, "param": None, "code": type}}
        elif provider == "azure_openai":
            body = {"error": {"code": type, "message": message}}
        elif provider == "gemini":
            body = {"error": {"code": status, "message": message, "status": type}}
        else:
            raise ValueError(
                f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"
            )
        return cls.json(body, status=status, headers=headers, **faults)

    @classmethod
    def gemini_error(
        cls,
        status: int,
        google_status: str,
        message: str | None = None,
        *,
        retry_delay: str | None = None,
        quota_id: str | None = None,
        reason: str | None = None,
        headers: HeadersLike | None = None,
        **faults: Any,
    ) -> Reply:
        """An error as the Gemini API sends it: Google's envelope with its details.

        * `retry_delay` (a duration such as ``"10s"``) adds a ``google.rpc.RetryInfo``;
        * `quota_id` (such as ``"GenerateRequestsPerDayPerProjectPerModel-FreeTier"``)
          adds a ``google.rpc.QuotaFailure`` naming that quota;
        * `reason` (such as ``"API_KEY_INVALID"``) adds a ``google.rpc.ErrorInfo``.

        `message` defaults to the API's own wording for the status or reason::

            Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="10s")
            Reply.gemini_error(400, "INVALID_ARGUMENT", reason="API_KEY_INVALID")
        """
        details: list[dict[str, Any]] = []
        if reason is not None:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            )
        if quota_id is not None:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_free_tier_requests",
                            "quotaId": quota_id,
                        }
                    ],
                }
            )
        if retry_delay is not None:
            details.append(
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
            )
        if message is None:
            message = _GEMINI_MESSAGES.get(reason or google_status, google_status)
        error: dict[str, Any] = {"code": status, "message": message, "status": google_status}
        if details:
            error["details"] = details
        return cls.json({"error": error}, status=status, headers=headers, **faults)

    @classmethod
    def sse(
        cls,
        events: Sequence[SseEvent],
        status: int = 200,
        headers: HeadersLike | None = None,
        chunk_delay: float = 0.0,
        break_after: int | None = None,
        **faults: Any,
    ) -> Reply:
        """A server-sent-events stream, one chunk per event.

        Items are ``(event_name, data)`` pairs (Anthropic style) or bare data
        (OpenAI style, e.g. a chunk dict or ``"[DONE]"``); dict data is JSON.
        `faults` are other fields: ``framing="close"`` makes it a
        close-delimited stream, `break_after_bytes` can cut it inside an event.
        """
        return cls(
            status=status,
            headers=_with_defaults(
                {"content-type": "text/event-stream", "cache-control": "no-cache"}, headers
            ),
            body=[_sse_chunk(event) for event in events],
            chunk_delay=chunk_delay,
            break_after=break_after,
            **faults,
        )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Reply:
        """A reply from a JSON-like dict, as in a scenario file (docs/mock-upstream.md).

        Keys: the dataclass fields (a str body is UTF-8 encoded; a list body
        is a list of str chunks), plus at most one of ``"json": <value>``,
        ``"error": {"type", "message", "provider"?}`` (status defaults to
        500), ``"sse": [[event, data] | data, ...]`` and ``"raw": str``. Raises ValueError
        naming the field when `spec` is not a valid reply.
        """
        from .scenario import reply_from_spec

        return reply_from_spec(spec)


_NON_NEGATIVE = (
    "stall",
    "chunk_delay",
    "break_after",
    "break_after_bytes",
    "bad_chunk_at",
    "stall_body",
    "stall_body_after",
    "trickle",
)
# What a raw reply ignores, so may not set.
_NOT_FOR_RAW = (
    "status",
    "headers",
    "body",
    "framing",
    "break_after",
    "break_after_bytes",
    "bad_chunk_at",
    "chunk_delay",
    "stall_body",
    "stall_body_after",
)
_DEFAULTS: dict[str, Any] = {
    name: f.default_factory() if f.default_factory is not MISSING else f.default
    for name, f in Reply.__dataclass_fields__.items()
}
