"""In-process measurements, each run as a role in a child process of its own.

- `sdk_role` (`_sdk`): the anthropic SDK with its default httpx2 transport vs
  with keyfailover's `AsyncFailoverTransport`;
- `client_role` (`_client`): the bare `FailoverClient` vs `httpx2.AsyncClient`
  sending straight to the upstream.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import BODY, LIMITED_KEY, OK_KEY, SSE_KEY, SSE_SHORT_KEY


async def sdk_role(spec: dict[str, Any]) -> dict[str, Any]:
    """Calls per second, each way, blocking and streaming: the best of two alternating runs."""
    import anthropic
    import httpx2

    from keyfailover import FailoverClient, KeyPool
    from keyfailover.transport import AsyncFailoverTransport

    upstream, duration, concurrency = spec["upstream"], spec["duration"], spec["concurrency"]

    def make(transport: str, stream: bool) -> anthropic.AsyncAnthropic:
        key = SSE_SHORT_KEY if stream else OK_KEY
        base_url = upstream + ("/sse" if stream else "")
        if transport == "default":
            return anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0)
        client = FailoverClient(KeyPool([key]), base_url=upstream)
        http_client = httpx2.AsyncClient(transport=AsyncFailoverTransport(client))
        return anthropic.AsyncAnthropic(
            base_url=base_url, api_key="unused", max_retries=0, http_client=http_client
        )

    async def one(sdk: anthropic.AsyncAnthropic, stream: bool) -> None:
        kwargs: dict[str, Any] = {
            "model": "mock-model",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        }
        if stream:
            events = await sdk.messages.create(**kwargs, stream=True)
            async for _ in events:
                pass
        else:
            message = await sdk.messages.create(**kwargs)
            assert message.content

    async def throughput(sdk: anthropic.AsyncAnthropic, stream: bool, seconds: float) -> float:
        count = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await one(sdk, stream)
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)

    results: dict[str, list[float]] = {}
    sdks = {(t, s): make(t, s) for t in ("default", "keyfailover") for s in (False, True)}
    for (_, stream), sdk in sdks.items():  # warm up connections and code paths
        await throughput(sdk, stream, min(0.5, duration))
    for _ in range(2):  # alternate, keep the best of two
        for (transport, stream), sdk in sdks.items():
            name = f"{transport}/{'stream' if stream else 'blocking'}"
            results.setdefault(name, []).append(await throughput(sdk, stream, duration / 2))
    for sdk in sdks.values():
        await sdk.close()
    return {name: max(values) for name, values in results.items()}


async def client_role(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare FailoverClient against httpx2.AsyncClient (pooled connections), both direct.

    Small blocking requests, `concurrency` at a time: req/s, the best of three
    alternating runs. The 1,000-event SSE stream, one at a time, alternating:
    medians of the first body bytes and of the whole. Requests one after
    another: medians, and FailoverClient's with a first key that answers 429
    (reset before each request, so that each meets it) before the second
    answers 200.
    """
    import httpx2

    from keyfailover import FailoverClient, KeyPool

    upstream, concurrency, rounds = spec["upstream"], spec["concurrency"], spec["rounds"]
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    client = FailoverClient(KeyPool({"ok": OK_KEY}), base_url=upstream)
    stream_client = FailoverClient(KeyPool({"sse": SSE_KEY}), base_url=upstream + "/sse1000")
    failover_pool = KeyPool({"limited": LIMITED_KEY, "ok": OK_KEY})
    failover_client = FailoverClient(failover_pool, base_url=upstream)
    limited = failover_pool.key("limited")
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    direct = httpx2.AsyncClient(base_url=upstream, limits=limits)

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(what)

    async def via_httpx2() -> None:
        response = await direct.post(
            "/v1/messages", headers={**headers, "x-api-key": OK_KEY}, content=BODY
        )
        expect(response.status_code == 200, f"httpx2 got {response.status_code}")

    async def via_keyfailover() -> None:
        response = await client.request("POST", "/v1/messages", headers=headers, body=BODY)
        await response.read()
        expect(response.status == 200, f"FailoverClient got {response.status}")

    async def with_failover() -> None:
        limited.reset()
        response = await failover_client.request("POST", "/v1/messages", headers=headers, body=BODY)
        await response.read()
        expect(
            response.status == 200 and response.attempts == 2,
            f"the failover got {response.status} after {response.attempts} attempts",
        )

    async def stream_httpx2() -> tuple[float, float, int]:
        start = time.perf_counter()
        request = direct.build_request(
            "POST",
            "/sse1000/v1/messages",
            headers={**headers, "x-api-key": SSE_KEY},
            content=BODY,
        )
        response = await direct.send(request, stream=True)
        first, size = 0.0, 0
        try:
            async for chunk in response.aiter_raw():
                first = first or time.perf_counter() - start
                size += len(chunk)
        finally:
            await response.aclose()
        expect(response.status_code == 200, f"httpx2's stream got {response.status_code}")
        return first, time.perf_counter() - start, size

    async def stream_keyfailover() -> tuple[float, float, int]:
        start = time.perf_counter()
        response = await stream_client.request("POST", "/v1/messages", headers=headers, body=BODY)
        first, size = 0.0, 0
        async for chunk in response:
            first = first or time.perf_counter() - start
            size += len(chunk)
        expect(response.status == 200, f"FailoverClient's stream got {response.status}")
        return first, time.perf_counter() - start, size

    async def throughput(send: Callable[[], Awaitable[None]], total: int) -> float:
        """Requests per second for `total` requests, `concurrency` at a time."""
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await send()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)

    async def one_at_a_time(send: Callable[[], Awaitable[None]]) -> float:
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            await send()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    ways = {
        "httpx2": (via_httpx2, stream_httpx2),
        "keyfailover": (via_keyfailover, stream_keyfailover),
    }
    for send, stream in ways.values():  # warm up connection pools and code paths
        await throughput(send, min(200, spec["requests"]))
        await stream()
    per_run = max(1, spec["requests"] // 3)
    rps: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):  # alternate, keep the best of three
        for name, (send, _) in ways.items():
            rps[name].append(await throughput(send, per_run))
    streams: dict[str, list[tuple[float, float, int]]] = {name: [] for name in ways}
    for _ in range(spec["sse_rounds"]):
        for name, (_, stream) in ways.items():
            streams[name].append(await stream())
    sizes = {size for samples in streams.values() for _, _, size in samples}
    expect(min(sizes) >= 50_000, f"a stream was too short ({min(sizes)} bytes)")
    sequential = {name: await one_at_a_time(send) for name, (send, _) in ways.items()}
    sequential["keyfailover_failover"] = await one_at_a_time(with_failover)
    await direct.aclose()
    return {
        "requests": per_run,
        "blocking": {name: max(values) for name, values in rps.items()},
        "sse": {
            name: {
                "ttfb": statistics.median(first for first, _, _ in samples),
                "total": statistics.median(total for _, total, _ in samples),
            }
            for name, samples in streams.items()
        },
        "sequential": sequential,
    }
