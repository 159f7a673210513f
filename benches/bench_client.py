"""FailoverClient against going direct with httpx2, side by side in one run.

    python benches/bench_client.py [--smoke]

The mock upstream runs in its own process so that it never shares a GIL with
the client being measured. Every figure is compared with its direct
counterpart from the same run; ratios are what to read, since absolute times
on a shared machine move from run to run.

1. throughput of small blocking requests at 32 concurrent: FailoverClient vs
   httpx2.AsyncClient (pooled connections);
2. a 1,000-event SSE stream: time to first byte and total time, both ways;
3. the cost of one failover: a request whose first key answers 429 vs a
   request that succeeds at once (one extra round trip is the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2

import keyfailover as kf

OK_KEY = "sk-bench-ok-000000000000000000000000"
LIMITED_KEY = "sk-bench-limited-0000000000000000000"
STREAM_KEY = "sk-bench-stream-00000000000000000000"
BODY = json.dumps({"model": "bench", "max_tokens": 8, "messages": []}).encode()
HEADERS = {"content-type": "application/json", "anthropic-version": "2023-06-01"}

UPSTREAM = """
import sys
from keyfailover.testing import MockUpstream
up = MockUpstream()
up.load_scenario(sys.argv[1])
up.start()
print(up.port, flush=True)
sys.stdin.read()
"""


def scenario(events: int) -> dict[str, object]:
    stream = [["content_block_delta", {"type": "content_block_delta", "index": 0}]] * events
    return {
        "replies": {
            LIMITED_KEY: {
                "status": 429,
                "error": {"type": "rate_limit_error", "message": "bench"},
                "headers": {"retry-after": "30"},
            },
            STREAM_KEY: {"sse": stream},
            OK_KEY: {"json": {"type": "message", "content": []}},
        }
    }


class Upstream:
    """The mock upstream in a child process."""

    def __init__(self, events: int) -> None:
        self._file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
        json.dump(scenario(events), self._file)
        self._file.close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", UPSTREAM, self._file.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        Path(self._file.name).unlink()


async def throughput(send: Callable[[], Awaitable[None]], total: int, concurrency: int) -> float:
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


async def timed(fn: Callable[[], Awaitable[float | None]], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        first = await fn()
        out.append(first if first is not None else time.perf_counter() - start)
    return out


async def run(smoke: bool) -> None:
    events = 1000
    total, rounds = (200, 20) if smoke else (20_000, 300)
    up = Upstream(events)
    try:
        pool = kf.KeyPool({"ok": OK_KEY})
        client = kf.FailoverClient(pool, base_url=up.url)
        failover_pool = kf.KeyPool({"limited": LIMITED_KEY, "ok": OK_KEY})
        failover_client = kf.FailoverClient(failover_pool, base_url=up.url)
        stream_client = kf.FailoverClient(kf.KeyPool({"s": STREAM_KEY}), base_url=up.url)
        limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
        direct = httpx2.AsyncClient(base_url=up.url, limits=limits)

        async def via_keyfailover() -> None:
            resp = await client.request("POST", "/v1/messages", headers=HEADERS, body=BODY)
            await resp.read()
            assert resp.status == 200

        async def via_httpx2(key: str = OK_KEY) -> None:
            resp = await direct.post(
                "/v1/messages", headers={**HEADERS, "x-api-key": key}, content=BODY
            )
            assert resp.status_code == 200

        # Warm both connection pools, then alternate the setups.
        await throughput(via_keyfailover, 200, 32)
        await throughput(via_httpx2, 200, 32)
        kf_rps, hx_rps = [], []
        for _ in range(3):
            kf_rps.append(await throughput(via_keyfailover, total // 3, 32))
            hx_rps.append(await throughput(via_httpx2, total // 3, 32))
        print("## Small blocking requests, 32 concurrent (best of 3)")
        print(f"httpx2.AsyncClient direct   {max(hx_rps):9.0f} req/s")
        print(f"FailoverClient              {max(kf_rps):9.0f} req/s")
        print(f"ratio                       {max(kf_rps) / max(hx_rps):9.2f}x\n")

        async def stream_keyfailover() -> float | None:
            start = time.perf_counter()
            ttfb = None
            resp = await stream_client.request("POST", "/v1/messages", headers=HEADERS, body=BODY)
            async for _ in resp:
                ttfb = ttfb or time.perf_counter() - start
            return None if ttfb is None else -ttfb  # total is measured by `timed`

        async def stream_direct() -> float | None:
            start = time.perf_counter()
            ttfb = None
            req = direct.build_request(
                "POST",
                "/v1/messages",
                headers={**HEADERS, "x-api-key": STREAM_KEY},
                content=BODY,
            )
            resp = await direct.send(req, stream=True)
            async for _ in resp.aiter_raw():
                ttfb = ttfb or time.perf_counter() - start
            await resp.aclose()
            return None if ttfb is None else -ttfb

        async def total_and_ttfb(fn: Callable[[], Awaitable[float | None]]) -> tuple[float, float]:
            totals, ttfbs = [], []
            for _ in range(max(3, rounds // 10)):
                start = time.perf_counter()
                neg_ttfb = await fn()
                totals.append(time.perf_counter() - start)
                ttfbs.append(-(neg_ttfb or 0.0))
            return statistics.median(totals), statistics.median(ttfbs)

        kf_total, kf_ttfb = await total_and_ttfb(stream_keyfailover)
        hx_total, hx_ttfb = await total_and_ttfb(stream_direct)
        print(f"## {events}-event SSE stream (median)")
        for name, total_s, ttfb_s in [
            ("httpx2 direct", hx_total, hx_ttfb),
            ("FailoverClient", kf_total, kf_ttfb),
        ]:
            print(f"{name:18}total {total_s * 1e3:7.2f} ms   first byte {ttfb_s * 1e3:6.2f} ms")
        print(f"added             total {(kf_total - hx_total) * 1e3:+7.2f} ms\n")

        async def single() -> None:
            resp = await client.request("POST", "/v1/messages", headers=HEADERS, body=BODY)
            await resp.read()

        limited = failover_pool.key("limited")

        async def with_failover() -> None:
            limited.reset()
            resp = await failover_client.request("POST", "/v1/messages", headers=HEADERS, body=BODY)
            await resp.read()
            assert resp.attempts == 2

        async def sequential(fn: Callable[[], Awaitable[None]]) -> float:
            samples = []
            for _ in range(rounds):
                start = time.perf_counter()
                await fn()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples)

        one = await sequential(single)
        two = await sequential(with_failover)
        print("## One failover (median of sequential requests)")
        print(f"request, first key succeeds        {one * 1e6:8.1f} us")
        print(f"request, first key answers 429     {two * 1e6:8.1f} us")
        added = (two - one) * 1e6
        print(f"added by the failover (one upstream round trip included) {added:8.1f} us")
        await direct.aclose()
    finally:
        up.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, a few seconds")
    asyncio.run(run(parser.parse_args().smoke))


if __name__ == "__main__":
    main()
