"""Avoiding 429s: rate-limit headers read on every answer, load spreading, key groups,
and the quota and credit errors that are not plain 429s. Against MockUpstream's
provider-like limits where it matters."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import FAKE_KEYS, make_client, run, until_next_month

import keyfailover as kf
from keyfailover.testing import Limit, MockUpstream, Reply

KEYS = FAKE_KEYS[:4]


def body(stream: bool = False) -> bytes:
    payload: dict[str, object] = {"model": "m", "max_tokens": 5, "messages": []}
    if stream:
        payload["stream"] = True
    return json.dumps(payload).encode()


def send(client: kf.FailoverClient, stream: bool = False, path: str = "/v1/messages"):  # type: ignore[no-untyped-def]
    response = client.request_sync("POST", path, body=body(stream))
    return response, response.read()


def test_limits_of_mock_upstream_behave_like_the_providers() -> None:
    with MockUpstream(limits={KEYS[0]: Limit(requests=2, window=0.5)}) as up:
        url = up.url + "/v1/messages"
        first = httpx.post(url, headers={"x-api-key": KEYS[0]}, json={"model": "m"})
        assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert first.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        httpx.post(url, headers={"x-api-key": KEYS[0]}, json={"model": "m"})
        spent = httpx.post(url, headers={"x-api-key": KEYS[0]}, json={"model": "m"})
        assert spent.status_code == 429
        assert spent.headers["retry-after"] == "1"
        assert spent.json()["error"]["type"] == "rate_limit_error"
        unlimited = httpx.post(url, headers={"x-api-key": KEYS[1]}, json={"model": "m"})
        assert "x-ratelimit-remaining-requests" not in unlimited.headers
        time.sleep(0.55)
        assert (
            httpx.post(url, headers={"x-api-key": KEYS[0]}, json={"model": "m"}).status_code == 200
        )


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_a_used_up_limit_moves_on_without_a_429_round_trip(stream: bool) -> None:
    with MockUpstream(limits={KEYS[0]: Limit(requests=2, window=30)}) as up:
        client, pool = make_client(up, "anthropic", 2)
        results = [send(client, stream)[0] for _ in range(4)]
        assert [r.key_label for r in results] == ["key-0", "key-0", "key-1", "key-1"]
        assert [r.attempts for r in results] == [1, 1, 1, 1]
        assert all(r.status == 200 for r in results)
        assert len(up.requests) == 4, "no 429 round trip"
        snapshot = pool.snapshot()
        assert snapshot[0]["state"] == "temporary"
        assert 25 < snapshot[0]["cooldown_remaining"] <= 30
        assert snapshot[0]["remaining"] == {"requests": 0}
        assert snapshot[0]["limit"] == {"requests": 2}
        metrics = client.metrics()
        assert (
            'keyfailover_key_transitions_total{pool="anthropic",key="key-0",reason="depleted"} 1'
            in metrics
        )
        assert (
            'keyfailover_key_remaining{pool="anthropic",key="key-0",limit="requests"} 0' in metrics
        )


def test_strategies_spread_the_load() -> None:
    with MockUpstream() as up:
        for strategy, expected in [
            ("ordered", ["key-0"] * 6),
            ("round_robin", ["key-0", "key-1", "key-2", "key-0", "key-1", "key-2"]),
        ]:
            pool = kf.KeyPool(KEYS[:3], strategy=strategy)
            client = kf.FailoverClient(pool, base_url=up.url)
            labels = [send(client)[0].key_label for _ in range(6)]
            assert labels == expected, strategy
            assert pool.strategy == strategy


def test_least_loaded_sends_the_next_request_to_a_key_without_one_in_flight() -> None:
    with MockUpstream() as up:
        events = [("message_start", {}), ("ping", {}), ("message_stop", {})]
        up.set_reply(KEYS[0], Reply.sse(events, chunk_delay=0.5))
        pool = kf.KeyPool(KEYS[:2], strategy="least_loaded")
        client = kf.FailoverClient(pool, base_url=up.url)

        async def scenario() -> list[str | None]:
            slow = await client.request("POST", "/v1/messages", body=body())
            assert pool.snapshot()[0]["in_flight"] == 1, "held while its body streams"
            second = await client.request("POST", "/v1/messages", body=body())
            await second.read()
            await slow.aclose()
            return [slow.key_label, second.key_label]

        assert run(scenario()) == ["key-0", "key-1"]
        # Released once the closed stream's pump task has ended, on a runtime thread.
        deadline = time.monotonic() + 2
        while pool.snapshot()[0]["in_flight"] != 0:
            assert time.monotonic() < deadline, "in_flight not released after the stream closed"
            time.sleep(0.01)


def test_a_bad_strategy_is_a_config_error() -> None:
    with pytest.raises(kf.ConfigError, match="unknown strategy"):
        kf.KeyPool(KEYS, strategy="random")


def test_a_rate_limit_cools_the_keys_group_and_not_other_groups(up: MockUpstream) -> None:
    pool = kf.KeyPool(
        {
            "a": kf.Key(KEYS[0], group="org-1"),
            "b": kf.Key(KEYS[1], group="org-1"),
            "c": kf.Key(KEYS[2], group="org-2"),
            "d": KEYS[3],
        }
    )
    client = kf.FailoverClient(pool, base_url=up.url)
    up.set_reply(KEYS[0], Reply.error(429, "rate_limit_error", "x", headers={"retry-after": "20"}))
    response, _ = send(client)
    assert (response.status, response.key_label, response.attempts) == (200, "c", 2)
    states = {k["label"]: (k["state"], k["group"]) for k in pool.snapshot()}
    assert states == {
        "a": ("temporary", "org-1"),
        "b": ("temporary", "org-1"),
        "c": ("valid", "org-2"),
        "d": ("valid", None),
    }
    assert pool.key("b").cooldown_remaining == pytest.approx(
        pool.key("a").cooldown_remaining, abs=0.01
    )
    assert [r.credential for r in up.requests] == [KEYS[0], KEYS[2]], "b was never tried"
    assert "group_rate_limited" in client.metrics()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_429_without_retry_after_cools_until_its_used_up_limit_resets(
    up: MockUpstream, provider: str
) -> None:
    """A 429 that says only, in its rate-limit headers, that a limit is used up and when
    it resets: the key cools that long, not the 60 s default, and the caller is told so."""
    in_6m = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 360))
    limits = {
        "openai": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"},
        "anthropic": {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": in_6m,
        },
    }[provider]
    pool = kf.KeyPool(KEYS[:2])
    client = kf.FailoverClient(pool, base_url=up.url, provider=provider)
    for key in KEYS[:2]:
        up.set_reply(key, Reply.error(429, "rate_limit_error", "slow", headers=limits))
    response, _ = send(client)
    assert (response.status, response.attempts) == (429, 2)
    assert 340 < int(header_of(response, "retry-after")) <= 360
    assert all(340 < pool.key(f"key-{i}").cooldown_remaining <= 360 for i in (0, 1))

    # With a limit left, a 429 still says nothing of how long: the default.
    left = {name: "3" if "remaining" in name else value for name, value in limits.items()}
    up.set_reply(KEYS[2], Reply.error(429, "rate_limit_error", "slow", headers=left))
    pool = kf.KeyPool([KEYS[2]])
    send(kf.FailoverClient(pool, base_url=up.url, provider=provider))
    assert pool.key("key-0").cooldown_remaining == pytest.approx(60, abs=1)


@pytest.mark.parametrize(
    "reset",
    [
        "2030-01-01T00:00:00\u00e9\u00e9\u00e9",  # cut inside a character, it panicked
        "2030-01-01T00:00:00+\u00e9\u00e9:",
        "2030-01-01T00:00:00+99:99",
        "\u00e9" * 30,
    ],
)
def test_a_rate_limit_header_that_does_not_parse_is_ignored(up: MockUpstream, reset: str) -> None:
    """Any text upstream sends as a reset, on any answer: the request is answered as if the
    header were not there, and the key stays in use."""
    headers = {"anthropic-ratelimit-requests-remaining": "0"}
    headers["anthropic-ratelimit-requests-reset"] = reset
    up.set_reply(KEYS[0], Reply.json({"ok": True}, headers=headers))
    pool = kf.KeyPool(KEYS[:2])
    client = kf.FailoverClient(pool, base_url=up.url)
    for _ in range(2):
        response, read = send(client)
        assert (response.status, response.key_label, json.loads(read)) == (
            200,
            "key-0",
            {"ok": True},
        )
    assert pool.key("key-0").state == kf.KeyState.VALID


def header_of(response: kf.SyncResponse, name: str) -> str:
    return next(value for key, value in response.headers if key == name)


def test_groups_from_a_keys_file_and_learned_from_the_organization_header() -> None:
    keys = kf.parse_keys(f"a={KEYS[0]} group=org-1\nb={KEYS[1]}\nc={KEYS[2]}\n")
    assert isinstance(keys, dict)
    assert isinstance(keys["a"], kf.Key)
    assert keys["a"].group == "org-1"
    assert keys["b"] == KEYS[1]
    limits = {
        KEYS[1]: Limit(requests=100, group="org-x"),
        KEYS[2]: Limit(requests=100, group="org-x"),
    }
    with MockUpstream(limits=limits) as up:
        pool = kf.KeyPool(keys)
        client = kf.FailoverClient(pool, base_url=up.url)
        pool.key("a").mark_temporary(60)
        send(client)  # key b answers, and tells its organization
        assert pool.key("b").group == "org-x"
        assert pool.key("c").group is None, "not heard from yet"


def test_a_group_never_shows_a_key(up: MockUpstream) -> None:
    """A group is shown where keys are not (snapshots, metrics, the admin pages): an
    organization header echoing the key is not learned, and a configured group holding
    a key is refused without showing it."""
    reply = Reply.json({"ok": True}, headers={"anthropic-organization-id": KEYS[0]})
    up.set_reply(KEYS[0], reply)
    pool = kf.KeyPool(KEYS[:2])
    client = kf.FailoverClient(pool, base_url=up.url)
    assert send(client)[0].status == 200
    assert pool.snapshot()[0]["group"] is None
    assert KEYS[0] not in client.metrics()
    assert KEYS[0] not in repr(pool.key("key-0"))
    for make in (
        lambda: kf.Key(KEYS[0], group=KEYS[0]),
        lambda: kf.KeyPool({"a": kf.Key(KEYS[0], group=f"org {KEYS[1]}"), "b": KEYS[1]}),
    ):
        with pytest.raises(kf.ConfigError, match="holds") as info:
            make()
        assert KEYS[0] not in str(info.value)
        assert KEYS[1] not in str(info.value)


QUOTA_CASES = [
    pytest.param(
        "anthropic",
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "Your credit balance is too low to access the "
                "Anthropic API. Please go to Plans & Billing.",
            },
        },
        3600.0,
        id="anthropic-credit_balance_400",
    ),
    pytest.param(
        "anthropic",
        402,
        {"type": "error", "error": {"type": "billing_error", "message": "payment required"}},
        3600.0,
        id="anthropic-billing_402",
    ),
    pytest.param(
        "anthropic",
        429,
        {
            "type": "error",
            "error": {
                "type": "rate_limit_error",
                "message": "spend limit",
                "details": {"error_code": "enforced_spend_limit_reached"},
            },
        },
        None,
        id="anthropic-spend_limit_429",
    ),
    *(
        pytest.param(
            "openai",
            429,
            {
                "error": {
                    "message": "quota",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": code,
                }
            },
            3600.0,
            id=f"openai-{code}",
        )
        for code in (
            "insufficient_quota",
            "credit_balance_exhausted",
            "organization_spend_limit_exceeded",
            "project_spend_limit_exceeded",
        )
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
@pytest.mark.parametrize(("provider", "status", "error", "cooldown"), QUOTA_CASES)
def test_quota_and_credit_errors_fail_over_with_the_quota_cooldown(
    up: MockUpstream, provider: str, status: int, error: dict, cooldown: float | None, stream: bool
) -> None:
    client, pool = make_client(up, provider, 2)
    up.set_reply(FAKE_KEYS[0], Reply.json(error, status=status))
    path = "/v1/messages" if provider == "anthropic" else "/v1/chat/completions"
    response, _ = send(client, stream, path)
    assert (response.status, response.key_label, response.attempts) == (200, "key-1", 2)
    key = pool.key("key-0")
    assert key.state == kf.KeyState.TEMPORARY
    expected = until_next_month() if cooldown is None else cooldown
    assert key.cooldown_remaining == pytest.approx(expected, abs=5)
    assert client.stats()["quota_exhausted"] == 1


def test_every_other_400_goes_back_to_the_caller_unchanged(up: MockUpstream) -> None:
    client, pool = make_client(up, "anthropic", 2)
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad roles"}}
    up.set_reply(FAKE_KEYS[0], Reply.json(error, status=400))
    response, data = send(client)
    assert (response.status, response.attempts) == (400, 1)
    assert json.loads(data) == error
    assert pool.key("key-0").state == kf.KeyState.VALID


def test_headroom_puts_a_key_that_says_it_ran_out_last(up: MockUpstream) -> None:
    """Remaining 0 and no reset time (Azure, Mistral's minute limits): the key is not
    cooled, but neither is it the first choice, as it was, counted full."""
    pool = kf.KeyPool(KEYS[:2], strategy="headroom")
    client = kf.FailoverClient(pool, base_url=up.url, provider="openai")
    limits = {"x-ratelimit-limit-requests": "100"}
    up.set_reply(KEYS[0], Reply.json({}, headers={**limits, "x-ratelimit-remaining-requests": "0"}))
    up.set_reply(
        KEYS[1], Reply.json({}, headers={**limits, "x-ratelimit-remaining-requests": "90"})
    )
    path = "/v1/chat/completions"
    labels = [send(client, path=path)[0].key_label for _ in range(4)]
    assert labels == ["key-0", "key-1", "key-1", "key-1"]
    assert pool.key("key-0").state == kf.KeyState.VALID


def test_the_headroom_strategy_keeps_clear_of_429s() -> None:
    """4 keys of 5 requests per window, 60 requests: headroom spreads them and never
    sees a 429 while capacity lasts."""
    limits = {key: Limit(requests=5, window=30) for key in KEYS}
    with MockUpstream(limits=limits) as up:
        pool = kf.KeyPool(KEYS, strategy="headroom")
        client = kf.FailoverClient(pool, base_url=up.url)
        statuses = [send(client)[0].status for _ in range(24)]
        assert statuses[:20] == [200] * 20, "the whole capacity served"
        assert set(statuses[20:]) == {429}, "then the pool is honestly exhausted"
        assert len(up.requests) == 20, "no 429 round trip: every key was moved off in time"
