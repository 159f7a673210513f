"""Shared key state (issue 10): the state backends and `keyfailover serve --workers`;
and the native server on both CPUs against one (issue 14).

- `state_throughput`: the same FailoverProxy app (`suite.app:asgi_app`) three
  times, each its own uvicorn process pinned to SERVER_CPU, with `state=None`,
  `"shm"` and a Redis URL; small blocking requests and the failover route at
  c=16, the three alternating; req/s as ratios to `state=None`.
- `propagation`: one process marks a key (mark_temporary, then reset, in
  turn: each a transition), another polls `pool.key(label).state` in a tight
  loop and timestamps each change; both read CLOCK_MONOTONIC
  (`time.monotonic()`), which every process of a host shares, so the
  difference is the mark's way from one process to the other. For shm and
  Redis, and, as the floor, a bare PUBLISH to a bare SUBSCRIBE socket.
- `workers`: `keyfailover serve --server uvicorn --workers 2` against
  `--workers 1`, on both CPUs (the load generator and the upstream share
  them), and `--workers 1` pinned to SERVER_CPU as the rest of the suite runs
  its setups; and the native server (one process) on both CPUs with its
  default threads against `--threads 1` pinned to SERVER_CPU.
- `native_rounds`: the native server, nginx proxying, the bare hyper proxy,
  FailoverProxy under uvicorn and direct (the blocking table's setups),
  alternating in rounds at each concurrency: what issue 14's one-core goals
  are judged on; and at c=1 once more with each proxy moved onto the load
  generator's CPU, where direct's requests stay (the added latency like for
  like).

The Redis server is one redis-server on a free loopback port, started once
for all three (pinned to LOAD_CPU, with the upstreams and the load
generator). When redis-server is missing the full run installs it with
`.ci/install-deps.sh`; the smoke run skips the Redis parts with a note.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import (
    BODY,
    HOST,
    LOAD_CPU,
    OK_KEY,
    PROPAGATION_KEY,
    ROOT,
    SCRIPT,
    SERVER_CPU,
    TOKEN,
    log,
)
from .load import percentile
from .measure import Bench, closed_loop, load_dict
from .procs import Processes, Setup, run_role, start_asgi, start_native
from .wire import free_port, wait_ready

# The throughput goal: a shared backend costs at most this fraction of state=None's req/s.
STATE_TOLERANCE = 0.03
# The propagation goals, in µs: shm at the median (the same word: µs; its tail is the
# shared machine's scheduling, not the mechanism), Redis at p99.
SHM_P50_GOAL_US = 100.0
REDIS_P99_GOAL_US = 10_000.0
# The workers goal: `--workers 2` over `--workers 1` (both on both CPUs).
WORKERS_GOAL = 1.3

LABEL = "k"  # the key's label in the propagation pools


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def resp(*args: str) -> bytes:
    """A Redis command in RESP."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def reply_complete(data: bytes) -> bool:
    """Whether `data` holds one whole simple, error, integer or bulk reply."""
    head, sep, rest = data.partition(b"\r\n")
    if not sep:
        return False
    if head[:1] == b"$":
        size = int(head[1:])
        return size < 0 or len(rest) >= size + 2
    return True


class RedisServer:
    """A redis-server of the suite's own on a free loopback port; nothing saved to disk."""

    def __init__(self, procs: Processes, binary: str) -> None:
        self.port = free_port()
        args = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly"]
        args += ["no", "--dir", tempfile.gettempdir(), "--protected-mode", "yes"]
        self.proc = procs.start(args, cpus=LOAD_CPU, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.call("PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def call(self, *args: str) -> bytes:
        with socket.create_connection((HOST, self.port), timeout=5) as sock:
            sock.sendall(resp(*args))
            data = b""
            while not reply_complete(data):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis-server closed the connection")
                data += chunk
            return data

    def calls(self, command: str) -> int:
        """How many times `command` has run (INFO commandstats; scripts' commands count too)."""
        stats = self.call("INFO", "commandstats").decode()
        found = re.search(rf"^cmdstat_{command}:calls=(\d+)", stats, re.MULTILINE)
        return int(found[1]) if found else 0


def redis_server(bench: Bench) -> RedisServer | None:
    """The run's redis-server, started on first use; None (with a note) when there is none."""
    if "redis" in bench.shared:
        server: RedisServer | None = bench.shared["redis"]
        return server
    bench.shared["redis"] = None
    binary = shutil.which("redis-server")
    if binary is None and bench.smoke:
        bench.notes.append(
            "redis-server is not installed (`.ci/install-deps.sh` installs it): the smoke run "
            "skipped the Redis parts."
        )
        return None
    if binary is None:
        log("installing redis-server with .ci/install-deps.sh")
        done = subprocess.run(
            [str(ROOT / ".ci" / "install-deps.sh")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        binary = shutil.which("redis-server")
        if binary is None:
            bench.notes.append(
                "redis-server is not installed and `.ci/install-deps.sh` could not install it "
                f"({done.stderr.strip()[-300:]}): the Redis parts are skipped."
            )
            return None
    try:
        bench.shared["redis"] = RedisServer(bench.procs, binary)
    except (OSError, RuntimeError) as exc:
        bench.notes.append(f"redis-server did not start ({exc}): the Redis parts are skipped.")
    server = bench.shared["redis"]
    return server


def namespace(what: str) -> str:
    """A namespace of this run's own, so nothing else on the host shares its states."""
    return f"kf-bench-{os.getpid()}-{what}"


def remove_shm(name: str) -> None:
    """The shm file of namespace `name` (it outlives the processes that used it)."""
    from keyfailover._native import _shm_path

    Path(_shm_path(name)).unlink(missing_ok=True)


# --------------------------------------------------------------------------
# Alternating runs
# --------------------------------------------------------------------------


def alternate(
    bench: Bench,
    setups: list[Setup],
    run: Callable[[Setup, bool], dict[str, Any]],
    what: str,
) -> dict[str, list[dict[str, Any]]]:
    """`plan.shared_rounds` runs of each setup, the order rotating each round (the first
    run of each is a warm-up too); a setup that fails is noted and left out of later rounds.
    Each run's row says its round, so runs of one round can be compared with each other."""
    runs: dict[str, list[dict[str, Any]]] = {setup.key: [] for setup in setups}
    alive = list(setups)
    for i in range(bench.plan.shared_rounds):
        shift = i % len(alive) if alive else 0
        for setup in alive[shift:] + alive[:shift]:
            try:
                runs[setup.key].append({**run(setup, i == 0), "round": i})
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                bench.notes.append(f"{setup.label}: {what} failed: {exc}")
                bench.notes.failed.add(setup.key)
                log(f"  {setup.label:34} FAILED: {exc}")
                alive.remove(setup)
    return {key: rows for key, rows in runs.items() if rows}


def summarize(runs: dict[str, list[dict[str, Any]]], base: str) -> dict[str, Any]:
    """Per setup: medians over its runs, errors and counts summed, and against `base`:
    the median of the ratios of runs in the same round (a slow drift of the machine's
    speed cancels out of those) and the ratio of CPU time per request."""
    out: dict[str, Any] = {}
    base_rps = {row["round"]: row["rps"] for row in runs.get(base, [])}
    for key, rows in runs.items():
        requests = sum(row["requests"] for row in rows)
        row_out: dict[str, Any] = {
            "rps": statistics.median(row["rps"] for row in rows),
            "runs": [row["rps"] for row in rows],
            "p50": statistics.median(row["p"]["50"] for row in rows),
            "p99": statistics.median(row["p"]["99"] for row in rows),
            "errors": sum(row["errors"] for row in rows),
            "requests": requests,
        }
        ratios = [row["rps"] / base_rps[row["round"]] for row in rows if row["round"] in base_rps]
        if ratios:
            row_out["ratios"] = ratios
            row_out["ratio"] = statistics.median(ratios)
        for counter in ("upstream_calls", "scripts", "cpu", "redis_cpu"):
            if requests and all(counter in row for row in rows):
                row_out[f"{counter}_per_request"] = sum(row[counter] for row in rows) / requests
        if all("worker_cpu" in row for row in rows):
            totals = [sum(cpu) for cpu in zip(*(row["worker_cpu"] for row in rows), strict=True)]
            row_out["worker_cpu_share"] = [t / sum(totals) for t in totals] if sum(totals) else []
            row_out["busier_worker_share"] = [
                max(cpu) / sum(cpu) if sum(cpu) else 0.0 for cpu in (r["worker_cpu"] for r in rows)
            ]
        out[key] = row_out
    base_cpu = out.get(base, {}).get("cpu_per_request")
    for row_out in out.values():
        if base_cpu and "cpu_per_request" in row_out:
            row_out["cpu_ratio"] = row_out["cpu_per_request"] / base_cpu
    return out


def note_errors(bench: Bench, setups: list[Setup], results: dict[str, Any], what: str) -> None:
    for setup in setups:
        errors = results.get(setup.key, {}).get("errors", 0)
        if errors:
            bench.notes.append(f"{setup.label}: {errors} errors ({what}).")
            bench.notes.failed.add(setup.key)


# --------------------------------------------------------------------------
# Proxy throughput with each state backend
# --------------------------------------------------------------------------

STATE_SETUPS = {
    # key: (label, what KFB_STATE is, more environment)
    "kf-state-none": ("FailoverProxy, state=None", "none", {}),
    "kf-state-shm": ('FailoverProxy, state="shm"', "shm", {}),
    "kf-state-redis": ("FailoverProxy, state=Redis", "redis", {}),
    # Issue 11: what counting requests for the metrics costs (state=None, not counting).
    "kf-metrics-off": (
        "FailoverProxy, state=None, metrics off",
        "none",
        {"KEYFAILOVER_METRICS": "off"},
    ),
}


def state_throughput(bench: Bench) -> dict[str, Any] | None:
    """The FailoverProxy app with each state backend, alternating: req/s at c=16."""
    plan, gen, fast = bench.plan, bench.gen, bench.fast
    redis = redis_server(bench)
    ns = namespace("state")
    states = {"none": "", "shm": "shm", "redis": redis.url if redis else None}
    setups: list[Setup] = []
    try:
        for key, (label, kind, more) in STATE_SETUPS.items():
            state = states[kind]
            if state is None:
                continue
            try:
                env = {"KFB_STATE": state, "KFB_NAMESPACE": ns, **more}
                setup = start_asgi(
                    bench.procs, "keyfailover", "uvicorn", fast, bench.slow,
                    env=env, key=key, label=label,
                )  # fmt: skip
                setups.append(setup)
            except RuntimeError as exc:
                bench.notes.append(f"{label} did not start: {exc}")
                bench.notes.failed.add(key)
        if not any(setup.key == "kf-state-none" for setup in setups):
            return None
        out: dict[str, Any] = {
            "labels": {setup.key: setup.label for setup in setups},
            "concurrency": 16,
            "routes": {},
        }
        for route in ("json", "failover"):

            def run(setup: Setup, first: bool, route: str = route) -> dict[str, Any]:
                if first:
                    gen.run(setup, route, 16, plan.warmup)
                assert setup.proc is not None
                with_redis = redis is not None and setup.key == "kf-state-redis"
                upstream_before = fast.request_count()
                cpu_before = cpu_seconds(setup.proc.pid)
                if with_redis:
                    assert redis is not None
                    scripts_before = redis.calls("evalsha")
                    redis_before = cpu_seconds(redis.proc.pid)
                load = gen.run(setup, route, 16, plan.shared_duration)
                row = load_dict(load)
                row["cpu"] = cpu_seconds(setup.proc.pid) - cpu_before
                row["upstream_calls"] = fast.request_count() - upstream_before
                if with_redis:
                    assert redis is not None
                    row["scripts"] = redis.calls("evalsha") - scripts_before
                    row["redis_cpu"] = cpu_seconds(redis.proc.pid) - redis_before
                per = max(1, load.requests)
                log(
                    f"  {route:8} {setup.label:30} {load.rps:8.0f} req/s  p50 {load.p(50):6.2f} "
                    f"ms  p99 {load.p(99):6.2f} ms  errors {load.errors}  upstream calls/request "
                    f"{row['upstream_calls'] / per:.2f}  CPU {row['cpu'] / per * 1e6:.0f} µs/req"
                )
                return row

            runs = alternate(bench, setups, run, f"{route} at c=16")
            results = summarize(runs, "kf-state-none")
            note_errors(bench, setups, results, f"{route} route at c=16")
            out["routes"][route] = results
    finally:
        for setup in setups:
            if setup.proc is not None:
                bench.procs.stop(setup.proc)
        remove_shm(ns)
    try:
        out["mark_cost"] = mark_cost(bench, {k: v for k, v in states.items() if v is not None})
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        bench.notes.append(f"The CPU cost of a mark was not measured: {exc}")
    return out


def mark_cost(bench: Bench, states: dict[str, str]) -> dict[str, Any]:
    """CPU time per transition of each backend, in one process (the `_markcost` role)."""
    ns = namespace("markcost")
    spec = {
        "states": states,
        "namespace": ns,
        "transitions": bench.plan.mark_cost_transitions,
        "gap": 0.0005,
    }
    try:
        out: dict[str, Any] = run_role("_markcost", spec, cpus=SERVER_CPU, timeout=300)
    finally:
        remove_shm(f"{ns}-shm")
    base = out["none"]["cpu"]
    log(
        "  CPU per transition: "
        + ", ".join(
            f"{name} {row['cpu']:.1f} µs ({row['cpu'] - base:+.1f})" for name, row in out.items()
        )
    )
    return out


def mark_cost_role(spec: dict[str, Any]) -> dict[str, Any]:
    """The `_markcost` role: for each backend, `transitions` marks and resets in turn, `gap` s
    apart (so each is written on its own, as in the proxy, where a mark's cooldown keeps the
    next one at least a millisecond away), until nothing is pending; this process's CPU time
    (every thread: Python, tokio, the Redis task) per transition. The pacing loop costs the
    same everywhere: the differences to `none` are the backends' own."""
    out: dict[str, Any] = {}
    n, gap = spec["transitions"], spec["gap"]
    for name, state in spec["states"].items():
        pool = _pool({"state": state or None, "namespace": f"{spec['namespace']}-{name}"})
        key = pool.key(LABEL)
        cpu, start = time.process_time(), time.monotonic()
        for i in range(n):
            if i % 2 == 0:
                key.mark_temporary(60.0)
            else:
                key.reset()
            time.sleep(gap)
        deadline = time.monotonic() + 10
        while pool.sync_status()["pending"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: transitions still pending: {pool.sync_status()}")
            time.sleep(0.001)
        out[name] = {
            "cpu": (time.process_time() - cpu) / n * 1e6,
            "wall": (time.monotonic() - start) / n * 1e6,
            "transitions": n,
        }
        del key, pool
    return out


# --------------------------------------------------------------------------
# Propagation from one process to another
# --------------------------------------------------------------------------


def _pool(spec: dict[str, Any]) -> Any:
    """The propagation pool (one key), once its shared state is connected."""
    from keyfailover import KeyPool

    pool = KeyPool({LABEL: PROPAGATION_KEY}, state=spec["state"], namespace=spec["namespace"])
    deadline = time.monotonic() + 10
    while not pool.sync_status()["connected"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool's shared state did not connect: {pool.sync_status()}")
        time.sleep(0.01)
    return pool


def watch_role(spec: dict[str, Any]) -> dict[str, Any]:
    """The `_watch` role: polls the key's state in a tight loop; prints `time state` for each
    change, until `transitions` changes (or `timeout` s); returns the polling rate."""
    pool = _pool(spec)
    print("ready", flush=True)
    transitions, seen, polls = spec["transitions"], 0, 0
    last = pool.key(LABEL).state
    start = time.monotonic()
    deadline = start + spec["timeout"]
    while seen < transitions:
        state = pool.key(LABEL).state
        polls += 1
        if state != last:
            now = time.monotonic()
            last = state
            seen += 1
            print(f"{now:.9f} {state.value}", flush=True)
        elif not polls & 0xFFFF and time.monotonic() > deadline:
            break
    return {"polls_per_second": polls / (time.monotonic() - start), "seen": seen}


def mark_role(spec: dict[str, Any]) -> None:
    """The `_mark` role: for each line read (`mark` or `reset`), prints the time just before
    marking the key (a 60 s cooldown) or resetting it."""
    pool = _pool(spec)
    print("ready", flush=True)
    for line in sys.stdin:
        key = pool.key(LABEL)
        now = time.monotonic()
        if line.strip() == "mark":
            key.mark_temporary(60.0)
        else:
            key.reset()
        print(f"{now:.9f}", flush=True)
    deadline = time.monotonic() + 5  # the last write's reply may still be on its way
    while pool.sync_status()["pending"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"transitions still pending at the end: {pool.sync_status()}")
        time.sleep(0.01)


def subscribe_role(spec: dict[str, Any]) -> None:
    """The `_subscribe` role: a bare SUBSCRIBE socket; prints the time each message arrives."""
    with socket.create_connection((HOST, spec["port"])) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(resp("SUBSCRIBE", spec["channel"]))
        data = b""
        while data.count(b"\r\n") < 6:  # the subscribe confirmation: 3 elements
            data += sock.recv(65536)
        print("ready", flush=True)
        for _ in range(spec["messages"]):
            if not sock.recv(65536):
                return
            print(f"{time.monotonic():.9f}", flush=True)


class Lines:
    """Lines from a child's stdout, read raw (so none hides in a buffer from select)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def _fill(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self.fd, 65536)
        if not chunk:
            raise EOFError("the process closed its output")
        self.buf += chunk
        return True

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not self._fill(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"no line within {timeout} s")
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def waiting(self) -> bool:
        """Whether a line has arrived that nobody asked for yet."""
        while self._fill(0):
            pass
        return b"\n" in self.buf


def start_role(
    bench: Bench, role: str, spec: dict[str, Any], cpus: str | None
) -> tuple[subprocess.Popen[str], Lines]:
    proc = bench.procs.start(
        [sys.executable, str(SCRIPT), role, json.dumps(spec)],
        cpus=cpus,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    lines = Lines(proc)
    ready = lines.next(30)
    if ready != "ready":
        raise RuntimeError(f"{role} did not start: {ready!r}")
    return proc, lines


def stats(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def propagate(bench: Bench, state: str, ns: str) -> dict[str, Any]:
    """Marks and resets in one process, seen by a tight poll in another: latencies in µs."""
    marks = bench.plan.propagation_marks
    spec = {"state": state, "namespace": ns, "transitions": 2 * marks, "timeout": 600}
    watcher, seen = start_role(bench, "_watch", spec, SERVER_CPU)
    marker, marked = start_role(bench, "_mark", spec, LOAD_CPU)
    latencies: dict[str, list[float]] = {"mark": [], "reset": []}
    rng = random.Random(10)
    try:
        assert marker.stdin is not None
        for i in range(2 * marks):
            op = "mark" if i % 2 == 0 else "reset"
            marker.stdin.write(op + "\n")
            marker.stdin.flush()
            before = float(marked.next(10))
            at, observed = seen.next(10).split()
            expected = "temporary" if op == "mark" else "valid"
            if observed != expected:
                raise RuntimeError(f"after a {op} the other process saw {observed}")
            latencies[op].append((float(at) - before) * 1e6)
            time.sleep(rng.uniform(0.001, 0.004))  # apart, and not in step with anything
            # A change nobody made (a stale state applied)? After the last one the poller
            # prints its summary instead.
            if i + 1 < 2 * marks and seen.waiting():
                raise RuntimeError(f"after a {op} the key changed again by itself")
        marker.stdin.close()
        if marker.wait(30) != 0:
            raise RuntimeError(f"the marking process failed ({marker.returncode})")
        watcher.wait(30)
        summary = json.loads(seen.next(10))
    finally:
        bench.procs.stop(marker)
        bench.procs.stop(watcher)
    out = {kind: stats(values) for kind, values in latencies.items()}
    out["samples"] = {kind: [round(v, 1) for v in values] for kind, values in latencies.items()}
    out["all"] = stats(latencies["mark"] + latencies["reset"])
    out["polls_per_second"] = summary["polls_per_second"]
    return out


def publish_floor(bench: Bench, redis: RedisServer) -> dict[str, Any]:
    """A bare PUBLISH (from here, LOAD_CPU) to a bare SUBSCRIBE socket (SERVER_CPU): µs."""
    rounds = 2 * bench.plan.propagation_marks
    spec = {"port": redis.port, "channel": namespace("floor"), "messages": rounds}
    sub, lines = start_role(bench, "_subscribe", spec, SERVER_CPU)
    samples = []
    rng = random.Random(10)
    try:
        with socket.create_connection((HOST, redis.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            command = resp("PUBLISH", spec["channel"], "x" * 60)
            for _ in range(rounds):
                before = time.monotonic()
                sock.sendall(command)
                if not sock.recv(64).startswith(b":1"):
                    raise RuntimeError("the subscriber is gone")
                samples.append((float(lines.next(10)) - before) * 1e6)
                time.sleep(rng.uniform(0.001, 0.004))
    finally:
        bench.procs.stop(sub)
    return stats(samples)


def propagation(bench: Bench) -> dict[str, Any]:
    """How long a mark in one process takes to be seen in another: shm and Redis."""
    redis = redis_server(bench)
    out: dict[str, Any] = {"marks": bench.plan.propagation_marks}
    backends = [("shm", "shm")] + ([("redis", redis.url)] if redis else [])
    for name, state in backends:
        ns = namespace(f"propagation-{name}")
        try:
            out[name] = result = propagate(bench, state, ns)
        except (OSError, RuntimeError, EOFError, subprocess.SubprocessError) as exc:
            bench.notes.append(f"Propagation through {name} failed: {exc}")
            bench.notes.failed.add(f"propagation-{name}")
            log(f"  {name:6} FAILED: {exc}")
            continue
        finally:
            if name == "shm":
                remove_shm(ns)
        log(
            f"  {name:6} {result['all']['n']} transitions: p50 {result['all']['p50']:8.1f} µs  "
            f"p99 {result['all']['p99']:8.1f} µs  max {result['all']['max']:8.1f} µs  "
            f"(mark p99 {result['mark']['p99']:.1f}, reset p99 {result['reset']['p99']:.1f}; "
            f"{result['polls_per_second'] / 1e6:.1f}M polls/s)"
        )
    if redis:
        try:
            out["floor"] = floor = publish_floor(bench, redis)
            log(
                f"  floor  bare PUBLISH to SUBSCRIBE: p50 {floor['p50']:8.1f} µs  "
                f"p99 {floor['p99']:8.1f} µs"
            )
        except (OSError, RuntimeError, EOFError) as exc:
            bench.notes.append(f"The bare PUBLISH/SUBSCRIBE floor failed: {exc}")
    return out


# --------------------------------------------------------------------------
# keyfailover serve --workers
# --------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_serve(
    bench: Bench,
    key: str,
    workers: int,
    cpus: str | None,
    ns: str,
    label: str,
    server: str = "uvicorn",
    threads: int | None = None,
) -> Setup:
    """`keyfailover serve --server SERVER` in front of the fast upstream with one key;
    default state (local for one worker, shm for more), in a namespace of its own; the
    native server with `threads` runtime threads (None: its default, one per CPU it may
    use)."""
    port = free_port()
    args = [sys.executable, "-m", "keyfailover", "serve", "--provider", "anthropic"]
    args += ["--upstream", bench.fast.url, "--keys-env", "KFB_KEYS"]
    args += ["--client-token-env", "KFB_TOKENS", "--host", HOST, "--port", str(port)]
    args += ["--workers", str(workers), "--namespace", ns, "--log-level", "warning"]
    args += ["--grace", "1", "--server", server]
    args += [] if threads is None else ["--threads", str(threads)]
    env = {"KFB_KEYS": OK_KEY, "KFB_TOKENS": TOKEN}
    proc = bench.procs.start(args, cpus=cpus, env=env)
    state = "local" if workers == 1 else "shm"
    note = f"{server}, {workers} worker{'s' if workers > 1 else ''}, CPUs {cpus}, state {state}"
    if server == "native":
        note += f", {threads or 'default'} threads"
    setup = Setup(key, label, port, {"json": ("/v1/messages", TOKEN, BODY)}, proc, note)
    wait_ready(port, "/v1/messages", TOKEN, proc)
    return setup


# `serve` on the native server: both CPUs (default threads, one per CPU) against one.
NATIVE_BASE, NATIVE_BOTH = "kf-serve-native-one-cpu", "kf-serve-native"


def workers(bench: Bench) -> dict[str, Any] | None:
    """`keyfailover serve --server uvicorn --workers 2` vs `--workers 1`, and the native
    server on both CPUs (its default threads) vs `--threads 1` on one, at each concurrency,
    all five alternating."""
    if SERVER_CPU is None or LOAD_CPU is None:
        bench.notes.append("Fewer than 2 CPUs: `serve --workers 2` vs 1 was skipped.")
        return None
    plan, gen = bench.plan, bench.gen
    both = f"{SERVER_CPU},{LOAD_CPU}"
    ns = namespace("serve")
    configs = [
        ("kf-serve-1-one-cpu", 1, SERVER_CPU, f"serve --workers 1 (CPU {SERVER_CPU})", None),
        ("kf-serve-1", 1, both, f"serve --workers 1 (CPUs {both})", None),
        ("kf-serve-2", 2, both, f"serve --workers 2 (CPUs {both})", None),
        (NATIVE_BASE, 1, SERVER_CPU, f"native, --threads 1 (CPU {SERVER_CPU})", 1),
        (NATIVE_BOTH, 1, both, f"native, default threads (CPUs {both})", 0),
    ]
    setups: list[Setup] = []
    try:
        for key, n, cpus, label, threads in configs:
            server = "uvicorn" if threads is None else "native"
            try:
                setups.append(start_serve(bench, key, n, cpus, ns, label, server, threads or None))
            except RuntimeError as exc:
                bench.notes.append(f"{label} did not start: {exc}")
                bench.notes.failed.add(key)
        if not setups:
            return None
        out: dict[str, Any] = {
            "labels": {setup.key: setup.label for setup in setups},
            "notes": {setup.key: setup.note for setup in setups},
            "cpus": both,
            "concurrencies": {},
            "native": {},
        }
        for connections in plan.workers_concurrencies:

            def run(setup: Setup, first: bool, connections: int = connections) -> dict[str, Any]:
                if first:
                    gen.run(setup, "json", connections, plan.warmup)
                assert setup.proc is not None
                workers = children(setup.proc.pid) if setup.key == "kf-serve-2" else []
                pids = [setup.proc.pid, *workers]
                cpu_before = [cpu_seconds(pid) for pid in pids]
                load = gen.run(setup, "json", connections, plan.shared_duration)
                row = load_dict(load)
                cpu = [
                    cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)
                ]
                row["cpu"] = sum(cpu)
                if workers:
                    row["worker_cpu"] = cpu[1:]
                log(
                    f"  c={connections:<3} {setup.label:32} {load.rps:8.0f} req/s  "
                    f"p50 {load.p(50):6.2f} ms  p99 {load.p(99):6.2f} ms  errors {load.errors}"
                    + f"  CPU {row['cpu'] / max(1, load.requests) * 1e6:.0f} µs/request"
                    + (f"  worker CPU s {[round(s, 2) for s in cpu[1:]]}" if workers else "")
                )
                return row

            runs = alternate(bench, setups, run, f"c={connections}")
            native = {key: rows for key, rows in runs.items() if key.startswith("kf-serve-native")}
            uvicorn = {key: rows for key, rows in runs.items() if key not in native}
            results = {**summarize(uvicorn, "kf-serve-1"), **summarize(native, NATIVE_BASE)}
            note_errors(bench, setups, results, f"c={connections}")
            out["concurrencies"][str(connections)] = {k: results[k] for k in uvicorn}
            out["native"][str(connections)] = {k: results[k] for k in native}
        return out
    finally:
        for setup in setups:
            if setup.proc is not None:
                bench.procs.stop(setup.proc)
        remove_shm(ns)


# --------------------------------------------------------------------------
# The native server against the floors, in rounds (issue 14)
# --------------------------------------------------------------------------

# The setups of issue 14's one-core goals (the blocking table's keys), in table order.
NATIVE_ROUNDS = ("direct", "nginx-proxy", "hyper-floor", "kf-native", "kf-uvicorn")


def native_rounds(bench: Bench) -> dict[str, Any] | None:
    """The native server, its floors (nginx proxying, the bare hyper proxy), FailoverProxy
    under uvicorn and direct, alternating in `plan.shared_rounds` rounds at each concurrency.
    The blocking table runs each setup once, so a neighbour's burst on this shared machine
    during one setup's run moves its ratios; the goals of issue 14 take the median of the
    ratios within each round instead, and the added latency at c=1 the median of each
    round's difference to direct."""
    setups = [setup for setup in bench.setups if setup.key in NATIVE_ROUNDS]
    if not any(setup.key == "kf-native" for setup in setups):
        return None  # the blocking table notes why it is missing
    plan = bench.plan
    out: dict[str, Any] = {}
    # The plain build (what `pip install .` builds) beside the profile-guided one, at the
    # concurrencies where throughput is judged.
    plain = []
    if bench.plain_build is not None:
        try:
            plain = [start_native(bench.procs, bench.fast, bench.slow, build=bench.plain_build)]
        except (OSError, RuntimeError) as exc:
            bench.notes.append(f"The plain build's native server did not start: {exc}")
    for connections in plan.concurrencies:

        def run(setup: Setup, first: bool, connections: int = connections) -> dict[str, Any]:
            if first:
                bench.gen.run(setup, "json", connections, plan.warmup)
            # The server's CPU time, its children's too (nginx's worker); not direct's.
            pids = []
            if setup.key != "direct" and setup.proc is not None:
                pids = [setup.proc.pid, *children(setup.proc.pid)]
            before = [cpu_seconds(pid) for pid in pids]
            row = closed_loop(bench, setup, connections, plan.shared_duration, warmup=False)
            if pids:
                row["cpu"] = sum(cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True))
            return row

        these = setups + (plain if connections > 1 else [])
        runs = alternate(bench, these, run, f"rounds at c={connections}")
        note_errors(
            bench,
            these,
            {key: {"errors": sum(row["errors"] for row in rows)} for key, rows in runs.items()},
            f"rounds at c={connections}",
        )
        out[str(connections)] = runs
    for setup in plain:
        assert setup.proc is not None
        bench.procs.stop(setup.proc)
    if 1 in plan.concurrencies and SERVER_CPU is not None and LOAD_CPU is not None:
        out[ONE_CPU] = one_cpu_rounds(bench, setups)
    return out


# native_rounds' key for c=1 with every proxy moved onto the load generator's CPU.
ONE_CPU = "1-one-cpu"


def pin_tree(pid: int, cpu: str) -> None:
    """Every thread of `pid` and of its children onto `cpu`."""
    for proc in (pid, *children(pid)):
        for task in Path(f"/proc/{proc}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(task.name), {int(cpu)})


def one_cpu_rounds(bench: Bench, setups: list[Setup]) -> dict[str, list[dict[str, Any]]]:
    """c=1 with each proxy on LOAD_CPU for its run, where direct's requests stay: like
    for like with direct, one more hop of software on the same CPU. One request at a
    time never needs two CPUs; across two, each request wakes the other CPU four times,
    and on this VM a wake-up of an idle CPU costs tens of µs whatever the proxy."""
    plan = bench.plan

    def run(setup: Setup, first: bool) -> dict[str, Any]:
        assert LOAD_CPU is not None
        assert SERVER_CPU is not None
        if setup.proc is None or setup.key == "direct":
            return closed_loop(bench, setup, 1, plan.shared_duration, warmup=first)
        pin_tree(setup.proc.pid, LOAD_CPU)
        try:
            return closed_loop(bench, setup, 1, plan.shared_duration, warmup=first)
        finally:
            pin_tree(setup.proc.pid, SERVER_CPU)

    runs = alternate(bench, setups, run, "rounds at c=1 on one CPU")
    note_errors(
        bench,
        setups,
        {key: {"errors": sum(row["errors"] for row in rows)} for key, rows in runs.items()},
        "rounds at c=1 on one CPU",
    )
    return runs
