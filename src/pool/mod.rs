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
use crate::state::{Backend, Fingerprint, StateSpec, SyncStatus};

pub use cell::{KeyState, KeyStatus};
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

/// One key as operators see it: no secret, only the hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    pub label: String,
    pub hint: String,
    pub state: KeyState,
    pub cooldown_remaining: Duration,
}

impl KeySnapshot {
    /// The shape of `pool.snapshot()` entries and `/_keyfailover/keys`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "hint": self.hint,
            "state": self.state.as_str(),
            "cooldown_remaining": self.cooldown_remaining.as_secs_f64(),
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

/// How a pool is built, besides its keys.
#[derive(Clone, Default)]
pub struct PoolOptions {
    pub cooldowns: Cooldowns,
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
    pub label: String,
    pub value: String,
    pub hint: String,
    pub fingerprint: Fingerprint,
    pub cell: Arc<Cell>,
}

/// The pool's keys at one moment; replaced whole by a reload.
pub(crate) struct KeySet {
    pub slots: Box<[Arc<Slot>]>,
}

impl KeySet {
    /// Every key's value with its hint, for scrubbing keys out of text.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.slots
            .iter()
            .map(|s| (s.value.as_str(), s.hint.as_str()))
    }
}

struct Inner {
    keys: ArcSwap<KeySet>,
    cooldowns: Cooldowns,
    clock: Arc<dyn Clock>,
    namespace: String,
    /// What logs and metrics call the pool: set by the first client that
    /// uses it (`FailoverClient(..., name=)`), "default" until then.
    name: std::sync::OnceLock<String>,
    counters: crate::metrics::PoolCounters,
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

    /// Builds a pool from `(label, key)` pairs, keeping their order.
    pub fn build<I>(keys: I, options: PoolOptions) -> Result<Self>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        options.cooldowns.validate()?;
        let keys = validated(keys)?;
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
        let slots = keys
            .into_iter()
            .map(|(label, value)| {
                let fingerprint = Fingerprint::of(&namespace, &value);
                Ok(Arc::new(Slot {
                    hint: mask(&value),
                    cell: backend.cell(fingerprint)?,
                    label,
                    value,
                    fingerprint,
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                keys: ArcSwap::from_pointee(KeySet {
                    slots: slots.into_boxed_slice(),
                }),
                cooldowns: options.cooldowns,
                clock,
                namespace,
                name: std::sync::OnceLock::new(),
                counters: backend.pool_counters(),
                backend,
            }),
        })
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
        &self.inner.counters
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
            .find(|s| s.label == label)
            .map(|slot| Key::new(self.clone(), slot.clone()))
            .ok_or_else(|| Error::UnknownLabel(self.redact(label).into_owned()))
    }

    /// `text` with every key of the pool replaced by its hint: for messages
    /// that echo what a caller passed, which may be a key in the wrong place.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        for slot in self.inner.keys.load().slots.iter() {
            if out.contains(slot.value.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(slot.value.as_str(), &slot.hint));
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
                    label: slot.label.clone(),
                    hint: slot.hint.clone(),
                    state: status.state,
                    cooldown_remaining: status.cooldown_remaining,
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
    /// some key is valid).
    pub fn exhaustion(&self) -> Exhaustion {
        exhaustion_of(&self.statuses())
    }
}

fn exhaustion_of(statuses: &[KeyStatus]) -> Exhaustion {
    let mut soonest: Option<Duration> = None;
    for status in statuses {
        match status.state {
            KeyState::Valid => {
                return Exhaustion::Transient {
                    retry_after: Duration::ZERO,
                }
            }
            KeyState::Temporary => {
                let left = status.cooldown_remaining;
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
            }
            KeyState::Permanent => {}
        }
    }
    match soonest {
        Some(retry_after) => Exhaustion::Transient { retry_after },
        None => Exhaustion::Permanent,
    }
}

/// Checks labels and keys: non-empty, no duplicates of either.
fn validated<I>(keys: I) -> Result<Vec<(String, String)>>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut out: Vec<(String, String)> = Vec::new();
    for (label, value) in keys {
        validate_label(&label)?;
        validate_key(&label, &value)?;
        for (other_label, other_value) in &out {
            if *other_label == label {
                return Err(Error::Config(format!("duplicate label '{label}'")));
            }
            if *other_value == value {
                return Err(Error::Config(format!(
                    "{other_label} and {label} hold the same key"
                )));
            }
        }
        out.push((label, value));
    }
    if out.is_empty() {
        return Err(Error::Config("a key pool needs at least one key".into()));
    }
    Ok(out)
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

fn validate_key(label: &str, value: &str) -> Result<()> {
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
}
