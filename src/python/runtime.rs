//! The one tokio runtime, and blocking on it from Python.
//!
//! pyo3-async-runtimes provides the runtime. A forked child inherits that
//! runtime's memory but none of its threads, so in a child (see
//! `crate::fork`) a runtime of the child's own takes its place, built on
//! first use; the parent's is never touched again.

use std::future::Future;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

use crate::fork;

/// How often a blocking call looks for signals (Ctrl-C) while it waits.
pub(crate) const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Worker threads of the runtime (0: one per core, tokio's default).
static THREADS: AtomicUsize = AtomicUsize::new(0);

fn builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    match THREADS.load(Ordering::Acquire) {
        0 => {}
        n => {
            builder.worker_threads(n);
        }
    }
    builder
}

/// Sets the runtime's worker threads: before its first use in this process
/// (and for the runtimes of processes forked from it).
#[pyfunction(name = "_set_worker_threads")]
pub(crate) fn set_worker_threads(threads: usize) -> PyResult<()> {
    if threads == 0 {
        return Err(crate::Error::Config("threads must be at least 1".into()).into());
    }
    THREADS.store(threads, Ordering::Release);
    if fork::generation() == 0 {
        let runtime = builder()
            .build()
            .map_err(|e| crate::Error::Config(format!("cannot start a tokio runtime: {e}")))?;
        // Leaked: the runtime lives as long as the process, unless it is
        // refused (one has started already), when its threads are ended.
        let runtime: *mut Runtime = Box::into_raw(Box::new(runtime));
        // SAFETY: from the Box just made; never freed while it is in use.
        if pyo3_async_runtimes::tokio::init_with_runtime(unsafe { &*runtime }).is_err() {
            // SAFETY: refused, so nothing holds a reference to it.
            unsafe { Box::from_raw(runtime) }.shutdown_background();
            return Err(crate::Error::Config(
                "the runtime has started already: set its threads before any request".into(),
            )
            .into());
        }
    }
    Ok(())
}

/// The runtime of this process.
pub(crate) fn runtime() -> &'static Runtime {
    let generation = fork::generation();
    if generation == 0 {
        return pyo3_async_runtimes::tokio::get_runtime();
    }
    static CHILD: AtomicPtr<Runtime> = AtomicPtr::new(std::ptr::null_mut());
    static CHILD_GENERATION: AtomicU64 = AtomicU64::new(0);
    static BUILD: Mutex<()> = Mutex::new(());
    if CHILD_GENERATION.load(Ordering::Acquire) == generation {
        // SAFETY: set below from a leaked Box, never freed.
        return unsafe { &*CHILD.load(Ordering::Acquire) };
    }
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if CHILD_GENERATION.load(Ordering::Acquire) != generation {
        let runtime = builder().build().expect("cannot start a tokio runtime");
        // Leaked like the parent's: it lives as long as the process.
        CHILD.store(Box::into_raw(Box::new(runtime)), Ordering::Release);
        CHILD_GENERATION.store(generation, Ordering::Release);
    }
    // SAFETY: as above.
    unsafe { &*CHILD.load(Ordering::Acquire) }
}

/// Runs `fut` to completion with the GIL released, looking for signals every
/// SIGNAL_CHECK: a Ctrl-C raises `KeyboardInterrupt` within about that long
/// and drops `fut` (and so its upstream request).
pub(crate) fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let runtime = runtime();
    let mut fut = std::pin::pin!(fut);
    loop {
        let slice = py.detach(|| {
            runtime.block_on(async { tokio::time::timeout(SIGNAL_CHECK, fut.as_mut()).await })
        });
        match slice {
            Ok(output) => return Ok(output),
            Err(_) => py.check_signals()?,
        }
    }
}
