//! The one mapping of core errors onto the Python exception hierarchy, whose
//! classes live in `keyfailover/_errors.py`.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use crate::error::{Error, Exhaustion};

pub(crate) const NAMES: [&str; 9] = [
    "KeyfailoverError",
    "ConfigError",
    "InvalidRequestError",
    "UnknownKeyError",
    "PoolExhausted",
    "TransientExhaustion",
    "UnreachableExhaustion",
    "PermanentExhaustion",
    "UpstreamError",
];

static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn module(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    let module =
        MODULE.get_or_try_init(py, || py.import("keyfailover._errors").map(Bound::unbind))?;
    Ok(module.bind(py))
}

/// The exception class called `name` (one of [`NAMES`]).
pub(crate) fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    module(py)?.getattr(name)
}

/// A `KeyfailoverError` with this message, for failures of the bindings
/// themselves (such as a panic caught at the boundary).
pub(crate) fn internal(py: Python<'_>, message: String) -> PyErr {
    match class(py, "KeyfailoverError").and_then(|c| c.call1((message,))) {
        Ok(instance) => PyErr::from_value(instance),
        Err(err) => err,
    }
}

fn to_pyerr(py: Python<'_>, err: Error) -> PyResult<PyErr> {
    let message = err.to_string();
    let instance = match err {
        Error::Config(_) => class(py, "ConfigError")?.call1((message,))?,
        Error::BadRequest(_) | Error::MethodNotAllowed(_) => {
            class(py, "InvalidRequestError")?.call1((message,))?
        }
        Error::UnknownLabel(_) => class(py, "UnknownKeyError")?.call1((message,))?,
        Error::Exhausted(Exhaustion::Transient { retry_after }) => {
            class(py, "TransientExhaustion")?.call1((retry_after.as_secs_f64(), message))?
        }
        Error::Exhausted(Exhaustion::Unreachable { retry_after }) => {
            class(py, "UnreachableExhaustion")?.call1((retry_after.as_secs_f64(), message))?
        }
        Error::Exhausted(Exhaustion::Permanent) => {
            class(py, "PermanentExhaustion")?.call1((message,))?
        }
        Error::Upstream(_) => class(py, "UpstreamError")?.call1((message,))?,
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
