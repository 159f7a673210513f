//! The native server's access log: one line per request, written by a
//! thread of its own so that a request only formats its line and queues it.
//! The lines look like the ASGI proxy's (`keyfailover.proxy` records through
//! Python's logging, as `keyfailover serve` formats them): text or one JSON
//! object a line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::ratelimit::civil_from_days;

/// Lines queued beyond this are dropped (and counted), never waited for.
const QUEUE: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `INFO keyfailover.proxy: POST /v1/messages -> 200 (attempts=1, key=key-0, 1.2 ms)`
    Text,
    /// `{"timestamp", "level", "logger", "message", "method", "path", "status", ...}`
    Json,
}

impl std::str::FromStr for Format {
    type Err = crate::error::Error;

    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(crate::error::Error::Config(format!(
                "unknown access log format {other:?}: expected \"text\" or \"json\""
            ))),
        }
    }
}

/// One request, as the access log tells it.
#[derive(Debug)]
pub struct Entry<'a> {
    pub method: &'a str,
    /// Without the query (it may carry a key).
    pub path: &'a str,
    pub status: u16,
    pub attempts: u32,
    /// The pool key's label; None for BYOK or when no key was used.
    pub key: Option<&'a str>,
    pub byok: bool,
    pub exhausted: bool,
    pub pool: &'a str,
    /// From the request head to the response head.
    pub duration: Duration,
}

/// Where the server's access lines go.
#[derive(Debug, Clone)]
pub struct AccessLog {
    format: Format,
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Writes to stderr from a thread of its own.
    pub fn stderr(format: Format) -> Self {
        Self::to_writer(format, std::io::stderr())
    }

    pub fn to_writer(format: Format, out: impl Write + Send + 'static) -> Self {
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("keyfailover-access-log".into())
            .spawn(move || write_lines(rx, out, format, &counter))
            .expect("cannot start the access log thread");
        Self {
            format,
            tx,
            dropped,
        }
    }

    /// Queues the line of one request; drops it (counted) when the writer is
    /// behind by a full queue.
    pub fn log(&self, entry: &Entry<'_>) {
        let line = format_line(self.format, entry, SystemTime::now());
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn write_lines(rx: Receiver<String>, out: impl Write, format: Format, dropped: &AtomicU64) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        // Whatever else is queued goes out in the same write.
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let message = format!("access log: {lost} lines dropped (the log could not keep up)");
            let _ = out.write_all(warning(format, &message, SystemTime::now()).as_bytes());
        }
        let _ = out.flush();
    }
}

fn message(entry: &Entry<'_>) -> String {
    let key = entry.key.unwrap_or(if entry.byok { "byok" } else { "-" });
    format!(
        "{} {} -> {} (attempts={}, key={key}, {:.1} ms{})",
        entry.method,
        entry.path,
        entry.status,
        entry.attempts,
        entry.duration.as_secs_f64() * 1000.0,
        if entry.exhausted {
            ", pool exhausted"
        } else {
            ""
        },
    )
}

pub fn format_line(format: Format, entry: &Entry<'_>, now: SystemTime) -> String {
    let message = message(entry);
    match format {
        Format::Text => format!("INFO keyfailover.proxy: {message}\n"),
        Format::Json => {
            let mut line = json!({
                "timestamp": timestamp(now),
                "level": "INFO",
                "logger": "keyfailover.proxy",
                "message": message,
                "method": entry.method,
                "path": entry.path,
                "status": entry.status,
                "attempts": entry.attempts,
                "key": entry.key,
                "pool": entry.pool,
                "duration_ms": (entry.duration.as_secs_f64() * 1e6).round() / 1e3,
            })
            .to_string();
            line.push('\n');
            line
        }
    }
}

fn warning(format: Format, message: &str, now: SystemTime) -> String {
    match format {
        Format::Text => format!("WARNING keyfailover.proxy: {message}\n"),
        Format::Json => format!(
            "{}\n",
            json!({"timestamp": timestamp(now), "level": "WARNING",
                   "logger": "keyfailover.proxy", "message": message})
        ),
    }
}

/// `2026-12-02T06:45:57.123456+00:00`, as Python's `datetime.isoformat()`.
fn timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rest = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn entry() -> Entry<'static> {
        Entry {
            method: "POST",
            path: "/v1/messages",
            status: 200,
            attempts: 2,
            key: Some("key-1"),
            byok: false,
            exhausted: false,
            pool: "anthropic",
            duration: Duration::from_micros(1234),
        }
    }

    /// 2026-12-02T05:00:00.5Z
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_187_600_500)
    }

    #[test]
    fn text_and_json_lines() {
        assert_eq!(
            format_line(Format::Text, &entry(), now()),
            "INFO keyfailover.proxy: POST /v1/messages -> 200 (attempts=2, key=key-1, 1.2 ms)\n"
        );
        let line = format_line(Format::Json, &entry(), now());
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["timestamp"], "2026-12-02T05:00:00.500000+00:00");
        assert_eq!(value["status"], 200);
        assert_eq!(value["key"], "key-1");
        assert_eq!(value["duration_ms"], 1.234);
        let byok = Entry {
            key: None,
            byok: true,
            exhausted: true,
            status: 429,
            ..entry()
        };
        assert!(format_line(Format::Text, &byok, now())
            .contains("-> 429 (attempts=2, key=byok, 1.2 ms, pool exhausted)"));
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_reach_the_writer_in_order() {
        let out = Shared::default();
        let log = AccessLog::to_writer(Format::Text, out.clone());
        for status in [200, 201, 202] {
            log.log(&Entry { status, ..entry() });
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
            if text.lines().count() == 3 {
                let statuses: Vec<&str> =
                    text.lines().map(|l| l.split(' ').nth(5).unwrap()).collect();
                assert_eq!(statuses, ["200", "201", "202"]);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A writer that blocks in its first write until released.
    #[derive(Clone, Default)]
    struct Stuck {
        out: Shared,
        /// (entered the first write, released)
        gate: Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>,
    }

    impl Stuck {
        fn release(&self) {
            let (state, wake) = &*self.gate;
            state.lock().unwrap().1 = true;
            wake.notify_all();
        }
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (state, wake) = &*self.gate;
            let mut state = state.lock().unwrap();
            state.0 = true;
            wake.notify_all();
            while !state.1 {
                state = wake.wait(state).unwrap();
            }
            drop(state);
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_that_cannot_keep_up_drops_lines_and_says_how_many_never_waiting() {
        let stuck = Stuck::default();
        let log = AccessLog::to_writer(Format::Text, stuck.clone());
        log.log(&entry());
        {
            let (state, wake) = &*stuck.gate;
            let mut state = state.lock().unwrap();
            while !state.0 {
                state = wake.wait(state).unwrap();
            }
        }
        // The writer is stuck: a full queue more, and 100 beyond it, without waiting
        // (a watchdog frees the writer after 10 s, which would fail the test).
        let watchdog = {
            let stuck = stuck.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(10));
                stuck.release();
            })
        };
        for _ in 0..QUEUE + 100 {
            log.log(&Entry {
                status: 201,
                ..entry()
            });
        }
        assert!(!watchdog.is_finished(), "logging waited for the writer");
        stuck.release();
        let output = || String::from_utf8(stuck.out.0.lock().unwrap().clone()).unwrap();
        let wait_for = |what: &str| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let text = output();
                if text.contains(what) {
                    return text;
                }
                assert!(std::time::Instant::now() < deadline, "no {what:?} came");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        // Once the writer caught up, it says what was lost; the lines after go out.
        let text = wait_for("(the log could not keep up)\n");
        assert!(text.ends_with("access log: 100 lines dropped (the log could not keep up)\n"));
        assert_eq!(text.lines().filter(|l| l.contains(" 201 ")).count(), QUEUE);
        log.log(&Entry {
            status: 202,
            ..entry()
        });
        let text = wait_for(" 202 ");
        assert_eq!(text.lines().count(), 1 + QUEUE + 1 + 1);
        assert_eq!(text.matches("dropped").count(), 1);
    }
}
