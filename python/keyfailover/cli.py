"""The `keyfailover` command: serve, mock-upstream, demo.

keyfailover serve --provider anthropic --keys-file keys.txt --client-token-env KF_TOKENS
keyfailover mock-upstream --port 9000 [--scenario scenario.json]
keyfailover demo
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyfailover._native import ConfigError, FailoverClient, KeyPool

DEFAULT_UPSTREAMS = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com",
}
SERVER_EXTRA = 'uvicorn is not installed: pip install "keyfailover[server]"'
_LABELLED = re.compile(r"^([A-Za-z0-9_.-]+)=(.*[^=].*)$")


class CliError(Exception):
    """A usage problem, reported as one line and exit status 2."""


def parse_keys(text: str, *, source: str, separators: str = "\n") -> list[str] | dict[str, str]:
    """Keys from `text`: one per line (or per `separators`), optionally `label=key`.

    Blank lines and lines starting with `#` are skipped. Either every key is
    labelled or none is.
    """
    entries = [e.strip() for e in re.split(f"[{re.escape(separators)}]", text)]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise CliError(f"{source} holds no keys")
    matches = [_LABELLED.match(e) for e in entries]
    labelled = [m for m in matches if m is not None]
    if len(labelled) < len(entries):
        return entries  # bare keys (a key may itself contain '=')
    keys: dict[str, str] = {}
    for match in labelled:
        label, key = match.group(1), match.group(2).strip()
        if label in keys:
            raise CliError(f"{source}: duplicate label {label!r}")
        keys[label] = key
    return keys


def load_keys(args: argparse.Namespace) -> list[str] | dict[str, str]:
    if args.keys_file:
        path = Path(args.keys_file)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise CliError(f"keys file {str(path)!r} not found") from None
        except OSError as exc:
            raise CliError(f"cannot read keys file {str(path)!r}: {exc.strerror}") from None
        return parse_keys(text, source=f"keys file {str(path)!r}")
    value = os.environ.get(args.keys_env)
    if value is None:
        raise CliError(f"environment variable {args.keys_env} is not set")
    return parse_keys(value, source=f"environment variable {args.keys_env}", separators=",\n")


def load_tokens(var: str | None) -> list[str] | None:
    if var is None:
        return None
    value = os.environ.get(var)
    if value is None:
        raise CliError(f"environment variable {var} is not set")
    tokens = [t.strip() for t in re.split(r"[,\n]", value) if t.strip()]
    if not tokens:
        raise CliError(f"environment variable {var} holds no client tokens")
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


def cmd_serve(args: argparse.Namespace) -> int:
    from keyfailover.asgi import FailoverProxy

    uvicorn = _require_uvicorn()
    tokens = load_tokens(args.client_token_env)
    if tokens is None and not is_loopback(args.host) and not args.allow_unauthenticated:
        raise CliError(
            f"refusing to listen on {args.host} without client tokens: "
            "set --client-token-env, or pass --allow-unauthenticated"
        )
    try:
        pool = KeyPool(load_keys(args))
        client = FailoverClient(
            pool, base_url=args.upstream or DEFAULT_UPSTREAMS[args.provider], provider=args.provider
        )
        proxy = FailoverProxy(
            client,
            client_tokens=tokens,
            allow_byok=args.allow_byok,
            max_body_bytes=args.max_body_bytes,
        )
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc)) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("keyfailover").info(
        "forwarding to %s with %d keys (%s)",
        client.base_url,
        len(pool),
        ", ".join(f"{k['label']} {k['hint']}" for k in pool.snapshot()),
    )
    # Everything made so far lives as long as the server: keep it out of the
    # cyclic collector's full passes, which otherwise set the p99 latency.
    gc.freeze()
    uvicorn.run(proxy, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_mock_upstream(args: argparse.Namespace) -> int:
    from keyfailover.testing import MockUpstream

    upstream = MockUpstream(host=args.host, port=args.port)
    if args.scenario:
        try:
            upstream.load_scenario(args.scenario)
        except FileNotFoundError:
            raise CliError(f"scenario file {args.scenario!r} not found") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise CliError(f"bad scenario {args.scenario!r}: {exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with upstream:
        print(f"mock upstream listening on {upstream.url} (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from keyfailover.demo import run_demo

    return run_demo(requests=args.requests, pace=args.pace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyfailover", description="API-key failover for the Anthropic and OpenAI APIs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the failover proxy")
    serve.add_argument("--provider", choices=sorted(DEFAULT_UPSTREAMS), default="anthropic")
    serve.add_argument("--upstream", metavar="URL", help="default: the provider's public API")
    keys = serve.add_mutually_exclusive_group(required=True)
    keys.add_argument("--keys-file", metavar="FILE", help="one key per line, optionally label=key")
    keys.add_argument("--keys-env", metavar="VAR", help="comma- or newline-separated keys")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8787)
    serve.add_argument("--client-token-env", metavar="VAR", help="tokens callers must present")
    serve.add_argument("--allow-byok", action="store_true", help="forward callers' own keys")
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback address without client tokens",
    )
    serve.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, metavar="N")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
    )
    serve.set_defaults(run=cmd_serve)

    mock = commands.add_parser("mock-upstream", help="run the mock upstream for manual testing")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.add_argument("--scenario", metavar="FILE", help="JSON: replies per key, reply queue")
    mock.set_defaults(run=cmd_mock_upstream)

    demo = commands.add_parser("demo", help="see failover at work, on loopback, no real keys")
    demo.add_argument("--requests", type=int, default=20, help="requests to send (default 20)")
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
    return result


if __name__ == "__main__":
    sys.exit(main())
