"""A FastAPI service mounting one Anthropic and one OpenAI failover proxy.

Run it (keys comma-separated; callers authenticate with a client token):

    ANTHROPIC_KEYS=sk-ant-...,sk-ant-... OPENAI_KEYS=sk-...,sk-... KF_TOKENS=my-token \\
        uvicorn --factory examples.fastapi_app:from_env

then point the SDKs at the mounts, with the client token as their API key:

    anthropic.Anthropic(base_url="http://127.0.0.1:8000/anthropic", api_key="my-token")
    openai.OpenAI(base_url="http://127.0.0.1:8000/openai/v1", api_key="my-token")
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from keyfailover import FailoverClient, KeyPool
from keyfailover.asgi import FailoverProxy


def create_app(
    anthropic_keys: list[str],
    openai_keys: list[str],
    *,
    anthropic_url: str = "https://api.anthropic.com",
    openai_url: str = "https://api.openai.com",
    client_tokens: list[str] | None = None,
) -> FastAPI:
    anthropic = FailoverClient(KeyPool(anthropic_keys), base_url=anthropic_url)
    openai = FailoverClient(KeyPool(openai_keys), base_url=openai_url, provider="openai")

    app = FastAPI(title="LLM gateway with key failover")
    app.mount("/anthropic", FailoverProxy(anthropic, client_tokens=client_tokens))
    app.mount("/openai", FailoverProxy(openai, client_tokens=client_tokens))

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        return {"anthropic": anthropic.pool.health(), "openai": openai.pool.health()}

    return app


def _list(var: str) -> list[str]:
    return [item.strip() for item in os.environ.get(var, "").split(",") if item.strip()]


def from_env() -> FastAPI:
    """The app configured from ANTHROPIC_KEYS, OPENAI_KEYS and KF_TOKENS."""
    return create_app(
        _list("ANTHROPIC_KEYS"), _list("OPENAI_KEYS"), client_tokens=_list("KF_TOKENS") or None
    )
