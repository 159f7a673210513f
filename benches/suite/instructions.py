"""Instructions per request, counted by callgrind: the native server against the bare hyper
proxy (hyper with none of keyfailover's policy) on the same small requests.

Counts, not seconds: for the same build and the same requests they come out nearly the same
whatever else this shared machine is doing (two runs of one build differ by under 1%), so a
change to the request path shows in them when requests per second, which move by 5-10%
from run to run here, cannot show it. They cover the server's own code only (user space,
not the kernel's share of each request), and weigh every instruction the same: a byte
copied counts as one, a cache miss as none.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import log
from .measure import Bench
from .procs import ensure_tool, start_hyper_floor, start_native

# Seconds of load before the counters are zeroed, and counted after.
WARMUP, COUNTED = 2.0, 5.0
CONNECTIONS = 16


def instructions(bench: Bench) -> dict[str, Any] | None:
    if bench.smoke:
        return None  # valgrind takes most of a minute to start a server
    if not ensure_tool("valgrind", "valgrind", bench.notes):
        return None
    out: dict[str, Any] = {}
    setups: list[tuple[str, Any]] = [("kf-native", start_native)]
    if bench.plain_build is not None:  # the profile-guided build is installed: the plain too
        setups.append(("kf-native-plain", functools.partial(start_native, build=bench.plain_build)))
    setups.append(("hyper-floor", start_hyper_floor))
    with tempfile.TemporaryDirectory(prefix="kf-bench-callgrind-") as workdir:
        for key, start in setups:
            try:
                out[key] = count(bench, key, start, Path(workdir) / key)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                bench.notes.append(f"{key}: counting instructions failed: {exc}")
                log(f"  {key:34} FAILED: {exc}")
    return out or None


def count(bench: Bench, key: str, start: Any, workdir: Path) -> dict[str, Any]:
    """Starts `key` under callgrind, loads it, and counts the instructions of `COUNTED`
    seconds of requests after a warm-up (the counters zeroed in between)."""
    workdir.mkdir()
    dump = workdir / "callgrind.out"
    under = (
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={dump}",
        "--dump-instr=no",
        "--compress-strings=no",
        "--compress-pos=no",
    )
    if key.startswith("kf-native"):
        setup = start(bench.procs, bench.fast, bench.slow, under=under)
    else:
        setup = start(bench.procs, bench.fast, under=under)
    assert setup.proc is not None
    pid = str(setup.proc.pid)
    try:
        bench.gen.run(setup, "json", CONNECTIONS, WARMUP)
        control(pid, "-z")
        load = bench.gen.run(setup, "json", CONNECTIONS, COUNTED)
        before = set(workdir.iterdir())
        control(pid, "-d")
        dumped = wait_for_dump(workdir, before)
    finally:
        bench.procs.stop(setup.proc)
    if load.errors:
        raise RuntimeError(f"{load.errors} errors under callgrind")
    counted = total(dumped)
    per_request = counted / load.requests
    log(f"  {setup.label:34} {load.requests:6} requests  {per_request:10,.0f} instructions each")
    return {"requests": load.requests, "instructions": counted, "per_request": per_request}


def control(pid: str, flag: str) -> None:
    done = subprocess.run(
        ["callgrind_control", flag, pid], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {flag} failed: {done.stderr.strip()[-300:]}")


def wait_for_dump(workdir: Path, before: set[Path], timeout: float = 60.0) -> Path:
    """The dump file `callgrind_control -d` writes, once it is complete (its totals come
    last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in set(workdir.iterdir()) - before:
            if TOTALS.search(path.read_text(errors="replace")):
                return path
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


# A dump's event count, its last line.
TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


def total(dump: Path) -> int:
    found = TOTALS.search(dump.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no totals in {dump.name}")
    return int(found[1])
