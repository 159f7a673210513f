"""The `keyfailover` command: serve, mock-upstream, demo.

keyfailover serve --provider anthropic --keys-file keys.txt --client-token-env KF_TOKENS
keyfailover mock-upstream --port 9000 [--scenario scenario.json]
keyfailover demo
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import re
import resource
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from keyfailover import __version__, _native
from keyfailover._config import (
    PROVIDERS,
    _shown,
    default_upstream,
    echo,
    echo_file,
    echo_path,
    masked_words,
    unset_variable,
)
from keyfailover._native import ConfigError, FailoverClient, Key, KeyPool
from keyfailover._native import parse_keys as _parse_keys
from keyfailover._reload import KeysFileReloader, read_text

if TYPE_CHECKING:
    from keyfailover.asgi import FailoverProxy

SERVER_EXTRA = 'uvicorn is not installed: pip install "keyfailover[server]"'
log = logging.getLogger("keyfailover")


class CliError(Exception):
    """A usage problem, reported as one line and exit status 2."""


class RunError(Exception):
    """A failure at run time (a port in use, ...), reported as one line and exit status 1."""


def parse_keys(
    text: str, *, source: str, separators: str = "\n"
) -> list[str | Key] | dict[str, str | Key]:
    """Keys from `text`: one per line (or per `separators`), every one `label=key` or none.

    Blank lines and lines starting with `#` are skipped.
    """
    try:
        return _parse_keys(text, source=source, separators=separators)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def load_keys(args: argparse.Namespace) -> list[str | Key] | dict[str, str | Key]:
    if args.keys_file:
        path = Path(args.keys_file)
        shown = echo_file(str(path))  # a key given in its place is not printed
        try:
            text = read_text(path)
        except FileNotFoundError:
            raise CliError(f"keys file {shown!r} not found") from None
        except OSError as exc:
            raise CliError(f"cannot read keys file {shown!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise CliError(f"keys file {shown!r}: {exc}") from None
        return parse_keys(text, source=f"keys file {shown!r}")
    value = os.environ.get(args.keys_env)
    if value is None:
        raise CliError(f"--keys-env: {unset_variable(args.keys_env)}")
    return parse_keys(value, source=f"environment variable {args.keys_env}", separators=",\n")


def load_tokens(var: str | None, what: str = "client tokens") -> list[str] | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise CliError(unset_variable(var))
    tokens = [t.strip() for t in re.split(r"[,\n]", value) if t.strip()]
    if not tokens:
        raise CliError(f"environment variable {var} holds no {what}")
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require_uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise CliError(SERVER_EXTRA) from None
    return uvicorn


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def os_error(exc: OSError) -> str:
    """What went wrong, in the system's words ("Address already in use"; a name that does
    not resolve: "Name or service not known", which `os.strerror` has no words for)."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def signals_until_serving() -> None:
    """Signal handling from before the port is open until the server installs its own:
    SIGHUP ignored (by default it ends the process, and a reload sent as soon as the port
    answers would; a file edited meanwhile is caught up with, by reload_if_changed), and
    SIGTERM or SIGINT a clean exit at once, as nothing is in flight yet (by default
    SIGTERM ends the process with status -15)."""

    def stop(signum: int, _frame: Any) -> None:
        from keyfailover import _serve

        _serve.exiting()  # the signals that follow must not end it another way
        raise SystemExit(0)

    with contextlib.suppress(ValueError):  # not the main thread: no signals here
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a RunError that says why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise RunError(f"cannot listen on {host}:{port}: {os_error(exc)}") from None
    sock.set_inheritable(True)
    return sock


def raise_open_files_limit() -> None:
    """Allow as many connections as the hard limit does (the soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def upstream(args: argparse.Namespace, keys: list[str | Key] | dict[str, str | Key]) -> str:
    """Where requests go: --upstream, else the provider's public API, else (Azure
    OpenAI) the first key's own endpoint when every key has one."""
    found = default_upstream(args.provider, keys, args.upstream)
    if found is None:
        raise CliError(
            f"--provider {args.provider} needs --upstream URL (the resource's endpoint, "
            "https://NAME.openai.azure.com) or base_url=URL on every key"
        )
    return found


def build_proxy(args: argparse.Namespace) -> tuple[FailoverProxy, KeysFileReloader | None]:
    """The proxy `serve` runs, and with --keys-file what reloads its keys."""
    from keyfailover.asgi import FailoverProxy

    tokens = load_tokens(args.client_token_env)
    if tokens is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise CliError(
            f"refusing to listen on {echo(args.host)} without client tokens: "
            "set --client-token-env, or pass --allow-unauthenticated"
        )
    try:
        keys = load_keys(args)
        pool = KeyPool(keys, state=args.state, namespace=args.namespace, strategy=args.strategy)
        reloader = KeysFileReloader(args.keys_file, pool) if args.keys_file else None
        client = FailoverClient(
            pool,
            base_url=upstream(args, keys),
            provider=args.provider,
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            http2=args.http2,
        )
        proxy = FailoverProxy(
            client,
            client_tokens=tokens,
            allow_byok=args.allow_byok,
            max_body_bytes=args.max_body_bytes,
            body_timeout=args.body_timeout,
            admin_tokens=load_tokens(args.admin_token_env, "admin tokens"),
            reload=reloader.keys if reloader else None,
        )
        return proxy, reloader
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def configure_logging(level: str, style: str) -> None:
    """Every record (keyfailover's and uvicorn's) to stderr, as text or one JSON object a line."""
    from keyfailover._logging import JsonFormatter, drop_below_configured_levels

    handler = logging.StreamHandler()
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    drop_below_configured_levels()


# The settings of one pool, which --config takes from its file instead.
ROUTE_OPTIONS = (
    "provider",
    "upstream",
    "client_token_env",
    "admin_token_env",
    "allow_byok",
    "max_body_bytes",
    "body_timeout",
    "timeout",
    "connect_timeout",
    "http2",
    "strategy",
    "namespace",
    "state",
)


def cmd_serve(args: argparse.Namespace) -> int:
    from keyfailover import _serve

    if args.config is None and args.keys_file is None and args.keys_env is None:
        raise CliError("one of the arguments --keys-file --keys-env --config is required")
    if args.config is not None:
        return serve_config(args)
    if args.check:
        raise CliError("--check goes with --config")
    uvicorn = _require_uvicorn() if args.server == "uvicorn" else None
    if args.threads is not None:
        if args.server != "native":
            raise CliError("--threads is for the native server")
        _native._set_worker_threads(args.threads)
    configure_logging(args.log_level, args.log_format)
    if args.workers > 1 and args.state is None:
        args.state = "shm"
        log.info(
            "%d workers: key states shared through shared memory (namespace %r); "
            "pass --state to choose",
            args.workers,
            args.namespace,
        )
    proxy, reloader = build_proxy(args)
    pool = proxy.client.pool
    log.info(
        "forwarding to %s with %s (%s), key states %s",
        proxy.client.base_url,
        plural(len(pool), "key"),
        ", ".join(f"{k['label']} {k['hint']}" for k in pool.snapshot()),
        pool.state_backend,
    )
    signals_until_serving()
    sock = listen(args.host, args.port)
    raise_open_files_limit()

    def run() -> None:
        if reloader is not None:  # in each worker: its own pool follows the file
            reloader.on_sighup()
            reloader.reload_if_changed()
            reloader.watch()
        else:  # SIGHUP would end the process
            source = f"environment variable {args.keys_env}"
            signal.signal(
                signal.SIGHUP,
                lambda *_: log.warning("SIGHUP: nothing to reload: keys come from %s", source),
            )
        if uvicorn is None:
            _serve.run_native(proxy, sock, args)
        else:
            _serve.run_uvicorn(uvicorn, proxy, sock, args)

    if args.workers == 1:
        run()
        return 0
    return _serve.supervise(args.workers, run, sock)


def serve_config(args: argparse.Namespace) -> int:
    """`serve --config FILE`: every route of the file on the native server, one
    admin area over all of them; SIGHUP or an edit reloads the file."""
    from keyfailover import _config, _serve

    defaults = build_parser().parse_args(["serve", "--config", args.config])
    given = [name for name in ROUTE_OPTIONS if getattr(args, name) != getattr(defaults, name)]
    if given:
        option = "--no-http2" if given[0] == "http2" else "--" + given[0].replace("_", "-")
        if given[0] == "admin_token_env":
            raise CliError(
                f"{option} goes in the config with --config: admin_tokens_env in [server] "
                "(the server-wide admin area, every route's too)"
            )
        raise CliError(f"{option} is a route's setting: with --config, set it in the file")
    if args.server != "native":
        raise CliError("--config runs the native server (--server native)")
    if args.threads is not None:  # before the config's checks, which start the runtime
        _native._set_worker_threads(args.threads)
    try:
        config = _config.load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if not is_loopback(args.host) and not args.allow_unauthenticated:
        open_routes = [r.name for r in config.routes if r.client_tokens is None]
        if open_routes:
            raise CliError(
                f"refusing to listen on {echo(args.host)} with route {open_routes[0]!r} open to "
                "anyone: give it client_tokens_env, or pass --allow-unauthenticated"
            )
    if args.check:
        try:  # what serve builds (clients, gateways), with pools sharing nothing
            _config.Routes(config, local=True)
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        print(
            f"{args.config}: {plural(len(config.routes), 'route')} OK: "
            + ", ".join(
                f"{echo(r.name)} at {echo_path(r.path)} ({r.provider}, "
                f"{plural(len(r.keys), 'key')})"
                for r in config.routes
            )
        )
        return 0
    configure_logging(args.log_level, args.log_format)
    default_state = "shm" if args.workers > 1 else None
    try:
        routes = _config.Routes(config, default_state=default_state)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    for line in routes.describe():
        log.info("%s", line)
    # Made before the fork, it knows the files as the routes were built from them:
    # a worker started after an edit catches up (reload_if_changed).
    reloader = _config.ConfigReloader(routes)
    signals_until_serving()
    sock = listen(args.host, args.port)
    raise_open_files_limit()

    def run() -> None:
        reloader.server = _serve.native_server(routes.server_routes(), args, config.admin_tokens)
        reloader.on_sighup()
        reloader.reload_if_changed()
        reloader.watch()
        try:
            _serve.serve_native_server(reloader.server, sock, args)
        finally:
            reloader.stop()

    if args.workers == 1:
        run()
        return 0
    return _serve.supervise(args.workers, run, sock)


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from keyfailover.testing import MockUpstream

    upstream = MockUpstream(host=args.host, port=args.port)
    if args.scenario:
        try:
            upstream.load_scenario(args.scenario)
        except FileNotFoundError:
            raise CliError(f"scenario file {echo_file(args.scenario)!r} not found") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(f"bad scenario {echo_file(args.scenario)!r}: {exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        upstream.start()
    except OSError as exc:
        raise RunError(f"cannot listen on {args.host}:{args.port}: {os_error(exc)}") from None
    try:
        print(f"mock upstream listening on {upstream.url} (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        upstream.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from keyfailover.demo import run_demo

    return run_demo(requests=args.requests, pace=args.pace)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes what it refuses as given (a choice, extra arguments): a key
        # in the wrong place.
        message = masked_words(message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a port (0 to 65535)")
    return value


# The range of every seconds option: from a millisecond to about 31 years.
SECONDS = (0.001, 1e9)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    low, high = SECONDS
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"{_shown(text)} is not a number of seconds from {low:g} to {high:g}"
        )
    return value


def count(text: str, most: int = 1_000_000) -> int:
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a whole number from 1 to {most:,}")
    return int(text)


def processes(text: str) -> int:
    """Workers or threads: a few per core at the most is sensible; this refuses a typo's
    thousands (each is a process or a thread, started at once)."""
    return count(text, most=1024)


def size(text: str) -> int:
    """Bytes, 0 or more (up to 2**53)."""
    if not text.isdigit() or int(text) > 2**53:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number of bytes from 0 to 2**53")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="keyfailover", description="API-key failover for the Anthropic and OpenAI APIs."
    )
    parser.add_argument("--version", action="version", version=f"keyfailover {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    serve = commands.add_parser("serve", help="run the failover proxy")
    serve.add_argument("--provider", choices=sorted(PROVIDERS), default="anthropic")
    serve.add_argument("--upstream", metavar="URL", help="default: the provider's public API")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--keys-file", metavar="FILE", help="one key per line, optionally label=key")
    keys.add_argument("--keys-env", metavar="VAR", help="comma- or newline-separated keys")
    keys.add_argument(
        "--config",
        metavar="FILE",
        help="several routes, each with its provider and pool, from a TOML file",
    )
    serve.add_argument(
        "--check", action="store_true", help="with --config: check the file and exit"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8787)
    serve.add_argument("--client-token-env", metavar="VAR", help="tokens callers must present")
    serve.add_argument(
        "--admin-token-env",
        metavar="VAR",
        help="tokens for the admin endpoints only (needed for admin actions without client tokens)",
    )
    serve.add_argument("--allow-byok", action="store_true", help="forward callers' own keys")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback address without client tokens",
    )
    serve.add_argument("--max-body-bytes", type=size, default=32 * 1024 * 1024, metavar="N")
    serve.add_argument(
        "--timeout",
        type=seconds,
        default=600.0,
        metavar="S",
        help="wait for an upstream response head, and for each chunk of a body (default 600)",
    )
    serve.add_argument(
        "--connect-timeout",
        type=seconds,
        default=10.0,
        metavar="S",
        help="connect to upstream (default 10)",
    )
    serve.add_argument(
        "--no-http2",
        dest="http2",
        action="store_false",
        help="ask https upstreams for HTTP/1.1 only (by default HTTP/2 is offered too)",
    )
    serve.add_argument(
        "--grace",
        type=seconds,
        default=10.0,
        metavar="S",
        help="on SIGTERM/SIGINT, let in-flight requests finish for this long (default 10)",
    )
    serve.add_argument(
        "--server",
        choices=["native", "uvicorn"],
        default="native",
        help="native: the Rust server of the core (default); uvicorn: the ASGI app under "
        "uvicorn (needs keyfailover[server]; has OpenTelemetry spans)",
    )
    serve.add_argument(
        "--threads",
        type=processes,
        metavar="N",
        help="native server: threads serving requests (default: one per core)",
    )
    serve.add_argument(
        "--header-timeout",
        type=seconds,
        default=30.0,
        metavar="S",
        help="native server: close a connection whose request head is not complete after "
        "this long, or that is idle this long between requests (default 30)",
    )
    serve.add_argument(
        "--body-timeout",
        type=seconds,
        default=30.0,
        metavar="S",
        help="answer 408 and close the connection when a request body pauses for longer "
        "than this (default 30)",
    )
    serve.add_argument(
        "--timeout-keep-alive",
        type=seconds,
        default=5.0,
        metavar="S",
        help="uvicorn: close idle keep-alive connections after this long (default 5)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=count,
        default=10_000,
        metavar="N",
        help="answer 503 beyond this many connections (uvicorn: and requests) at once "
        "(default 10000)",
    )
    serve.add_argument(
        "--state",
        metavar="STATE",
        help="share key states: shm (every process of this host) or a redis:// URL "
        "(every host); default: this process only, or shm with --workers",
    )
    serve.add_argument(
        "--namespace",
        default="default",
        help="pools with the same --state and namespace share their keys' states",
    )
    serve.add_argument(
        "--workers",
        type=processes,
        default=1,
        metavar="N",
        help="worker processes (default 1; the native server uses every core in one)",
    )
    serve.add_argument(
        "--strategy",
        choices=["ordered", "round_robin", "least_loaded", "headroom"],
        default="ordered",
        help="which key each request tries first (default ordered)",
    )
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line, with the records' fields",
    )
    serve.set_defaults(run=cmd_serve)

    mock = commands.add_parser("mock-upstream", help="run the mock upstream for manual testing")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=port, default=9000)
    mock.add_argument("--scenario", metavar="FILE", help="JSON: replies per key, reply queue")
    mock.set_defaults(run=cmd_mock_upstream)

    demo = commands.add_parser("demo", help="see failover at work, on loopback, no real keys")
    demo.add_argument("--requests", type=count, default=20, help="requests to send (default 20)")
    demo.add_argument("--pace", type=float, default=0.15, help="seconds between requests")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except CliError as exc:
        print(f"keyfailover {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"keyfailover {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
