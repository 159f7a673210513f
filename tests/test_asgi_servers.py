"""FailoverProxy reads request bodies through whatever `receive` an ASGI server hands it.

uvicorn's `receive()` is a coroutine; granian's returns an awaitable whose iterator has
`__next__` only (no `send`, no `throw`). FailoverProxy steps that awaitable itself (so a
body already there costs no timer) and must do it exactly as `await` would, for both.
These tests run it under granian itself, and against a `receive` shaped like granian's;
under granian, a client leaving a stream also ends the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_KEYS, free_port, make_client

from keyfailover.asgi import FailoverProxy
from keyfailover.testing import MockUpstream

TOKEN = "kf-team-token-granian"
MESSAGE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
BODY = json.dumps(MESSAGE).encode()


# --------------------------------------------------------------------------
# A receive() shaped like granian's
# --------------------------------------------------------------------------


class _NextOnly:
    """An awaitable like granian's: `__await__` gives an iterator with `__next__` only,
    which yields a future until the message is there."""

    def __init__(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self.future = future

    def __await__(self) -> _NextOnly:
        return self

    def __iter__(self) -> _NextOnly:
        return self

    def __next__(self) -> Any:
        if self.future.done():
            raise StopIteration(self.future.result())
        # As a future's own `__await__` does: the task waits on it, then steps again.
        self.future._asyncio_future_blocking = True
        return self.future


def granian_like(messages: list[tuple[float, dict[str, Any]]]) -> Any:
    """A `receive` whose calls return `_NextOnly` awaitables: each message after its delay
    (0: already there), then nothing more (the client keeps the connection open)."""
    pending = list(messages)

    def receive() -> _NextOnly:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        if pending:
            delay, message = pending.pop(0)
            if delay:
                loop.call_later(delay, future.set_result, message)
            else:
                future.set_result(message)
        return _NextOnly(future)

    return receive


def run_request(proxy: FailoverProxy, receive: Any) -> tuple[int, dict[str, Any]]:
    """One POST through `proxy` as an ASGI app; its status and JSON body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
        "query_string": b"",
        "headers": [
            (b"host", b"proxy"),
            (b"x-api-key", TOKEN.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        await asyncio.wait_for(proxy(scope, receive, send), 10)

    asyncio.run(main())
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body)


@pytest.mark.parametrize(
    "messages",
    [
        [(0, {"type": "http.request", "body": BODY, "more_body": False})],
        [(0.05, {"type": "http.request", "body": BODY, "more_body": False})],
        [
            (0, {"type": "http.request", "body": BODY[:20], "more_body": True}),
            (0.05, {"type": "http.request", "body": BODY[20:], "more_body": False}),
        ],
    ],
    ids=["there-at-once", "after-a-wait", "in-two-parts"],
)
def test_a_body_from_a_next_only_awaitable_is_read_whole(up, messages):
    client, _ = make_client(up, "anthropic", 1)
    status, answer = run_request(
        FailoverProxy(client, client_tokens=[TOKEN]), granian_like(messages)
    )
    assert status == 200, answer
    assert answer["type"] == "message"
    assert up.requests[0].json() == MESSAGE


# --------------------------------------------------------------------------
# Middleware around the proxy
# --------------------------------------------------------------------------


def test_behind_starlettes_base_http_middleware_requests_go_through(up):
    """`@app.middleware("http")` wraps `receive` in an anyio cancel scope that must be
    left in the task that entered it: the proxy reads the body in the request's task."""
    import httpx
    from fastapi import FastAPI

    from keyfailover.testing import serve_asgi

    client, _ = make_client(up, "anthropic", 1)
    app = FastAPI()

    @app.middleware("http")
    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    app.mount("/anthropic", FailoverProxy(client, client_tokens=[TOKEN]))

    def slow_body() -> Iterator[bytes]:  # chunked, the rest a while later: a receive waits
        yield BODY[:10]
        time.sleep(0.2)
        yield BODY[10:]

    headers = {"x-api-key": TOKEN}
    with serve_asgi(app) as url, httpx.Client(base_url=url, headers=headers) as http:
        posted = http.post("/anthropic/v1/messages", content=BODY)
        slow = http.post("/anthropic/v1/messages", content=slow_body())
        listed = http.get("/anthropic/v1/models")
    assert [posted.status_code, slow.status_code, listed.status_code] == [200, 200, 200]
    assert slow.json()["type"] == "message"
    assert [r.json() for r in up.requests[:2]] == [MESSAGE, MESSAGE]


def test_a_receive_that_sets_and_resets_a_context_variable_works(up):
    """As OpenTelemetry's ASGI middleware does around each receive: the reset must happen
    in the context (the task) of the set, also for a receive that has to wait."""
    import contextvars

    current: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="")
    client, _ = make_client(up, "anthropic", 1)
    proxy = FailoverProxy(client, client_tokens=[TOKEN])
    inner = granian_like([(0, {"type": "http.request", "body": BODY[:10], "more_body": True}),
                          (0.1, {"type": "http.request", "body": BODY[10:]})])  # fmt: skip

    async def receive() -> dict[str, Any]:
        token = current.set("receiving")
        try:
            return await inner()  # type: ignore[no-any-return]
        finally:
            current.reset(token)

    status, answer = run_request(proxy, receive)
    assert status == 200, answer
    assert up.requests[0].json() == MESSAGE


def test_a_next_only_awaitable_that_stalls_gets_408(up):
    client, _ = make_client(up, "anthropic", 1)
    proxy = FailoverProxy(client, client_tokens=[TOKEN], body_timeout=0.2)
    partial = [(0, {"type": "http.request", "body": BODY[:10], "more_body": True})]
    started = time.monotonic()
    status, answer = run_request(proxy, granian_like(partial))
    assert status == 408
    assert "paused for longer than 0.2 s" in answer["error"]["message"]
    assert time.monotonic() - started < 2
    assert up.requests == []


def test_a_next_only_awaitable_waiting_at_shutdown_gets_503(up):
    client, _ = make_client(up, "anthropic", 1)
    proxy = FailoverProxy(client, client_tokens=[TOKEN], body_timeout=30)
    partial = [(0, {"type": "http.request", "body": BODY[:10], "more_body": True})]

    def receive_and_shut_down() -> Any:
        receive = granian_like(partial)
        calls = 0

        def wrapped() -> _NextOnly:
            nonlocal calls
            calls += 1
            if calls == 2:  # the receive that has to wait: end the grace period meanwhile
                asyncio.get_running_loop().call_later(0.1, proxy.shutdown)
            return receive()  # type: ignore[no-any-return]

        return wrapped

    status, answer = run_request(proxy, receive_and_shut_down())
    assert status == 503
    assert answer["error"]["message"] == "the server is shutting down"
    assert up.requests == []


# --------------------------------------------------------------------------
# Under granian itself
# --------------------------------------------------------------------------

GRANIAN = shutil.which("granian") or str(Path(sys.executable).with_name("granian"))

APP = """
import os
from keyfailover import FailoverClient, KeyPool
from keyfailover.asgi import FailoverProxy

app = FailoverProxy(
    FailoverClient(KeyPool([os.environ["KF_KEY"]]), base_url=os.environ["KF_UP"]),
    client_tokens=[os.environ["KF_TOKEN"]],
    body_timeout=0.5,
)
"""


@pytest.fixture
def granian_url(up: MockUpstream, tmp_path: Path) -> Iterator[str]:
    if not Path(GRANIAN).exists():
        pytest.skip("granian is not installed (the test extra installs it)")
    (tmp_path / "granian_app.py").write_text(textwrap.dedent(APP))
    port = free_port()
    env = {**os.environ, "KF_UP": up.url, "KF_KEY": FAKE_KEYS[0], "KF_TOKEN": TOKEN}
    args = [GRANIAN, "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", "1", "--working-dir", str(tmp_path), "granian_app:app"]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    errors = proc.communicate()[1][-2000:]
                    raise RuntimeError(f"granian did not start: {errors}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            _, errors = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, errors = proc.communicate()
    # Nothing went wrong inside the app (granian answers 500 and logs the traceback).
    assert "Traceback" not in errors, errors[-3000:]


def post(address: str, body: bytes, *, pause: float = 0.0, length: int | None = None) -> bytes:
    """A POST whose body goes in 20-byte pieces `pause` s apart; the whole answer."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            "POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n"
            f"x-api-key: {TOKEN}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body) if length is None else length}\r\n\r\n"
        )
        sock.sendall(head.encode())
        for i in range(0, len(body), 20):
            time.sleep(pause)
            sock.sendall(body[i : i + 20])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status_and_json(answer: bytes) -> tuple[int, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("pause", [0.0, 0.1], ids=["at-once", "slowly"])
def test_under_granian_a_body_reaches_upstream_whole(up, granian_url, pause):
    status, answer = status_and_json(post(granian_url, BODY, pause=pause))
    assert status == 200, answer
    assert answer["type"] == "message"
    assert up.requests[0].json() == MESSAGE


def test_under_granian_a_stalled_body_gets_408(up, granian_url):
    status, answer = status_and_json(post(granian_url, BODY[:30], length=len(BODY)))
    assert status == 408, answer
    assert "paused for longer than 0.5 s" in answer["error"]["message"]
    assert up.requests == []


def test_under_granian_a_client_leaving_a_stream_closes_upstream(up, granian_url):
    from keyfailover.testing import Reply, anthropic_stream_events

    up.enqueue(Reply.sse(anthropic_stream_events(" ".join(["word"] * 40)), chunk_delay=0.1))
    host, port = granian_url.split(":")
    body = json.dumps({**MESSAGE, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nx-api-key: {TOKEN}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        received = b""
        while b"event: message_start" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    left = time.monotonic()
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=2)
    assert time.monotonic() - left < 0.5
    assert not up.requests[0].completed
