"""The native server in front of an upstream over TLS, as the providers' APIs are: nginx
serving the same small JSON answer on an HTTPS listener with HTTP/1.1 only and on one that
offers HTTP/2 (ALPN), with a certificate from a certificate authority of the run's own (the
native servers trust it through `SSL_CERT_FILE`), alternating in rounds with the native
server in front of the plain-HTTP upstream of every other measurement.

What it shows: what TLS costs the proxy per request over keep-alive connections (the
handshakes happen once per connection, in the warm-up), and what HTTP/2 costs or saves
against HTTP/1.1: one shared connection per host instead of one per request in flight, and
the stream accounting of keyfailover's pool (a room check as a stream is taken, a release as
its body ends)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import HOST, LOAD_CPU, log
from .measure import Bench, closed_loop
from .procs import NGINX_HEAD, Processes, Setup, Upstream, start_native
from .shared import alternate, children, cpu_seconds, note_errors, summarize
from .wire import free_port

# The setups, in table order: (key, label, listener), listener None for plain HTTP.
SETUPS = (
    ("kf-native", "upstream over HTTP/1.1", None),
    ("kf-native-tls-h1", "upstream over TLS, HTTP/1.1", "h1"),
    ("kf-native-tls-h2", "upstream over TLS, HTTP/2", "h2"),
)

NGINX_TLS_CONF = (
    NGINX_HEAD
    + """    ssl_certificate {dir}/cert.pem;
    ssl_certificate_key {dir}/key.pem;
    ssl_protocols TLSv1.3;
    server {{
        listen {host}:{h1} ssl backlog=4096;
        location / {{ default_type application/json; return 200 '{message}'; }}
    }}
    server {{
        listen {host}:{h2} ssl http2 backlog=4096;
        http2_max_concurrent_streams 256;
        location / {{ default_type application/json; return 200 '{message}'; }}
    }}
}}
"""
)


def start_nginx_tls(procs: Processes, directory: Path) -> tuple[Upstream, dict[str, int], Path]:
    """nginx with the HTTP/1.1 and the HTTP/2 listener (on the load's CPU, as the plain
    upstream); its ports by listener, and the CA's certificate."""
    from keyfailover.testing import anthropic_message
    from keyfailover.testing.pki import write_pki

    directory.chmod(0o755)  # nginx's workers run as an unprivileged user
    pki = write_pki(directory, HOST)
    ports = {"h1": free_port(), "h2": free_port()}
    conf = NGINX_TLS_CONF.format(
        dir=directory,
        host=HOST,
        h1=ports["h1"],
        h2=ports["h2"],
        message=json.dumps(anthropic_message(), separators=(",", ":")),
    )
    (directory / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    args = [nginx, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"]
    proc = procs.start(args, cpus=LOAD_CPU)
    upstream = Upstream("nginx-tls", ports["h1"], proc)
    for port in ports.values():
        wait_listening(port, proc)
    return upstream, ports, pki.ca


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Until `port` takes connections (the native servers' readiness, through it, checks
    the rest: the handshake, the certificate, an answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx not listening on port {port}")


def upstream_tls(bench: Bench) -> dict[str, Any] | None:
    if bench.fast.name != "nginx":
        bench.notes.append("No nginx upstream: the native server over TLS was skipped.")
        return None
    plan = bench.plan
    base = bench.setup("kf-native") if any(s.key == "kf-native" for s in bench.setups) else None
    if base is None:
        return None  # the blocking table notes why it is missing
    directory = Path(tempfile.mkdtemp(prefix="kf-bench-tls-"))
    started: list[Setup] = []
    nginx: Upstream | None = None
    try:
        nginx, ports, ca = start_nginx_tls(bench.procs, directory)
        setups = [base]
        for key, label, listener in SETUPS[1:]:
            assert listener is not None
            url = f"https://{HOST}:{ports[listener]}"
            over = (key, f"FailoverProxy, native server, {label}", url, {"SSL_CERT_FILE": str(ca)})
            try:
                started.append(start_native(bench.procs, bench.fast, bench.slow, over=over))
            except RuntimeError as exc:
                bench.notes.append(f"The native server {label} did not start: {exc}")
                bench.notes.failed.add(key)
        setups += started
        out: dict[str, Any] = {
            "labels": {key: label for key, label, _ in SETUPS},
            "concurrencies": {},
        }
        for connections in plan.workers_concurrencies:

            def run(setup: Setup, first: bool, connections: int = connections) -> dict[str, Any]:
                if first:
                    bench.gen.run(setup, "json", connections, plan.warmup)
                assert setup.proc is not None
                pids = [setup.proc.pid, *children(setup.proc.pid)]
                before = [cpu_seconds(pid) for pid in pids]
                row = closed_loop(bench, setup, connections, plan.shared_duration, warmup=False)
                row["cpu"] = sum(cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True))
                return row

            runs = alternate(bench, setups, run, f"upstream over TLS, c={connections}")
            results = summarize(runs, "kf-native")
            note_errors(bench, setups, results, f"upstream over TLS, c={connections}")
            out["concurrencies"][str(connections)] = results
        return out
    except (OSError, RuntimeError) as exc:
        bench.notes.append(f"The native server over TLS was not measured: {exc}")
        log(f"  upstream over TLS: {exc}")
        return None
    finally:
        for setup in started:
            if setup.proc is not None:
                bench.procs.stop(setup.proc)
        if nginx is not None:
            bench.procs.stop(nginx.proc)
        shutil.rmtree(directory, ignore_errors=True)
