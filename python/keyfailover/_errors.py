"""The exception hierarchy of keyfailover.

The Rust core raises these (its one mapping is `src/python/errors.rs`); they
live in Python so that an exception can be both a `KeyfailoverError` and a
`ValueError` or `KeyError`, which a Rust-defined class cannot.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InvalidRequestError",
    "KeyfailoverError",
    "PermanentExhaustion",
    "PoolExhausted",
    "TransientExhaustion",
    "UnknownKeyError",
    "UnreachableExhaustion",
    "UpstreamError",
]


class KeyfailoverError(Exception):
    """Base of every exception keyfailover raises."""


class ConfigError(KeyfailoverError, ValueError):
    """Invalid configuration or argument."""


class InvalidRequestError(KeyfailoverError, ValueError):
    """A request that cannot be sent: a bad method, path or header."""


class UnknownKeyError(KeyfailoverError, KeyError):
    """`KeyPool.key(label)` with a label the pool does not have."""

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its argument; this is a message.
        return str(self.args[0]) if self.args else ""


class PoolExhausted(KeyfailoverError):
    """No key of the pool can take the request."""


class TransientExhaustion(PoolExhausted):
    """Every key is cooling down or retired; `retry_after` is the smallest
    remaining cooldown in seconds (0.0 when a key is valid again)."""

    retry_after: float

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = float(retry_after)
        if message is None:
            message = f"all configured keys are rate-limited (retry after {self.retry_after:.3f} s)"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[TransientExhaustion], tuple[float, str]]:
        return (type(self), (self.retry_after, str(self)))


class UnreachableExhaustion(TransientExhaustion):
    """Every key that is not retired cools down because its own endpoint (a
    per-key `base_url`) could not be reached, timed out or answered 504;
    `retry_after` is the smallest remaining cooldown in seconds."""

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        if message is None:
            message = (
                "the endpoints of all configured keys are unreachable "
                f"(retry after {float(retry_after):.3f} s)"
            )
        super().__init__(retry_after, message)


class PermanentExhaustion(PoolExhausted):
    """Every key failed authentication and is retired."""

    def __init__(self, message: str = "all configured keys failed authentication") -> None:
        super().__init__(message)


class UpstreamError(KeyfailoverError):
    """The upstream connection broke after the response had started."""


for _cls in (
    KeyfailoverError,
    ConfigError,
    InvalidRequestError,
    UnknownKeyError,
    PoolExhausted,
    TransientExhaustion,
    UnreachableExhaustion,
    PermanentExhaustion,
    UpstreamError,
):
    _cls.__module__ = "keyfailover"
del _cls
