"""FailoverProxy: an ASGI app that forwards requests through a FailoverClient.

Mount it in FastAPI (or any ASGI framework) and point an SDK at the mount::

    app.mount("/anthropic", FailoverProxy(client))
    anthropic.Anthropic(base_url="http://host/anthropic", api_key="...")

This module is ASGI plumbing only: which key serves a request, and what an
upstream answer means for it, is decided by the Rust core.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote

from keyfailover._native import (
    ConfigError,
    FailoverClient,
    Response,
    caller_credential,
    error_response,
)

__all__ = ["FailoverProxy"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("keyfailover.proxy")

ADMIN_PREFIX = "/_keyfailover/"
CREDENTIAL_HEADERS = frozenset({"x-api-key", "authorization"})


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class FailoverProxy:
    """An ASGI 3 app forwarding every request below its mount through `client`.

    - `client_tokens`: tokens callers must present (as `x-api-key` or
      `Authorization: Bearer`); they are stripped before forwarding. Without
      them the host app is expected to do its own auth.
    - `allow_byok`: a caller credential that is not a client token is sent
      upstream as the caller's own key (one attempt, pool untouched) instead
      of being refused (with tokens) or stripped (without).
    - `max_body_bytes`: larger request bodies get 413 with no upstream call.
    - `admin`: serve `GET /_keyfailover/health` and `/_keyfailover/keys`.
    """

    def __init__(
        self,
        client: FailoverClient,
        *,
        client_tokens: Iterable[str] | None = None,
        allow_byok: bool = False,
        max_body_bytes: int = 32 * 1024 * 1024,
        admin: bool = True,
    ) -> None:
        tokens = None if client_tokens is None else [t.encode() for t in client_tokens]
        if tokens is not None and (not tokens or any(not t.strip() for t in tokens)):
            raise ValueError("client_tokens must be non-empty strings")
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must not be negative")
        self.client = client
        self.allow_byok = allow_byok
        self.max_body_bytes = max_body_bytes
        self.admin = admin
        self._tokens = tokens

    def __repr__(self) -> str:
        auth = "client tokens" if self._tokens else "no client tokens"
        return f"FailoverProxy({self.client!r}, {auth}, allow_byok={self.allow_byok})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1003})
        else:
            raise ValueError(f"unsupported ASGI scope type {scope['type']!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _is_client_token(self, credential: str | None) -> bool:
        if credential is None or self._tokens is None:
            return False
        given = credential.encode()
        # Compare against every token, so timing reveals neither which nor how much matched.
        matches = [hmac.compare_digest(given, token) for token in self._tokens]
        return any(matches)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        target = _target(scope)
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        credential = caller_credential(headers)
        authorized = self._is_client_token(credential)

        if self._tokens is not None and not authorized and not (self.allow_byok and credential):
            await self._error(send, "authentication_error", "invalid or missing client token")
            return
        path = target.partition("?")[0]
        if self.admin and path.startswith(ADMIN_PREFIX):
            if self._tokens is not None and not authorized:
                await self._error(
                    send, "authentication_error", "admin endpoints need a client token"
                )
                return
            await self._admin(method, path, send)
            return

        byok = self.allow_byok and credential is not None and not authorized
        # Which credential goes upstream is the proxy's call; every other
        # header rule (hop-by-hop, Host, Connection options) is the client's.
        forwarded = [(n, v) for n, v in headers if byok or n not in CREDENTIAL_HEADERS]
        try:
            body = await self._read_body(headers, receive)
        except _BodyTooLarge:
            await self._error(
                send,
                "request_too_large",
                f"request body exceeds the limit of {self.max_body_bytes} bytes",
            )
            return
        except _ClientGone:
            return

        try:
            upstream = self.client.request(method, target, headers=forwarded, body=body)
        except ConfigError as exc:  # a method, path or header upstream cannot take
            await self._error(send, "invalid_request_error", str(exc))
            return
        # From here on the client may go away at any time: before the response
        # head (the upstream request is dropped) or while the body streams.
        watcher = asyncio.ensure_future(_close_on_disconnect(receive, upstream))
        try:
            try:
                response = await upstream
            except asyncio.CancelledError:
                if watcher.done():
                    return  # the client left before the response head
                raise
            except ConfigError as exc:
                await self._error(send, "invalid_request_error", str(exc))
                return
            log.info(
                "%s %s -> %d (attempts=%d, key=%s%s)",
                method,
                path,
                response.status,
                response.attempts,
                response.key_label or ("byok" if byok else "-"),
                ", pool exhausted" if response.exhausted else "",
            )
            await self._relay(response, send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _read_body(self, headers: list[tuple[str, str]], receive: Receive) -> bytes:
        for name, value in headers:
            length = value.strip()
            if name == "content-length" and length.isdigit() and int(length) > self.max_body_bytes:
                raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _relay(self, response: Response, send: Send) -> None:
        """Streams `response` out (a client disconnect closes it, ending the loop)."""
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (name.encode("latin-1"), value.encode("latin-1"))
                        for name, value in response.headers
                    ],
                }
            )
            # An UpstreamError from a broken non-SSE body propagates: the server
            # then aborts the connection rather than end a truncated body cleanly.
            async for chunk in response:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not response.closed:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were sending
        finally:
            await response.aclose()

    async def _admin(self, method: str, path: str, send: Send) -> None:
        pool = self.client.pool
        if path == ADMIN_PREFIX + "health" and method == "GET":
            await _json(send, 200, pool.health())
        elif path == ADMIN_PREFIX + "keys" and method == "GET":
            await _json(send, 200, {"keys": pool.snapshot()})
        else:
            await self._error(send, "invalid_request_error", f"no admin endpoint {method} {path}")

    async def _error(self, send: Send, error_type: str, message: str) -> None:
        status, body = error_response(error_type, message, provider=self.client.provider)
        await _send_body(send, status, body)


async def _close_on_disconnect(receive: Receive, upstream: asyncio.Future[Response]) -> None:
    """Once the client disconnects: drop the upstream request, or close its response."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not upstream.done():
        upstream.cancel()
    elif not upstream.cancelled() and upstream.exception() is None:
        await upstream.result().aclose()


def _target(scope: Scope) -> str:
    """The path below the mount (raw, as the caller encoded it) plus the query."""
    root: str = scope.get("root_path", "")
    raw: bytes | None = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope["path"]
    root = root.rstrip("/")
    if root and path.startswith(root):
        path = path[len(root) :]
    elif root:
        # raw_path is percent-encoded, root_path is not: match the mount segment by segment.
        parts = path.split("/")
        depth = root.count("/") + 1
        if unquote("/".join(parts[:depth])) == root:
            path = "/" + "/".join(parts[depth:])
    if not path.startswith("/"):
        path = "/" + path
    query: bytes = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _json(send: Send, status: int, obj: Any) -> None:
    await _send_body(send, status, json.dumps(obj).encode())


async def _send_body(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
