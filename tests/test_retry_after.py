"""Retry-After parsing through the binding: each rule once, header forms, `now`, and
arbitrary input."""

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keyfailover as kf
from keyfailover import parse_retry_after

NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


# The full table (the seed's, all three date formats, whitespace, zero and negative values)
# is header_table in src/retry_after.rs; here, one case of each rule through the binding.
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "60"}, 60.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "2500"}, 2.5),
        ({"retry-after-ms": "12.5"}, 0.0125),
        ({"retry-after-ms": "1500", "Retry-After": "30"}, 1.5),
        ({"retry-after-ms": "invalid", "Retry-After": "10"}, 10.0),
        ({"RETRY-AFTER": "7"}, 7.0),
        ({"Retry-After": "0"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "Sun, 06 Nov 1994 08:50:07 GMT"}, 30.0),
        ({"Retry-After": "Sun, 06 Nov 1994 08:49:00 GMT"}, 1.0),
        ({"retry-after-ms": "nope", "Retry-After": "Sun, 06 Nov 1994 08:49:38 GMT"}, 1.0),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_retry_after_rules(headers, expected):
    got = parse_retry_after(headers, now=NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_header_forms():
    assert parse_retry_after([("retry-after", "3")]) == 3.0
    assert parse_retry_after([(b"Retry-After", b"4")]) == 4.0
    assert parse_retry_after({b"retry-after-ms": b"250"}) == 0.25
    assert parse_retry_after([]) is None


def test_http_date_uses_the_wall_clock_by_default():
    import time

    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    got = parse_retry_after({"retry-after": in_a_minute})
    assert got is not None
    assert 55 < got <= 61


def test_bad_header_containers_are_type_errors():
    with pytest.raises(TypeError):
        parse_retry_after([("retry-after",)])
    with pytest.raises(TypeError):
        parse_retry_after([("retry-after", 5)])


text = st.text(max_size=40) | st.sampled_from(
    ["1e308", "1e400", "-0", "nan", "+3", " 1.5 ", "1e-400"]
)


@given(ms=text, seconds=text, now=st.floats(allow_nan=True, allow_infinity=True))
def test_parser_never_fails_or_goes_negative(ms, seconds, now):
    if not (now >= 0 and now != float("inf")):  # NaN, infinite or before 1970: refused
        with pytest.raises(kf.ConfigError, match="now must be a Unix time"):
            parse_retry_after({"retry-after": seconds}, now=now)
        return
    got = parse_retry_after({"retry-after-ms": ms, "retry-after": seconds}, now=now)
    assert got is None or (got > 0 and got != float("inf"))


@given(value=st.binary(max_size=40))
def test_parser_takes_any_bytes(value):
    got = parse_retry_after([(b"retry-after", value), (b"retry-after-ms", value)])
    assert got is None or got > 0
