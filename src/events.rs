//! Log records the core makes (a key retired, Redis lost and back), handed
//! to whoever consumes them: the Python bindings hand them to `logging`
//! from a thread of their own, never from a tokio thread.
//!
//! Records queue until taken; none is dropped. Until a consumer subscribes
//! (pure Rust use), records are not kept at all.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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

/// The loggers the core's records go to, for a consumer that sets a
/// [`set_threshold`] from their configured levels.
pub const LOGGERS: [&str; 5] = [
    "keyfailover.admin",
    "keyfailover.client",
    "keyfailover.pool",
    "keyfailover.proxy",
    "keyfailover.state",
];

/// Records below this level (Python's numbers) are dropped when made.
static THRESHOLD: AtomicU8 = AtomicU8::new(0);

/// Drops records below `level` from now on (0: keeps every record). For a
/// consumer whose logging configuration is set once (the command line): a
/// record no logger would show then never wakes it, which on a busy CPU
/// costs a request in flight a tenth of a millisecond or more.
pub fn set_threshold(level: u8) {
    THRESHOLD.store(level, Ordering::Relaxed);
}

/// Whether a record of `level` would be kept: check it before building a
/// record that takes work to make.
pub fn enabled(level: Level) -> bool {
    level as u8 >= THRESHOLD.load(Ordering::Relaxed) && QUEUE.wake.get().is_some()
}

/// Queues a record for the consumer, if there is one.
pub fn emit(record: Record) {
    let Some(wake) = QUEUE.wake.get() else {
        return;
    };
    if (record.level as u8) < THRESHOLD.load(Ordering::Relaxed) {
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(level: Level, message: &str) -> Record {
        Record {
            logger: "keyfailover.test",
            level,
            message: message.to_owned(),
            fields: Vec::new(),
        }
    }

    fn taken() -> Vec<String> {
        take()
            .into_iter()
            .filter(|r| r.logger == "keyfailover.test")
            .map(|r| r.message)
            .collect()
    }

    #[test]
    fn every_logger_the_core_writes_to_is_listed() {
        fn sources(dir: &std::path::Path, out: &mut String) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push_str(&std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        let mut text = String::new();
        sources(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut text,
        );
        for found in text.split("logger: \"").skip(1) {
            let name = &found[..found.find('"').unwrap()];
            if name.starts_with("keyfailover.") && name != "keyfailover.test" {
                assert!(LOGGERS.contains(&name), "{name} is not in LOGGERS");
            }
        }
    }

    #[test]
    fn records_below_the_threshold_are_dropped_when_made() {
        subscribe(Box::new(|| {}));
        assert!(enabled(Level::Debug));
        set_threshold(Level::Warning as u8);
        assert!(!enabled(Level::Info) && enabled(Level::Warning));
        emit(record(Level::Debug, "debug"));
        emit(record(Level::Info, "info"));
        emit(record(Level::Warning, "warning"));
        emit(record(Level::Error, "error"));
        assert_eq!(taken(), ["warning", "error"]);
        set_threshold(0);
        emit(record(Level::Debug, "debug again"));
        assert_eq!(taken(), ["debug again"]);
    }
}
