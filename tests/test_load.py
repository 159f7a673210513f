"""A bounded load test of the proxy: thousands of requests at high concurrency through
FailoverProxy under uvicorn, on loopback, while MockUpstream answers with random 429s (with
cooldowns of a few milliseconds), 401s, connection resets and streams broken midway.

Each request brings its own faults: before it is sent, the faults of its line of a
pseudo-random schedule are queued at MockUpstream, to be consumed by whichever attempts come
next. Revoked keys are put back in service every 50 ms, so the run goes through
failover, exhaustion and recovery over and over. Checked: no request is lost or truncated,
no 200 is silently cut, every exhaustion says when to retry, and the pool and the client's
counters agree with what the callers saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import h11
import pytest
from conftest import AUTH_FAILED, FAKE_KEYS, RATE_LIMITED, run

import keyfailover as kf
from keyfailover.asgi import FailoverProxy
from keyfailover.testing import MockUpstream, Reply, anthropic_stream_events, serve_asgi

REQUESTS = 5000
CONCURRENCY = 64
KEYS = FAKE_KEYS[:4]
SEED = 20251202
REVIVE_EVERY = 0.05  # seconds between two resets of the revoked keys
MAX_COOLDOWN = 0.05  # the longest retry-after-ms a 429 of the run carries, in seconds
BUDGET = 40.0  # seconds the whole run may take
CALM = 300  # requests at the end that bring no faults: the pool recovers, the queue drains

MESSAGE = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
FINAL_EVENT = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

# --------------------------------------------------------------------------
# The schedule: each request's stream flag and the faults queued before it is sent
# --------------------------------------------------------------------------

REVOKED = Reply.error(401, "authentication_error", "invalid x-api-key")
RESET = Reply(reset_before_head=True)
BROKEN_STREAM = Reply.sse(anthropic_stream_events("one two three"), break_after=3)


def rate_limited(rng: random.Random) -> Reply:
    milliseconds = rng.randint(1, int(MAX_COOLDOWN * 1000))
    return Reply.error(
        429, "rate_limit_error", "slow down", headers={"retry-after-ms": str(milliseconds)}
    )


def fault_kind(reply: Reply) -> str:
    if reply.reset_before_head:
        return "reset"
    return "broken stream" if reply is BROKEN_STREAM else str(reply.status)


@dataclass(frozen=True)
class Plan:
    stream: bool
    faults: tuple[Reply, ...]


def schedule(n: int, seed: int) -> list[Plan]:
    """`n` requests, about half of them streams; the faults of each drawn from this table:

    - 71 %: none;
    - 12 %: a 429; 5 %: a 401; 5 %: a connection reset; 4 %: a stream broken midway;
    - 2 %: a burst of 429s and 1 %: a burst of 401s, one more than there are keys, so
      that the pool runs dry (exhaustion) until cooldowns end or revoked keys are revived.

    That is 0.41 faults a request: fewer than the attempts a request makes, or faults
    would pile up in the queue and no request would get through. The last CALM requests
    bring none.
    """
    rng = random.Random(seed)
    burst = len(KEYS) + 1
    plans = []
    for index in range(n):
        roll = rng.random() if index < n - CALM else 1.0
        faults: list[Reply] = []
        if roll < 0.12:
            faults = [rate_limited(rng)]
        elif roll < 0.17:
            faults = [REVOKED]
        elif roll < 0.22:
            faults = [RESET]
        elif roll < 0.26:
            faults = [BROKEN_STREAM]
        elif roll < 0.28:
            faults = [rate_limited(rng) for _ in range(burst)]
        elif roll < 0.29:
            faults = [REVOKED] * burst
        plans.append(Plan(rng.random() < 0.5, tuple(faults)))
    return plans


# --------------------------------------------------------------------------
# What each caller got
# --------------------------------------------------------------------------

# Outcomes a caller may get; anything else is a failure of the test.
OK_JSON = "200 message"
OK_STREAM = "200 stream"
STREAM_ERROR = "200 stream ending with an error event"
EXHAUSTED = "429 all keys rate-limited"
AUTH_EXHAUSTED = "502 all keys failed authentication"
UPSTREAM_FAILED = "502 upstream request failed"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lowercase; the last value of each
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection to the proxy, parsed strictly by h11: a body cut
    short raises instead of ending. (httpx.AsyncClient manages 64 connections at a tenth of
    the speed, which would make the run about the client.)"""

    def __init__(self, host: str, port: int) -> None:
        self.address = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.h11 = h11.Connection(h11.CLIENT)

    async def post(self, path: str, body: bytes) -> Answer:
        if self.streams is not None and self.h11.states == {
            h11.CLIENT: h11.DONE,
            h11.SERVER: h11.DONE,
        }:
            self.h11.start_next_cycle()  # keep-alive
        else:
            await self.reconnect()
        assert self.streams is not None
        reader, writer = self.streams
        headers = [("host", "proxy"), ("content-type", "application/json")]
        headers.append(("content-length", str(len(body))))
        request = h11.Request(method="POST", target=path, headers=headers)
        writer.write(self.h11.send(request) + self.h11.send(h11.Data(data=body)))
        writer.write(self.h11.send(h11.EndOfMessage()))
        status, received, content = 0, {}, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await reader.read(65536))  # b"" at EOF: h11 raises
            elif isinstance(event, h11.Response):
                status = event.status_code
                received = {n.decode().lower(): v.decode() for n, v in event.headers}
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, received, bytes(content))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before the response")

    async def reconnect(self) -> None:
        await self.close()
        self.streams = await asyncio.open_connection(*self.address)
        self.h11 = h11.Connection(h11.CLIENT)

    async def close(self) -> None:
        if self.streams is not None:
            writer = self.streams[1]
            self.streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def classify(answer: Answer) -> str:
    """The outcome `answer` stands for, or a description of what is wrong with it."""
    text = answer.body.decode()
    if any(key in text or key in str(answer.headers) for key in KEYS):
        return "a pool key in the response"
    status, content_type = answer.status, answer.headers.get("content-type", "")
    if status == 200 and content_type == "text/event-stream":
        if answer.body.endswith(FINAL_EVENT):
            return OK_STREAM
        last = text.rstrip("\n").rpartition("\n\n")[2]
        if last.startswith("event: error\ndata: ") and text.endswith("\n\n"):
            error = json.loads(last.partition("data: ")[2])["error"]
            return STREAM_ERROR if error["type"] == "api_error" else f"error event {error}"
        return f"a stream cut short: ...{text[-120:]!r}"
    if content_type != "application/json":
        return f"{status} with content-type {content_type!r}"
    payload = json.loads(text)
    if status == 200:
        complete = payload.get("type") == "message" and payload["content"][0]["text"]
        return OK_JSON if complete else f"an incomplete message {payload}"
    message = payload["error"]["message"]
    if status == 429 and message == RATE_LIMITED:
        retry_after = answer.headers.get("retry-after", "")
        return EXHAUSTED if retry_after.isdigit() and int(retry_after) >= 1 else "no Retry-After"
    if status == 502 and message == AUTH_FAILED:
        return AUTH_EXHAUSTED
    if status == 502 and message.startswith("upstream request failed"):
        return UPSTREAM_FAILED
    return f"{status} {message!r}"


@dataclass
class Run:
    outcomes: list[str]  # by request
    finished: list[int]  # request indices in the order their responses completed
    revived: int  # revoked keys put back in service
    snapshots: list[list[dict[str, str | float]]]  # the pool's, taken during the run
    seconds: float


async def drive(url: str, up: MockUpstream, pool: kf.KeyPool, plans: list[Plan]) -> Run:
    outcomes = [""] * len(plans)
    finished: list[int] = []
    indices = iter(range(len(plans)))  # shared by the workers
    revived = 0
    snapshots: list[list[dict[str, str | float]]] = []
    done = asyncio.Event()

    async def worker() -> None:
        host, port = url.removeprefix("http://").split(":")
        connection = Connection(host, int(port))
        for i in indices:
            plan = plans[i]
            up.enqueue(*plan.faults)
            body = json.dumps({**MESSAGE, "stream": True} if plan.stream else MESSAGE).encode()
            try:
                answer = await asyncio.wait_for(connection.post("/v1/messages", body), 15)
            except (OSError, h11.ProtocolError, asyncio.TimeoutError) as exc:
                outcomes[i] = f"lost or truncated: {exc!r}"  # never acceptable
                await connection.close()
            else:
                try:
                    outcomes[i] = classify(answer)
                except (ValueError, LookupError) as exc:  # not JSON, or not shaped as it should
                    outcomes[i] = f"unreadable: {exc!r} in {answer}"
            finished.append(i)
        await connection.close()

    async def reviver() -> None:
        nonlocal revived
        labels = [f"key-{i}" for i in range(len(KEYS))]
        while not done.is_set():
            snapshots.append(pool.snapshot())
            for key in map(pool.key, labels):
                if key.state == kf.KeyState.PERMANENT:
                    key.reset()
                    revived += 1
            await asyncio.sleep(REVIVE_EVERY)

    start = time.monotonic()
    revive = asyncio.ensure_future(reviver())
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    done.set()
    await revive
    return Run(outcomes, finished, revived, snapshots, time.monotonic() - start)


@pytest.mark.timeout(120)
def test_load_with_random_faults(up: MockUpstream) -> None:
    pool = kf.KeyPool(KEYS)  # the real clock: cooldowns of a few milliseconds end
    client = kf.FailoverClient(pool, base_url=up.url, timeout=10)
    plans = schedule(REQUESTS, SEED)
    with serve_asgi(FailoverProxy(client)) as url:
        result = run(drive(url, up, pool, plans))
    outcomes = Counter(result.outcomes)
    summary = f"{dict(outcomes)}, {result.revived} revived, {result.seconds:.1f} s"

    # Every request got a complete, acceptable answer.
    allowed = {OK_JSON, OK_STREAM, STREAM_ERROR, EXHAUSTED, AUTH_EXHAUSTED, UPSTREAM_FAILED}
    assert set(outcomes) <= allowed, summary
    assert sorted(result.finished) == list(range(REQUESTS))
    assert result.seconds < BUDGET, summary

    # The run went through failover, exhaustion and recovery.
    stats = client.stats()
    for outcome in allowed:
        assert outcomes[outcome] > 0, f"never {outcome}: {summary}"
    assert stats["rate_limited"] > 0, stats
    assert stats["revoked"] > 0, stats
    assert result.revived > 0
    # ... and recovered: the calm end of the schedule is served.
    last = [result.outcomes[i] for i in result.finished[-CALM // 4 :]]
    assert set(last) <= {OK_JSON, OK_STREAM}, Counter(last)

    # The client's counters agree with what the callers saw, and with what upstream saw.
    successes = outcomes[OK_JSON] + outcomes[OK_STREAM] + outcomes[STREAM_ERROR]
    assert stats["requests"] == REQUESTS
    assert stats["byok"] == 0
    assert stats["exhausted_transient"] == outcomes[EXHAUSTED]
    assert stats["exhausted_permanent"] == outcomes[AUTH_EXHAUSTED]
    assert stats["upstream_errors"] == outcomes[UPSTREAM_FAILED]
    assert stats["attempts"] == len(up.requests), "every attempt reached upstream once"
    # Each attempt ended in a success, a key failure or a broken connection.
    key_failures = stats["rate_limited"] + stats["quota_exhausted"] + stats["revoked"]
    assert stats["attempts"] == successes + key_failures + stats["upstream_errors"]
    exhaustions = outcomes[EXHAUSTED] + outcomes[AUTH_EXHAUSTED]
    assert stats["attempts"] >= REQUESTS - exhaustions
    assert stats["quota_exhausted"] == 0
    # The calm end drained the queue: every fault queued was met once, and counted.
    queued = Counter(fault_kind(reply) for plan in plans for reply in plan.faults)
    assert stats["rate_limited"] == queued["429"]
    assert stats["revoked"] == queued["401"]
    assert stats["upstream_errors"] == queued["reset"]
    assert outcomes[STREAM_ERROR] == queued["broken stream"]

    # The pool was consistent all along: every key in one state, with a cooldown when
    # (and only when) cooling down, and no longer than upstream asked.
    snapshots = [*result.snapshots, pool.snapshot()]
    labels = [f"key-{i}" for i in range(len(KEYS))]
    for snapshot in snapshots:
        assert [key["label"] for key in snapshot] == labels
        for key in snapshot:
            assert key["state"] in ("valid", "temporary", "permanent"), key
            cooldown = key["cooldown_remaining"]
            assert isinstance(cooldown, float)
            assert 0.0 <= cooldown <= MAX_COOLDOWN, key
            assert (cooldown > 0) is (key["state"] == "temporary"), key
    seen = Counter(str(key["state"]) for snapshot in snapshots for key in snapshot)
    assert seen["temporary"] > 0, seen
    assert seen["permanent"] > 0, seen
    health = pool.health()
    states = Counter(str(key["state"]) for key in pool.snapshot())
    assert health["keys"] == {s: states[s] for s in ("valid", "temporary", "permanent")}

    # Once the cooldowns are over and the revoked keys are back, the pool serves again.
    time.sleep(MAX_COOLDOWN)
    for key in map(pool.key, labels):
        if key.state == kf.KeyState.PERMANENT:
            key.reset()
    assert [key["state"] for key in pool.snapshot()] == ["valid"] * len(KEYS)
    resp = client.request_sync("POST", "/v1/messages", body=json.dumps(MESSAGE))
    assert (resp.status, resp.attempts, resp.key_label) == (200, 1, "key-0")
