//! The marking rules: what an upstream response says about the key behind it.

use std::time::{Duration, SystemTime};

pub use crate::pool::Reason;
use crate::pool::{Cause, Key};
use crate::retry_after::parse_retry_after;

/// What a response means for the key that was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not about the key (success, 400, 404, 500, 529, ...): pass it on.
    NotKeySpecific,
    /// Rate-limited: cool down for the hinted time, or the pool's default.
    RateLimited(Option<Duration>),
    /// The key's quota or spend cap is used up: the pool's quota cooldown.
    QuotaExhausted,
    /// Unauthorized, forbidden or out of billing: retire the key.
    Revoked,
}

impl Verdict {
    /// True when the caller should mark the key and try the next one.
    pub fn is_key_specific(self) -> bool {
        self != Verdict::NotKeySpecific
    }

    pub fn reason(self) -> Option<Reason> {
        match self {
            Verdict::NotKeySpecific => None,
            Verdict::RateLimited(_) => Some(Reason::RateLimited),
            Verdict::QuotaExhausted => Some(Reason::QuotaExhausted),
            Verdict::Revoked => Some(Reason::Revoked),
        }
    }

    /// Marks `key` accordingly, for an answer with `status`; returns whether
    /// the verdict is key-specific. A cooldown the upstream asked for is
    /// clamped to the pool's
    /// [`upstream_ceiling`](crate::pool::Cooldowns::upstream_ceiling).
    pub fn apply(self, key: &Key, status: Option<u16>) -> bool {
        let Some(reason) = self.reason() else {
            return false;
        };
        let cause = Cause::new(reason, status);
        match self {
            Verdict::NotKeySpecific => {}
            Verdict::RateLimited(cooldown) => {
                let ceiling = key.pool().cooldowns().upstream_ceiling();
                key.cool(cooldown.map(|d| d.min(ceiling)), cause);
            }
            Verdict::QuotaExhausted => {
                key.cool(Some(key.pool().cooldowns().quota), cause);
            }
            Verdict::Revoked => {
                key.retire(cause);
            }
        };
        true
    }
}

/// Whether the verdict for this status depends on the error body, so that a
/// caller reads (a bounded prefix of) it before classifying.
pub fn needs_body(status: u16) -> bool {
    status == 429
}

/// The verdict for a response head (and, for 429, its error body).
pub fn classify<'a, I>(status: u16, headers: I, body: Option<&[u8]>, now: SystemTime) -> Verdict
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    classify_head(status, parse_retry_after(headers, now), body)
}

/// [`classify`] with the head's Retry-After already parsed (the failover
/// client parses it once per response).
pub fn classify_head(status: u16, retry_after: Option<Duration>, body: Option<&[u8]>) -> Verdict {
    match status {
        429 if body.and_then(error_body_verdict) == Some(Verdict::QuotaExhausted) => {
            Verdict::QuotaExhausted
        }
        429 => Verdict::RateLimited(retry_after),
        401..=403 => Verdict::Revoked,
        _ => Verdict::NotKeySpecific,
    }
}

/// The verdict for a 2xx stream whose first event (its `data`) is an error:
/// providers report some key failures that way after answering 200. A
/// rate-limit event carries no Retry-After of its own, so the head's applies.
pub fn first_event_verdict(data: &[u8], head_retry_after: Option<Duration>) -> Verdict {
    match error_body_verdict(data) {
        Some(Verdict::RateLimited(None)) => Verdict::RateLimited(head_retry_after),
        Some(verdict) => verdict,
        None => Verdict::NotKeySpecific,
    }
}

/// Marks `key` from an upstream response; true when the failure is
/// key-specific and the caller should try the next key.
pub fn mark_key_on_response<'a, I>(
    key: &Key,
    status: u16,
    headers: I,
    body: Option<&[u8]>,
    now: SystemTime,
) -> bool
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    classify(status, headers, body, now).apply(key, Some(status))
}

/// The key-specific meaning of an error envelope (Anthropic or OpenAI), such
/// as a 429 body or the data of an SSE `error` event; `None` when it is not
/// about the key or is not an error envelope at all.
pub fn error_body_verdict(body: &[u8]) -> Option<Verdict> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let field = |name: &str| error.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let spend_cap = error
        .pointer("/details/error_code")
        .and_then(|v| v.as_str())
        .is_some_and(|c| c == "enforced_spend_limit_reached");
    let (kind, code) = (field("type"), field("code"));
    let is = |names: &[&str]| names.contains(&kind) || names.contains(&code);
    if spend_cap || is(&["insufficient_quota"]) {
        Some(Verdict::QuotaExhausted)
    } else if is(&["rate_limit_error", "rate_limit_exceeded"]) {
        Some(Verdict::RateLimited(None))
    } else if is(&[
        "authentication_error",
        "permission_error",
        "invalid_api_key",
    ]) {
        Some(Verdict::Revoked)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::pool::{Cooldowns, KeyPool, KeyState};
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    fn fresh_key() -> (Key, Arc<ManualClock>) {
        let clock = ManualClock::new(Duration::ZERO);
        let pool = KeyPool::from_keys(
            ["k"],
            Cooldowns::default(),
            Some(clock.clone() as Arc<dyn Clock>),
        )
        .unwrap();
        (pool.key("key-0").unwrap(), clock)
    }

    fn mark(key: &Key, status: u16, headers: &[(&str, &str)], body: Option<&str>) -> bool {
        let headers = headers.iter().map(|(n, v)| (*n, v.as_bytes()));
        mark_key_on_response(key, status, headers, body.map(str::as_bytes), UNIX_EPOCH)
    }

    /// The seed's marking table.
    #[test]
    #[allow(clippy::type_complexity)]
    fn marking_table() {
        let cases: &[(&str, u16, &[(&str, &str)], bool, KeyState, Option<u64>)] = &[
            (
                "429_with_retry_after_seconds",
                429,
                &[("Retry-After", "5")],
                true,
                KeyState::Temporary,
                Some(5000),
            ),
            (
                "429_with_retry_after_ms",
                429,
                &[("retry-after-ms", "1500")],
                true,
                KeyState::Temporary,
                Some(1500),
            ),
            (
                "429_no_headers_uses_default",
                429,
                &[],
                true,
                KeyState::Temporary,
                Some(60_000),
            ),
            (
                "401_marks_permanent",
                401,
                &[],
                true,
                KeyState::Permanent,
                None,
            ),
            (
                "402_marks_permanent",
                402,
                &[],
                true,
                KeyState::Permanent,
                None,
            ),
            (
                "403_marks_permanent",
                403,
                &[],
                true,
                KeyState::Permanent,
                None,
            ),
            (
                "200_does_not_mark",
                200,
                &[("Retry-After", "5")],
                false,
                KeyState::Valid,
                None,
            ),
            ("400_does_not_mark", 400, &[], false, KeyState::Valid, None),
            ("404_does_not_mark", 404, &[], false, KeyState::Valid, None),
            ("500_does_not_mark", 500, &[], false, KeyState::Valid, None),
            (
                "503_does_not_mark",
                503,
                &[("Retry-After", "5")],
                false,
                KeyState::Valid,
                None,
            ),
            ("529_does_not_mark", 529, &[], false, KeyState::Valid, None),
        ];
        for (name, status, headers, key_specific, state, cooldown_ms) in cases {
            let (key, clock) = fresh_key();
            assert_eq!(mark(&key, *status, headers, None), *key_specific, "{name}");
            assert_eq!(key.state(), *state, "{name}");
            if let Some(ms) = cooldown_ms {
                clock.advance(Duration::from_millis(ms - 1));
                assert_eq!(key.state(), KeyState::Temporary, "{name}: still cooling");
                clock.advance(Duration::from_millis(1));
                assert_eq!(key.state(), KeyState::Valid, "{name}: cooled down");
            }
        }
    }

    #[test]
    fn quota_exhaustion_gets_the_quota_cooldown_whatever_retry_after_says() {
        let bodies = [
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
            r#"{"error":{"message":"quota","type":"requests","code":"insufficient_quota"}}"#,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"spend cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
        ];
        for body in bodies {
            let (key, clock) = fresh_key();
            assert!(mark(&key, 429, &[("retry-after", "5")], Some(body)));
            assert_eq!(
                key.status().cooldown_remaining,
                Duration::from_secs(3600),
                "{body}"
            );
            clock.advance(Duration::from_secs(3600));
            assert_eq!(key.state(), KeyState::Valid);
        }
    }

    #[test]
    fn ordinary_rate_limit_bodies_keep_retry_after() {
        let (key, _) = fresh_key();
        let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        assert!(mark(&key, 429, &[("retry-after", "7")], Some(body)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(7));
        let (key, _) = fresh_key();
        assert!(mark(&key, 429, &[], Some("not json {")));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(60));
    }

    #[test]
    fn error_envelopes() {
        let cases = [
            (
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"x"}}"#,
                Some(Verdict::RateLimited(None)),
            ),
            (
                r#"{"type":"error","error":{"type":"authentication_error","message":"x"}}"#,
                Some(Verdict::Revoked),
            ),
            (
                r#"{"type":"error","error":{"type":"permission_error","message":"x"}}"#,
                Some(Verdict::Revoked),
            ),
            (
                r#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#,
                None,
            ),
            (
                r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
                None,
            ),
            (
                r#"{"error":{"message":"x","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
                Some(Verdict::RateLimited(None)),
            ),
            (
                r#"{"error":{"message":"x","type":"insufficient_quota","param":null,"code":null}}"#,
                Some(Verdict::QuotaExhausted),
            ),
            (
                r#"{"error":{"message":"x","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
                Some(Verdict::Revoked),
            ),
            (r#"{"error":"rate_limit_error"}"#, None),
            (r#"{"type":"message"}"#, None),
            ("", None),
        ];
        for (body, expected) in cases {
            assert_eq!(error_body_verdict(body.as_bytes()), expected, "{body}");
        }
    }

    #[test]
    fn absurd_cooldowns_are_clamped_to_a_day_or_max_cooldown() {
        for value in [
            "99999999999999999999",
            "1e300",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            let (key, _) = fresh_key();
            assert!(mark(&key, 429, &[("retry-after", value)], None));
            assert_eq!(
                key.status().cooldown_remaining,
                crate::pool::UPSTREAM_CEILING,
                "{value}"
            );
        }
        let pool = KeyPool::from_keys(
            ["k"],
            Cooldowns {
                max: Some(Duration::from_secs(7200)),
                ..Cooldowns::default()
            },
            Some(ManualClock::new(Duration::ZERO) as Arc<dyn Clock>),
        )
        .unwrap();
        let key = pool.key("key-0").unwrap();
        assert!(mark(&key, 429, &[("retry-after", "1e300")], None));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(7200));
    }

    #[test]
    fn a_past_retry_after_date_means_retry_soon_not_the_default() {
        let (key, clock) = fresh_key();
        let past = "Thu, 01 Jan 1970 00:00:00 GMT";
        assert!(mark(&key, 429, &[("retry-after", past)], None));
        assert_eq!(
            key.status().cooldown_remaining,
            crate::retry_after::RETRY_NOW
        );
        clock.advance(crate::retry_after::RETRY_NOW);
        assert_eq!(key.state(), KeyState::Valid);
    }

    #[test]
    fn first_stream_event_rule() {
        let rate = br#"{"type":"error","error":{"type":"rate_limit_error","message":"x"}}"#;
        let secs = Some(Duration::from_secs(9));
        assert_eq!(
            first_event_verdict(rate, secs),
            Verdict::RateLimited(secs),
            "the head's Retry-After applies"
        );
        assert_eq!(first_event_verdict(rate, None), Verdict::RateLimited(None));
        let quota = br#"{"error":{"message":"x","type":"insufficient_quota","code":null}}"#;
        assert_eq!(first_event_verdict(quota, secs), Verdict::QuotaExhausted);
        assert_eq!(
            first_event_verdict(br#"{"type":"message_start"}"#, secs),
            Verdict::NotKeySpecific
        );
    }

    #[test]
    fn a_permanent_key_stays_permanent_on_429() {
        let (key, _) = fresh_key();
        assert!(mark(&key, 401, &[], None));
        assert!(mark(&key, 429, &[], None), "still key-specific");
        assert_eq!(key.state(), KeyState::Permanent);
    }
}
