"""A process holding a KeyPool with shared state, driven by JSON lines on stdin
(one answer per line on stdout), for the multi-process tests.

    python shared_worker.py STATE NAMESPACE KEY [KEY ...]

Commands: {"op": "cool", "label": ..., "seconds": ...}, {"op": "retire", ...},
{"op": "reset", ...}, {"op": "snapshot"}, {"op": "status"}, {"op": "walk"},
{"op": "wait", "label": ..., "state": ..., "timeout": ...}, {"op": "exhaustion"} (the
class of the walker's exception, or null), {"op": "request"} (a chat request through a
FailoverClient: its status and error message).

With KF_WORKER_ENDPOINT set, every key has that URL as its own endpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time

import keyfailover as kf


def main() -> None:
    state, namespace, *keys = sys.argv[1:]
    endpoint = os.environ.get("KF_WORKER_ENDPOINT")
    spec: list[str] | dict[str, kf.Key] = keys
    if endpoint:
        spec = {f"key-{i}": kf.Key(value, base_url=endpoint) for i, value in enumerate(keys)}
    pool = kf.KeyPool(spec, state=None if state == "local" else state, namespace=namespace)
    client = kf.FailoverClient(pool, base_url=endpoint or "http://127.0.0.1:9", provider="openai")
    print(json.dumps({"ready": pool.state_backend}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        answer: object = None
        if op == "cool":
            answer = pool.key(command["label"]).mark_temporary(command["seconds"])
        elif op == "retire":
            answer = pool.key(command["label"]).mark_permanent()
        elif op == "reset":
            pool.key(command["label"]).reset()
        elif op == "snapshot":
            answer = pool.snapshot()
        elif op == "status":
            answer = pool.sync_status()
        elif op == "walk":
            walker, labels = pool.walker(), []
            try:
                while True:
                    labels.append(walker.next().label)
            except kf.PoolExhausted:
                pass
            answer = labels
        elif op == "exhaustion":
            try:
                pool.walker().next()
            except kf.PoolExhausted as exc:
                answer = type(exc).__name__
        elif op == "request":
            body = b'{"model": "m", "messages": []}'
            resp = client.request_sync("POST", "/v1/chat/completions", body=body)
            answer = [resp.status, json.loads(resp.read())["error"]["message"]]
        elif op == "wait":
            deadline = time.monotonic() + command["timeout"]
            key = pool.key(command["label"])
            while key.state.value != command["state"] and time.monotonic() < deadline:
                time.sleep(0.002)
            answer = key.state.value == command["state"]
        print(json.dumps({"answer": answer}), flush=True)


if __name__ == "__main__":
    main()
