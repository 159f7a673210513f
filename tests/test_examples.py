"""The examples run as documented, so they never rot."""

import json
import subprocess
import sys
from pathlib import Path

import httpx

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_pool_quickstart():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pool_quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "primary  (sk-a...0000) -> 429: fail over" in out
    assert "backup   (sk-a...1111) -> 401: fail over" in out
    assert "answer 429 with Retry-After 5" in out
    assert "5 s later the next request gets spare" in out
    assert "sk-ant-demo" not in out


def load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastapi_app_mounts_both_providers(mock_upstream):
    import anthropic
    import openai

    from keyfailover.testing import Reply, serve_asgi

    example = load_example("fastapi_app")
    ant_keys = ["sk-ant-ex-0-" + "a" * 24, "sk-ant-ex-1-" + "b" * 24]
    oai_keys = ["sk-oai-ex-0-" + "c" * 24, "sk-oai-ex-1-" + "d" * 24]
    for key in (ant_keys[0], oai_keys[0]):
        mock_upstream.set_reply(key, Reply.error(429, "rate_limit_error", "slow"))
    app = example.create_app(
        ant_keys,
        oai_keys,
        anthropic_url=mock_upstream.url,
        openai_url=mock_upstream.url,
        client_tokens=["team-token"],
    )
    with serve_asgi(app) as url:
        with anthropic.Anthropic(base_url=url + "/anthropic", api_key="team-token") as ant:
            message = ant.messages.create(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        assert message.content[0].text == "Hello from mock"
        with openai.OpenAI(base_url=url + "/openai/v1", api_key="team-token") as oai:
            completion = oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert completion.choices[0].message.content == "Hello from mock"
        health = httpx.get(url + "/healthz").json()
    seen = [(r.path, r.credential) for r in mock_upstream.requests]
    assert seen == [
        ("/v1/messages", ant_keys[0]),
        ("/v1/messages", ant_keys[1]),
        ("/v1/chat/completions", oai_keys[0]),
        ("/v1/chat/completions", oai_keys[1]),
    ]
    assert health["anthropic"]["status"] == "degraded"
    assert health["openai"]["keys"] == {"valid": 1, "temporary": 1, "permanent": 0}


TOOL_TURN = [
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message",
     "role": "assistant", "content": [], "model": "m", "stop_reason": None,
     "usage": {"input_tokens": 5, "output_tokens": 0}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
     "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
     "usage": {"output_tokens": 3}}),
    ("message_stop", {"type": "message_stop"}),
]  # fmt: skip
AGENT_KEYS = {"k0": "sk-ant-agent-0-" + "x" * 24, "k1": "sk-ant-agent-1-" + "y" * 24}


def rate_limited(retry_after: str):
    from keyfailover.testing import Reply

    return Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": retry_after})


def run_agent(upstream, setup) -> httpx.Response:
    from keyfailover import FailoverClient, KeyPool, ManualClock
    from keyfailover.testing import serve_asgi

    example = load_example("agent_loop")
    pool = KeyPool(AGENT_KEYS, clock=ManualClock())
    app = example.create_app(FailoverClient(pool, base_url=upstream.url))
    setup(upstream)
    with serve_asgi(app) as url:
        return httpx.post(url + "/agent", json={"prompt": "What time is it?"}, timeout=10)


def sse_data(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def labels(upstream) -> list[str]:
    by_key = {v: k for k, v in AGENT_KEYS.items()}
    return [by_key[r.credential] for r in upstream.requests]


def test_agent_continuation_fails_over(mock_upstream):
    from keyfailover.testing import Reply, anthropic_stream_events

    def setup(up):
        up.enqueue(Reply.sse(TOOL_TURN), rate_limited("5"), Reply.sse(anthropic_stream_events()))

    resp = run_agent(mock_upstream, setup)
    assert resp.status_code == 200
    events = sse_data(resp.text)
    assert [e["type"] for e in events].count("message_start") == 2
    assert events[4]["delta"]["stop_reason"] == "tool_use"
    text = [e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta"]
    assert "".join(text) == "Hello from mock"
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert "event: error" not in resp.text
    assert labels(mock_upstream) == ["k0", "k0", "k1"]
    continuation = mock_upstream.requests[-1].json()["messages"]
    assert continuation[1]["content"][0]["name"] == "get_time"
    assert continuation[2]["content"][0]["tool_use_id"] == "toolu_1"
    assert continuation[2]["content"][0]["content"] == "2026-11-26T12:00:00Z"


def test_agent_continuation_finds_pool_exhausted(mock_upstream):
    from keyfailover.testing import Reply

    def setup(up):
        up.enqueue(Reply.sse(TOOL_TURN))
        up.set_reply(AGENT_KEYS["k0"], rate_limited("3"))
        up.set_reply(AGENT_KEYS["k1"], rate_limited("5"))

    resp = run_agent(mock_upstream, setup)
    assert resp.status_code == 200, "the first turn was already streamed"
    events = resp.text.strip().split("\n\n")
    assert events[0].startswith("event: message_start")
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])
    assert error["error"]["type"] == "rate_limit_error"
    assert error["error"]["message"] == "all configured keys are rate-limited"
    assert labels(mock_upstream) == ["k0", "k0", "k1"]


def test_agent_first_turn_exhausted_is_plain_http(mock_upstream):
    def setup(up):
        up.set_reply(AGENT_KEYS["k0"], rate_limited("5"))
        up.set_reply(AGENT_KEYS["k1"], rate_limited("3"))

    resp = run_agent(mock_upstream, setup)
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["type"] == "rate_limit_error"
    assert labels(mock_upstream) == ["k0", "k1"]
