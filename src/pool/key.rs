//! A handle to one key of a pool, and marking it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::cell::Marked;
use super::{KeyPool, KeyStatus, Slot};
use crate::clock::duration_to_nanos;
use crate::events::{self, Field, Level, Record};
use crate::metrics::KeyCounters;
use crate::state::clocks;

/// Why a key was marked: the labels used in stats, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A 429, or a rate-limit error event.
    RateLimited,
    /// A spent quota or spend cap.
    QuotaExhausted,
    /// 401, 402 or 403: the key is revoked or unusable.
    Revoked,
    /// An operator put the key back into service.
    Reset,
    /// Marked directly through the API (`key.mark_temporary()` and the like).
    Manual,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::Revoked => "revoked",
            Reason::Reset => "reset",
            Reason::Manual => "manual",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handle to one key of a pool.
#[derive(Clone)]
pub struct Key {
    pool: KeyPool,
    slot: Arc<Slot>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("label", &self.label())
            .field("hint", &self.hint())
            .finish()
    }
}

/// Two handles are equal when they name the same key of the same pool.
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.slot).hash(state);
    }
}

impl Key {
    pub(crate) fn new(pool: KeyPool, slot: Arc<Slot>) -> Self {
        Self { pool, slot }
    }

    pub fn label(&self) -> &str {
        &self.slot.label
    }

    /// A masked form of the key, safe to log.
    pub fn hint(&self) -> &str {
        &self.slot.hint
    }

    /// The secret itself. Only for building the upstream request.
    pub fn value(&self) -> &str {
        &self.slot.value
    }

    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    pub fn status(&self) -> KeyStatus {
        self.slot.cell.status(self.pool.clock().now_nanos())
    }

    pub fn state(&self) -> super::KeyState {
        self.status().state
    }

    pub(crate) fn counters(&self) -> &KeyCounters {
        &self.slot.cell.counters
    }

    /// Cools the key down. `None` or zero means the pool's default cooldown;
    /// anything above the pool's maximum is clamped to it. An existing later
    /// deadline is kept. Returns true only when this call moved the key from
    /// valid to temporary; a permanent key stays permanent.
    pub fn mark_temporary(&self, cooldown: Option<Duration>) -> bool {
        self.cool(cooldown, Cause::manual())
    }

    /// [`mark_temporary`](Self::mark_temporary), for `cause`.
    pub fn cool(&self, cooldown: Option<Duration>, cause: Cause) -> bool {
        let cooldowns = self.pool.cooldowns();
        let mut cooldown = cooldown
            .filter(|d| !d.is_zero())
            .unwrap_or(cooldowns.default);
        if let Some(max) = cooldowns.max {
            cooldown = cooldown.min(max);
        }
        let now = self.pool.clock().now_nanos();
        let deadline = now
            .saturating_add(duration_to_nanos(cooldown).max(1))
            .min(super::cell::PERMANENT - 1);
        let marked = self.slot.cell.cool_until(deadline, now);
        if marked.changed() {
            if let Some(redis) = self.pool.backend().redis() {
                redis.cooled(self.slot.fingerprint, deadline);
            }
        }
        if marked == Marked::Transition {
            self.transition(cause, Some(cooldown));
        }
        marked == Marked::Transition
    }

    /// Retires the key for good. Returns true only on the first transition.
    pub fn mark_permanent(&self) -> bool {
        self.retire(Cause::manual())
    }

    /// [`mark_permanent`](Self::mark_permanent), for `cause`.
    pub fn retire(&self, cause: Cause) -> bool {
        let marked = self.slot.cell.retire();
        if marked.changed() {
            if let Some(redis) = self.pool.backend().redis() {
                redis.retired(self.slot.fingerprint);
            }
            self.transition(cause, None);
        }
        marked == Marked::Transition
    }

    /// Operator action: the key is valid again, whatever its state, in every
    /// process sharing the pool's state. Marks made before the reset (and
    /// arriving later) do not undo it.
    pub fn reset(&self) {
        let cell = &self.slot.cell;
        let now = self.pool.clock().now_nanos();
        let changed = if let Some(redis) = self.pool.backend().redis() {
            let wall = clocks().0;
            let at = cell
                .reset_at
                .fetch_max(wall, Ordering::AcqRel)
                .max(wall)
                .max(cell.reset_at.load(Ordering::Acquire));
            let changed = cell.reset(now);
            redis.reset(self.slot.fingerprint, at);
            changed
        } else {
            cell.reset(now)
        };
        if changed {
            self.transition(
                Cause {
                    reason: Reason::Reset,
                    status: None,
                },
                None,
            );
        }
    }

    /// Counts and logs a change of state.
    fn transition(&self, cause: Cause, cooldown: Option<Duration>) {
        self.counters().transition(cause.reason);
        let (level, what) = match (cause.reason, cooldown) {
            (Reason::Reset, _) => (Level::Info, "is valid again".to_owned()),
            (_, Some(d)) => (Level::Info, format!("cools down for {} s", d.as_secs_f64())),
            (_, None) => (Level::Warning, "is retired".to_owned()),
        };
        let upstream = cause
            .status
            .map(|s| format!(" (upstream answered {s})"))
            .unwrap_or_default();
        let pool = self.pool.name();
        events::emit(Record {
            logger: "keyfailover.pool",
            level,
            message: format!(
                "key {} ({}) of pool {pool} {what}: {}{upstream}",
                self.label(),
                self.hint(),
                cause.reason
            ),
            fields: vec![
                ("pool", Field::from(pool)),
                ("key", Field::from(self.label())),
                ("hint", Field::from(self.hint())),
                ("reason", Field::from(cause.reason.as_str())),
                ("cooldown", Field::from(cooldown.map(|d| d.as_secs_f64()))),
                ("status", Field::from(cause.status)),
            ],
        });
    }
}

/// What made a key change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cause {
    pub reason: Reason,
    /// The upstream status behind it, if any.
    pub status: Option<u16>,
}

impl Cause {
    pub fn new(reason: Reason, status: Option<u16>) -> Self {
        Self { reason, status }
    }

    /// Marked through the API, not by an upstream answer.
    pub fn manual() -> Self {
        Self {
            reason: Reason::Manual,
            status: None,
        }
    }
}
