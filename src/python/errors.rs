//! The Python exception hierarchy and the one mapping of core errors onto it.
//!
//! The classes are defined in Python source so that `ConfigError` can be both
//! a `KeyfailoverError` and a `ValueError`, which a `#[pyclass]` cannot be.

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use crate::error::{Error, Exhaustion};

const SOURCE: &std::ffi::CStr = cr#"
class KeyfailoverError(Exception):
    """Base of every exception keyfailover raises."""


class ConfigError(KeyfailoverError, ValueError):
    """Invalid configuration or argument."""


class PoolExhausted(KeyfailoverError):
    """No key of the pool can take the request."""


class TransientExhaustion(PoolExhausted):
    """Every key is cooling down or retired; `retry_after` is the smallest
    remaining cooldown in seconds (0.0 when a key is valid again)."""

    def __init__(self, retry_after, message=None):
        self.retry_after = float(retry_after)
        if message is None:
            message = f"all configured keys are rate-limited (retry after {self.retry_after:.3f} s)"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.retry_after, str(self)))


class PermanentExhaustion(PoolExhausted):
    """Every key failed authentication and is retired."""

    def __init__(self, message="all configured keys failed authentication"):
        super().__init__(message)


class UpstreamError(KeyfailoverError):
    """The upstream connection broke after the response had started."""


for _cls in (KeyfailoverError, ConfigError, PoolExhausted, TransientExhaustion,
             PermanentExhaustion, UpstreamError):
    _cls.__module__ = "keyfailover"
del _cls
"#;

pub(crate) const NAMES: [&str; 6] = [
    "KeyfailoverError",
    "ConfigError",
    "PoolExhausted",
    "TransientExhaustion",
    "PermanentExhaustion",
    "UpstreamError",
];

static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    let module = MODULE.get_or_try_init(py, || {
        PyModule::from_code(
            py,
            SOURCE,
            c"keyfailover/_errors.py",
            c"keyfailover._errors",
        )
        .map(Bound::unbind)
    })?;
    Ok(module.bind(py))
}

/// The exception class called `name` (one of [`NAMES`]).
pub(crate) fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    module(py)?.getattr(name)
}

fn to_pyerr(py: Python<'_>, err: Error) -> PyResult<PyErr> {
    let instance = match err {
        Error::Config(message) => class(py, "ConfigError")?.call1((message,))?,
        Error::UnknownLabel(label) => return Ok(PyKeyError::new_err(label)),
        Error::Exhausted(Exhaustion::Transient { retry_after }) => {
            class(py, "TransientExhaustion")?.call1((retry_after.as_secs_f64(),))?
        }
        Error::Exhausted(Exhaustion::Permanent) => class(py, "PermanentExhaustion")?.call0()?,
        Error::Upstream(message) => class(py, "UpstreamError")?.call1((message,))?,
    };
    Ok(PyErr::from_value(instance))
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| to_pyerr(py, err).unwrap_or_else(|e| e))
    }
}

/// Adds the exception classes to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for name in NAMES {
        m.add(name, class(m.py(), name)?)?;
    }
    Ok(())
}
