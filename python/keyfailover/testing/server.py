"""`MockUpstream`: the loopback HTTP/1.1 server, its connections and reply selection."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

from .http11 import _RequestParser
from .limits import Limit, RateLimiter
from .log import RecordedRequest, _credential
from .replies import Reply
from .routes import _default_reply
from .scenario import parse_scenario
from .wire import Plan, plan

_MAX_PIPELINE = 64


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
        with self._upstream._lock:
            self._upstream._accepted += 1

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        requests, error = self._parser.feed(data)
        for head, body in requests:
            request = RecordedRequest(
                head.method,
                head.path,
                head.query,
                head.headers,
                body,
                _credential(head.headers, head.query),
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
        if reply.stall > 0:
            self._reply_later(self._reply_slowly(request, reply, work))
        elif reply.reset_before_head:
            self.reset()
        else:
            writes = plan(reply, work.head_only, work.keep_alive)
            if writes.immediate:
                self._send_now(request, writes)
            else:
                self._reply_later(self._send_slowly(request, writes))

    def _reply_later(self, coro: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(coro)
        self._task.add_done_callback(self._on_slow_reply_done)

    def _send_now(self, request: RecordedRequest, writes: Plan) -> None:
        # Mark before writing: the client may read the reply and look at once.
        request.completed = writes.complete
        self._transport.write(b"".join(data for _, data in writes.writes))
        if not writes.keep_alive:
            self.close()

    async def _reply_slowly(self, request: RecordedRequest, reply: Reply, work: _Work) -> None:
        await asyncio.sleep(reply.stall)
        if reply.reset_before_head:
            self.reset()
            return
        await self._send_slowly(request, plan(reply, work.head_only, work.keep_alive))

    async def _send_slowly(self, request: RecordedRequest, writes: Plan) -> None:
        last = len(writes.writes) - 1
        for index, (wait, data) in enumerate(writes.writes):
            if wait > 0:
                await asyncio.sleep(wait)
            if index == last:
                request.completed = writes.complete
            self._transport.write(data)
            if self._writing_paused:
                self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
        if not writes.keep_alive:
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

    def _send_bad_request(self, message: str) -> None:
        reply = Reply.error(400, "invalid_request_error", f"malformed HTTP request: {message}")
        self._transport.write(b"".join(data for _, data in plan(reply, False, False).writes))
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
    """An HTTP/1.1 server on loopback, in a background thread, speaking the Anthropic,
    OpenAI, Azure OpenAI and Gemini APIs.

    Use as a context manager, or call `start()` / `stop()` (both idempotent).
    All public methods are thread-safe.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, limits: dict[str, Limit] | None = None
    ) -> None:
        self.host = host
        self._limiter = RateLimiter(limits or {})
        self._requested_port = port
        self._port: int | None = None
        self._lock = threading.Lock()  # guards the three collections below, and the count
        self._accepted = 0
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
        reply dicts are as for `Reply.from_dict` (the format is in
        docs/mock-upstream.md). The whole scenario is checked before any of it
        is applied: a mistake raises ValueError naming the field, such as
        ``queue[0].status: expected an HTTP status (100-999), got 1000``.
        """
        replies, queue = parse_scenario(scenario)
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

    @property
    def connections_accepted(self) -> int:
        """How many client connections the server has accepted so far (a client that
        keeps its connection alive makes one for many requests). `clear()` keeps it."""
        with self._lock:
            return self._accepted

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
        reply = reply if reply is not None else _default_reply(request)
        return self._limiter.apply(request, reply) if self._limiter else reply
