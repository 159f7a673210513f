"""What every module shares: paths, CPU placement, the fake keys, the plans, logging."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benches/
ROOT = HERE.parent
RESULTS = HERE / "results"
# The entry point the child processes run: `python run.py _loadgen JSON` and the like.
SCRIPT = HERE / "run.py"
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
PROPAGATION_KEY = "sk-ant-bench-propagation-000000000000000"
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
    steady_rate: float  # the same at a pace only the fastest setups take (the native server)
    client_requests: int  # bare FailoverClient vs httpx2: requests each way, in three runs
    shared_duration: float  # seconds per run of the state backends and `serve --workers`
    shared_rounds: int  # alternating runs of each of those setups (the median is reported)
    propagation_marks: int  # marks (each followed by a reset) from one process to another
    workers_concurrencies: tuple[int, ...]  # for `serve --workers 2` vs `--workers 1`
    mark_cost_transitions: int  # marks and resets, for the CPU time of a transition
    strategy_limit: int  # N: each key's requests per window in the strategies' comparison
    strategy_window: float  # seconds
    strategy_windows: int  # windows of load per strategy and latency
    strategy_latencies: tuple[float, ...]  # seconds MockUpstream takes to answer a 200
    strategy_concurrency: int = 8
    sdk_concurrency: int = 16
    client_concurrency: int = 32


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
    steady_rate=5000,
    client_requests=20_000,
    shared_duration=2.0,
    shared_rounds=5,
    propagation_marks=200,
    workers_concurrencies=(16, 64),
    mark_cost_transitions=4000,
    strategy_limit=20,
    strategy_window=1.0,
    strategy_windows=6,
    strategy_latencies=(0.0, 0.05),
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
    steady_rate=200,
    client_requests=200,
    shared_duration=0.5,
    shared_rounds=1,
    propagation_marks=10,
    workers_concurrencies=(16,),
    mark_cost_transitions=100,
    strategy_limit=10,
    strategy_window=0.5,
    strategy_windows=2,
    strategy_latencies=(0.05,),
    sdk_concurrency=4,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
