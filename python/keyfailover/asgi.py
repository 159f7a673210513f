"""FailoverProxy: an ASGI app that forwards requests through a FailoverClient.

Mount it in FastAPI (or any ASGI framework) and point an SDK at the mount::

    app.mount("/anthropic", FailoverProxy(client))
    anthropic.Anthropic(base_url="http://host/anthropic", api_key="...")

This module is ASGI plumbing only. Who may use the pool, whose key a request
goes with, what is refused and what the admin endpoints answer is decided by
the Rust core's `Gateway`; which key serves a request, and what an upstream
answer means for it, by the `FailoverClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any
from urllib.parse import unquote

from keyfailover import _tracing
from keyfailover._native import FailoverClient, Gateway, Key, Response

__all__ = ["FailoverProxy"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("keyfailover.proxy")

# What a reload callback returns: keys in the forms KeyPool takes.
Keys = Sequence[str | Key] | Mapping[str, str | Key]


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _BodyStalled(Exception):
    pass


class _Expired(Exception):
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
    - `body_timeout`: a request body that pauses for longer than this many
      seconds gets 408 and a closed connection (a slowloris on the body;
      ASGI servers bound only the wait for the request head).
    - `admin`: serve the admin endpoints below `/_keyfailover/` (health,
      keys, metrics, probes, the dashboard, and the key actions).
    - `admin_tokens`: tokens for the admin endpoints only. Admin actions need
      a client or admin token: without either, they are refused.
    - `reload`: a callable returning the keys (the forms `KeyPool` takes) for
      `POST /_keyfailover/reload`; without it that endpoint does not exist.

    Bad arguments raise `ConfigError`.
    """

    def __init__(
        self,
        client: FailoverClient,
        *,
        client_tokens: Iterable[str] | None = None,
        allow_byok: bool = False,
        max_body_bytes: int = 32 * 1024 * 1024,
        body_timeout: float = 30.0,
        admin: bool = True,
        admin_tokens: Iterable[str] | None = None,
        reload: Callable[[], Keys] | None = None,
    ) -> None:
        self.gateway = Gateway(
            client,
            client_tokens=client_tokens,
            allow_byok=allow_byok,
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
            admin=admin,
            admin_tokens=admin_tokens,
            reload=reload,
        )
        self.client = client
        # Receives of request bodies that had to wait (see `_receive`): the grace
        # period's end interrupts them.
        self._waiting: set[_Interrupt] = set()

    def __repr__(self) -> str:
        auth = "client tokens" if self.gateway.has_client_tokens else "no client tokens"
        return f"FailoverProxy({self.client!r}, {auth}, allow_byok={self.gateway.allow_byok})"

    def shutdown(self) -> None:
        """End every request in flight: for a server's shutdown after its grace period.

        Requests waiting for upstream or still receiving their bodies get 503, streams end
        with an SSE error event.
        """
        self.gateway.shutdown()
        # Called from any thread (`serve` calls it from a timer's): each receive is
        # cancelled on its own loop.
        for waiting in list(self._waiting):
            waiting.task.get_loop().call_soon_threadsafe(waiting.fire, _Expired)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {scope['type']!r}")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake gets the gateway's answer to a protocol upgrade, as on the
        native server (401 without a client token, else 400, in the provider's envelope),
        where the server can send an HTTP answer to a handshake (the ASGI extension
        `websocket.http.response`: uvicorn's); elsewhere it is closed before it is accepted,
        which the server answers with a bare 403."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1003})
            return
        if (await receive())["type"] != "websocket.connect":
            return  # the client left
        started = time.perf_counter()
        target = _target(scope)
        root = _mount(scope)
        step = self.gateway.begin("GET", target, scope["headers"])
        if not isinstance(step, Response):  # never for a handshake (it asks for an upgrade)
            await send({"type": "websocket.close", "code": 1003})
            return
        self._access("GET", root + target, step, started, byok=False)
        body = await step.read()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": step.status,
                "headers": step.raw_headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        target = _target(scope)
        root = _mount(scope)  # for the access log, as the native server shows its routes'
        step = self.gateway.begin(
            method, target, scope["headers"], http_version=scope.get("http_version")
        )
        if isinstance(step, Response):
            # An answer of the gateway's own; the dashboard's event stream
            # among them never ends by itself: stop it when the client leaves.
            self._access(method, root + target, step, started, byok=False)
            answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            answered.set_result(step)
            watcher = asyncio.ensure_future(_close_on_disconnect(receive, answered))
            try:
                await _relay(step, send)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            return
        try:
            body = await self._read_body(receive)
        except _BodyTooLarge:
            too_large = self.gateway.too_large()
            self._access(method, root + target, too_large, started, byok=step.byok)
            await _relay(too_large, send)
            return
        except _BodyStalled:
            stalled = self.gateway.body_stalled()
            self._access(method, root + target, stalled, started, byok=step.byok)
            await _relay(stalled, send)
            return
        except _Expired:
            refused = self.gateway.shutting_down()
            self._access(method, root + target, refused, started, byok=step.byok)
            await _relay(refused, send)
            return
        except _ClientGone:
            return
        tracer = _tracing.tracer()
        span = None
        if tracer is not None:
            span = _tracing.RequestSpan(
                tracer, self.client, target, body, server=True, headers=scope["headers"]
            )
        upstream = step.send(body)
        # From here on the client may go away at any time: before the response
        # head (the upstream request is dropped) or while the body streams.
        watcher = asyncio.ensure_future(_close_on_disconnect(receive, upstream))
        try:
            try:
                response = await upstream
            except asyncio.CancelledError as cancelled:
                if watcher.done():  # the client left before the response head
                    if span is not None:
                        span.fail(cancelled)  # its attempts are unknown: no answer came
                    return
                raise
            if span is not None:
                span.attempts(response)
            self._access(method, root + target, response, started, byok=step.byok)
            await _relay(response, send)
        except BaseException as error:
            if span is not None:
                span.fail(error)
            raise
        finally:
            if span is not None:
                span.end()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    def _access(
        self, method: str, target: str, response: Response, started: float, *, byok: bool
    ) -> None:
        """The request's line on `keyfailover.proxy`, as the native server's access log has
        it: every request answered, forwarded or not."""
        if not log.isEnabledFor(logging.INFO):
            return
        # A caller may put a key in a path (an admin action naming a key by its value).
        path, key = self.gateway.redact(target.partition("?")[0]), response.key_label
        took = (time.perf_counter() - started) * 1000
        log.info(
            "%s %s -> %d (attempts=%d, key=%s, %.1f ms%s)",
            method,
            path,
            response.status,
            response.attempts,
            key or ("byok" if byok else "-"),
            took,
            ", pool exhausted" if response.exhausted else "",
            extra={
                "method": method,
                "path": path,
                "status": response.status,
                "attempts": response.attempts,
                "key": key,
                "pool": self.client.name,
                "duration_ms": round(took, 3),
            },
        )

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.gateway.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive(receive)
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _receive(self, receive: Receive) -> Message:
        """`receive()`, bounded by `body_timeout` (raising _BodyStalled) and by the end of
        the grace period (_Expired). A message already there, as a small body usually is,
        costs no timer: only a receive that has to wait gets one."""
        # Stepped as `await` would: servers' awaitables need not be coroutines (granian's
        # iterator has `__next__` only, no `send` or `throw`).
        step = receive().__await__()
        try:
            blocked_on = next(step)
        except StopIteration as done:
            message: Message = done.value
            return message
        # It waits: the rest of it runs in this task too, as it must (a receive may
        # enter a cancel scope or set a context variable that it leaves when done, as
        # Starlette's BaseHTTPMiddleware and OpenTelemetry's do), under a timer that
        # interrupts it.
        task = asyncio.current_task()
        assert task is not None  # an ASGI app runs in a task
        interrupt = _Interrupt(task)
        timer = task.get_loop().call_later(self.gateway.body_timeout, interrupt.fire, _BodyStalled)
        self._waiting.add(interrupt)
        try:
            message = await _Resumed(step, blocked_on)
        except asyncio.CancelledError:
            if interrupt.why is None:
                raise
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            raise interrupt.why from None
        finally:
            timer.cancel()
            self._waiting.discard(interrupt)
        return message


class _Interrupt:
    """Interrupts a task's receive of its request body, for `why`: the body stalled, or
    the grace period ended. Fired on the task's loop; once only."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.why: type[Exception] | None = None

    def fire(self, why: type[Exception]) -> None:
        if self.why is None and not self.task.done():
            self.why = why
            self.task.cancel()


class _Resumed:
    """The rest of an awaitable that was stepped once and is blocked on `blocked_on`:
    awaiting this goes on with it exactly where `await` would have (`yield from`, PEP 380:
    an iterator without `send` is resumed with `next`, one without `throw` has an
    exception raised here instead, and one closed here is closed in turn)."""

    def __init__(self, step: Iterator[Any], blocked_on: Any) -> None:
        self.step, self.blocked_on = step, blocked_on

    def __await__(self) -> Generator[Any, Any, Message]:
        step, blocked_on = self.step, self.blocked_on
        while True:
            try:
                sent = yield blocked_on
            except GeneratorExit:
                close = getattr(step, "close", None)
                if close is not None:
                    close()
                raise
            except BaseException as error:  # a cancellation, thrown in: pass it on
                throw = getattr(step, "throw", None)
                if throw is None:
                    raise
                try:
                    blocked_on = throw(error)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    blocked_on = next(step) if sent is None else step.send(sent)  # type: ignore[attr-defined]
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


async def _relay(response: Response, send: Send) -> None:
    """Streams `response` out (a client disconnect closes it, ending the loop)."""
    try:
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": response.raw_headers,
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


async def _close_on_disconnect(receive: Receive, upstream: asyncio.Future[Response]) -> None:
    """Once the client disconnects: drop the upstream request, or close its response."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not upstream.done():
        upstream.cancel()
    elif not upstream.cancelled() and upstream.exception() is None:
        await upstream.result().aclose()


def _mount(scope: Scope) -> str:
    """Where the app is mounted (`root_path`), without its trailing slash: "" at /."""
    root: str = scope.get("root_path", "")
    return root.rstrip("/")


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
    if not path.startswith("/") and path != "*":  # `OPTIONS *` is refused as it is
        path = "/" + path
    query: bytes = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path
