"""A FastAPI endpoint streaming an agentic tool loop as one SSE response.

The first upstream call streams a turn that may end in a tool call; the
endpoint runs the tool and streams the continuation, a second upstream call
with its own walker through the key pool. Failover happens before each
call's first byte. If the continuation finds the pool exhausted after the
first turn was already streamed, the status line is long gone: the stream
ends with one SSE error event made by `sse_error_event` instead.

    ANTHROPIC_KEYS=sk-ant-...,sk-ant-... uvicorn --factory examples.agent_loop:from_env
    curl -N localhost:8000/agent -d '{"prompt": "What time is it?"}'
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response as HttpResponse
from fastapi.responses import StreamingResponse

from keyfailover import (
    FailoverClient,
    KeyPool,
    PermanentExhaustion,
    Response,
    TransientExhaustion,
    UpstreamError,
    sse_error_event,
)

MODEL = "claude-sonnet-4-5"
TOOLS = [
    {
        "name": "get_time",
        "description": "The current time, as ISO 8601.",
        "input_schema": {"type": "object", "properties": {}},
    }
]
HEADERS = {"content-type": "application/json", "anthropic-version": "2023-06-01"}


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    if name == "get_time":
        return "2026-11-26T12:00:00Z"
    return f"unknown tool {name}"


def sse_events(chunk: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of the whole events in `chunk` (the client relays whole events)."""
    events = []
    for block in chunk.decode().split("\n\n"):
        name, data = "", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if data:
            events.append((name, json.loads(data)))
    return events


class Turn:
    """What one streamed turn said: its content blocks and why it stopped."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, Any]] = {}
        self.partial_json: dict[int, str] = {}
        self.stop_reason: str | None = None

    def see(self, name: str, data: dict[str, Any]) -> None:
        if name == "content_block_start":
            self.blocks[data["index"]] = dict(data["content_block"])
        elif name == "content_block_delta":
            delta, index = data["delta"], data["index"]
            if delta["type"] == "text_delta":
                self.blocks[index]["text"] = self.blocks[index].get("text", "") + delta["text"]
            elif delta["type"] == "input_json_delta":
                self.partial_json[index] = self.partial_json.get(index, "") + delta["partial_json"]
        elif name == "message_delta":
            self.stop_reason = data["delta"].get("stop_reason")

    def content(self) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            if block["type"] == "tool_use":
                block["input"] = json.loads(self.partial_json.get(index) or "{}")
            out.append(block)
        return out


def upstream_error(response: Response) -> Exception:
    """The exception describing a failed upstream call, for `sse_error_event`."""
    if response.exhausted and response.status == 429:
        retry_after = dict(response.headers).get("retry-after", "0")
        return TransientExhaustion(float(retry_after))
    if response.exhausted:
        return PermanentExhaustion()
    return UpstreamError(f"the continuation failed with status {response.status}")


def with_tool_results(messages: list[dict[str, Any]], turn: Turn) -> list[dict[str, Any]]:
    """The conversation continued with the turn's tool calls and their results."""
    content = turn.content()
    results = [
        {
            "type": "tool_result",
            "tool_use_id": block["id"],
            "content": run_tool(block["name"], block["input"]),
        }
        for block in content
        if block["type"] == "tool_use"
    ]
    return [
        *messages,
        {"role": "assistant", "content": content},
        {"role": "user", "content": results},
    ]


def create_app(client: FailoverClient, *, max_turns: int = 4) -> FastAPI:
    app = FastAPI()

    async def call(messages: list[dict[str, Any]]) -> Response:
        body = {"model": MODEL, "max_tokens": 1024, "stream": True, "tools": TOOLS}
        body["messages"] = messages
        return await client.request("POST", "/v1/messages", headers=HEADERS, body=json.dumps(body))

    async def relay(response: Response, messages: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        for _ in range(max_turns):
            turn = Turn()
            async with response:
                async for chunk in response:
                    for name, data in sse_events(chunk):
                        turn.see(name, data)
                    yield chunk
            if turn.stop_reason != "tool_use":
                return
            messages = with_tool_results(messages, turn)
            response = await call(messages)
            if response.status != 200:
                # Earlier turns are already streamed: end with an error event.
                await response.aclose()
                yield sse_error_event(upstream_error(response), provider="anthropic")
                return

    @app.post("/agent")
    async def agent(request: Request) -> HttpResponse:
        messages = [{"role": "user", "content": (await request.json())["prompt"]}]
        first = await call(messages)
        if first.status != 200:
            # Nothing streamed yet: answer as plain HTTP, Retry-After included.
            kept = {k: v for k, v in first.headers if k in ("content-type", "retry-after")}
            return HttpResponse(await first.read(), status_code=first.status, headers=kept)
        return StreamingResponse(relay(first, messages), media_type="text/event-stream")

    return app


def from_env() -> FastAPI:
    keys = [k.strip() for k in os.environ.get("ANTHROPIC_KEYS", "").split(",") if k.strip()]
    return create_app(FailoverClient(KeyPool(keys), base_url="https://api.anthropic.com"))
