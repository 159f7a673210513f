"""OpenTelemetry spans for requests through keyfailover, when it is wanted.

When `opentelemetry-api` is installed and a tracer provider is configured, the
proxy and the transports make one span per request (`keyfailover.request`) and
one child span per upstream attempt, after the fact, from the response's
`attempt_log`. Without OpenTelemetry nothing here is imported; without a
configured provider nothing is done.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterable

    from opentelemetry.trace import Span, Tracer

    from keyfailover._native import FailoverClient, Response, SyncResponse

_INSTALLED = importlib.util.find_spec("opentelemetry") is not None

# Path endings -> the GenAI semantic conventions' operation names.
_OPERATIONS = (
    ("/messages", "chat"),
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
    (":generatecontent", "generate_content"),
    (":streamgeneratecontent", "generate_content"),
)


# keyfailover's provider names -> the GenAI semantic conventions' gen_ai.provider.name.
_PROVIDER_NAMES = {"gemini": "gcp.gemini", "azure_openai": "azure.ai.openai"}
# Gemini names the model in the path: /v1beta/models/{model}:generateContent.
_PATH_MODEL = re.compile(r"/models/([^/:?]+):")


def tracer() -> Tracer | None:
    """The tracer to use, or None when tracing is not set up."""
    if not _INSTALLED:
        return None
    from opentelemetry import trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None  # no provider configured: tracing is off
    from keyfailover import __version__

    return trace.get_tracer("keyfailover", __version__)


def operation(path: str) -> str:
    lowered = path.split("?", 1)[0].lower()
    return next((name for ending, name in _OPERATIONS if lowered.endswith(ending)), "http")


def model(body: bytes) -> str | None:
    """The `model` a JSON request body names, if any (bodies up to 1 MB)."""
    if not body or len(body) > 1 << 20 or body.lstrip()[:1] != b"{":
        return None
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):  # nested deeper than json can go
        return None
    return value if isinstance(value, str) else None


class RequestSpan:
    """The span of one request, and its attempts' spans once the head is known."""

    def __init__(
        self,
        tracer: Tracer,
        client: FailoverClient,
        path: str,
        body: bytes,
        *,
        server: bool,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        from opentelemetry import context, propagate, trace

        self._trace = trace
        self._pool = client.pool
        self.tracer = tracer
        self.operation = operation(path)
        found = _PATH_MODEL.search(path.split("?", 1)[0])
        self.model = model(body) or (found[1] if found else None)
        self.common: dict[str, Any] = {
            "gen_ai.provider.name": _PROVIDER_NAMES.get(client.provider, client.provider),
            "gen_ai.operation.name": self.operation,
            "server.address": urlsplit(client.base_url).hostname or "",
        }
        if self.model:
            self.common["gen_ai.request.model"] = self.model
        parent = None
        if server:
            carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
            parent = propagate.extract(carrier)
        kind = trace.SpanKind.SERVER if server else trace.SpanKind.CLIENT
        self.span: Span = tracer.start_span(
            "keyfailover.request", context=parent, kind=kind, attributes=self.common
        )
        self._context = context

    def _endpoint(self, label: str) -> str | None:
        """The host of the key's own endpoint (`base_url=`), where it has one and is still
        in the pool."""
        try:
            base_url = self._pool.key(label).base_url
        except KeyError:
            return None
        return urlsplit(base_url).hostname if base_url else None

    def attempts(self, response: Response | SyncResponse) -> None:
        """Adds one child span per upstream attempt, and the status to the request span."""
        trace = self._trace
        parent = trace.set_span_in_context(self.span)
        name = f"{self.operation} {self.model}" if self.model else self.operation
        for number, attempt in enumerate(response.attempt_log, start=1):
            start = int(float(attempt["started"] or 0) * 1e9)
            end = start + int(float(attempt["seconds"] or 0) * 1e9)
            attributes = dict(self.common)
            attributes["keyfailover.attempt"] = number
            if attempt["key"] is not None:
                attributes["keyfailover.key"] = attempt["key"]
                endpoint = self._endpoint(str(attempt["key"]))
                if endpoint:
                    attributes["server.address"] = endpoint
            if attempt["status"] is not None:
                attributes["http.response.status_code"] = attempt["status"]
                if int(attempt["status"]) >= 400:
                    attributes["error.type"] = str(attempt["status"])
            else:
                attributes["error.type"] = "upstream_unreachable"
            if attempt["reason"] is not None:
                attributes["keyfailover.failover.reason"] = attempt["reason"]
            child = self.tracer.start_span(
                name,
                context=parent,
                kind=trace.SpanKind.CLIENT,
                start_time=start,
                attributes=attributes,
            )
            child.end(end_time=end)
        self.span.set_attribute("http.response.status_code", response.status)
        self.span.set_attribute("keyfailover.attempts", response.attempts)
        if response.key_label:
            self.span.set_attribute("keyfailover.key", response.key_label)
        if response.status >= 400:
            self.span.set_attribute("error.type", str(response.status))

    def fail(self, error: BaseException) -> None:
        self.span.set_attribute("error.type", type(error).__qualname__)

    def end(self) -> None:
        self.span.end()
