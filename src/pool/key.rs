//! A handle to one key of a pool, and marking it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::time::SystemTime;

use super::cell::{InFlight, Marked};
use super::{KeyPool, KeyStatus, Slot};
use crate::clock::duration_to_nanos;
use crate::events::{self, Field, Level, Record};
use crate::metrics::KeyCounters;
use crate::provider::AuthForm;
use crate::ratelimit;
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
    /// Its rate-limit headers said nothing is left until a reset.
    Depleted,
    /// Another key of its group was rate-limited: they share the limit.
    GroupRateLimited,
    /// Its own endpoint (a per-key `base_url`) could not be reached, timed
    /// out, or answered 504: cooled briefly while the others serve.
    Unreachable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::Revoked => "revoked",
            Reason::Reset => "reset",
            Reason::Manual => "manual",
            Reason::Depleted => "depleted",
            Reason::GroupRateLimited => "group_rate_limited",
            Reason::Unreachable => "unreachable",
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

    /// The label, shared (a clone is no copy).
    pub fn shared_label(&self) -> Arc<str> {
        self.slot.label.clone()
    }

    /// A masked form of the key, safe to log.
    pub fn hint(&self) -> &str {
        &self.slot.hint
    }

    /// The secret itself. Only for building the upstream request.
    pub fn value(&self) -> &str {
        &self.slot.value
    }

    /// The key as a header value written `form`'s way, marked sensitive.
    pub fn header_value(&self, form: AuthForm) -> http::HeaderValue {
        self.slot.auth[form as usize].clone()
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

    /// [`mark_temporary`](Self::mark_temporary), for `cause`. An endpoint
    /// found unreachable after a reload gave the key another one (a request
    /// that was out across it) says nothing of the key now: no cooldown.
    pub fn cool(&self, cooldown: Option<Duration>, cause: Cause) -> bool {
        if cause.reason == Reason::Unreachable && self.endpoint_moved() {
            return false;
        }
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
        let marked = self.cool_slot(&self.slot, deadline, now, cause, cooldown);
        // Keys of one group share their limits: a rate limit on one is a rate
        // limit on all (quota and revocation stay with the key).
        if matches!(cause.reason, Reason::RateLimited | Reason::Depleted) {
            if let Some(group) = self.slot.group() {
                let keys = self.pool.key_set();
                let group_cause = Cause::new(Reason::GroupRateLimited, cause.status);
                for sibling in keys.slots.iter() {
                    if !Arc::ptr_eq(sibling, &self.slot) && sibling.group() == Some(group) {
                        self.cool_slot(sibling, deadline, now, group_cause, cooldown);
                    }
                }
            }
        }
        marked == Marked::Transition
    }

    fn cool_slot(
        &self,
        slot: &Arc<Slot>,
        deadline: u64,
        now: u64,
        cause: Cause,
        cooldown: Duration,
    ) -> Marked {
        let unreachable = cause.reason == Reason::Unreachable;
        let marked = if unreachable {
            slot.cell.cool_unreachable_until(deadline, now)
        } else {
            slot.cell.cool_until(deadline, now)
        };
        if marked.changed() {
            if let Some(redis) = self.pool.backend().redis() {
                redis.cooled(slot.fingerprint, deadline, unreachable);
            }
        }
        if marked == Marked::Transition {
            Key::new(self.pool.clone(), slot.clone()).transition(cause, Some(cooldown));
        }
        marked
    }

    /// The key's group: configured, else learned from upstream.
    pub fn group(&self) -> Option<&str> {
        self.slot.group()
    }

    /// The key's own endpoint, if it has one.
    pub fn base_url(&self) -> Option<&crate::target::BaseUrl> {
        self.slot.base_url.as_ref()
    }

    /// Whether the pool now sends this key elsewhere than this handle does
    /// (a reload since gave it another endpoint).
    fn endpoint_moved(&self) -> bool {
        self.pool
            .key_set()
            .slots
            .iter()
            .any(|s| s.value == self.slot.value && s.base_url != self.slot.base_url)
    }

    pub(crate) fn in_flight(&self) -> InFlight {
        InFlight::new(self.slot.cell.clone())
    }

    /// What a response's headers tell about the key: its rate limits (kept,
    /// and a used-up limit cools the key until it resets, reason `depleted`)
    /// and the organization it belongs to (its group, unless configured).
    pub fn observe(&self, headers: &http::header::HeaderMap, status: u16, now: SystemTime) {
        self.observe_with(headers, status, || now);
    }

    /// [`Key::observe`] at the present time, the clock read only if a
    /// header needs it.
    pub fn observe_now(&self, headers: &http::header::HeaderMap, status: u16) {
        self.observe_with(headers, status, SystemTime::now);
    }

    fn observe_with(
        &self,
        headers: &http::header::HeaderMap,
        status: u16,
        now: impl Fn() -> SystemTime,
    ) {
        let pairs = || headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
        let limits = ratelimit::parse_with(pairs(), now);
        if !limits.is_empty() {
            self.counters().observe(&limits);
            if limits.get(ratelimit::LimitKind::Requests).remaining == Some(0) {
                self.counters().ran_out(self.pool.clock().now_nanos());
            }
            // A 429 is the verdict's to mark (as rate-limited); this is for
            // answers that went through but used the last of a limit.
            if let (true, Some((_, reset))) = (status != 429, limits.depleted()) {
                let ceiling = self.pool.cooldowns().upstream_ceiling();
                self.cool(
                    Some(reset.min(ceiling)),
                    Cause::new(Reason::Depleted, Some(status)),
                );
            }
        }
        if self.slot.group.is_none() && self.slot.learned_group.get().is_none() {
            const ORGANIZATION: http::HeaderName =
                http::HeaderName::from_static("anthropic-organization-id");
            // Found by walking the names: most upstreams never send it, and
            // a lookup that finds nothing still hashes the name.
            let org = headers
                .iter()
                .find(|(name, _)| *name == ORGANIZATION)
                .and_then(|(_, v)| std::str::from_utf8(v.as_bytes()).ok())
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 128);
            // A group is shown where keys are not: an upstream echoing the
            // key it was sent there is not heard.
            if let Some(org) =
                org.filter(|org| matches!(self.pool.redact(org), std::borrow::Cow::Borrowed(_)))
            {
                let _ = self.slot.learned_group.set(org.to_owned());
            }
        }
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
