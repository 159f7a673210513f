"""Type stubs for the Rust core (`keyfailover._native`)."""

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final, final, overload

from keyfailover._errors import (
    ConfigError,
    InvalidRequestError,
    KeyfailoverError,
    PermanentExhaustion,
    PoolExhausted,
    TransientExhaustion,
    UnknownKeyError,
    UnreachableExhaustion,
    UpstreamError,
)

__all__ = [
    "ConfigError",
    "FailoverClient",
    "Forward",
    "Gateway",
    "InvalidRequestError",
    "Key",
    "KeyPool",
    "KeyState",
    "KeyfailoverError",
    "ManualClock",
    "PermanentExhaustion",
    "PoolExhausted",
    "Response",
    "Server",
    "SyncResponse",
    "TransientExhaustion",
    "UnknownKeyError",
    "UnreachableExhaustion",
    "UpstreamError",
    "Walker",
    "__version__",
    "error_response",
    "mark_key_on_response",
    "parse_keys",
    "parse_retry_after",
    "sse_error_event",
]

__version__: Final[str]

_Headers = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]]

@final
class KeyState:
    VALID: ClassVar[KeyState]
    TEMPORARY: ClassVar[KeyState]
    PERMANENT: ClassVar[KeyState]
    @property
    def value(self) -> str:
        """One of "valid", "temporary", "permanent"."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...

@final
class _PreparedReload:
    def commit(self) -> dict[str, Any]:
        """Puts the new keys in service; what changed, as `KeyPool.reload` returns it."""

@final
class ManualClock:
    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def advance(self, seconds: float) -> None: ...
    def now(self) -> float: ...

@final
class Key:
    def __new__(cls, value: str, *, group: str | None = None, base_url: str | None = None) -> Key:
        """A key to build a pool with: `KeyPool({"a": Key("sk-...", group="org-1")})`."""
    @property
    def label(self) -> str:
        """The key's label in its pool (ConfigError for a Key not in a pool)."""
    @property
    def hint(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def group(self) -> str | None: ...
    @property
    def base_url(self) -> str | None: ...
    @property
    def state(self) -> KeyState: ...
    @property
    def cooldown_remaining(self) -> float: ...
    def mark_temporary(self, cooldown: float | None = None) -> bool: ...
    def mark_permanent(self) -> bool: ...
    def reset(self) -> None: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Walker:
    def next(self) -> Key: ...

@final
class KeyPool:
    def __new__(
        cls,
        keys: Sequence[str | Key] | Mapping[str, str | Key],
        *,
        default_cooldown: float = 60.0,
        max_cooldown: float | None = None,
        quota_cooldown: float = 3600.0,
        clock: ManualClock | None = None,
        state: str | None = None,
        namespace: str = "default",
        strategy: str = "ordered",
    ) -> KeyPool: ...
    @property
    def strategy(self) -> str:
        """Where each walk starts: "ordered", "round_robin", "least_loaded" or "headroom"."""
    @property
    def state_backend(self) -> str:
        """Where key states live: "local", "shm" or "redis"."""
    @property
    def namespace(self) -> str: ...
    def reload(self, keys: Sequence[str | Key] | Mapping[str, str | Key]) -> dict[str, Any]:
        """Replaces the keys, keeping each unchanged key's state; returns what
        changed: {"added", "removed", "relabelled", "moved", "keys", "summary"}."""
    def _prepare_reload(
        self,
        keys: Sequence[str | Key] | Mapping[str, str | Key],
        *,
        strategy: str | None = None,
    ) -> _PreparedReload:
        """`reload`, made ready to take effect on `commit()`; dropped uncommitted,
        it changes nothing. `strategy`: the pool's from then on."""
    def sync_status(self) -> dict[str, str | bool | int | None]:
        """{"backend", "connected", "last_error", "pending"}."""
    def __len__(self) -> int: ...
    def states(self) -> list[KeyState]: ...
    def walker(self) -> Walker: ...
    def key(self, label: str) -> Key: ...
    def snapshot(self) -> list[dict[str, Any]]:
        """One dict per key: label, hint, state, cooldown_remaining, group,
        remaining and limit (by limit kind), in_flight."""
    def health(self) -> dict[str, str | dict[str, int]]: ...

def parse_retry_after(headers: _Headers, *, now: float | None = None) -> float | None: ...
def parse_keys(
    text: str, *, source: str = "keys", separators: str = "\n"
) -> list[str | Key] | dict[str, str | Key]:
    """Keys from a keys file's text: every key labelled (`label=key`) or none."""

def mark_key_on_response(
    key: Key,
    status: int,
    headers: _Headers | None = None,
    body: bytes | str | None = None,
) -> bool: ...

_Body = bytes | bytearray | str | None

@final
class FailoverClient:
    def __new__(
        cls,
        pool: KeyPool,
        *,
        base_url: str,
        provider: str = "anthropic",
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        http2: bool = True,
        name: str | None = None,
    ) -> FailoverClient: ...
    def request(
        self,
        method: str,
        path: str,
        *,
        headers: _Headers | None = None,
        body: _Body = None,
        credential: str | None = None,
    ) -> asyncio.Future[Response]:
        """Sends a request; the future resolves to the response head (after any
        failover). It is an asyncio Future, not a coroutine: schedule it with
        `asyncio.ensure_future`, not `create_task`."""
    def request_sync(
        self,
        method: str,
        path: str,
        *,
        headers: _Headers | None = None,
        body: _Body = None,
        credential: str | None = None,
    ) -> SyncResponse: ...
    @property
    def pool(self) -> KeyPool: ...
    @property
    def provider(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def name(self) -> str:
        """The pool's name in logs and metrics (the `pool` label)."""
    def metrics(self) -> str:
        """The pool's metrics in the Prometheus text exposition format."""
    def stats(self) -> dict[str, int]: ...
    def shutdown(self) -> None:
        """Ends every request in flight and refuses new ones (503)."""

@final
class Response:
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def attempts(self) -> int: ...
    @property
    def key_label(self) -> str | None: ...
    @property
    def exhausted(self) -> bool: ...
    @property
    def attempt_log(self) -> list[dict[str, str | int | float | None]]: ...
    @property
    def closed(self) -> bool: ...
    def read(self) -> Awaitable[bytes]: ...
    def __aiter__(self) -> Response: ...
    def __anext__(self) -> Awaitable[bytes]: ...
    def aclose(self) -> Awaitable[None]: ...
    def __aenter__(self) -> Awaitable[Response]: ...
    def __aexit__(self, *_args: object) -> Awaitable[None]: ...

@final
class SyncResponse:
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def attempts(self) -> int: ...
    @property
    def key_label(self) -> str | None: ...
    @property
    def exhausted(self) -> bool: ...
    @property
    def attempt_log(self) -> list[dict[str, str | int | float | None]]: ...
    @property
    def closed(self) -> bool: ...
    def read(self) -> bytes: ...
    def __iter__(self) -> SyncResponse: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None: ...
    def __enter__(self) -> SyncResponse: ...
    def __exit__(self, *_args: object) -> None: ...

def error_response(
    error_type: str, message: str, *, provider: str = "anthropic"
) -> tuple[int, bytes]: ...
@overload
def sse_error_event(error: str, message: str, *, provider: str = "anthropic") -> bytes: ...
@overload
def sse_error_event(
    error: KeyfailoverError, message: None = None, *, provider: str = "anthropic"
) -> bytes: ...

@final
class Forward:
    @property
    def byok(self) -> bool: ...
    def send(self, body: bytes) -> asyncio.Future[Response]: ...

@final
class Gateway:
    def __new__(
        cls,
        client: FailoverClient,
        *,
        client_tokens: Iterable[str] | None = None,
        allow_byok: bool = False,
        max_body_bytes: int = ...,
        body_timeout: float = 30.0,
        admin: bool = True,
        admin_tokens: Iterable[str] | None = None,
        reload: Callable[[], Sequence[str | Key] | Mapping[str, str | Key]] | None = None,
    ) -> Gateway: ...
    def begin(
        self,
        method: str,
        target: str | bytes,
        headers: _Headers,
        *,
        http_version: str | None = None,
    ) -> Response | Forward:
        """A `Response` to send as it is, or a `Forward` that wants the body; a head over
        64 KiB gets 431, and with `http_version="1.1"` one without exactly one Host 400."""
    def too_large(self) -> Response: ...
    def body_stalled(self) -> Response: ...
    def shutting_down(self) -> Response: ...
    def redact(self, text: str) -> str: ...
    def drain(self) -> None: ...
    def shutdown(self) -> None: ...
    @property
    def client(self) -> FailoverClient: ...
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def body_timeout(self) -> float: ...
    @property
    def allow_byok(self) -> bool: ...
    @property
    def has_client_tokens(self) -> bool: ...

@final
class Server:
    """The native HTTP server: `routes` are (prefix, Gateway) pairs ("" takes
    every path, and is then the only route; a prefix is a URL path without
    escapes and outside the admin areas, no `_keyfailover` segment, else
    ConfigError). `serve(fd)` blocks
    until `shutdown()` (or Ctrl-C) and the drain after it, with the GIL
    released."""

    def __new__(
        cls,
        routes: Sequence[tuple[str, Gateway]],
        *,
        header_timeout: float = 30.0,
        max_connections: int = 10_000,
        max_header_bytes: int = 65_536,
        grace: float = 10.0,
        http2: bool = True,
        access_log: str | None = None,
        admin_tokens: Sequence[str] | None = None,
    ) -> Server: ...
    def serve(self, fd: int) -> None:
        """Serves the listening socket `fd`, which it takes over (pass `sock.detach()`)."""
    def set_routes(self, routes: Sequence[tuple[str, Gateway]]) -> None:
        """Replaces the routes; requests in flight finish on the old ones."""
    def shutdown(self) -> None: ...
    @property
    def connections(self) -> int: ...

def _set_worker_threads(threads: int) -> None: ...
def _events_fd() -> int: ...
def _take_records() -> list[tuple[str, int, str, dict[str, str | int | float | None]]]: ...
def _set_log_threshold(level: int) -> None: ...
def _core_loggers() -> list[str]: ...
def _shm_path(namespace: str) -> str: ...
