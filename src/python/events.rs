//! Core log records into Python's `logging`, from a thread of Python's own.
//!
//! The core queues records (`crate::events`); a byte on a socket pair wakes
//! a daemon thread (`keyfailover/_logging.py`) blocked in `os.read` on the
//! other end, which takes the records and logs them. No tokio thread ever
//! runs Python code, and a process with no event loop logs all the same.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::events::{self, Field};

/// (writer, reader) of this process's wake-up socket pair.
static SOCKETS: Mutex<Option<(UnixStream, UnixStream)>> = Mutex::new(None);

fn new_pair() -> std::io::Result<(UnixStream, UnixStream)> {
    let (reader, writer) = UnixStream::pair()?;
    writer.set_nonblocking(true)?;
    Ok((writer, reader))
}

/// The descriptor the drain thread reads; starts keeping records.
#[pyfunction]
pub fn _events_fd() -> PyResult<i32> {
    let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    if sockets.is_none() {
        *sockets = Some(new_pair()?);
        events::subscribe(Box::new(|| {
            if let Some((writer, _)) = &*SOCKETS.lock().unwrap_or_else(|e| e.into_inner()) {
                // A full buffer means a wake-up is already pending.
                let _ = (&*writer).write(&[1]);
            }
        }));
    }
    Ok(sockets
        .as_ref()
        .map(|(_, reader)| reader.as_raw_fd())
        .unwrap_or(-1))
}

/// In a forked child: a socket pair of its own (the inherited one is the
/// parent's), and none of the parent's queued records.
pub(crate) fn after_fork() {
    let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    if sockets.is_some() {
        *sockets = new_pair().ok();
    }
    drop(sockets);
    let _ = events::take();
}

fn field<'py>(py: Python<'py>, value: &Field) -> PyResult<Bound<'py, PyAny>> {
    match value {
        Field::Str(s) => s.into_bound_py_any(py),
        Field::Int(n) => n.into_bound_py_any(py),
        Field::Float(n) => n.into_bound_py_any(py),
        Field::None => Ok(py.None().into_bound(py)),
    }
}

/// Drops the core's records below `level` when they are made (0: none).
#[pyfunction]
pub fn _set_log_threshold(level: u8) {
    events::set_threshold(level);
}

/// The loggers the core's records go to.
#[pyfunction]
pub fn _core_loggers() -> Vec<&'static str> {
    events::LOGGERS.to_vec()
}

/// The queued records: (logger, level, message, extra fields), oldest first.
#[pyfunction]
pub fn _take_records(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyTuple>>> {
    events::take()
        .into_iter()
        .map(|record| {
            let extra = PyDict::new(py);
            for (name, value) in &record.fields {
                extra.set_item(name, field(py, value)?)?;
            }
            PyTuple::new(
                py,
                [
                    record.logger.into_bound_py_any(py)?,
                    (record.level as i32).into_bound_py_any(py)?,
                    record.message.into_bound_py_any(py)?,
                    extra.into_any(),
                ],
            )
        })
        .collect()
}
