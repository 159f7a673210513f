//! Cooldown hints from response headers.
//!
//! Sources, in order; each one that is missing, unparseable, zero, negative or
//! in the past falls through to the next:
//! 1. `retry-after-ms`: milliseconds, fractions allowed (OpenAI);
//! 2. `Retry-After` as delay-seconds, fractions allowed (as the SDKs accept);
//! 3. `Retry-After` as an HTTP-date (IMF-fixdate, RFC 850 or asctime); a date
//!    that is now or in the past means "retry now": [`RETRY_NOW`].
//!
//! Values are taken as given, however large; the pool clamps them (see
//! `pool::UPSTREAM_CEILING`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The cooldown the headers ask for, if any. `now` is the current unix time,
/// used for the HTTP-date form. Never panics; never returns a negative or
/// non-finite duration.
pub fn parse_retry_after<'a, I>(headers: I, now: SystemTime) -> Option<Duration>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut millis = None;
    let mut standard = None;
    for (name, value) in headers {
        if millis.is_none() && name.eq_ignore_ascii_case("retry-after-ms") {
            millis = Some(value);
        } else if standard.is_none() && name.eq_ignore_ascii_case("retry-after") {
            standard = Some(value);
        }
    }
    millis
        .and_then(positive_number)
        .map(|ms| seconds(ms / 1000.0))
        .or_else(|| standard.and_then(positive_number).map(seconds))
        .or_else(|| standard.and_then(|v| http_date_delay(v, now)))
}

/// Seconds as a duration, saturating: a cooldown that long is clamped later.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// A finite, strictly positive decimal number, surrounding whitespace ignored.
fn positive_number(raw: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    // Only plain decimals: Rust's float parser also takes "inf" and "NaN".
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'+' | b'-' | b'e' | b'E'));
    if !plain {
        return None;
    }
    let n: f64 = text.parse().ok()?;
    (n.is_finite() && n > 0.0).then_some(n)
}

/// The cooldown for a Retry-After date that has already passed: the
/// smallest keyfailover gives, so the key is tried again by the next
/// request but not hammered by this one.
pub const RETRY_NOW: Duration = Duration::from_secs(1);

fn http_date_delay(raw: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(now)
            .ok()
            .filter(|d| !d.is_zero())
            .unwrap_or(RETRY_NOW),
    )
}

/// `SystemTime` from unix seconds, clamped to the epoch for negative input.
pub fn unix_time(seconds: f64) -> SystemTime {
    if seconds.is_finite() && seconds > 0.0 {
        UNIX_EPOCH
            .checked_add(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO))
            .unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Sun, 06 Nov 1994 08:49:37 GMT
    const NOW: u64 = 784_111_777;

    fn parse(headers: &[(&str, &str)]) -> Option<Duration> {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        parse_retry_after(headers.iter().map(|(n, v)| (*n, v.as_bytes())), now)
    }

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    /// The seed's table, plus fractional seconds.
    #[test]
    #[allow(clippy::type_complexity)]
    fn header_table() {
        let cases: &[(&str, &[(&str, &str)], Option<Duration>)] = &[
            ("no_headers", &[], None),
            (
                "openai_retry_after_ms",
                &[("retry-after-ms", "2500")],
                ms(2500),
            ),
            (
                "whitespace_trimmed_ms",
                &[("retry-after-ms", " 1500 ")],
                ms(1500),
            ),
            ("negative_ms", &[("retry-after-ms", "-100")], None),
            (
                "fractional_ms",
                &[("retry-after-ms", "1.5")],
                Some(Duration::from_micros(1500)),
            ),
            ("standard_seconds", &[("Retry-After", "60")], ms(60_000)),
            (
                "whitespace_trimmed_seconds",
                &[("Retry-After", " 30 ")],
                ms(30_000),
            ),
            ("fractional_seconds", &[("retry-after", "1.5")], ms(1500)),
            ("zero_seconds", &[("Retry-After", "0")], None),
            ("negative_seconds", &[("Retry-After", "-5")], None),
            (
                "ms_preferred",
                &[("retry-after-ms", "1500"), ("Retry-After", "30")],
                ms(1500),
            ),
            (
                "ms_invalid_falls_back",
                &[("retry-after-ms", "invalid"), ("Retry-After", "10")],
                ms(10_000),
            ),
            (
                "ms_zero_falls_back",
                &[("retry-after-ms", "0"), ("Retry-After", "5")],
                ms(5000),
            ),
            (
                "both_zero",
                &[("retry-after-ms", "0"), ("Retry-After", "0")],
                None,
            ),
            (
                "names_case_insensitive",
                &[("RETRY-AFTER-MS", "10"), ("rEtRy-AfTeR", "1")],
                ms(10),
            ),
            ("not_a_number", &[("Retry-After", "soon")], None),
            (
                "infinity_rejected",
                &[("Retry-After", "inf"), ("retry-after-ms", "NaN")],
                None,
            ),
            ("empty", &[("Retry-After", "  ")], None),
            (
                "imf_fixdate",
                &[("Retry-After", "Sun, 06 Nov 1994 08:50:07 GMT")],
                ms(30_000),
            ),
            (
                "rfc850",
                &[("Retry-After", "Sunday, 06-Nov-94 08:50:37 GMT")],
                ms(60_000),
            ),
            (
                "asctime",
                &[("Retry-After", "Sun Nov  6 08:51:37 1994")],
                ms(120_000),
            ),
            (
                "date_with_whitespace",
                &[("Retry-After", "  Sun, 06 Nov 1994 08:49:47 GMT ")],
                ms(10_000),
            ),
            (
                "date_in_the_past_means_retry_now",
                &[("Retry-After", "Sun, 06 Nov 1994 08:49:00 GMT")],
                Some(RETRY_NOW),
            ),
            (
                "date_now_means_retry_now",
                &[("Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT")],
                Some(RETRY_NOW),
            ),
            (
                "far_future_date_taken_as_given",
                &[("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT")],
                Some(Duration::from_secs(253_402_300_799 - NOW)),
            ),
            (
                "ms_zero_then_date",
                &[
                    ("retry-after-ms", "0"),
                    ("Retry-After", "Sun, 06 Nov 1994 08:49:38 GMT"),
                ],
                ms(1000),
            ),
        ];
        for (name, headers, expected) in cases {
            assert_eq!(parse(headers), *expected, "{name}");
        }
    }

    #[test]
    fn first_header_of_each_name_counts() {
        assert_eq!(
            parse(&[("retry-after", "3"), ("retry-after", "9")]),
            ms(3000)
        );
    }

    #[test]
    fn invalid_utf8_is_ignored() {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        let headers: [(&str, &[u8]); 2] = [("retry-after-ms", b"\xff\xfe"), ("retry-after", b"2")];
        assert_eq!(parse_retry_after(headers, now), ms(2000));
    }

    #[test]
    fn huge_values_do_not_overflow() {
        assert_eq!(parse(&[("retry-after", "1e400")]), None);
        assert_eq!(parse(&[("retry-after", "1e300")]), Some(Duration::MAX));
    }

    proptest! {
        #[test]
        fn never_panics_or_goes_negative(ms in proptest::collection::vec(any::<u8>(), 0..40),
                                         ra in proptest::collection::vec(any::<u8>(), 0..40),
                                         now in any::<u64>()) {
            let now = UNIX_EPOCH + Duration::from_secs(now % 10_000_000_000);
            let headers: [(&str, &[u8]); 2] = [("retry-after-ms", &ms), ("retry-after", &ra)];
            if let Some(d) = parse_retry_after(headers, now) {
                prop_assert!(d > Duration::ZERO);
                prop_assert!(d.as_secs_f64().is_finite());
            }
        }

        #[test]
        fn numbers_round_trip(secs in 1u32..1_000_000) {
            let text = secs.to_string();
            prop_assert_eq!(parse(&[("retry-after", &text)]), Some(Duration::from_secs(secs.into())));
        }
    }
}
