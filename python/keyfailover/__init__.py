"""keyfailover: fail each LLM API request over to the next usable key.

The key pool, Retry-After parsing and the marking rules live in the Rust core
(`keyfailover._native`); this package re-exports them.
"""

from keyfailover._native import (
    ConfigError,
    Key,
    KeyfailoverError,
    KeyPool,
    KeyState,
    ManualClock,
    PermanentExhaustion,
    PoolExhausted,
    TransientExhaustion,
    UpstreamError,
    Walker,
    __version__,
    mark_key_on_response,
    parse_retry_after,
)

__all__ = [
    "ConfigError",
    "Key",
    "KeyPool",
    "KeyState",
    "KeyfailoverError",
    "ManualClock",
    "PermanentExhaustion",
    "PoolExhausted",
    "TransientExhaustion",
    "UpstreamError",
    "Walker",
    "__version__",
    "mark_key_on_response",
    "parse_retry_after",
]
