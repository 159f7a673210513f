"""httpx2 and httpx transports that send every request through a `FailoverClient`.

Plug keyfailover under the official SDKs (anthropic 2.x and openai 3.x are built
on httpx2) or under any httpx2/httpx client:

    import anthropic, httpx2, keyfailover as kf
    from keyfailover.transport import AsyncFailoverTransport

    client = kf.FailoverClient(kf.KeyPool([...]), base_url="https://api.anthropic.com")
    sdk = anthropic.AsyncAnthropic(
        api_key="unused", http_client=httpx2.AsyncClient(transport=AsyncFailoverTransport(client))
    )

google-genai takes one through ``types.HttpOptions(httpx_client=httpx2.Client(transport=...))``
(with ``provider="gemini"``), and ``openai.AzureOpenAI`` through ``http_client=``
(with ``provider="azure_openai"``).

The transport is thin: it forwards the request's method, path and query, headers
and body to the `FailoverClient` (which picks the keys and fails over) and
streams the response back unbuffered. The host of the URL the SDK builds is
ignored: requests go to the FailoverClient's `base_url`, with the request's
path kept whole (``base_url="https://api.openai.com"`` and
``"https://api.openai.com/v1"`` both work: a ``/v1`` is never doubled). The
FailoverClient drops the caller's own credential headers (`x-api-key`,
`Authorization`, ...), so the SDK's `api_key` never reaches upstream and the
pool's keys are always used.

A transport answers in the flavour of the request it is given: an
`httpx2.Request` gets an `httpx2.Response`, an `httpx.Request` an
`httpx.Response`. Neither package is required to import this module, and it
never imports `httpx` itself while `httpx2` is available (so
`httpx2.alias_httpx()` may still be called afterwards). The transports
subclass httpx2's base transports when httpx2 is installed, else httpx's; they
never carry httpx classes alongside httpx2 ones, because the SDKs reject any
object with an `httpx` class in its MRO.

Each response's ``extensions["keyfailover"]`` holds ``{"attempts", "key_label",
"exhausted"}`` of the failover behind it. Request timeouts set on the httpx
client do not apply: the `FailoverClient`'s own `timeout` and
`connect_timeout` do.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast, overload

from keyfailover import _tracing
from keyfailover._native import FailoverClient, Response, SyncResponse, UpstreamError

if TYPE_CHECKING:
    import httpx
    import httpx2

    # For type checkers the transports are transports of both flavours, as
    # they are to httpx2's and httpx's clients (which check no base class).
    # At run time they subclass one flavour only: see _transport_base_classes.
    class _AsyncTransportBase(httpx2.AsyncBaseTransport, httpx.AsyncBaseTransport):  # type: ignore[misc]
        pass

    class _TransportBase(httpx2.BaseTransport, httpx.BaseTransport):  # type: ignore[misc]
        pass


__all__ = ["AsyncFailoverTransport", "FailoverTransport"]


# --------------------------------------------------------------------------
# Request and response conversion
# --------------------------------------------------------------------------


def _span(client: FailoverClient, target: str, body: bytes) -> _tracing.RequestSpan | None:
    """The request's span (kind CLIENT, ended at the response head), when tracing is on."""
    tracer = _tracing.tracer()
    return None if tracer is None else _tracing.RequestSpan(tracer, client, target, body,
                                                            server=False)  # fmt: skip


def _target(raw_path: bytes) -> str:
    """The request's path and query, still percent-encoded."""
    return raw_path.decode("ascii") or "/"


def _extensions(response: Response | SyncResponse) -> dict[str, Any]:
    return {
        "keyfailover": {
            "attempts": response.attempts,
            "key_label": response.key_label,
            "exhausted": response.exhausted,
        }
    }


class _AsyncStream:
    """The body of a keyfailover `Response` as an httpx(2) async byte stream.

    Combined at run time with the flavour's `AsyncByteStream` (see `_Flavour`).
    """

    def __init__(self, response: Response, error: type[Exception]) -> None:
        self._response = response
        self._error = error

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._response.__anext__()
        except UpstreamError as exc:
            raise self._error(str(exc)) from exc

    async def aclose(self) -> None:
        """Close the response, dropping the upstream connection if still open."""
        await self._response.aclose()


class _SyncStream:
    """The body of a keyfailover `SyncResponse` as an httpx(2) sync byte stream."""

    def __init__(self, response: SyncResponse, error: type[Exception]) -> None:
        self._response = response
        self._error = error

    def __iter__(self) -> _SyncStream:
        return self

    def __next__(self) -> bytes:
        try:
            return self._response.__next__()
        except UpstreamError as exc:
            raise self._error(str(exc)) from exc

    def close(self) -> None:
        """Close the response, dropping the upstream connection if still open."""
        self._response.close()


@dataclass(frozen=True)
class _Flavour:
    """What a transport needs of httpx2 or httpx to answer in that flavour."""

    module: ModuleType
    async_stream: type[_AsyncStream]
    sync_stream: type[_SyncStream]

    @classmethod
    def of(cls, module: ModuleType) -> _Flavour:
        def subclass(mixin: type, base: type) -> type:
            # The flavour's own stream base class: its clients assert isinstance.
            name = mixin.__name__.lstrip("_")
            return type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})

        return cls(
            module,
            cast("type[_AsyncStream]", subclass(_AsyncStream, module.AsyncByteStream)),
            cast("type[_SyncStream]", subclass(_SyncStream, module.SyncByteStream)),
        )

    def response(self, native: Response | SyncResponse, stream: object, request: object) -> Any:
        return self.module.Response(
            native.status,
            headers=native.raw_headers,
            stream=stream,
            request=request,
            extensions=_extensions(native),
        )

    def async_response(self, native: Response, request: object) -> Any:
        stream = self.async_stream(native, self.module.RemoteProtocolError)
        return self.response(native, stream, request)

    def sync_response(self, native: SyncResponse, request: object) -> Any:
        stream = self.sync_stream(native, self.module.RemoteProtocolError)
        return self.response(native, stream, request)


_FLAVOURS: dict[str, _Flavour] = {}


def _flavour(request: object) -> _Flavour:
    """The flavour (httpx2 or httpx) of `request`, found without importing either."""
    for klass in type(request).__mro__:
        package = klass.__module__.partition(".")[0]
        module = sys.modules.get(package)
        if package in ("httpx2", "httpx") and module is not None:
            break
    else:
        raise TypeError(
            f"expected an httpx2.Request or httpx.Request, got {type(request).__qualname__}"
        )
    flavour = _FLAVOURS.get(module.__name__)
    if flavour is None:
        flavour = _FLAVOURS.setdefault(module.__name__, _Flavour.of(module))
    return flavour


# --------------------------------------------------------------------------
# The transports
# --------------------------------------------------------------------------


def _transport_base_classes() -> tuple[type, type]:
    """httpx2's (async, sync) base transports, else httpx's, else `object`."""
    try:
        import httpx2
    except ImportError:
        try:
            import httpx
        except ImportError:
            return object, object
        return httpx.AsyncBaseTransport, httpx.BaseTransport
    return httpx2.AsyncBaseTransport, httpx2.BaseTransport


if not TYPE_CHECKING:
    _AsyncTransportBase, _TransportBase = _transport_base_classes()


class AsyncFailoverTransport(_AsyncTransportBase):
    """An async httpx2/httpx transport that sends each request through a `FailoverClient`.

    Usage with the Anthropic SDK (the OpenAI SDK likewise)::

        anthropic.AsyncAnthropic(api_key="unused", http_client=httpx2.AsyncClient(transport=AsyncFailoverTransport(client)))

    `client` is a `keyfailover.FailoverClient`; its `base_url` replaces the
    scheme and host of every request URL, whose path and query are kept. The
    caller's `x-api-key`/`Authorization` headers are dropped so the pool's keys
    are always used. Response bodies stream through; closing the response
    drops the upstream connection. A non-SSE body that breaks midway raises the
    flavour's `RemoteProtocolError`. Closing the transport leaves `client`
    open (it may be shared).
    """  # noqa: E501

    def __init__(self, client: FailoverClient) -> None:
        self.client = client

    @overload
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response: ...
    @overload
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response: ...
    async def handle_async_request(
        self, request: httpx2.Request | httpx.Request
    ) -> httpx2.Response | httpx.Response:
        """Send `request` through the FailoverClient; the body streams unread."""
        flavour = _flavour(request)
        body = await request.aread()
        target = _target(request.url.raw_path)
        span = _span(self.client, target, body)
        try:
            native = await self.client.request(
                request.method, target, headers=request.headers.raw, body=body
            )
            if span is not None:
                span.attempts(native)
        except BaseException as error:
            if span is not None:
                span.fail(error)
            raise
        finally:
            if span is not None:
                span.end()
        try:
            return cast("httpx2.Response | httpx.Response", flavour.async_response(native, request))
        except BaseException:
            await native.aclose()
            raise

    def __repr__(self) -> str:
        return f"AsyncFailoverTransport({self.client!r})"


class FailoverTransport(_TransportBase):
    """A sync httpx2/httpx transport that sends each request through a `FailoverClient`.

    Usage with the Anthropic SDK (the OpenAI SDK likewise)::

        anthropic.Anthropic(api_key="unused", http_client=httpx2.Client(transport=FailoverTransport(client)))

    The blocking twin of `AsyncFailoverTransport` (it calls
    `client.request_sync`, which releases the GIL while it waits); see there.
    """  # noqa: E501

    def __init__(self, client: FailoverClient) -> None:
        self.client = client

    @overload
    def handle_request(self, request: httpx2.Request) -> httpx2.Response: ...
    @overload
    def handle_request(self, request: httpx.Request) -> httpx.Response: ...
    def handle_request(
        self, request: httpx2.Request | httpx.Request
    ) -> httpx2.Response | httpx.Response:
        """Send `request` through the FailoverClient; the body streams unread."""
        flavour = _flavour(request)
        body = request.read()
        target = _target(request.url.raw_path)
        span = _span(self.client, target, body)
        try:
            native = self.client.request_sync(
                request.method, target, headers=request.headers.raw, body=body
            )
            if span is not None:
                span.attempts(native)
        except BaseException as error:
            if span is not None:
                span.fail(error)
            raise
        finally:
            if span is not None:
                span.end()
        try:
            return cast("httpx2.Response | httpx.Response", flavour.sync_response(native, request))
        except BaseException:
            native.close()
            raise

    def __repr__(self) -> str:
        return f"FailoverTransport({self.client!r})"
