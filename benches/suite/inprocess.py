"""In-process measurements, each run as a role in a child process of its own.

- `sdk_role` (`_sdk`): the anthropic SDK with its default httpx2 transport vs
  with keyfailover's `AsyncFailoverTransport`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .config import OK_KEY, SSE_SHORT_KEY


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
