"""Run an ASGI app under uvicorn on loopback, for end-to-end tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def serve_asgi(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, http: str = "auto"
) -> Iterator[str]:
    """Runs an ASGI app under uvicorn in a background thread; yields its URL.

    For end-to-end tests of a `FailoverProxy` (or a FastAPI app mounting one)
    with a real HTTP server on loopback. Needs uvicorn (the `server` extra).
    `http` picks uvicorn's HTTP implementation: "h11", "httptools", or "auto"
    (httptools when installed).
    """
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="auto", http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="keyfailover-serve-asgi", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.005)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(10)
