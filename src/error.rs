//! The one error vocabulary of the core: the errors its functions return
//! ([`Error`]) and the kinds of answer keyfailover makes itself ([`ErrorKind`]),
//! each worded once, here. `provider.rs` puts a kind and message into a
//! provider's envelope; the bindings map [`Error`] onto the Python exception
//! hierarchy in `python/errors.rs`. No message ever contains a key: only
//! labels and masked hints.

use std::time::Duration;

/// Why a walker has no key left to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Exhaustion {
    /// At least one key will recover; `retry_after` is the smallest remaining
    /// cooldown, or zero when a key is valid but the walker already tried it.
    #[error("{} (retry after {:.3} s)", Exhaustion::RATE_LIMITED, retry_after.as_secs_f64())]
    Transient { retry_after: Duration },
    /// Every key that is not retired cools down because its own endpoint
    /// (a per-key `base_url`) could not be reached, timed out or answered
    /// 504; `retry_after` is the smallest remaining cooldown.
    #[error("{} (retry after {:.3} s)", Exhaustion::UNREACHABLE, retry_after.as_secs_f64())]
    Unreachable { retry_after: Duration },
    /// Every key is permanently unavailable.
    #[error("{}", Exhaustion::AUTH_FAILED)]
    Permanent,
}

impl Exhaustion {
    const RATE_LIMITED: &'static str = "all configured keys are rate-limited";
    const UNREACHABLE: &'static str = "the endpoints of all configured keys are unreachable";
    const AUTH_FAILED: &'static str = "all configured keys failed authentication";

    /// The message of the answer a caller gets (no timing: that goes in
    /// `Retry-After`).
    pub fn message(self) -> &'static str {
        match self {
            Exhaustion::Transient { .. } => Self::RATE_LIMITED,
            Exhaustion::Unreachable { .. } => Self::UNREACHABLE,
            Exhaustion::Permanent => Self::AUTH_FAILED,
        }
    }

    /// The smallest remaining cooldown; none when every key is retired.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Exhaustion::Transient { retry_after } | Exhaustion::Unreachable { retry_after } => {
                Some(retry_after)
            }
            Exhaustion::Permanent => None,
        }
    }

    /// The `Retry-After` of the answer, in whole seconds: the smallest
    /// cooldown rounded up, never below 1 (a key that recovered while the
    /// walk went on is not a promise that the next attempt succeeds).
    pub fn retry_after_header(self) -> Option<u64> {
        self.retry_after().map(|d| ceil_secs(d).max(1))
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Invalid configuration: no keys, a duplicate, a bad cooldown, a bad URL...
    #[error("{0}")]
    Config(String),
    /// A request that cannot be sent: a bad method, path or header.
    #[error("{0}")]
    BadRequest(String),
    /// A method keyfailover never forwards (CONNECT, TRACE).
    #[error("method {0} is not allowed")]
    MethodNotAllowed(String),
    /// `pool.key(label)` with a label the pool does not have (masked when it
    /// is one of the pool's keys).
    #[error("no key labelled {0:?}")]
    UnknownLabel(String),
    #[error(transparent)]
    Exhausted(#[from] Exhaustion),
    /// The upstream body broke after the response had started.
    #[error("{0}")]
    Upstream(String),
}

impl Error {
    /// How keyfailover answers a caller for this error: the kind (and so the
    /// status) and the message of its error body or SSE error event.
    pub fn answer(&self) -> (ErrorKind, String) {
        let kind = match self {
            Error::Exhausted(exhaustion) => {
                return (
                    ErrorKind::of_exhaustion(*exhaustion),
                    exhaustion.message().into(),
                )
            }
            Error::Upstream(_) => ErrorKind::Api,
            Error::MethodNotAllowed(_) => ErrorKind::MethodNotAllowed,
            Error::Config(_) | Error::BadRequest(_) | Error::UnknownLabel(_) => {
                ErrorKind::InvalidRequest
            }
        };
        (kind, self.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errors keyfailover answers with itself, each with its status and type
/// name (Anthropic's names, used for every provider's envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Every key is cooling down (429).
    RateLimit,
    /// Upstream unreachable, every key failed authentication, a broken stream (502).
    Api,
    /// No response head in time (504).
    Timeout,
    /// The server is shutting down (503).
    Unavailable,
    /// The caller's credential was refused (401).
    Authentication,
    /// The caller may not do this (403).
    Permission,
    /// No such admin endpoint or key (404).
    NotFound,
    /// A method keyfailover does not forward or serve (405).
    MethodNotAllowed,
    /// The request body is too large (413).
    RequestTooLarge,
    /// The request body stopped coming (408).
    RequestTimeout,
    /// Anything else wrong with the request (400).
    InvalidRequest,
    /// A request framing keyfailover cannot forward: a transfer coding
    /// other than `chunked` (501, as RFC 9112, section 6.1 asks).
    NotImplemented,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::RateLimit,
        ErrorKind::Api,
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::Authentication,
        ErrorKind::Permission,
        ErrorKind::NotFound,
        ErrorKind::InvalidRequest,
        ErrorKind::MethodNotAllowed,
        ErrorKind::RequestTooLarge,
        ErrorKind::RequestTimeout,
        ErrorKind::NotImplemented,
    ];

    /// The answer for an exhausted pool: 429, or 502 when every key failed
    /// authentication or every key's own endpoint is unreachable (as a walk
    /// that found them so answers).
    pub fn of_exhaustion(exhaustion: Exhaustion) -> Self {
        match exhaustion {
            Exhaustion::Transient { .. } => ErrorKind::RateLimit,
            Exhaustion::Unreachable { .. } | Exhaustion::Permanent => ErrorKind::Api,
        }
    }

    /// The HTTP status keyfailover answers with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::RateLimit => 429,
            ErrorKind::Api => 502,
            ErrorKind::Timeout => 504,
            ErrorKind::Unavailable => 503,
            ErrorKind::Authentication => 401,
            ErrorKind::Permission => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::NotImplemented => 501,
        }
    }

    /// The error `type`: Anthropic's names, also used in OpenAI's envelope.
    pub fn type_name(self) -> &'static str {
        match self {
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api | ErrorKind::Unavailable => "api_error",
            ErrorKind::Timeout => "timeout_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::InvalidRequest
            | ErrorKind::MethodNotAllowed
            | ErrorKind::RequestTimeout
            | ErrorKind::NotImplemented => "invalid_request_error",
        }
    }

    /// The OpenAI-style `code`.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::RateLimit => "rate_limit_exceeded",
            ErrorKind::Api => "upstream_error",
            ErrorKind::Timeout => "upstream_timeout",
            ErrorKind::Unavailable => "shutting_down",
            ErrorKind::Authentication => "invalid_api_key",
            ErrorKind::Permission => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::NotImplemented => "not_implemented",
        }
    }

    /// The canonical status name of Google's error model (google.rpc.Code,
    /// as the Gemini API puts it in `error.status`) for this answer.
    pub fn google_status(self) -> &'static str {
        match self {
            ErrorKind::RateLimit => "RESOURCE_EXHAUSTED",
            // 502: upstream unreachable, every key refused, a broken stream.
            ErrorKind::Api | ErrorKind::Unavailable => "UNAVAILABLE",
            ErrorKind::Timeout | ErrorKind::RequestTimeout => "DEADLINE_EXCEEDED",
            ErrorKind::Authentication => "UNAUTHENTICATED",
            ErrorKind::Permission => "PERMISSION_DENIED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::MethodNotAllowed | ErrorKind::NotImplemented => "UNIMPLEMENTED",
            ErrorKind::RequestTooLarge | ErrorKind::InvalidRequest => "INVALID_ARGUMENT",
        }
    }

    /// The kind for an error type name; where two kinds share a name, the
    /// first of [`ErrorKind::ALL`] (so "api_error" is 502, "invalid_request_error" 400).
    pub fn from_type_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.type_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_answers() {
        let transient = Exhaustion::Transient {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(transient.retry_after_header(), Some(2));
        let recovered = Exhaustion::Transient {
            retry_after: Duration::ZERO,
        };
        assert_eq!(recovered.retry_after_header(), Some(1), "never below 1");
        assert_eq!(Exhaustion::Permanent.retry_after_header(), None);
        assert_eq!(
            Error::from(transient).answer(),
            (
                ErrorKind::RateLimit,
                "all configured keys are rate-limited".into()
            )
        );
        assert_eq!(
            transient.to_string(),
            "all configured keys are rate-limited (retry after 1.500 s)"
        );
        assert_eq!(Error::from(Exhaustion::Permanent).answer().0.status(), 502);
        let unreachable = Exhaustion::Unreachable {
            retry_after: Duration::from_millis(14_200),
        };
        assert_eq!(unreachable.retry_after_header(), Some(15));
        assert_eq!(
            Error::from(unreachable).answer(),
            (
                ErrorKind::Api,
                "the endpoints of all configured keys are unreachable".into()
            )
        );
        assert_eq!(
            unreachable.to_string(),
            "the endpoints of all configured keys are unreachable (retry after 14.200 s)"
        );
    }

    #[test]
    fn kinds_by_name() {
        assert_eq!(
            ErrorKind::from_type_name("timeout_error"),
            Some(ErrorKind::Timeout)
        );
        assert_eq!(ErrorKind::from_type_name("api_error"), Some(ErrorKind::Api));
        assert_eq!(
            ErrorKind::from_type_name("invalid_request_error").map(ErrorKind::status),
            Some(400)
        );
        assert_eq!(ErrorKind::from_type_name("nope"), None);
        assert_eq!(
            Error::MethodNotAllowed("CONNECT".into()).answer(),
            (
                ErrorKind::MethodNotAllowed,
                "method CONNECT is not allowed".into()
            )
        );
    }
}
