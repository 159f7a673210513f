"""Type stubs for the Rust core (`keyfailover._native`)."""

import asyncio
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import ClassVar, Final, final

__all__ = [
    "ConfigError",
    "FailoverClient",
    "Key",
    "KeyPool",
    "KeyState",
    "KeyfailoverError",
    "ManualClock",
    "PermanentExhaustion",
    "PoolExhausted",
    "Response",
    "SyncResponse",
    "TransientExhaustion",
    "UpstreamError",
    "Walker",
    "__version__",
    "caller_credential",
    "error_response",
    "mark_key_on_response",
    "parse_retry_after",
    "sse_error_event",
]

__version__: Final[str]

_Headers = Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]]

class KeyfailoverError(Exception):
    """Base of every exception keyfailover raises."""

class ConfigError(KeyfailoverError, ValueError):
    """Invalid configuration or argument."""

class PoolExhausted(KeyfailoverError):
    """No key of the pool can take the request."""

class TransientExhaustion(PoolExhausted):
    retry_after: float
    def __init__(self, retry_after: float, message: str | None = None) -> None: ...

class PermanentExhaustion(PoolExhausted):
    def __init__(self, message: str = ...) -> None: ...

class UpstreamError(KeyfailoverError):
    """The upstream connection broke after the response had started."""

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
class ManualClock:
    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def advance(self, seconds: float) -> None: ...
    def now(self) -> float: ...

@final
class Key:
    @property
    def label(self) -> str: ...
    @property
    def hint(self) -> str: ...
    @property
    def value(self) -> str: ...
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
        keys: Sequence[str] | Mapping[str, str],
        *,
        default_cooldown: float = 60.0,
        max_cooldown: float | None = None,
        quota_cooldown: float = 3600.0,
        clock: ManualClock | None = None,
    ) -> KeyPool: ...
    def __len__(self) -> int: ...
    def states(self) -> list[KeyState]: ...
    def walker(self) -> Walker: ...
    def key(self, label: str) -> Key: ...
    def snapshot(self) -> list[dict[str, str | float]]: ...
    def health(self) -> dict[str, str | dict[str, int]]: ...

def parse_retry_after(headers: _Headers, *, now: float | None = None) -> float | None: ...
def caller_credential(headers: _Headers) -> str | None:
    """The caller's own key: a non-blank `x-api-key`, else an `Authorization:
    Bearer` token (the rule the client applies for BYOK)."""

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
    ) -> FailoverClient: ...
    def request(
        self,
        method: str,
        path: str,
        *,
        headers: _Headers | None = None,
        body: _Body = None,
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
    ) -> SyncResponse: ...
    @property
    def pool(self) -> KeyPool: ...
    @property
    def provider(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    def stats(self) -> dict[str, int]: ...

@final
class Response:
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def attempts(self) -> int: ...
    @property
    def key_label(self) -> str | None: ...
    @property
    def exhausted(self) -> bool: ...
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
    def attempts(self) -> int: ...
    @property
    def key_label(self) -> str | None: ...
    @property
    def exhausted(self) -> bool: ...
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
def sse_error_event(error: KeyfailoverError, *, provider: str = "anthropic") -> bytes: ...
