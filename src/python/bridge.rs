//! Awaitables for Rust futures, completed by the asyncio loop itself.
//!
//! A Rust future runs on the one tokio runtime (see `runtime.rs`). When it
//! finishes, its outcome goes into a queue belonging to the asyncio loop
//! that awaits it, and one byte on a socket pair wakes the loop, which has the
//! socket registered with `add_reader`. The loop thread then converts the
//! outcomes to Python objects and sets the futures' results.
//!
//! So tokio threads never *call* into Python: no GIL handoff per completion,
//! completions are batched, and no foreign thread runs Python code while the
//! interpreter finalizes (what crashes interpreters at exit). They do hold
//! Python references: a task aborted because its asyncio future was
//! cancelled drops its `Py<PyAny>` (the future) on a tokio thread, which
//! pyo3 defers to the next time a thread holds the GIL; nothing runs there.
//!
//! Each outcome is converted on its own: a panic while converting one fails
//! that future and leaves the rest of the batch alone. A panic in the Rust
//! future itself is caught and delivered as a `KeyfailoverError`, so the
//! awaiting coroutine never hangs. A result that completes after its future
//! was cancelled is dropped in the loop thread, so whatever it holds (an
//! upstream response) closes at once; one for a loop that has closed (a
//! future left pending by `asyncio.run`, which cancels only tasks) is
//! dropped as it comes, and what was queued goes with the loop.
//!
//! Needs a loop with `add_reader` (the default selector loop, uvloop):
//! Unix only, as `pyproject.toml` declares.

use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use pyo3::exceptions::PyNotImplementedError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCFunction, PyWeakrefReference};
use pyo3::IntoPyObjectExt;
use tokio::task::AbortHandle;

/// Turns a finished future's output into the awaitable's result, in the
/// loop thread.
type Outcome = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

struct Completion {
    future: Py<PyAny>,
    outcome: Outcome,
}

/// The completion queue of one asyncio loop.
struct Inbox {
    /// None once the loop closed (its `Drain` gone): what comes then is
    /// dropped, not queued where nothing will take it.
    queue: Mutex<Option<Vec<Completion>>>,
    /// True while a wake-up byte is pending: one byte per batch is enough.
    signalled: AtomicBool,
    /// In a forked child: the parent's inbox, not to be read (see `after_fork`).
    inherited: AtomicBool,
    writer: UnixStream,
    reader: UnixStream,
}

impl Inbox {
    fn new() -> std::io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(Self {
            queue: Mutex::new(Some(Vec::new())),
            signalled: AtomicBool::new(false),
            inherited: AtomicBool::new(false),
            writer,
            reader,
        })
    }

    /// Called from tokio threads: no Python here.
    fn push(&self, completion: Completion) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queue.as_mut() else {
            // The loop is closed: the result (an upstream response, say) is
            // dropped here and now; the future's reference later, by pyo3.
            return;
        };
        queue.push(completion);
        if !self.signalled.swap(true, Ordering::SeqCst) {
            // A full socket buffer means a wake-up is already pending.
            let _ = (&self.writer).write(&[1]);
        }
    }

    fn take(&self) -> Vec<Completion> {
        // Order matters. Consume the wake-up bytes first, then clear the flag,
        // then take the queue: a push that sets the flag after it was cleared
        // writes a byte that is still unread, so it is never lost; clearing
        // the flag before reading could swallow that byte and leave the flag
        // set with nobody to drain.
        let mut buf = [0u8; 64];
        loop {
            match (&self.reader).read(&mut buf) {
                Ok(n) if n > 0 => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        self.signalled.store(false, Ordering::SeqCst);
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Takes what is queued, and refuses what comes later.
    fn close(&self) -> Vec<Completion> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.take().unwrap_or_default()
    }
}

/// Registered with the loop's `add_reader`: completes the queued futures.
/// Only the loop holds it (`INBOXES` refers to it weakly), so it goes when
/// the loop closes and lets go of its readers, and closes the inbox: a
/// result queued for a closed loop would hold its future, and the future
/// its loop, in a cycle through Rust that Python's collector cannot see.
#[pyclass(frozen, weakref)]
struct Drain(Arc<Inbox>);

impl Drop for Drain {
    fn drop(&mut self) {
        // Dropped with the rest of the loop's objects, in a Python thread.
        drop(self.0.close());
    }
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) {
        if self.0.inherited.load(Ordering::SeqCst) {
            return;
        }
        for Completion { future, outcome } in self.0.take() {
            let future = future.bind(py);
            let cancelled = future
                .call_method0(pyo3::intern!(py, "cancelled"))
                .and_then(|c| c.is_truthy())
                .unwrap_or(true);
            if cancelled {
                // `outcome` is dropped here, in the loop thread.
                continue;
            }
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| outcome(py)))
                .unwrap_or_else(|panic| Err(panicked(py, panic)));
            // Only an InvalidStateError can fail these, and the future was
            // checked just above in this same thread.
            let _ = match result {
                Ok(value) => future.call_method1(pyo3::intern!(py, "set_result"), (value,)),
                Err(err) => {
                    future.call_method1(pyo3::intern!(py, "set_exception"), (err.into_value(py),))
                }
            };
        }
    }
}

/// The inbox of each loop: loop -> weak reference to its `Drain`.
static INBOXES: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn inbox_for(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<Inbox>> {
    let py = event_loop.py();
    let inboxes = INBOXES
        .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(py
                .import("weakref")?
                .getattr("WeakKeyDictionary")?
                .call0()?
                .unbind())
        })?
        .bind(py);
    let found = inboxes.call_method1("get", (event_loop,))?;
    if let Ok(weak) = found.cast::<PyWeakrefReference>() {
        if let Some(drain) = weak.upgrade_as::<Drain>()? {
            return Ok(drain.get().0.clone());
        }
    }
    let inbox = Arc::new(Inbox::new()?);
    let drain = Bound::new(py, Drain(inbox.clone()))?;
    match event_loop.call_method1("add_reader", (inbox.reader.as_raw_fd(), &drain)) {
        Err(err) if err.is_instance_of::<PyNotImplementedError>(py) => {
            return Err(super::errors::internal(
                py,
                format!(
                    "keyfailover needs an asyncio event loop with add_reader (the default \
                     selector loop or uvloop), not {}",
                    event_loop.get_type().name()?
                ),
            ))
        }
        other => other?,
    };
    inboxes.set_item(event_loop, PyWeakrefReference::new(&drain)?)?;
    Ok(inbox)
}

/// Forgets, in a forked child, the inboxes it inherited: their sockets are
/// the parent's too, whose tokio threads write to them. The loops' reader
/// registrations are left alone: the child's selector is the parent's epoll
/// instance, and `remove_reader` here removed the parent's (whose requests
/// then never completed). A child must not run an inherited loop (asyncio's
/// loops are not fork-safe: it shares the parent's epoll); if it does, its
/// copies of the drains read nothing, so the wake-up bytes stay the parent's,
/// though they wake the child's loop too for as long as they are unread.
pub(crate) fn after_fork(py: Python<'_>) -> PyResult<()> {
    let Some(inboxes) = INBOXES.get(py) else {
        return Ok(());
    };
    let inboxes = inboxes.bind(py);
    for item in inboxes.call_method0("values")?.try_iter()? {
        let drain = item?;
        let drain = drain.cast::<PyWeakrefReference>()?;
        if let Some(drain) = drain.upgrade_as::<Drain>()? {
            drain.get().0.inherited.store(true, Ordering::SeqCst);
        }
    }
    inboxes.call_method0("clear")?;
    Ok(())
}

/// A panic's payload as a Python exception.
fn panicked(py: Python<'_>, panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    super::errors::internal(py, format!("keyfailover internal error (a bug): {message}"))
}

/// Runs `fut` on the tokio runtime and returns an asyncio future of the
/// running loop for its result, converted to Python in the loop thread.
/// Cancelling the asyncio future aborts the task, which drops `fut`.
pub(crate) fn spawn<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, crate::error::Error>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let get_running_loop = GET_RUNNING_LOOP.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
    })?;
    let event_loop = get_running_loop.bind(py).call0()?;
    let inbox = inbox_for(&event_loop)?;
    let future = event_loop.call_method0(pyo3::intern!(py, "create_future"))?;
    let target = future.clone().unbind();
    let task = super::runtime::runtime().spawn(async move {
        let output = AssertUnwindSafe(fut).catch_unwind().await;
        inbox.push(Completion {
            future: target,
            outcome: Box::new(move |py| match output {
                Ok(Ok(value)) => value.into_py_any(py),
                Ok(Err(err)) => Err(err.into()),
                Err(panic) => Err(panicked(py, panic)),
            }),
        });
    });
    let abort: AbortHandle = task.abort_handle();
    let on_done = PyCFunction::new_closure(py, None, None, move |args, _kwargs| -> PyResult<()> {
        let future = args.get_item(0)?;
        if future.call_method0("cancelled")?.is_truthy()? {
            abort.abort();
        }
        Ok(())
    })?;
    future.call_method1(pyo3::intern!(py, "add_done_callback"), (on_done,))?;
    Ok(future)
}
