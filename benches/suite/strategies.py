"""The pool's strategies against provider-like rate limits (issue 12).

Four keys, each limited by MockUpstream (`limits=`) to N requests per window,
and a paced load of 3.5 x N requests per window in all (7/8 of the pool's
capacity) for several windows, through a `FailoverClient` over a fresh pool
and a fresh MockUpstream for each strategy. Per strategy: the upstream's 429
round trips per 1,000 requests (MockUpstream records every request; each one
that is not a request's 200 was answered 429), the share of the load the
capacity allowed that was served, and the requests the client saw fail.

Run twice: with an upstream that answers at once (requests hardly overlap)
and with one whose 200s take `latency` seconds (the 429s come at once, as a
provider's do), so that several requests are in flight when a key's window
runs out, as with an LLM API. Both the upstream (on a thread of its own) and
the client run in one child process (the `_strategies` role).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from .config import BODY, SERVER_CPU, log
from .measure import Bench
from .procs import run_role

STRATEGIES = ("ordered", "round_robin", "least_loaded", "headroom")
KEYS = 4
LOAD = 3.5  # requests per window in all, in units of one key's limit (N)
# The goals: headroom cuts ordered's 429 round trips by this much and serves this much.
CUT_GOAL = 0.90
SERVED_GOAL = 0.95


def strategies(bench: Bench) -> dict[str, Any]:
    """Each strategy in turn, at each upstream latency (the `_strategies` role)."""
    plan = bench.plan
    spec = {
        "limit": plan.strategy_limit,
        "window": plan.strategy_window,
        "windows": plan.strategy_windows,
        "concurrency": plan.strategy_concurrency,
        "latencies": list(plan.strategy_latencies),
    }
    out: dict[str, Any] = run_role("_strategies", spec, cpus=SERVER_CPU, timeout=300)
    for latency, rows in out["latencies"].items():
        for name, row in rows.items():
            log(
                f"  latency {float(latency) * 1e3:3.0f} ms  {name:13} "
                f"{row['upstream_429'] / row['requests'] * 1e3:6.1f} 429s / 1,000 requests  "
                f"served {row['served']:.1%}  client errors {row['errors']}  "
                f"keys {'/'.join(str(n) for n in row['per_key'])}"
            )
    return out


async def strategies_role(spec: dict[str, Any]) -> dict[str, Any]:
    """The `_strategies` role: every (latency, strategy) in turn, each with a fresh
    MockUpstream and pool."""
    out: dict[str, Any] = {**spec, "latencies": {}}
    for latency in spec["latencies"]:
        rows = {}
        for strategy in STRATEGIES:
            rows[strategy] = await one_strategy(spec, strategy, latency)
        out["latencies"][str(latency)] = rows
    return out


async def one_strategy(spec: dict[str, Any], strategy: str, latency: float) -> dict[str, Any]:
    """`LOAD` x N requests per window, paced (open loop), `concurrency` at most in flight."""
    from keyfailover import FailoverClient, KeyPool
    from keyfailover.testing import Limit, MockUpstream, Reply, anthropic_message

    n, window, windows = spec["limit"], spec["window"], spec["windows"]
    keys = {f"key-{i}": f"sk-ant-bench-strategy-{i}-00000000000000000" for i in range(KEYS)}
    up = MockUpstream(limits={key: Limit(requests=n, window=window) for key in keys.values()})
    if latency:
        for key in keys.values():  # a 429 still comes at once: the limit replaces this reply
            up.set_reply(key, Reply.json(anthropic_message(), stall=latency))
    up.start()
    try:
        client = FailoverClient(KeyPool(keys, strategy=strategy), base_url=up.url)
        headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
        rate = LOAD * n / window
        total = round(LOAD * n * windows)
        statuses: Counter[int] = Counter()
        per_key: Counter[str] = Counter()
        attempted_429 = 0
        lateness: list[float] = []
        queue: asyncio.Queue[float | None] = asyncio.Queue()

        async def worker() -> None:
            nonlocal attempted_429
            while (due := await queue.get()) is not None:
                lateness.append(time.perf_counter() - due)
                try:
                    response = await client.request(
                        "POST", "/v1/messages", headers=headers, body=BODY
                    )
                    await response.read()
                except Exception:  # counted as a client-visible error
                    statuses[0] += 1
                    continue
                statuses[response.status] += 1
                if response.status == 200 and response.key_label is not None:
                    per_key[response.key_label] += 1
                attempted_429 += sum(a.get("status") == 429 for a in response.attempt_log)

        start = time.perf_counter()

        async def pace() -> None:
            for i in range(total):
                due = start + i / rate
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
                queue.put_nowait(due)
            for _ in range(spec["concurrency"]):
                queue.put_nowait(None)

        await asyncio.gather(pace(), *(worker() for _ in range(spec["concurrency"])))
        seconds = time.perf_counter() - start
        upstream = len(up.requests)
    finally:
        up.stop()
    ok = statuses[200]
    capacity = KEYS * n * windows
    return {
        "requests": total,
        "ok": ok,
        "errors": total - ok,
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "upstream": upstream,
        # Every 200 a request got is one upstream 200; the rest were answered 429.
        "upstream_429": upstream - ok,
        "attempted_429": attempted_429,  # the same, from the responses' attempt logs
        "capacity": capacity,
        "served": ok / min(total, capacity),
        "per_key": [per_key[label] for label in keys],
        "seconds": seconds,
        "late_p99": sorted(lateness)[int(0.99 * (len(lateness) - 1))] if lateness else 0.0,
    }
