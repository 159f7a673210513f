//! The PyO3 bindings: one thin file per exposed type, no decisions here.

mod bridge;
mod client;
mod errors;
mod events;
mod gateway;
mod json;
mod pool;
mod rules;
mod runtime;
mod server;

use pyo3::prelude::*;
use pyo3::types::IntoPyDict;

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<pool::PyKeyPool>()?;
    m.add_class::<pool::PyKey>()?;
    m.add_class::<pool::PyWalker>()?;
    m.add_class::<pool::PyKeyState>()?;
    m.add_class::<pool::PyManualClock>()?;
    m.add_class::<pool::PyPreparedReload>()?;
    m.add_class::<client::PyFailoverClient>()?;
    m.add_class::<client::PyResponse>()?;
    m.add_class::<client::PySyncResponse>()?;
    m.add_function(wrap_pyfunction!(client::sse_error_event, m)?)?;
    m.add_function(wrap_pyfunction!(client::error_response, m)?)?;
    m.add_function(wrap_pyfunction!(rules::parse_retry_after, m)?)?;
    m.add_function(wrap_pyfunction!(rules::mark_key_on_response, m)?)?;
    m.add_function(wrap_pyfunction!(rules::parse_keys, m)?)?;
    m.add_function(wrap_pyfunction!(rules::_shm_path, m)?)?;
    m.add_function(wrap_pyfunction!(events::_events_fd, m)?)?;
    m.add_function(wrap_pyfunction!(events::_take_records, m)?)?;
    m.add_function(wrap_pyfunction!(events::_set_log_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(events::_core_loggers, m)?)?;
    m.add_class::<gateway::PyGateway>()?;
    m.add_class::<gateway::PyForward>()?;
    m.add_class::<server::PyServer>()?;
    m.add_function(wrap_pyfunction!(runtime::set_worker_threads, m)?)?;
    // The public names (the private helpers of keyfailover's own modules stay out).
    let mut public: Vec<String> = m
        .dict()
        .keys()
        .iter()
        .filter_map(|k| k.extract::<String>().ok())
        .filter(|k| !k.starts_with('_') || k == "__version__")
        .collect();
    public.sort();
    m.add("__all__", public)?;
    // A FailoverClient used before os.fork() must work in the child: the
    // runtime and connections are rebuilt there on first use.
    m.py().import("os")?.call_method(
        "register_at_fork",
        (),
        Some(
            &[("after_in_child", wrap_pyfunction!(after_fork_in_child, m)?)]
                .into_py_dict(m.py())?,
        ),
    )?;
    Ok(())
}

/// Called by `os.register_at_fork` in a forked child.
#[pyfunction(name = "_after_fork_in_child")]
fn after_fork_in_child(py: Python<'_>) -> PyResult<()> {
    crate::fork::forked();
    crate::state::after_fork();
    events::after_fork();
    crate::state::redis::restart_after_fork(|| runtime::runtime().handle().clone());
    bridge::after_fork(py)
}
