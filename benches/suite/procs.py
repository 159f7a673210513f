"""Processes: starting, pinning and stopping them; the upstreams; the setups under test.

- `Processes` starts every child in its own session, so the whole group can be
  stopped, on error too; `run_role` runs one of the suite's internal roles
  (`python run.py _loadgen JSON` and the like) to completion.
- The upstreams: nginx serving static replies and MockUpstream in its own
  process (the `_mock` role).
- The setups, each a process of its own with the same routes: the upstream
  directly, nginx proxying to it (the floor for a proxy), the same proxies on
  keyfailover's native server (`python -m suite.app`), the ASGI servers loading
  `suite.app:asgi_app`, LiteLLM's proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    BODY,
    HERE,
    HOST,
    LIMITED_KEY,
    LITELLM_VENV,
    LITELLM_VERSION,
    LOAD_CPU,
    OK_KEY,
    SCRIPT,
    SERVER_CPU,
    SLOW_DELAY,
    SLOW_EVENTS,
    SLOW_KEY,
    SSE_EVENTS,
    SSE_KEY,
    SSE_SHORT_KEY,
    TOKEN,
    log,
    pinned,
)
from .wire import Connection, free_port, http_request, wait_ready

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
    """Runs one of the suite's internal roles to completion and returns its JSON answer."""
    args = pinned([sys.executable, str(SCRIPT), role, json.dumps(spec)], cpus)
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{role} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("no answer in time")
    return proc.stdout.readline()


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


def start_mock(procs: Processes, workdir: Path, replies: dict[str, Any] | None = None) -> Upstream:
    """MockUpstream answering `replies` (a scenario; by default `scenario()`)."""
    path = workdir / "scenario.json"
    path.write_text(json.dumps(scenario() if replies is None else replies))
    proc = procs.start(
        [sys.executable, str(SCRIPT), "_mock", json.dumps({"scenario": str(path)})],
        cpus=LOAD_CPU,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Upstream("MockUpstream", port, proc)


# What every nginx of the suite starts with: one worker, its files in {dir}, keep-alive
# connections kept as long as a run lasts; an `http` block the rest of a config closes.
NGINX_HEAD = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/body;
"""

NGINX_CONF = (
    NGINX_HEAD
    + """    map $http_x_api_key $limited {{ "{limited}" 1; default 0; }}
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
)


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


def mock_role(spec: dict[str, Any]) -> None:
    """MockUpstream in this process: prints its port, answers `count` with its request count."""
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


# --------------------------------------------------------------------------
# The setups under test
# --------------------------------------------------------------------------

# The setups whose failure fails the run (see `cli.run`): a workload failed, a non-2xx
# answer, or (propagation) a mark another process never saw.
MUST_PASS = frozenset(
    {
        "kf-native",
        "kf-uvicorn",
        "kf-granian",
        "py-uvicorn",
        # shared.py: the state backends, the propagation, `serve --workers`
        "kf-state-none",
        "kf-state-shm",
        "kf-state-redis",
        "propagation-shm",
        "propagation-redis",
        "kf-serve-1-one-cpu",
        "kf-serve-1",
        "kf-serve-2",
        "kf-serve-native",
        "kf-serve-native-one-cpu",
    }
)


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


def uvicorn_options() -> tuple[str, str]:
    """uvicorn's fastest installed loop and HTTP parser (what uvicorn[standard] gives)."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def start_asgi(
    procs: Processes,
    impl: str,
    server: str,
    fast: Upstream,
    slow: Upstream,
    *,
    env: dict[str, str] | None = None,
    key: str | None = None,
    label: str | None = None,
) -> Setup:
    """`suite.app:asgi_app` under `server`, pinned to SERVER_CPU; `env` adds to the app's
    environment (KFB_STATE, KFB_NAMESPACE), `key` and `label` name a variant."""
    port = free_port()
    env = {"KFB_IMPL": impl, "KFB_FAST": fast.url, "KFB_SLOW": slow.url, **(env or {})}
    if server == "uvicorn":
        loop, http = uvicorn_options()
        args = [sys.executable, "-m", "uvicorn", "--factory", "suite.app:asgi_app"]
        args += ["--app-dir", str(HERE), "--host", HOST, "--port", str(port)]
        args += ["--log-level", "warning", "--no-access-log", "--backlog", "2048"]
        args += ["--loop", loop, "--http", http]
        note = f"uvicorn {loop}+{http}, 1 worker"
    else:
        granian = str(Path(sys.executable).with_name("granian"))
        args = [granian, "--interface", "asgi", "--factory", "--working-dir", str(HERE)]
        args += ["--host", HOST, "--port", str(port), "--workers", "1", "--backlog", "2048"]
        args += ["--log-level", "warning", "--no-ws", "suite.app:asgi_app"]
        note = "granian asgi, 1 worker, 1 runtime thread"
    proc = procs.start(args, cpus=SERVER_CPU, env=env, cwd=str(HERE))
    impl_name = {"keyfailover": "FailoverProxy", "python": "pure Python"}[impl]
    label = label or f"{impl_name} + {server}"
    key = key or {"keyfailover": "kf", "python": "py"}[impl] + f"-{server}"
    setup = Setup(key, label, port, proxy_targets(), proc, note)
    path, credential, _ = setup.targets["json"]
    wait_ready(port, path, credential, proc)
    return setup


def start_native(
    procs: Processes,
    fast: Upstream,
    slow: Upstream,
    *,
    threads: int = 1,
    cpus: str | None = SERVER_CPU,
    under: tuple[str, ...] = (),
    build: str | None = None,
    over: tuple[str, str, str, dict[str, str]] | None = None,
) -> Setup:
    """The same proxies on keyfailover's native server (`python -m suite.app`: the routes of
    `asgi_app`, one `Server` route each), `threads` runtime threads, pinned to `cpus`; run
    `under` a tool (valgrind) when given. With `build` (a directory holding a `keyfailover`
    package: `make bench` keeps the plain build there), that build rather than the one
    installed (`make bench` installs the profile-guided build). With `over` (key, label,
    the fast upstream's URL, more environment), in front of that URL instead (`tls.py`)."""
    port = free_port()
    fast_url = fast.url if over is None else over[2]
    env = {"KFB_FAST": fast_url, "KFB_SLOW": slow.url, "KFB_HOST": HOST}
    if over is not None:
        env.update(over[3])
    if build is not None:
        env["PYTHONPATH"] = build
    args = [*under, sys.executable, "-m", "suite.app", str(port), str(threads)]
    proc = procs.start(args, cpus=cpus, env=env, cwd=str(HERE))
    note = (
        f"keyfailover's native server (what `keyfailover serve` runs) with --threads {threads}, "
        "no access log, one process"
    )
    key, label = "kf-native", "FailoverProxy, native server"
    if build is not None:
        key, label, note = f"{key}-plain", f"{label}, plain build", f"{note}; the plain build"
    if over is not None:
        key, label, note = over[0], over[1], f"{note}; upstream {fast_url}"
    setup = Setup(key, label, port, proxy_targets(), proc, note)
    path, credential, _ = setup.targets["json"]
    wait_ready(port, path, credential, proc, timeout=READY_UNDER_TOOL if under else 60.0)
    return setup


# How long a server run under valgrind may take to start (it is slowed some 50 times).
READY_UNDER_TOOL = 300.0


NGINX_PROXY_CONF = (
    NGINX_HEAD
    + """    proxy_temp_path {dir}/proxy;
    upstream fast {{ server {host}:{fast}; keepalive 128; keepalive_requests 10000000; }}
    server {{
        listen {host}:{port} backlog=4096;
        # What the proxies do at the least: check the client's token, swap in the key,
        # forward over pooled keep-alive connections, stream the reply.
        if ($http_x_api_key != "{token}") {{ return 401; }}
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header x-api-key "{key}";
        proxy_buffering off;
        location /anthropic/ {{ proxy_pass http://fast/; }}
        location /sse/ {{
            proxy_set_header x-api-key "{sse_key}";
            proxy_pass http://fast/sse1000/;
        }}
    }}
}}
"""
)


def start_nginx_proxy(procs: Processes, workdir: Path, fast: Upstream) -> Setup:
    """nginx as a reverse proxy in front of the fast upstream, one worker pinned to
    SERVER_CPU like every proxy: the floor for a proxy on one core."""
    proxy_dir = workdir / "nginx-proxy"
    proxy_dir.mkdir()
    proxy_dir.chmod(0o755)
    port = free_port()
    conf = NGINX_PROXY_CONF.format(
        dir=proxy_dir,
        host=HOST,
        port=port,
        fast=fast.port,
        token=TOKEN,
        key=OK_KEY,
        sse_key=SSE_KEY,
    )
    (proxy_dir / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    args = [nginx, "-p", str(proxy_dir), "-c", str(proxy_dir / "nginx.conf"), "-g", "daemon off;"]
    proc = procs.start(args, cpus=SERVER_CPU)
    note = (
        "nginx `proxy_pass`, 1 worker, checks the client token and swaps in the key, "
        "keep-alive to the upstream, no buffering: the floor for a proxy"
    )
    return floor_setup("nginx-proxy", "nginx proxy_pass", port, proc, note)


def floor_setup(
    key: str,
    label: str,
    port: int,
    proc: subprocess.Popen[str],
    note: str,
    ready_timeout: float = 60.0,
) -> Setup:
    """A floor (nginx's, the bare hyper proxy's) once it answers: it serves `/anthropic` and
    `/sse` only, having no pool to fail over across."""
    targets = {
        route: target for route, target in proxy_targets().items() if route in ("json", "sse")
    }
    setup = Setup(key, label, port, targets, proc, note)
    path, credential, _ = setup.targets["json"]
    wait_ready(port, path, credential, proc, timeout=ready_timeout)
    return setup


# hyper's stack with none of keyfailover's policy (benches/hyper-floor/, built by
# `make bench`).
HYPER_FLOOR = HERE / "hyper-floor" / "target" / "release" / "hyper-floor"


def start_hyper_floor(procs: Processes, fast: Upstream, under: tuple[str, ...] = ()) -> Setup:
    """A bare proxy on hyper-util's server (the native server's) and pooled client (which
    keyfailover's own pool replaced: it does less per request), one tokio thread, the same
    allocator, doing what the nginx floor does and nothing more, pinned to SERVER_CPU: the
    floor for a proxy on this stack. Run `under` a tool (valgrind) when given."""
    port = free_port()
    args = [*under, str(HYPER_FLOOR), str(port), str(fast.port), "1", TOKEN, OK_KEY, SSE_KEY]
    proc = procs.start(args, cpus=SERVER_CPU)
    note = (
        "benches/hyper-floor: hyper-util's server and pooled client on one tokio thread, "
        "checks the client token and swaps in the key, no failover, limits, logs or metrics: "
        "the floor for a proxy on hyper (keyfailover's server; its own upstream pool does less "
        "per request than this client)"
    )
    timeout = READY_UNDER_TOOL if under else 60.0
    return floor_setup("hyper-floor", "bare hyper proxy (no policy)", port, proc, note, timeout)


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
# All of them
# --------------------------------------------------------------------------


def start_setups(
    procs: Processes,
    workdir: Path,
    fast: Upstream,
    slow: Upstream,
    notes: list[str],
    with_litellm: bool,
) -> list[Setup]:
    """The setups every measurement sees, in table order; the ones that cannot start are noted."""
    setups = [direct_setup(fast)]
    if fast.name == "nginx":
        setups.append(start_nginx_proxy(procs, workdir, fast))
        if HYPER_FLOOR.exists():
            setups.append(start_hyper_floor(procs, fast))
        else:
            notes.append("The bare hyper proxy is not built (`make bench` builds it): skipped.")
    else:
        notes.append(
            "No nginx (smoke, or not installed): the nginx proxy_pass floor and the bare hyper "
            "proxy are skipped."
        )
    setups.append(start_native(procs, fast, slow))
    setups.append(start_asgi(procs, "keyfailover", "uvicorn", fast, slow))
    try:
        import granian  # noqa: F401

        setups.append(start_asgi(procs, "keyfailover", "granian", fast, slow))
    except ImportError:
        notes.append("granian is not installed (`pip install granian`): its setup is skipped.")
    except RuntimeError as exc:
        notes.append(f"granian did not start: {exc}")
    setups.append(start_asgi(procs, "python", "uvicorn", fast, slow))
    if not with_litellm:
        notes.append("LiteLLM's proxy skipped in this run (smoke or --no-litellm).")
    else:
        python = ensure_litellm(notes)
        if python is not None:
            try:
                setups.append(start_litellm(procs, python, workdir, fast, slow))
            except RuntimeError as exc:
                notes.append(f"LiteLLM's proxy did not start: {exc}")
    return setups
