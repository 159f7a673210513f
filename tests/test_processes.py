"""The client across processes and signals: used before os.fork() it works in the
child (as under gunicorn --preload, multiprocessing's fork and Celery prefork), and
Ctrl-C interrupts a blocking request at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import make_client

from keyfailover.testing import MockUpstream, Reply


def _child_requests(client, queue) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    sync = client.request_sync("POST", "/v1/messages", body=b"{}")

    async def both() -> tuple[int, int]:
        resp = await client.request("POST", "/v1/messages", body=b"{}")
        await resp.read()
        return resp.status, len(client.pool.snapshot())

    queue.put((sync.status, len(sync.read()), asyncio.run(both())))


# Python 3.12+ warns about forking a process that has threads; that is the point here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_client_used_before_fork_works_in_the_child(up: MockUpstream) -> None:
    client, pool = make_client(up, "anthropic", 2)
    up.set_reply(pool.key("key-0").value, Reply.error(429, "rate_limit_error", "x"))
    assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 200
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_requests, args=(client, queue))
    started = time.monotonic()
    child.start()
    child.join(20)
    assert child.exitcode == 0, "the child hung or failed"
    status, size, (async_status, keys) = queue.get(timeout=1)
    assert (status, async_status, keys) == (200, 200, 2)
    assert size > 0
    assert time.monotonic() - started < 10
    # The parent is unaffected, its pool state its own.
    assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 200
    assert pool.key("key-0").state.value == "temporary"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_fork_leaves_the_parents_event_loop_answered(up: MockUpstream, loop: str) -> None:
    """A process whose event loop has requests going forks (multiprocessing's fork
    method, a pre-fork pool): the child shares the parent's epoll instance, so what the
    child does to its inherited loop is done to the parent's. Its at-fork hook took the
    parent's wake-up socket out of that epoll, and every later request of the parent
    hung for good."""
    import asyncio

    import uvloop

    client, _ = make_client(up, "anthropic", 1)

    async def request() -> int:
        resp = await asyncio.wait_for(client.request("POST", "/v1/messages", body=b"{}"), 5)
        await resp.read()
        return resp.status

    async def fork_between_requests() -> list[int]:
        statuses = [await request()]
        pending = asyncio.ensure_future(request())  # in flight across the fork
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        await asyncio.to_thread(os.waitpid, pid, 0)
        statuses += [await pending, await request()]
        return statuses

    run = asyncio.run if loop == "asyncio" else uvloop.run
    assert run(fork_between_requests()) == [200, 200, 200]


def _child_times_out(client, queue) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    status = client.request_sync("POST", "/v1/messages", body=b"{}").status
    queue.put((status, time.monotonic() - started))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_timeout_fires_in_a_child_forked_after_deadlines_were_kept(up: MockUpstream) -> None:
    # Deadlines are kept by a thread of the core's own, which a forked child does not
    # inherit: the child's first deadline must start its own, or a stalled upstream
    # would hold the child's request for good.
    client, _ = make_client(up, "anthropic", 1, timeout=0.3)
    assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 200
    up.enqueue(Reply(stall=10))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_times_out, args=(client, queue))
    child.start()
    child.join(10)
    assert child.exitcode == 0, "the child hung or failed"
    status, took = queue.get(timeout=1)
    assert status == 504
    assert 0.3 <= took < 3
    # The parent's deadlines still fire too.
    up.enqueue(Reply(stall=10))
    started = time.monotonic()
    assert client.request_sync("POST", "/v1/messages", body=b"{}").status == 504
    assert time.monotonic() - started < 3


def test_ctrl_c_interrupts_a_blocking_request_and_drops_it(up: MockUpstream) -> None:
    up.set_reply("sk-ant-slow-key-000000000000000000000", Reply(stall=20))
    script = textwrap.dedent(
        f"""
        import sys, time, keyfailover as kf
        pool = kf.KeyPool(["sk-ant-slow-key-000000000000000000000"])
        client = kf.FailoverClient(pool, base_url={up.url!r}, timeout=20)
        print("ready", flush=True)
        started = time.monotonic()
        try:
            client.request_sync("POST", "/v1/messages", body=b"{{}}")
        except KeyboardInterrupt:
            print(f"interrupted after {{time.monotonic() - started:.3f}}", flush=True)
            sys.exit(0)
        sys.exit(3)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert up.wait_for(lambda u: len(u.requests) == 1, timeout=10)
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        latency = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "interrupted after" in out
    assert latency < 2.0, latency  # well within the 20 s timeout (about 50 ms in practice)
    assert up.wait_for(lambda u: u.requests[0].disconnected, timeout=5), (
        "the upstream request was dropped"
    )
