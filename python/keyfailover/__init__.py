"""keyfailover: fail each LLM API request over to the next usable key.

The key pool, Retry-After parsing and the marking rules live in the Rust core
(`keyfailover._native`); this package re-exports them.
"""

from keyfailover import _logging  # noqa: F401  (starts handing core log records to logging)
from keyfailover._native import (
    ConfigError,
    FailoverClient,
    InvalidRequestError,
    Key,
    KeyfailoverError,
    KeyPool,
    KeyState,
    ManualClock,
    PermanentExhaustion,
    PoolExhausted,
    Response,
    SyncResponse,
    TransientExhaustion,
    UnknownKeyError,
    UnreachableExhaustion,
    UpstreamError,
    Walker,
    __version__,
    error_response,
    mark_key_on_response,
    parse_keys,
    parse_retry_after,
    sse_error_event,
)

__all__ = [
    "ConfigError",
    "FailoverClient",
    "InvalidRequestError",
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
