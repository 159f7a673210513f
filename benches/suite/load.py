"""Load generation: wrk, or the multiprocess Python client.

`LoadGenerator.run` sends load to one route of a setup and returns a `Load`
(requests, seconds, errors, latency percentiles). The Python client runs as
the `_loadgen` role in one or more child processes; `hold` (the `_hold` role)
keeps many streams open for the memory measurement.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from .config import HOST, LOAD_CPU, PCTS, pinned
from .procs import Setup, run_role
from .wire import ResponseParser, http_request

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "{credential}"
wrk.headers["anthropic-version"] = "2023-06-01"
done = function(summary, latency, requests)
  local e = summary.errors
  local out = {{}}
  for _, p in ipairs({{{pcts}}}) do out[#out + 1] = string.format("%d", latency:percentile(p)) end
  io.write(string.format(
    "RESULT {{\\"requests\\":%d,\\"us\\":%d,\\"status\\":%d,\\"socket\\":%d,\\"p\\":[%s]}}\\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    table.concat(out, ",")))
end
"""


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int
    percentiles: dict[float, float]  # percentile -> latency in ms

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def p(self, pct: float) -> float:
        return self.percentiles[pct]


class LoadGenerator:
    def __init__(self, use_wrk: bool) -> None:
        self.use_wrk = use_wrk
        self.name = "wrk -t1 (pinned to CPU 1)" if use_wrk else "Python asyncio client (CPU 1)"

    def run(
        self,
        setup: Setup,
        route: str,
        connections: int,
        duration: float,
        limit: int | None = None,
        rate: float | None = None,
    ) -> Load:
        """`connections` keep-alive connections for `duration` s (or until `limit` replies).

        With `rate`, requests go out at that many per second in all (open loop).
        Both `rate` and `limit` take the Python client: wrk cannot pace, nor end
        before its duration.
        """
        path, credential, body = setup.targets[route]
        if self.use_wrk and rate is None and limit is None:
            return self._wrk(setup.port, path, credential, body, connections, duration)
        return self._python(setup.port, path, credential, body, connections, duration, limit, rate)

    def _wrk(
        self,
        port: int,
        path: str,
        credential: str,
        body: bytes,
        connections: int,
        duration: float,
    ) -> Load:
        script = WRK_SCRIPT.format(
            body=json.dumps(body.decode()),
            credential=credential,
            pcts=",".join(str(p) for p in PCTS),
        )
        with tempfile.NamedTemporaryFile("w", suffix=".lua") as file:
            file.write(script)
            file.flush()
            seconds = max(1, math.ceil(duration))
            args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
            args += ["-s", file.name, f"http://{HOST}:{port}{path}"]
            args = pinned(args, LOAD_CPU)
            out = subprocess.run(
                args, capture_output=True, text=True, timeout=seconds + 60, check=True
            ).stdout
        match = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        result = json.loads(match[1])
        return Load(
            requests=result["requests"],
            seconds=result["us"] / 1e6,
            errors=result["status"] + result["socket"],
            percentiles={p: us / 1000 for p, us in zip(PCTS, result["p"], strict=True)},
        )

    def _python(
        self,
        port: int,
        path: str,
        credential: str,
        body: bytes,
        connections: int,
        duration: float,
        limit: int | None,
        rate: float | None = None,
    ) -> Load:
        workers = max(1, min(4, connections // 32))
        spec = {
            "port": port,
            "request": http_request(path, credential, body).decode(),
            "duration": duration,
            "limit": None if limit is None else math.ceil(limit / workers),
            "rate": None if rate is None else rate / workers,
        }
        specs = [
            {**spec, "connections": len(range(i, connections, workers))} for i in range(workers)
        ]
        threads_out: list[Any] = [None] * workers

        def one(i: int) -> None:
            threads_out[i] = run_role("_loadgen", specs[i], cpus=LOAD_CPU, timeout=duration + 60)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        latencies = sorted(lat for out in threads_out for lat in out["latencies"])
        if not latencies:
            raise RuntimeError("the Python load generator completed no request")
        return Load(
            requests=len(latencies),
            seconds=max(out["seconds"] for out in threads_out),
            errors=sum(out["errors"] for out in threads_out),
            percentiles={p: percentile(latencies, p) / 1000 for p in PCTS},
        )


def percentile(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


class _LoadConnection(asyncio.Protocol):
    """Sends the next request when the last reply is complete, or at a fixed pace.

    Paced (`interval` set), each request has a scheduled time and its latency
    counts from then, so a slow reply also delays (and counts against) the
    ones scheduled behind it.
    """

    def __init__(
        self, request: bytes, deadline: float, state: dict[str, Any], interval: float | None
    ) -> None:
        self.request, self.deadline, self.state, self.interval = request, deadline, state, interval
        self.parser = ResponseParser()
        self.scheduled = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self, delay: float) -> None:
        self.scheduled = time.perf_counter() + delay
        asyncio.get_running_loop().call_later(delay, self._send)

    def _send(self) -> None:
        assert self.transport is not None
        if self.interval is None:
            self.scheduled = time.perf_counter()
        if not self.transport.is_closing():
            self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for status in self.parser.feed(data):
            now = time.perf_counter()
            self.state["latencies"].append(round((now - self.scheduled) * 1e6))
            self.state["errors"] += not 200 <= status < 300
            limit = self.state["limit"]
            if now >= self.deadline or (
                limit is not None and len(self.state["latencies"]) >= limit
            ):
                self.transport.close()
            elif self.interval is None:
                self._send()
            else:
                self.scheduled += self.interval
                asyncio.get_running_loop().call_later(max(0.0, self.scheduled - now), self._send)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = spec["request"].encode()
    state: dict[str, Any] = {"latencies": [], "errors": 0, "limit": spec["limit"]}
    n, rate = spec["connections"], spec.get("rate")
    interval = None if rate is None else n / rate
    conns: list[_LoadConnection] = []
    for _ in range(n):
        _, conn = await loop.create_connection(
            lambda: _LoadConnection(request, math.inf, state, interval), HOST, spec["port"]
        )
        conns.append(conn)
    start = time.perf_counter()
    deadline = start + spec["duration"]  # with a limit, `duration` is only a bound
    for i, conn in enumerate(conns):
        conn.deadline = deadline if spec["limit"] is None else math.inf
        conn.start(0.0 if interval is None else interval * i / n)  # paced: spread evenly
    # A reply that never comes (a hung server) counts as an error, not a hang.
    pending = [conn.done for conn in conns]
    _, waiting = await asyncio.wait(pending, timeout=spec["duration"] + 10)
    for conn in conns:
        if not conn.done.done() and conn.transport is not None:
            conn.transport.abort()
    seconds = time.perf_counter() - start
    errors = state["errors"] + len(waiting)
    return {"latencies": state["latencies"], "errors": errors, "seconds": seconds}


async def hold(spec: dict[str, Any]) -> None:
    """Opens `streams` streams, says `ready` once each has its first body bytes, closes on EOF."""
    request = spec["request"].encode()

    async def open_stream() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(HOST, spec["port"], limit=1 << 20)
        writer.write(request)
        data = b""
        while b"\r\n\r\n" not in data or data.endswith(b"\r\n\r\n"):
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError(f"stream closed early: {data[:200]!r}")
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"stream did not open: {data[:200]!r}")
        return writer

    sem = asyncio.Semaphore(100)  # open them in waves, not one burst of SYNs

    async def bounded() -> asyncio.StreamWriter:
        async with sem:
            return await open_stream()

    writers = await asyncio.wait_for(
        asyncio.gather(*(bounded() for _ in range(spec["streams"]))), 120
    )
    print(json.dumps({"ready": len(writers)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()
    print(json.dumps({"closed": len(writers)}), flush=True)
