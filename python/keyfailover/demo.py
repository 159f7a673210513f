"""`keyfailover demo`: failover at work, self-contained on loopback, no real keys.

A mock Anthropic upstream knows three keys: key-0 is rate-limited (429 with
Retry-After: 2), key-1 is revoked (401), key-2 is healthy. A FailoverProxy
in front of them takes about 20 blocking and streaming requests from the
official `anthropic` SDK (plain HTTP when the SDK is not installed), then
key-2 is rate-limited too and the next request finds the pool exhausted.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Protocol

from keyfailover._native import FailoverClient, KeyPool

KEYS = {
    "key-0": "sk-ant-demo-" + "0" * 24 + "k0rl",
    "key-1": "sk-ant-demo-" + "1" * 24 + "k1rv",
    "key-2": "sk-ant-demo-" + "2" * 24 + "k2ok",
}
MODEL = "claude-demo"
PROMPT = [{"role": "user", "content": "Say hello."}]


class Driver(Protocol):
    name: str

    def blocking(self) -> str: ...
    def streaming(self) -> str: ...
    def expect_rate_limited(self) -> str | None:
        """Sends one request expecting 429; returns its Retry-After."""


class SdkDriver:
    """Requests through the official anthropic SDK."""

    name = "the anthropic SDK"

    def __init__(self, url: str, token: str) -> None:
        import anthropic

        self._anthropic = anthropic
        self._client = anthropic.Anthropic(base_url=url, api_key=token, max_retries=0)

    def blocking(self) -> str:
        message = self._client.messages.create(model=MODEL, max_tokens=32, messages=PROMPT)  # type: ignore[arg-type]
        return "".join(block.text for block in message.content if block.type == "text")

    def streaming(self) -> str:
        with self._client.messages.stream(model=MODEL, max_tokens=32, messages=PROMPT) as stream:  # type: ignore[arg-type]
            return "".join(stream.text_stream)

    def expect_rate_limited(self) -> str | None:
        try:
            self.blocking()
        except self._anthropic.RateLimitError as exc:
            return exc.response.headers.get("retry-after")
        raise AssertionError("expected a 429 from the exhausted pool")

    def close(self) -> None:
        self._client.close()


class HttpDriver:
    """Requests with the standard library, when the SDK is not installed."""

    name = "plain HTTP (pip install anthropic to use the SDK)"

    def __init__(self, url: str, token: str) -> None:
        self._url = url + "/v1/messages"
        self._headers = {
            "content-type": "application/json",
            "x-api-key": token,
            "anthropic-version": "2023-06-01",
        }

    def _post(self, stream: bool) -> Any:
        body = json.dumps({"model": MODEL, "max_tokens": 32, "messages": PROMPT, "stream": stream})
        request = urllib.request.Request(self._url, body.encode(), self._headers, method="POST")
        return urllib.request.urlopen(request, timeout=10)

    def blocking(self) -> str:
        with self._post(stream=False) as resp:
            content = json.load(resp)["content"]
        return "".join(block.get("text", "") for block in content)

    def streaming(self) -> str:
        text = []
        with self._post(stream=True) as resp:
            for line in resp:
                if line.startswith(b"data: "):
                    delta = json.loads(line[6:]).get("delta", {})
                    text.append(delta.get("text", ""))
        return "".join(text)

    def expect_rate_limited(self) -> str | None:
        try:
            self._post(stream=False).close()
        except urllib.error.HTTPError as exc:
            if exc.code == 429:
                return exc.headers.get("retry-after")
            raise
        raise AssertionError("expected a 429 from the exhausted pool")

    def close(self) -> None:
        pass


def key_states(pool: KeyPool) -> str:
    cells = []
    for key in pool.snapshot():
        state = key["state"]
        if state == "temporary":
            cells.append(f"{key['label']} cooling {key['cooldown_remaining']:4.1f}s")
        else:
            cells.append(f"{key['label']} {'revoked' if state == 'permanent' else 'ok'}")
    return " | ".join(f"{c:<19}" for c in cells)


def run_demo(requests: int = 20, pace: float = 0.15, out: Any = None) -> int:
    from keyfailover.asgi import FailoverProxy
    from keyfailover.testing import MockUpstream, Reply, serve_native

    out = out or sys.stdout
    label_of = {value: label for label, value in KEYS.items()}
    started = time.monotonic()
    with MockUpstream() as upstream:
        upstream.set_reply(
            KEYS["key-0"],
            Reply.error(429, "rate_limit_error", "rate limited", headers={"retry-after": "2"}),
        )
        upstream.set_reply(
            KEYS["key-1"], Reply.error(401, "authentication_error", "invalid x-api-key")
        )
        pool = KeyPool(KEYS)
        client = FailoverClient(pool, base_url=upstream.url)
        token = "kf-demo-" + secrets.token_hex(8)
        with serve_native(FailoverProxy(client, client_tokens=[token])) as url:
            try:
                driver: Any = SdkDriver(url, token)
            except ImportError:
                driver = HttpDriver(url, token)
            print(f"keyfailover demo: mock upstream {upstream.url}, proxy {url}", file=out)
            print(f"{requests} requests through {driver.name}\n", file=out)
            print(
                f"{'#':>3}  {'request':<9} {'attempts':>8}  {'served by':<9}  key states", file=out
            )
            failures = 0
            for i in range(1, requests + 1):
                kind = "stream" if i % 2 == 0 else "blocking"
                before = client.stats()["attempts"]
                try:
                    text = driver.streaming() if kind == "stream" else driver.blocking()
                    ok = text == "Hello from mock"
                except Exception as exc:  # shown in the table, counted as a failure
                    text, ok = f"{type(exc).__name__}", False
                failures += not ok
                attempts = client.stats()["attempts"] - before
                credential = upstream.requests[-1].credential if upstream.requests else None
                served = label_of.get(credential or "", "-") if ok else text
                print(
                    f"{i:>3}  {kind:<9} {attempts:>8}  {served:<9}  {key_states(pool)}",
                    file=out,
                    flush=True,
                )
                time.sleep(pace)

            print("\nkey-2 is now rate-limited as well (Retry-After: 10)", file=out)
            upstream.set_reply(
                KEYS["key-2"],
                Reply.error(429, "rate_limit_error", "rate limited", headers={"retry-after": "10"}),
            )
            retry_after = driver.expect_rate_limited()
            driver.close()
            print(f"pool exhausted: answered 429 with Retry-After: {retry_after}", file=out)
            print(f"key states: {key_states(pool)}", file=out)

        stats = client.stats()
        print("\nsummary", file=out)
        print(f"  requests        {stats['requests']:>4}", file=out)
        print(f"  attempts        {stats['attempts']:>4}", file=out)
        print("  failovers", file=out)
        print(f"    rate-limited  {stats['rate_limited']:>4}", file=out)
        print(f"    revoked       {stats['revoked']:>4}", file=out)
        print(f"    out of quota  {stats['quota_exhausted']:>4}", file=out)
        print(f"  exhausted (429) {stats['exhausted_transient']:>4}", file=out)
        print(f"  failed requests {failures:>4}", file=out)
        print(f"  took {time.monotonic() - started:.1f} s", file=out)
    return 1 if failures or retry_after is None else 0
