//! Providers' rate-limit headers: how much of each limit a key has left, and
//! when it resets. Read on every upstream response (any status, streams too),
//! they let the pool move off a key before it answers 429.
//!
//! Two families:
//! * Anthropic (docs.anthropic.com, "Rate limits", response headers):
//!   `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`,
//!   the reset an RFC 3339 time;
//! * OpenAI and the APIs compatible with it (platform.openai.com, "Rate
//!   limits", rate limits in headers): `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`,
//!   the reset a duration such as `6m0s`, `1s`, `20ms` or `1h2m3.5s`. Groq
//!   sends the same (console.groq.com/docs/rate-limits: the requests limit
//!   is per day, the tokens limit per minute, `retry-after` on 429 only);
//!   Azure OpenAI sends only the `remaining` ones.
//!
//! and the variants of OpenAI-compatible APIs, read into the same limits:
//! * Mistral, token limits per minute, undocumented but sent on every answer
//!   (seen in github.com/mistralai/client-ts/issues/169 and clients that read
//!   them): `ratelimitbysize-{limit,remaining,reset}` (reset in seconds),
//!   `x-ratelimitbysize-{limit,remaining}-minute`, and lately
//!   `x-ratelimit-{limit,remaining}-tokens-minute` and
//!   `x-ratelimit-{limit,remaining}-req-minute`; the `-month` ones are a
//!   monthly budget, not a rate, and are left out;
//! * Together (docs.together.ai/docs/rate-limits): `x-ratelimit-{limit,remaining,reset}`
//!   for requests (reset in seconds) and `x-tokenlimit-{limit,remaining}`;
//! * a bare-number reset is seconds from now, or a Unix time when it is one
//!   (seconds, or milliseconds as OpenRouter's `X-RateLimit-Reset`).

use std::time::{Duration, SystemTime};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
}

impl LimitKind {
    pub const ALL: [LimitKind; 4] = [
        LimitKind::Requests,
        LimitKind::Tokens,
        LimitKind::InputTokens,
        LimitKind::OutputTokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::InputTokens => "input_tokens",
            LimitKind::OutputTokens => "output_tokens",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn anthropic(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::InputTokens => "input-tokens",
            LimitKind::OutputTokens => "output-tokens",
        }
    }
}

/// One limit as a response reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// How long until it resets, from the response; None when absent,
    /// unparseable or in the past.
    pub reset: Option<Duration>,
}

/// Every limit a response reports, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub limits: [Limit; 4],
}

impl RateLimits {
    pub fn get(&self, kind: LimitKind) -> &Limit {
        &self.limits[kind.index()]
    }

    pub fn is_empty(&self) -> bool {
        self.limits
            .iter()
            .all(|l| l.limit.is_none() && l.remaining.is_none())
    }

    /// The limit that is used up, if any: the one whose reset is furthest
    /// (a key is usable again only once every spent limit has reset). Only
    /// limits with a usable reset count.
    pub fn depleted(&self) -> Option<(LimitKind, Duration)> {
        LimitKind::ALL
            .iter()
            .filter_map(|&kind| {
                let limit = self.get(kind);
                match (limit.remaining, limit.reset) {
                    (Some(0), Some(reset)) if !reset.is_zero() => Some((kind, reset)),
                    _ => None,
                }
            })
            .max_by_key(|(_, reset)| *reset)
    }
}

/// The rate limits `headers` report. Only headers whose names start with one
/// of the two prefixes are looked at; anything unparseable is left out.
pub fn parse<'a, I>(headers: I, now: SystemTime) -> RateLimits
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    parse_with(headers, || now)
}

/// [`parse`], asking `now` for the time only for a reset header (most
/// answers have none, and a clock read is not free).
pub fn parse_with<'a, I>(headers: I, now: impl Fn() -> SystemTime) -> RateLimits
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut out = RateLimits::default();
    // A value is read only for a rate-limit header's name: every answer
    // carries headers, few of them these.
    let text = |value| std::str::from_utf8(value).ok().map(str::trim);
    for (name, value) in headers {
        if let Some(rest) = strip_prefix_ignore_case(name, "anthropic-ratelimit-") {
            let Some(value) = text(value) else {
                continue;
            };
            for kind in LimitKind::ALL {
                let Some(field) = rest
                    .strip_prefix(kind.anthropic())
                    .and_then(|f| f.strip_prefix('-'))
                else {
                    continue;
                };
                let limit = &mut out.limits[kind.index()];
                match field {
                    "limit" => limit.limit = value.parse().ok(),
                    "remaining" => limit.remaining = value.parse().ok(),
                    "reset" => limit.reset = rfc3339_from_now(value, now()),
                    _ => {}
                }
            }
        } else if let Some((field, kind)) = compatible_field(name) {
            let Some(value) = text(value) else {
                continue;
            };
            let limit = &mut out.limits[kind.index()];
            match field {
                "limit" => limit.limit = value.parse().ok(),
                "remaining" => limit.remaining = value.parse().ok(),
                "reset" => limit.reset = reset_from_now(value, now()),
                _ => {}
            }
        }
    }
    out
}

/// The field (`limit`, `remaining`, `reset`) and kind of an OpenAI-style
/// rate-limit header, in any of the variants the compatible APIs send.
fn compatible_field(name: &str) -> Option<(&str, LimitKind)> {
    if let Some(rest) = strip_prefix_ignore_case(name, "x-ratelimit-") {
        // OpenAI, Groq, Azure; Mistral's -tokens-minute and -req-minute;
        // Together's bare x-ratelimit-{limit,remaining,reset} (requests).
        return match rest.split_once('-') {
            None => Some((rest, LimitKind::Requests)),
            Some((field, kind)) => match kind.to_ascii_lowercase().as_str() {
                "requests" | "req-minute" => Some((field, LimitKind::Requests)),
                "tokens" | "tokens-minute" => Some((field, LimitKind::Tokens)),
                _ => None,
            },
        };
    }
    if let Some(rest) = strip_prefix_ignore_case(name, "ratelimitbysize-") {
        return Some((rest, LimitKind::Tokens));
    }
    if let Some(rest) = strip_prefix_ignore_case(name, "x-ratelimitbysize-") {
        let field = rest.strip_suffix("-minute")?;
        return Some((field, LimitKind::Tokens));
    }
    if let Some(field) = strip_prefix_ignore_case(name, "x-tokenlimit-") {
        return Some((field, LimitKind::Tokens));
    }
    None
}

/// How long until a reset given as a duration (`6m0s`), a number of
/// seconds (`43`), or a Unix time in seconds or milliseconds; None when it
/// is none of these, or not in the future.
fn reset_from_now(value: &str, now: SystemTime) -> Option<Duration> {
    if let Some(d) = go_duration(value) {
        return Some(d).filter(|d| !d.is_zero());
    }
    let number: f64 = value
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    // Past 2001-09-09 as seconds: a Unix time; past that as milliseconds too.
    let from_now = if number >= 1e11 {
        crate::retry_after::unix_time(number / 1000.0)
            .duration_since(now)
            .ok()?
    } else if number >= 1e9 {
        crate::retry_after::unix_time(number)
            .duration_since(now)
            .ok()?
    } else {
        Duration::try_from_secs_f64(number).ok()?
    };
    Some(from_now).filter(|d| !d.is_zero())
}

fn strip_prefix_ignore_case<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    (name.len() > prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &name[prefix.len()..])
}

/// A duration as OpenAI writes it: one or more `<number><unit>` with units
/// `h`, `m`, `s`, `ms` (also `us`/`µs`, `ns`), e.g. `6m0s`, `1.5s`, `20ms`.
pub fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, scale) = [
            ("ms", 1e-3),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ns", 1e-9),
            ("h", 3600.0),
            ("m", 60.0),
            ("s", 1.0),
        ]
        .into_iter()
        .find(|(unit, _)| rest.starts_with(unit))?;
        rest = &rest[unit.len()..];
        total += number * scale;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(1e12)))
}

/// How long until an RFC 3339 time (`2026-12-02T05:30:00Z`, fractions and
/// offsets allowed); None when it is not one, or not in the future.
fn rfc3339_from_now(text: &str, now: SystemTime) -> Option<Duration> {
    let when = rfc3339(text)?;
    when.duration_since(now).ok().filter(|d| !d.is_zero())
}

/// An RFC 3339 date-time.
pub fn rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<9}", &fraction[..digits.min(9)]);
        nanos = padded.parse().ok()?;
        rest = &fraction[digits..];
    }
    // Compared as bytes: what follows the seconds may be any text, and a
    // string cut inside a character would panic.
    let offset = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (h, m) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'-' {
                -(h * 3600 + m * 60)
            } else {
                h * 3600 + m * 60
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let seconds = u64::try_from(seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// The (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    /// 2026-12-02T05:00:00Z
    const NOW: u64 = 1_796_187_600;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn parse_pairs(pairs: &[(&str, &str)]) -> RateLimits {
        parse(pairs.iter().map(|(n, v)| (*n, v.as_bytes())), now())
    }

    #[test]
    fn anthropic_family() {
        let limits = parse_pairs(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2026-12-02T05:00:30Z"),
            ("Anthropic-RateLimit-Tokens-Limit", "40000"),
            ("anthropic-ratelimit-tokens-remaining", "39000"),
            ("anthropic-ratelimit-tokens-reset", "2026-12-02T05:00:01.5Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "12"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-12-02T06:00:00+01:00",
            ),
        ]);
        let requests = limits.get(LimitKind::Requests);
        assert_eq!((requests.limit, requests.remaining), (Some(50), Some(0)));
        assert_eq!(requests.reset, Some(Duration::from_secs(30)));
        assert_eq!(
            limits.get(LimitKind::Tokens).reset,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(limits.get(LimitKind::InputTokens).remaining, Some(12));
        assert_eq!(
            limits.get(LimitKind::OutputTokens).reset,
            None,
            "06:00+01:00 is 05:00Z: now, not in the future"
        );
        assert_eq!(
            limits.depleted(),
            Some((LimitKind::Requests, Duration::from_secs(30)))
        );
    }

    #[test]
    fn openai_family() {
        let limits = parse_pairs(&[
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-reset-requests", "12ms"),
            ("x-ratelimit-limit-tokens", "160000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-remaining-tokens_usage_based", "9"),
        ]);
        assert_eq!(
            limits.get(LimitKind::Requests).reset,
            Some(Duration::from_millis(12))
        );
        assert_eq!(
            limits.depleted(),
            Some((LimitKind::Tokens, Duration::from_secs(360)))
        );
    }

    #[test]
    fn compatible_variants() {
        // Groq (console.groq.com/docs/rate-limits): the OpenAI names.
        let groq = parse_pairs(&[
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-limit-tokens", "18000"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "7.66s"),
        ]);
        assert_eq!(
            groq.depleted(),
            Some((LimitKind::Tokens, Duration::from_millis(7660)))
        );
        // Mistral: ratelimitbysize-* (tokens, reset in seconds), and the
        // newer per-minute names.
        let mistral = parse_pairs(&[
            ("ratelimitbysize-limit", "500000"),
            ("ratelimitbysize-remaining", "0"),
            ("ratelimitbysize-reset", "43"),
            ("ratelimitbysize-query-cost", "52"),
            ("x-ratelimitbysize-limit-month", "1000000000"),
        ]);
        let tokens = mistral.get(LimitKind::Tokens);
        assert_eq!((tokens.limit, tokens.remaining), (Some(500_000), Some(0)));
        assert_eq!(
            mistral.depleted(),
            Some((LimitKind::Tokens, Duration::from_secs(43)))
        );
        let mistral = parse_pairs(&[
            ("x-ratelimit-limit-tokens-minute", "5000000"),
            ("x-ratelimit-remaining-tokens-minute", "4999911"),
            ("x-ratelimit-tokens-query-cost", "52"),
            ("x-ratelimit-limit-req-minute", "720"),
            ("x-ratelimit-remaining-req-minute", "717"),
            ("x-ratelimitbysize-remaining-minute", "4999911"),
            ("x-ratelimit-remaining-tokens-month", "3"),
        ]);
        assert_eq!(
            mistral.get(LimitKind::Requests).remaining,
            Some(717),
            "req-minute"
        );
        let tokens = mistral.get(LimitKind::Tokens);
        assert_eq!(
            (tokens.limit, tokens.remaining),
            (Some(5_000_000), Some(4_999_911)),
            "the monthly budget is not the per-minute limit"
        );
        // Together (docs.together.ai/docs/rate-limits).
        let together = parse_pairs(&[
            ("x-ratelimit-limit", "10"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "2"),
            ("x-tokenlimit-limit", "3000"),
            ("x-tokenlimit-remaining", "2800"),
        ]);
        assert_eq!(
            together.depleted(),
            Some((LimitKind::Requests, Duration::from_secs(2)))
        );
        assert_eq!(together.get(LimitKind::Tokens).remaining, Some(2800));
        // A reset as a Unix time, in seconds or milliseconds (OpenRouter).
        let in_ms = parse_pairs(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", &((NOW + 30) * 1000).to_string()),
        ]);
        assert_eq!(
            in_ms.depleted(),
            Some((LimitKind::Requests, Duration::from_secs(30)))
        );
        let in_secs = parse_pairs(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", &(NOW + 5).to_string()),
        ]);
        assert_eq!(
            in_secs.depleted(),
            Some((LimitKind::Requests, Duration::from_secs(5)))
        );
        let past = parse_pairs(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", &(NOW - 5).to_string()),
        ]);
        assert_eq!(past.depleted(), None);
        // Azure: remaining only, no reset: nothing to cool for.
        let azure = parse_pairs(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "0"),
        ]);
        assert_eq!(azure.get(LimitKind::Requests).remaining, Some(0));
        assert_eq!(azure.depleted(), None);
    }

    #[test]
    fn durations() {
        let cases = [
            ("1s", Some(1000)),
            ("20ms", Some(20)),
            ("6m0s", Some(360_000)),
            ("1h2m3.5s", Some(3_723_500)),
            ("0.5s", Some(500)),
            ("7.66s", Some(7660)),
            ("250us", Some(0)),
            ("", None),
            ("s", None),
            ("5", None),
            ("5x", None),
            ("-1s", None),
        ];
        for (text, millis) in cases {
            assert_eq!(
                go_duration(text).map(|d| d.as_millis() as u64),
                millis,
                "{text}"
            );
        }
    }

    #[test]
    fn garbage_and_past_resets_are_left_out() {
        let limits = parse_pairs(&[
            ("anthropic-ratelimit-requests-remaining", "zero"),
            ("anthropic-ratelimit-requests-reset", "yesterday"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2020-01-01T00:00:00Z"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "0s"),
            ("x-ratelimit-limit-images", "5"),
        ]);
        assert_eq!(limits.get(LimitKind::Requests).remaining, Some(0));
        assert_eq!(limits.get(LimitKind::Requests).reset, None);
        assert_eq!(limits.get(LimitKind::Tokens).reset, None);
        assert_eq!(
            limits.depleted(),
            None,
            "a past or missing reset is no cooldown"
        );
        assert!(parse_pairs(&[("content-type", "x")]).is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(rfc3339("2026-12-02T05:00:00Z"), Some(now()));
        assert_eq!(
            rfc3339("2024-02-29T12:00:00.25Z")
                .map(|t| t.duration_since(UNIX_EPOCH).unwrap().subsec_millis()),
            Some(250)
        );
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-12-02 05:00",
            "2026-12-02T05:00:00",
            "x",
            // Text after the seconds, cut inside a character by a naive
            // slice (the bytes of an offset's sign and colon).
            "2030-01-01T00:00:00\u{e9}\u{e9}\u{e9}",
            "2030-01-01T00:00:00+\u{e9}\u{e9}:",
            "2030-01-01T00:00:00+01\u{e9}0",
            "2030-01-01T00:00:00.5\u{e9}\u{e9}\u{e9}",
            "2030-01-01T00:00:00+24:00",
            "2030-01-01T00:00:00+01:60",
            "2030-01-01T00:00:00+1:000",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
        let east = rfc3339("2026-12-02T07:30:00+02:30").unwrap();
        let west = rfc3339("2026-12-02T02:00:00-03:00").unwrap();
        assert_eq!((east, west), (now(), now()));
    }

    proptest! {
        #[test]
        fn never_panics(name in "(anthropic|x)-ratelimit-[a-z-]{0,24}", value in "\\PC{0,40}") {
            let _ = parse([(name.as_str(), value.as_bytes())], now());
            let _ = go_duration(&value);
            let _ = rfc3339(&value);
        }

        #[test]
        fn a_date_followed_by_any_text_never_panics(tail in "\\PC{0,8}") {
            let value = format!("2030-01-01T00:00:00{tail}");
            let _ = rfc3339(&value);
            let _ = parse([("anthropic-ratelimit-requests-reset", value.as_bytes())], now());
        }

        #[test]
        fn durations_round_trip(h in 0u64..48, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}.{ms:03}s");
            let expected = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms);
            let got = go_duration(&text).unwrap();
            prop_assert!(got.abs_diff(expected) < Duration::from_micros(1));
        }
    }
}
