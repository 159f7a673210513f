"""Response bodies shaped like the Anthropic, OpenAI and Gemini APIs', for replies and tests."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

# An SSE event: (event name or None, data) or bare data; dict data is sent as JSON.
SseEvent = tuple[str | None, Any] | Mapping[str, Any] | str

DEFAULT_TEXT = "Hello from mock"
DEFAULT_MODEL = "mock-model"


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _pieces(text: str) -> list[str]:
    """Split text into word-sized pieces that join back to it."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def anthropic_message(
    text: str = DEFAULT_TEXT,
    model: str = DEFAULT_MODEL,
    content: list[dict[str, Any]] | None = None,
    *,
    input_tokens: int = 10,
) -> dict[str, Any]:
    """A Messages API response body; `content` replaces the single text block."""
    blocks = content if content is not None else [{"type": "text", "text": text}]
    return {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": len(_pieces(text))},
    }


def anthropic_stream_events(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL, *, input_tokens: int = 10
) -> list[tuple[str, dict[str, Any]]]:
    """The `(event, data)` pairs of a streamed Messages API response."""
    pieces = _pieces(text)
    start = anthropic_message("", model, content=[], input_tokens=input_tokens)
    start["stop_reason"] = None
    start["usage"]["output_tokens"] = 1
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]
    for piece in pieces:
        delta = {"type": "text_delta", "text": piece}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


def openai_chat_completion(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL, *, prompt_tokens: int = 10
) -> dict[str, Any]:
    """A chat.completion response body."""
    completion_tokens = len(_pieces(text))
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def openai_stream_chunks(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL
) -> list[dict[str, Any]]:
    """The chat.completion.chunk objects of a streamed completion (without the final ``[DONE]``)."""
    chunk_id, created = _new_id("chatcmpl-"), int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }

    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": piece}) for piece in _pieces(text)),
        chunk({}, "stop"),
    ]


def gemini_response(
    text: str = DEFAULT_TEXT,
    model: str = DEFAULT_MODEL,
    *,
    prompt_tokens: int = 10,
    finish_reason: str | None = "STOP",
) -> dict[str, Any]:
    """A Gemini `GenerateContentResponse` (the body of `:generateContent`, or one
    chunk of `:streamGenerateContent` with `finish_reason=None`)."""
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason
    output_tokens = len(_pieces(text))
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens,
        },
        "modelVersion": model,
        "responseId": _new_id(""),
    }


def gemini_stream_chunks(
    text: str = DEFAULT_TEXT, model: str = DEFAULT_MODEL
) -> list[dict[str, Any]]:
    """The chunks of a streamed Gemini response: one per word, the last with the
    candidate's `finishReason` (a Gemini stream has no other end marker)."""
    pieces = _pieces(text) or [""]
    chunks = [gemini_response(piece, model, finish_reason=None) for piece in pieces[:-1]]
    chunks.append(gemini_response(pieces[-1], model))
    return chunks


def _gemini_models() -> dict[str, Any]:
    return {
        "models": [
            {
                "name": f"models/{model_id}",
                "displayName": model_id,
                "inputTokenLimit": 1048576,
                "outputTokenLimit": 65536,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for model_id in (DEFAULT_MODEL, "mock-model-large")
        ]
    }


def _anthropic_models() -> dict[str, Any]:
    models = [
        {
            "type": "model",
            "id": model_id,
            "display_name": model_id,
            "created_at": "2025-01-01T00:00:00Z",
            "lifecycle": "active",
        }
        for model_id in (DEFAULT_MODEL, "mock-model-large")
    ]
    return {
        "data": models,
        "has_more": False,
        "first_id": models[0]["id"],
        "last_id": models[-1]["id"],
    }


def _openai_models() -> dict[str, Any]:
    models = [
        {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "mock"}
        for model_id in (DEFAULT_MODEL, "mock-model-large")
    ]
    return {"object": "list", "data": models}


def _sse_chunk(event: SseEvent) -> bytes:
    """One event in the SSE wire format (ends with a blank line)."""
    name, data = event if isinstance(event, tuple) else (None, event)
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = [] if name is None else [f"event: {name}"]
    lines += [f"data: {line}" for line in text.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()
