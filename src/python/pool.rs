//! Bindings for the key pool: `KeyPool`, `Key`, `Walker`, `KeyState`, `ManualClock`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::json::to_py;

use super::runtime::runtime;
use crate::clock::{Clock, ManualClock};
use crate::error::Error;
use crate::pool::{
    mask, validate_group, validate_key, Cooldowns, Key, KeyPool, KeySpec, KeyState, PoolOptions,
    PreparedReload, Walker,
};
use crate::state::StateSpec;

/// A duration argument in seconds that must be positive and finite.
pub(crate) fn positive_seconds(name: &str, seconds: f64) -> Result<Duration, Error> {
    if seconds.is_finite() && seconds > 0.0 {
        Duration::try_from_secs_f64(seconds)
            .map_err(|_| Error::Config(format!("{name} is too large")))
    } else {
        Err(Error::Config(format!("{name} must be positive")))
    }
}

#[pyclass(
    name = "KeyState",
    module = "keyfailover",
    eq,
    eq_int,
    hash,
    frozen,
    from_py_object
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum PyKeyState {
    VALID,
    TEMPORARY,
    PERMANENT,
}

impl From<KeyState> for PyKeyState {
    fn from(state: KeyState) -> Self {
        match state {
            KeyState::Valid => PyKeyState::VALID,
            KeyState::Temporary => PyKeyState::TEMPORARY,
            KeyState::Permanent => PyKeyState::PERMANENT,
        }
    }
}

#[pymethods]
impl PyKeyState {
    /// "valid", "temporary" or "permanent", as in `KeyPool.snapshot()`.
    #[getter]
    fn value(&self) -> &'static str {
        match self {
            PyKeyState::VALID => KeyState::Valid,
            PyKeyState::TEMPORARY => KeyState::Temporary,
            PyKeyState::PERMANENT => KeyState::Permanent,
        }
        .as_str()
    }
}

/// A clock that moves only when advanced; pass it as `KeyPool(clock=...)`.
#[pyclass(name = "ManualClock", module = "keyfailover", frozen)]
pub struct PyManualClock {
    clock: Arc<ManualClock>,
}

fn non_negative_seconds(name: &str, seconds: f64) -> Result<Duration, Error> {
    if seconds == 0.0 {
        Ok(Duration::ZERO)
    } else {
        positive_seconds(name, seconds)
            .map_err(|_| Error::Config(format!("{name} must be a non-negative number of seconds")))
    }
}

/// How far a manual clock may go: with room for cooldowns after it (the
/// pool's clock counts nanoseconds in 64 bits, about 584 years).
const MANUAL_CLOCK_LIMIT: Duration = Duration::from_secs(100 * 365 * 86_400);

fn within_limit(at: Duration) -> Result<Duration, Error> {
    if at > MANUAL_CLOCK_LIMIT {
        return Err(Error::Config(format!(
            "a ManualClock goes up to {} s (100 years), not {} s",
            MANUAL_CLOCK_LIMIT.as_secs(),
            at.as_secs_f64()
        )));
    }
    Ok(at)
}

#[pymethods]
impl PyManualClock {
    #[new]
    #[pyo3(signature = (start = 0.0))]
    fn new(start: f64) -> PyResult<Self> {
        let start = within_limit(non_negative_seconds("start", start)?)?;
        Ok(Self {
            clock: ManualClock::new(start),
        })
    }

    fn advance(&self, seconds: f64) -> PyResult<()> {
        let by = non_negative_seconds("seconds", seconds)?;
        within_limit(self.clock.now().saturating_add(by))?;
        self.clock.advance(by);
        Ok(())
    }

    fn now(&self) -> f64 {
        self.clock.now().as_secs_f64()
    }

    fn __repr__(&self) -> String {
        format!("ManualClock({})", self.now())
    }
}

/// An ordered pool of API keys for one upstream provider.
#[pyclass(name = "KeyPool", module = "keyfailover", frozen)]
pub struct PyKeyPool {
    pub(crate) pool: KeyPool,
}

fn key_string(item: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let text = item
        .cast::<PyString>()
        .map_err(|_| Error::Config(format!("{what} must be str, not {}", type_name(item))))?;
    Ok(utf8(text, what).map_err(Error::Config)?.to_owned())
}

/// `text` as UTF-8. A str that is not (it holds a lone surrogate, as text
/// decoded with `surrogateescape` does) is refused with a message that does
/// not echo it, unlike Python's own `UnicodeEncodeError`: it may hold a key.
pub(crate) fn utf8<'a>(text: &'a Bound<'_, PyString>, what: &str) -> Result<&'a str, String> {
    text.to_str().map_err(|_| {
        format!(
            "{what}: not valid text (it holds a lone surrogate, as text decoded with \
             errors=\"surrogateescape\" does)"
        )
    })
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A key given as a `str` or as a `Key(value, group=..., base_url=...)`.
fn key_spec(label: String, item: &Bound<'_, PyAny>) -> PyResult<KeySpec> {
    if let Ok(key) = item.cast::<PyKey>() {
        let (value, group, base_url) = match &key.get().key {
            KeyRef::Unbound {
                value,
                group,
                base_url,
                ..
            } => (value.clone(), group.clone(), base_url.clone()),
            KeyRef::Bound(key) => (
                key.value().to_owned(),
                key.group().map(str::to_owned),
                key.base_url().map(|u| u.as_str().to_owned()),
            ),
        };
        return Ok(KeySpec {
            label,
            value,
            group,
            base_url,
        });
    }
    Ok(KeySpec::new(label, key_string(item, "keys")?))
}

/// Keys from a sequence of keys or a mapping label -> key; each key a `str`
/// or a `Key(...)`.
pub(crate) fn key_specs(keys: &Bound<'_, PyAny>) -> PyResult<Vec<KeySpec>> {
    if keys.is_instance_of::<PyString>() || keys.is_instance_of::<PyBytes>() {
        return Err(Error::Config(
            "keys must be a sequence of key strings or a mapping of label to key, not a single string".into(),
        )
        .into());
    }
    if keys.hasattr("items")? {
        return keys
            .call_method0("items")?
            .try_iter()?
            .enumerate()
            .map(|(i, item)| {
                let (label, key): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
                let spec = key_spec(key_string(&label, "labels")?, &key)?;
                // `{key: "prod"}`: label and key swapped. Named by position:
                // the label is the key then.
                let length = spec.value.chars().count();
                if (1..8).contains(&length) {
                    return Err(Error::Config(format!(
                        "the key of entry {} is {length} characters long; keys are 8 or more \
                         (label and key swapped? the mapping is {{label: key}})",
                        i + 1
                    ))
                    .into());
                }
                Ok(spec)
            })
            .collect();
    }
    let items = keys.try_iter().map_err(|_| {
        Error::Config(format!(
            "keys must be a sequence of key strings or a mapping of label to key, not {}",
            type_name(keys)
        ))
    })?;
    items
        .enumerate()
        .map(|(i, item)| key_spec(format!("key-{i}"), &item?))
        .collect()
}

#[pymethods]
impl PyKeyPool {
    #[new]
    #[pyo3(signature = (keys, *, default_cooldown = 60.0, max_cooldown = None, quota_cooldown = 3600.0, clock = None, state = None, namespace = "default", strategy = "ordered"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        default_cooldown: f64,
        max_cooldown: Option<f64>,
        quota_cooldown: f64,
        clock: Option<PyRef<'_, PyManualClock>>,
        state: Option<&str>,
        namespace: &str,
        strategy: &str,
    ) -> PyResult<Self> {
        let cooldowns = Cooldowns {
            default: positive_seconds("default_cooldown", default_cooldown)?,
            max: max_cooldown
                .map(|m| positive_seconds("max_cooldown", m))
                .transpose()?,
            quota: positive_seconds("quota_cooldown", quota_cooldown)?,
        };
        let options = PoolOptions {
            cooldowns,
            strategy: strategy.parse()?,
            clock: clock.map(|c| c.clock.clone() as Arc<dyn Clock>),
            state: Some(StateSpec::parse(state, namespace)?),
            runtime: Some(runtime().handle().clone()),
        };
        let keys = key_specs(keys)?;
        let pool = py.detach(|| KeyPool::build(keys, options))?;
        Ok(Self { pool })
    }

    /// Where key states live: "local", "shm" or "redis".
    #[getter]
    fn state_backend(&self) -> &'static str {
        self.pool.state_backend()
    }

    #[getter]
    fn namespace(&self) -> &str {
        self.pool.namespace()
    }

    /// Where each walk starts: "ordered", "round_robin", "least_loaded" or "headroom".
    #[getter]
    fn strategy(&self) -> &'static str {
        self.pool.strategy().as_str()
    }

    /// Replaces the keys (same forms as the constructor). Keys whose value is
    /// unchanged keep their state and counters, whatever their label; new keys
    /// start valid; removed keys leave. Atomic; invalid input raises
    /// `ConfigError` and changes nothing. Returns what changed.
    fn reload<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let specs = key_specs(keys)?;
        let pool = self.pool.clone();
        let report = py.detach(|| pool.reload(specs))?;
        to_py(py, &report.to_json())
    }

    /// `reload`, made ready to take effect on `commit()` (which cannot fail);
    /// dropped uncommitted, it changes nothing. For reloading several pools
    /// all at once or not at all. `strategy`: the pool's from then on.
    #[pyo3(signature = (keys, *, strategy = None))]
    fn _prepare_reload(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        strategy: Option<&str>,
    ) -> PyResult<PyPreparedReload> {
        let specs = key_specs(keys)?;
        let strategy = strategy.map(str::parse).transpose()?;
        let pool = self.pool.clone();
        let prepared = py.detach(|| pool.prepare_reload(specs, strategy))?;
        Ok(PyPreparedReload(Mutex::new(Some(prepared))))
    }

    /// How sharing goes: {"backend", "connected", "last_error", "pending"}.
    fn sync_status<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.pool.sync_status().to_json())
    }

    fn __len__(&self) -> usize {
        self.pool.len()
    }

    /// Each key's state, in configured order.
    fn states(&self) -> Vec<PyKeyState> {
        self.pool
            .statuses()
            .into_iter()
            .map(|s| s.state.into())
            .collect()
    }

    /// A fresh walker for one request.
    fn walker(&self) -> PyWalker {
        PyWalker {
            walker: Mutex::new(self.pool.walker()),
        }
    }

    /// The key with this label; `KeyError` if there is none.
    fn key(&self, label: &Bound<'_, PyString>) -> PyResult<PyKey> {
        let label = utf8(label, "label")
            .map_err(|_| Error::UnknownLabel("(not valid text: a lone surrogate)".into()))?;
        Ok(PyKey {
            key: KeyRef::Bound(self.pool.key(label)?),
        })
    }

    /// One dict per key, in order: label, hint, state, cooldown_remaining,
    /// group, remaining and limit (by limit kind, where known), in_flight.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.pool
            .snapshot()
            .iter()
            .map(|key| to_py(py, &key.to_json()))
            .collect()
    }

    /// {"status": "ok" | "degraded" | "exhausted", "keys": {"valid": n, "temporary": n, "permanent": n}}
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.pool.health().to_json())
    }

    fn __repr__(&self) -> String {
        let keys: Vec<String> = self
            .pool
            .snapshot()
            .iter()
            .map(|k| format!("{} {}", k.label, k.state.as_str()))
            .collect();
        let backend = match self.pool.state_backend() {
            "local" => String::new(),
            other => format!(", state={other}"),
        };
        format!("KeyPool([{}]{backend})", keys.join(", "))
    }
}

/// A per-request cursor through the pool.
#[pyclass(name = "Walker", module = "keyfailover", frozen)]
pub struct PyWalker {
    walker: Mutex<Walker>,
}

#[pymethods]
impl PyWalker {
    /// The next available key; raises `TransientExhaustion` or
    /// `PermanentExhaustion` when none is left.
    fn next(&self) -> PyResult<PyKey> {
        let mut walker = self.walker.lock().unwrap_or_else(|e| e.into_inner());
        let key = walker.next_key().map_err(Error::from)?;
        Ok(PyKey {
            key: KeyRef::Bound(key),
        })
    }

    fn __repr__(&self) -> String {
        "Walker()".into()
    }
}

/// A key: one of a pool (from `pool.key(label)` or a walker), or a key
/// given with its settings to build a pool, `Key(value, group=..., base_url=...)`.
pub(crate) enum KeyRef {
    Bound(Key),
    Unbound {
        value: String,
        hint: String,
        group: Option<String>,
        base_url: Option<String>,
    },
}

impl PartialEq for KeyRef {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (KeyRef::Bound(a), KeyRef::Bound(b)) => a == b,
            (
                KeyRef::Unbound {
                    value: a,
                    group: ga,
                    base_url: ba,
                    ..
                },
                KeyRef::Unbound {
                    value: b,
                    group: gb,
                    base_url: bb,
                    ..
                },
            ) => a == b && ga == gb && ba == bb,
            _ => false,
        }
    }
}

impl Eq for KeyRef {}

impl std::hash::Hash for KeyRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            KeyRef::Bound(key) => key.hash(state),
            KeyRef::Unbound { value, .. } => value.hash(state),
        }
    }
}

/// One key. `.value` is the only accessor that reveals the secret.
#[pyclass(name = "Key", module = "keyfailover", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash)]
pub struct PyKey {
    pub(crate) key: KeyRef,
}

impl PyKey {
    /// The pool key, for what only a key of a pool can do.
    pub(crate) fn bound(&self) -> PyResult<&Key> {
        match &self.key {
            KeyRef::Bound(key) => Ok(key),
            KeyRef::Unbound { .. } => Err(Error::Config(
                "this Key is not in a pool: pass it to KeyPool, then use pool.key(label)".into(),
            )
            .into()),
        }
    }
}

#[pymethods]
impl PyKey {
    /// A key to build a pool with: `KeyPool({"a": Key("sk-...", group="org-1")})`.
    #[new]
    #[pyo3(signature = (value, *, group = None, base_url = None))]
    fn new(
        value: &Bound<'_, PyString>,
        group: Option<&Bound<'_, PyString>>,
        base_url: Option<&Bound<'_, PyString>>,
    ) -> PyResult<Self> {
        let value = utf8(value, "key").map_err(Error::Config)?.to_owned();
        let text = |s: Option<&Bound<'_, PyString>>, what| -> PyResult<Option<String>> {
            Ok(match s {
                Some(s) => Some(utf8(s, what).map_err(Error::Config)?.to_owned()),
                None => None,
            })
        };
        let (group, base_url) = (text(group, "group")?, text(base_url, "base_url")?);
        validate_key("key", &value)?;
        if let Some(group) = &group {
            validate_group("key", group, &value)?;
        }
        if let Some(url) = &base_url {
            crate::target::BaseUrl::parse(url)
                .map_err(|e| Error::Config(e.to_string().replace(&value, &mask(&value))))?;
        }
        Ok(Self {
            key: KeyRef::Unbound {
                hint: mask(&value),
                value,
                group,
                base_url,
            },
        })
    }

    #[getter]
    fn label(&self) -> PyResult<&str> {
        Ok(self.bound()?.label())
    }

    #[getter]
    fn hint(&self) -> &str {
        match &self.key {
            KeyRef::Bound(key) => key.hint(),
            KeyRef::Unbound { hint, .. } => hint,
        }
    }

    #[getter]
    fn value(&self) -> &str {
        match &self.key {
            KeyRef::Bound(key) => key.value(),
            KeyRef::Unbound { value, .. } => value,
        }
    }

    /// The group (organization or project) whose limits the key shares:
    /// configured, or learned from upstream; None when neither.
    #[getter]
    fn group(&self) -> Option<&str> {
        match &self.key {
            KeyRef::Bound(key) => key.group(),
            KeyRef::Unbound { group, .. } => group.as_deref(),
        }
    }

    /// The key's own endpoint, if it has one.
    #[getter]
    fn base_url(&self) -> Option<&str> {
        match &self.key {
            KeyRef::Bound(key) => key.base_url().map(|u| u.as_str()),
            KeyRef::Unbound { base_url, .. } => base_url.as_deref(),
        }
    }

    #[getter]
    fn state(&self) -> PyResult<PyKeyState> {
        Ok(self.bound()?.state().into())
    }

    #[getter]
    fn cooldown_remaining(&self) -> PyResult<f64> {
        Ok(self.bound()?.status().cooldown_remaining.as_secs_f64())
    }

    /// Cools the key down; None, zero or negative means the pool's default.
    #[pyo3(signature = (cooldown = None))]
    fn mark_temporary(&self, cooldown: Option<f64>) -> PyResult<bool> {
        // Infinite (or too large to count): as long as a cooldown may be,
        // `max_cooldown` if set.
        let cooldown = match cooldown {
            Some(c) if c.is_nan() => {
                return Err(
                    Error::Config("cooldown must be a number of seconds, not NaN".into()).into(),
                )
            }
            Some(c) if c > 0.0 => Some(Duration::try_from_secs_f64(c).unwrap_or(Duration::MAX)),
            _ => None,
        };
        Ok(self.bound()?.mark_temporary(cooldown))
    }

    fn mark_permanent(&self) -> PyResult<bool> {
        Ok(self.bound()?.mark_permanent())
    }

    fn reset(&self) -> PyResult<()> {
        self.bound()?.reset();
        Ok(())
    }

    fn __repr__(&self) -> String {
        match &self.key {
            KeyRef::Bound(key) => format!(
                "Key(label={:?}, hint={:?}, state={})",
                key.label(),
                key.hint(),
                key.status().state.as_str()
            ),
            KeyRef::Unbound { hint, group, .. } => match group {
                Some(group) => format!("Key(hint={hint:?}, group={group:?})"),
                None => format!("Key(hint={hint:?})"),
            },
        }
    }
}

/// A pool's reload made ready (`KeyPool._prepare_reload`).
#[pyclass(name = "_PreparedReload", module = "keyfailover", frozen)]
pub struct PyPreparedReload(Mutex<Option<PreparedReload>>);

#[pymethods]
impl PyPreparedReload {
    /// Puts the new keys in service; what changed, as `reload` returns it.
    /// Once only.
    fn commit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let prepared = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        let prepared =
            prepared.ok_or_else(|| Error::Config("this reload was committed already".into()))?;
        let report = py.detach(|| prepared.commit());
        to_py(py, &report.to_json())
    }

    fn __repr__(&self) -> String {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(prepared) => format!("<_PreparedReload {}>", prepared.report().summary()),
            None => "<_PreparedReload committed>".into(),
        }
    }
}
