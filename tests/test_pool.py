"""The key pool as a Python user sees it: construction, walking, marking, state."""

import pickle
import threading

import pytest
from conftest import FAKE_KEYS

import keyfailover as kf
from keyfailover import KeyState


def labels(walker: kf.Walker) -> list[str]:
    out = []
    while True:
        try:
            out.append(walker.next().label)
        except kf.PoolExhausted:
            return out


def test_sequence_keys_are_labelled_in_order(make_pool):
    pool = make_pool(3)
    assert len(pool) == 3
    assert [s["label"] for s in pool.snapshot()] == ["key-0", "key-1", "key-2"]
    assert pool.key("key-1").value == FAKE_KEYS[1]
    assert pool.states() == [KeyState.VALID] * 3


def test_mapping_keys_keep_labels_and_order():
    pool = kf.KeyPool({"prod-b": FAKE_KEYS[1], "prod-a": FAKE_KEYS[0]})
    assert labels(pool.walker()) == ["prod-b", "prod-a"]
    assert pool.key("prod-a").value == FAKE_KEYS[0]


@pytest.mark.parametrize(
    ("keys", "kwargs", "message"),
    [
        ([], {}, "at least one key"),
        (["sk-good-key", ""], {}, "key-1: the key is empty"),
        (["  \t "], {}, "key-0: the key is empty"),
        (["sk-has space"], {}, "whitespace"),
        ([FAKE_KEYS[0], FAKE_KEYS[0]], {}, "key-0 and key-1 hold the same key"),
        ({"a": FAKE_KEYS[0], "b": FAKE_KEYS[0]}, {}, "a and b hold the same key"),
        ({"": FAKE_KEYS[0]}, {}, "labels must not be empty"),
        (FAKE_KEYS[:1], {"default_cooldown": 0}, "default_cooldown must be positive"),
        (FAKE_KEYS[:1], {"default_cooldown": -1}, "default_cooldown must be positive"),
        (FAKE_KEYS[:1], {"quota_cooldown": 0.0}, "quota_cooldown must be positive"),
        (FAKE_KEYS[:1], {"max_cooldown": -5}, "max_cooldown must be positive"),
        (FAKE_KEYS[:1], {"max_cooldown": float("nan")}, "max_cooldown must be positive"),
        ("sk-just-one-string", {}, "not a single string"),
    ],
)
def test_bad_configuration_is_a_config_error(keys, kwargs, message):
    with pytest.raises(kf.ConfigError, match=message) as info:
        kf.KeyPool(keys, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, kf.KeyfailoverError)
    assert FAKE_KEYS[0] not in str(info.value)


def test_duplicate_labels_are_rejected():
    # A mapping cannot hold duplicate labels, but an items view can.
    class Items:
        def items(self):
            return [("a", FAKE_KEYS[0]), ("a", FAKE_KEYS[1])]

    with pytest.raises(kf.ConfigError, match="duplicate label 'a'"):
        kf.KeyPool(Items())


def test_a_mapping_with_label_and_key_swapped_is_refused_without_showing_the_key():
    with pytest.raises(kf.ConfigError, match="the key of entry 2 is 4 characters long") as raised:
        kf.KeyPool({"a": FAKE_KEYS[0], FAKE_KEYS[1]: "prod"})
    assert FAKE_KEYS[1] not in str(raised.value)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ([FAKE_KEYS[0], 42], "keys must be str, not int"),
        ([None], "keys must be str, not NoneType"),
        ({"a": b"sk-bytes"}, "keys must be str, not bytes"),
        ({1: FAKE_KEYS[0]}, "labels must be str, not int"),
        (42, "not int"),
        ("sk-one-string", "not a single string"),
    ],
)
def test_bad_keys_are_config_errors(keys, match):
    with pytest.raises(kf.ConfigError, match=match):
        kf.KeyPool(keys)


def test_max_cooldown_below_the_other_cooldowns_is_rejected():
    with pytest.raises(kf.ConfigError, match="shorter than default_cooldown"):
        kf.KeyPool(FAKE_KEYS[:1], max_cooldown=30)
    with pytest.raises(kf.ConfigError, match="shorter than quota_cooldown"):
        kf.KeyPool(FAKE_KEYS[:1], max_cooldown=120)


def test_unknown_label_is_a_key_error_that_never_echoes_a_key(make_pool):
    with pytest.raises(KeyError) as excinfo:
        make_pool().key("key-9")
    assert isinstance(excinfo.value, kf.UnknownKeyError)
    assert isinstance(excinfo.value, kf.KeyfailoverError)
    assert str(excinfo.value) == 'no key labelled "key-9"'
    with pytest.raises(kf.UnknownKeyError) as excinfo:
        make_pool().key(FAKE_KEYS[1])  # a key passed where a label belongs
    assert FAKE_KEYS[1] not in str(excinfo.value)
    assert FAKE_KEYS[1] not in repr(excinfo.value)
    assert kf.KeyPool(FAKE_KEYS[:2]).key("key-1").hint in str(excinfo.value)


# The walker's rules are tabled in Rust (walker_table in src/pool.rs); here, one case of
# each through the binding: types, the exhaustion exceptions and their retry_after.


def test_walker_skips_unavailable_keys(make_pool):
    pool = make_pool(3)
    pool.key("key-0").mark_temporary(30)
    pool.key("key-2").mark_permanent()
    walker = pool.walker()
    assert isinstance(walker, kf.Walker)
    key = walker.next()
    assert isinstance(key, kf.Key)
    assert key.label == "key-1"
    with pytest.raises(kf.TransientExhaustion) as info:
        walker.next()
    assert info.value.retry_after == 0.0, "a key was usable: nothing to wait for"


def test_cooling_pool_is_transiently_exhausted_until_the_first_cooldown_ends(make_pool, clock):
    pool = make_pool(2)
    pool.key("key-0").mark_temporary(60)
    pool.key("key-1").mark_temporary(10)
    walker = pool.walker()
    with pytest.raises(kf.TransientExhaustion) as info:
        walker.next()
    assert isinstance(info.value, kf.PoolExhausted)
    assert isinstance(info.value.retry_after, float)
    assert info.value.retry_after == pytest.approx(10), "the smallest remaining cooldown"
    # A key that recovers while the walk goes on is offered once; a fresh walker starts over.
    clock.advance(10)
    assert walker.next().label == "key-1"
    with pytest.raises(kf.PoolExhausted):
        walker.next()
    assert labels(pool.walker()) == ["key-1"]


def test_all_keys_permanent_is_permanent_exhaustion(make_pool):
    pool = make_pool(2)
    pool.key("key-0").mark_permanent()
    pool.key("key-1").mark_permanent()
    with pytest.raises(kf.PermanentExhaustion, match="all configured keys failed authentication"):
        pool.walker().next()


@pytest.mark.parametrize("cooldown", [None, 0, -10])
def test_a_cooldown_that_is_not_positive_means_the_default(make_pool, clock, cooldown):
    # The binding passes None, zero and negative cooldowns on as "the pool's default"
    # (NaN is a ConfigError: see test_bad_numbers_are_config_errors_not_silent_defaults).
    key = make_pool(1).key("key-0")
    assert key.mark_temporary(cooldown) is True
    assert key.cooldown_remaining == pytest.approx(60)
    clock.advance(59)
    assert key.state == KeyState.TEMPORARY
    clock.advance(1)
    assert key.state == KeyState.VALID


def test_walker_never_changes_state_and_walkers_are_independent(make_pool):
    pool = make_pool(2)
    first, second = pool.walker(), pool.walker()
    assert first.next().label == "key-0"
    assert first.next().label == "key-1"
    assert second.next().label == "key-0"
    assert pool.states() == [KeyState.VALID, KeyState.VALID]


def test_mark_temporary_semantics(make_pool, clock):
    pool = make_pool(1, max_cooldown=120, quota_cooldown=120)
    key = pool.key("key-0")
    assert key.mark_temporary(60) is True
    assert key.state == KeyState.TEMPORARY
    assert key.mark_temporary(10) is False
    assert key.cooldown_remaining == pytest.approx(60)
    assert key.mark_temporary(90) is False
    assert key.cooldown_remaining == pytest.approx(90), "the later deadline wins"
    assert key.mark_temporary(10_000) is False
    assert key.cooldown_remaining == pytest.approx(120), "clamped to max_cooldown"
    clock.advance(120)
    assert key.state == KeyState.VALID
    assert key.cooldown_remaining == 0.0
    assert key.mark_temporary(float("inf")) is True
    assert key.cooldown_remaining == pytest.approx(120)


def test_default_cooldown_is_configurable(make_pool, clock):
    key = make_pool(1, default_cooldown=5).key("key-0")
    key.mark_temporary()
    assert key.cooldown_remaining == pytest.approx(5)
    clock.advance(5)
    assert key.state == KeyState.VALID


def test_permanent_is_terminal_until_reset(make_pool):
    key = make_pool(1).key("key-0")
    assert key.mark_permanent() is True
    assert key.mark_permanent() is False
    assert key.mark_temporary(5) is False
    assert key.state == KeyState.PERMANENT
    assert key.cooldown_remaining == 0.0
    key.reset()
    assert key.state == KeyState.VALID
    assert key.mark_temporary(5) is True


def test_snapshot_reports_state_and_cooldown(make_pool, clock):
    pool = make_pool(3)
    pool.key("key-0").mark_temporary(30)
    pool.key("key-2").mark_permanent()
    clock.advance(10)
    extra = {"group": None, "remaining": {}, "limit": {}, "in_flight": 0}
    assert pool.snapshot() == [
        {"label": "key-0", "hint": "sk-a...0000", "state": "temporary", "cooldown_remaining": 20.0}
        | extra,
        {"label": "key-1", "hint": "sk-a...0001", "state": "valid", "cooldown_remaining": 0.0}
        | extra,
        {"label": "key-2", "hint": "sk-a...0002", "state": "permanent", "cooldown_remaining": 0.0}
        | extra,
    ]
    assert pool.states() == [KeyState.TEMPORARY, KeyState.VALID, KeyState.PERMANENT]


def test_key_state_is_comparable_and_hashable():
    assert KeyState.VALID == KeyState.VALID
    assert KeyState.VALID != KeyState.PERMANENT
    assert {KeyState.VALID: 1}[KeyState.VALID] == 1
    assert [s.value for s in (KeyState.VALID, KeyState.TEMPORARY, KeyState.PERMANENT)] == [
        "valid",
        "temporary",
        "permanent",
    ]


def test_key_handles_compare_by_identity_of_the_key(make_pool):
    pool = make_pool(2)
    assert pool.walker().next() == pool.key("key-0")
    assert pool.key("key-0") != pool.key("key-1")
    assert len({pool.key("key-0"), pool.walker().next()}) == 1
    assert pool.key("key-0") != make_pool(2).key("key-0")


# The masking rule's table is hints_mask_keys in src/pool.rs.
@pytest.mark.parametrize(
    ("secret", "hint"),
    [
        ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz-wxyz", "sk-a...wxyz"),
        ("short", "..."),
    ],
)
def test_hints_are_masked(secret, hint):
    assert kf.KeyPool([secret]).key("key-0").hint == hint


def test_no_secret_in_repr_str_snapshot_or_errors(make_pool, clock):
    pool = make_pool(2)
    key = pool.key("key-0")
    key.mark_temporary(1)
    walker = pool.walker()
    texts = [repr(pool), str(pool), repr(key), str(key), repr(walker), repr(pool.snapshot())]
    walker.next()
    pool.key("key-1").mark_permanent()
    with pytest.raises(kf.TransientExhaustion) as info:
        walker.next()
    texts += [str(info.value), repr(info.value)]
    for text in texts:
        for secret in FAKE_KEYS:
            assert secret not in text
            assert secret[8:20] not in text


def test_exceptions_form_one_hierarchy():
    assert issubclass(kf.PoolExhausted, kf.KeyfailoverError)
    assert issubclass(kf.TransientExhaustion, kf.PoolExhausted)
    assert issubclass(kf.PermanentExhaustion, kf.PoolExhausted)
    assert issubclass(kf.UpstreamError, kf.KeyfailoverError)
    assert issubclass(kf.KeyfailoverError, Exception)
    err = kf.TransientExhaustion(2.5)
    assert err.retry_after == 2.5
    assert "2.500" in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert (type(clone), clone.retry_after, str(clone)) == (kf.TransientExhaustion, 2.5, str(err))
    assert str(kf.PermanentExhaustion()) == "all configured keys failed authentication"


def test_bad_numbers_are_config_errors_not_silent_defaults(make_pool):
    """NaN and out-of-range numbers: a ConfigError naming the argument, where they were a
    silent default, a clock stuck at its end, 1970 as "now", or a bare OverflowError."""
    key = make_pool(1).key("key-0")
    with pytest.raises(kf.ConfigError, match="cooldown must be a number of seconds, not NaN"):
        key.mark_temporary(float("nan"))
    assert key.state == kf.KeyState.VALID
    for status in (-1, 99, 600, 2**40):
        with pytest.raises(kf.ConfigError, match="status must be an HTTP status code"):
            kf.mark_key_on_response(key, status)
    for now in (float("nan"), float("inf"), -1.0):
        with pytest.raises(kf.ConfigError, match="now must be a Unix time"):
            kf.parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=now)
    with pytest.raises(kf.ConfigError, match="100 years"):
        kf.ManualClock(1e19)
    clock = kf.ManualClock(10.0)
    with pytest.raises(kf.ConfigError, match="100 years"):
        clock.advance(1e19)
    assert clock.now() == 10.0, "a refused advance moves nothing"
    with pytest.raises(kf.ConfigError, match="unknown error type") as info:
        kf.error_response("nope", "m")
    known = str(info.value).split("expected one of ", 1)[1].split(", ")
    assert len(known) == len(set(known)), known


def test_manual_clock():
    clock = kf.ManualClock(10.0)
    assert clock.now() == 10.0
    clock.advance(2.5)
    assert clock.now() == 12.5
    with pytest.raises(kf.ConfigError):
        clock.advance(-1)
    with pytest.raises(kf.ConfigError):
        kf.ManualClock(float("nan"))


def test_default_clock_is_real_time():
    key = kf.KeyPool(FAKE_KEYS[:1]).key("key-0")
    key.mark_temporary(0.05)
    assert key.state == KeyState.TEMPORARY
    assert 0 < key.cooldown_remaining <= 0.05
    threading.Event().wait(0.08)
    assert key.state == KeyState.VALID


def run_threads(n, target):
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        for _ in range(200):
            target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_marks_longer_cooldown_wins(make_pool, clock):
    key = make_pool(1).key("key-0")
    run_threads(16, lambda i: key.mark_temporary(60 if i % 2 == 0 else 10))
    clock.advance(50)
    assert key.state == KeyState.TEMPORARY
    clock.advance(15)
    assert key.state == KeyState.VALID


def test_concurrent_marks_permanent_wins(make_pool):
    key = make_pool(1).key("key-0")
    run_threads(16, lambda i: key.mark_permanent() if i % 2 == 0 else key.mark_temporary(60))
    assert key.state == KeyState.PERMANENT


def test_concurrent_transitions_are_reported_once(make_pool):
    key = make_pool(1).key("key-0")
    wins = []
    run_threads(16, lambda i: wins.append(key.mark_temporary(60)))
    assert wins.count(True) == 1
