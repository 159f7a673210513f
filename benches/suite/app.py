"""The apps the servers under test run: `asgi_app`, which the ASGI servers load
(`--app-dir benches suite.app:asgi_app`), and the same proxies on keyfailover's
native server (`python -m suite.app PORT THREADS`, from benches/).

Kept apart from the rest of the suite so the server processes import no more
than the app needs.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from .config import HERE, LIMITED_KEY, OK_KEY, SLOW_KEY, SSE_KEY, TOKEN


def mounts() -> list[tuple[str, str, list[str]]]:
    """(prefix, upstream base URL, keys) of every route, from KFB_FAST and KFB_SLOW."""
    fast, slow = os.environ["KFB_FAST"], os.environ["KFB_SLOW"]
    return [
        ("/anthropic", fast, [OK_KEY]),
        ("/failover", fast, [LIMITED_KEY, OK_KEY]),
        ("/sse", fast + "/sse1000", [SSE_KEY]),
        ("/slow", slow + "/slow", [SLOW_KEY]),
    ]


def proxy(base_url: str, keys: list[str]) -> Any:
    """A FailoverProxy in front of `base_url` with `keys`; KFB_STATE (unset or empty: None;
    "shm"; a Redis URL) and KFB_NAMESPACE are the pool's `state` and `namespace`."""
    from keyfailover import FailoverClient, KeyPool
    from keyfailover.asgi import FailoverProxy

    state = os.environ.get("KFB_STATE") or None
    pool = KeyPool(keys, state=state, namespace=os.environ.get("KFB_NAMESPACE", "default"))
    client = FailoverClient(pool, base_url=base_url)
    return FailoverProxy(client, client_tokens=[TOKEN])


def asgi_app() -> Any:
    """The app every ASGI server runs: FastAPI with one proxy mount per route.

    Environment: KFB_IMPL (keyfailover | python), KFB_FAST and KFB_SLOW (upstream URLs);
    for keyfailover, KFB_STATE (unset or empty: None; "shm"; a Redis URL) and
    KFB_NAMESPACE, the pools' `state` and `namespace`.
    """
    from fastapi import FastAPI

    impl = os.environ["KFB_IMPL"]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for prefix, base_url, keys in mounts():
        if impl == "keyfailover":
            app.mount(prefix, proxy(base_url, keys))
        else:
            sys.path.insert(0, str(HERE))
            from pure_python_proxy import create_app

            app.mount(prefix, create_app(base_url, keys, client_tokens=[TOKEN]))
    # As the README recommends (and `keyfailover serve` does), for every setup alike:
    # objects that live as long as the server stay out of full collections.
    gc.freeze()
    return app


def native_main(port: int, threads: int) -> None:
    """The same proxies, one route each, on keyfailover's native server (what `keyfailover
    serve` runs, with the routes of the ASGI app) with `threads` runtime threads, until
    SIGTERM. No access log, as `serve --log-level warning`."""
    import signal
    import socket

    from keyfailover import _native
    from keyfailover._logging import drop_below_configured_levels
    from keyfailover.cli import raise_open_files_limit

    _native._set_worker_threads(threads)  # before the first pool starts the runtime
    drop_below_configured_levels()  # as `serve` does once it configured logging
    routes = [(prefix, proxy(base_url, keys).gateway) for prefix, base_url, keys in mounts()]
    server = _native.Server(routes, grace=1.0)
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    raise_open_files_limit()
    sock = socket.create_server((os.environ.get("KFB_HOST", "127.0.0.1"), port), backlog=2048)
    gc.freeze()
    server.serve(sock.detach())


if __name__ == "__main__":
    native_main(int(sys.argv[1]), int(sys.argv[2]))
