"""Run a proxy on the core's native server on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from keyfailover._native import Gateway, Server

if TYPE_CHECKING:
    from keyfailover.asgi import FailoverProxy


@contextlib.contextmanager
def serve_native(
    proxy: FailoverProxy | Gateway, *, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> Iterator[str]:
    """Serves `proxy` (a `FailoverProxy` or its `Gateway`) with the native server
    that `keyfailover serve` runs, from a background thread; yields its URL.

    `options` go to `keyfailover._native.Server` (`header_timeout`,
    `max_connections`, `max_header_bytes`, `grace`, `http2`, `access_log`).
    On exit the server shuts down (requests in flight get `grace`, default 1 s).
    """
    gateway = proxy if isinstance(proxy, Gateway) else proxy.gateway
    options.setdefault("grace", 1.0)
    server = Server([("", gateway)], **options)
    sock = socket.create_server((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    fd = sock.detach()  # the server's: it closes it when it stops accepting
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.serve(fd)
        except BaseException as exc:  # reported on exit
            failure.append(exc)

    thread = threading.Thread(target=run, name="keyfailover-serve-native", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        thread.join(30)
        if failure:
            raise failure[0]
