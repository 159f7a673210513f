"""Throughput of keyfailover.testing.MockUpstream with keep-alive connections.

    python benches/bench_mock_upstream.py [--smoke] [--duration S] [--connections N]
                                          [--client auto|wrk|python] [--reply messages|fixed]

The server runs in this process (in its background thread, as in tests); the
load comes from another process: `wrk` when it is installed, else a small
asyncio HTTP/1.1 client started as a subprocess of this script. Each request
is a POST /v1/messages with a small JSON body; `--reply messages` (default)
answers it with the default Anthropic Messages reply, `--reply fixed` with a
fixed per-credential `Reply.json({"ok": true})`. Prints replies per second.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"mock-model","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
CREDENTIAL = "sk-ant-bench"
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "{CREDENTIAL}"
wrk.headers["anthropic-version"] = "2023-06-01"
"""


def load_testing_module() -> ModuleType:
    """keyfailover.testing, or its source package itself when keyfailover is not built yet."""
    try:
        import keyfailover.testing as testing
    except ImportError:
        package = ROOT / "python" / "keyfailover" / "testing"
        spec = importlib.util.spec_from_file_location(
            "keyfailover_testing",
            package / "__init__.py",
            submodule_search_locations=[str(package)],
        )
        assert spec is not None
        assert spec.loader is not None
        testing = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = testing
        spec.loader.exec_module(testing)
    return testing


# ---------------------------------------------------------------- python client


class _Client(asyncio.Protocol):
    """One keep-alive connection sending the next request as soon as a reply is complete."""

    def __init__(self, request: bytes, deadline: float) -> None:
        self.request, self.deadline = request, deadline
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.replies = self.failures = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buf[:end]).lower()
            length = int(re.search(rb"content-length: *(\d+)", head)[1])  # type: ignore[index]
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            self.replies += 1
            self.failures += not head.startswith(b"http/1.1 200 ")
            assert self.transport is not None
            if time.monotonic() < self.deadline:
                self.transport.write(self.request)
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _run_clients(port: int, connections: int, duration: float) -> tuple[int, int, float]:
    loop = asyncio.get_running_loop()
    request = (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"x-api-key: " + CREDENTIAL.encode() + b"\r\nanthropic-version: 2023-06-01\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    start = time.monotonic()
    clients: list[_Client] = []
    for _ in range(connections):
        _, client = await loop.create_connection(
            lambda: _Client(request, start + duration), "127.0.0.1", port
        )
        clients.append(client)
    await asyncio.gather(*(client.done for client in clients))
    elapsed = time.monotonic() - start
    return sum(c.replies for c in clients), sum(c.failures for c in clients), elapsed


def client_worker(port: int, connections: int, duration: float) -> None:
    replies, failures, elapsed = asyncio.run(_run_clients(port, connections, duration))
    print(replies, failures, elapsed)


def measure_with_python(port: int, connections: int, duration: float) -> tuple[float, str]:
    args = [sys.executable, __file__, "--worker", str(port), str(connections), str(duration)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
    replies, failures, elapsed = int(out[0]), int(out[1]), float(out[2])
    if failures:
        raise SystemExit(f"{failures} of {replies} replies were not 200 OK")
    how = f"python client, {connections} connections, {elapsed:.1f}s; install wrk for a client"
    return replies / elapsed, how + " that is not the bottleneck"


# ---------------------------------------------------------------- wrk


def measure_with_wrk(url: str, connections: int, duration: float) -> tuple[float, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s"]
        out = subprocess.run(
            [*args, script.name, url + "/v1/messages"], check=True, capture_output=True, text=True
        ).stdout
    for problem in ("Non-2xx or 3xx responses", "Socket errors"):
        if problem in out:
            raise SystemExit(f"wrk reported problems:\n{out}")
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if rate is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    return float(rate[1]), f"wrk -t1 -c{connections}, {duration:.0f}s"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run of a few seconds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--reply", choices=["messages", "fixed"], default="messages")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        client_worker(int(args.worker[0]), int(args.worker[1]), float(args.worker[2]))
        return
    duration, connections = (2.0, 8) if args.smoke else (args.duration, args.connections)
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"

    testing = load_testing_module()
    with testing.MockUpstream() as up:
        if args.reply == "fixed":
            up.set_reply(CREDENTIAL, testing.Reply.json({"ok": True}))
        start = time.monotonic()
        if client == "wrk":
            measure = measure_with_wrk(up.url, connections, duration)
        else:
            measure = measure_with_python(up.port, connections, duration)
        rate, how = measure
        recorded = len(up.requests)
        if recorded == 0 or time.monotonic() - start < duration * 0.5:
            raise SystemExit("the load generator did not run")
    print(f"{rate:,.0f} replies/s ({args.reply} reply; {how}; {recorded:,} requests recorded)")


if __name__ == "__main__":
    main()
