//! The PyO3 bindings: one thin file per exposed type, no decisions here.

mod bridge;
mod client;
mod errors;
mod pool;
mod rules;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<pool::PyKeyPool>()?;
    m.add_class::<pool::PyKey>()?;
    m.add_class::<pool::PyWalker>()?;
    m.add_class::<pool::PyKeyState>()?;
    m.add_class::<pool::PyManualClock>()?;
    m.add_class::<client::PyFailoverClient>()?;
    m.add_class::<client::PyResponse>()?;
    m.add_class::<client::PySyncResponse>()?;
    m.add_function(wrap_pyfunction!(client::sse_error_event, m)?)?;
    m.add_function(wrap_pyfunction!(client::error_response, m)?)?;
    m.add_function(wrap_pyfunction!(rules::parse_retry_after, m)?)?;
    m.add_function(wrap_pyfunction!(rules::mark_key_on_response, m)?)?;
    m.add_function(wrap_pyfunction!(rules::caller_credential, m)?)?;
    Ok(())
}
