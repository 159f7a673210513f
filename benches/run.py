"""The keyfailover benchmark suite, every comparison side by side in one run.

    python benches/run.py            # the full run (a few minutes): results/latest.md + PNGs
    python benches/run.py --smoke    # tiny counts, no external tools (CI): results/smoke.md

What runs, all on 127.0.0.1:

- a fast upstream (nginx serving static replies, or MockUpstream in its own
  process: both are measured and the faster one is used) and a slow one
  (MockUpstream, for streams held open);
- the setups, each a process of its own with the same routes: the upstream
  directly (the floor); `FailoverProxy` in FastAPI under uvicorn (one worker);
  the same under granian; the pure-Python equivalent (pure_python_proxy.py)
  in the same FastAPI app under uvicorn; LiteLLM's proxy when a safe version
  installs;
- the load: wrk (installed with apt-get when missing) or, failing that and
  always with --smoke, a multiprocess Python client; the same concurrency
  and duration for every setup.

The process under test is pinned to one CPU, the load generator and the
upstreams to another (taskset), so every proxy gets one core whatever its
threads. Figures are read as ratios between setups of the same run: absolute
times on a shared machine move from run to run.

Internal roles (`python run.py _loadgen JSON` and the like) run in the child
processes the suite starts; `asgi_app` is the factory the ASGI servers load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
HOST = "127.0.0.1"
# The process under test gets one CPU, the load generator and the upstreams another.
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, LOAD_CPU = (str(_CPUS[0]), str(_CPUS[1])) if len(_CPUS) >= 2 else (None, None)


def pinned(args: list[str], cpus: str | None) -> list[str]:
    """`args` run on `cpus` (taskset execs, so the pid stays the command's)."""
    if cpus is None or not shutil.which("taskset"):
        return args
    return ["taskset", "-c", cpus, *args]


# Fake keys only: the upstreams pick their reply by the key they are sent.
TOKEN = "bench-client-token"
OK_KEY = "sk-ant-bench-ok-0000000000000000000000"
LIMITED_KEY = "sk-ant-bench-limited-000000000000000000"
SSE_KEY = "sk-ant-bench-sse1000-000000000000000000"
SSE_SHORT_KEY = "sk-ant-bench-sse-short-0000000000000000"
SLOW_KEY = "sk-ant-bench-slow-0000000000000000000000"
BODY = b'{"model":"mock-model","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
SSE_EVENTS = 1000
SLOW_EVENTS, SLOW_DELAY = 120, 0.5  # a slow stream: one event every 0.5 s for a minute
# Percentiles kept for tables and plots.
PCTS = [1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 97.5, 99, 99.5, 99.9, 100]

LITELLM_VERSION = "1.82.6"  # the last release before the March 2026 compromise (1.82.7, 1.82.8)
LITELLM_VENV = Path(tempfile.gettempdir()) / f"kf-bench-litellm-{LITELLM_VERSION}"


@dataclass(frozen=True)
class Plan:
    """How much of everything: the full run and the smoke run differ only here."""

    duration: float  # seconds of measured load per setup and concurrency
    warmup: float
    concurrencies: tuple[int, ...]
    probe: float  # seconds per upstream candidate
    sse_rounds: int
    failover_rounds: int
    streams: int
    drift_warmup: int
    drift_requests: int
    sdk_duration: float
    paced_rate: float  # requests/s in all, for the latency below saturation
    sdk_concurrency: int = 16


FULL = Plan(
    duration=5.0,
    warmup=1.0,
    concurrencies=(1, 16, 64),
    probe=2.0,
    sse_rounds=30,
    failover_rounds=300,
    streams=1000,
    drift_warmup=20_000,
    drift_requests=100_000,
    sdk_duration=3.0,
    paced_rate=500,
)
SMOKE = Plan(
    duration=0.5,
    warmup=0.2,
    concurrencies=(1, 16),
    probe=0.3,
    sse_rounds=3,
    failover_rounds=10,
    streams=20,
    drift_warmup=100,
    drift_requests=300,
    sdk_duration=0.3,
    paced_rate=100,
    sdk_concurrency=4,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# HTTP/1.1 on raw sockets: the smallest client, so the client costs little
# --------------------------------------------------------------------------


def http_request(path: str, credential: str, body: bytes = BODY) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\ncontent-type: application/json\r\n"
        f"x-api-key: {credential}\r\nanthropic-version: 2023-06-01\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class ResponseParser:
    """Incremental HTTP/1.1 response framing (Content-Length or chunked), body discarded."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status: int | None = None
        self.chunked = False
        self.remaining = 0  # body bytes (or chunk bytes + CRLF) still to come
        self.body_bytes = 0

    def feed(self, data: bytes) -> list[int]:
        """The statuses of the responses `data` completes."""
        self.buf += data
        done: list[int] = []
        while True:
            if self.status is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return done
                head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                self.status = int(head[9:12])
                length = re.search(rb"\r\ncontent-length: *(\d+)", head)
                self.chunked = length is None and b"transfer-encoding: chunked" in head
                self.remaining = int(length[1]) if length else 0
            if self.remaining:
                take = min(self.remaining, len(self.buf))
                del self.buf[:take]
                self.remaining -= take
                self.body_bytes += take
                if self.remaining:
                    return done
            if self.chunked:
                line_end = self.buf.find(b"\r\n")
                if line_end < 0:
                    return done
                size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
                if size == 0:
                    if len(self.buf) < line_end + 4:  # the empty trailer section
                        return done
                    del self.buf[: line_end + 4]
                else:
                    del self.buf[: line_end + 2]
                    self.remaining = size + 2
                    continue
            done.append(self.status)
            self.status = None


class Connection:
    """One keep-alive connection for sequential requests: status, first byte and total time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ResponseParser()

    def request(self, raw: bytes) -> tuple[int, float, float]:
        start = time.perf_counter()
        self.sock.sendall(raw)
        first = None
        while True:
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("the server closed the connection")
            first = first or time.perf_counter()
            statuses = self.parser.feed(data)
            if statuses:
                return statuses[0], first - start, time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of `pid` and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
    return total


class Processes:
    """Every process the suite starts, each in its own session so its whole group can be stopped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self,
        args: list[str],
        *,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            pinned(args, cpus),
            start_new_session=True,
            env={**os.environ, **(env or {})},
            text=True,
            **kwargs,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def run_role(role: str, spec: dict[str, Any], *, cpus: str | None, timeout: float) -> Any:
    """Runs one of this script's internal roles to completion and returns its JSON answer."""
    args = pinned([sys.executable, __file__, role, json.dumps(spec)], cpus)
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{role} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Upstreams
# --------------------------------------------------------------------------


def sse_event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def scenario() -> dict[str, Any]:
    """MockUpstream's replies, chosen by key (the paths do not matter to it)."""
    from keyfailover.testing import anthropic_message, anthropic_stream_events

    delta = {"type": "content_block_delta", "index": 0}
    long_stream = [
        ["content_block_delta", {**delta, "delta": {"type": "text_delta", "text": f"w{i} "}}]
        for i in range(SSE_EVENTS)
    ]
    start = [list(event) for event in anthropic_stream_events()[:1]]
    return {
        "replies": {
            OK_KEY: {"json": anthropic_message()},
            LIMITED_KEY: {
                "status": 429,
                "error": {"type": "rate_limit_error", "message": "bench"},
                "headers": {"retry-after-ms": "1"},
            },
            SSE_KEY: {"sse": long_stream},
            SSE_SHORT_KEY: {"sse": [list(event) for event in anthropic_stream_events()]},
            SLOW_KEY: {"sse": start + long_stream[:SLOW_EVENTS], "chunk_delay": SLOW_DELAY},
        }
    }


@dataclass
class Upstream:
    name: str
    port: int
    proc: subprocess.Popen[str]
    status_queries: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def request_count(self) -> int:
        """Requests the upstream has answered so far (for checking failovers)."""
        if self.name == "nginx":
            self.status_queries += 1  # stub_status counts the requests for itself too
            raw = f"GET /nginx_status HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
            with socket.create_connection((HOST, self.port)) as sock:
                sock.sendall(raw.encode())
                text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
            counters = re.search(r"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", text)
            if counters is None:
                raise RuntimeError(f"unexpected nginx status page: {text!r}")
            return int(counters[3]) - self.status_queries
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())


def start_mock(procs: Processes, workdir: Path) -> Upstream:
    path = workdir / "scenario.json"
    path.write_text(json.dumps(scenario()))
    proc = procs.start(
        [sys.executable, __file__, "_mock", json.dumps({"scenario": str(path)})],
        cpus=LOAD_CPU,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Upstream("MockUpstream", port, proc)


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/body;
    map $http_x_api_key $limited {{ "{limited}" 1; default 0; }}
    server {{
        listen {host}:{port} backlog=4096;
        location = /nginx_status {{ stub_status; }}
        # Streams are files; `return 405` + error_page turns the POST into a GET of the file.
        location /sse1000/ {{ error_page 405 =200 /sse1000.txt; return 405; }}
        location /sse/ {{ error_page 405 =200 /sse-short.txt; return 405; }}
        location ~ ^/sse[-0-9a-z]*\\.txt$ {{
            internal;
            root {dir};
            types {{ }}
            default_type text/event-stream;
            add_header cache-control no-cache;
        }}
        location / {{
            default_type application/json;
            if ($limited) {{
                add_header retry-after-ms 1 always;
                return 429 '{error}';
            }}
            return 200 '{message}';
        }}
    }}
}}
"""


def start_nginx(procs: Processes, workdir: Path) -> Upstream:
    from keyfailover.testing import anthropic_message, anthropic_stream_events

    nginx_dir = workdir / "nginx"
    nginx_dir.mkdir()
    nginx_dir.chmod(0o755)  # nginx's workers read the stream files as an unprivileged user
    replies = scenario()["replies"]
    long_stream = "".join(sse_event(name, data) for name, data in replies[SSE_KEY]["sse"])
    (nginx_dir / "sse1000.txt").write_text(long_stream)
    short = "".join(sse_event(name, data) for name, data in anthropic_stream_events())
    (nginx_dir / "sse-short.txt").write_text(short)
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "bench"}}
    port = free_port()
    conf = NGINX_CONF.format(
        dir=nginx_dir,
        host=HOST,
        port=port,
        limited=LIMITED_KEY,
        error=json.dumps(error, separators=(",", ":")),
        message=json.dumps(anthropic_message(), separators=(",", ":")),
    )
    (nginx_dir / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = procs.start(
        [nginx, "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-g", "daemon off;"],
        cpus=LOAD_CPU,
    )
    upstream = Upstream("nginx", port, proc)
    wait_ready(upstream.port, "/v1/messages", OK_KEY, proc)
    return upstream


# --------------------------------------------------------------------------
# The setups under test
# --------------------------------------------------------------------------

# The setups whose failure fails the run (see `run`).
MUST_PASS = frozenset({"kf-uvicorn", "kf-granian", "py-uvicorn"})


def asgi_app() -> Any:
    """The app every ASGI server runs: FastAPI with one proxy mount per route.

    Environment: KFB_IMPL (keyfailover | python), KFB_FAST and KFB_SLOW (upstream URLs).
    """
    from fastapi import FastAPI

    impl, fast, slow = os.environ["KFB_IMPL"], os.environ["KFB_FAST"], os.environ["KFB_SLOW"]
    mounts = [
        ("/anthropic", fast, [OK_KEY]),
        ("/failover", fast, [LIMITED_KEY, OK_KEY]),
        ("/sse", fast + "/sse1000", [SSE_KEY]),
        ("/slow", slow + "/slow", [SLOW_KEY]),
    ]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for prefix, base_url, keys in mounts:
        if impl == "keyfailover":
            from keyfailover import FailoverClient, KeyPool
            from keyfailover.asgi import FailoverProxy

            client = FailoverClient(KeyPool(keys), base_url=base_url)
            app.mount(prefix, FailoverProxy(client, client_tokens=[TOKEN]))
        else:
            sys.path.insert(0, str(HERE))
            from pure_python_proxy import create_app

            app.mount(prefix, create_app(base_url, keys, client_tokens=[TOKEN]))
    # As the README recommends (and `keyfailover serve` does), for every setup alike:
    # objects that live as long as the server stay out of full collections.
    gc.freeze()
    return app


@dataclass
class Setup:
    """One thing to send load to, and how to reach each route on it."""

    key: str
    label: str
    port: int
    targets: dict[str, tuple[str, str, bytes]]  # route -> (path, credential, body)
    proc: subprocess.Popen[str] | None = None
    note: str = ""

    @property
    def is_proxy(self) -> bool:
        return self.key != "direct"

    def raw(self, route: str) -> bytes:
        path, credential, body = self.targets[route]
        return http_request(path, credential, body)


def proxy_targets() -> dict[str, tuple[str, str, bytes]]:
    return {
        "json": ("/anthropic/v1/messages", TOKEN, BODY),
        "failover": ("/failover/v1/messages", TOKEN, BODY),
        "sse": ("/sse/v1/messages", TOKEN, BODY),
        "slow": ("/slow/v1/messages", TOKEN, BODY),
    }


def direct_setup(upstream: Upstream) -> Setup:
    targets = {
        "json": ("/v1/messages", OK_KEY, BODY),
        "sse": ("/sse1000/v1/messages", SSE_KEY, BODY),
    }
    return Setup("direct", f"direct to {upstream.name}", upstream.port, targets, note="the floor")


def wait_ready(
    port: int, path: str, credential: str, proc: subprocess.Popen[str], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            conn = Connection(port)
            try:
                status, _, _ = conn.request(http_request(path, credential))
            finally:
                conn.close()
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args} not ready on port {port}: {last}")


def uvicorn_options() -> tuple[str, str]:
    """uvicorn's fastest installed loop and HTTP parser (what uvicorn[standard] gives)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def start_asgi(procs: Processes, impl: str, server: str, fast: Upstream, slow: Upstream) -> Setup:
    port = free_port()
    env = {"KFB_IMPL": impl, "KFB_FAST": fast.url, "KFB_SLOW": slow.url}
    if server == "uvicorn":
        loop, http = uvicorn_options()
        args = [sys.executable, "-m", "uvicorn", "--factory", "run:asgi_app"]
        args += ["--app-dir", str(HERE), "--host", HOST, "--port", str(port)]
        args += ["--log-level", "warning", "--no-access-log", "--backlog", "2048"]
        args += ["--loop", loop, "--http", http]
        note = f"uvicorn {loop}+{http}, 1 worker"
    else:
        granian = str(Path(sys.executable).with_name("granian"))
        args = [granian, "--interface", "asgi", "--factory", "--working-dir", str(HERE)]
        args += ["--host", HOST, "--port", str(port), "--workers", "1", "--backlog", "2048"]
        args += ["--log-level", "warning", "--no-ws", "run:asgi_app"]
        note = "granian asgi, 1 worker, 1 runtime thread"
    proc = procs.start(args, cpus=SERVER_CPU, env=env, cwd=str(HERE))
    label = {"keyfailover": "FailoverProxy", "python": "pure Python"}[impl] + f" + {server}"
    key = {"keyfailover": "kf", "python": "py"}[impl] + f"-{server}"
    setup = Setup(key, label, port, proxy_targets(), proc, note)
    path, credential, _ = setup.targets["json"]
    wait_ready(port, path, credential, proc)
    return setup


# --------------------------------------------------------------------------
# LiteLLM's proxy (optional, in its own venv)
# --------------------------------------------------------------------------


def ensure_litellm(notes: list[str]) -> Path | None:
    """A venv under /tmp with litellm[proxy] at the pinned version; None (with a note) if not."""
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        log(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(LITELLM_VENV, ignore_errors=True)
            notes.append(
                f"LiteLLM skipped: `litellm[proxy]=={LITELLM_VERSION}` did not install ({exc})."
            )
            return None
    # The compromised releases dropped a litellm_init.pth; refuse any litellm .pth file.
    pth = [p.name for p in LITELLM_VENV.rglob("*.pth") if "litellm" in p.name.lower()]
    if pth:
        notes.append(f"LiteLLM skipped: its venv holds unexpected .pth files {pth}.")
        return None
    return python


LITELLM_CONFIG = """
model_list:
{models}
router_settings:
  num_retries: 3
  retry_after: 0
  allowed_fails: 0
  cooldown_time: 0.001
litellm_settings:
  drop_params: true
  telemetry: false
general_settings:
  master_key: {token}
"""


def start_litellm(
    procs: Processes, python: Path, workdir: Path, fast: Upstream, slow: Upstream
) -> Setup:
    """LiteLLM's proxy in front of the same upstream, one deployment per key of a route."""
    deployments = [
        ("bench-json", fast.url, OK_KEY),
        ("bench-failover", fast.url, LIMITED_KEY),
        ("bench-failover", fast.url, OK_KEY),
        ("bench-sse", fast.url + "/sse1000", SSE_KEY),
        ("bench-slow", slow.url + "/slow", SLOW_KEY),
    ]
    models = "\n".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: anthropic/mock-model\n"
        f"      api_base: {base}\n      api_key: {key}"
        for name, base, key in deployments
    )
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(models=models, token=TOKEN))
    port = free_port()
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    args = [str(python.with_name("litellm")), "--config", str(config), "--host", HOST]
    args += ["--port", str(port), "--num_workers", "1"]
    proc = procs.start(
        args, cpus=SERVER_CPU, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def body(model: str, stream: bool = False) -> bytes:
        payload = json.loads(BODY)
        payload.update(model=model, stream=stream)
        return json.dumps(payload, separators=(",", ":")).encode()

    targets = {
        "json": ("/v1/messages", TOKEN, body("bench-json")),
        "failover": ("/v1/messages", TOKEN, body("bench-failover")),
        "sse": ("/v1/messages", TOKEN, body("bench-sse", stream=True)),
        "slow": ("/v1/messages", TOKEN, body("bench-slow", stream=True)),
    }
    setup = Setup("litellm", f"LiteLLM {LITELLM_VERSION} proxy", port, targets, proc)
    setup.note = (
        f"`litellm --num_workers 1` in its own venv; {LITELLM_VERSION} is the last release "
        "before the compromised 1.82.7 and 1.82.8 (March 2026); a router with one deployment "
        "per key, 3 retries"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited with {proc.returncode}")
        try:
            conn = Connection(port)
            try:
                status, _, _ = conn.request(setup.raw("json"))
            finally:
                conn.close()
            if status == 200:
                return setup
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("litellm's proxy did not answer 200 within 120 s")


# --------------------------------------------------------------------------
# Load generation: wrk, or the multiprocess Python client
# --------------------------------------------------------------------------

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


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
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


async def _hold(spec: dict[str, Any]) -> None:
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


# --------------------------------------------------------------------------
# In-process: the anthropic SDK with its default transport vs keyfailover's
# --------------------------------------------------------------------------


async def _sdk(spec: dict[str, Any]) -> dict[str, Any]:
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


def _mock(spec: dict[str, Any]) -> None:
    from keyfailover.testing import MockUpstream

    up = MockUpstream()
    up.load_scenario(spec["scenario"])
    up.start()
    print(up.port, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":
                print(len(up.requests), flush=True)
    finally:
        up.stop()


ROLES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "_loadgen": lambda spec: asyncio.run(_loadgen(spec)),
    "_hold": lambda spec: asyncio.run(_hold(spec)),
    "_sdk": lambda spec: asyncio.run(_sdk(spec)),
    "_mock": _mock,
}


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


def load_dict(load: Load) -> dict[str, Any]:
    return {
        "rps": load.rps,
        "requests": load.requests,
        "errors": load.errors,
        "p": {str(p): ms for p, ms in load.percentiles.items()},
    }


class Notes(list[str]):
    """Notes for the report; `failed` holds the keys of setups that failed a workload."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()


def for_each(
    setups: list[Setup], what: str, measure: Callable[[Setup], dict[str, Any]], notes: list[str]
) -> dict[str, Any]:
    """`measure(setup)` for each setup; a proxy that fails is noted and the others go on."""
    out: dict[str, Any] = {}
    for setup in setups:
        try:
            out[setup.key] = measure(setup)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            if not setup.is_proxy:
                raise
            notes.append(f"{setup.label}: {what} failed: {exc}")
            if isinstance(notes, Notes):
                notes.failed.add(setup.key)
            log(f"  {setup.label:34} FAILED: {exc}")
    return out


def measure_blocking(
    gen: LoadGenerator, setups: list[Setup], plan: Plan, notes: list[str]
) -> dict[str, Any]:
    """Small blocking requests: every setup at each concurrency, the setups interleaved."""
    out: dict[str, Any] = {setup.key: {} for setup in setups}
    for connections in plan.concurrencies:

        def measure(setup: Setup, connections: int = connections) -> dict[str, Any]:
            gen.run(setup, "json", connections, plan.warmup)
            load = gen.run(setup, "json", connections, plan.duration)
            log(
                f"  {setup.label:34} c={connections:<3} {load.rps:8.0f} req/s  "
                f"p50 {load.p(50):6.2f} ms  p99 {load.p(99):6.2f} ms  errors {load.errors}"
            )
            return load_dict(load)

        for key, row in for_each(setups, f"c={connections}", measure, notes).items():
            out[key][str(connections)] = row
    return out


def measure_paced(
    gen: LoadGenerator, setups: list[Setup], plan: Plan, notes: list[str]
) -> dict[str, Any]:
    """16 connections sending `plan.paced_rate` requests/s in all: latency below saturation."""

    def measure(setup: Setup) -> dict[str, Any]:
        load = gen.run(setup, "json", 16, plan.duration, rate=plan.paced_rate)
        log(
            f"  {setup.label:34} {load.rps:6.0f} req/s  p50 {load.p(50):6.2f} ms  "
            f"p99 {load.p(99):6.2f} ms  errors {load.errors}"
        )
        return load_dict(load)

    return for_each(setups, "paced load", measure, notes)


def measure_sse(setups: list[Setup], plan: Plan, notes: list[str]) -> dict[str, Any]:
    """A 1,000-event SSE stream, sequentially: time to first byte and total, medians."""

    def measure(setup: Setup) -> dict[str, Any]:
        conn = Connection(setup.port)
        try:
            raw = setup.raw("sse")
            conn.request(raw)  # warm-up
            ttfb, total = [], []
            for _ in range(plan.sse_rounds):
                before = conn.parser.body_bytes
                status, first, whole = conn.request(raw)
                if status != 200 or conn.parser.body_bytes - before < 50_000:
                    raise RuntimeError(f"the stream answered {status}, or was too short")
                ttfb.append(first)
                total.append(whole)
        finally:
            conn.close()
        row = {"ttfb": statistics.median(ttfb), "total": statistics.median(total)}
        log(
            f"  {setup.label:34} first byte {row['ttfb'] * 1e3:6.2f} ms  "
            f"total {row['total'] * 1e3:6.2f} ms"
        )
        return row

    return for_each(setups, "SSE stream", measure, notes)


def sequential(setup: Setup, route: str, rounds: int, pause: float = 0.0) -> tuple[float, int]:
    """Median seconds of `rounds` requests one after another on one connection, and non-200s."""
    conn = Connection(setup.port)
    try:
        raw = setup.raw(route)
        conn.request(raw)
        samples, errors = [], 0
        for _ in range(rounds):
            if pause:
                time.sleep(pause)
            status, _, seconds = conn.request(raw)
            errors += status != 200
            samples.append(seconds)
        return statistics.median(samples), errors
    finally:
        conn.close()


def measure_failover(
    upstream: Upstream, setups: list[Setup], plan: Plan, notes: list[str]
) -> dict[str, Any]:
    """A request whose first key answers 429 against one that succeeds at once.

    The 429 carries `retry-after-ms: 1`; a 3 ms pause before each request lets
    that cooldown lapse, so every measured request meets the 429 first. The
    plain requests get the same pause, so both are measured alike.
    """

    def measure(setup: Setup) -> dict[str, Any]:
        plain, errors = sequential(setup, "json", plan.failover_rounds, pause=0.003)
        if errors:
            raise RuntimeError(f"{errors} plain requests failed")
        if not setup.is_proxy:
            return {"plain": plain}
        before = upstream.request_count()
        failover, errors = sequential(setup, "failover", plan.failover_rounds, pause=0.003)
        calls = (upstream.request_count() - before) / (plan.failover_rounds + 1)
        log(
            f"  {setup.label:34} plain {plain * 1e3:6.3f} ms  with failover "
            f"{failover * 1e3:6.3f} ms  ({calls:.2f} upstream calls per request, "
            f"{errors} not 200)"
        )
        return {"plain": plain, "failover": failover, "upstream_calls": calls, "errors": errors}

    return for_each(setups, "failover", measure, notes)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("no answer in time")
    return proc.stdout.readline()


def measure_streams(
    procs: Processes, setups: list[Setup], plan: Plan, notes: list[str]
) -> dict[str, Any]:
    """RSS of each proxy (its whole process tree) while `plan.streams` streams are held open."""

    def measure(setup: Setup) -> dict[str, Any]:
        assert setup.proc is not None
        pid = setup.proc.pid
        idle = tree_rss(pid)
        spec = {"port": setup.port, "request": setup.raw("slow").decode(), "streams": plan.streams}
        holder = procs.start(
            [sys.executable, __file__, "_hold", json.dumps(spec)],
            cpus=LOAD_CPU,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            if not read_line(holder, 150).startswith('{"ready"'):
                raise RuntimeError("the streams did not open")
            peak = 0
            for _ in range(8):  # a few samples over ~1 s: each stream gets events meanwhile
                peak = max(peak, tree_rss(pid))
                time.sleep(0.15)
            assert holder.stdin is not None
            holder.stdin.close()
            read_line(holder, 60)
        finally:
            procs.stop(holder)
        time.sleep(1.0)
        after = tree_rss(pid)
        log(
            f"  {setup.label:34} idle {idle / 2**20:6.1f} MB  with {plan.streams} streams "
            f"{peak / 2**20:6.1f} MB  after {after / 2**20:6.1f} MB"
        )
        return {"idle": idle, "streams": peak, "after": after, "n": plan.streams}

    # LiteLLM opens streams slowly (about 150 ms each, one at a time): 1,000 would take
    # minutes of the suite's budget for a figure no goal needs.
    proxies = [s for s in setups if s.is_proxy and s.proc is not None and s.key != "litellm"]
    return for_each(proxies, "held-open streams", measure, notes)


def measure_drift(gen: LoadGenerator, setup: Setup, plan: Plan) -> dict[str, Any]:
    """RSS before and after `plan.drift_requests` requests, once warmed up."""
    assert setup.proc is not None
    pid = setup.proc.pid
    gen.run(setup, "json", 16, 120, limit=plan.drift_warmup)
    first = tree_rss(pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not stop.wait(0.25):
            samples.append((time.perf_counter() - start, tree_rss(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load = gen.run(setup, "json", 16, 240, limit=plan.drift_requests)
    finally:
        stop.set()
        sampler.join()
    last = tree_rss(pid)
    drift = (last - first) / first
    log(
        f"  {setup.label:34} {load.requests} requests: RSS {first / 2**20:.1f} -> "
        f"{last / 2**20:.1f} MB ({drift:+.2%}), errors {load.errors}"
    )
    per_second = load.requests / load.seconds
    return {
        "setup": setup.key,
        "first": first,
        "last": last,
        "max": max([first, last, *(rss for _, rss in samples)]),
        "drift": drift,
        "requests": load.requests,
        "errors": load.errors,
        "samples": [(round(t * per_second), rss) for t, rss in samples],
    }


def measure_core(smoke: bool, notes: list[str]) -> dict[str, Any]:
    """walker.next()+mark ns/op in Rust (cargo bench) and from Python (bench_pool.py)."""
    line = re.compile(r"^(.*?)\s+([\d.]+) ns/op$", re.MULTILINE)
    out: dict[str, Any] = {}
    python = subprocess.run(
        pinned(
            [sys.executable, str(HERE / "bench_pool.py"), *(["--smoke"] if smoke else [])],
            SERVER_CPU,
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    out["python"] = [(name.strip(), float(ns)) for name, ns in line.findall(python)]
    if smoke:
        notes.append("Smoke run: `cargo bench --bench pool` skipped (make bench-smoke runs it).")
        return out
    if not shutil.which("cargo"):
        notes.append("`cargo` not found: the Rust pool benchmark was skipped.")
        return out
    try:
        start = time.monotonic()
        subprocess.run(
            ["cargo", "bench", "--quiet", "--bench", "pool", "--no-run"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=900,
        )
        out["build_seconds"] = time.monotonic() - start
        rust = subprocess.run(
            pinned(["cargo", "bench", "--quiet", "--bench", "pool"], SERVER_CPU),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        ).stdout
        out["rust"] = [(name.strip(), float(ns)) for name, ns in line.findall(rust)]
    except subprocess.SubprocessError as exc:
        notes.append(f"`cargo bench --bench pool` failed: {exc}")
    return out


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


def ensure_tool(binary: str, package: str, notes: list[str]) -> bool:
    """`binary` on PATH, installing the Debian package when missing (as root)."""
    if shutil.which(binary) or Path(f"/usr/sbin/{binary}").exists():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        notes.append(f"`{binary}` is not installed and apt-get cannot run here.")
        return False
    log(f"installing {package} with apt-get")
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            notes.append(f"`apt-get install {package}` failed: {done.stderr.strip()[-300:]}")
            return False
    return bool(shutil.which(binary) or Path(f"/usr/sbin/{binary}").exists())


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def mb(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def verdict(ok: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "n/a"}[ok]


def check_goals(r: dict[str, Any], smoke: bool) -> list[tuple[str, str, bool | None]]:
    """(goal, measured figure, pass/fail/n-a) for each goal of the brief."""
    goals: list[tuple[str, str, bool | None]] = []
    blocking, labels = r["blocking"], r["labels"]
    kf, py, direct = (
        blocking.get("kf-uvicorn", {}),
        blocking.get("py-uvicorn", {}),
        blocking["direct"],
    )
    if "16" in kf:
        added50 = kf["16"]["p"]["50"] - direct["16"]["p"]["50"]
        added99 = kf["16"]["p"]["99"] - direct["16"]["p"]["99"]
        goals.append(
            (
                "FailoverProxy + uvicorn adds <= 1 ms p50 and <= 3 ms p99 over direct, c=16 "
                "(closed loop, saturated)",
                f"+{added50:.2f} ms p50, +{added99:.2f} ms p99",
                added50 <= 1 and added99 <= 3,
            )
        )
    paced = r.get("paced") or {}
    if "kf-uvicorn" in paced and "direct" in paced:
        kf_p, base = paced["kf-uvicorn"]["p"], paced["direct"]["p"]
        added50, added99 = kf_p["50"] - base["50"], kf_p["99"] - base["99"]
        goals.append(
            (
                "the same, 16 connections at a fixed "
                f"{r['plan']['paced_rate']:,.0f} req/s (below saturation)",
                f"+{added50:.2f} ms p50, +{added99:.2f} ms p99",
                added50 <= 1 and added99 <= 3,
            )
        )
    for c in ("16", "64"):
        if c in kf and c in py:
            ratio = kf[c]["rps"] / py[c]["rps"]
            goals.append(
                (
                    f"FailoverProxy throughput >= 2x pure Python at c={c}",
                    f"{ratio:.2f}x ({kf[c]['rps']:.0f} vs {py[c]['rps']:.0f} req/s)",
                    ratio >= 2,
                )
            )
        else:
            goals.append((f"FailoverProxy throughput >= 2x pure Python at c={c}", "not run", None))
    errors = {c: v["errors"] for c, v in kf.items()}
    goals.append(
        (
            f"{labels.get('kf-uvicorn', 'FailoverProxy')}: no errors at any concurrency",
            ", ".join(f"c={c}: {n}" for c, n in errors.items()),
            all(n == 0 for n in errors.values()),
        )
    )
    sdk = r.get("sdk") or {}
    for kind in ("blocking", "stream"):
        if f"default/{kind}" in sdk:
            ratio = sdk[f"keyfailover/{kind}"] / sdk[f"default/{kind}"]
            goals.append(
                (
                    "In-process AsyncFailoverTransport >= httpx2 default "
                    f"({kind}, c={r['plan']['sdk_concurrency']})",
                    f"{ratio:.2f}x",
                    ratio >= 1,
                )
            )
    memory = (r.get("memory") or {}).get("kf-uvicorn")
    if memory:
        goals.append(
            (
                f"{memory['n']} concurrent streams: proxy RSS < 100 MB",
                mb(memory["streams"]),
                memory["streams"] < 100 * 2**20,
            )
        )
    drift = r.get("drift")
    if drift:
        goals.append(
            (
                f"RSS drift over {drift['requests']:,} requests < 5%",
                f"{drift['drift']:+.2%} ({mb(drift['first'])} -> {mb(drift['last'])})",
                abs(drift["drift"]) < 0.05,
            )
        )
    if smoke:  # tiny counts: the figures show the suite works, not how fast anything is
        return [(goal, figure, None) for goal, figure, _ in goals]
    return goals


def render(r: dict[str, Any], smoke: bool) -> str:
    labels: dict[str, str] = r["labels"]
    out = [
        "# keyfailover benchmarks"
        + (" (smoke run: tiny counts, figures not meaningful)" if smoke else ""),
        "",
        f"Generated by `python benches/run.py{' --smoke' if smoke else ''}` on {r['env']['date']} "
        f"in {r['env']['wall']:.0f} s. {r['env']['machine']}",
        "",
        "Read the ratios: every setup ran in the same run against the same upstream, with the "
        "same load, but absolute times on a shared machine move from run to run.",
        "",
        "## Setups",
        "",
        "| setup | how |",
        "| --- | --- |",
    ]
    out += [f"| {labels[key]} | {note} |" for key, note in r["setup_notes"].items()]
    out += ["", f"Load: {r['env']['load']}. Upstream: {r['env']['upstream']}.", ""]

    out += ["## Goals", "", "| goal | measured | result |", "| --- | --- | --- |"]
    out += [f"| {goal} | {figure} | {verdict(ok)} |" for goal, figure, ok in check_goals(r, smoke)]

    blocking = r["blocking"]
    direct = blocking["direct"]
    out += [
        "",
        "## Small blocking requests",
        "",
        "POST /v1/messages (small JSON reply), closed loop: each connection sends its next "
        "request when the last reply is complete. Latency under this load includes queueing "
        "(p50 is about concurrency / throughput); the c=1 rows are the unloaded per-request cost.",
        "",
        "| setup | conc. | req/s | x direct | x pure Python | p50 ms | p99 ms "
        "| added p50 | added p99 | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in r["plan"]["concurrencies"]:
        for key, rows in blocking.items():
            row = rows.get(str(c))
            if row is None:
                continue
            py = blocking.get("py-uvicorn", {}).get(str(c))
            base = direct[str(c)]
            p50, p99 = row["p"]["50"], row["p"]["99"]
            cells = [
                labels[key],
                str(c),
                f"{row['rps']:,.0f}",
                f"{row['rps'] / base['rps']:.2f}",
                f"{row['rps'] / py['rps']:.2f}" if py else "-",
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{p50 - base['p']['50']:+.2f}",
                f"{p99 - base['p']['99']:+.2f}",
                str(row["errors"]),
            ]
            out.append("| " + " | ".join(cells) + " |")

    paced = r.get("paced") or {}
    if "direct" in paced:
        base = paced["direct"]
        out += [
            "",
            f"## Latency below saturation: {r['plan']['paced_rate']:,.0f} requests/s",
            "",
            "The same requests at a fixed pace (open loop) over 16 connections, latency counted "
            "from each request's scheduled time: the cost of one request through a proxy that is "
            "busy but not saturated. Python client (wrk cannot pace).",
            "",
            "| setup | req/s | p50 ms | p90 ms | p99 ms | added p50 | added p99 | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, row in paced.items():
            p50, p99 = row["p"]["50"], row["p"]["99"]
            out.append(
                f"| {labels[key]} | {row['rps']:,.0f} | {p50:.2f} | {row['p']['90']:.2f} "
                f"| {p99:.2f} | {p50 - base['p']['50']:+.2f} | {p99 - base['p']['99']:+.2f} "
                f"| {row['errors']} |"
            )

    sse = r.get("sse") or {}
    if "direct" in sse:
        base = sse["direct"]
        out += [
            "",
            f"## {SSE_EVENTS:,}-event SSE stream",
            "",
            "One stream at a time over a keep-alive connection; medians of "
            f"{r['plan']['sse_rounds']} streams. First byte: the first response byte.",
            "",
            "| setup | first byte ms | total ms | added first byte | added total |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for key, row in sse.items():
            out.append(
                f"| {labels[key]} | {ms(row['ttfb'])} | {ms(row['total'])} "
                f"| {(row['ttfb'] - base['ttfb']) * 1e3:+.2f} "
                f"| {(row['total'] - base['total']) * 1e3:+.2f} |"
            )

    failover = r.get("failover") or {}
    if "direct" in failover:
        rtt = failover["direct"]["plain"]
        out += [
            "",
            "## One failover",
            "",
            "Sequential requests (medians): one whose only key answers at once, and one whose "
            "first key answers 429 (`retry-after-ms: 1`) before the second answers 200. The "
            f"extra upstream round trip costs about {ms(rtt)} ms (a request sent directly).",
            "",
            "| setup | first key OK ms | first key 429 ms | added by failover | "
            "added / upstream round trip | upstream calls per request | not 200 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, row in failover.items():
            if key == "direct":
                continue
            added = row["failover"] - row["plain"]
            out.append(
                f"| {labels[key]} | {ms(row['plain'])} | {ms(row['failover'])} "
                f"| {added * 1e3:+.3f} ms | {added / rtt:.2f}x | {row['upstream_calls']:.2f} "
                f"| {row['errors']} |"
            )

    memory = r.get("memory") or {}
    if memory:
        n = next(iter(memory.values()))["n"]
        out += [
            "",
            "## Memory",
            "",
            f"RSS of the proxy's process tree while {n:,} streams are held open (the upstream "
            f"sends one event every {SLOW_DELAY} s), and after they are closed.",
            "",
            f"| setup | idle | with {n:,} streams | per stream | after closing |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for key, row in memory.items():
            per = (row["streams"] - row["idle"]) / row["n"] / 1024
            out.append(
                f"| {labels[key]} | {mb(row['idle'])} | {mb(row['streams'])} | {per:.1f} KB "
                f"| {mb(row['after'])} |"
            )
    drift = r.get("drift")
    if drift:
        out += [
            "",
            f"RSS drift of {labels[drift['setup']]}: {drift['requests']:,} requests at c=16 after "
            f"a warm-up of {r['plan']['drift_warmup']:,}: {mb(drift['first'])} -> "
            f"{mb(drift['last'])} ({drift['drift']:+.2%}), peak {mb(drift['max'])}, "
            f"errors {drift['errors']}.",
        ]

    sdk = r.get("sdk") or {}
    if sdk:
        out += [
            "",
            "## In-process: the anthropic SDK",
            "",
            f"`AsyncAnthropic` with its default httpx2 transport vs with `AsyncFailoverTransport`, "
            f"{r['plan']['sdk_concurrency']} concurrent calls, in one process on one core "
            "(best of two alternating runs).",
            "",
            "| call | default httpx2 calls/s | AsyncFailoverTransport calls/s | ratio |",
            "| --- | ---: | ---: | ---: |",
        ]
        for kind in ("blocking", "stream"):
            default, kf = sdk[f"default/{kind}"], sdk[f"keyfailover/{kind}"]
            out.append(
                f"| messages.create ({kind}) | {default:,.0f} | {kf:,.0f} | {kf / default:.2f} |"
            )

    core = r.get("core") or {}
    if core:
        out += ["", "## Key pool core", "", "| where | operation | ns/op |", "| --- | --- | ---: |"]
        for where, rows in (("Rust", core.get("rust", [])), ("Python", core.get("python", []))):
            out += [f"| {where} | `{name}` | {ns:.1f} |" for name, ns in rows]
        if core.get("build_seconds", 0) >= 1:
            out += [
                "",
                f"(`cargo bench` built the benchmark in {core['build_seconds']:.0f} s first.)",
            ]

    probe = r.get("probe") or {}
    if probe:
        out += ["", "## Upstream choice", "", "| upstream | req/s at c=16 |", "| --- | ---: |"]
        out += [f"| {name} | {rps:,.0f} |" for name, rps in probe.items()]
    if r["notes"]:
        out += ["", "## Notes", ""] + [f"- {note}" for note in r["notes"]]
    out += ["", "## Time per section", "", "| section | seconds |", "| --- | ---: |"]
    out += [f"| {name} | {seconds:.1f} |" for name, seconds in r["timings"].items()]
    return "\n".join(out) + "\n"


def plot(r: dict[str, Any], prefix: str) -> list[str]:
    """The PNGs; their file names (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        r["notes"].append("matplotlib is not installed (`pip install .[bench]`): no plots.")
        return []
    labels, blocking = r["labels"], r["blocking"]
    files = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, rows in blocking.items():
        cs = sorted(int(c) for c in rows)
        ax.plot(cs, [rows[str(c)]["rps"] for c in cs], marker="o", label=labels[key])
    ax.set(xscale="log", yscale="log", xlabel="concurrent connections", ylabel="requests / s")
    ax.set_xticks(r["plan"]["concurrencies"], [str(c) for c in r["plan"]["concurrencies"]])
    ax.set_title("Small blocking requests: throughput vs concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    files.append(f"{prefix}throughput.png")
    fig.tight_layout()
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    concurrencies = r["plan"]["concurrencies"]
    fig, axes = plt.subplots(1, len(concurrencies), figsize=(5 * len(concurrencies), 4.5))
    for ax, c in zip(list(axes) if len(concurrencies) > 1 else [axes], concurrencies, strict=True):
        for key, rows in blocking.items():
            row = rows.get(str(c))
            if row is None:
                continue
            pcts = [p for p in PCTS if p < 100]
            nines = [1 / (1 - p / 100) for p in pcts]
            ax.plot(nines, [row["p"][str(p)] for p in pcts], marker=".", label=labels[key])
        ax.set(xscale="log", yscale="log", xlabel="percentile", ylabel="latency (ms)")
        ticks = [2, 10, 100, 1000]
        ax.set_xticks(ticks, ["50", "90", "99", "99.9"])
        ax.set_title(f"Latency distribution, c={c}")
        ax.grid(True, which="both", alpha=0.3)
    (list(axes) if len(concurrencies) > 1 else [axes])[0].legend(fontsize=8)
    files.append(f"{prefix}latency.png")
    fig.tight_layout()
    fig.savefig(RESULTS / files[-1], dpi=110)
    plt.close(fig)

    drift = r.get("drift")
    if drift and drift["samples"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [0] + [n for n, _ in drift["samples"]] + [drift["requests"]]
        ys = [drift["first"]] + [rss for _, rss in drift["samples"]] + [drift["last"]]
        ax.plot(xs, [y / 2**20 for y in ys], marker=".")
        ax.set(xlabel="requests after warm-up (approx.)", ylabel="RSS (MB)", ylim=(0, None))
        ax.set_title(f"RSS of {labels[drift['setup']]} under load")
        ax.grid(True, alpha=0.3)
        files.append(f"{prefix}rss_drift.png")
        fig.tight_layout()
        fig.savefig(RESULTS / files[-1], dpi=110)
        plt.close(fig)
    return files


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


@contextlib.contextmanager
def section(timings: dict[str, float], name: str) -> Iterator[None]:
    log(name)
    start = time.monotonic()
    try:
        yield
    finally:
        timings[name] = time.monotonic() - start


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the start (a shared machine); "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}."
    )


def run(smoke: bool, with_litellm: bool) -> dict[str, Any]:
    plan = SMOKE if smoke else FULL
    started = time.monotonic()
    notes = Notes()
    timings: dict[str, float] = {}
    r: dict[str, Any] = {"plan": plan.__dict__, "notes": notes, "timings": timings}
    r["env"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    if LOAD_CPU is not None:
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # this process is a client too
    else:
        notes.append("Fewer than 2 CPUs available: nothing is pinned.")

    use_wrk = not smoke and ensure_tool("wrk", "wrk", notes)
    if not smoke and not use_wrk:
        notes.append("wrk is unavailable: the load came from the multiprocess Python client.")
    have_nginx = not smoke and ensure_tool("nginx", "nginx", notes)
    gen = LoadGenerator(use_wrk)
    r["env"]["load"] = gen.name

    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    workdir.chmod(0o755)  # nginx's workers (an unprivileged user) read files below it
    try:
        with section(timings, "upstreams"):
            mock = start_mock(procs, workdir)
            candidates = [mock] + ([start_nginx(procs, workdir)] if have_nginx else [])
            probe = {}
            for upstream in candidates:
                setup = direct_setup(upstream)
                gen.run(setup, "json", 16, plan.warmup)
                probe[upstream.name] = gen.run(setup, "json", 16, plan.probe).rps
            r["probe"] = probe
            fast = max(candidates, key=lambda u: probe[u.name])
            others = [f"{name} {rps:,.0f} req/s" for name, rps in probe.items()]
            r["env"]["upstream"] = (
                f"{fast.name} for every request ({', '.join(others)} at c=16 straight to it; the "
                "faster one, so the upstream is not what limits a proxy), MockUpstream for the "
                "streams held open (it can send slowly)"
            )
            if smoke:
                r["env"]["upstream"] = "MockUpstream (smoke: no nginx)"

        with section(timings, "start setups"):
            setups = [direct_setup(fast)]
            setups.append(start_asgi(procs, "keyfailover", "uvicorn", fast, mock))
            try:
                import granian  # noqa: F401

                setups.append(start_asgi(procs, "keyfailover", "granian", fast, mock))
            except ImportError:
                notes.append(
                    "granian is not installed (`pip install granian`): its setup is skipped."
                )
            except RuntimeError as exc:
                notes.append(f"granian did not start: {exc}")
            setups.append(start_asgi(procs, "python", "uvicorn", fast, mock))
            if smoke or not with_litellm:
                notes.append("LiteLLM's proxy skipped in this run (smoke or --no-litellm).")
            else:
                python = ensure_litellm(notes)
                if python is not None:
                    try:
                        setups.append(start_litellm(procs, python, workdir, fast, mock))
                    except RuntimeError as exc:
                        notes.append(f"LiteLLM's proxy did not start: {exc}")
            r["labels"] = {setup.key: setup.label for setup in setups}
            r["setup_notes"] = {setup.key: setup.note for setup in setups}

        with section(timings, "blocking"):
            r["blocking"] = measure_blocking(gen, setups, plan, notes)
        with section(timings, "paced"):
            r["paced"] = measure_paced(gen, setups, plan, notes)
        with section(timings, "sse"):
            r["sse"] = measure_sse(setups, plan, notes)
        with section(timings, "failover"):
            r["failover"] = measure_failover(fast, setups, plan, notes)
        # Drift before the streams: 1,000 streams leave the RSS at their peak (freed
        # memory stays with the allocator), which would hide any growth after them.
        with section(timings, "drift"):
            kf = next(setup for setup in setups if setup.key == "kf-uvicorn")
            try:
                r["drift"] = measure_drift(gen, kf, plan)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                notes.append(f"RSS drift run failed: {exc}")
                notes.failed.add(kf.key)
        with section(timings, "streams"):
            r["memory"] = measure_streams(procs, setups, plan, notes)
        with section(timings, "sdk"):
            spec = {
                "upstream": fast.url,
                "duration": plan.sdk_duration,
                "concurrency": plan.sdk_concurrency,
            }
            r["sdk"] = run_role("_sdk", spec, cpus=SERVER_CPU, timeout=300)
            log("  " + ", ".join(f"{name} {rps:,.0f}/s" for name, rps in r["sdk"].items()))
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    with section(timings, "core"):
        r["core"] = measure_core(smoke, notes)
    r["env"]["wall"] = time.monotonic() - started
    # What fails the run: keyfailover (or the baseline) failing a workload or answering
    # anything but 2xx. LiteLLM and the goals, which a busy machine can miss, do not.
    r["broken"] = sorted(
        (notes.failed & MUST_PASS)
        | {key for key in MUST_PASS for row in r["blocking"].get(key, {}).values() if row["errors"]}
    )
    return r


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ROLES:
        result = ROLES[sys.argv[1]](json.loads(sys.argv[2]))
        if result is not None:
            print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, no external tools")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    args = parser.parse_args()
    r = run(args.smoke, not args.no_litellm)
    RESULTS.mkdir(exist_ok=True)
    prefix = "smoke_" if args.smoke else ""
    r["plots"] = plot(r, prefix)
    report = render(r, args.smoke)
    if r["plots"]:
        report += "\n" + "\n".join(f"![{name}]({name})" for name in r["plots"]) + "\n"
    name = "smoke" if args.smoke else "latest"
    (RESULTS / f"{name}.md").write_text(report)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1, default=str))
    log(f"wrote {RESULTS / f'{name}.md'} in {r['env']['wall']:.0f} s")
    if r["broken"]:
        log(f"FAILED: {', '.join(r['labels'][key] for key in r['broken'])} (see the notes)")
        sys.exit(1)


if __name__ == "__main__":
    main()
