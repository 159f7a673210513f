"""The ASGI app the servers under test load: `--app-dir benches suite.app:asgi_app`.

Kept apart from the rest of the suite so the server processes import no more
than the app needs.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from .config import HERE, LIMITED_KEY, OK_KEY, SLOW_KEY, SSE_KEY, TOKEN


def asgi_app() -> Any:
    """The app every ASGI server runs: FastAPI with one proxy mount per route.

    Environment: KFB_IMPL (keyfailover | python), KFB_FAST and KFB_SLOW (upstream URLs);
    for keyfailover, KFB_STATE (unset or empty: None; "shm"; a Redis URL) and
    KFB_NAMESPACE, the pools' `state` and `namespace`.
    """
    from fastapi import FastAPI

    impl, fast, slow = os.environ["KFB_IMPL"], os.environ["KFB_FAST"], os.environ["KFB_SLOW"]
    state = os.environ.get("KFB_STATE") or None
    namespace = os.environ.get("KFB_NAMESPACE", "default")
    mounts = [
        ("/anthropic", fast, [OK_KEY]),
        ("/failover", fast, [LIMITED_KEY, OK_KEY]),
        ("/sse", fast + "/sse1000", [SSE_KEY]),
        ("/slow", slow + "/slow", [SLOW_KEY]),
    ]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for prefix, base_url, keys in mounts:
        if impl == "keyfailover":
            from keyfailover import FailoverClient, KeyPool
            from keyfailover.asgi import FailoverProxy

            pool = KeyPool(keys, state=state, namespace=namespace)
            client = FailoverClient(pool, base_url=base_url)
            app.mount(prefix, FailoverProxy(client, client_tokens=[TOKEN]))
        else:
            sys.path.insert(0, str(HERE))
            from pure_python_proxy import create_app

            app.mount(prefix, create_app(base_url, keys, client_tokens=[TOKEN]))
    # As the README recommends (and `keyfailover serve` does), for every setup alike:
    # objects that live as long as the server stay out of full collections.
    gc.freeze()
    return app
