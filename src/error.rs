//! The one error type of the core. The bindings map it onto the Python
//! exception hierarchy in `python/errors.rs`; nothing else converts errors.
//! No message ever contains a key: only labels and masked hints.

use std::time::Duration;

use crate::provider::ErrorKind;

/// Why a walker has no key left to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Exhaustion {
    /// At least one key will recover; `retry_after` is the smallest remaining
    /// cooldown, or zero when a key is valid but the walker already passed it.
    #[error("all configured keys are rate-limited (retry after {:.3} s)", retry_after.as_secs_f64())]
    Transient { retry_after: Duration },
    /// Every key is permanently unavailable.
    #[error("all configured keys failed authentication")]
    Permanent,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Invalid configuration: no keys, a duplicate, a bad cooldown, ...
    #[error("{0}")]
    Config(String),
    /// `pool.key(label)` with a label the pool does not have.
    #[error("no key labelled {0:?}")]
    UnknownLabel(String),
    #[error(transparent)]
    Exhausted(#[from] Exhaustion),
    /// The upstream body broke after the response had started.
    #[error("{0}")]
    Upstream(String),
}

impl Error {
    /// How keyfailover answers a caller for this error: the error kind (and so
    /// the status) and message of its error body or SSE error event.
    pub fn answer(&self) -> (ErrorKind, String) {
        match self {
            Error::Exhausted(Exhaustion::Transient { .. }) => (
                ErrorKind::RateLimit,
                "all configured keys are rate-limited".into(),
            ),
            Error::Exhausted(Exhaustion::Permanent) => (
                ErrorKind::Api,
                "all configured keys failed authentication".into(),
            ),
            Error::Upstream(message) => (ErrorKind::Api, message.clone()),
            Error::Config(_) | Error::UnknownLabel(_) => {
                (ErrorKind::InvalidRequest, self.to_string())
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
