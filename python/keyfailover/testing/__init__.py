"""Hermetic upstream for tests, speaking the Anthropic, OpenAI, Azure OpenAI and Gemini APIs.

`MockUpstream` is a small HTTP/1.1 server on loopback. It runs its own asyncio
event loop in a daemon thread, so it serves sync tests and async tests alike
without touching the test's own loop. It uses only the standard library.

    with MockUpstream() as up:
        up.set_reply("sk-ant-key-0", Reply.error(429, "rate_limit_error", "slow down"))
        up.enqueue(Reply.json({"ok": True}))
        ...                       # point a client at up.url
        assert up.requests[0].credential == "sk-ant-key-0"

Reply selection for each request: the one-shot queue first (consumed in
order), else the reply set for the request's credential (`x-api-key`,
`api-key`, `x-goog-api-key`, the `Authorization: Bearer` token, else a `key=`
query parameter), else the default reply:

* ``POST /v1/messages``: an Anthropic Messages response (an SSE stream when
  the request JSON has ``"stream": true``);
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": 10}``;
* ``POST /v1/chat/completions``: an OpenAI chat completion (or chunk stream),
  also below ``/openai/deployments/{deployment}`` and ``/openai/v1`` (Azure
  OpenAI) and ``/v1beta/openai`` (Gemini's OpenAI-compatible endpoint);
* ``GET /v1/models``: an OpenAI-shaped list when the request has neither an
  ``x-api-key`` nor an ``anthropic-version`` header, else an Anthropic page;
* ``POST /v1beta/models/{model}:generateContent`` (also ``/v1``):
  a Gemini response; ``:streamGenerateContent?alt=sse`` its SSE stream (the
  last chunk carries ``finishReason``), without ``alt=sse`` a JSON array;
  ``:countTokens``; ``GET /v1beta/models``;
* anything else: 404 with an error body in the dialect's envelope.

The ``/v1`` prefix is optional for the OpenAI and Anthropic routes, so the
OpenAI SDK works with either ``base_url=up.url`` or ``base_url=up.url + "/v1"``.

`Reply.error(..., provider=...)` writes each provider's error envelope, and
`Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="10s", quota_id=...)`
Gemini's with its details.

`MockUpstream(limits={credential: Limit(requests=60, window=60.0, group=None)})`
gives keys rate limits that behave like the providers' (see `limits`).

`MockUpstream.wait_for(predicate)` polls from sync code, `wait_for_async` from
async code. The pytest plugin (`keyfailover.testing.plugin`, entry point
``pytest11``) provides the function-scoped fixture `mock_upstream`.

The server treats the client's end of input (FIN) as the client going away:
it stops whatever reply is in flight and marks it `disconnected`. A client
that half-closes its socket after sending a request gets no response.

Modules: `bodies` (API-shaped response bodies), `replies` (`Reply`),
`scenario` (scenario files, validated), `log` (`RecordedRequest`), `routes`
(default replies), `http11` (request parsing), `wire` (a reply as bytes on the
wire, faults included), `server` (`MockUpstream`), `asgi_server`
(`serve_asgi`), `native_server` (`serve_native`: the native server that
`keyfailover serve` runs), `pki` (`write_pki`: a certificate authority of a
test's own, for upstreams over TLS; needs `cryptography`) and `plugin` (the
pytest fixture). Scenario files
and faults are documented in docs/mock-upstream.md.
"""

from __future__ import annotations

from .asgi_server import serve_asgi
from .bodies import (
    DEFAULT_MODEL,
    DEFAULT_TEXT,
    SseEvent,
    anthropic_message,
    anthropic_stream_events,
    gemini_response,
    gemini_stream_chunks,
    openai_chat_completion,
    openai_stream_chunks,
)
from .limits import Limit
from .log import RecordedRequest
from .native_server import serve_native
from .replies import HeadersLike, Reply
from .server import MockUpstream

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEXT",
    "HeadersLike",
    "Limit",
    "MockUpstream",
    "RecordedRequest",
    "Reply",
    "SseEvent",
    "anthropic_message",
    "anthropic_stream_events",
    "gemini_response",
    "gemini_stream_chunks",
    "openai_chat_completion",
    "openai_stream_chunks",
    "serve_asgi",
    "serve_native",
]
