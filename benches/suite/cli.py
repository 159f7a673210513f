"""The run: tools, upstreams, setups, every measurement in turn, then the report.

`main` is what `python benches/run.py [--smoke] [--no-litellm]` calls; with a
role name and a JSON spec as arguments it plays that role instead (the
suite's child processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __doc__ as suite_doc
from .config import FULL, LOAD_CPU, RESULTS, SMOKE, log
from .load import LoadGenerator
from .measure import Bench, Notes
from .procs import (
    MUST_PASS,
    Processes,
    direct_setup,
    ensure_tool,
    start_mock,
    start_nginx,
    start_setups,
)
from .registry import MEASUREMENTS, ROLES
from .report import plot, render


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


def run(smoke: bool, with_litellm: bool, plain_build: str | None = None) -> dict[str, Any]:
    plan = SMOKE if smoke else FULL
    started = time.monotonic()
    notes = Notes()
    timings: dict[str, float] = {}
    r: dict[str, Any] = {"plan": plan.__dict__, "notes": notes, "timings": timings}
    r["env"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()}
    r["env"]["build"] = (
        "the profile-guided build (`benches/pgo.py`, as `make wheel` builds it), and in the "
        "native rounds and the instruction count the plain build too (`maturin develop "
        "--release`, as `pip install .` builds it)"
        if plain_build
        else "the build installed"
    )
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
            setups = start_setups(procs, workdir, fast, mock, notes, not smoke and with_litellm)
            r["labels"] = {setup.key: setup.label for setup in setups}
            r["setup_notes"] = {setup.key: setup.note for setup in setups}

        bench = Bench(plan, smoke, gen, procs, setups, fast, mock, notes, plain_build=plain_build)
        for m in MEASUREMENTS:
            if m.needs_setups:
                with section(timings, m.name):
                    result = m.run(bench)
                if result is not None:
                    r[m.key] = result
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    for m in MEASUREMENTS:
        if not m.needs_setups:
            with section(timings, m.name):
                result = m.run(bench)
            if result is not None:
                r[m.key] = result
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
    assert suite_doc is not None
    parser = argparse.ArgumentParser(description=suite_doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, no external tools")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    parser.add_argument(
        "--plain-build",
        metavar="DIR",
        help="the installed extension is the profile-guided build and DIR holds the plain "
        "build's `keyfailover` package, which the native rounds run beside it (`make bench`)",
    )
    args = parser.parse_args()
    plain = args.plain_build
    if plain is not None:
        plain = str(Path(plain).resolve())
        if not (Path(plain) / "keyfailover").is_dir():
            parser.error(f"--plain-build {args.plain_build}: no keyfailover package there")
    r = run(args.smoke, not args.no_litellm, plain)
    RESULTS.mkdir(exist_ok=True)
    prefix = "smoke_" if args.smoke else ""
    r["plots"] = plot(r, prefix)
    report = render(r, args.smoke, [m.render for m in MEASUREMENTS if m.render is not None])
    if r["plots"]:
        report += "\n" + "\n".join(f"![{name}]({name})" for name in r["plots"]) + "\n"
    name = "smoke" if args.smoke else "latest"
    (RESULTS / f"{name}.md").write_text(report)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1, default=str))
    log(f"wrote {RESULTS / f'{name}.md'} in {r['env']['wall']:.0f} s")
    if r["broken"]:
        failed = ", ".join(r["labels"].get(key, key) for key in r["broken"])
        log(f"FAILED: {failed} (see the notes)")
        sys.exit(1)
