//! The key pool: an ordered set of API keys, each valid, cooling down
//! (temporary) or retired (permanent), walked once per request.
//!
//! A key's state is one atomic word ([`cell`]); where that word lives (this
//! process, shared memory, or this process following Redis) is the state
//! backend's business (`crate::state`), never the pool's. The key list itself
//! is swapped whole on reload, so a walker sees the old list or the new one.

pub mod cell;
mod key;
mod walker;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::clock::{Clock, MonotonicClock};
use crate::error::{Error, Exhaustion, Result};
use crate::provider::AuthForm;
use crate::state::{Backend, Fingerprint, StateSpec, SyncStatus};

pub use cell::{InFlight, KeyState, KeyStatus};
pub use key::{Cause, Key, Reason};
pub use walker::Walker;

use cell::Cell;

/// Key counts by state; see [`KeyPool::health`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    pub valid: usize,
    pub temporary: usize,
    pub permanent: usize,
}

impl Health {
    /// The shape of `pool.health()` and `/_keyfailover/health`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "status": self.status(),
            "keys": {
                "valid": self.valid,
                "temporary": self.temporary,
                "permanent": self.permanent,
            },
        })
    }

    pub fn status(&self) -> &'static str {
        if self.temporary == 0 && self.permanent == 0 {
            "ok"
        } else if self.valid > 0 {
            "degraded"
        } else {
            "exhausted"
        }
    }
}

/// What a reload changed: keys added and removed (label, hint), labels that
/// changed (old, new), keys given another endpoint (label, hint), and how
/// many keys the pool has now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<(String, String)>,
    pub removed: Vec<(String, String)>,
    pub relabelled: Vec<(String, String)>,
    pub moved: Vec<(String, String)>,
    pub kept: usize,
}

impl ReloadReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.relabelled.is_empty()
            && self.moved.is_empty()
    }

    /// One line for the logs, by label and hint.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return "no change".into();
        }
        let keys = |v: &[(String, String)]| {
            v.iter()
                .map(|(l, h)| format!("{l} ({h})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            parts.push(format!("added {}", keys(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", keys(&self.removed)));
        }
        if !self.relabelled.is_empty() {
            let moves: Vec<String> = self
                .relabelled
                .iter()
                .map(|(a, b)| format!("{a} -> {b}"))
                .collect();
            parts.push(format!("relabelled {}", moves.join(", ")));
        }
        if !self.moved.is_empty() {
            parts.push(format!("new endpoint for {}", keys(&self.moved)));
        }
        let keys = if self.kept == 1 { "key" } else { "keys" };
        format!("{}; {} {keys} now", parts.join("; "), self.kept)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let keys = |v: &[(String, String)]| {
            v.iter()
                .map(|(l, h)| serde_json::json!({"label": l, "hint": h}))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "added": keys(&self.added),
            "removed": keys(&self.removed),
            "relabelled": self.relabelled.iter().map(|(a, b)| serde_json::json!({"from": a, "to": b})).collect::<Vec<_>>(),
            "moved": keys(&self.moved),
            "keys": self.kept,
            "summary": self.summary(),
        })
    }
}

/// A limit's latest values, as a key's rate-limit headers reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSeen {
    pub kind: crate::ratelimit::LimitKind,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
}

/// One key as operators see it: no secret, only the hint.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySnapshot {
    pub label: String,
    pub hint: String,
    pub state: KeyState,
    pub cooldown_remaining: Duration,
    pub group: Option<String>,
    /// Each limit heard of.
    pub limits: Vec<LimitSeen>,
    pub in_flight: u32,
}

impl KeySnapshot {
    /// The shape of `pool.snapshot()` entries and `/_keyfailover/keys`.
    pub fn to_json(&self) -> serde_json::Value {
        let by_kind = |pick: fn(&LimitSeen) -> Option<u64>| {
            self.limits
                .iter()
                .filter_map(|l| {
                    Some((
                        l.kind.as_str().to_owned(),
                        serde_json::Value::from(pick(l)?),
                    ))
                })
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "label": self.label,
            "hint": self.hint,
            "state": self.state.as_str(),
            "cooldown_remaining": self.cooldown_remaining.as_secs_f64(),
            "group": self.group,
            "remaining": by_kind(|l| l.remaining),
            "limit": by_kind(|l| l.limit),
            "in_flight": self.in_flight,
        })
    }
}

/// Cooldown settings of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldowns {
    /// Used when a 429 names no usable Retry-After, or a cooldown is zero.
    pub default: Duration,
    /// Upper bound for any cooldown, if set.
    pub max: Option<Duration>,
    /// Used when a key's quota or spend cap is exhausted.
    pub quota: Duration,
}

impl Default for Cooldowns {
    fn default() -> Self {
        Self {
            default: Duration::from_secs(60),
            max: None,
            quota: Duration::from_secs(3600),
        }
    }
}

/// The longest cooldown an upstream's own hint (Retry-After, a rate-limit
/// reset) can set when no `max_cooldown` is configured: one day. A hint of
/// years is a broken or hostile upstream, not a plan.
pub const UPSTREAM_CEILING: Duration = Duration::from_secs(24 * 3600);

impl Cooldowns {
    fn validate(&self) -> Result<()> {
        let positive = |name: &str, d: Duration| {
            if d.is_zero() {
                Err(Error::Config(format!("{name} must be positive")))
            } else {
                Ok(())
            }
        };
        positive("default_cooldown", self.default)?;
        positive("quota_cooldown", self.quota)?;
        if let Some(max) = self.max {
            positive("max_cooldown", max)?;
            for (name, d) in [
                ("default_cooldown", self.default),
                ("quota_cooldown", self.quota),
            ] {
                if max < d {
                    return Err(Error::Config(format!(
                        "max_cooldown ({} s) is shorter than {name} ({} s)",
                        max.as_secs_f64(),
                        d.as_secs_f64()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The ceiling for cooldowns an upstream asks for: `max`, else
    /// [`UPSTREAM_CEILING`].
    pub fn upstream_ceiling(&self) -> Duration {
        self.max.unwrap_or(UPSTREAM_CEILING)
    }
}

/// One key as configured: its label and value, and optionally the group
/// (organization or project) whose limits it shares and its own endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub label: String,
    pub value: String,
    pub group: Option<String>,
    pub base_url: Option<String>,
}

impl KeySpec {
    pub fn new(label: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            value: value.into(),
            group: None,
            base_url: None,
        }
    }
}

impl From<(String, String)> for KeySpec {
    fn from((label, value): (String, String)) -> Self {
        Self::new(label, value)
    }
}

/// How a pool is built, besides its keys.
#[derive(Clone, Default)]
pub struct PoolOptions {
    pub cooldowns: Cooldowns,
    pub strategy: Strategy,
    /// The clock cooldowns run on; the system's monotonic clock by default.
    /// A manual clock only works with local state.
    pub clock: Option<Arc<dyn Clock>>,
    pub state: Option<StateSpec>,
    /// Where background work runs (a Redis backend's sync task).
    pub runtime: Option<tokio::runtime::Handle>,
}

impl fmt::Debug for PoolOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolOptions")
            .field("cooldowns", &self.cooldowns)
            .field("state", &self.state)
            .finish()
    }
}

/// One key of the pool, with what goes with it.
pub(crate) struct Slot {
    /// Shared: each request's answer and attempt log name its key.
    pub label: Arc<str>,
    pub value: String,
    /// The value as it goes in a header, each way a provider writes it
    /// (indexed by [`AuthForm`]), marked sensitive: made once, not per request.
    pub auth: [http::HeaderValue; 2],
    pub hint: String,
    pub fingerprint: Fingerprint,
    /// The group configured for the key.
    pub group: Option<String>,
    /// The group learned from upstream's answers (`anthropic-organization-id`),
    /// when none is configured.
    pub learned_group: std::sync::OnceLock<String>,
    pub base_url: Option<crate::target::BaseUrl>,
    pub cell: Arc<Cell>,
}

impl Slot {
    /// The key's group: configured, else learned.
    pub fn group(&self) -> Option<&str> {
        self.group
            .as_deref()
            .or_else(|| self.learned_group.get().map(String::as_str))
    }
}

/// The pool's keys at one moment; replaced whole by a reload.
pub(crate) struct KeySet {
    pub slots: Box<[Arc<Slot>]>,
    /// The length of the shortest key: text shorter cannot hold one.
    pub shortest: usize,
}

impl KeySet {
    /// `text` with every key replaced by its hint.
    fn replaced<'t>(&self, text: std::borrow::Cow<'t, str>) -> std::borrow::Cow<'t, str> {
        self.slots.iter().fold(text, |out, slot| {
            if out.contains(slot.value.as_str()) {
                std::borrow::Cow::Owned(out.replace(slot.value.as_str(), &slot.hint))
            } else {
                out
            }
        })
    }

    /// Every key's value with its hint, for scrubbing keys out of text.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.slots
            .iter()
            .map(|s| (s.value.as_str(), s.hint.as_str()))
    }
}

/// A reload made ready: see [`KeyPool::prepare_reload`].
pub struct PreparedReload {
    pool: KeyPool,
    keys: KeySet,
    strategy: Option<Strategy>,
    report: ReloadReport,
}

impl fmt::Debug for PreparedReload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedReload")
            .field("pool", &self.pool.name())
            .field("report", &self.report.summary())
            .finish()
    }
}

impl PreparedReload {
    /// What the reload changes (keys; not the strategy).
    pub fn report(&self) -> &ReloadReport {
        &self.report
    }

    /// Puts the new keys (and strategy) in service; returns what changed.
    pub fn commit(self) -> ReloadReport {
        let Self {
            pool,
            keys,
            strategy,
            report,
        } = self;
        let now = pool.inner.clock.now_nanos();
        let unreachable: Vec<Arc<Slot>> = keys
            .slots
            .iter()
            .filter(|s| report.moved.iter().any(|(label, _)| **label == *s.label))
            .filter(|s| s.cell.status_and_unreachable(now).1)
            .cloned()
            .collect();
        if let Some(strategy) = strategy {
            let index = strategy.index();
            pool.inner
                .strategy
                .store(index, std::sync::atomic::Ordering::Relaxed);
        }
        pool.inner.keys.store(Arc::new(keys));
        for slot in unreachable {
            Key::new(pool.clone(), slot).reset();
        }
        report
    }
}

struct Inner {
    keys: ArcSwap<KeySet>,
    cooldowns: Cooldowns,
    /// A [`Strategy`] (its index in [`Strategy::ALL`]): a reload may change it.
    strategy: std::sync::atomic::AtomicU8,
    /// Where the next round-robin walk starts.
    turn: std::sync::atomic::AtomicUsize,
    clock: Arc<dyn Clock>,
    namespace: String,
    /// What logs and metrics call the pool: set by the first client that
    /// uses it (`FailoverClient(..., name=)`), "default" until then.
    name: std::sync::OnceLock<String>,
    /// Bound on first use, by then under the pool's name: with shm, the
    /// pools of one name count together across processes, and only they.
    counters: std::sync::OnceLock<crate::metrics::PoolCounters>,
    backend: Backend,
}

/// A pool of keys for one upstream provider. Cloning is cheap and shares state.
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<Inner>,
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.inner.keys.load();
        f.debug_list()
            .entries(keys.slots.iter().map(|s| (&s.label, &s.hint)))
            .finish()
    }
}

impl KeyPool {
    /// Builds a pool from unlabelled keys, labelled `key-0`, `key-1`, ...
    pub fn from_keys<I, S>(
        keys: I,
        cooldowns: Cooldowns,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let labelled = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| (format!("key-{i}"), k.into()));
        Self::new(labelled, cooldowns, clock)
    }

    /// Builds a pool with local state from `(label, key)` pairs, keeping their order.
    pub fn new<I>(keys: I, cooldowns: Cooldowns, clock: Option<Arc<dyn Clock>>) -> Result<Self>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::build(
            keys,
            PoolOptions {
                cooldowns,
                clock,
                ..PoolOptions::default()
            },
        )
    }

    /// Builds a pool from its keys, keeping their order.
    pub fn build<I, K>(keys: I, options: PoolOptions) -> Result<Self>
    where
        I: IntoIterator<Item = K>,
        K: Into<KeySpec>,
    {
        options.cooldowns.validate()?;
        let specs = validated(keys.into_iter().map(Into::into))?;
        let clock = options
            .clock
            .unwrap_or_else(|| Arc::new(MonotonicClock::new()));
        let state = options.state.unwrap_or(StateSpec::Local);
        if !state.is_local() && !clock.is_system() {
            return Err(Error::Config(
                "a pool with shared state runs on the system clock: a manual clock \
                 only works with state=None"
                    .into(),
            ));
        }
        let namespace = match &state {
            StateSpec::Local => "default".to_owned(),
            StateSpec::Shm { namespace } | StateSpec::Redis { namespace, .. } => namespace.clone(),
        };
        let backend = Backend::open(&state, options.runtime.as_ref())?;
        let keys = key_set(specs, &namespace, &backend, None)?;
        Ok(Self {
            inner: Arc::new(Inner {
                keys: ArcSwap::from_pointee(keys),
                cooldowns: options.cooldowns,
                strategy: std::sync::atomic::AtomicU8::new(options.strategy.index()),
                turn: std::sync::atomic::AtomicUsize::new(0),
                clock,
                namespace,
                name: std::sync::OnceLock::new(),
                counters: std::sync::OnceLock::new(),
                backend,
            }),
        })
    }

    pub fn strategy(&self) -> Strategy {
        let index = self
            .inner
            .strategy
            .load(std::sync::atomic::Ordering::Relaxed);
        Strategy::ALL[usize::from(index)]
    }

    /// Where the next walk starts, by the pool's strategy.
    pub(crate) fn start(&self, keys: &KeySet) -> usize {
        let n = keys.slots.len();
        let strategy = self.strategy();
        match strategy {
            Strategy::Ordered => 0,
            Strategy::RoundRobin => {
                self.inner
                    .turn
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    % n
            }
            Strategy::LeastLoaded | Strategy::Headroom => {
                let now = self.inner.clock.now_nanos();
                let headroom = strategy == Strategy::Headroom;
                keys.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, slot)| slot.cell.is_available(|| now))
                    .min_by(|(i, a), (j, b)| {
                        let by_headroom = if headroom {
                            b.cell.headroom().total_cmp(&a.cell.headroom())
                        } else {
                            std::cmp::Ordering::Equal
                        };
                        by_headroom
                            .then(a.cell.in_flight().cmp(&b.cell.in_flight()))
                            .then(i.cmp(j))
                    })
                    .map_or(0, |(i, _)| i)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.keys.load().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cooldowns(&self) -> Cooldowns {
        self.inner.cooldowns
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// "local", "shm" or "redis".
    pub fn state_backend(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// How the sharing of key states goes.
    pub fn sync_status(&self) -> SyncStatus {
        self.inner.backend.status()
    }

    /// The pool's name in logs and metrics.
    pub fn name(&self) -> &str {
        self.inner.name.get().map_or("default", String::as_str)
    }

    /// Names the pool, unless it already has a name.
    pub fn adopt_name(&self, name: &str) {
        let _ = self.inner.name.set(name.to_owned());
    }

    pub(crate) fn counters(&self) -> &crate::metrics::PoolCounters {
        self.inner
            .counters
            .get_or_init(|| self.inner.backend.pool_counters(self.name()))
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub(crate) fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
    }

    pub(crate) fn key_set(&self) -> Arc<KeySet> {
        self.inner.keys.load_full()
    }

    /// A fresh walker for one request, starting before the first key.
    pub fn walker(&self) -> Walker {
        Walker::new(self.clone(), self.key_set())
    }

    /// The key with this label.
    pub fn key(&self, label: &str) -> Result<Key> {
        self.inner
            .keys
            .load()
            .slots
            .iter()
            .find(|s| *s.label == *label)
            .map(|slot| Key::new(self.clone(), slot.clone()))
            .ok_or_else(|| Error::UnknownLabel(self.redact(label).into_owned()))
    }

    /// `text` with every key of the pool replaced by its hint: for messages
    /// that echo what a caller passed, which may be a key in the wrong place.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let keys = self.inner.keys.load();
        let out = keys.replaced(std::borrow::Cow::Borrowed(text));
        // A key may come percent-encoded (in a path, a query): a text that
        // holds one once decoded is shown decoded, with it replaced.
        if out.contains('%') {
            let decoded = crate::target::percent_decoded(out.as_bytes(), false);
            let decoded = String::from_utf8_lossy(&decoded);
            if keys
                .slots
                .iter()
                .any(|slot| decoded.contains(slot.value.as_str()))
            {
                return std::borrow::Cow::Owned(keys.replaced(decoded).into_owned());
            }
        }
        out
    }

    /// Every key, in configured order.
    pub fn keys(&self) -> Vec<Key> {
        self.key_set()
            .slots
            .iter()
            .map(|slot| Key::new(self.clone(), slot.clone()))
            .collect()
    }

    /// Each key's state and remaining cooldown, in configured order, all read
    /// against one clock reading.
    pub fn statuses(&self) -> Vec<KeyStatus> {
        let now = self.inner.clock.now_nanos();
        self.inner
            .keys
            .load()
            .slots
            .iter()
            .map(|s| s.cell.status(now))
            .collect()
    }

    /// Replaces the pool's keys (same forms as when it was built): a key whose
    /// value is unchanged keeps its state and counters, whatever its label
    /// now; new keys start valid; removed keys leave (requests using one
    /// finish normally). All at once: a walker sees the old list or the new
    /// one. Invalid input changes nothing. A kept key given another endpoint
    /// (`base_url`) that was cooling down because its old one could not be
    /// reached is valid again: that cooldown said nothing about the new one.
    /// Its other states (rate-limited, retired) stay, being the key's own.
    pub fn reload<I, K>(&self, keys: I) -> Result<ReloadReport>
    where
        I: IntoIterator<Item = K>,
        K: Into<KeySpec>,
    {
        Ok(self.prepare_reload(keys, None)?.commit())
    }

    /// A [`reload`](Self::reload) checked and made ready (new keys' state
    /// taken, in shared memory their slots), to take effect on
    /// [`PreparedReload::commit`], which cannot fail; dropped uncommitted, it
    /// changes nothing. For a server reloading several pools at once: all
    /// change, or none. `strategy`: the pool's strategy from then on.
    pub fn prepare_reload<I, K>(
        &self,
        keys: I,
        strategy: Option<Strategy>,
    ) -> Result<PreparedReload>
    where
        I: IntoIterator<Item = K>,
        K: Into<KeySpec>,
    {
        let specs = validated(keys.into_iter().map(Into::into))?;
        let old = self.key_set();
        let new = key_set(
            specs,
            &self.inner.namespace,
            &self.inner.backend,
            Some(&old),
        )?;
        let describe = |s: &Slot| (s.label.to_string(), s.hint.clone());
        let report = ReloadReport {
            added: new
                .slots
                .iter()
                .filter(|n| !old.slots.iter().any(|o| o.value == n.value))
                .map(|s| describe(s))
                .collect(),
            removed: old
                .slots
                .iter()
                .filter(|o| !new.slots.iter().any(|n| n.value == o.value))
                .map(|s| describe(s))
                .collect(),
            relabelled: new
                .slots
                .iter()
                .filter_map(|n| {
                    let o = old.slots.iter().find(|o| o.value == n.value)?;
                    (o.label != n.label).then(|| (o.label.to_string(), n.label.to_string()))
                })
                .collect(),
            moved: new
                .slots
                .iter()
                .filter(|n| {
                    old.slots
                        .iter()
                        .any(|o| o.value == n.value && o.base_url != n.base_url)
                })
                .map(|s| describe(s))
                .collect(),
            kept: new.slots.len(),
        };
        Ok(PreparedReload {
            pool: self.clone(),
            keys: new,
            strategy,
            report,
        })
    }

    /// Every key with its state, in configured order.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let now = self.inner.clock.now_nanos();
        self.inner
            .keys
            .load()
            .slots
            .iter()
            .map(|slot| {
                let status = slot.cell.status(now);
                KeySnapshot {
                    label: slot.label.to_string(),
                    hint: slot.hint.clone(),
                    state: status.state,
                    cooldown_remaining: status.cooldown_remaining,
                    group: slot.group().map(str::to_owned),
                    limits: crate::ratelimit::LimitKind::ALL
                        .iter()
                        .filter_map(|&kind| match slot.cell.counters.limit(kind) {
                            (None, None) => None,
                            (limit, remaining) => Some(LimitSeen {
                                kind,
                                limit,
                                remaining,
                            }),
                        })
                        .collect(),
                    in_flight: slot.cell.in_flight(),
                }
            })
            .collect()
    }

    /// How many keys are in each state, and what that means for service:
    /// "ok" when every key is valid, "degraded" when some are, "exhausted"
    /// when none is.
    pub fn health(&self) -> Health {
        let mut health = Health::default();
        for status in self.statuses() {
            match status.state {
                KeyState::Valid => health.valid += 1,
                KeyState::Temporary => health.temporary += 1,
                KeyState::Permanent => health.permanent += 1,
            }
        }
        health
    }

    /// Why nothing is available: permanent when every key is permanent,
    /// otherwise transient with the smallest remaining cooldown (zero when
    /// some key is valid), and unreachable when every key cooling down does
    /// so because its own endpoint could not be reached.
    pub fn exhaustion(&self) -> Exhaustion {
        exhaustion_of(&self.inner.keys.load(), self.inner.clock.now_nanos())
    }
}

fn exhaustion_of(keys: &KeySet, now: u64) -> Exhaustion {
    let mut soonest: Option<Duration> = None;
    let mut all_unreachable = true;
    for slot in keys.slots.iter() {
        let (status, unreachable) = slot.cell.status_and_unreachable(now);
        match status.state {
            KeyState::Valid => {
                return Exhaustion::Transient {
                    retry_after: Duration::ZERO,
                }
            }
            KeyState::Temporary => {
                let left = status.cooldown_remaining;
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
                all_unreachable &= unreachable;
            }
            KeyState::Permanent => {}
        }
    }
    match soonest {
        Some(retry_after) if all_unreachable => Exhaustion::Unreachable { retry_after },
        Some(retry_after) => Exhaustion::Transient { retry_after },
        None => Exhaustion::Permanent,
    }
}

/// Checks labels, keys and their settings: non-empty, no duplicates.
fn validated(keys: impl IntoIterator<Item = KeySpec>) -> Result<Vec<KeySpec>> {
    let mut out: Vec<KeySpec> = Vec::new();
    for spec in keys {
        let label = &spec.label;
        validate_label(label)?;
        validate_key(label, &spec.value)?;
        if let Some(group) = &spec.group {
            validate_group(label, group, &spec.value)?;
        }
        for other in &out {
            if other.label == *label {
                return Err(Error::Config(format!("duplicate label '{label}'")));
            }
            if other.value == spec.value {
                return Err(Error::Config(format!(
                    "{} and {label} hold the same key",
                    other.label
                )));
            }
        }
        out.push(spec);
    }
    if out.is_empty() {
        return Err(Error::Config("a key pool needs at least one key".into()));
    }
    // Labels and groups are shown where keys are not (logs, metrics,
    // snapshots, the admin endpoints): one that holds a key of the pool
    // would show it.
    for (i, spec) in out.iter().enumerate() {
        let shown = [("label", Some(&spec.label)), ("group", spec.group.as_ref())];
        for (what, text) in shown {
            let Some(text) = text else { continue };
            let holds = |key: &KeySpec| {
                *text == key.value || (key.value.len() >= 8 && text.contains(&key.value))
            };
            if let Some(key) = out.iter().find(|key| holds(key)) {
                return Err(Error::Config(format!(
                    "the {what} of the pool's key number {} holds one of its keys ({}): \
                     a {what} is shown where keys are not",
                    i + 1,
                    mask(&key.value)
                )));
            }
        }
    }
    Ok(out)
}

/// The key set for `specs`: a key that `previous` holds (by value) keeps its
/// cell, so its state and counters, whatever its label now.
fn key_set(
    specs: Vec<KeySpec>,
    namespace: &str,
    backend: &Backend,
    previous: Option<&KeySet>,
) -> Result<KeySet> {
    let slots = specs
        .into_iter()
        .map(|spec| {
            let kept = previous.and_then(|p| p.slots.iter().find(|s| s.value == spec.value));
            let fingerprint = Fingerprint::of(namespace, &spec.value);
            let cell = match kept {
                Some(slot) => slot.cell.clone(),
                None => backend.cell(fingerprint)?,
            };
            let base_url = spec
                .base_url
                .as_deref()
                .map(|url| {
                    crate::target::BaseUrl::parse(url).map_err(|e| {
                        Error::Config(format!(
                            "{}: {}",
                            spec.label,
                            mask_in(&e.to_string(), &spec.value)
                        ))
                    })
                })
                .transpose()?;
            let auth = [AuthForm::Raw, AuthForm::Bearer].map(|form| {
                let mut value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(
                    form.value(&spec.value),
                ));
                if let Ok(value) = &mut value {
                    value.set_sensitive(true);
                }
                value
            });
            let [Ok(raw), Ok(bearer)] = auth else {
                // Keys are checked to be visible ASCII before they get here.
                return Err(Error::Config(format!(
                    "{}: a key must be visible ASCII",
                    spec.label
                )));
            };
            Ok(Arc::new(Slot {
                auth: [raw, bearer],
                hint: mask(&spec.value),
                learned_group: std::sync::OnceLock::new(),
                group: spec.group,
                base_url,
                cell,
                label: spec.label.into(),
                value: spec.value,
                fingerprint,
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let shortest = slots
        .iter()
        .map(|s| s.value.len())
        .min()
        .unwrap_or(0)
        .max(1);
    Ok(KeySet {
        slots: slots.into_boxed_slice(),
        shortest,
    })
}

fn mask_in(text: &str, secret: &str) -> String {
    text.replace(secret, &mask(secret))
}

/// Where each walk starts; whatever the start, a walk visits each key at
/// most once and skips the unavailable ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Every walk starts at the first key (the seed's behaviour).
    #[default]
    Ordered,
    /// Each walk starts one key after the previous walk's start.
    RoundRobin,
    /// At the available key with the fewest requests in flight.
    LeastLoaded,
    /// At the available key with the largest share of its request limit
    /// expected left (the latest rate-limit headers' remaining less the
    /// requests in flight on it; a key not heard from counts as full), then
    /// the fewest in flight.
    Headroom,
}

impl std::str::FromStr for Strategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "ordered" => Strategy::Ordered,
            "round_robin" => Strategy::RoundRobin,
            "least_loaded" => Strategy::LeastLoaded,
            "headroom" => Strategy::Headroom,
            other => {
                return Err(Error::Config(format!(
                "unknown strategy {:?}: expected ordered, round_robin, least_loaded or headroom",
                echoed(other)
            )))
            }
        })
    }
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Ordered,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
        Strategy::Headroom,
    ];

    /// Its place in [`Strategy::ALL`].
    fn index(self) -> u8 {
        match self {
            Strategy::Ordered => 0,
            Strategy::RoundRobin => 1,
            Strategy::LeastLoaded => 2,
            Strategy::Headroom => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Ordered => "ordered",
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastLoaded => "least_loaded",
            Strategy::Headroom => "headroom",
        }
    }
}

/// A name the caller gave that is none of those expected, as an error shows
/// it: masked when longer than any name is, as a key in the wrong place is.
pub(crate) fn echoed(given: &str) -> std::borrow::Cow<'_, str> {
    if given.chars().count() > 24 {
        std::borrow::Cow::Owned(mask(given))
    } else {
        std::borrow::Cow::Borrowed(given)
    }
}

/// The masked form of a secret: first 4 and last 4 characters of keys of 16
/// characters or more, only the last 2 of keys of 8 to 15, nothing of shorter
/// ones.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    let tail = |k: usize| chars[n - k..].iter().collect::<String>();
    if n >= 16 {
        format!("{}...{}", chars[..4].iter().collect::<String>(), tail(4))
    } else if n >= 8 {
        format!("...{}", tail(2))
    } else {
        "...".to_owned()
    }
}

fn validate_label(label: &str) -> Result<()> {
    if label.trim().is_empty() {
        return Err(Error::Config("key labels must not be empty".into()));
    }
    if label.chars().any(char::is_control) {
        return Err(Error::Config(format!(
            "label {:?} contains control characters",
            label.escape_debug().to_string()
        )));
    }
    Ok(())
}

pub(crate) fn validate_key(label: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::Config(format!("{label}: the key is empty")));
    }
    if !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Config(format!(
            "{label}: the key contains whitespace, control or non-ASCII characters"
        )));
    }
    Ok(())
}

/// A key's group: a name, shown where the key is not (so not holding it).
pub(crate) fn validate_group(label: &str, group: &str, value: &str) -> Result<()> {
    if group.trim().is_empty() {
        return Err(Error::Config(format!("{label}: the group name is empty")));
    }
    if group.chars().any(char::is_control) {
        return Err(Error::Config(format!(
            "{label}: the group name holds a control character"
        )));
    }
    if group.contains(value) {
        return Err(Error::Config(format!(
            "{label}: the group holds the key ({}): a group is shown where keys are not",
            mask(value)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn pool_with(keys: &[&str]) -> (KeyPool, Arc<ManualClock>) {
        let clock = ManualClock::new(Duration::ZERO);
        let pool = KeyPool::from_keys(
            keys.iter().copied(),
            Cooldowns::default(),
            Some(clock.clone() as Arc<dyn Clock>),
        )
        .unwrap();
        (pool, clock)
    }

    fn config_error(keys: Vec<(&str, &str)>, cooldowns: Cooldowns) -> String {
        let keys = keys.into_iter().map(|(l, k)| (l.to_owned(), k.to_owned()));
        match KeyPool::new(keys, cooldowns, None) {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn new_pool_walks_every_key_then_is_transiently_exhausted() {
        let (pool, _) = pool_with(&["key-a", "key-b", "key-c"]);
        assert_eq!(pool.len(), 3);
        let mut walker = pool.walker();
        for label in ["key-0", "key-1", "key-2"] {
            assert_eq!(walker.next_key().unwrap().label(), label);
        }
        assert_eq!(
            walker.next_key().unwrap_err(),
            Exhaustion::Transient {
                retry_after: Duration::ZERO
            }
        );
    }

    #[test]
    fn invalid_configurations_are_rejected_without_revealing_keys() {
        let d = Cooldowns::default();
        assert!(config_error(vec![], d).contains("at least one key"));
        assert!(config_error(vec![("a", "")], d).contains("empty"));
        assert!(config_error(vec![("a", "  \t")], d).contains("empty"));
        assert!(config_error(vec![("a", "sk-ab cd")], d).contains("whitespace"));
        let dup = config_error(vec![("a", "sk-secret-1"), ("b", "sk-secret-1")], d);
        assert_eq!(dup, "a and b hold the same key");
        // A label that is, or holds, one of the pool's keys, its own or another's.
        let key_a = "sk-ant-aaaaaaaaaaaaaaaaaaaa";
        let key_b = "sk-ant-bbbbbbbbbbbbbbbbbbbb";
        let holder = format!("x{key_a}y");
        for labels in [[key_b, "b"], ["a", key_b], [holder.as_str(), "b"]] {
            let err = config_error(vec![(labels[0], key_a), (labels[1], key_b)], d);
            assert!(err.contains("holds one of its keys"), "{err}");
            assert!(!err.contains(key_a) && !err.contains(key_b), "{err}");
        }
        assert!(!dup.contains("sk-secret"));
        assert!(config_error(vec![("a", "sk-1"), ("a", "sk-2")], d).contains("duplicate label"));
        assert!(config_error(vec![(" ", "sk-1")], d).contains("labels"));
        for (name, bad) in [
            (
                "default_cooldown",
                Cooldowns {
                    default: Duration::ZERO,
                    ..d
                },
            ),
            (
                "quota_cooldown",
                Cooldowns {
                    quota: Duration::ZERO,
                    ..d
                },
            ),
            (
                "max_cooldown",
                Cooldowns {
                    max: Some(Duration::ZERO),
                    ..d
                },
            ),
        ] {
            assert_eq!(
                config_error(vec![("a", "sk-1")], bad),
                format!("{name} must be positive")
            );
        }
    }

    #[test]
    fn hints_mask_keys() {
        assert_eq!(
            mask("sk-ant-api03-abcdefghijklmnopqrstuvwxyz-abcd"),
            "sk-a...abcd"
        );
        assert_eq!(mask("0123456789abcdef"), "0123...cdef");
        assert_eq!(mask("0123456789abcde"), "...de");
        assert_eq!(mask("01234567"), "...67");
        assert_eq!(mask("0123456"), "...");
        assert_eq!(mask(""), "...");
    }

    #[test]
    fn keys_as_header_values_are_the_providers_and_sensitive() {
        use crate::provider::Provider;
        let (pool, _) = pool_with(&["sk-one", "sk-two"]);
        let paths = [
            "/v1/messages",
            "/v1beta/openai/chat/completions",
            "/v1beta/models/m",
        ];
        for key in pool.keys() {
            for provider in [
                Provider::Anthropic,
                Provider::OpenAi,
                Provider::Gemini,
                Provider::AzureOpenAi,
            ] {
                for path in paths {
                    let (name, form) = provider.auth_scheme_for(path);
                    let value = key.header_value(form);
                    assert_eq!(
                        provider.auth_header_for(key.value(), path),
                        (name, value.to_str().unwrap().to_owned())
                    );
                    assert!(value.is_sensitive());
                    assert!(!format!("{value:?}").contains(key.value()));
                }
            }
        }
    }

    #[test]
    fn health_summarises_states() {
        let (pool, clock) = pool_with(&["a", "b", "c"]);
        assert_eq!(pool.health().status(), "ok");
        mark(&pool, "key-0", Some(S(10)));
        retire(&pool, "key-1");
        let health = pool.health();
        assert_eq!(
            (health.valid, health.temporary, health.permanent),
            (1, 1, 1)
        );
        assert_eq!(health.status(), "degraded");
        mark(&pool, "key-2", Some(S(5)));
        assert_eq!(pool.health().status(), "exhausted");
        clock.advance(S(5));
        assert_eq!(pool.health().status(), "degraded");
    }

    #[test]
    fn exhausted_by_unreachable_endpoints_only_while_every_cooling_key_is_unreachable() {
        let unreachable = |pool: &KeyPool, label: &str, secs: u64| {
            let cause = Cause::new(Reason::Unreachable, None);
            pool.key(label).unwrap().cool(Some(S(secs)), cause);
        };
        let exhausted = |pool: &KeyPool| {
            let walked = pool.walker().next_key().map(|k| k.label().to_owned());
            assert_eq!(walked.clone().unwrap_err(), pool.exhaustion());
            walked.unwrap_err()
        };
        let (pool, _) = pool_with(&["a", "b", "c"]);
        unreachable(&pool, "key-0", 15);
        unreachable(&pool, "key-1", 10);
        retire(&pool, "key-2");
        assert_eq!(
            exhausted(&pool),
            Exhaustion::Unreachable { retry_after: S(10) },
            "a retired key does not count"
        );
        // A rate limit on one of them, for longer, replaces the reason.
        mark(&pool, "key-1", Some(S(30)));
        assert_eq!(
            exhausted(&pool),
            Exhaustion::Transient { retry_after: S(15) }
        );
        // A shorter mark leaves the later deadline, and so its reason.
        let (pool, _) = pool_with(&["a"]);
        unreachable(&pool, "key-0", 15);
        mark(&pool, "key-0", Some(S(5)));
        assert!(matches!(exhausted(&pool), Exhaustion::Unreachable { .. }));
        // Once the cooldown ends, the key is valid; a later cooldown for
        // another reason is that reason's, even at the same length.
        let (pool, clock) = pool_with(&["a"]);
        unreachable(&pool, "key-0", 15);
        clock.advance(S(15));
        assert!(pool.walker().next_key().is_ok());
        mark(&pool, "key-0", Some(S(15)));
        assert_eq!(
            exhausted(&pool),
            Exhaustion::Transient { retry_after: S(15) }
        );
        // An operator's reset ends it too.
        unreachable(&pool, "key-0", 15);
        pool.key("key-0").unwrap().reset();
        assert!(pool.walker().next_key().is_ok());
    }

    #[test]
    fn every_pool_of_a_shared_namespace_knows_why_a_key_cools_down() {
        let namespace = format!("test-why-{}", std::process::id());
        let open = || {
            KeyPool::build(
                [("a", "sk-why-a"), ("b", "sk-why-b")].map(|(l, v)| KeySpec::new(l, v)),
                PoolOptions {
                    state: Some(StateSpec::Shm {
                        namespace: namespace.clone(),
                    }),
                    ..PoolOptions::default()
                },
            )
            .unwrap()
        };
        // As two workers of one host: one mapping, each its own pool.
        let (here, there) = (open(), open());
        let unreachable = Cause::new(Reason::Unreachable, None);
        here.key("a").unwrap().cool(Some(S(20)), unreachable);
        here.key("b").unwrap().cool(Some(S(10)), unreachable);
        assert!(
            matches!(there.exhaustion(), Exhaustion::Unreachable { retry_after } if retry_after <= S(10)),
            "{:?}",
            there.exhaustion()
        );
        // A longer rate limit seen there is the reason here too.
        there.key("b").unwrap().mark_temporary(Some(S(30)));
        assert!(matches!(here.exhaustion(), Exhaustion::Transient { .. }));
        // A reset there clears the reason here.
        there.key("b").unwrap().reset();
        here.key("b").unwrap().mark_temporary(Some(S(5)));
        assert!(
            matches!(there.exhaustion(), Exhaustion::Transient { retry_after } if retry_after <= S(5))
        );
        std::fs::remove_file(crate::state::shm::path_for(&namespace)).unwrap();
    }

    #[test]
    fn unknown_label() {
        let (pool, _) = pool_with(&["a"]);
        assert_eq!(
            pool.key("key-7").unwrap_err(),
            Error::UnknownLabel("key-7".into())
        );
        assert_eq!(pool.key("key-0").unwrap().value(), "a");
    }

    type Setup = fn(&KeyPool);

    fn mark(pool: &KeyPool, label: &str, cooldown: Option<Duration>) {
        pool.key(label).unwrap().mark_temporary(cooldown);
    }

    fn retire(pool: &KeyPool, label: &str) {
        pool.key(label).unwrap().mark_permanent();
    }

    /// The seed's walker table: which keys a fresh walker yields after the
    /// setup and an advance of the clock, and how it is exhausted.
    #[test]
    #[allow(clippy::type_complexity)]
    fn walker_table() {
        let transient = |s: u64| Exhaustion::Transient { retry_after: S(s) };
        let cases: Vec<(&str, usize, Setup, u64, Vec<&str>, Exhaustion)> = vec![
            (
                "all_keys_valid",
                3,
                |_| {},
                0,
                vec!["key-0", "key-1", "key-2"],
                transient(0),
            ),
            (
                "first_temporary",
                3,
                |p| mark(p, "key-0", Some(S(60))),
                0,
                vec!["key-1", "key-2"],
                transient(0),
            ),
            (
                "two_permanent",
                3,
                |p| {
                    retire(p, "key-0");
                    retire(p, "key-1")
                },
                0,
                vec!["key-2"],
                transient(0),
            ),
            (
                "cooldown_expired",
                2,
                |p| mark(p, "key-0", Some(S(30))),
                35,
                vec!["key-0", "key-1"],
                transient(0),
            ),
            (
                "zero_means_default_not_expired",
                2,
                |p| mark(p, "key-0", Some(S(0))),
                50,
                vec!["key-1"],
                transient(0),
            ),
            (
                "zero_means_default_expired",
                2,
                |p| mark(p, "key-0", None),
                65,
                vec!["key-0", "key-1"],
                transient(0),
            ),
            (
                "shorter_cooldown_keeps_longer",
                1,
                |p| {
                    mark(p, "key-0", Some(S(60)));
                    mark(p, "key-0", Some(S(10)))
                },
                15,
                vec![],
                transient(45),
            ),
            (
                "shorter_cooldown_longer_expired",
                1,
                |p| {
                    mark(p, "key-0", Some(S(60)));
                    mark(p, "key-0", Some(S(10)))
                },
                65,
                vec!["key-0"],
                transient(0),
            ),
            (
                "smallest_cooldown_across_temporary_keys",
                3,
                |p| {
                    mark(p, "key-0", Some(S(60)));
                    mark(p, "key-1", Some(S(10)));
                    mark(p, "key-2", Some(S(30)))
                },
                0,
                vec![],
                transient(10),
            ),
            (
                "all_temporary",
                2,
                |p| {
                    mark(p, "key-0", Some(S(60)));
                    mark(p, "key-1", Some(S(60)))
                },
                0,
                vec![],
                transient(60),
            ),
            (
                "all_permanent",
                2,
                |p| {
                    retire(p, "key-0");
                    retire(p, "key-1")
                },
                0,
                vec![],
                Exhaustion::Permanent,
            ),
            (
                "permanent_and_temporary_mix",
                3,
                |p| {
                    retire(p, "key-0");
                    mark(p, "key-1", Some(S(60)));
                    retire(p, "key-2")
                },
                0,
                vec![],
                transient(60),
            ),
        ];
        for (name, n, setup, advance, expected, exhaustion) in cases {
            let values: Vec<String> = (0..n).map(|i| format!("value-{i}")).collect();
            let (pool, clock) = pool_with(&values.iter().map(String::as_str).collect::<Vec<_>>());
            setup(&pool);
            clock.advance(S(advance));
            let mut walker = pool.walker();
            for label in expected {
                assert_eq!(
                    walker.next_key().map(|k| k.label().to_owned()),
                    Ok(label.to_owned()),
                    "{name}"
                );
            }
            assert_eq!(walker.next_key().unwrap_err(), exhaustion, "{name}");
        }
    }

    #[test]
    fn a_negative_or_missing_cooldown_uses_the_configured_default() {
        let clock = ManualClock::new(Duration::ZERO);
        let cooldowns = Cooldowns {
            default: S(20),
            ..Cooldowns::default()
        };
        let pool =
            KeyPool::from_keys(["a"], cooldowns, Some(clock.clone() as Arc<dyn Clock>)).unwrap();
        let key = pool.key("key-0").unwrap();
        assert!(key.mark_temporary(None));
        assert_eq!(key.status().cooldown_remaining, S(20));
        clock.advance(S(20));
        assert_eq!(key.state(), KeyState::Valid);
    }

    #[test]
    fn max_cooldown_clamps() {
        let clock = ManualClock::new(Duration::ZERO);
        let cooldowns = Cooldowns {
            default: S(10),
            max: Some(S(30)),
            quota: S(30),
        };
        let pool = KeyPool::from_keys(["a"], cooldowns, Some(clock as Arc<dyn Clock>)).unwrap();
        let key = pool.key("key-0").unwrap();
        key.mark_temporary(Some(S(3600)));
        assert_eq!(key.status().cooldown_remaining, S(30));
        key.mark_temporary(None);
        assert_eq!(key.status().cooldown_remaining, S(30));
    }

    #[test]
    fn max_cooldown_below_the_others_is_rejected() {
        let d = Cooldowns::default();
        let message = config_error(
            vec![("a", "sk-1")],
            Cooldowns {
                max: Some(S(30)),
                ..d
            },
        );
        assert_eq!(
            message,
            "max_cooldown (30 s) is shorter than default_cooldown (60 s)"
        );
        let message = config_error(
            vec![("a", "sk-1")],
            Cooldowns {
                default: S(10),
                max: Some(S(30)),
                quota: S(3600),
            },
        );
        assert!(message.contains("quota_cooldown (3600 s)"), "{message}");
    }

    #[test]
    fn a_key_that_recovers_during_the_walk_is_offered_before_giving_up() {
        let (pool, clock) = pool_with(&["a", "b"]);
        mark(&pool, "key-0", Some(Duration::from_millis(50)));
        let mut walker = pool.walker();
        assert_eq!(walker.next_key().unwrap().label(), "key-1");
        // key-1 answers its own 429 after 150 ms; key-0 has recovered by then.
        clock.advance(Duration::from_millis(150));
        mark(&pool, "key-1", Some(S(60)));
        assert_eq!(walker.next_key().unwrap().label(), "key-0");
        mark(&pool, "key-0", Some(S(30)));
        assert_eq!(
            walker.next_key().unwrap_err(),
            Exhaustion::Transient { retry_after: S(30) }
        );
    }

    #[test]
    fn each_key_is_offered_at_most_once_per_walk() {
        let (pool, clock) = pool_with(&["a", "b", "c"]);
        mark(&pool, "key-0", Some(S(1)));
        let mut walker = pool.walker();
        let mut seen = vec![walker.next_key().unwrap().label().to_owned()];
        clock.advance(S(2));
        while let Ok(key) = walker.next_key() {
            seen.push(key.label().to_owned());
        }
        assert_eq!(seen, ["key-1", "key-2", "key-0"]);
    }

    #[test]
    fn messages_that_echo_input_mask_the_pools_keys() {
        let secret = "sk-ant-api03-abcdefghijklmnop-wxyz";
        let (pool, _) = pool_with(&[secret]);
        let err = pool.key(secret).unwrap_err().to_string();
        assert!(!err.contains(secret), "{err}");
        assert!(err.contains("sk-a...wxyz"), "{err}");
        assert_eq!(
            pool.redact(&format!("https://up/{secret}/x")),
            "https://up/sk-a...wxyz/x"
        );
        assert_eq!(pool.redact("nothing"), "nothing");
        // Percent-encoded, wholly or in part: shown decoded, the key replaced.
        let hint = "sk-a...wxyz";
        let encoded: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
        let last = secret.len() - 1;
        for path in [
            format!("/a/{encoded}/b?x=%20"),
            format!("/a/{}%{:02x}", &secret[..last], secret.as_bytes()[last]),
        ] {
            let shown = pool.redact(&path);
            assert!(!shown.contains(secret) && shown.contains(hint), "{shown}");
        }
        assert_eq!(pool.redact("/a%20b/%zz"), "/a%20b/%zz");
    }

    #[test]
    fn transitions_report_only_real_changes() {
        let (pool, clock) = pool_with(&["a"]);
        let key = pool.key("key-0").unwrap();
        assert!(key.mark_temporary(Some(S(10))));
        assert!(!key.mark_temporary(Some(S(20))), "already temporary");
        assert_eq!(
            key.status().cooldown_remaining,
            S(20),
            "the later deadline wins"
        );
        clock.advance(S(20));
        assert!(
            key.mark_temporary(Some(S(5))),
            "expired cooldown counts as valid"
        );
        assert!(key.mark_permanent());
        assert!(!key.mark_permanent());
        assert!(!key.mark_temporary(Some(S(5))));
        assert_eq!(
            key.status(),
            KeyStatus {
                state: KeyState::Permanent,
                cooldown_remaining: Duration::ZERO
            }
        );
        key.reset();
        assert_eq!(key.state(), KeyState::Valid);
        assert!(key.mark_temporary(None));
    }

    #[test]
    fn walker_is_read_only_and_independent() {
        let (pool, _) = pool_with(&["a", "b"]);
        let mut first = pool.walker();
        let mut second = pool.walker();
        assert_eq!(first.next_key().unwrap().label(), "key-0");
        assert_eq!(first.next_key().unwrap().label(), "key-1");
        assert_eq!(second.next_key().unwrap().label(), "key-0");
        assert!(pool.statuses().iter().all(|s| s.state == KeyState::Valid));
    }

    fn hammer(run: fn(usize, &Key)) -> (Key, Arc<ManualClock>) {
        let (pool, clock) = pool_with(&["a"]);
        let key = pool.key("key-0").unwrap();
        std::thread::scope(|scope| {
            for i in 0..16 {
                let key = key.clone();
                scope.spawn(move || {
                    for _ in 0..1000 {
                        run(i, &key);
                    }
                });
            }
        });
        (key, clock)
    }

    #[test]
    fn concurrent_marks_longer_cooldown_wins() {
        let (key, clock) = hammer(|i, k| {
            k.mark_temporary(Some(if i % 2 == 0 { S(60) } else { S(10) }));
        });
        clock.advance(S(50));
        assert_eq!(key.state(), KeyState::Temporary);
        clock.advance(S(15));
        assert_eq!(key.state(), KeyState::Valid);
    }

    #[test]
    fn concurrent_marks_permanent_wins_over_temporary() {
        let (key, _) = hammer(|i, k| {
            if i % 2 == 0 {
                k.mark_permanent();
            } else {
                k.mark_temporary(Some(S(60)));
            }
        });
        assert_eq!(key.state(), KeyState::Permanent);
    }

    #[test]
    fn exactly_one_thread_sees_each_transition() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (pool, _) = pool_with(&["a"]);
        let key = pool.key("key-0").unwrap();
        let temporary = AtomicUsize::new(0);
        let permanent = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..16 {
                scope.spawn(|| {
                    if key.mark_temporary(Some(S(60))) {
                        temporary.fetch_add(1, Ordering::Relaxed);
                    }
                    if key.mark_permanent() {
                        permanent.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(temporary.load(Ordering::Relaxed), 1);
        assert_eq!(permanent.load(Ordering::Relaxed), 1);
    }

    fn pool_of(n: usize, strategy: Strategy, groups: &[Option<&str>]) -> KeyPool {
        let specs = (0..n).map(|i| KeySpec {
            group: groups.get(i).copied().flatten().map(str::to_owned),
            ..KeySpec::new(format!("key-{i}"), format!("value-{i}-xxxxxxxx"))
        });
        KeyPool::build(
            specs,
            PoolOptions {
                strategy,
                ..PoolOptions::default()
            },
        )
        .unwrap()
    }

    fn walk(pool: &KeyPool) -> Vec<String> {
        let mut walker = pool.walker();
        let mut labels = Vec::new();
        while let Ok(key) = walker.next_key() {
            labels.push(key.label().to_owned());
        }
        labels
    }

    #[test]
    fn round_robin_starts_one_key_later_each_walk_even_under_concurrency() {
        let pool = pool_of(4, Strategy::RoundRobin, &[]);
        assert_eq!(walk(&pool), ["key-0", "key-1", "key-2", "key-3"]);
        assert_eq!(walk(&pool), ["key-1", "key-2", "key-3", "key-0"]);
        let starts = std::sync::Mutex::new(vec![0usize; 4]);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        let labels = walk(&pool);
                        let mut sorted = labels.clone();
                        sorted.sort();
                        assert_eq!(
                            sorted,
                            ["key-0", "key-1", "key-2", "key-3"],
                            "each key once"
                        );
                        let first: usize = labels[0][4..].parse().unwrap();
                        starts.lock().unwrap()[first] += 1;
                    }
                });
            }
        });
        assert_eq!(*starts.lock().unwrap(), [2000, 2000, 2000, 2000]);
    }

    #[test]
    fn least_loaded_starts_at_the_fewest_in_flight() {
        let pool = pool_of(3, Strategy::LeastLoaded, &[]);
        let busy0 = pool.key("key-0").unwrap().in_flight();
        let _busy1 = pool.key("key-1").unwrap().in_flight();
        let _busy1b = pool.key("key-1").unwrap().in_flight();
        assert_eq!(walk(&pool), ["key-2", "key-0", "key-1"]);
        let _busy2 = pool.key("key-2").unwrap().in_flight();
        drop(busy0);
        assert_eq!(walk(&pool)[0], "key-0");
        pool.key("key-0").unwrap().mark_temporary(Some(S(60)));
        assert_eq!(
            walk(&pool),
            ["key-2", "key-1"],
            "an unavailable key is never the start"
        );
    }

    #[test]
    fn headroom_starts_at_the_largest_share_left() {
        let pool = pool_of(3, Strategy::Headroom, &[]);
        let headers = |limit: &str, remaining: &str| {
            let mut map = http::header::HeaderMap::new();
            map.insert("x-ratelimit-limit-requests", limit.parse().unwrap());
            map.insert("x-ratelimit-remaining-requests", remaining.parse().unwrap());
            map
        };
        let now = std::time::SystemTime::now();
        pool.key("key-0")
            .unwrap()
            .observe(&headers("100", "10"), 200, now);
        pool.key("key-1")
            .unwrap()
            .observe(&headers("100", "60"), 200, now);
        // key-2 not heard from yet: counted as full.
        assert_eq!(walk(&pool)[0], "key-2");
        pool.key("key-2")
            .unwrap()
            .observe(&headers("100", "30"), 200, now);
        assert_eq!(walk(&pool), ["key-1", "key-2", "key-0"]);
        let snapshot = pool.snapshot();
        assert_eq!(snapshot[1].to_json()["remaining"]["requests"], 60);
        assert_eq!(snapshot[1].to_json()["limit"]["requests"], 100);
    }

    #[test]
    fn headroom_counts_requests_in_flight_against_what_is_left() {
        let pool = pool_of(2, Strategy::Headroom, &[]);
        let headers = |remaining: &str| {
            let mut map = http::header::HeaderMap::new();
            map.insert("x-ratelimit-limit-requests", "10".parse().unwrap());
            map.insert("x-ratelimit-remaining-requests", remaining.parse().unwrap());
            map
        };
        let now = std::time::SystemTime::now();
        let (a, b) = (pool.key("key-0").unwrap(), pool.key("key-1").unwrap());
        a.observe(&headers("3"), 200, now);
        b.observe(&headers("2"), 200, now);
        assert_eq!(walk(&pool)[0], "key-0");
        // Two requests on key-0 since its answer: 1 expected left, under key-1's 2.
        let held = [a.in_flight(), a.in_flight()];
        assert_eq!(walk(&pool)[0], "key-1");
        drop(held);
        assert_eq!(walk(&pool)[0], "key-0");
    }

    #[test]
    fn a_key_that_ran_out_is_last_until_it_has_cooled_down() {
        let clock = ManualClock::new(S(1));
        let options = PoolOptions {
            strategy: Strategy::Headroom,
            clock: Some(clock.clone()),
            ..PoolOptions::default()
        };
        let specs = ["value-0-xxxxxxxx", "value-1-xxxxxxxx"]
            .iter()
            .enumerate()
            .map(|(i, v)| KeySpec::new(format!("key-{i}"), *v));
        let pool = KeyPool::build(specs, options).unwrap();
        let mut headers = http::header::HeaderMap::new();
        headers.insert("x-ratelimit-limit-requests", "10".parse().unwrap());
        headers.insert("x-ratelimit-remaining-requests", "5".parse().unwrap());
        let now = std::time::SystemTime::now();
        let (first, second) = (pool.key("key-0").unwrap(), pool.key("key-1").unwrap());
        second.observe(&headers, 200, now);
        // key-0 says it has none left, and not when more come (no reset, as
        // Azure and Mistral's minute limits): it is last, not full.
        headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        first.observe(&headers, 200, now);
        assert_eq!(walk(&pool), ["key-1", "key-0"]);
        // Its next answer is a 429 that cools it; once that is over, it has
        // waited out its limit and counts as full again.
        clock.advance(S(1));
        first.observe(&headers, 429, now);
        first.cool(Some(S(5)), Cause::new(Reason::RateLimited, Some(429)));
        assert_eq!(walk(&pool), ["key-1"]);
        clock.advance(S(6));
        assert_eq!(walk(&pool), ["key-0", "key-1"]);
        // Another answer with none left, with no cooldown after it: last again.
        first.observe(&headers, 200, now);
        assert_eq!(walk(&pool), ["key-1", "key-0"]);
    }

    #[test]
    fn a_depleted_limit_cools_the_key_until_its_reset() {
        let pool = pool_of(2, Strategy::Ordered, &[]);
        let key = pool.key("key-0").unwrap();
        let mut headers = http::header::HeaderMap::new();
        headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset-requests", "20s".parse().unwrap());
        key.observe(&headers, 200, std::time::SystemTime::now());
        let status = key.status();
        assert_eq!(status.state, KeyState::Temporary);
        assert!(status.cooldown_remaining > S(19) && status.cooldown_remaining <= S(20));
        assert_eq!(
            key.counters().limit(crate::ratelimit::LimitKind::Requests),
            (None, Some(0))
        );
        // A 429 is the verdict's to mark: its headers only update the values.
        let other = pool.key("key-1").unwrap();
        other.observe(&headers, 429, std::time::SystemTime::now());
        assert_eq!(other.state(), KeyState::Valid);
    }

    #[test]
    fn a_rate_limit_cools_the_whole_group_and_nothing_else() {
        let pool = pool_of(
            4,
            Strategy::Ordered,
            &[Some("org-1"), Some("org-1"), Some("org-2"), None],
        );
        let cause = Cause::new(Reason::RateLimited, Some(429));
        pool.key("key-0").unwrap().cool(Some(S(30)), cause);
        let states: Vec<_> = pool.statuses().iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                KeyState::Temporary,
                KeyState::Temporary,
                KeyState::Valid,
                KeyState::Valid
            ]
        );
        let statuses = pool.statuses();
        assert_eq!(
            statuses[1].cooldown_remaining,
            statuses[0].cooldown_remaining
        );
        // Quota and revocation stay with the key.
        pool.key("key-2")
            .unwrap()
            .cool(Some(S(30)), Cause::new(Reason::QuotaExhausted, Some(429)));
        assert_eq!(pool.statuses()[3].state, KeyState::Valid);
        pool.key("key-1").unwrap().reset();
        pool.key("key-0").unwrap().reset();
        pool.key("key-0")
            .unwrap()
            .retire(Cause::new(Reason::Revoked, Some(401)));
        assert_eq!(pool.statuses()[1].state, KeyState::Valid);
    }

    #[test]
    fn a_group_is_learned_from_the_organization_header() {
        let pool = pool_of(3, Strategy::Ordered, &[None, None, Some("configured")]);
        let mut headers = http::header::HeaderMap::new();
        headers.insert("anthropic-organization-id", "org-abc".parse().unwrap());
        let now = std::time::SystemTime::now();
        for label in ["key-0", "key-1", "key-2"] {
            pool.key(label).unwrap().observe(&headers, 200, now);
        }
        let groups: Vec<_> = pool.snapshot().into_iter().map(|k| k.group).collect();
        assert_eq!(
            groups,
            [
                Some("org-abc".into()),
                Some("org-abc".into()),
                Some("configured".into())
            ]
        );
        pool.key("key-1")
            .unwrap()
            .cool(None, Cause::new(Reason::RateLimited, Some(429)));
        assert_eq!(
            pool.statuses()[0].state,
            KeyState::Temporary,
            "learned group shares it"
        );
        assert_eq!(pool.statuses()[2].state, KeyState::Valid);
    }

    #[test]
    fn a_group_never_holds_a_key_of_the_pool() {
        // Learned: an upstream that echoes a key in the header is not heard.
        let pool = pool_of(2, Strategy::Ordered, &[]);
        let now = std::time::SystemTime::now();
        for echoed in ["value-0-xxxxxxxx", "org value-1-xxxxxxxx"] {
            let mut headers = http::header::HeaderMap::new();
            headers.insert("anthropic-organization-id", echoed.parse().unwrap());
            pool.key("key-0").unwrap().observe(&headers, 200, now);
        }
        assert_eq!(pool.snapshot()[0].group, None);
        // Configured: refused, as a label that holds one is.
        let cases = [
            (
                "value-1-xxxxxxxx",
                "the group of the pool's key number 1 holds one of its keys",
            ),
            ("org-value-0-xxxxxxxx", "a: the group holds the key"),
        ];
        for (group, message) in cases {
            let specs = [
                KeySpec {
                    group: Some(group.into()),
                    ..KeySpec::new("a", "value-0-xxxxxxxx")
                },
                KeySpec::new("b", "value-1-xxxxxxxx"),
            ];
            let err = KeyPool::build(specs, PoolOptions::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{err}");
            assert!(!err.contains("value-"), "{err}");
        }
        let control = KeySpec {
            group: Some("org\n1".into()),
            ..KeySpec::new("a", "value-0-xxxxxxxx")
        };
        let err = KeyPool::build([control], PoolOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("holds a control character"),
            "{err}"
        );
    }

    #[test]
    fn reload_keeps_state_by_value_and_changes_nothing_when_invalid() {
        let pool = pool_of(3, Strategy::Ordered, &[]);
        pool.key("key-0").unwrap().mark_temporary(Some(S(60)));
        pool.key("key-1").unwrap().mark_permanent();
        let report = pool
            .reload([
                KeySpec::new("renamed", "value-0-xxxxxxxx"),
                KeySpec::new("key-1", "value-1-xxxxxxxx"),
                KeySpec::new("fresh", "value-9-xxxxxxxx"),
            ])
            .unwrap();
        assert_eq!(
            report.relabelled,
            [("key-0".to_owned(), "renamed".to_owned())]
        );
        assert_eq!(report.added.len(), 1);
        assert_eq!(
            report.removed,
            [("key-2".to_owned(), mask("value-2-xxxxxxxx"))]
        );
        assert!(
            report.summary().contains("added fresh"),
            "{}",
            report.summary()
        );
        let states: Vec<_> = pool
            .snapshot()
            .into_iter()
            .map(|k| (k.label, k.state))
            .collect();
        assert_eq!(
            states,
            [
                ("renamed".into(), KeyState::Temporary),
                ("key-1".into(), KeyState::Permanent),
                ("fresh".into(), KeyState::Valid)
            ]
        );
        let before = pool.snapshot();
        let err = pool
            .reload([
                KeySpec::new("a", "same-value-xx"),
                KeySpec::new("b", "same-value-xx"),
            ])
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(pool.reload(Vec::<KeySpec>::new()).is_err());
        assert_eq!(pool.snapshot().len(), before.len(), "nothing changed");
    }

    #[test]
    fn a_key_given_another_endpoint_is_reported_and_loses_its_unreachable_cooldown() {
        let at = |label: &str, value: &str, url: &str| KeySpec {
            base_url: Some(url.to_owned()),
            ..KeySpec::new(label, value)
        };
        let pool = KeyPool::build(
            [
                at("a", "value-a-xxxxxxxx", "https://old.example"),
                at("b", "value-b-xxxxxxxx", "https://old.example"),
                at("c", "value-c-xxxxxxxx", "https://old.example"),
            ],
            PoolOptions::default(),
        )
        .unwrap();
        let unreachable = Cause::new(Reason::Unreachable, None);
        pool.key("a").unwrap().cool(Some(S(15)), unreachable);
        pool.key("b")
            .unwrap()
            .cool(Some(S(15)), Cause::new(Reason::Unreachable, None));
        pool.key("c").unwrap().mark_temporary(Some(S(60))); // rate-limited: its own
        let moved = || {
            [
                at("a", "value-a-xxxxxxxx", "https://new.example"),
                at("b", "value-b-xxxxxxxx", "https://old.example"),
                at("c", "value-c-xxxxxxxx", "https://new.example"),
            ]
        };
        let report = pool.reload(moved()).unwrap();
        assert_eq!(
            report.moved,
            [
                ("a".to_owned(), mask("value-a-xxxxxxxx")),
                ("c".to_owned(), mask("value-c-xxxxxxxx"))
            ]
        );
        assert!(
            report.summary().starts_with("new endpoint for a ("),
            "{}",
            report.summary()
        );
        let states: Vec<_> = pool.snapshot().into_iter().map(|k| k.state).collect();
        assert_eq!(
            states,
            [KeyState::Valid, KeyState::Temporary, KeyState::Temporary],
            "only the unreachable cooldown of a moved key ends"
        );
        let same = pool.reload(moved()).unwrap();
        assert_eq!(same.summary(), "no change");
    }

    #[test]
    fn a_prepared_reload_changes_nothing_until_committed_and_nothing_when_dropped() {
        let pool = pool_of(2, Strategy::Ordered, &[]);
        pool.key("key-0").unwrap().mark_permanent();
        let new = || {
            [
                KeySpec::new("key-0", "value-0-xxxxxxxx"),
                KeySpec::new("key-9", "value-9-xxxxxxxx"),
            ]
        };
        let labels = |pool: &KeyPool| -> Vec<String> {
            pool.snapshot().into_iter().map(|k| k.label).collect()
        };
        let dropped = pool
            .prepare_reload(new(), Some(Strategy::RoundRobin))
            .unwrap();
        assert!(dropped.report().summary().starts_with("added key-9"));
        assert_eq!(labels(&pool), ["key-0", "key-1"]);
        drop(dropped);
        assert_eq!(labels(&pool), ["key-0", "key-1"]);
        assert_eq!(pool.strategy(), Strategy::Ordered);

        let prepared = pool
            .prepare_reload(new(), Some(Strategy::RoundRobin))
            .unwrap();
        assert_eq!(labels(&pool), ["key-0", "key-1"], "not before the commit");
        let report = prepared.commit();
        assert_eq!(report.added.len(), 1);
        assert_eq!(report.removed.len(), 1);
        assert_eq!(labels(&pool), ["key-0", "key-9"]);
        assert_eq!(pool.strategy(), Strategy::RoundRobin);
        assert_eq!(
            pool.key("key-0").unwrap().state(),
            KeyState::Permanent,
            "a kept key keeps its state under the new strategy"
        );
        // Round robin from now on: walks start at each key in turn.
        let starts: Vec<String> = (0..2).map(|_| walk(&pool)[0].clone()).collect();
        assert_eq!(starts, ["key-9", "key-9"], "key-0 is retired");
        pool.key("key-0").unwrap().reset();
        let starts: Vec<String> = (0..4).map(|_| walk(&pool)[0].clone()).collect();
        assert_eq!(
            starts.iter().filter(|s| *s == "key-0").count(),
            2,
            "{starts:?}"
        );
    }

    #[test]
    fn an_old_endpoint_found_unreachable_after_the_key_moved_does_not_cool_it() {
        let at = |url: &str| KeySpec {
            base_url: Some(url.to_owned()),
            ..KeySpec::new("a", "value-a-xxxxxxxx")
        };
        let pool = KeyPool::build([at("https://old.example")], PoolOptions::default()).unwrap();
        // A request takes the key at its old endpoint; a reload moves it.
        let out = pool.key("a").unwrap();
        pool.reload([at("https://new.example")]).unwrap();
        let unreachable = || Cause::new(Reason::Unreachable, None);
        assert!(!out.cool(Some(S(15)), unreachable()));
        assert_eq!(pool.key("a").unwrap().state(), KeyState::Valid);
        // Other verdicts on that answer are the key's own, wherever it went.
        assert!(out.cool(Some(S(15)), Cause::new(Reason::RateLimited, Some(429))));
        pool.key("a").unwrap().reset();
        // At its new endpoint, unreachable cools it.
        assert!(pool.key("a").unwrap().cool(Some(S(15)), unreachable()));
        assert_eq!(pool.key("a").unwrap().state(), KeyState::Temporary);
    }

    #[test]
    fn a_walker_sees_the_old_list_or_the_new_one_never_a_mix() {
        let pool = pool_of(4, Strategy::Ordered, &[]);
        let old: Vec<String> = (0..4).map(|i| format!("key-{i}")).collect();
        let new: Vec<String> = (0..3).map(|i| format!("new-{i}")).collect();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for round in 0..500 {
                    let specs: Vec<KeySpec> = if round % 2 == 0 {
                        (0..3)
                            .map(|i| {
                                KeySpec::new(format!("new-{i}"), format!("other-{i}-xxxxxxxx"))
                            })
                            .collect()
                    } else {
                        (0..4)
                            .map(|i| {
                                KeySpec::new(format!("key-{i}"), format!("value-{i}-xxxxxxxx"))
                            })
                            .collect()
                    };
                    pool.reload(specs).unwrap();
                }
            });
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..2000 {
                        let labels = walk(&pool);
                        assert!(labels == old || labels == new, "{labels:?}");
                    }
                });
            }
        });
    }
}
