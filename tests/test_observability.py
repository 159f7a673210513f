"""What an operator sees: Prometheus metrics (from the client, the proxy, an app's own
registry, and across workers), a log record for every key transition, and
OpenTelemetry spans per request and per upstream attempt."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from conftest import FAKE_KEYS, free_port, make_client
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import keyfailover as kf
from keyfailover import _logging, _native
from keyfailover.asgi import FailoverProxy
from keyfailover.metrics import collector
from keyfailover.testing import MockUpstream, Reply, serve_asgi

KEYS = FAKE_KEYS[:3]
TOKEN = "kf-metrics-token-0001"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]


def no_key_in(text: str) -> None:
    for key in KEYS:
        pieces = [key[i : i + 8] for i in range(len(key) - 7)]
        assert not [p for p in pieces if p in text], "a piece of a key in the output"


def rate_limited(seconds: str = "30") -> Reply:
    return Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": seconds})


def test_metrics_after_scripted_failovers(up: MockUpstream) -> None:
    client, pool = make_client(up, "anthropic", 3, name="claude")
    up.set_reply(KEYS[0], rate_limited())
    up.set_reply(KEYS[1], Reply.error(401, "authentication_error", "revoked"))
    for _ in range(3):
        client.request_sync("POST", "/v1/messages", body=b"{}").read()  # 2 failovers, then key-2
    up.set_reply(KEYS[2], rate_limited("5"))
    client.request_sync("POST", "/v1/messages", body=b"{}").read()  # exhausted: 429
    client.request_sync("POST", "/v1/messages", body=b"{}", credential="sk-byok-0000").read()
    pool.key("key-0").reset()
    text = client.metrics()
    no_key_in(text)
    got = samples(text)
    pool_ = {"pool": "claude"}
    assert value(got, "keyfailover_keys", state="valid", **pool_) == 1
    assert value(got, "keyfailover_keys", state="temporary", **pool_) == 1
    assert value(got, "keyfailover_keys", state="permanent", **pool_) == 1
    state = "keyfailover_key_state"
    assert value(got, state, key="key-1", group="", state="permanent", **pool_) == 1
    assert value(got, state, key="key-1", group="", state="valid", **pool_) == 0
    assert 0 < value(got, "keyfailover_key_cooldown_seconds", key="key-2", **pool_) <= 5
    assert value(got, "keyfailover_key_cooldown_seconds", key="key-0", **pool_) == 0
    transitions = "keyfailover_key_transitions_total"
    assert value(got, transitions, key="key-0", reason="rate_limited", **pool_) == 1
    assert value(got, transitions, key="key-0", reason="reset", **pool_) == 1
    assert value(got, transitions, key="key-1", reason="revoked", **pool_) == 1
    assert value(got, transitions, key="key-2", reason="rate_limited", **pool_) == 1
    responses = "keyfailover_upstream_responses_total"
    assert value(got, responses, key="key-0", code="429", **pool_) == 1
    assert value(got, responses, key="key-1", code="401", **pool_) == 1
    assert value(got, responses, key="key-2", code="200", **pool_) == 3
    assert value(got, responses, key="key-2", code="429", **pool_) == 1
    requests = "keyfailover_requests_total"
    assert value(got, requests, outcome="ok", **pool_) == 3
    assert value(got, requests, outcome="exhausted_rate_limited", **pool_) == 1
    assert value(got, requests, outcome="byok", **pool_) == 1
    assert value(got, "keyfailover_request_attempts_count", **pool_) == 4
    # 3 attempts, then 1 (key-2 straight away), 1, and 1 before the exhaustion.
    assert value(got, "keyfailover_request_attempts_sum", **pool_) == 3 + 1 + 1 + 1
    assert value(got, "keyfailover_request_attempts_bucket", le="1", **pool_) == 3
    assert value(got, "keyfailover_request_attempts_bucket", le="3", **pool_) == 4
    assert value(got, "keyfailover_upstream_duration_seconds_count", **pool_) == 7
    assert value(got, "keyfailover_upstream_duration_seconds_sum", **pool_) > 0


def test_outcomes_of_every_kind(up: MockUpstream) -> None:
    client, pool = make_client(up, "openai", 1, timeout=1.0)
    up.enqueue(Reply(stall=5))  # timeout
    client.request_sync("POST", "/v1/chat/completions", body=b"{}").read()
    up.enqueue(Reply.sse([(None, {"x": 1})], break_after=1))  # a stream broken midway
    client.request_sync("POST", "/v1/chat/completions", body=b"{}").read()
    pool.key("key-0").mark_permanent()
    client.request_sync("POST", "/v1/chat/completions", body=b"{}").read()  # exhausted_auth
    down, _ = make_client(f"http://127.0.0.1:{free_port()}", "openai", 1)
    down.request_sync("POST", "/v1/chat/completions", body=b"{}").read()
    got = samples(client.metrics())
    for outcome in ("upstream_timeout", "stream_broken", "exhausted_auth"):
        assert value(got, "keyfailover_requests_total", pool="openai", outcome=outcome) == 1
    assert value(samples(down.metrics()), "keyfailover_requests_total", pool="openai",
                 outcome="upstream_unreachable") == 1  # fmt: skip


def test_shm_pools_of_other_names_in_one_namespace_count_apart(up: MockUpstream) -> None:
    """Shared memory counts a pool's requests with the pools of its name in every
    process of the host, and never with a pool of another name."""
    namespace = f"obs-{uuid.uuid4().hex[:12]}"
    clients = {
        name: kf.FailoverClient(
            kf.KeyPool(keys, state="shm", namespace=namespace),
            base_url=up.url,
            provider="openai",
            name=name,
        )
        for name, keys in (("team-a", KEYS[:1]), ("team-b", KEYS[1:2]), ("team-a-too", KEYS[:1]))
    }
    twin = kf.FailoverClient(  # another pool of the first's name: as another worker's
        kf.KeyPool(KEYS[:1], state="shm", namespace=namespace),
        base_url=up.url,
        provider="openai",
        name="team-a",
    )
    for _ in range(3):
        clients["team-a"].request_sync("POST", "/v1/chat/completions", body=b"{}").read()
    twin.request_sync("POST", "/v1/chat/completions", body=b"{}").read()
    counted = {
        name: samples(client.metrics()).get(
            ("keyfailover_requests_total", frozenset({"pool": name, "outcome": "ok"}.items())), 0
        )
        for name, client in clients.items()
    }
    assert counted == {"team-a": 4, "team-b": 0, "team-a-too": 0}


def test_the_proxy_serves_metrics_behind_its_tokens_and_counts_rejections(up: MockUpstream):
    client, _ = make_client(up, "anthropic", 2)
    with serve_asgi(FailoverProxy(client, client_tokens=[TOKEN])) as url:
        assert httpx.post(url + "/v1/messages", json={}).status_code == 401  # rejected
        refused = httpx.get(url + "/_keyfailover/metrics")
        scrape = httpx.get(url + "/_keyfailover/metrics",
                           headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert refused.status_code == 401
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    no_key_in(scrape.text)
    got = samples(scrape.text)
    assert value(got, "keyfailover_requests_total", pool="anthropic", outcome="rejected") == 2


def test_collector_for_an_apps_own_registry(up: MockUpstream) -> None:
    client, _ = make_client(up, "anthropic", 2, name="apps-pool")
    client.request_sync("POST", "/v1/messages", body=b"{}").read()
    registry = CollectorRegistry()
    registry.register(collector(client))
    assert (
        registry.get_sample_value(
            "keyfailover_requests_total", {"pool": "apps-pool", "outcome": "ok"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("keyfailover_keys", {"pool": "apps-pool", "state": "valid"}) == 2
    )


def test_two_workers_with_shared_memory_report_the_whole_host(up: MockUpstream, tmp_path) -> None:
    namespace = f"metrics-{uuid.uuid4().hex[:10]}"
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            f"""
            from keyfailover import FailoverClient, KeyPool
            from keyfailover.asgi import FailoverProxy

            pool = KeyPool({KEYS!r}, state="shm", namespace={namespace!r})
            app = FailoverProxy(FailoverClient(pool, base_url={up.url!r}))
            """
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--workers", "2", "--port", str(port),
         "--app-dir", str(tmp_path), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/_keyfailover/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(100):
            httpx.post(url + "/v1/messages", json={}, headers={"connection": "close"}).read()
        time.sleep(0.3)  # the last responses' outcomes are counted once they are dropped
        counts = set()
        for _ in range(8):  # new connections: the scrapes reach both workers
            scrape = httpx.get(url + "/_keyfailover/metrics", headers={"connection": "close"})
            got = samples(scrape.text)
            counts.add(value(got, "keyfailover_requests_total", pool="anthropic", outcome="ok"))
        assert counts == {100.0}
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_each_transition_is_logged_once_with_its_fields(up: MockUpstream, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="keyfailover")
    client, pool = make_client(up, "anthropic", 3, name="logged")
    up.set_reply(KEYS[0], rate_limited("12"))
    up.set_reply(KEYS[1], Reply.error(401, "authentication_error", "revoked"))
    client.request_sync("POST", "/v1/messages", body=b"{}").read()  # no event loop here
    pool.key("key-0").reset()
    _logging.flush()
    records = [r for r in caplog.records if r.name == "keyfailover.pool"]
    assert [(r.levelname, r.key, r.reason) for r in records] == [  # type: ignore[attr-defined]
        ("INFO", "key-0", "rate_limited"),
        ("WARNING", "key-1", "revoked"),
        ("INFO", "key-0", "reset"),
    ]
    cooled = records[0]
    assert cooled.pool == "logged"  # type: ignore[attr-defined]
    assert cooled.hint == pool.key("key-0").hint  # type: ignore[attr-defined]
    assert cooled.cooldown == 12.0  # type: ignore[attr-defined]
    assert cooled.status == 429  # type: ignore[attr-defined]
    assert "cools down for 12 s" in cooled.getMessage()
    assert records[1].status == 401  # type: ignore[attr-defined]
    failovers = [r for r in caplog.records if r.name == "keyfailover.client"]
    assert [r.levelname for r in failovers] == ["DEBUG", "DEBUG"]
    for record in caplog.records:
        no_key_in(record.getMessage() + json.dumps({k: str(v) for k, v in vars(record).items()}))


def test_records_no_logger_shows_are_dropped_in_the_core(up: MockUpstream, caplog) -> None:
    """As `serve` configures it: with the core's loggers at WARNING, a failover's
    DEBUG and INFO records are not made at all (they would wake the drain thread)."""
    client, pool = make_client(up, "anthropic", 2, name="threshold")
    caplog.set_level(logging.WARNING, logger="keyfailover")
    try:
        _logging.drop_below_configured_levels()
        # Shown from here on in Python, but the core was told WARNING: none is made.
        caplog.set_level(logging.DEBUG, logger="keyfailover")
        up.set_reply(KEYS[0], rate_limited("12"))
        assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 200
        up.set_reply(KEYS[1], Reply.error(401, "authentication_error", "revoked"))
        pool.key("key-0").reset()
        assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 429
        _logging.flush()
        mine = [r for r in caplog.records if getattr(r, "pool", None) == "threshold"]
        assert [(r.name, r.levelname) for r in mine] == [("keyfailover.pool", "WARNING")]

        # Told again: the failover's DEBUG and the cooldown's INFO are made.
        _logging.drop_below_configured_levels()
        pool.key("key-0").reset()
        client.request_sync("POST", "/v1/messages", body=b"{}")
        _logging.flush()
        mine = [r for r in caplog.records if getattr(r, "pool", None) == "threshold"]
        assert {(r.name, r.levelname) for r in mine} >= {
            ("keyfailover.client", "DEBUG"),
            ("keyfailover.pool", "INFO"),
        }
    finally:
        _native._set_log_threshold(0)


def test_flush_returns_once_records_the_drain_thread_took_are_logged(caplog) -> None:
    """A test (or a shutdown) that flushes before it looks must find every
    record made so far, including one the drain thread took and is still logging."""
    caplog.set_level(logging.INFO, logger="keyfailover.pool")
    entered, release = threading.Event(), threading.Event()

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if threading.current_thread().name == "keyfailover-logs":
                entered.set()
                release.wait(5)

    slow = Slow()
    logging.getLogger("keyfailover.pool").addHandler(slow)
    try:
        pool = kf.KeyPool({"flush-0": "sk-ant-flush-" + "z" * 20})
        pool.key("flush-0").mark_temporary(30)
        assert entered.wait(5), "the drain thread took the record"
        flushing = threading.Thread(target=_logging.flush)
        flushing.start()
        flushing.join(0.3)
        assert flushing.is_alive(), "flush() waits for the record the drain thread holds"
        release.set()
        flushing.join(5)
        assert not flushing.is_alive()
        mine = [getattr(r, "key", "") for r in caplog.records]
        assert [key for key in mine if key.startswith("flush-")] == ["flush-0"]
    finally:
        release.set()
        logging.getLogger("keyfailover.pool").removeHandler(slow)


def test_a_thousand_concurrent_transitions_are_all_logged(caplog) -> None:
    caplog.set_level(logging.INFO, logger="keyfailover.pool")
    keys = [f"sk-ant-many-{i:04d}-{'y' * 20}" for i in range(1000)]
    pool = kf.KeyPool(keys)

    async def mark_all() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(
            loop.run_in_executor(None, pool.key(f"key-{i}").mark_temporary, 30)
            for i in range(1000)
        ))  # fmt: skip

    asyncio.run(mark_all())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _logging.flush()
        if len([r for r in caplog.records if r.name == "keyfailover.pool"]) >= 1000:
            break
        time.sleep(0.01)
    logged = {r.key for r in caplog.records if r.name == "keyfailover.pool"}  # type: ignore[attr-defined]
    assert len(logged) == 1000


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def test_spans_for_a_request_that_failed_over(up: MockUpstream, spans) -> None:
    spans.clear()
    client, _ = make_client(up, "anthropic", 2)
    up.set_reply(KEYS[0], rate_limited())
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with serve_asgi(FailoverProxy(client)) as url:
        response = httpx.post(
            url + "/v1/messages",
            json={"model": "claude-test", "max_tokens": 5, "messages": []},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
    assert response.status_code == 200
    finished = spans.get_finished_spans()
    requests = [s for s in finished if s.name == "keyfailover.request"]
    attempts = [s for s in finished if s.name == "chat claude-test"]
    assert len(requests) == 1
    assert len(attempts) == 2
    request = requests[0]
    assert request.kind == trace.SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == trace_id, "traceparent honoured"
    assert request.attributes["gen_ai.provider.name"] == "anthropic"
    assert request.attributes["http.response.status_code"] == 200
    first, second = sorted(attempts, key=lambda s: s.attributes["keyfailover.attempt"])
    for span in attempts:
        assert span.kind == trace.SpanKind.CLIENT
        assert span.parent.span_id == request.context.span_id
        assert span.attributes["gen_ai.request.model"] == "claude-test"
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["server.address"] == "127.0.0.1"
    assert first.attributes["keyfailover.key"] == "key-0"
    assert first.attributes["http.response.status_code"] == 429
    assert first.attributes["error.type"] == "429"
    assert first.attributes["keyfailover.failover.reason"] == "rate_limited"
    assert second.attributes["keyfailover.key"] == "key-1"
    assert "keyfailover.failover.reason" not in second.attributes
    assert first.end_time <= second.start_time


def test_a_client_that_leaves_before_the_head_ends_the_request_span_as_failed(
    up: MockUpstream, spans
) -> None:
    spans.clear()
    client, _ = make_client(up, "anthropic", 1)
    up.enqueue(Reply(stall=5))
    with serve_asgi(FailoverProxy(client)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/messages", json={"model": "m", "messages": []}, timeout=0.5)
        deadline = time.monotonic() + 5
        while not [s for s in spans.get_finished_spans() if s.name == "keyfailover.request"]:
            assert time.monotonic() < deadline, "no request span"
            time.sleep(0.02)
    [request] = [s for s in spans.get_finished_spans() if s.name == "keyfailover.request"]
    assert request.attributes["error.type"] == "CancelledError"
    assert "http.response.status_code" not in request.attributes


def test_an_attempt_span_names_the_endpoint_its_key_went_to(up: MockUpstream, spans) -> None:
    """Keys with endpoints of their own: each attempt's `server.address` is the host it
    went to, not the client's base URL's."""
    spans.clear()
    port = up.url.rsplit(":", 1)[1]
    pool = kf.KeyPool(
        {
            "east": kf.Key(KEYS[0], base_url=f"http://localhost:{port}"),
            "west": kf.Key(KEYS[1], base_url=f"http://127.0.0.1:{port}"),
        }
    )
    client = kf.FailoverClient(pool, base_url="http://default-endpoint.invalid")
    up.set_reply(KEYS[0], rate_limited())
    with serve_asgi(FailoverProxy(client)) as url:
        response = httpx.post(url + "/v1/messages", json={"model": "m", "messages": []})
    assert response.status_code == 200
    attempts = [s for s in spans.get_finished_spans() if s.name == "chat m"]
    shown = sorted(
        (s.attributes["keyfailover.key"], s.attributes["server.address"]) for s in attempts
    )
    assert shown == [("east", "localhost"), ("west", "127.0.0.1")]


def test_a_body_nested_deeper_than_json_can_go_is_forwarded_with_tracing_on(
    up: MockUpstream, spans
) -> None:
    """Looking for the model must not fail the request: the body goes upstream as any."""
    spans.clear()
    client, _ = make_client(up, "anthropic", 1)
    deep = b'{"model":"m","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    up.enqueue(Reply.json({"ok": True}))
    with serve_asgi(FailoverProxy(client)) as url:
        response = httpx.post(url + "/v1/messages", content=deep)
    assert response.status_code == 200
    assert up.requests[0].body == deep
    (request,) = [s for s in spans.get_finished_spans() if s.name == "keyfailover.request"]
    assert "gen_ai.request.model" not in request.attributes


def test_transport_spans_are_client_spans(up: MockUpstream, spans) -> None:
    import anthropic
    import httpx2

    from keyfailover.transport import FailoverTransport

    spans.clear()
    client, _ = make_client(up, "anthropic", 1)
    http = httpx2.Client(transport=FailoverTransport(client))
    sdk = anthropic.Anthropic(api_key="unused", max_retries=0, http_client=http)
    sdk.messages.create(
        model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    names = {(s.name, s.kind) for s in spans.get_finished_spans()}
    assert ("keyfailover.request", trace.SpanKind.CLIENT) in names
    assert ("chat claude-test", trace.SpanKind.CLIENT) in names


def test_serve_writes_json_logs(up: MockUpstream) -> None:
    up.set_reply(KEYS[0], Reply.error(401, "authentication_error", "revoked"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--upstream", up.url, "--keys-env", "K",
         "--port", str(port), "--log-format", "json"],
        env={**os.environ, "K": ",".join(KEYS[:2])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/messages", json={}, timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(0.3)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    retired = [line for line in lines if line["logger"] == "keyfailover.pool"]
    assert retired
    assert (retired[0]["reason"], retired[0]["key"]) == ("revoked", "key-0")
    assert (retired[0]["level"], retired[0]["status"]) == ("WARNING", 401)
    proxied = [line for line in lines if line["logger"] == "keyfailover.proxy"]
    assert proxied
    assert (proxied[0]["attempts"], proxied[0]["key"]) == (2, "key-1")
    no_key_in(err)


def test_gemini_spans_name_the_provider_and_the_model_in_the_path(up: MockUpstream, spans) -> None:
    import httpx2
    from google import genai
    from google.genai import types

    from keyfailover.transport import FailoverTransport

    spans.clear()
    dead = f"http://127.0.0.1:{free_port()}"
    pool = kf.KeyPool({"east": kf.Key(KEYS[0], base_url=dead), "west": KEYS[1]})
    client = kf.FailoverClient(pool, base_url=up.url, provider="gemini")
    up.set_reply(KEYS[1], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="5s"))
    http = httpx2.Client(transport=FailoverTransport(client))
    sdk = genai.Client(api_key="unused", http_options=types.HttpOptions(httpx_client=http))
    with pytest.raises(genai.errors.ClientError):
        sdk.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    attempts = [s for s in spans.get_finished_spans() if s.name.startswith("generate_content")]
    assert {s.name for s in attempts} == {"generate_content gemini-2.5-flash"}
    east, west = sorted(attempts, key=lambda s: s.attributes["keyfailover.attempt"])
    assert east.attributes["gen_ai.provider.name"] == "gcp.gemini"
    assert east.attributes["gen_ai.request.model"] == "gemini-2.5-flash"
    assert east.attributes["error.type"] == "upstream_unreachable"
    assert east.attributes["keyfailover.failover.reason"] == "unreachable"
    assert west.attributes["keyfailover.failover.reason"] == "rate_limited"


def test_metrics_off_counts_no_requests_and_keeps_key_states(up: MockUpstream) -> None:
    """KEYFAILOVER_METRICS=off (for measuring what counting costs): requests are not
    counted, while key states and transitions are as ever."""
    script = textwrap.dedent(
        f"""
        import keyfailover as kf
        from keyfailover.testing import Reply, MockUpstream
        pool = kf.KeyPool({FAKE_KEYS[:2]!r})
        client = kf.FailoverClient(pool, base_url={up.url!r})
        for _ in range(3):
            assert client.request_sync("POST", "/v1/messages", body=b"{{}}").status == 200
        print(client.metrics())
        """
    )
    up.set_reply(FAKE_KEYS[0], Reply.error(401, "authentication_error", "revoked"))
    for setting, ok, attempts in (("off", 0, 0), ("on", 3, 4)):
        env = {**os.environ, "KEYFAILOVER_METRICS": setting}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(out.stdout)
            for s in family.samples
        }
        assert (
            samples[("keyfailover_requests_total", (("outcome", "ok"), ("pool", "anthropic")))]
            == ok
        )
        assert samples[("keyfailover_request_attempts_sum", (("pool", "anthropic"),))] == attempts
        revoked = (("key", "key-0"), ("pool", "anthropic"), ("reason", "revoked"))
        assert samples[("keyfailover_key_transitions_total", revoked)] == 1
        assert samples[("keyfailover_keys", (("pool", "anthropic"), ("state", "permanent")))] == 1
