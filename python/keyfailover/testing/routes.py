"""The default reply for each route: valid Messages, Chat Completions and Gemini responses.

Routes, by dialect:

* Anthropic: ``POST /v1/messages`` (a stream when the body asks for one),
  ``POST /v1/messages/count_tokens``, ``GET /v1/models``;
* OpenAI: ``POST /v1/chat/completions``, ``GET /v1/models`` (the ``/v1`` prefix is
  optional); the same below Azure OpenAI's ``/openai/deployments/{deployment}``
  (the deployment named as the model) and ``/openai/v1``, and below Gemini's
  OpenAI-compatible ``/v1beta/openai``;
* Gemini: ``POST /{v1,v1beta,v1alpha}/models/{model}:generateContent``,
  ``:streamGenerateContent`` (SSE with ``?alt=sse``, else a JSON array of chunks),
  ``:countTokens``, and ``GET /v1beta/models``.

Anything else is a 404 in the dialect's error envelope.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .bodies import (
    DEFAULT_MODEL,
    _anthropic_models,
    _gemini_models,
    _openai_models,
    anthropic_message,
    anthropic_stream_events,
    gemini_response,
    gemini_stream_chunks,
    openai_chat_completion,
    openai_stream_chunks,
)
from .log import RecordedRequest
from .replies import Reply

_GEMINI_METHOD = re.compile(r"/(?:v1|v1beta|v1alpha)/models/([^/:]+):([A-Za-z]+)")
_GEMINI_MODELS = re.compile(r"/(?:v1|v1beta|v1alpha)/models")
_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)(/.*)")
_GEMINI_OPENAI = re.compile(r"/(?:v1|v1beta)/openai(/.*)")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # nested deeper than json can go
        return None
    return payload if isinstance(payload, dict) else None


def dialect(request: RecordedRequest) -> str:
    """Which API a request speaks, by its path and credential: "gemini", "openai"
    (OpenAI, Azure OpenAI and Gemini's OpenAI-compatible endpoint) or "anthropic"."""
    path = request.path
    if _GEMINI_OPENAI.fullmatch(path) or path.startswith("/openai/"):
        return "openai"
    if _GEMINI_METHOD.fullmatch(path) or path.startswith(("/v1beta/", "/v1alpha/")):
        return "gemini"
    if request.header("x-goog-api-key") is not None or "key=" in request.query:
        return "gemini"
    if any(part in path for part in ("/chat/completions", "/responses", "/embeddings")):
        return "openai"
    return "anthropic"


def _default_reply(request: RecordedRequest) -> Reply:
    path = request.path
    deployment = _AZURE_DEPLOYMENT.fullmatch(path)
    if deployment is not None:
        return _openai_reply(request, deployment[2], deployment[1])
    if path.startswith("/openai/v1/"):
        return _openai_reply(request, path[len("/openai") :])
    compatible = _GEMINI_OPENAI.fullmatch(path)
    if compatible is not None:
        return _openai_reply(request, compatible[1])
    if dialect(request) == "gemini":
        return _gemini_reply(request)
    return _reply(request)


def _reply(request: RecordedRequest) -> Reply:
    """Anthropic's and OpenAI's routes, with or without the ``/v1`` prefix."""
    method, path = request.method, request.path
    if path.startswith("/v1/"):
        path = path[3:]
    if method == "POST" and path == "/chat/completions":
        return _openai_reply(request, path)
    if method == "POST" and path == "/messages":
        payload = _json_object(request.body)
        if payload is None:
            return Reply.error(400, "invalid_request_error", "body must be a JSON object")
        model = str(payload.get("model") or DEFAULT_MODEL)
        if payload.get("stream") is True:
            return Reply.sse(anthropic_stream_events(model=model))
        return Reply.json(anthropic_message(model=model))
    if method == "POST" and path == "/messages/count_tokens":
        return Reply.json({"input_tokens": 10})
    if method == "GET" and path == "/models":
        openai_style = (
            request.header("x-api-key") is None and request.header("anthropic-version") is None
        )
        return Reply.json(_openai_models() if openai_style else _anthropic_models())
    return Reply.error(404, "not_found_error", f"no route for {method} {request.path}")


def _openai_reply(request: RecordedRequest, path: str, deployment: str | None = None) -> Reply:
    """OpenAI's routes at `path` (below whatever prefix the request's API puts first)."""
    method = request.method
    if path.startswith("/v1/"):
        path = path[3:]
    if method == "GET" and path == "/models":
        return Reply.json(_openai_models())
    if method != "POST" or path != "/chat/completions":
        return Reply.error(
            404, "not_found", f"no route for {method} {request.path}", provider="openai"
        )
    payload = _json_object(request.body)
    if payload is None:
        return Reply.error(
            400, "invalid_request_error", "body must be a JSON object", provider="openai"
        )
    model = deployment or str(payload.get("model") or DEFAULT_MODEL)
    if payload.get("stream") is True:
        return Reply.sse([*openai_stream_chunks(model=model), "[DONE]"])
    return Reply.json(openai_chat_completion(model=model))


def _gemini_reply(request: RecordedRequest) -> Reply:
    method, path = request.method, request.path
    if method == "GET" and _GEMINI_MODELS.fullmatch(path):
        return Reply.json(_gemini_models())
    found = _GEMINI_METHOD.fullmatch(path)
    if method != "POST" or found is None:
        return Reply.gemini_error(404, "NOT_FOUND", f"no route for {method} {path}")
    model, action = found[1], found[2]
    if action == "countTokens":
        return Reply.json({"totalTokens": 10})
    if action not in ("generateContent", "streamGenerateContent"):
        return Reply.gemini_error(404, "NOT_FOUND", f"no method {action} for models/{model}")
    if _json_object(request.body) is None:
        return Reply.gemini_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    if action == "generateContent":
        return Reply.json(gemini_response(model=model))
    chunks = gemini_stream_chunks(model=model)
    if "alt=sse" in request.query.split("&"):
        return Reply.sse(chunks)
    return Reply.json(chunks)  # without alt=sse, the stream is one JSON array
