"""The `keyfailover` command: argument errors, serve, mock-upstream, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FAKE_KEYS, free_port

import keyfailover as kf
from keyfailover import _serve, cli
from keyfailover.testing import MockUpstream, Reply

KEY_A, KEY_B = FAKE_KEYS[:2]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "keyfailover", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_until_listening(port: int, proc: subprocess.Popen[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{KEY_A}\n{KEY_B}\n", [KEY_A, KEY_B]),
        (f"# team keys\n\nprod={KEY_A}\nbackup={KEY_B}\n", {"prod": KEY_A, "backup": KEY_B}),
        ("c2stYmFzZTY0a2V5==\nc2stb3RoZXI=\n", ["c2stYmFzZTY0a2V5==", "c2stb3RoZXI="]),
        (f"  {KEY_A}  \n", [KEY_A]),
    ],
)
def test_keys_file_format(text, expected):
    assert cli.parse_keys(text, source="test") == expected


def test_keys_env_is_comma_or_newline_separated():
    assert cli.parse_keys(f"{KEY_A}, {KEY_B}\n", source="x", separators=",\n") == [KEY_A, KEY_B]


def serve_args(*extra: str) -> list[str]:
    return ["serve", "--upstream", "http://127.0.0.1:9", *extra]


def keys_env(value: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    return serve_args("--keys-env", "KF_TEST_KEYS", *extra), {"KF_TEST_KEYS": value}


ARGUMENT_ERRORS = [
    (
        (serve_args("--keys-file", "/nonexistent/keys.txt"), {}),
        "keys file '/nonexistent/keys.txt' not found",
    ),
    (keys_env(" , \n"), "environment variable KF_TEST_KEYS holds no keys"),
    ((serve_args("--keys-env", "KF_UNSET"), {}), "environment variable KF_UNSET is not set"),
    (keys_env(f"{KEY_A},{KEY_A}"), "key-0 and key-1 hold the same key"),
    (
        keys_env(KEY_A, "--host", "0.0.0.0"),
        "refusing to listen on 0.0.0.0 without client tokens",
    ),
    (keys_env(KEY_A, "--client-token-env", "KF_UNSET"), "environment variable KF_UNSET is not set"),
    (keys_env(KEY_A, "--upstream", "ftp://x"), "must be an http or https URL"),
    # A key given where a variable's name belongs is not printed.
    ((serve_args("--keys-env", KEY_A), {}), "--keys-env: is not an environment variable's name"),
    (keys_env(KEY_B, "--client-token-env", KEY_A), "is not an environment variable's name"),
]


ARGUMENT_ERRORS += [
    ((serve_args("--keys-env", "K", "--port", "99999"), {"K": KEY_A}), "is not a port"),
    ((serve_args("--keys-env", "K", "--timeout", "0"), {"K": KEY_A}), "number of seconds"),
    (
        (serve_args("--keys-env", "K", "--limit-concurrency", "-3"), {"K": KEY_A}),
        "is not a whole number from 1",
    ),
    # Out of range for the server: refused by the parser, not by the server once started.
    ((serve_args("--keys-env", "K", "--grace", "1e300"), {"K": KEY_A}), "from 0.001 to 1e+09"),
    (
        (serve_args("--keys-env", "K", "--header-timeout", "1e-300"), {"K": KEY_A}),
        "from 0.001 to 1e+09",
    ),
    (
        (serve_args("--keys-env", "K", "--limit-concurrency", "9" * 23), {"K": KEY_A}),
        "is not a whole number from 1 to 1,000,000",
    ),
    (
        (serve_args("--keys-env", "K", "--max-body-bytes", "9" * 20), {"K": KEY_A}),
        "is not a number of bytes from 0 to 2**53",
    ),
    (
        (serve_args("--keys-env", "K", "--workers", "100000"), {"K": KEY_A}),
        "is not a whole number from 1 to 1,024",
    ),
    # A key given in the wrong place is quoted as its hint, never whole.
    *[
        ((serve_args("--keys-env", "K", option, KEY_B), {"K": KEY_A}), message)
        for option, message in [
            ("--upstream", f'base_url "{KEY_B[:4]}...{KEY_B[-4:]}" is not a URL'),
            ("--provider", f"invalid choice: '{KEY_B[:4]}...{KEY_B[-4:]}'"),
            ("--port", "is not a port"),
            ("--grace", "is not a number of seconds"),
            ("--workers", "is not a whole number"),
        ]
    ],
    ((serve_args("--keys-file", KEY_A), {}), f"keys file '{KEY_A[:4]}...{KEY_A[-4:]}' not found"),
    (
        (serve_args("--keys-env", "K", "--namespace", f"{KEY_B} x"), {"K": KEY_A}),
        f'namespace "{KEY_B[:4]}...{KEY_B[-4:]} x" must be a non-empty name',
    ),
    (
        (serve_args("--keys-env", "gsk_" + KEY_B.replace("-", "_")), {}),
        "--keys-env: is not an environment variable's name",
    ),
    ((["serve", "--config", KEY_A], {}), f"{KEY_A[:4]}...{KEY_A[-4:]}: cannot read it"),
    # A label that is a key would be shown wherever labels are.
    (
        keys_env(f"{KEY_A}={KEY_B},b={KEY_A}"),
        "the label of the pool's key number 1 holds one of its keys",
    ),
    (keys_env(f"prod:east={KEY_A}"), "entry 1: a label of other characters"),
    (keys_env("c=,d="), "entry 1: a label with no key after its `=`"),
    (
        keys_env(f"a={KEY_A},{KEY_B}"),
        "environment variable KF_TEST_KEYS, entry 2: a bare key among labelled ones",
    ),
]


@pytest.mark.parametrize(("command", "message"), ARGUMENT_ERRORS)
def test_serve_argument_errors_are_one_line(command, message):
    args, env = command
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keyfailover serve: error: ")
    assert message in lines[0]
    assert KEY_A not in result.stderr
    assert KEY_B not in result.stderr


def test_a_key_as_an_extra_argument_is_not_echoed():
    result = run_cli(*serve_args("--keys-env", "K", KEY_B, f"--api-key={KEY_B}"), env={"K": KEY_A})
    assert result.returncode == 2
    hint = f"{KEY_B[:4]}...{KEY_B[-4:]}"
    assert f"error: unrecognized arguments: {hint} --api-key={hint}" in result.stderr
    assert KEY_B not in result.stderr


def test_a_keys_file_that_is_not_utf8_is_one_line(tmp_path: Path):
    keys = tmp_path / "keys.txt"
    keys.write_bytes(f"a={KEY_A}\nb=".encode() + b"\xff\xfe\n")
    result = run_cli(*serve_args("--keys-file", str(keys)))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"keyfailover serve: error: keys file {str(keys)!r}: not UTF-8 text (byte {len(KEY_A) + 6}"
        f" of {len(KEY_A) + 8})"
    )


def test_serve_needs_a_keys_source():
    result = run_cli("serve")
    assert result.returncode == 2
    assert "one of the arguments --keys-file --keys-env --config is required" in result.stderr


def test_serve_without_uvicorn_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.setenv("KF_TEST_KEYS", KEY_A)
    assert cli.main(serve_args("--keys-env", "KF_TEST_KEYS", "--server", "uvicorn")) == 2
    assert 'pip install "keyfailover[server]"' in capsys.readouterr().err


def test_serve_allows_non_loopback_when_told(monkeypatch):
    started = {}
    monkeypatch.setenv("KF_TEST_KEYS", KEY_A)
    monkeypatch.setattr(
        _serve, "run_native", lambda proxy, sock, args: started.update(app=proxy, sock=sock)
    )
    args = serve_args(
        "--keys-env", "KF_TEST_KEYS", "--host", "0.0.0.0", "--allow-unauthenticated", "--port", "0"
    )
    assert cli.main(args) == 0
    with started["sock"]:
        assert started["sock"].getsockname()[0] == "0.0.0.0"
    assert "no client tokens" in repr(started["app"])


def test_serve_proxies_with_failover(tmp_path: Path, up: MockUpstream):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"first={KEY_A}\nsecond={KEY_B}\n")
    port = free_port()
    up.set_reply(KEY_A, Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "9"}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--upstream", up.url,
         "--keys-file", str(keys_file), "--port", str(port), "--client-token-env", "KF_T",
         "--log-level", "info"],
        env={**os.environ, "KF_T": "caller-token"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until_listening(port, proc)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"x-api-key": "caller-token"}) as http:
            resp = http.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": []})
            assert resp.status_code == 200
            assert resp.json()["content"][0]["text"] == "Hello from mock"
            keys = http.get("/_keyfailover/keys").json()["keys"]
        assert [(k["label"], k["state"]) for k in keys] == [
            ("first", "temporary"),
            ("second", "valid"),
        ]
        assert [r.credential for r in up.requests] == [KEY_A, KEY_B]
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert "first sk-a...0000" in err, err
    assert re.search(r"POST /v1/messages -> 200 \(attempts=2, key=second, [\d.]+ ms\)", err), err
    assert KEY_A not in err
    assert KEY_B not in err


def test_mock_upstream_command(tmp_path: Path):
    scenario = tmp_path / "scenario.json"
    revoked = {"status": 401, "error": {"type": "authentication_error", "message": "no"}}
    scenario.write_text(json.dumps({"replies": {"bad-key": revoked}}))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "mock-upstream", "--port", str(port),
         "--scenario", str(scenario)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until_listening(port, proc)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "bad-key"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "good"}).status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert f"mock upstream listening on {url}" in out


def test_mock_upstream_bad_scenario(tmp_path: Path):
    missing = run_cli("mock-upstream", "--port", "0", "--scenario", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert "scenario file" in missing.stderr
    assert "not found" in missing.stderr

    scenario = tmp_path / "x.json"
    scenario.write_text(json.dumps({"replies": {"sk-x": {"error": {"type": "api_error"}}}}))
    bad = run_cli("mock-upstream", "--port", "0", "--scenario", str(scenario))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"keyfailover mock-upstream: error: bad scenario {str(scenario)!r}: "
        'replies["sk-x"].error.message: required for an error reply'
    ]


def test_demo_runs_and_exits_zero():
    started = time.monotonic()
    result = run_cli("demo", "--pace", "0.05", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    out = result.stdout
    assert "20 requests through the anthropic SDK" in out
    assert "pool exhausted: answered 429 with Retry-After:" in out
    assert "failed requests    0" in out
    assert "sk-ant-demo" not in out


def test_module_and_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "mock-upstream", "demo"):
        assert command in result.stdout


def test_a_keys_file_mixing_labelled_and_bare_keys_names_the_line(tmp_path: Path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# team\na={KEY_A}\n{KEY_B}\n")
    result = run_cli(*serve_args("--keys-file", str(keys_file)))
    assert result.returncode == 2
    assert f"keys file '{keys_file}', line 3: a bare key among labelled ones" in result.stderr
    assert KEY_A not in result.stderr
    assert KEY_B not in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"keyfailover {kf.__version__}"


def test_a_port_in_use_is_one_line_and_exit_status_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        mock = run_cli("mock-upstream", "--port", port)
        serve = run_cli(*serve_args("--keys-env", "K", "--port", port), env={"K": KEY_A})
    for result, command in [(mock, "mock-upstream"), (serve, "serve")]:
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        assert lines == [f"keyfailover {command}: error: cannot listen on 127.0.0.1:{port}: "
                         "Address already in use"], result.stderr  # fmt: skip
        assert "Traceback" not in result.stderr


def start_serve(
    up: MockUpstream, *extra: str, keys: str = KEY_A, **env: str
) -> tuple[subprocess.Popen[str], str]:
    """`keyfailover serve` in front of `up` with `keys` (comma-separated), listening."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--upstream", up.url,
         "--keys-env", "K", "--port", str(port), *extra],
        env={**os.environ, **env, "K": keys},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_until_listening(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def test_serve_logs_one_key_in_the_singular(up: MockUpstream):
    proc, _ = start_serve(up)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert "with 1 key (" in err, err


@pytest.mark.parametrize("server", ["native", "uvicorn"])
def test_an_open_dashboard_does_not_hold_the_stop(up: MockUpstream, server: str):
    """SIGTERM with a dashboard's event stream open: the stream ends at once with an error
    event saying why, and the process exits without waiting out its grace period."""
    proc, url = start_serve(up, "--server", server, "--grace", "5", "--allow-unauthenticated")
    try:
        with httpx.stream("GET", url + "/_keyfailover/events", timeout=10) as stream:
            texts = stream.iter_text()
            assert next(texts).startswith("event: state")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = "".join(texts)  # to its end: a cut would raise
        last = rest.strip().split("\n\n")[-1]
        assert last.startswith("event: error"), rest[-300:]
        assert "the server is shutting down" in last
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 3, "not the 5 s of grace"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("server", ["native", "uvicorn"])
def test_no_log_line_shows_a_key_in_a_query_or_path(up: MockUpstream, server: str):
    """A Gemini caller's ?key= and a key named in a path never reach the logs: the access
    lines drop the query and mask pool keys, and uvicorn's own access log is off."""
    proc, url = start_serve(up, "--server", server, "--log-level", "debug")
    try:
        httpx.get(url + "/v1/models?key=AIzaSy-caller-query-secret")
        httpx.post(url + f"/_keyfailover/keys/{KEY_A}/retire")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert "GET /v1/models -> 200" in err
    assert "caller-query-secret" not in err
    assert KEY_A not in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_with_keys_from_the_environment_is_logged_and_ignored(
    up: MockUpstream, workers: str
):
    proc, url = start_serve(up, "--workers", workers)
    try:
        # A worker that answers has set up its signals (the server's own loop).
        assert httpx.get(url + "/_keyfailover/livez").status_code == 200
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None
        response = httpx.post(url + "/v1/messages", json={"model": "m", "messages": []})
        assert response.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGHUP: nothing to reload: keys come from environment variable K" in err
    assert "exited with status" not in err


@pytest.mark.parametrize("server", ["native", "uvicorn"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_sigterm_ends_in_flight_requests_with_proper_errors_after_the_grace_period(
    up: MockUpstream, server: str, signum: int, twice: bool
):
    """A request waiting on a stalled upstream gets 503, a stalled stream an error
    event, and the process exits 0 soon after --grace: on either server, for either
    signal, and when it comes twice (a Ctrl-C pressed again, on which uvicorn alone
    quits at once, cutting the streams)."""
    import threading

    up.enqueue(Reply(stall=30))
    events = [("message_start", {"type": "message_start"}), ("message_stop", {})]
    up.enqueue(Reply.sse(events, chunk_delay=30))
    proc, url = start_serve(up, "--grace", "1", "--server", server)
    results: dict[str, httpx.Response] = {}

    def call(name: str, stream: bool) -> None:
        body = {"model": "m", "max_tokens": 5, "messages": [], "stream": stream}
        results[name] = httpx.post(url + "/v1/messages", json=body, timeout=30)

    threads = [
        threading.Thread(target=call, args=("waiting", False)),
        threading.Thread(target=call, args=("stream", True)),
    ]
    threads[0].start()
    assert up.wait_for(lambda u: len(u.requests) == 1)
    threads[1].start()
    assert up.wait_for(lambda u: len(u.requests) == 2)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signum)
    if twice:
        time.sleep(0.3)
        proc.send_signal(signum)
    for thread in threads:
        thread.join(15)
    proc.communicate(timeout=15)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 0
    assert elapsed < 5, elapsed
    assert results["waiting"].status_code == 503
    assert results["waiting"].json()["error"]["message"] == "the server is shutting down"
    stream = results["stream"]
    assert stream.status_code == 200
    assert stream.text.startswith("event: message_start")
    assert stream.text.rstrip().splitlines()[-2:][0] == "event: error"
    assert "shutting down" in stream.text


@pytest.mark.parametrize("server", ["native", "uvicorn"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopping_server_refuses_new_connections_at_once(
    up: MockUpstream, server: str, workers: int
):
    """Once told to stop, the server stops accepting: within a moment a new connection is
    refused, never left waiting unanswered for the grace period, while a stream in flight
    still gets the grace period and ends with an error event."""
    import threading

    events = [("message_start", {"type": "message_start"}), ("message_stop", {})]
    up.enqueue(Reply.sse(events, chunk_delay=30))
    proc, url = start_serve(up, "--grace", "3", "--server", server, "--workers", str(workers))
    port = int(url.rsplit(":", 1)[1])
    streamed: list[httpx.Response] = []
    body = {"model": "m", "max_tokens": 5, "messages": [], "stream": True}
    thread = threading.Thread(
        target=lambda: streamed.append(httpx.post(url + "/v1/messages", json=body, timeout=30))
    )
    thread.start()
    assert up.wait_for(lambda u: len(u.requests) == 1)
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    refused_after = None
    while refused_after is None and time.monotonic() - sent < 1.5:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            refused_after = time.monotonic() - sent
            break
        with conn:
            # Accepted just before the stop: it is answered, or closed with the socket (a
            # reset, or under uvicorn at times a FIN), never left waiting.
            conn.sendall(b"GET /_keyfailover/health HTTP/1.1\r\nhost: x\r\n\r\n")
            try:
                head = conn.recv(100)
            except ConnectionResetError:
                head = b""
            except TimeoutError:
                pytest.fail("a connection made after the stop was left unanswered")
            assert head == b"" or head.startswith(b"HTTP/1.1 "), head
        time.sleep(0.02)
    assert refused_after is not None, "never refused"
    assert refused_after < 1.0, refused_after
    thread.join(15)
    proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert 2.5 < time.monotonic() - sent < 8
    assert streamed[0].status_code == 200
    assert streamed[0].text.rstrip().splitlines()[-2:][0] == "event: error"


def test_serve_defaults_are_what_the_help_says():
    args = cli.build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:9"])
    assert (args.server, args.grace, args.header_timeout, args.limit_concurrency) == (
        "native",
        10.0,
        30.0,
        10_000,
    )
    assert (args.threads, args.workers) == (None, 1)
    from keyfailover.asgi import FailoverProxy

    gateway = FailoverProxy(
        kf.FailoverClient(kf.KeyPool([KEY_A]), base_url="http://127.0.0.1:9")
    ).gateway
    shown = repr(_serve.native_server([("", gateway)], args))
    for setting in ("header_timeout: 30s", "max_connections: 10000", "grace: 10s"):
        assert setting in shown, shown


def test_serve_threads_share_one_pool(up: MockUpstream):
    """--threads N runs N runtime threads; a key's cooldown found by one is every thread's:
    after one request found the first key rate-limited, 200 more at once, each on a
    connection of its own, never try it."""
    import concurrent.futures

    up.set_reply(KEY_A, Reply(status=429, headers={"retry-after": "60"}))
    proc, url = start_serve(up, "--threads", "3", keys=f"{KEY_A},{KEY_B}")
    try:
        names = [
            Path(f"/proc/{proc.pid}/task/{task}/comm").read_text().strip()
            for task in os.listdir(f"/proc/{proc.pid}/task")
        ]
        assert names.count("tokio-rt-worker") == 3, names

        def call(_: int) -> int:
            with httpx.Client() as client:  # a connection of its own
                chat = {"model": "m", "messages": []}
                return client.post(url + "/v1/messages", json=chat).status_code

        assert call(0) == 200
        with concurrent.futures.ThreadPoolExecutor(32) as workers:
            statuses = list(workers.map(call, range(200)))
        assert statuses == [200] * 200
        sent = [r.header("x-api-key") for r in up.requests]
        assert (sent.count(KEY_A), sent.count(KEY_B)) == (1, 201)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def access_lines(server: str, log_format: str) -> list[str]:
    """`keyfailover.proxy`'s lines for one request table served by `serve --server`."""
    with MockUpstream() as up:
        up.set_reply(KEY_A, Reply(status=429, headers={"retry-after": "60"}))
        proc, url = start_serve(
            up, "--server", server, "--log-format", log_format, "--client-token-env", "T",
            "--allow-byok", "--max-body-bytes", "1000", keys=f"{KEY_A},{KEY_B}", T="token",
        )  # fmt: skip
        try:
            chat = {"model": "m", "messages": []}

            def post(token: str, **kwargs: Any) -> int:
                headers = {"x-api-key": token}
                return httpx.post(
                    url + "/v1/messages?beta=true", headers=headers, **kwargs
                ).status_code

            assert post("token", json=chat) == 200  # fails over from key-0
            assert post("token", json=chat) == 200
            assert post("callers-own-key", json=chat) == 200  # BYOK
            assert post("token", content=b"x" * 2000) == 413
            chunked = iter([b"x" * 1000, b"x" * 1000])  # no length: 413 once read past 1000
            assert post("callers-own-key", content=chunked) == 413
            assert httpx.get(url + "/_keyfailover/health").status_code == 401
            assert (
                httpx.get(url + "/_keyfailover/health", headers={"x-api-key": "token"}).status_code
                == 200
            )
            # A key in a path (an admin action naming the key by its value): logged as its hint.
            assert httpx.post(url + f"/_keyfailover/keys/{KEY_A}/retire").status_code == 401
            up.set_reply(KEY_B, Reply(status=429, headers={"retry-after": "60"}))
            assert post("token", json=chat) == 429
            assert post("token", json=chat) == 429  # exhausted: no attempt
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=15)
    if log_format == "text":
        return [
            re.sub(r"\d+\.\d ms", "N ms", line)
            for line in err.splitlines()
            if line.startswith("INFO keyfailover.proxy:")
        ]
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [
        json.dumps(
            {
                **{k: v for k, v in entry.items() if k not in ("timestamp", "duration_ms")},
                "message": re.sub(r"\d+\.\d ms", "N ms", entry["message"]),
            },
            sort_keys=True,
        )
        for entry in entries
        if entry["logger"] == "keyfailover.proxy"
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_both_servers_write_the_same_access_lines(log_format: str):
    """One line per request answered, forwarded or not, in the same words and fields
    (but for the time taken) from the native server and from FailoverProxy under uvicorn."""
    native = access_lines("native", log_format)
    assert len(native) == 10, native
    assert native == access_lines("uvicorn", log_format)
    assert not [line for line in native if KEY_A in line]
    if log_format == "text":
        assert (
            native[0]
            == "INFO keyfailover.proxy: POST /v1/messages -> 200 (attempts=2, key=key-1, N ms)"
        )
        assert (
            native[2]
            == "INFO keyfailover.proxy: POST /v1/messages -> 200 (attempts=1, key=byok, N ms)"
        )
        assert (
            native[4]
            == "INFO keyfailover.proxy: POST /v1/messages -> 413 (attempts=0, key=byok, N ms)"
        )
        assert (
            native[5]
            == "INFO keyfailover.proxy: GET /_keyfailover/health -> 401 (attempts=0, key=-, N ms)"
        )
        assert native[7].startswith("INFO keyfailover.proxy: POST /_keyfailover/keys/sk-")
        assert native[9].endswith("-> 429 (attempts=0, key=-, N ms, pool exhausted)")


def test_slow_request_heads_do_not_starve_other_requests(up: MockUpstream):
    proc, url = start_serve(up)
    port = int(url.rsplit(":", 1)[1])
    slow = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-le")
            slow.append(sock)
        started = time.monotonic()
        for _ in range(20):
            response = httpx.post(url + "/v1/messages", json={"model": "m", "messages": []})
            assert response.status_code == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in slow:
            sock.close()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)


@pytest.mark.parametrize("server", ["native", "uvicorn"])
def test_a_post_asking_to_upgrade_to_h2c_never_goes_upstream_without_its_body(
    up: MockUpstream, server: str
):
    """curl --http2 on http:// sends `Upgrade: h2c`. The native server serves it as
    HTTP/1.1; uvicorn's httptools drops its body, and the gateway then refuses it rather
    than send it upstream with a pool key and an empty body."""
    proc, url = start_serve(up, "--server", server)
    body = json.dumps({"model": "m", "max_tokens": 5, "messages": []}).encode()
    try:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 10) as sock:
            sock.sendall(
                b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            head = sock.recv(65536).split(b"\r\n")[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    if server == "native":
        assert head == b"HTTP/1.1 200 OK"
        assert [r.body for r in up.requests] == [body]
    else:
        assert head == b"HTTP/1.1 400 Bad Request"
        assert up.requests == []


def test_serve_with_workers_shares_key_state_and_stops_cleanly(up: MockUpstream):
    """Two workers, shm chosen by themselves: key-0's 429 is seen upstream once."""
    up.set_reply(KEY_A, Reply.error(429, "rate_limit_error", "x", headers={"retry-after": "60"}))
    namespace = f"cli-workers-{os.getpid()}"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--upstream", up.url, "--keys-env", "K",
         "--port", str(port), "--workers", "2", "--namespace", namespace],
        env={**os.environ, "K": f"{KEY_A},{KEY_B}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until_listening(port, proc)
        for _ in range(12):
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/messages",
                json={"model": "m", "max_tokens": 5, "messages": []},
                headers={"connection": "close"},
            )
            assert response.status_code == 200
        assert [r.credential for r in up.requests].count(KEY_A) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "2 workers: key states shared through shared memory" in err
    assert "key states shm" in err
