"""Operating the pool live: `pool.reload`, the admin actions, the probes, and
`keyfailover serve` reloading its keys file (SIGHUP, file change, POST)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import FAKE_KEYS, free_port, run
from test_cli import wait_until_listening

import keyfailover as kf
from keyfailover.testing import MockUpstream, Reply

A, B, C, D = FAKE_KEYS[:4]
BODY = {"model": "m", "max_tokens": 5, "messages": []}


def by_label(pool: kf.KeyPool) -> dict[str, dict]:
    return {k["label"]: k for k in pool.snapshot()}


# --- pool.reload -------------------------------------------------------------


def test_unchanged_keys_keep_their_state_new_keys_start_valid_removed_keys_leave():
    clock = kf.ManualClock()
    pool = kf.KeyPool({"a": A, "b": B, "c": C}, clock=clock)
    pool.key("a").mark_temporary(30)
    pool.key("b").mark_permanent()

    report = pool.reload({"renamed": A, "b": B, "d": D})

    keys = by_label(pool)
    assert list(keys) == ["renamed", "b", "d"]
    assert keys["renamed"]["state"] == "temporary"  # matched by value: state follows
    assert keys["renamed"]["cooldown_remaining"] == pytest.approx(30)
    assert keys["b"]["state"] == "permanent"
    assert keys["d"]["state"] == "valid"
    assert report["relabelled"] == [{"from": "a", "to": "renamed"}]
    assert [k["label"] for k in report["added"]] == ["d"]
    assert [k["label"] for k in report["removed"]] == ["c"]
    assert report["keys"] == 3
    assert "removed c (" in report["summary"]
    for key in FAKE_KEYS:
        assert key not in json.dumps(report)
    with pytest.raises(kf.UnknownKeyError):
        pool.key("c")
    clock.advance(31)
    assert by_label(pool)["renamed"]["state"] == "valid"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "at least one key"),
        ([A, A], "hold the same key"),
        ({"x": A, "y": ""}, "empty"),
        (["sk-ant bad key with spaces"], "whitespace"),
    ],
)
def test_a_bad_reload_raises_and_changes_nothing(keys, message):
    pool = kf.KeyPool({"a": A, "b": B})
    pool.key("b").mark_temporary(60)
    before = pool.snapshot()
    with pytest.raises(kf.ConfigError, match=message) as raised:
        pool.reload(keys)
    assert A not in str(raised.value)
    after = pool.snapshot()
    for snap in (before, after):
        for key in snap:
            key.pop("cooldown_remaining")
    assert after == before


def test_concurrent_requests_walk_the_old_keys_or_the_new_never_a_mix(up: MockUpstream):
    """While the pool flips between two key sets, every request succeeds and the
    keys it tried all come from one set; the first key of each set always answers
    429, so every request tries two keys."""
    old, new = {"o1": A, "o2": B}, {"n1": C, "n2": D}
    for first in (A, C):
        up.set_reply(
            first, Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "0"})
        )
    pool = kf.KeyPool(old)
    client = kf.FailoverClient(pool, base_url=up.url)
    stop = threading.Event()
    tried: list[list[str | None]] = []
    failures: list[str] = []

    def walk() -> None:
        while not stop.is_set():
            response = client.request_sync("POST", "/v1/messages", body=json.dumps(BODY).encode())
            response.read()
            if response.status != 200:
                failures.append(f"status {response.status}")
            tried.append([a["key"] for a in response.attempt_log])  # type: ignore[misc]

    threads = [threading.Thread(target=walk) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(60):
            pool.reload(new if i % 2 == 0 else old)
            for key in pool.snapshot():  # the 429 would cool them for a second
                pool.key(key["label"]).reset()
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures
    assert len(tried) > 20
    mixed = [labels for labels in tried if not (set(labels) <= set(old) or set(labels) <= set(new))]
    assert not mixed
    assert any(set(labels) <= set(new) for labels in tried)
    assert sum(len(labels) == 2 for labels in tried) > 10  # failovers did happen


def test_a_request_on_a_removed_key_finishes_normally(up: MockUpstream):
    async def scenario() -> None:
        events = [
            ("message_start", {"type": "message_start"}),
            ("message_stop", {"type": "message_stop"}),
        ]
        up.enqueue(Reply.sse(events, chunk_delay=0.3))
        pool = kf.KeyPool({"a": A, "b": B})
        client = kf.FailoverClient(pool, base_url=up.url)
        response = await client.request("POST", "/v1/messages", body=json.dumps(BODY).encode())
        assert response.key_label == "a"
        pool.reload({"b": B})
        body = await response.read()
        assert b"message_stop" in body
        assert list(by_label(pool)) == ["b"]
        # The pool goes on with the keys it has now.
        again = await client.request("POST", "/v1/messages", body=json.dumps(BODY).encode())
        await again.read()
        assert again.key_label == "b"
        assert [r.credential for r in up.requests] == [A, B]

    run(scenario())


def test_with_shared_state_reloaded_keys_find_their_state_by_value():
    """Two processes' pools are modelled by two pools on one shm namespace: each
    keeps its own key list, and a key one of them adds arrives with the state the
    other gave it."""
    namespace = f"reload-{os.getpid()}-{time.monotonic_ns()}"
    first = kf.KeyPool({"a": A, "b": B}, state="shm", namespace=namespace)
    second = kf.KeyPool({"c": C}, state="shm", namespace=namespace)
    first.key("b").mark_permanent()
    second.reload({"c": C, "b-here": B})
    assert by_label(second)["b-here"]["state"] == "permanent"
    assert list(by_label(first)) == ["a", "b"]
    second.key("b-here").reset()
    assert by_label(first)["b"]["state"] == "valid"


@pytest.mark.parametrize("spoiled", ["removed", "not UTF-8"])
def test_the_watcher_logs_a_spoiled_keys_file_once_and_keeps_the_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoiled: str
):
    from keyfailover._reload import KeysFileReloader

    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a={A}\n")
    pool = kf.KeyPool({"a": A})
    reloader = KeysFileReloader(keys_file, pool)
    if spoiled == "removed":
        keys_file.unlink()
        why = f"cannot read keys file {str(keys_file)!r}: No such file or directory"
    else:
        keys_file.write_bytes(f"a={A}\nb=".encode() + b"\xff\n")
        why = f"keys file {str(keys_file)!r}: not UTF-8 text (byte {len(A) + 6} of {len(A) + 7})"
    # The core's records of earlier tests (their keys' transitions) reach logging from
    # a drain thread: logged now, and only the reloader's own logger looked at.
    kf._logging.flush()
    with caplog.at_level(logging.INFO, logger="keyfailover"):
        reloader.reload_if_changed()
        reloader.reload_if_changed()  # still as it was: said once
        assert [r.getMessage() for r in caplog.records if r.name == "keyfailover"] == [
            f"not reloading the keys (the file changed): {why}; the old keys stay"
        ]
        assert list(by_label(pool)) == ["a"]
        keys_file.write_text(f"b={B}\n")
        reloader.reload_if_changed()
    assert list(by_label(pool)) == ["b"]


def test_the_watching_thread_outlives_a_reload_that_fails_unexpectedly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Whatever one reload raises, the file is still watched (and the error logged)."""
    from keyfailover._reload import FileWatcher

    path = tmp_path / "watched"
    path.write_text("1")
    reloads: list[str] = []

    class Failing(FileWatcher):
        def files(self) -> list[Path]:
            return [path]

        def _reload(self, why: str) -> None:
            reloads.append(path.read_text())
            if len(reloads) == 1:
                raise RuntimeError("a bug of the first reload")

    watcher = Failing(interval=0.02)
    with caplog.at_level(logging.ERROR, logger="keyfailover"):
        watcher.watch()
        try:
            path.write_text("22")
            deadline = time.monotonic() + 5
            while not reloads and time.monotonic() < deadline:
                time.sleep(0.01)
            path.write_text("three")
            while len(reloads) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            watcher.stop()
    assert reloads == ["22", "three"]
    assert any("reloading failed (RuntimeError: a bug" in r.getMessage() for r in caplog.records)


# --- keyfailover serve --------------------------------------------------------

TOKEN = "client-token-for-tests-0001"
ADMIN = "admin-token-for-tests-0002"


class Serve:
    """`keyfailover serve --keys-file` in a subprocess, with its stderr collected."""

    def __init__(self, up: MockUpstream, keys_file: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keyfailover", "serve", "--upstream", up.url,
             "--keys-file", str(keys_file), "--port", str(self.port),
             "--client-token-env", "T", "--admin-token-env", "ADMIN", *extra],
            env={**os.environ, "T": TOKEN, "ADMIN": ADMIN},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_until_listening(self.port, self.proc)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged in {timeout}s:\n{self.log()}")

    def labels(self, token: str = TOKEN) -> list[str]:
        keys = httpx.get(
            self.url + "/_keyfailover/keys",
            headers={"x-api-key": token, "connection": "close"},
        )
        assert keys.status_code == 200, keys.text
        return [k["label"] for k in keys.json()["keys"]]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.log()


def write_keeping_stamp(path: Path, text: str) -> None:
    """Rewrites the file in place with the same size and mtime, so that only a
    SIGHUP (not the change poll) can notice."""
    stat = path.stat()
    assert len(text.encode()) == stat.st_size
    with path.open("r+") as f:
        f.write(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_serve_reloads_the_keys_file_on_sighup_and_on_change_and_keeps_keys_on_error(
    tmp_path: Path, up: MockUpstream
):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a={A}\nb={B}\n")
    serve = Serve(up, keys_file)
    try:
        assert serve.labels() == ["a", "b"]
        up.set_reply(
            A, Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "600"})
        )
        post = httpx.post(serve.url + "/v1/messages", json=BODY, headers={"x-api-key": TOKEN})
        assert post.status_code == 200

        # SIGHUP: same size and mtime, so only the signal can make it reload.
        write_keeping_stamp(keys_file, f"a={A}\nc={C}\n")
        serve.proc.send_signal(signal.SIGHUP)
        line = serve.wait_for_log("reloaded the keys (SIGHUP)")
        assert "added c (" in line, line
        assert "removed b (" in line, line
        assert serve.labels() == ["a", "c"]
        keys = httpx.get(serve.url + "/_keyfailover/keys", headers={"x-api-key": TOKEN}).json()
        assert keys["keys"][0]["state"] == "temporary"  # a kept its cooldown

        # A file with an error: logged with its line, the keys stay.
        keys_file.write_text(f"a={A}\n{D}\n")
        line = serve.wait_for_log("not reloading the keys (the file changed)")
        assert "line 2" in line, line
        assert serve.labels() == ["a", "c"]

        # A changed file is picked up without a signal.
        keys_file.write_text(f"d={D}\n")
        line = serve.wait_for_log("reloaded the keys (the file changed)", timeout=10)
        assert serve.labels() == ["d"]
        # A removed file is an error too, and loses nothing.
        keys_file.unlink()
        serve.proc.send_signal(signal.SIGHUP)
        line = serve.wait_for_log("not reloading the keys (SIGHUP)")
        assert "cannot read keys file" in line, line
        assert serve.labels() == ["d"]
    finally:
        log = serve.stop()
    for key in (A, B, C, D, TOKEN, ADMIN):
        assert key not in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_storm_of_sighups_leaves_reloading_and_stopping_working(
    tmp_path: Path, up: MockUpstream, workers: str
):
    """Hundreds of SIGHUPs a few ms apart (a handler runs inside the one before it):
    the next edit is still reloaded, and SIGTERM still ends the process in its grace."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a={A}\n")
    serve = Serve(up, keys_file, "--grace", "2", "--workers", workers)
    try:
        if workers == "2":
            serve.wait_for_log("serving on", timeout=15)
        for _ in range(400):
            serve.proc.send_signal(signal.SIGHUP)
            time.sleep(0.001)
        time.sleep(0.5)
        keys_file.write_text(f"a={A}\nb={B}\n")
        serve.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while serve.labels() != ["a", "b"] and time.monotonic() < deadline:
            time.sleep(0.1)
        # Every worker: connections land on either.
        assert [serve.labels() for _ in range(6)] == [["a", "b"]] * 6
    finally:
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        try:
            status = serve.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            status = None
            subprocess.run(["pkill", "-KILL", "-g", str(serve.proc.pid)], check=False)
            serve.proc.kill()
        log = serve.stop()
    assert status == 0, log[-2000:]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stop_signals_at_any_moment_end_in_status_0(tmp_path: Path, up: MockUpstream, workers: str):
    """SIGTERM as soon as the port answers (a worker may not have its handlers yet), then
    more signals while it stops and after it has stopped: a clean exit, every time, and
    no worker left behind."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a={A}\n")
    for _ in range(4):
        serve = Serve(up, keys_file, "--grace", "2", "--workers", workers)
        serve.proc.send_signal(signal.SIGTERM)
        for signum in [signal.SIGHUP, signal.SIGTERM, signal.SIGINT] * 30:
            if serve.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                serve.proc.send_signal(signum)
            time.sleep(0.002)
        try:
            status = serve.proc.wait(timeout=10)
        finally:
            log = serve.stop()
        assert status == 0, log[-2000:]
        # Its workers ran in process groups of their own: none is left.
        assert processes_with(f"--port\0{serve.port}\0") == [], log[-2000:]


def processes_with(text: str) -> list[int]:
    """The processes whose command line holds `text` (arguments joined by NULs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
    return found


def test_serve_admin_actions_reload_and_probes(tmp_path: Path, up: MockUpstream):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a={A}\nb={B}\n")
    serve = Serve(up, keys_file, "--log-format", "json")
    admin = {"authorization": f"Bearer {ADMIN}"}
    try:
        # Probes need no token.
        assert httpx.get(serve.url + "/_keyfailover/livez").status_code == 200
        ready = httpx.get(serve.url + "/_keyfailover/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "keys": {"valid": 2, "temporary": 0, "permanent": 0},
        }

        # Actions: with the admin token or a client token, never without one.
        nobody = httpx.post(serve.url + "/_keyfailover/keys/a/retire")
        assert nobody.status_code == 401
        assert nobody.json()["error"]["type"] == "authentication_error"
        retired = httpx.post(serve.url + "/_keyfailover/keys/a/retire", headers=admin)
        assert retired.status_code == 200, retired.text
        assert retired.json()["key"]["state"] == "permanent"
        record = json.loads(serve.wait_for_log('"action": "retire"'))
        assert record["who"] == "token admi...0002"  # a masked hint, never the token
        assert record["key"] == "a"
        assert "retire key a (" in record["message"]
        by_client = httpx.post(
            serve.url + "/_keyfailover/keys/b/retire", headers={"x-api-key": TOKEN}
        )
        assert by_client.status_code == 200

        # Every key retired: not ready, and health says so with 503.
        unready = httpx.get(serve.url + "/_keyfailover/readyz")
        assert unready.status_code == 503
        assert unready.json()["status"] == "unavailable"
        assert set(unready.json()) == {"status", "keys"}  # counts only, no labels
        health = httpx.get(serve.url + "/_keyfailover/health", headers=admin)
        assert health.status_code == 503

        reset = httpx.post(serve.url + "/_keyfailover/keys/a/reset", headers=admin)
        assert reset.json()["key"]["state"] == "valid"
        assert httpx.get(serve.url + "/_keyfailover/readyz").status_code == 200

        unknown_key = httpx.post(serve.url + "/_keyfailover/keys/zz/reset", headers=admin)
        assert unknown_key.status_code == 404
        assert unknown_key.json()["type"] == "error"  # the provider's envelope

        # POST /reload reads the file again.
        keys_file.write_text(f"a={A}\nc={C}\n")
        reloaded = httpx.post(serve.url + "/_keyfailover/reload", headers=admin)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["keys"] == 2
        assert serve.labels(ADMIN) == ["a", "c"]
        keys_file.write_text(f"a={A}\nb=\n")
        refused = httpx.post(serve.url + "/_keyfailover/reload", headers=admin)
        assert refused.status_code == 400
        assert "line 2: a label with no key" in refused.json()["error"]["message"]
        assert serve.labels(ADMIN) == ["a", "c"]

        # Unknown admin paths and methods.
        missing = httpx.get(serve.url + "/_keyfailover/nope", headers=admin)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
        wrong_method = httpx.delete(serve.url + "/_keyfailover/keys", headers=admin)
        assert wrong_method.status_code == 405
        assert httpx.get(serve.url + "/_keyfailover/reload", headers=admin).status_code == 405
    finally:
        log = serve.stop()
    for secret in (A, B, C, TOKEN, ADMIN):
        assert secret not in log


def test_sighup_reloads_every_worker(tmp_path: Path, up: MockUpstream):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"a={A}\n")
    namespace = f"reload-workers-{os.getpid()}"
    serve = Serve(up, keys_file, "--workers", "2", "--namespace", namespace)
    try:
        deadline = time.monotonic() + 15
        while sum("serving on http" in line for line in serve.lines) < 2:
            assert time.monotonic() < deadline, serve.log()
            time.sleep(0.05)
        write_keeping_stamp(keys_file, f"b={B}\n")
        serve.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while sum("reloaded the keys (SIGHUP)" in line for line in serve.lines) < 2:
            assert time.monotonic() < deadline, serve.log()
            time.sleep(0.05)
        # New connections land on either worker; all of them see the new file.
        assert {tuple(serve.labels()) for _ in range(12)} == {("b",)}
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.log()
