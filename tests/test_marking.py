"""The marking rules: which responses fail a key over, and how it is marked."""

import json

import pytest
from conftest import until_next_month

import keyfailover as kf
from keyfailover import KeyState, mark_key_on_response

# The full table (the seed's, plus 402 and more pass-through statuses) is marking_table in
# src/verdict.rs; here, one case of each rule through the binding, with each header form.
MARKING_CASES = [
    ("429_with_retry_after_seconds", 429, {"Retry-After": "5"}, True, KeyState.TEMPORARY, 5.0),
    ("429_with_retry_after_ms", 429, [("retry-after-ms", "1500")], True, KeyState.TEMPORARY, 1.5),
    ("429_no_headers_uses_default", 429, None, True, KeyState.TEMPORARY, 60.0),
    ("401_marks_permanent", 401, None, True, KeyState.PERMANENT, None),
    ("503_does_not_mark", 503, {b"Retry-After": b"5"}, False, KeyState.VALID, None),
]


@pytest.mark.parametrize(
    ("status", "headers", "failover", "state", "cooldown"),
    [case[1:] for case in MARKING_CASES],
    ids=[case[0] for case in MARKING_CASES],
)
def test_marking_rules(make_pool, clock, status, headers, failover, state, cooldown):
    key = make_pool(1).key("key-0")
    assert mark_key_on_response(key, status, headers) is failover
    assert key.state == state
    if cooldown is not None:
        assert key.cooldown_remaining == pytest.approx(cooldown)
        clock.advance(cooldown)
        assert key.state == KeyState.VALID


# All three quota bodies are in src/verdict.rs; one per provider here, as str and as bytes.
OPENAI_QUOTA = {
    "error": {
        "message": "You exceeded your current quota",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}
ANTHROPIC_SPEND_LIMIT = {
    "type": "error",
    "error": {
        "type": "rate_limit_error",
        "message": "spend limit reached",
        "details": {"error_code": "enforced_spend_limit_reached"},
    },
}


def test_quota_exhaustion_uses_quota_cooldown(make_pool):
    key = make_pool(1, quota_cooldown=7200).key("key-0")
    assert mark_key_on_response(key, 429, {"retry-after": "5"}, json.dumps(OPENAI_QUOTA)) is True
    assert key.cooldown_remaining == pytest.approx(7200)


def test_a_spend_limit_cools_until_the_month_renews(make_pool):
    key = make_pool(1, quota_cooldown=7200).key("key-0")
    raw = json.dumps(ANTHROPIC_SPEND_LIMIT).encode()
    assert mark_key_on_response(key, 429, {"retry-after": "5"}, raw) is True
    assert key.cooldown_remaining == pytest.approx(until_next_month(), abs=5)
    capped = make_pool(1, max_cooldown=86400).key("key-0")
    mark_key_on_response(capped, 429, {}, raw)
    assert capped.cooldown_remaining == pytest.approx(min(86400, until_next_month()), abs=5)


def test_plain_rate_limit_body_keeps_retry_after(make_pool):
    key = make_pool(1).key("key-0")
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    assert mark_key_on_response(key, 429, [("retry-after", "9")], body)
    assert key.cooldown_remaining == pytest.approx(9)


def test_garbage_body_falls_back_to_headers(make_pool):
    key = make_pool(1).key("key-0")
    assert mark_key_on_response(key, 429, {"retry-after-ms": "2000"}, b"\xff<html>")
    assert key.cooldown_remaining == pytest.approx(2)


def test_cooldowns_are_clamped_by_max_cooldown(make_pool):
    key = make_pool(1, default_cooldown=10, max_cooldown=30, quota_cooldown=30).key("key-0")
    mark_key_on_response(key, 429, {"retry-after": "3600"})
    assert key.cooldown_remaining == pytest.approx(30)


def test_permanent_key_stays_permanent(make_pool):
    key = make_pool(1).key("key-0")
    mark_key_on_response(key, 403)
    assert mark_key_on_response(key, 429, {"retry-after": "1"}) is True
    assert key.state == KeyState.PERMANENT


@pytest.mark.parametrize(
    "retry_after", ["99999999999999999999", "1e300", "Fri, 31 Dec 9999 23:59:59 GMT"]
)
def test_absurd_cooldowns_are_clamped_to_one_day(make_pool, retry_after):
    key = make_pool(1).key("key-0")
    mark_key_on_response(key, 429, {"retry-after": retry_after})
    assert key.cooldown_remaining == pytest.approx(86400)


def test_a_retry_after_date_in_the_past_means_retry_soon(make_pool):
    key = make_pool(1).key("key-0")
    mark_key_on_response(key, 429, {"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert key.cooldown_remaining == pytest.approx(1.0)


def test_bad_arguments(make_pool):
    key = make_pool(1).key("key-0")
    with pytest.raises(TypeError):
        mark_key_on_response(key, 429, body=123)
    with pytest.raises(kf.ConfigError, match="status must be an HTTP status code"):
        mark_key_on_response(key, 70000)
    with pytest.raises(TypeError):
        mark_key_on_response("not a key", 429)
    assert key.state == KeyState.VALID
