//! Bindings for the key pool: `KeyPool`, `Key`, `Walker`, `KeyState`, `ManualClock`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::json::to_py;

use super::runtime::runtime;
use crate::clock::{Clock, ManualClock};
use crate::error::Error;
use crate::pool::{Cooldowns, Key, KeyPool, KeyState, PoolOptions, Walker};
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

#[pymethods]
impl PyManualClock {
    #[new]
    #[pyo3(signature = (start = 0.0))]
    fn new(start: f64) -> PyResult<Self> {
        Ok(Self {
            clock: ManualClock::new(non_negative_seconds("start", start)?),
        })
    }

    fn advance(&self, seconds: f64) -> PyResult<()> {
        self.clock
            .advance(non_negative_seconds("seconds", seconds)?);
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
    Ok(text.to_str()?.to_owned())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `(label, key)` pairs from a sequence of keys or a mapping label -> key.
fn labelled_keys(keys: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
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
            .map(|item| {
                let (label, key): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
                Ok((key_string(&label, "labels")?, key_string(&key, "keys")?))
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
        .map(|(i, item)| Ok((format!("key-{i}"), key_string(&item?, "keys")?)))
        .collect()
}

#[pymethods]
impl PyKeyPool {
    #[new]
    #[pyo3(signature = (keys, *, default_cooldown = 60.0, max_cooldown = None, quota_cooldown = 3600.0, clock = None, state = None, namespace = "default"))]
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
            clock: clock.map(|c| c.clock.clone() as Arc<dyn Clock>),
            state: Some(StateSpec::parse(state, namespace)?),
            runtime: Some(runtime().handle().clone()),
        };
        let keys = labelled_keys(keys)?;
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
    fn key(&self, label: &str) -> PyResult<PyKey> {
        Ok(PyKey {
            key: self.pool.key(label)?,
        })
    }

    /// One dict per key, in order: label, hint, state, cooldown_remaining.
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
        Ok(PyKey { key })
    }

    fn __repr__(&self) -> String {
        "Walker()".into()
    }
}

/// One key of a pool. `.value` is the only accessor that reveals the secret.
#[pyclass(name = "Key", module = "keyfailover", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash)]
pub struct PyKey {
    pub(crate) key: Key,
}

#[pymethods]
impl PyKey {
    #[getter]
    fn label(&self) -> &str {
        self.key.label()
    }

    #[getter]
    fn hint(&self) -> &str {
        self.key.hint()
    }

    #[getter]
    fn value(&self) -> &str {
        self.key.value()
    }

    #[getter]
    fn state(&self) -> PyKeyState {
        self.key.state().into()
    }

    #[getter]
    fn cooldown_remaining(&self) -> f64 {
        self.key.status().cooldown_remaining.as_secs_f64()
    }

    /// Cools the key down; None, zero or negative means the pool's default.
    #[pyo3(signature = (cooldown = None))]
    fn mark_temporary(&self, cooldown: Option<f64>) -> bool {
        let cooldown = match cooldown {
            Some(c) if c > 0.0 => Some(Duration::try_from_secs_f64(c).unwrap_or(Duration::MAX)),
            _ => None,
        };
        self.key.mark_temporary(cooldown)
    }

    fn mark_permanent(&self) -> bool {
        self.key.mark_permanent()
    }

    fn reset(&self) {
        self.key.reset()
    }

    fn __repr__(&self) -> String {
        let status = self.key.status();
        format!(
            "Key(label={:?}, hint={:?}, state={})",
            self.key.label(),
            self.key.hint(),
            status.state.as_str()
        )
    }
}
