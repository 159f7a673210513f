"""The pure-Python baseline: what a Python user would otherwise write.

A Starlette app forwarding every request below its mount to one upstream
through one shared `httpx2.AsyncClient` (pooled keep-alive connections),
streaming response bodies through as they arrive, with the same failover
rules as keyfailover:

- walk the keys in order, skipping the ones cooling down or retired;
- 429: cool the key down for the upstream's `retry-after-ms` / `Retry-After`
  (seconds or HTTP-date; 60 s when missing), then try the next key;
- 401 / 403: retire the key, then try the next one;
- any other answer goes back to the caller unchanged;
- no key left: 429 with the shortest `Retry-After`, or 502 when every key
  was retired.

Callers authenticate with a client token (`x-api-key` or `Authorization:
Bearer`), compared in constant time; their credentials are never forwarded.
Hop-by-hop headers are dropped both ways. Used by `benches/run.py`; to try it
by hand::

    app = create_app("http://127.0.0.1:9000", ["sk-ant-one", "sk-ant-two"], client_tokens=["t"])
    uvicorn.run(app)
"""

from __future__ import annotations

import contextlib
import email.utils
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = ["KeyPool", "create_app", "parse_retry_after"]

DEFAULT_COOLDOWN = 60.0
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers never forwarded: hop-by-hop, the ones httpx2 sets itself,
# the caller's credentials (the pool's key replaces them) and accept-encoding
# (identity is asked for, so error bodies and streams can be read as sent).
NOT_FORWARDED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"x-api-key",
    b"authorization",
    b"accept-encoding",
}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def parse_retry_after(headers: httpx2.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `Retry-After`; None when neither is usable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            seconds = float(millis) / 1000
            if 0 < seconds < math.inf:
                return seconds
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        seconds = when - (time.time() if now is None else now)
    return seconds if 0 < seconds < math.inf else None


class Key:
    __slots__ = ("cooldown_until", "retired", "value")

    def __init__(self, value: str) -> None:
        self.value = value
        self.cooldown_until = 0.0
        self.retired = False


class KeyPool:
    """Keys in order; each is usable, cooling down until a monotonic time, or retired."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("a pool needs at least one key")
        self.keys = [Key(value) for value in keys]

    def walk(self) -> Iterator[Key]:
        """The keys usable at the moment each is reached, in order."""
        for key in self.keys:
            if not key.retired and key.cooldown_until <= time.monotonic():
                yield key

    def cool_down(self, key: Key, seconds: float | None) -> None:
        # A cooldown never shortens an existing one.
        until = time.monotonic() + (seconds or DEFAULT_COOLDOWN)
        key.cooldown_until = max(key.cooldown_until, until)

    def exhausted(self) -> Response:
        """The answer when no key is left: 429 with the shortest wait, or 502."""
        now = time.monotonic()
        waits = [key.cooldown_until - now for key in self.keys if not key.retired]
        if not waits:
            return error(502, "api_error", "all configured keys failed authentication")
        retry_after = str(max(1, math.ceil(min(waits))))
        return error(
            429,
            "rate_limit_error",
            "all configured keys are rate-limited",
            headers={"retry-after": retry_after},
        )


def error(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """An error in the Anthropic envelope."""
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _caller_credential(request: Request) -> str | None:
    api_key = request.headers.get("x-api-key")
    if api_key and api_key.strip():
        return api_key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _target(request: Request) -> str:
    """The path below the mount, with the query string."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _relay(upstream: httpx2.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()


def create_app(
    upstream: str,
    keys: Sequence[str],
    *,
    client_tokens: Sequence[str] | None = None,
    timeout: float = 600.0,
    connect_timeout: float = 10.0,
) -> Starlette:
    """A Starlette app proxying to `upstream` with failover across `keys`."""
    pool = KeyPool(keys)
    tokens = None if client_tokens is None else [token.encode() for token in client_tokens]
    client = httpx2.AsyncClient(
        base_url=upstream,
        limits=httpx2.Limits(max_connections=None, max_keepalive_connections=1024),
        timeout=httpx2.Timeout(timeout, connect=connect_timeout),
    )

    def authorized(request: Request) -> bool:
        if tokens is None:
            return True
        given = (_caller_credential(request) or "").encode()
        return any([hmac.compare_digest(given, token) for token in tokens])

    async def proxy(request: Request) -> Response:
        if not authorized(request):
            return error(401, "authentication_error", "invalid or missing client token")
        body = await request.body()
        target = _target(request)
        headers = [(n, v) for n, v in request.headers.raw if n not in NOT_FORWARDED]
        headers.append((b"accept-encoding", b"identity"))
        for key in pool.walk():
            outgoing = client.build_request(
                request.method,
                target,
                headers=[*headers, (b"x-api-key", key.value.encode())],
                content=body,
            )
            try:
                upstream = await client.send(outgoing, stream=True)
            except httpx2.TimeoutException:
                return error(504, "timeout_error", "upstream did not answer in time")
            except httpx2.TransportError as exc:
                return error(502, "api_error", f"upstream unreachable: {type(exc).__name__}")
            if upstream.status_code == 429:
                pool.cool_down(key, parse_retry_after(upstream.headers))
            elif upstream.status_code in (401, 403):
                key.retired = True
            else:
                response = StreamingResponse(_relay(upstream), upstream.status_code)
                response.raw_headers = [
                    (name, value)
                    for name, value in upstream.headers.raw
                    if name.lower() not in HOP_BY_HOP
                ]
                return response
            await upstream.aclose()
        return pool.exhausted()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(routes=[Route("/{path:path}", proxy, methods=METHODS)], lifespan=lifespan)
    app.state.pool = pool
    app.state.client = client
    return app
