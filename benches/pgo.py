"""A profile-guided (PGO) build of the extension: `python benches/pgo.py develop|wheel|train`.

    python benches/pgo.py develop [MATURIN ARGS]  # the PGO build, installed (maturin develop)
    python benches/pgo.py wheel [MATURIN ARGS]    # the PGO build as a wheel (default -o dist)
    python benches/pgo.py train [--smoke]         # the training load alone, on the installed build

A PGO build is three steps: the extension built with instrumentation, the training
load run through it (each process that loads it writes its counts on exit), and the
extension built again with the merged counts, which tell the compiler which code is
hot (laid out together, inlined) and which is cold (moved out of the way). The
training load is what a service does with keyfailover: the native server's routes
(blocking, a failover, streams), the same routes through FailoverProxy under
uvicorn, the bare FailoverClient and the anthropic SDK on AsyncFailoverTransport,
all against MockUpstream on loopback. Each build trains on the code it builds: no
profile is kept from an earlier one. The counts are merged with the `llvm-profdata`
of rustc's own LLVM (rustup's `llvm-tools` component, added when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from suite.config import HERE, HOST, ROOT, log
from suite.procs import Processes, Setup, Upstream, proxy_targets
from suite.wire import free_port, wait_ready

TARGET = ROOT / "target" / "pgo"


def rustc_facts() -> dict[str, str]:
    """`rustc -vV` as a dict (host, LLVM version, ...)."""
    out = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def llvm_profdata() -> str:
    """The llvm-profdata of rustc's LLVM: rustup's llvm-tools (added when missing), else
    `llvm-profdata-MAJOR` on PATH. A newer or older LLVM may not read rustc's raw counts."""
    facts = rustc_facts()
    sysroot = subprocess.run(
        ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
    ).stdout.strip()
    bundled = Path(sysroot) / "lib" / "rustlib" / facts["host"] / "bin" / "llvm-profdata"
    if not bundled.exists() and shutil.which("rustup"):
        log("adding rustup's llvm-tools component (for llvm-profdata)")
        subprocess.run(["rustup", "component", "add", "llvm-tools"], check=False)
    if bundled.exists():
        return str(bundled)
    major = facts.get("LLVM version", "").split(".")[0]
    versioned = shutil.which(f"llvm-profdata-{major}")
    if versioned:
        return versioned
    sys.exit(
        f"pgo: no llvm-profdata for rustc's LLVM {major}: `rustup component add llvm-tools`, "
        f"or install LLVM {major}'s tools (Debian: `apt-get install llvm-{major}`)"
    )


def maturin(args: list[str], rustflags: str, target_dir: Path) -> None:
    """maturin with `rustflags` added to the caller's, in a target directory of its own (so
    the plain build's stays warm). The flags name the profile by its hash, so cargo
    rebuilds every crate when the profile changes."""
    env = dict(os.environ)
    env["RUSTFLAGS"] = " ".join(filter(None, [env.get("RUSTFLAGS", ""), rustflags]))
    env["CARGO_TARGET_DIR"] = str(target_dir)
    beside = Path(sys.executable).with_name("maturin")  # this venv's
    found = str(beside) if beside.exists() else shutil.which("maturin")
    if found is None:
        sys.exit('pgo: no maturin here (pip install "maturin>=1.9,<2")')
    command = [found, *args]
    log("pgo: " + " ".join(command) + f"  (RUSTFLAGS={env['RUSTFLAGS']!r})")
    subprocess.run(command, env=env, cwd=ROOT, check=True)


def profile() -> Path:
    """Builds the instrumented extension, runs the training load through it and returns the
    merged profile (target/pgo/HASH.profdata)."""
    profdata = llvm_profdata()
    TARGET.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kf-pgo-", dir=TARGET) as tmp:
        work = Path(tmp)
        wheels, site = work / "wheels", work / "site"
        # A fixed place for the counts keeps the flags, and so cargo's instrumented
        # dependencies, the same from one build to the next.
        raw = TARGET / "raw"
        flags = f"-Cprofile-generate={raw}"
        maturin(["build", "--release", "-o", str(wheels)], flags, TARGET / "instrumented")
        (wheel,) = wheels.glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        # Build scripts and proc macros ran instrumented too: only the training counts.
        shutil.rmtree(raw, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(site)}
        env.pop("LLVM_PROFILE_FILE", None)  # it would send the counts elsewhere
        where = subprocess.run(
            [sys.executable, "-c", "import keyfailover; print(keyfailover.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.startswith(str(site)):
            sys.exit(f"pgo: the training would import {where}, not the instrumented build")
        subprocess.run([sys.executable, str(Path(__file__)), "train"], env=env, check=True)
        counts = sorted(raw.glob("*.profraw"))
        if not counts:
            sys.exit("pgo: the training load wrote no counts")
        merged = work / "merged.profdata"
        subprocess.run([profdata, "merge", "-o", str(merged), *map(str, counts)], check=True)
        digest = hashlib.sha256(merged.read_bytes()).hexdigest()[:16]
        for stale in TARGET.glob("*.profdata"):  # earlier builds' counts
            stale.unlink()
        out = TARGET / f"{digest}.profdata"
        shutil.move(merged, out)
    log(f"pgo: the training's counts ({len(counts)} raw file(s)) merged into {out}")
    return out


def build(command: str, args: list[str]) -> None:
    """The PGO build: `maturin develop --release ARGS` or `maturin build --release ARGS`."""
    merged = profile()
    if command == "wheel" and "-o" not in args and "--out" not in args:
        args = ["-o", str(ROOT / "dist"), *args]
    verb = "develop" if command == "develop" else "build"
    maturin([verb, "--release", *args], f"-Cprofile-use={merged}", TARGET / "optimized")


# --------------------------------------------------------------------------
# The training load
# --------------------------------------------------------------------------


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM and wait: a server writes its counts only when it exits on its own."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    if code != 0:
        raise RuntimeError(f"a training server exited {code}: its counts are lost")


def start_uvicorn(procs: Processes, mock: Upstream) -> Setup:
    """FailoverProxy under uvicorn, as the suite's `start_asgi` starts it, but from `uvicorn.run`
    in `python pgo.py _uvicorn PORT`: uvicorn ends by raising the SIGTERM it caught again,
    which would kill the process before its counts are written; there it raises SystemExit."""
    port = free_port()
    env = {"KFB_IMPL": "keyfailover", "KFB_FAST": mock.url, "KFB_SLOW": mock.url}
    proc = procs.start([sys.executable, __file__, "_uvicorn", str(port)], env=env, cwd=str(HERE))
    setup = Setup("kf-uvicorn", "FailoverProxy + uvicorn", port, proxy_targets(), proc)
    path, credential, _ = setup.targets["json"]
    wait_ready(port, path, credential, proc)
    return setup


def uvicorn_main(port: int) -> None:
    import uvicorn
    from suite.procs import uvicorn_options

    def exit_cleanly(signum: int, frame: object) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, exit_cleanly)
    loop, http = uvicorn_options()
    uvicorn.run(
        "suite.app:asgi_app",
        factory=True,
        app_dir=str(HERE),
        host=HOST,
        port=port,
        log_level="warning",
        access_log=False,
        loop=loop,
        http=http,
    )


# What Anthropic's API sends with every reply (besides content-type and -length), so the
# training relays and reads provider-like heads: the rate-limit headers are parsed on
# every answer (the pool's `headroom` strategy and the dashboard read them).
PROVIDER_HEADERS = {
    "date": "Sat, 05 Dec 2026 05:00:00 GMT",
    "connection": "keep-alive",
    "request-id": "req_011CVqXbT1hY7cW2n5m8Lq3R",
    "anthropic-organization-id": "0f5c1a9e-3b7d-4e21-9c8a-6d2f4b1e7a90",
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-12-05T05:00:01Z",
    "anthropic-ratelimit-input-tokens-limit": "400000",
    "anthropic-ratelimit-input-tokens-remaining": "399000",
    "anthropic-ratelimit-input-tokens-reset": "2026-12-05T05:00:01Z",
    "anthropic-ratelimit-output-tokens-limit": "80000",
    "anthropic-ratelimit-output-tokens-remaining": "79990",
    "anthropic-ratelimit-output-tokens-reset": "2026-12-05T05:00:01Z",
    "anthropic-ratelimit-tokens-limit": "480000",
    "anthropic-ratelimit-tokens-remaining": "478990",
    "anthropic-ratelimit-tokens-reset": "2026-12-05T05:00:01Z",
    "via": "1.1 google",
    "cf-cache-status": "DYNAMIC",
    "x-robots-tag": "none",
    "server": "cloudflare",
    "cf-ray": "9a1b2c3d4e5f6071-FRA",
}


def training_replies() -> dict[str, Any]:
    """The suite's scenario with provider-like heads on its successful replies."""
    from suite.config import OK_KEY, SSE_KEY, SSE_SHORT_KEY
    from suite.procs import scenario

    replies = scenario()
    for key in (OK_KEY, SSE_KEY, SSE_SHORT_KEY):
        replies["replies"][key]["headers"] = PROVIDER_HEADERS
    return replies


def train(smoke: bool) -> None:
    """Each setup's routes through the installed build, against MockUpstream."""
    from suite.load import LoadGenerator
    from suite.procs import run_role, start_mock, start_native

    scale = 0.05 if smoke else 1.0
    routes = (("json", 16, 4.0), ("json", 64, 3.0), ("failover", 8, 2.0), ("sse", 8, 2.0))
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="kf-train-"))
    work.chmod(0o755)
    try:
        mock = start_mock(procs, work, training_replies())
        gen = LoadGenerator(False)
        for name, start in (
            ("native server", lambda: start_native(procs, mock, mock)),
            ("FailoverProxy + uvicorn", lambda: start_uvicorn(procs, mock)),
        ):
            setup = start()
            for route, connections, seconds in routes:
                load = gen.run(setup, route, connections, seconds * scale)
                log(
                    f"  {name}: {route} c={connections}: {load.requests} requests, "
                    f"{load.errors} errors"
                )
                if load.errors:
                    raise RuntimeError(f"{name}: {route} failed {load.errors} requests")
            assert setup.proc is not None
            stop(setup.proc)
        spec = {
            "upstream": mock.url,
            "requests": int(4000 * scale) or 1,
            "concurrency": 32,
            "sse_rounds": 3 if smoke else 10,
            "rounds": int(200 * scale) or 1,
        }
        run_role("_client", spec, cpus=None, timeout=300)
        log("  FailoverClient: blocking, sequential, streams and failovers")
        spec = {"upstream": mock.url, "duration": 2.0 * scale, "concurrency": 16}
        run_role("_sdk", spec, cpus=None, timeout=300)
        log("  anthropic SDK on AsyncFailoverTransport: blocking and streaming")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("command", choices=("develop", "wheel", "train", "_uvicorn"))
    parser.add_argument("--smoke", action="store_true", help="train: tiny counts (CI)")
    args, rest = parser.parse_known_args()
    if args.command == "_uvicorn":
        uvicorn_main(int(rest[0]))
    elif args.command == "train":
        if rest:
            parser.error(f"train takes no maturin arguments: {rest}")
        train(args.smoke)
    else:
        build(args.command, rest)


if __name__ == "__main__":
    main()
