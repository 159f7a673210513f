//! Log records the core makes (a key retired, Redis lost and back), handed
//! to whoever consumes them: the Python bindings hand them to `logging`
//! from a thread of their own, never from a tokio thread.
//!
//! Records queue until taken; none is dropped. Until a consumer subscribes
//! (pure Rust use), records are not kept at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// A record's severity, with Python's `logging` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug = 10,
    Info = 20,
    Warning = 30,
    Error = 40,
}

/// A structured field of a record (`extra` in Python's logging).
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Str(String),
    Int(i64),
    Float(f64),
    None,
}

impl From<&str> for Field {
    fn from(s: &str) -> Self {
        Field::Str(s.to_owned())
    }
}

impl From<String> for Field {
    fn from(s: String) -> Self {
        Field::Str(s)
    }
}

impl From<u16> for Field {
    fn from(n: u16) -> Self {
        Field::Int(n.into())
    }
}

impl From<f64> for Field {
    fn from(n: f64) -> Self {
        Field::Float(n)
    }
}

impl<T: Into<Field>> From<Option<T>> for Field {
    fn from(value: Option<T>) -> Self {
        value.map_or(Field::None, Into::into)
    }
}

/// One log record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub logger: &'static str,
    pub level: Level,
    pub message: String,
    pub fields: Vec<(&'static str, Field)>,
}

struct Queue {
    records: Mutex<Vec<Record>>,
    /// Set while a wake-up is pending, so a burst wakes the consumer once.
    signalled: AtomicBool,
    wake: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

static QUEUE: Queue = Queue {
    records: Mutex::new(Vec::new()),
    signalled: AtomicBool::new(false),
    wake: OnceLock::new(),
};

/// Starts keeping records; `wake` is called (from any thread, without
/// blocking) when records wait to be taken.
pub fn subscribe(wake: Box<dyn Fn() + Send + Sync>) {
    let _ = QUEUE.wake.set(wake);
}

/// Queues a record for the consumer, if there is one.
pub fn emit(record: Record) {
    let Some(wake) = QUEUE.wake.get() else {
        return;
    };
    QUEUE
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(record);
    if !QUEUE.signalled.swap(true, Ordering::AcqRel) {
        wake();
    }
}

/// Every record queued so far, oldest first.
pub fn take() -> Vec<Record> {
    QUEUE.signalled.store(false, Ordering::Release);
    std::mem::take(&mut *QUEUE.records.lock().unwrap_or_else(|e| e.into_inner()))
}
