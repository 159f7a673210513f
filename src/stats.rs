//! Counters of a failover client since it was created.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::verdict::Reason;

/// Counters since the client was created.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) attempts: AtomicU64,
    pub(crate) byok: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) quota_exhausted: AtomicU64,
    pub(crate) revoked: AtomicU64,
    pub(crate) unreachable: AtomicU64,
    pub(crate) exhausted_transient: AtomicU64,
    pub(crate) exhausted_permanent: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub attempts: u64,
    pub byok: u64,
    /// Failovers by reason.
    pub rate_limited: u64,
    pub quota_exhausted: u64,
    pub revoked: u64,
    /// Keys whose own endpoint could not be reached.
    pub unreachable: u64,
    /// Requests answered with a synthesized 429 or 502 for an exhausted pool.
    pub exhausted_transient: u64,
    pub exhausted_permanent: u64,
    /// Requests answered with 502/504 because upstream could not be reached.
    pub upstream_errors: u64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn failover(&self, reason: Reason) {
        bump(match reason {
            Reason::RateLimited => &self.rate_limited,
            Reason::QuotaExhausted => &self.quota_exhausted,
            Reason::Revoked => &self.revoked,
            Reason::Unreachable => &self.unreachable,
            Reason::Reset | Reason::Manual | Reason::Depleted | Reason::GroupRateLimited => return,
        });
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: get(&self.requests),
            attempts: get(&self.attempts),
            byok: get(&self.byok),
            rate_limited: get(&self.rate_limited),
            quota_exhausted: get(&self.quota_exhausted),
            revoked: get(&self.revoked),
            unreachable: get(&self.unreachable),
            exhausted_transient: get(&self.exhausted_transient),
            exhausted_permanent: get(&self.exhausted_permanent),
            upstream_errors: get(&self.upstream_errors),
        }
    }
}
