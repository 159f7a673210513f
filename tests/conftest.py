"""Shared fixtures and helpers.

The `mock_upstream` fixture comes from the package's own pytest plugin
(keyfailover.testing.plugin, entry point ``pytest11``); `up` is a short alias of
it. Test modules import the plain helpers from here: ``from conftest import ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

import keyfailover as kf
from keyfailover.testing import MockUpstream

T = TypeVar("T")

# Realistic-looking fake keys: long enough to be masked as "sk-a...0000", varied
# enough that any 8 characters of one are worth looking for in a leak check.
FAKE_KEYS = [f"sk-ant-fake-{i}Q7vZpL2mX9rT4wK8nB3yH6jD{i:04d}" for i in range(8)]
# The pool's default label of each key.
LABEL = {key: f"key-{i}" for i, key in enumerate(FAKE_KEYS)}

RATE_LIMITED = "all configured keys are rate-limited"
AUTH_FAILED = "all configured keys failed authentication"


def until_next_month() -> float:
    """Seconds until 00:00 UTC on the 1st of next month: a spend limit's cooldown."""
    now = datetime.now(timezone.utc)
    first = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return (first - now).total_seconds()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion on a new event loop (the tests use no pytest-asyncio)."""
    return asyncio.run(coro)


def make_client(
    upstream: MockUpstream | str,
    provider: str = "anthropic",
    n: int = 2,
    *,
    clock: kf.ManualClock | None = None,
    **options: Any,
) -> tuple[kf.FailoverClient, kf.KeyPool]:
    """A FailoverClient for `upstream` (a MockUpstream or a base URL) over the first `n`
    fake keys, labelled key-0, key-1, ..., on a ManualClock (`clock`, else a new one);
    `options` go to FailoverClient. Returns the client and its pool."""
    pool = kf.KeyPool(FAKE_KEYS[:n], clock=clock or kf.ManualClock())
    base_url = upstream if isinstance(upstream, str) else upstream.url
    return kf.FailoverClient(pool, base_url=base_url, provider=provider, **options), pool


def header(resp: kf.Response | kf.SyncResponse, name: str) -> str | None:
    """The first value of response header `name` (names are lowercase)."""
    return next((value for key, value in resp.headers if key == name), None)


def states(pool: kf.KeyPool) -> list[str]:
    return [state.value for state in pool.states()]


def seen(up: MockUpstream) -> list[str]:
    """The pool labels (or the raw credential, e.g. BYOK) upstream saw, in order."""
    return [LABEL.get(r.credential or "", r.credential or "") for r in up.requests]


# Runs in a child process: one POST /v1/messages through a one-key FailoverClient at
# argv[1] (anthropic), its status and body printed as JSON.
_CHILD_REQUEST = textwrap.dedent(
    """
    import asyncio, json, sys
    import keyfailover as kf

    base_url, key, timeout, connect_timeout, count, warm, http2 = sys.argv[1:8]
    client = kf.FailoverClient(
        kf.KeyPool([key]),
        base_url=base_url,
        timeout=float(timeout),
        connect_timeout=float(connect_timeout),
        http2=http2 == "1",
    )
    args = ("POST", "/v1/messages")
    kwargs = {"headers": [("content-type", "application/json")], "body": b"{}"}

    async def one():
        resp = await client.request(*args, **kwargs)
        return {"status": resp.status, "body": (await resp.read()).decode()}

    async def all_at_once():
        if warm == "1":
            await one()
        return await asyncio.gather(*(one() for _ in range(int(count))))

    if count == "1":
        resp = client.request_sync(*args, **kwargs)
        print(json.dumps({"status": resp.status, "body": resp.read().decode()}))
    else:
        print(json.dumps({"all": asyncio.run(all_at_once())}))
    """
)


def request_in_child(
    base_url: str,
    key: str,
    *,
    timeout: float = 5.0,
    connect_timeout: float = 5.0,
    requests: int = 1,
    warm: bool = False,
    http2: bool = True,
    **env: str,
) -> dict[str, Any]:
    """One request from a fresh Python process whose environment is this one's without any
    proxy or CA variable, plus `env`: for what the client reads from the environment as
    it is built. Returns {"status": ..., "body": ...}, or with `requests` above 1, that
    many sent at once on a cold pool (`warm`: after one request, whose answer is left
    out), {"all": [{"status": ..., "body": ...}, ...]}; checks the key is not in its
    output."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD_REQUEST,
            base_url,
            key,
            str(timeout),
            str(connect_timeout),
            str(requests),
            "1" if warm else "0",
            "1" if http2 else "0",
        ],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout + done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def read_head(conn: socket.socket) -> tuple[str, dict[str, str]]:
    """Reads an HTTP/1.1 head from `conn`: its first line and its fields (names lowercase).
    Bytes after the head are dropped; ("", {}) if the peer closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return "", {}
        data += chunk
    first, *lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines)
    return first, {name.strip().lower(): value.strip() for name, _, value in fields}


class LoopbackServer:
    """A TCP listener on 127.0.0.1 whose thread hands each connection, one at a time (or,
    `threaded`, each on a thread of its own), to `handle` (which subclasses define) and
    then closes it. Use as a context manager."""

    scheme = "http"
    threaded = False

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.sock.getsockname()[1]}"

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        threads: list[threading.Thread] = []
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            if self.threaded:
                threads.append(threading.Thread(target=self._handle, args=(conn,), daemon=True))
                threads[-1].start()
            else:
                self._handle(conn)
        for thread in threads:
            thread.join(5)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            # OSError: the client went; what it sent is recorded already.
            with contextlib.suppress(OSError):
                self.handle(conn)


def wait_listening(proc: subprocess.Popen[str], port: int, timeout: float = 15) -> None:
    """Until `proc` (a server starting) takes connections on `port`; its output in the
    assertion if it exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(proc.communicate()) from None
            time.sleep(0.05)


def free_port() -> int:
    """A loopback port with nothing listening on it (for "connection refused")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def up(mock_upstream: MockUpstream) -> MockUpstream:
    """The plugin's `mock_upstream` fixture, under a short name."""
    return mock_upstream


@pytest.fixture
def clock() -> kf.ManualClock:
    return kf.ManualClock()


@pytest.fixture
def make_pool(clock: kf.ManualClock) -> Callable[..., kf.KeyPool]:
    def make(n: int = 3, **kwargs: Any) -> kf.KeyPool:
        return kf.KeyPool(FAKE_KEYS[:n], clock=clock, **kwargs)

    return make


def _mapped_files() -> set[str]:
    """Every file some process on this machine has mapped (as far as we may see)."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                mapped.add(fields[5])
    return mapped


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs the command line in this process configures logging
    (a handler on the test's captured stderr, closed after it) and has the core
    drop records below its log level, as `serve` does: not for the tests after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    kf._native._set_log_threshold(0)


@pytest.fixture(scope="session", autouse=True)
def _remove_shared_state_files() -> Iterator[None]:
    """The shared-memory state files the tests create (one per namespace) stay
    after their pools are gone, by design; remove this session's once no
    process maps them, so that test runs do not fill /dev/shm."""
    directory, ours = Path(kf._native._shm_path("x")).parent, f"keyfailover-{os.getuid()}-*"
    before = set(directory.glob(ours))
    yield
    mapped = _mapped_files()
    for path in set(directory.glob(ours)) - before:
        if str(path) not in mapped:
            path.unlink(missing_ok=True)
