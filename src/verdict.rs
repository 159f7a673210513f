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
    /// A per-day quota is used up (Gemini's `...PerDay...` quota ids): cool
    /// down until it resets, at midnight Pacific time (clamped by
    /// `max_cooldown`).
    DailyQuota,
    /// Unauthorized or forbidden: retire the key.
    Revoked,
    /// The key's own endpoint could not be reached, timed out, or answered
    /// 504 from a gateway: cool the key for [`UNREACHABLE_COOLDOWN`], so
    /// that requests go to the other keys' endpoints meanwhile.
    Unreachable,
}

/// How long a key whose own endpoint is unreachable stays out of the walk:
/// long enough that the next requests do not each pay a connect timeout,
/// short enough that a regional outage ending is noticed soon.
pub const UNREACHABLE_COOLDOWN: Duration = Duration::from_secs(15);

impl Verdict {
    /// True when the caller should mark the key and try the next one.
    pub fn is_key_specific(self) -> bool {
        self != Verdict::NotKeySpecific
    }

    pub fn reason(self) -> Option<Reason> {
        match self {
            Verdict::NotKeySpecific => None,
            Verdict::RateLimited(_) => Some(Reason::RateLimited),
            Verdict::QuotaExhausted | Verdict::SpendLimited | Verdict::DailyQuota => {
                Some(Reason::QuotaExhausted)
            }
            Verdict::Revoked => Some(Reason::Revoked),
            Verdict::Unreachable => Some(Reason::Unreachable),
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
            Verdict::DailyQuota => {
                key.cool(Some(until_pacific_midnight(SystemTime::now())), cause);
            }
            Verdict::Unreachable => {
                key.cool(Some(UNREACHABLE_COOLDOWN), cause);
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
/// spent quota, a 400 a spent credit balance or an invalid Gemini key, a 401
/// or 403 a request the provider refuses whatever the key.
pub fn needs_body(status: u16) -> bool {
    matches!(status, 400 | 401 | 403 | 429)
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

/// Whether a Unix time falls in US Pacific daylight time: from 02:00 PST on
/// the second Sunday of March (10:00 UTC) to 02:00 PDT on the first Sunday
/// of November (09:00 UTC), the rule since 2007.
fn is_pacific_daylight_time(unix: i64) -> bool {
    let (year, _, _) = crate::ratelimit::civil_from_days(unix.div_euclid(86_400));
    // The first Sunday on or after a date (1970-01-01 was a Thursday).
    let sunday_from = |month: i64, day: i64| {
        let days = crate::ratelimit::days_from_civil(year, month, day);
        days + (3 - days).rem_euclid(7)
    };
    let start = sunday_from(3, 8) * 86_400 + 10 * 3600;
    let end = sunday_from(11, 1) * 86_400 + 9 * 3600;
    (start..end).contains(&unix)
}

/// How long from `now` until the next midnight in US Pacific time, when the
/// Gemini API's per-day quotas reset ("Requests per day (RPD) quotas reset at
/// midnight Pacific time", ai.google.dev/gemini-api/docs/rate-limits). Never
/// zero: at midnight itself, the next one.
pub fn until_pacific_midnight(now: SystemTime) -> Duration {
    let unix = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2));
    let offset = |t: i64| {
        if is_pacific_daylight_time(t) {
            7 * 3600
        } else {
            8 * 3600
        }
    };
    let local = unix - offset(unix);
    let next_local_midnight = (local.div_euclid(86_400) + 1) * 86_400;
    // Midnight is never inside a change of offset (they happen at 02:00):
    // PDT applies when an instant 7 h after local midnight is in PDT.
    let daylight = next_local_midnight + 7 * 3600;
    let midnight = if is_pacific_daylight_time(daylight) {
        daylight
    } else {
        next_local_midnight + 8 * 3600
    };
    Duration::from_secs(u64::try_from(midnight - unix).unwrap_or(1).max(1))
}

/// The verdict for a response head (and, for 429, its error body).
pub fn classify<'a, I>(status: u16, headers: I, body: Option<&[u8]>, now: SystemTime) -> Verdict
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let headers: Vec<_> = headers.into_iter().collect();
    classify_head(status, head_cooldown(|| headers.iter().copied(), now), body)
}

/// How long a response's head says to wait: its Retry-After (see
/// [`parse_retry_after`]), else the reset of a rate limit the head says is
/// used up (`x-ratelimit-*`, `anthropic-ratelimit-*`; the latest such reset),
/// as a 429 may carry only those. `headers` gives the head's fields.
pub fn head_cooldown<'a, I>(headers: impl Fn() -> I, now: SystemTime) -> Option<Duration>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    parse_retry_after(headers(), now).or_else(|| {
        crate::ratelimit::parse(headers(), now)
            .depleted()
            .map(|(_, reset)| reset)
    })
}

/// [`classify`] with the head's Retry-After already parsed (the failover
/// client parses it once per response).
pub fn classify_head(status: u16, retry_after: Option<Duration>, body: Option<&[u8]>) -> Verdict {
    let body_says = body.and_then(error_body_verdict);
    match status {
        429 => match body_says {
            Some(
                spent @ (Verdict::QuotaExhausted | Verdict::SpendLimited | Verdict::DailyQuota),
            ) => spent,
            // OpenRouter relaying a rate limit of the model's provider: every
            // key would meet it.
            Some(Verdict::NotKeySpecific) => Verdict::NotKeySpecific,
            // Retry-After first; else what the body says (Gemini's
            // RetryInfo.retryDelay, or "retry in 10s" in its message).
            Some(Verdict::RateLimited(from_body)) => {
                Verdict::RateLimited(retry_after.or(from_body))
            }
            _ => Verdict::RateLimited(retry_after),
        },
        // Anthropic: "Your credit balance is too low to access the Anthropic
        // API" comes as 400 invalid_request_error; Gemini: an invalid or
        // expired key is 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
        // Every other 400 is the caller's.
        // Anthropic also answers 400 when a spend limit set on the workspace
        // or organization is reached ("You have reached your specified
        // workspace API usage limits. You will regain access on ...").
        400 if matches!(
            body_says,
            Some(Verdict::QuotaExhausted | Verdict::SpendLimited | Verdict::Revoked)
        ) =>
        {
            body_says.unwrap_or(Verdict::NotKeySpecific)
        }
        // A 401 or 403 whose body says it is not about the key: Anthropic's
        // 401 to a request with an `Origin` (a browser's, "CORS requests are
        // not allowed for this Organization"), OpenAI's 403 to a country it
        // does not serve, Gemini's PERMISSION_DENIED on a file or tuned model
        // the key's project may not use, OpenRouter's moderation refusal of
        // the input. Any other key would get the same.
        401 | 403 if body_says == Some(Verdict::NotKeySpecific) => Verdict::NotKeySpecific,
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
        Some(Verdict::RateLimited(from_body)) => {
            Verdict::RateLimited(head_retry_after.or(from_body))
        }
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

/// The key-specific meaning of an error envelope (Anthropic, OpenAI, Google
/// or OpenRouter), such as a 429 body or the data of an SSE `error` event;
/// `None` when it is not an error envelope or says nothing about the key,
/// `Some(NotKeySpecific)` when it says the failure is not the key's.
pub fn error_body_verdict(body: &[u8]) -> Option<Verdict> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    // Gemini's OpenAI-compatible endpoint wraps its error in a list:
    // `[{"error": {...}}]` (seen in github.com/continuedev/continue/issues/8516).
    let value = match value {
        serde_json::Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    let error = value.get("error")?;
    if let Some(status) = error.get("status").and_then(|s| s.as_str()) {
        if error.get("code").is_some_and(serde_json::Value::is_number) {
            return google_error_verdict(error, status);
        }
    }
    let field = |name: &str| error.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let spend_cap = error
        .pointer("/details/error_code")
        .and_then(|v| v.as_str())
        .is_some_and(|c| c == "enforced_spend_limit_reached");
    let (kind, code) = (field("type"), field("code"));
    let is = |names: &[&str]| names.contains(&kind) || names.contains(&code);
    let message = field("message").to_ascii_lowercase();
    if let Some(metadata) = error.get("metadata").filter(|m| m.is_object()) {
        // OpenRouter (openrouter.ai/docs/api/reference/errors-and-debugging):
        // a 403 with `reasons`/`flagged_input` is its moderation refusing the
        // input; `provider_name` names the model's provider whose error (a
        // rate limit of that provider, "temporarily rate-limited upstream")
        // it relays. Neither is the key's.
        if ["flagged_input", "reasons", "provider_name"]
            .iter()
            .any(|name| metadata.get(name).is_some())
        {
            return Some(Verdict::NotKeySpecific);
        }
    }
    if message.starts_with("cors requests are not allowed")
        || code == "unsupported_country_region_territory"
    {
        // Anthropic (docs.anthropic.com "Errors"): a 401 whose message
        // begins so "is not a problem with your API key": the request came
        // with an Origin header. OpenAI ("Error codes"): 403 "Country,
        // region, or territory not supported", where the request comes from.
        Some(Verdict::NotKeySpecific)
    } else if spend_cap
        || (kind == "invalid_request_error"
            && message.contains("reached your specified")
            && message.contains("api usage limits"))
    {
        // Anthropic: 429 rate_limit_error with this error_code when a monthly
        // spend limit of the workspace or tier is reached; 400 "You have
        // reached your specified workspace (organization) API usage limits",
        // a spend limit set by the organization, renewed monthly.
        Some(Verdict::SpendLimited)
    } else if code == "quota_exceeded" {
        // Gemini's Interactions API (ai.google.dev "API errors"): 429
        // quota_exceeded, "You have exceeded the daily quota"; its per-day
        // quotas reset at midnight Pacific time.
        Some(if message.contains("daily") {
            Verdict::DailyQuota
        } else if let Some(wait) = delay_in_message(&message) {
            Verdict::RateLimited(Some(wait))
        } else {
            Verdict::QuotaExhausted
        })
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
    } else if message.starts_with("request too large") {
        // OpenAI: 429 rate_limit_exceeded "Request too large for gpt-4o ... on
        // tokens per min (TPM): Limit 30000, Requested 50000. The input or
        // output tokens must be reduced": the request, not the key's use of
        // its limit; a key of the same tier would refuse it too.
        Some(Verdict::NotKeySpecific)
    } else if is(&["rate_limit_error", "rate_limit_exceeded"]) || code == "429" {
        // Azure OpenAI names a rate limit by its status: {"code": "429", ...}.
        Some(Verdict::RateLimited(delay_in_message(&message)))
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

/// The `ErrorInfo.reason`s of Google's error model that say the key itself
/// cannot be used (cloud.google.com/apis/design/errors, and the reasons the
/// API key service documents): invalid, expired, restricted, or its
/// project's API disabled or suspended.
fn key_unusable_reason(reason: &str) -> bool {
    reason.starts_with("API_KEY_")
        || matches!(
            reason,
            "SERVICE_DISABLED" | "CONSUMER_SUSPENDED" | "CONSUMER_INVALID" | "BILLING_DISABLED"
        )
}

/// The verdict for a Google error (`{"code": 429, "message", "status",
/// "details": [...]}`, ai.google.dev/gemini-api/docs/troubleshooting).
fn google_error_verdict(error: &serde_json::Value, status: &str) -> Option<Verdict> {
    let details: &[serde_json::Value] = error
        .get("details")
        .and_then(|d| d.as_array())
        .map_or(&[], Vec::as_slice);
    let of_type = |name: &'static str| {
        details.iter().filter(move |d| {
            d.get("@type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with(name))
        })
    };
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let about_the_key = of_type("google.rpc.ErrorInfo")
        .filter_map(|d| d.get("reason").and_then(|r| r.as_str()))
        .any(key_unusable_reason)
        // Messages about the key: "API key not valid. Please pass a valid
        // API key.", "API key expired. Please renew the API key.", "Your API
        // key was reported as leaked. Please use another API key." (403
        // PERMISSION_DENIED without details).
        || message.starts_with("api key")
        || message.contains("your api key");
    match status {
        "RESOURCE_EXHAUSTED" => {
            // QuotaFailure lists the quotas exceeded; a per-day one
            // (e.g. GenerateRequestsPerDayPerProjectPerModel-FreeTier) only
            // resets at midnight Pacific time.
            let per_day = of_type("google.rpc.QuotaFailure")
                .filter_map(|d| d.get("violations").and_then(|v| v.as_array()))
                .flatten()
                .filter_map(|v| v.get("quotaId").and_then(|q| q.as_str()))
                .any(|id| id.contains("PerDay"));
            if per_day {
                return Some(Verdict::DailyQuota);
            }
            // RetryInfo.retryDelay is a google.protobuf.Duration ("10s",
            // "0.5s"); else "Please retry in 10.689924287s." in the message.
            let retry_delay = of_type("google.rpc.RetryInfo")
                .filter_map(|d| d.get("retryDelay").and_then(|r| r.as_str()))
                .find_map(crate::ratelimit::go_duration)
                .filter(|d| !d.is_zero())
                .or_else(|| delay_in_message(&message));
            Some(Verdict::RateLimited(retry_delay))
        }
        "UNAUTHENTICATED" => Some(Verdict::Revoked),
        "INVALID_ARGUMENT" | "PERMISSION_DENIED" | "FAILED_PRECONDITION" if about_the_key => {
            Some(Verdict::Revoked)
        }
        // "Gemini API free tier is not available in your country. Please
        // enable billing on your project" (troubleshooting): the key's
        // project needs billing; a key of a billed project works from here.
        "FAILED_PRECONDITION" if message.contains("enable billing") => {
            Some(Verdict::QuotaExhausted)
        }
        // Not the key: a file or tuned model its project may not use, a
        // malformed request, an unsupported location.
        "PERMISSION_DENIED" => Some(Verdict::NotKeySpecific),
        _ => None,
    }
}

/// A wait a rate-limit message names: "Please retry in 10.689924287s.",
/// "Please try again in 1m28.8s", "retry after 10h17m" (as Gemini, OpenAI
/// and Groq word theirs), "Please retry after 8 seconds." (Azure OpenAI);
/// None when there is none.
pub fn delay_in_message(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    ["retry in ", "try again in ", "retry after "]
        .iter()
        .filter_map(|phrase| lower.find(phrase).map(|i| &lower[i + phrase.len()..]))
        .find_map(|rest| {
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'h' | 'm' | 's')))
                .unwrap_or(rest.len());
            let compact = rest[..end].trim_end_matches('.');
            crate::ratelimit::go_duration(compact).or_else(|| {
                // "8 seconds", "1 second"
                let words = rest[end..].strip_prefix(' ')?;
                (words.starts_with("second") && !compact.is_empty())
                    .then(|| compact.parse::<f64>().ok())
                    .flatten()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| Duration::from_secs_f64(s.min(1e12)))
            })
        })
        .filter(|d| !d.is_zero())
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
            // Without Retry-After, the reset of a limit the head says is used
            // up (the latest, if several are), else the default.
            (
                "429_cools_until_its_used_up_limit_resets",
                429,
                &[
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "6m0s"),
                    ("x-ratelimit-remaining-tokens", "0"),
                    ("x-ratelimit-reset-tokens", "1.5s"),
                ],
                true,
                KeyState::Temporary,
                Some(360_000),
            ),
            (
                "429_cools_until_its_used_up_anthropic_limit_resets",
                429,
                &[
                    ("anthropic-ratelimit-tokens-remaining", "0"),
                    ("anthropic-ratelimit-tokens-reset", "1970-01-01T00:02:00Z"),
                ],
                true,
                KeyState::Temporary,
                Some(120_000),
            ),
            (
                "429_retry_after_before_its_limits_reset",
                429,
                &[
                    ("retry-after", "5"),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "6m0s"),
                ],
                true,
                KeyState::Temporary,
                Some(5_000),
            ),
            (
                "429_with_its_limits_left_uses_default",
                429,
                &[
                    ("x-ratelimit-remaining-requests", "3"),
                    ("x-ratelimit-reset-requests", "6m0s"),
                ],
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
        assert!(needs_body(400) && needs_body(401) && needs_body(429) && !needs_body(500));
    }

    #[test]
    fn refusals_the_providers_document_as_not_the_keys_leave_it_valid() {
        let cases = [
            // docs.anthropic.com "Errors": "is not a problem with your API key".
            (
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"CORS requests are not allowed for this Organization because of the `anthropic-dangerous-direct-browser-access` header being absent."}}"#,
            ),
            // platform.openai.com "Error codes": 403 Country, region, or
            // territory not supported.
            (
                403,
                r#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#,
            ),
        ];
        for (status, body) in cases {
            let (key, _) = fresh_key();
            assert!(!mark(&key, status, &[], Some(body)), "{body}");
            assert_eq!(key.state(), KeyState::Valid, "{body}");
        }
        // Without those words, 401 is the key's as ever.
        let (key, _) = fresh_key();
        let invalid = r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert!(mark(&key, 401, &[], Some(invalid)));
        assert_eq!(key.state(), KeyState::Permanent);
    }

    #[test]
    fn a_spend_limit_the_organization_set_cools_until_the_first_of_next_month() {
        for scope in ["workspace", "organization"] {
            let (key, _) = fresh_key();
            let body = format!(
                r#"{{"type":"error","error":{{"type":"invalid_request_error","message":"You have reached your specified {scope} API usage limits. You will regain access on 2027-01-01 at 00:00 UTC."}}}}"#
            );
            assert!(mark(&key, 400, &[], Some(&body)), "{scope}");
            let expected = until_next_month(SystemTime::now());
            let got = key.status().cooldown_remaining;
            assert!(
                expected.abs_diff(got) < Duration::from_secs(5),
                "{scope}: {got:?}"
            );
        }
    }

    #[test]
    fn geminis_daily_quota_and_billing_refusals_are_the_keys_projects() {
        // The Interactions API's error shape: a string code.
        let (key, _) = fresh_key();
        let daily =
            r#"{"error":{"code":"quota_exceeded","message":"You have exceeded the daily quota."}}"#;
        assert!(mark(&key, 429, &[], Some(daily)));
        let got = key.status().cooldown_remaining;
        let expected = until_pacific_midnight(SystemTime::now());
        assert!(expected.abs_diff(got) < Duration::from_secs(5), "{got:?}");
        let (key, _) = fresh_key();
        let other = r#"{"error":{"code":"quota_exceeded","message":"Quota exceeded."}}"#;
        assert!(mark(&key, 429, &[], Some(other)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(3600));
        let (key, _) = fresh_key();
        let short = r#"{"error":{"code":"quota_exceeded","message":"Quota exceeded. Please retry in 2s."}}"#;
        assert!(mark(&key, 429, &[], Some(short)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(2));
        // troubleshooting: the free tier's countries; a billed project's key works.
        let (key, _) = fresh_key();
        let billing = r#"{"error":{"code":400,"message":"Gemini API free tier is not available in your country. Please enable billing on your project in Google AI Studio.","status":"FAILED_PRECONDITION"}}"#;
        assert!(mark(&key, 400, &[], Some(billing)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(3600));
        let (key, _) = fresh_key();
        let location = r#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#;
        assert!(!mark(&key, 400, &[], Some(location)));
        assert_eq!(key.state(), KeyState::Valid);
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

    /// Gemini's 429 as the API sends it (the body of a per-minute limit, with
    /// QuotaFailure, Help and RetryInfo details).
    const GEMINI_PER_MINUTE: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.0-flash"},"quotaValue":"15"}]},{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}"#;

    #[test]
    fn gemini_rate_limits_cool_for_retry_delay_unless_retry_after_says() {
        let (key, _) = fresh_key();
        assert!(mark(&key, 429, &[], Some(GEMINI_PER_MINUTE)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(22));
        let (key, _) = fresh_key();
        assert!(mark(
            &key,
            429,
            &[("retry-after", "3")],
            Some(GEMINI_PER_MINUTE)
        ));
        assert_eq!(
            key.status().cooldown_remaining,
            Duration::from_secs(3),
            "Retry-After wins"
        );
        // No RetryInfo: the wait the message names.
        let worded = r#"{"error":{"code":429,"message":"Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 15, model: gemini-2.0-flash\nPlease retry in 10.689924287s.","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            classify_head(429, None, Some(worded.as_bytes())),
            Verdict::RateLimited(Some(Duration::from_nanos(10_689_924_287)))
        );
        let hours = r#"{"error":{"code":429,"message":"Resource has been exhausted. Please retry after 10h17m.","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            classify_head(429, None, Some(hours.as_bytes())),
            Verdict::RateLimited(Some(Duration::from_secs(10 * 3600 + 17 * 60)))
        );
        let bare = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            classify_head(429, None, Some(bare.as_bytes())),
            Verdict::RateLimited(None),
            "the pool's default cooldown"
        );
        // The OpenAI-compatible endpoint wraps the same error in a list.
        let listed = format!("[{GEMINI_PER_MINUTE}]");
        assert_eq!(
            classify_head(429, None, Some(listed.as_bytes())),
            Verdict::RateLimited(Some(Duration::from_secs(22)))
        );
    }

    #[test]
    fn a_gemini_per_day_quota_cools_until_midnight_pacific() {
        // Per-day and per-minute violations together (as the free tier's
        // "limit: 0" answers list them): the day decides.
        let per_day = r#"{"error":{"code":429,"message":"You exceeded your current quota. Please retry in 10.689924287s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.0-flash"}},{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"10s"}]}}"#;
        assert_eq!(
            classify_head(429, Some(Duration::from_secs(10)), Some(per_day.as_bytes())),
            Verdict::DailyQuota
        );
        let (key, _) = fresh_key();
        assert!(mark(&key, 429, &[], Some(per_day)));
        let expected = until_pacific_midnight(SystemTime::now());
        let got = key.status().cooldown_remaining;
        assert!(
            expected.abs_diff(got) < Duration::from_secs(5),
            "{got:?} vs {expected:?}"
        );
        assert_eq!(Verdict::DailyQuota.reason(), Some(Reason::QuotaExhausted));
    }

    #[test]
    fn midnight_pacific() {
        let at = |secs: u64| until_pacific_midnight(UNIX_EPOCH + Duration::from_secs(secs));
        let hours = |h: u64| Duration::from_secs(h * 3600);
        // 2026-01-15T12:00:00Z is 04:00 PST: midnight is 2026-01-16T08:00Z.
        assert_eq!(at(1_768_478_400), hours(20));
        // 2026-07-01T06:59:59Z is 23:59:59 PDT: one second to go.
        assert_eq!(at(1_782_889_199), Duration::from_secs(1));
        // At midnight itself (2026-07-01T07:00:00Z), the next one.
        assert_eq!(at(1_782_889_200), hours(24));
        // 2026-03-08 (clocks go forward at 02:00): 01:00 PST (09:00Z) to
        // midnight PDT of the 9th (07:00Z) is 22 h.
        assert_eq!(at(1_772_960_400), hours(22));
        // 2026-11-01 (clocks go back at 02:00): 01:00 PDT (08:00Z) to
        // midnight PST of the 2nd (08:00Z) is 24 h: that day has 25.
        assert_eq!(at(1_793_520_000), hours(24));
        // 2024-12-31T23:00:00Z is 15:00 PST: 9 h to the new year's midnight.
        assert_eq!(at(1_735_686_000), hours(9));
    }

    #[test]
    fn gemini_key_errors_retire_the_key_and_others_go_back() {
        let invalid = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}},{"@type":"type.googleapis.com/google.rpc.LocalizedMessage","locale":"en-US","message":"API key not valid. Please pass a valid API key."}]}}"#;
        let expired = r#"{"error":{"code":400,"message":"API key expired. Please renew the API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        let leaked = r#"{"error":{"code":403,"message":"Your API key was reported as leaked. Please use another API key.","status":"PERMISSION_DENIED"}}"#;
        let disabled = r#"{"error":{"code":403,"message":"Generative Language API has not been used in project 123 before or it is disabled.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"SERVICE_DISABLED","domain":"googleapis.com"}]}}"#;
        let listed = format!("[{invalid}]");
        for (status, body) in [
            (400, invalid),
            (400, expired),
            (403, leaked),
            (403, disabled),
            (400, listed.as_str()),
        ] {
            let (key, _) = fresh_key();
            assert!(mark(&key, status, &[], Some(body)), "{body}");
            assert_eq!(key.state(), KeyState::Permanent, "{body}");
        }
        let caller_errors = [
            (
                400,
                r#"{"error":{"code":400,"message":"* GenerateContentRequest.contents: contents is not specified","status":"INVALID_ARGUMENT"}}"#,
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"User location is not supported for the API use.","status":"FAILED_PRECONDITION"}}"#,
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"You do not have permission to access the File abc123 or it may not exist.","status":"PERMISSION_DENIED"}}"#,
            ),
            (
                500,
                r#"{"error":{"code":500,"message":"An internal error has occurred.","status":"INTERNAL"}}"#,
            ),
            (
                503,
                r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
            ),
        ];
        for (status, body) in caller_errors {
            let (key, _) = fresh_key();
            assert!(!mark(&key, status, &[], Some(body)), "{body}");
            assert_eq!(key.state(), KeyState::Valid, "{body}");
        }
        // A 403 with no body, or another provider's, is still the key's.
        let (key, _) = fresh_key();
        assert!(mark(&key, 403, &[], None));
        assert!(needs_body(403));
    }

    #[test]
    fn openrouter_errors_that_are_not_the_keys() {
        // openrouter.ai/docs/api/reference/errors-and-debugging: moderation.
        let flagged = r#"{"error":{"code":403,"message":"Input flagged","metadata":{"reasons":["harassment"],"flagged_input":"...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;
        let upstream = r#"{"error":{"message":"Provider returned error","code":429,"metadata":{"raw":"meta-llama/llama-3.3-70b-instruct:free is temporarily rate-limited upstream. Please retry shortly.","provider_name":"Venice"}}}"#;
        for (status, body) in [(403, flagged), (429, upstream)] {
            let (key, _) = fresh_key();
            assert!(!mark(&key, status, &[("retry-after", "5")], Some(body)));
            assert_eq!(key.state(), KeyState::Valid, "{body}");
        }
        let own = r#"{"error":{"code":429,"message":"Rate limit exceeded: free-models-per-min."}}"#;
        let (key, _) = fresh_key();
        assert!(mark(&key, 429, &[], Some(own)), "OpenRouter's own limit");
        let credits = r#"{"error":{"code":402,"message":"Insufficient credits"}}"#;
        let (key, _) = fresh_key();
        assert!(mark(&key, 402, &[], Some(credits)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(3600));
    }

    #[test]
    fn a_request_larger_than_the_limit_is_the_callers() {
        let (key, _) = fresh_key();
        let body = r#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(!mark(&key, 429, &[], Some(body)));
        assert_eq!(key.state(), KeyState::Valid);
    }

    #[test]
    fn an_azure_rate_limit_without_retry_after_cools_for_the_wait_its_message_names() {
        let (key, _) = fresh_key();
        let body = r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 8 seconds."}}"#;
        assert!(mark(&key, 429, &[], Some(body)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(8));
        let (key, _) = fresh_key();
        assert!(mark(&key, 429, &[("retry-after", "3")], Some(body)));
        assert_eq!(key.status().cooldown_remaining, Duration::from_secs(3));
    }

    #[test]
    fn waits_named_in_messages() {
        let cases = [
            ("Please retry in 10.689924287s.", Some(10_689)),
            // Groq: "Please try again in 5.289s. Visit https://..."
            (
                "Rate limit reached ... Please try again in 5.289s. Visit",
                Some(5289),
            ),
            ("Please try again in 1m28.8s", Some(88_800)),
            ("Please try again in 20ms.", Some(20)),
            ("Retry after 10h17m", Some(37_020_000)),
            // Azure OpenAI, when no retry-after header comes with it.
            (
                "Requests to the ChatCompletions_Create Operation ... have exceeded token \
                 rate limit of your current OpenAI S0 pricing tier. Please retry after 8 seconds.",
                Some(8000),
            ),
            ("Please retry after 1 second.", Some(1000)),
            ("Please retry after 2.5 seconds", Some(2500)),
            ("Please retry after a few seconds.", None),
            ("Please retry after 8 minutes.", None),
            ("Please retry later.", None),
            ("retry in 0s", None),
            ("", None),
        ];
        for (message, millis) in cases {
            assert_eq!(
                delay_in_message(message).map(|d| d.as_millis() as u64),
                millis,
                "{message}"
            );
        }
    }

    #[test]
    fn an_unreachable_endpoint_cools_the_key_briefly() {
        let (key, clock) = fresh_key();
        assert!(Verdict::Unreachable.apply(&key, None));
        assert_eq!(key.status().cooldown_remaining, UNREACHABLE_COOLDOWN);
        clock.advance(UNREACHABLE_COOLDOWN);
        assert_eq!(key.state(), KeyState::Valid);
        assert_eq!(Verdict::Unreachable.reason(), Some(Reason::Unreachable));
    }

    #[test]
    fn a_permanent_key_stays_permanent_on_429() {
        let (key, _) = fresh_key();
        assert!(mark(&key, 401, &[], None));
        assert!(mark(&key, 429, &[], None), "still key-specific");
        assert_eq!(key.state(), KeyState::Permanent);
    }
}
