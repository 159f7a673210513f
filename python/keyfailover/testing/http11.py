"""HTTP/1.1 requests on the wire: an incremental parser (responses are in `wire`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_MAX_HEAD = 64 * 1024
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
