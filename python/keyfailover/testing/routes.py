"""The default reply for each route: valid Messages and Chat Completions responses."""

from __future__ import annotations

import json
from typing import Any

from .bodies import (
    DEFAULT_MODEL,
    _anthropic_models,
    _openai_models,
    anthropic_message,
    anthropic_stream_events,
    openai_chat_completion,
    openai_stream_chunks,
)
from .log import RecordedRequest
from .replies import Reply


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _default_reply(request: RecordedRequest) -> Reply:
    method, path = request.method, request.path
    if path.startswith("/v1/"):
        path = path[3:]
    if method == "POST" and path in ("/messages", "/chat/completions"):
        provider = "anthropic" if path == "/messages" else "openai"
        payload = _json_object(request.body)
        if payload is None:
            return Reply.error(
                400, "invalid_request_error", "body must be a JSON object", provider=provider
            )
        model = str(payload.get("model") or DEFAULT_MODEL)
        stream = payload.get("stream") is True
        if provider == "anthropic":
            if stream:
                return Reply.sse(anthropic_stream_events(model=model))
            return Reply.json(anthropic_message(model=model))
        if stream:
            return Reply.sse([*openai_stream_chunks(model=model), "[DONE]"])
        return Reply.json(openai_chat_completion(model=model))
    if method == "POST" and path == "/messages/count_tokens":
        return Reply.json({"input_tokens": 10})
    if method == "GET" and path == "/models":
        openai_style = (
            request.header("x-api-key") is None and request.header("anthropic-version") is None
        )
        return Reply.json(_openai_models() if openai_style else _anthropic_models())
    return Reply.error(404, "not_found_error", f"no route for {method} {request.path}")
