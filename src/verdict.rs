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
    /// The key's quota or credit is used up: the pool's quota cooldown.
    QuotaExhausted,
    /// A monthly spend limit is reached: cool down until it renews, at
    /// 00:00 UTC on the 1st of the next month (clamped by `max_cooldown`).
    SpendLimited,
    /// Unauthorized or forbidden: retire the key.
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
            Verdict::QuotaExhausted | Verdict::SpendLimited => Some(Reason::QuotaExhausted),
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
            Verdict::SpendLimited => {
                key.cool(Some(until_next_month(SystemTime::now())), cause);
            }
            Verdict::Revoked => {
                key.retire(cause);
            }
        };
        true
    }
}

/// Whether the verdict for this status depends on the error body, so that a
/// caller reads (a bounded prefix of) it before classifying: a 429 may be a
/// spent quota, a 400 a spent credit balance.
pub fn needs_body(status: u16) -> bool {
    matches!(status, 400 | 429)
}

/// How long from `now` until 00:00 UTC on the 1st of the next month.
pub fn until_next_month(now: SystemTime) -> Duration {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, _) =
        crate::ratelimit::civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    let (year, month) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    let start =
        u64::try_from(crate::ratelimit::days_from_civil(year, month, 1) * 86_400).unwrap_or(0);
    Duration::from_secs(start.saturating_sub(secs).max(1))
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
    let body_says = body.and_then(error_body_verdict);
    match status {
        429 => match body_says {
            Some(spent @ (Verdict::QuotaExhausted | Verdict::SpendLimited)) => spent,
            _ => Verdict::RateLimited(retry_after),
        },
        // Anthropic: "Your credit balance is too low to access the Anthropic
        // API" comes as 400 invalid_request_error; every other 400 is the
        // caller's.
        400 if body_says == Some(Verdict::QuotaExhausted) => Verdict::QuotaExhausted,
        // 402 billing_error (Anthropic, docs.anthropic.com "Errors": "an issue
        // with your billing or payment information") is fixed by paying, not
        // by a new key: cooled for the quota cooldown, so the key comes back
        // by itself once the account is in order.
        402 => Verdict::QuotaExhausted,
        401 | 403 => Verdict::Revoked,
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
    let message = field("message").to_ascii_lowercase();
    if spend_cap {
        // Anthropic: 429 rate_limit_error with this error_code when a monthly
        // spend limit of the workspace or tier is reached.
        Some(Verdict::SpendLimited)
    } else if is(&[
        // OpenAI (platform.openai.com "Error codes"): 429 insufficient_quota,
        // "You exceeded your current quota, please check your plan and
        // billing details"; the others name spent credit or budgets.
        "insufficient_quota",
        "billing_hard_limit_reached",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "billing_error",
    ]) || (kind == "invalid_request_error"
        && message.contains("credit balance is too low"))
    {
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
            // The seed retires on 402; billing errors are fixed by paying,
            // so keyfailover cools the key for the quota cooldown instead.
            (
                "402_cools_for_the_quota_cooldown",
                402,
                &[],
                true,
                KeyState::Temporary,
                Some(3_600_000),
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
            r#"{"error":{"message":"x","type":"requests","code":"credit_balance_exhausted"}}"#,
            r#"{"error":{"message":"x","type":"requests","code":"organization_spend_limit_exceeded"}}"#,
            r#"{"error":{"message":"x","type":"requests","code":"project_spend_limit_exceeded"}}"#,
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
    fn a_spend_limit_cools_until_the_first_of_next_month() {
        let (key, _) = fresh_key();
        let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"spend cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        assert!(mark(&key, 429, &[("retry-after", "5")], Some(body)));
        let expected = until_next_month(SystemTime::now());
        let got = key.status().cooldown_remaining;
        assert!(
            expected.abs_diff(got) < Duration::from_secs(5),
            "{got:?} vs {expected:?}"
        );
        // 2026-12-02T05:00:00Z -> 2027-01-01T00:00:00Z
        let dec = UNIX_EPOCH + Duration::from_secs(1_796_187_600);
        assert_eq!(
            until_next_month(dec),
            Duration::from_secs(1_798_761_600 - 1_796_187_600)
        );
        // 2024-02-29T23:59:59Z -> 2024-03-01T00:00:00Z
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(until_next_month(leap), Duration::from_secs(1));
    }

    #[test]
    fn a_spent_credit_balance_is_a_quota_error_and_other_400s_are_the_callers() {
        let (key, _) = fresh_key();
        let credit = r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#;
        assert!(mark(&key, 400, &[], Some(credit)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(3600));
        let (key, _) = fresh_key();
        let caller = r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#;
        assert!(!mark(&key, 400, &[], Some(caller)));
        assert!(!mark(&key, 400, &[], None));
        assert_eq!(key.state(), KeyState::Valid);
        assert!(needs_body(400) && needs_body(429) && !needs_body(401));
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
