"""`keyfailover serve --config FILE`: several routes, each with its provider and pool,
in one native server with one admin area; the file's checks (naming file, route and
field), `--check`, and reloads that keep key state or, on an error, change nothing."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_listening

from keyfailover import ConfigError, KeyPool, KeyState
from keyfailover._config import load_config
from keyfailover.testing import MockUpstream, Reply

ANTHROPIC = ["sk-ant-route-key-0-aaaaaaaaaaaa", "sk-ant-route-key-1-bbbbbbbbbbbb"]
OPENAI = ["sk-openai-route-key-0-cccccccccc", "sk-openai-route-key-1-dddddddddd"]
GEMINI = ["AIzaGeminiRouteKey0eeeeeeeeeeeeeee", "AIzaGeminiRouteKey1ffffffffffffffff"]
ALL_KEYS = ANTHROPIC + OPENAI + GEMINI
TOKEN, ADMIN = "kf-route-token-1234", "kf-admin-token-5678"
MESSAGE = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"


def config_text(upstream: str, extra: str = "") -> str:
    return f"""
[server]
admin_tokens_env = "KF_TEST_ADMIN"

[routes.anthropic]
provider = "anthropic"
upstream = "{upstream}"
keys_env = "KF_TEST_ANTHROPIC"
strategy = "ordered"

[routes.openai]
path = "/oai"
provider = "openai"
upstream = "{upstream}"
keys_file = "openai.keys"
client_tokens_env = "KF_TEST_TOKENS"

[routes.gemini]
provider = "gemini"
upstream = "{upstream}"
keys_env = "KF_TEST_GEMINI"
{extra}"""


ENV = {
    "KF_TEST_ADMIN": ADMIN,
    "KF_TEST_ANTHROPIC": ",".join(ANTHROPIC),
    "KF_TEST_GEMINI": ",".join(GEMINI),
    "KF_TEST_TOKENS": TOKEN,
}


@pytest.fixture
def config_dir(tmp_path: Path, up: MockUpstream) -> Path:
    (tmp_path / "kf.toml").write_text(config_text(up.url))
    (tmp_path / "openai.keys").write_text("\n".join(OPENAI) + "\n")
    return tmp_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        return err


@pytest.fixture
def serve(config_dir: Path) -> Iterator[Served]:
    with serving(config_dir) as served:
        yield served


@contextlib.contextmanager
def serving(config_dir: Path, *options: str) -> Iterator[Served]:
    """`keyfailover serve --config` with `options`, once it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyfailover", "serve", "--config", str(config_dir / "kf.toml"),
         "--port", str(port), "--grace", "1", *options],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    served = Served(proc, f"http://127.0.0.1:{port}")
    wait_listening(proc, port)
    yield served
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_a_config_served_on_the_threads_given(up: MockUpstream, config_dir: Path) -> None:
    """`--threads` with `--config`: the threads are set before the config's checks start
    the runtime (it exited at once, "the runtime has started already")."""
    with serving(config_dir, "--threads", "2") as served:
        answer = httpx.post(served.url + "/anthropic/v1/messages", json=MESSAGE, timeout=10)
        assert answer.status_code == 200
        assert served.stop() is not None
    assert served.proc.returncode == 0


def credential_of(request: object) -> str | None:
    return request.credential  # type: ignore[attr-defined,no-any-return]


def test_three_routes_each_fail_over_on_their_own(up: MockUpstream, serve: Served) -> None:
    up.set_reply(
        ANTHROPIC[0], Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "30"})
    )
    up.set_reply(OPENAI[0], Reply.error(401, "invalid_api_key", "revoked"))
    up.set_reply(GEMINI[0], Reply.gemini_error(429, "RESOURCE_EXHAUSTED", "quota"))
    with httpx.Client(base_url=serve.url, timeout=10) as http:
        anthropic = http.post("/anthropic/v1/messages", json=MESSAGE)
        openai = http.post(
            "/oai/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {TOKEN}"}
        )
        gemini = http.post(f"/gemini{GENERATE}", json=GEMINI_BODY)
        no_token = http.post("/oai/v1/chat/completions", json=CHAT)
        unrouted = http.post("/v1/messages", json=MESSAGE)
    assert anthropic.status_code == openai.status_code == gemini.status_code == 200
    assert no_token.status_code == 401
    assert unrouted.status_code == 404
    # Each route walked its own keys, to its own provider's paths.
    seen = [(r.path, credential_of(r)) for r in up.requests]
    assert seen == [
        ("/v1/messages", ANTHROPIC[0]),
        ("/v1/messages", ANTHROPIC[1]),
        ("/v1/chat/completions", OPENAI[0]),
        ("/v1/chat/completions", OPENAI[1]),
        (GENERATE, GEMINI[0]),
        (GENERATE, GEMINI[1]),
    ]

    with httpx.Client(base_url=serve.url, timeout=10) as http:
        # One admin area for all, with the server's admin token.
        assert http.get("/_keyfailover/keys").status_code == 401
        admin = {"x-api-key": ADMIN}
        keys = http.get("/_keyfailover/keys", headers=admin).json()["pools"]
        metrics = http.get("/_keyfailover/metrics", headers=admin).text
        ready = http.get("/_keyfailover/readyz")
        # Each route keeps its own area below its prefix.
        route_keys = http.get("/oai/_keyfailover/keys", headers={"x-api-key": TOKEN}).json()
        # A key where a label or endpoint goes is not echoed, in either area.
        echoed = [
            http.get(f"/_keyfailover/{OPENAI[0]}"),
            http.get(f"/_keyfailover/keys/{GEMINI[1]}/retire"),
            http.get(f"/oai/_keyfailover/keys/{OPENAI[1]}/retire", headers=admin),
            http.put(f"/oai/_keyfailover/keys/{OPENAI[1]}/retire", headers=admin),
        ]
        # Nor another route's key in a route's path, in the access log (checked below).
        other = [
            http.get(f"/anthropic/_keyfailover/keys/{OPENAI[0]}/retire", headers=admin),
            http.post(f"/gemini/v1/{ANTHROPIC[1]}", json=MESSAGE),
        ]
    assert [answer.status_code for answer in echoed] == [404, 404, 405, 405]
    assert [answer.status_code for answer in other] == [405, 404]
    assert [answer.headers.get("allow") for answer in echoed[2:]] == ["POST", "POST"]
    with httpx.Client(base_url=serve.url) as http:
        wrong = http.post("/_keyfailover/health", headers={"x-api-key": ADMIN})
    assert wrong.status_code == 405, "the server-wide area too"
    assert wrong.headers["allow"] == "GET, HEAD"
    for answer in echoed:
        assert not any(key in answer.text for key in ALL_KEYS), answer.text
        assert "..." in answer.text, answer.text
    assert {pool: [k["state"] for k in ks] for pool, ks in keys.items()} == {
        "anthropic": ["temporary", "valid"],
        "openai": ["permanent", "valid"],
        "gemini": ["temporary", "valid"],
    }
    assert ready.status_code == 200
    assert [k["state"] for k in route_keys["keys"]] == ["permanent", "valid"]
    for pool in ("anthropic", "openai", "gemini"):
        assert f'keyfailover_keys{{pool="{pool}",state="valid"}} 1' in metrics
    assert metrics.count("# TYPE keyfailover_keys gauge") == 1
    err = serve.stop()
    assert serve.proc.returncode == 0
    for key in ALL_KEYS:
        assert key not in err + json.dumps(keys) + metrics
    assert "route /oai (openai, openai): forwarding to" in err
    # The access log names the path with its route's prefix, as the caller sent it.
    assert "POST /oai/v1/chat/completions -> 200" in err
    assert "GET /oai/_keyfailover/keys -> 200" in err


def test_a_request_goes_to_the_route_of_its_path_with_dot_segments_resolved(
    up: MockUpstream, serve: Served
) -> None:
    """Sent as they are (httpx would resolve them first): `/oai/../anthropic/...` is the
    anthropic route's, with its key, and `/anthropic/./x/../v1/...` too."""
    port = int(serve.url.rsplit(":", 1)[1])
    seen = []
    for target in ("/oai/../anthropic/v1/messages", "/anthropic/./x/../v1/messages"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", target, body=json.dumps(MESSAGE))
        answer = conn.getresponse()
        seen.append((answer.status, json.loads(answer.read())["type"]))
        conn.close()
    assert seen == [(200, "message"), (200, "message")]
    assert [(r.path, credential_of(r)) for r in up.requests] == 2 * [("/v1/messages", ANTHROPIC[0])]


def test_sighup_reloads_the_config_keeping_key_state(
    up: MockUpstream, serve: Served, config_dir: Path
) -> None:
    up.set_reply(
        ANTHROPIC[0], Reply.error(429, "rate_limit_error", "slow", headers={"retry-after": "60"})
    )
    with httpx.Client(base_url=serve.url, timeout=10) as http:
        assert http.post("/anthropic/v1/messages", json=MESSAGE).status_code == 200
    # A new route and a new key for openai; anthropic unchanged.
    (config_dir / "kf.toml").write_text(
        config_text(
            up.url,
            f'\n[routes.more]\nprovider = "anthropic"\nupstream = "{up.url}"\n'
            'keys_env = "KF_TEST_ANTHROPIC"\nnamespace = "more"\n',
        )
    )
    (config_dir / "openai.keys").write_text(
        "\n".join([*OPENAI, "sk-openai-route-key-2-gggggggggg"])
    )
    serve.proc.send_signal(signal.SIGHUP)
    admin = {"x-api-key": ADMIN}
    with httpx.Client(base_url=serve.url, timeout=10) as http:
        deadline = time.monotonic() + 10
        while "more" not in http.get("/_keyfailover/keys", headers=admin).json()["pools"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        pools = http.get("/_keyfailover/keys", headers=admin).json()["pools"]
        assert [k["state"] for k in pools["anthropic"]] == ["temporary", "valid"]  # kept
        assert len(pools["openai"]) == 3
        assert http.post("/more/v1/messages", json=MESSAGE).status_code == 200

        # A config with an error changes nothing.
        (config_dir / "kf.toml").write_text(config_text(up.url, "\n[routes.bad]\nprovider = 1\n"))
        serve.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert "more" in http.get("/_keyfailover/keys", headers=admin).json()["pools"]
        assert http.post("/more/v1/messages", json=MESSAGE).status_code == 200
    err = serve.stop()
    assert "reloaded the config (SIGHUP): 4 routes; added more" in err
    assert "not reloading the config (SIGHUP):" in err
    assert "route 'bad': provider: must be a string, not 1" in err
    assert serve.proc.returncode == 0


def test_dashboard_streams_end_with_an_error_event_on_a_reload_rebuilding_their_route_and_a_stop(
    up: MockUpstream, serve: Served, config_dir: Path
) -> None:
    admin = {"x-api-key": ADMIN}
    events = serve.url + "/anthropic/_keyfailover/events"
    with httpx.stream("GET", events, headers=admin, timeout=10) as stream:
        texts = stream.iter_text()
        assert next(texts).startswith("event: state")
        # Another strategy: the route is rebuilt (its pool kept), its dashboard another.
        (config_dir / "kf.toml").write_text(
            config_text(up.url).replace('strategy = "ordered"', 'strategy = "round_robin"')
        )
        serve.proc.send_signal(signal.SIGHUP)
        rest = "".join(texts)  # to its end: a cut would raise
    last = rest.strip().split("\n\n")[-1]
    assert last.startswith("event: error"), rest[-500:]
    assert "a reload rebuilt this route" in last
    with httpx.stream("GET", events, headers=admin, timeout=10) as stream:
        lines = stream.iter_lines()
        assert next(lines) == "event: state"
        assert json.loads(next(lines).removeprefix("data: "))["strategy"] == "round_robin"

    # An open dashboard does not hold the server's stop: its stream ends at once.
    with httpx.stream("GET", serve.url + "/oai/_keyfailover/events", headers=admin) as stream:
        texts = stream.iter_text()
        assert next(texts).startswith("event: state")
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        rest = "".join(texts)
    assert "the server is shutting down" in rest.strip().split("\n\n")[-1]
    assert serve.proc.wait(timeout=10) == 0
    serve.stop()  # its pipes
    assert time.monotonic() - started < 2.0, "not the grace period (1 s) and 5 s more"


def write(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "kf.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routes = 1", "routes: needs at least one [routes.NAME] table"),
        (
            "[routes.a]\nprovider = 'anthropic'",
            "route 'a': needs exactly one of keys_env, keys_file and keys",
        ),
        (
            "[routes.a]\nkeys_env = 'KF_NOPE'",
            "route 'a': keys_env: environment variable KF_NOPE is not set",
        ),
        (
            "[routes.a]\nkeys_env = 'K'\nstrategy = 'fastest'",
            "route 'a': strategy: unknown strategy 'fastest'",
        ),
        (
            "[routes.a]\nkeys_env = 'K'\nprovider = 'cohere'",
            "route 'a': provider: unknown provider 'cohere'",
        ),
        (
            "[routes.a]\nkeys_env = 'K'\ntimeout = 'soon'",
            "route 'a': timeout: must be a number, not 'soon'",
        ),
        (
            "[routes.a]\nkeys_env = 'K'\nallow_byok = 1",
            "route 'a': allow_byok: must be true or false, not 1",
        ),
        (
            "[routes.a]\nkeys_env = 'K'\nhttp2 = 'no'",
            "route 'a': http2: must be true or false, not 'no'",
        ),
        ("[routes.a]\nkeys_env = 'K'\npath = 'a'", "route 'a': path: must be an absolute path"),
        (
            "[routes.a]\nkeys_env = 'K'\n[routes.b]\nkeys_env = 'K'\npath = '/a'",
            "route 'b': path: /a is route 'a''s too",
        ),
        (
            "[routes.a]\nkeys_env = 'K'\n[routes.root]\nkeys_env = 'K'\npath = '/'",
            "route 'root': path: / beside other routes would take the server-wide admin area",
        ),
        ("[routes.a]\nkeys_file = 'missing.keys'", "route 'a': keys_file: cannot read"),
        (
            "[routes.a]\nkeys_env = 'K'\nprovider = 'azure_openai'",
            "route 'a': upstream: provider azure_openai needs upstream",
        ),
        ("[routes.a]\nkeys_env = 'K'\nextra = 1", "route 'a': extra: unknown field"),
        ("[server]\nport = 1\n[routes.a]\nkeys_env = 'K'", "server.port: unknown field"),
        ("[routes.a\n", "not valid TOML"),
        ("[routes.a]\nkeys_env = 'KF_BAD'", "route 'a': keys_env: environment variable KF_BAD"),
    ],
)
def test_config_errors_name_the_file_the_route_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    env = {"K": ANTHROPIC[0], "KF_BAD": "a=x\nb"}
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ=env)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


@pytest.mark.parametrize("field", ["provider", "strategy", "timeout"])
def test_a_key_written_in_the_wrong_field_is_not_quoted_whole(tmp_path: Path, field: str) -> None:
    path = write(tmp_path, f"[routes.a]\nkeys_env = 'K'\n{field} = '{ANTHROPIC[1]}'")
    with pytest.raises(ConfigError, match=f"route 'a': {field}: ") as raised:
        load_config(path, environ={"K": ANTHROPIC[0]})
    assert ANTHROPIC[1] not in str(raised.value)
    assert f"'{ANTHROPIC[1][:4]}...{ANTHROPIC[1][-4:]}'" in str(raised.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[routes.a]\nkeys_env = 'K'\nnamespace = '{key} x'", "route 'a': namespace: "),
        ("[routes.\"{key}!\"]\nkeys_env = 'K'", "routes."),
        ("[server]\n\"{key}\" = 1\n[routes.a]\nkeys_env = 'K'", "server."),
        ("[routes.a]\nkeys_env = 'K'\npath = '{key}'", "route 'a': path: "),
        ("[routes.a]\nkeys_file = '{key}'", "route 'a': keys_file: cannot read"),
        ("[routes.a]\nkeys_env = 'K'\n{key} = 1", "route 'a': "),
    ],
)
def test_a_key_written_as_a_name_is_not_quoted_whole(tmp_path: Path, text: str, where: str) -> None:
    key = ANTHROPIC[1]
    path = write(tmp_path, text.format(key=key))
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={"K": ANTHROPIC[0]})
    assert where in str(raised.value)
    assert key not in str(raised.value)
    assert key[:4] + "..." in str(raised.value)


def test_keys_in_the_config_only_when_its_owner_alone_can_read_it(tmp_path: Path) -> None:
    text = f"[routes.a]\nkeys = ['{ANTHROPIC[0]}', '{ANTHROPIC[1]}']\n"
    with pytest.raises(ConfigError, match="readable by its owner only") as raised:
        load_config(write(tmp_path, text, 0o644), environ={})
    assert ANTHROPIC[0] not in str(raised.value)
    config = load_config(write(tmp_path, text, 0o600), environ={})
    assert len(config.routes[0].keys) == 2
    labelled = f"[routes.a.keys]\neast = '{ANTHROPIC[0]} group=org-1'\n"
    (route,) = load_config(write(tmp_path, labelled, 0o600), environ={}).routes
    assert isinstance(route.keys, dict)
    assert route.keys["east"].group == "org-1"  # type: ignore[union-attr]
    assert ANTHROPIC[0] not in repr(route)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyfailover", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_validates_and_exits(config_dir: Path) -> None:
    path = str(config_dir / "kf.toml")
    ok = run_cli("serve", "--config", path, "--check", env=ENV)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == (
        f"{path}: 3 routes OK: anthropic at /anthropic (anthropic, 2 keys), "
        "openai at /oai (openai, 2 keys), gemini at /gemini (gemini, 2 keys)"
    )
    missing = run_cli("serve", "--config", path, "--check", env={**ENV, "KF_TEST_GEMINI": ""})
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith(f"keyfailover serve: error: {path}: route 'gemini': keys_env: ")


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ('state = "memcached://x"', 'state: must be "shm" or a redis://'),
        ('namespace = ""', "namespace: must be a name without spaces, not ''"),
        ('namespace = "a b"', "namespace: must be a name without spaces, not 'a b'"),
        ('upstream = "ftp://x"', "upstream: must be an http or https URL"),
        ('upstream = "https://u:secret@x"', "upstream: must not contain credentials"),
        ('keys_env = "KF_TEST_DUP"', "keys_env: key-0 and key-1 hold the same key"),
        ('client_tokens_env = "KF_TEST_ANTHROPIC"', "client_tokens_env: a token is the route's"),
        ("timeout = inf", "timeout: must be a number of seconds from 0.001 to 1e+09"),
        ("timeout = 1e300", "timeout: must be a number of seconds from 0.001 to 1e+09"),
        ("max_body_bytes = 99999999999999999999", "max_body_bytes: must be a number of bytes"),
        ('state = "redis://"', "state: a Redis URL needs a host"),
        ('state = "unix://"', "state: a unix:// URL needs the socket's path"),
        ('path = "/_keyfailover"', "path: /_keyfailover is the admin area's"),
        ('path = "/v1/_keyfailover/x"', "path: /_keyfailover is the admin area's"),
        ('path = "/a b"', "path: must be an absolute path"),
        ('path = "/caf\u00e9"', "path: must be an absolute path"),
    ],
)
def test_check_refuses_what_serve_would(tmp_path: Path, field: str, message: str) -> None:
    keys = "" if field.startswith("keys_env") else 'keys_env = "KF_TEST_ANTHROPIC"\n'
    path = write(tmp_path, f"[routes.a]\n{keys}{field}\n")
    result = run_cli("serve", "--config", str(path), "--check", env={**ENV, "KF_TEST_DUP": "k,k"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"keyfailover serve: error: {path}: route 'a': {message}"), line
    assert "secret" not in line


def test_check_connects_to_no_redis(tmp_path: Path) -> None:
    path = write(tmp_path, '[routes.a]\nkeys_env = "K"\nstate = "redis://127.0.0.1:9/0"\n')
    result = run_cli("serve", "--config", str(path), "--check", env={"K": ANTHROPIC[0]})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_a_config_with_an_error_never_starts(config_dir: Path) -> None:
    path = config_dir / "kf.toml"
    path.write_text(path.read_text() + "\n[routes.broken]\nkeys_env = 'KF_TEST_NOT_SET'\n")
    result = run_cli("serve", "--config", str(path), "--port", str(free_port()), env=ENV)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "route 'broken': keys_env: environment variable KF_TEST_NOT_SET is not set" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--provider", "openai"],
            "--provider is a route's setting: with --config, set it in the file",
        ),
        (["--no-http2"], "--no-http2 is a route's setting: with --config, set it in the file"),
        (
            ["--admin-token-env", "KF_TEST_ADMIN"],
            "--admin-token-env goes in the config with --config: admin_tokens_env in [server]",
        ),
        (["--server", "uvicorn"], "--config runs the native server"),
        (
            ["--host", "0.0.0.0"],
            "refusing to listen on 0.0.0.0 with route 'anthropic' open to anyone",
        ),
    ],
)
def test_options_that_do_not_go_with_a_config(
    config_dir: Path, args: list[str], message: str
) -> None:
    result = run_cli("serve", "--config", str(config_dir / "kf.toml"), *args, env=ENV)
    assert result.returncode == 2
    assert message in result.stderr


def test_check_needs_a_config() -> None:
    result = run_cli("serve", "--keys-env", "K", "--check", env={"K": ANTHROPIC[0]})
    assert result.returncode == 2
    assert "--check goes with --config" in result.stderr


class RecordingServer:
    """Stands in for the native server: keeps the routes it is given."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, object]] = []

    def set_routes(self, routes: list[tuple[str, object]]) -> None:
        self.routes = routes


def test_a_reload_keeps_unchanged_routes_whole_and_rebuilds_changed_ones(
    config_dir: Path, up: MockUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyfailover._config import Routes

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    routes = Routes(load_config(config_dir / "kf.toml"))
    before = {name: (b.pool, b.proxy) for name, b in routes.built.items()}
    routes.built["anthropic"].pool.key("key-0").mark_temporary(60)
    (config_dir / "openai.keys").write_text(
        "\n".join([*OPENAI, "sk-openai-route-key-2-gggggggggg"])
    )
    text = (config_dir / "kf.toml").read_text()
    (config_dir / "kf.toml").write_text(text.replace('strategy = "ordered"', "timeout = 30"))
    server = RecordingServer()
    summary = routes.reload(server)  # type: ignore[arg-type]
    after = {name: (b.pool, b.proxy) for name, b in routes.built.items()}
    # What changed in each route's keys is said, as a keys file's reload says it.
    hint = KeyPool(["sk-openai-route-key-2-gggggggggg"]).snapshot()[0]["hint"]
    assert summary == f"3 routes; openai [added key-2 ({hint}); 3 keys now]"
    # gemini: unchanged, kept whole; openai: a new key, same client and gateway.
    assert after["gemini"] == before["gemini"]
    assert after["openai"] == before["openai"]
    assert len(after["openai"][0]) == 3
    # anthropic: a new timeout, a new client over the same pool (its states kept).
    assert after["anthropic"][0] is before["anthropic"][0]
    assert after["anthropic"][1] is not before["anthropic"][1]
    assert after["anthropic"][0].key("key-0").state == KeyState.TEMPORARY
    assert [prefix for prefix, _ in server.routes] == ["/anthropic", "/oai", "/gemini"]


def test_a_worker_started_after_an_edit_serves_the_config_as_it_is_now(
    tmp_path: Path, up: MockUpstream
) -> None:
    (tmp_path / "a.keys").write_text(f"a0={ANTHROPIC[0]}\n")
    (tmp_path / "kf.toml").write_text(
        f'[routes.a]\nupstream = "{up.url}"\nkeys_file = "a.keys"\n'
        f'namespace = "config-respawn-{os.getpid()}"\n'
    )
    log = tmp_path / "serve.log"
    port = free_port()
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyfailover", "serve", "--config", str(tmp_path / "kf.toml"),
             "--port", str(port), "--workers", "2", "--grace", "1"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )  # fmt: skip

    def wait_for(text: str, count: int) -> str:
        deadline = time.monotonic() + 15
        while log.read_text().count(text) < count:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        return log.read_text()

    try:
        text = wait_for("serving on http", 2)
        (tmp_path / "a.keys").write_text(f"a0={ANTHROPIC[0]}\na1={ANTHROPIC[1]}\n")
        wait_for("reloaded the config (a file changed)", 2)
        # Both workers replaced: every connection lands on one started after the edit.
        for pid in re.findall(r"native server, process (\d+)\)", text):
            os.kill(int(pid), signal.SIGKILL)
        wait_for("serving on http", 4)
        for _ in range(6):
            keys = httpx.get(
                f"http://127.0.0.1:{port}/_keyfailover/keys", headers={"connection": "close"}
            )
            assert [k["label"] for k in keys.json()["pools"]["a"]] == ["a0", "a1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()


def test_a_reload_with_an_error_in_one_route_changes_no_route(tmp_path: Path) -> None:
    from keyfailover._config import Routes

    for name in ("a", "b"):
        (tmp_path / f"{name}.keys").write_text(f"{name}0={ANTHROPIC[0]}\n")
    path = tmp_path / "kf.toml"
    path.write_text(
        '[routes.a]\nkeys_file = "a.keys"\n[routes.b]\nkeys_file = "b.keys"\nnamespace = "b"\n'
    )
    routes = Routes(load_config(path))
    (tmp_path / "a.keys").write_text(f"a0={ANTHROPIC[0]}\na1={ANTHROPIC[1]}\n")
    (tmp_path / "b.keys").write_text(f"b0={ANTHROPIC[0]}\nb1={ANTHROPIC[0]}\n")
    server = RecordingServer()
    with pytest.raises(ConfigError) as raised:
        routes.reload(server)  # type: ignore[arg-type]
    assert str(raised.value) == (f"{path}: route 'b': keys_file: b0 and b1 hold the same key")
    assert [k["label"] for k in routes.built["a"].pool.snapshot()] == ["a0"]
    assert server.routes == []


def test_a_reload_failing_in_one_route_leaves_the_keys_of_every_route_as_they_were(
    tmp_path: Path,
) -> None:
    """Route b's new keys do not fit in shared memory (1,024 keys a namespace): the
    reload fails, and route a, whose keys file changed too and comes first, keeps its
    keys, as the log says ("the routes in service stay")."""
    from keyfailover._config import Routes

    (tmp_path / "a.keys").write_text(f"a0={ANTHROPIC[0]}\n")
    (tmp_path / "b.keys").write_text(f"b0={ANTHROPIC[1]}\n")
    path = tmp_path / "kf.toml"
    namespace = f"config-atomic-{os.getpid()}"
    path.write_text(
        f'[routes.a]\nkeys_file = "a.keys"\nstate = "shm"\nnamespace = "{namespace}-a"\n'
        f'[routes.b]\nkeys_file = "b.keys"\nstate = "shm"\nnamespace = "{namespace}-b"\n'
    )
    routes = Routes(load_config(path))
    (tmp_path / "a.keys").write_text(f"a0={ANTHROPIC[0]}\na1={OPENAI[0]}\n")
    (tmp_path / "b.keys").write_text(
        "".join(f"b{i}=sk-ant-capacity-{i:05d}-xxxxxxxxxxxx\n" for i in range(1100))
    )
    server = RecordingServer()
    with pytest.raises(ConfigError) as raised:
        routes.reload(server)  # type: ignore[arg-type]
    assert str(raised.value).startswith(f"{path}: route 'b': ")
    assert [k["label"] for k in routes.built["a"].pool.snapshot()] == ["a0"]
    assert [k["label"] for k in routes.built["b"].pool.snapshot()] == ["b0"]
    assert server.routes == []
    # Once the error is gone, the reload goes through, a's new key included.
    (tmp_path / "b.keys").write_text(f"b0={ANTHROPIC[1]}\n")
    assert routes.reload(server).startswith("2 routes; a [added a1")  # type: ignore[arg-type]
    assert [k["label"] for k in routes.built["a"].pool.snapshot()] == ["a0", "a1"]


def test_a_new_strategy_keeps_the_pool_and_its_key_states(tmp_path: Path) -> None:
    """A reload that changes only a route's strategy changes it in place: cooling and
    retired keys stay so (a new pool would start them valid, and a retired key would be
    sent again)."""
    from keyfailover._config import Routes

    path = tmp_path / "kf.toml"
    (tmp_path / "a.keys").write_text(f"a0={ANTHROPIC[0]}\na1={ANTHROPIC[1]}\n")
    path.write_text('[routes.a]\nkeys_file = "a.keys"\nstrategy = "ordered"\n')
    routes = Routes(load_config(path))
    pool = routes.built["a"].pool
    pool.key("a0").mark_permanent()
    pool.key("a1").mark_temporary(60)
    path.write_text('[routes.a]\nkeys_file = "a.keys"\nstrategy = "round_robin"\n')
    server = RecordingServer()
    assert routes.reload(server) == "1 route"  # type: ignore[arg-type]
    assert routes.built["a"].pool is pool
    assert pool.strategy == "round_robin"
    assert pool.states() == [KeyState.PERMANENT, KeyState.TEMPORARY]
    assert [prefix for prefix, _ in server.routes] == ["/a"]


def test_a_routes_repr_shows_no_redis_password(tmp_path: Path) -> None:
    text = (
        f"[routes.a]\nkeys = ['{ANTHROPIC[0]}']\n"
        "state = 'redis://:hunter2-redis-password@127.0.0.1:6379/0'\n"
    )
    (route,) = load_config(write(tmp_path, text, 0o600), environ={}).routes
    assert route.state is not None
    assert "hunter2" not in repr(route)
