"""The measurements: each takes the run's `Bench` and returns a dict for the results.

A measurement is a function `(bench) -> dict | None` (None: nothing to
report, a note says why) listed in `registry.MEASUREMENTS` with its section
of the report. `for_each` runs a per-setup measurement over every setup and
notes the proxies that fail it; a setup a measurement needs for itself (a
different server or configuration) can be started with `bench.procs`, which
stops it at the end of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .config import HERE, LOAD_CPU, ROOT, SCRIPT, SERVER_CPU, Plan, log, pinned
from .load import Load, LoadGenerator
from .procs import Processes, Setup, Upstream, read_line, run_role, tree_rss
from .wire import Connection


class Notes(list[str]):
    """Notes for the report; `failed` holds the keys of setups that failed a workload."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()


@dataclass
class Bench:
    """What every measurement gets: how much to do, the setups, and the means to load them."""

    plan: Plan
    smoke: bool
    gen: LoadGenerator
    procs: Processes  # stops whatever a measurement starts with it at the end of the run
    setups: list[Setup]  # in table order, "direct" first
    fast: Upstream  # the upstream answering every request
    slow: Upstream  # MockUpstream, which can send slowly (the streams held open)
    notes: Notes
    # What a measurement starts once for others to use too (the Redis server), by name.
    shared: dict[str, Any] = field(default_factory=dict)
    # The plain build of the extension (a directory holding the `keyfailover` package) when
    # the one installed is the profile-guided build (`make bench`): the native rounds and the
    # instruction count run it too.
    plain_build: str | None = None

    def setup(self, key: str) -> Setup:
        return next(setup for setup in self.setups if setup.key == key)


def load_dict(load: Load) -> dict[str, Any]:
    return {
        "rps": load.rps,
        "requests": load.requests,
        "errors": load.errors,
        "p": {str(p): ms for p, ms in load.percentiles.items()},
    }


def for_each(
    setups: list[Setup], what: str, measure: Callable[[Setup], dict[str, Any]], notes: Notes
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
            notes.failed.add(setup.key)
            log(f"  {setup.label:34} FAILED: {exc}")
    return out


# --------------------------------------------------------------------------
# Through each setup
# --------------------------------------------------------------------------


def closed_loop(
    bench: Bench, setup: Setup, connections: int, duration: float, warmup: bool = True
) -> dict[str, Any]:
    """Small blocking requests over `connections` for `duration` s (after a warm-up), logged."""
    if warmup:
        bench.gen.run(setup, "json", connections, bench.plan.warmup)
    load = bench.gen.run(setup, "json", connections, duration)
    log(
        f"  {setup.label:34} c={connections:<3} {load.rps:8.0f} req/s  "
        f"p50 {load.p(50):6.2f} ms  p99 {load.p(99):6.2f} ms  errors {load.errors}"
    )
    return load_dict(load)


def blocking(bench: Bench) -> dict[str, Any]:
    """Small blocking requests: every setup at each concurrency, the setups interleaved."""
    plan = bench.plan
    out: dict[str, Any] = {setup.key: {} for setup in bench.setups}
    for connections in plan.concurrencies:

        def measure(setup: Setup, connections: int = connections) -> dict[str, Any]:
            return closed_loop(bench, setup, connections, plan.duration)

        for key, row in for_each(bench.setups, f"c={connections}", measure, bench.notes).items():
            out[key][str(connections)] = row
    bench.shared["blocking"] = out  # for `steady`: which setups can take its pace
    return out


def paced(bench: Bench) -> dict[str, Any]:
    """16 connections sending `plan.paced_rate` requests/s in all: latency below saturation."""

    def measure(setup: Setup) -> dict[str, Any]:
        load = bench.gen.run(setup, "json", 16, bench.plan.duration, rate=bench.plan.paced_rate)
        log(
            f"  {setup.label:34} {load.rps:6.0f} req/s  p50 {load.p(50):6.2f} ms  "
            f"p99 {load.p(99):6.2f} ms  errors {load.errors}"
        )
        return load_dict(load)

    return for_each(bench.setups, "paced load", measure, bench.notes)


def steady(bench: Bench) -> dict[str, Any]:
    """16 connections at `plan.steady_rate` requests/s in all (as `paced`), for the setups
    whose closed-loop throughput at c=16 is at least `STEADY_HEADROOM` times that: above
    its capacity a pace measures the queue, not the cost of a request."""
    rate = bench.plan.steady_rate
    capacity = {
        key: rows["16"]["rps"]
        for key, rows in bench.shared.get("blocking", {}).items()
        if "16" in rows
    }
    able = [s for s in bench.setups if capacity.get(s.key, 0) >= STEADY_HEADROOM * rate]
    left = [s.label for s in bench.setups if s not in able]
    out: dict[str, Any] = {"rate": rate, "setups": {}, "skipped": left}

    def measure(setup: Setup) -> dict[str, Any]:
        load = bench.gen.run(setup, "json", 16, bench.plan.duration, rate=rate)
        log(
            f"  {setup.label:34} {load.rps:6.0f} req/s  p50 {load.p(50):6.2f} ms  "
            f"p99 {load.p(99):6.2f} ms  errors {load.errors}"
        )
        return load_dict(load)

    out["setups"] = for_each(able, f"{rate:,.0f} req/s", measure, bench.notes)
    return out


def sse(bench: Bench) -> dict[str, Any]:
    """A 1,000-event SSE stream, sequentially: time to first byte and total, medians."""

    def measure(setup: Setup) -> dict[str, Any]:
        conn = Connection(setup.port)
        try:
            raw = setup.raw("sse")
            conn.request(raw)  # warm-up
            ttfb, total = [], []
            for _ in range(bench.plan.sse_rounds):
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

    return for_each(bench.setups, "SSE stream", measure, bench.notes)


# `steady` paces a setup only if it did at least this many times the pace at c=16.
STEADY_HEADROOM = 1.5


def sequential(setup: Setup, route: str, rounds: int, pause: float = 0.0) -> tuple[float, int]:
    """Median seconds of `rounds` requests one after another on one connection, and non-200s."""
    samples, errors = sequential_samples(setup, route, rounds, pause)
    return statistics.median(samples), errors


def sequential_samples(
    setup: Setup, route: str, rounds: int, pause: float = 0.0
) -> tuple[list[float], int]:
    """Seconds of each of `rounds` requests one after another on one connection (after one
    unmeasured request that opens it), and the number that were not 200."""
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
        return samples, errors
    finally:
        conn.close()


@contextmanager
def on_cpu(cpu: str | None) -> Iterator[None]:
    """This process runs on `cpu` (if the machine has CPUs to pin to) for the block."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# The failover measurement alternates this many rounds per setup.
FAILOVER_ROUNDS = 5


def failover(bench: Bench) -> dict[str, Any]:
    """A request whose first key answers 429 against one that succeeds at once.

    The 429 carries `retry-after-ms: 1`; a 3 ms pause before each request lets
    that cooldown lapse, so every measured request meets the 429 first. The
    plain requests get the same pause, so both are measured alike.

    What a failover should add is one upstream round trip as the proxy makes it:
    from SERVER_CPU, where the proxies run, to the upstream on LOAD_CPU, after
    the same pause. So for each proxy a request sent directly from SERVER_CPU
    (`rtt`) alternates with its plain and failover requests, in FAILOVER_ROUNDS
    rounds, and a drift of the machine moves all three alike. The direct
    setup's `plain` is sent from LOAD_CPU, the upstream's own CPU, as every
    other direct measurement is: it skips the wake-up of the other CPU and
    comes out 0.1-0.2 ms shorter.
    """
    rounds, upstream = bench.plan.failover_rounds, bench.fast
    each = max(1, rounds // FAILOVER_ROUNDS)
    direct = bench.setup("direct")

    def measure(setup: Setup) -> dict[str, Any]:
        if not setup.is_proxy:
            plain, errors = sequential(setup, "json", rounds, pause=0.003)
            if errors:
                raise RuntimeError(f"{errors} direct requests failed")
            return {"plain": plain}
        samples: dict[str, list[float]] = {"rtt": [], "plain": [], "failover": []}
        errors = 0
        before = upstream.request_count()
        for _ in range(FAILOVER_ROUNDS):
            with on_cpu(SERVER_CPU):
                got, bad = sequential_samples(direct, "json", each, pause=0.003)
            if bad:
                raise RuntimeError(f"{bad} direct requests failed")
            samples["rtt"] += got
            got, bad = sequential_samples(setup, "json", each, pause=0.003)
            if bad:
                raise RuntimeError(f"{bad} plain requests failed")
            samples["plain"] += got
            got, bad = sequential_samples(setup, "failover", each, pause=0.003)
            samples["failover"] += got
            errors += bad
        # Each sequence sends one unmeasured request first; a direct or plain request is one
        # upstream call.
        per_route = FAILOVER_ROUNDS * (each + 1)
        calls = (upstream.request_count() - before - 2 * per_route) / per_route
        rtt, plain, failover = (statistics.median(samples[k]) for k in ("rtt", "plain", "failover"))
        log(
            f"  {setup.label:34} plain {plain * 1e3:6.3f} ms  with failover "
            f"{failover * 1e3:6.3f} ms  ({calls:.2f} upstream calls per request, "
            f"{errors} not 200); a round trip from its CPU {rtt * 1e3:6.3f} ms"
        )
        return {
            "plain": plain,
            "failover": failover,
            "rtt": rtt,
            "upstream_calls": calls,
            "errors": errors,
        }

    # nginx cannot swap keys between attempts: it has no failover route.
    setups = [s for s in bench.setups if not s.is_proxy or "failover" in s.targets]
    return for_each(setups, "failover", measure, bench.notes)


def drift(bench: Bench) -> dict[str, Any] | None:
    """RSS of FailoverProxy + uvicorn before and after `plan.drift_requests` requests, warmed up.

    Run before the streams: 1,000 streams leave the RSS at their peak (freed
    memory stays with the allocator), which would hide any growth after them.
    """
    setup, plan, gen = bench.setup("kf-uvicorn"), bench.plan, bench.gen
    try:
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
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        bench.notes.append(f"RSS drift run failed: {exc}")
        bench.notes.failed.add(setup.key)
        return None
    last = tree_rss(pid)
    change = (last - first) / first
    log(
        f"  {setup.label:34} {load.requests} requests: RSS {first / 2**20:.1f} -> "
        f"{last / 2**20:.1f} MB ({change:+.2%}), errors {load.errors}"
    )
    per_second = load.requests / load.seconds
    return {
        "setup": setup.key,
        "first": first,
        "last": last,
        "max": max([first, last, *(rss for _, rss in samples)]),
        "drift": change,
        "requests": load.requests,
        "errors": load.errors,
        "samples": [(round(t * per_second), rss) for t, rss in samples],
    }


def streams(bench: Bench) -> dict[str, Any]:
    """RSS of each proxy (its whole process tree) while `plan.streams` streams are held open."""
    procs, n = bench.procs, bench.plan.streams

    def measure(setup: Setup) -> dict[str, Any]:
        assert setup.proc is not None
        pid = setup.proc.pid
        idle = tree_rss(pid)
        spec = {"port": setup.port, "request": setup.raw("slow").decode(), "streams": n}
        holder = procs.start(
            [sys.executable, str(SCRIPT), "_hold", json.dumps(spec)],
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
            f"  {setup.label:34} idle {idle / 2**20:6.1f} MB  with {n} streams "
            f"{peak / 2**20:6.1f} MB  after {after / 2**20:6.1f} MB"
        )
        return {"idle": idle, "streams": peak, "after": after, "n": n}

    # LiteLLM opens streams slowly (about 150 ms each, one at a time): 1,000 would take
    # minutes of the suite's budget for a figure no goal needs.
    proxies = [
        s
        for s in bench.setups
        if s.is_proxy and s.proc is not None and "slow" in s.targets and s.key != "litellm"
    ]
    return for_each(proxies, "held-open streams", measure, bench.notes)


# --------------------------------------------------------------------------
# In one process, no proxy
# --------------------------------------------------------------------------


def sdk(bench: Bench) -> dict[str, Any]:
    """The anthropic SDK, default transport vs AsyncFailoverTransport (the `_sdk` role)."""
    spec = {
        "upstream": bench.fast.url,
        "duration": bench.plan.sdk_duration,
        "concurrency": bench.plan.sdk_concurrency,
    }
    out: dict[str, Any] = run_role("_sdk", spec, cpus=SERVER_CPU, timeout=300)
    log("  " + ", ".join(f"{name} {rps:,.0f}/s" for name, rps in out.items()))
    return out


def client(bench: Bench) -> dict[str, Any]:
    """The bare FailoverClient vs httpx2.AsyncClient, straight to the upstream (`_client`)."""
    plan = bench.plan
    spec = {
        "upstream": bench.fast.url,
        "requests": plan.client_requests,
        "concurrency": plan.client_concurrency,
        "sse_rounds": plan.sse_rounds,
        "rounds": plan.failover_rounds,
    }
    out: dict[str, Any] = run_role("_client", spec, cpus=SERVER_CPU, timeout=300)
    rps, one = out["blocking"], out["sequential"]
    log(
        f"  c={plan.client_concurrency}: httpx2 {rps['httpx2']:,.0f} req/s, FailoverClient "
        f"{rps['keyfailover']:,.0f} req/s ({rps['keyfailover'] / rps['httpx2']:.2f}x); one at a "
        f"time: {one['httpx2'] * 1e3:.3f} ms, {one['keyfailover'] * 1e3:.3f} ms, "
        f"{one['keyfailover_failover'] * 1e3:.3f} ms with a failover"
    )
    out["concurrency"] = plan.client_concurrency
    return out


def core(bench: Bench) -> dict[str, Any]:
    """walker.next()+mark ns/op in Rust (cargo bench) and from Python (bench_pool.py)."""
    smoke, notes = bench.smoke, bench.notes
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
