//! Deadlines on the request path (a request head's read, an upstream's
//! answer, a pause in a body), kept coarsely. They are almost always met,
//! and tokio's timer takes a lock to put each in its wheel and another to
//! take it out again, for every request.
//!
//! Here a deadline costs nothing until it is first waited on; then an
//! allocation and a push on one list. A thread of its own
//! (`keyfailover-timer`) wakes at the earliest deadline on the list, and
//! whenever the list has grown by [`SWEEP_BATCH`] entries: it wakes the
//! deadlines that have passed and lets go of those no longer waited for. It
//! sleeps while nothing waits, and holds the list's lock only to push or to
//! swap the list out, never while it looks through it. It is not a runtime:
//! tokio's stays the only one, and a deadline works under any.
//!
//! A deadline fires when it passes, give or take the timer thread's wake-up,
//! as tokio's would.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// How many entries the list gains before the timer thread sweeps it,
/// whether or not a deadline is due: those no longer waited for go then.
const SWEEP_BATCH: usize = 1024;

/// A deadline: a future that is ready once its time has passed.
#[derive(Debug)]
pub struct Deadline {
    when: When,
    /// Made when first waited on.
    entry: Option<Arc<Entry>>,
}

#[derive(Debug, Clone, Copy)]
enum When {
    At(Instant),
    /// Counted from the first wait: a deadline on something ready at once
    /// reads no clock.
    After(Duration),
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    waker: AtomicWaker,
    fired: AtomicBool,
}

impl Deadline {
    pub fn at(at: Instant) -> Self {
        Self {
            when: When::At(at),
            entry: None,
        }
    }

    /// `after` from when it is first waited on.
    pub fn after(after: Duration) -> Self {
        Self {
            when: When::After(after),
            entry: None,
        }
    }
}

/// `at` plus `by`; a time too far to say is one never reached.
pub fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 86_400))
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match &this.entry {
            Some(entry) => {
                if entry.fired.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                entry.waker.register(cx.waker());
                // Fired between the check and the registration: its wake
                // went to the waker before.
                if entry.fired.load(Ordering::Acquire) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
            None => {
                let at = match this.when {
                    When::At(at) if Instant::now() >= at => return Poll::Ready(()),
                    When::At(at) => at,
                    When::After(after) if after.is_zero() => return Poll::Ready(()),
                    When::After(after) => later(Instant::now(), after),
                };
                let entry = Arc::new(Entry {
                    at,
                    waker: AtomicWaker::new(),
                    fired: AtomicBool::new(false),
                });
                entry.waker.register(cx.waker());
                timers().add(entry.clone());
                this.entry = Some(entry);
                Poll::Pending
            }
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // The entry stays listed until the next sweep: without the waker,
        // it keeps no task alive meanwhile.
        if let Some(entry) = &self.entry {
            entry.waker.take();
        }
    }
}

impl hyper::rt::Sleep for Deadline {}

/// hyper's timer, on [`Deadline`]s: for the server's header read timeout,
/// which is set for every request and met by all but a slowloris.
#[derive(Debug, Clone, Copy, Default)]
pub struct Coarse;

impl hyper::rt::Timer for Coarse {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::after(duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::at(deadline))
    }
}

/// `future`, unless `at` passes first.
pub fn timeout_at<F: Future>(at: Instant, future: F) -> Timeout<F> {
    Timeout {
        future,
        deadline: Deadline::at(at),
    }
}

/// `future`, unless `after` passes first.
pub fn timeout<F: Future>(after: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        deadline: Deadline::after(after),
    }
}

/// The deadline passed before the future was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// See [`timeout_at`]. The future is polled first: one ready at once
    /// never waits on its deadline.
    #[derive(Debug)]
    pub struct Timeout<F> {
        #[pin]
        future: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(this.deadline).poll(cx).map(|()| Err(Elapsed))
    }
}

/// The list of deadlines waited on, and its thread.
struct Timers {
    /// The forks between the first process and the one this serves: a
    /// forked child has no timer thread until it makes one.
    generation: u64,
    list: Mutex<List>,
    wake: Condvar,
}

struct List {
    entries: Vec<Arc<Entry>>,
    /// The earliest deadline the thread knows of; None while none waits.
    next: Option<Instant>,
    /// The list's length after the last sweep.
    swept: usize,
    /// Whether a sweep was asked for since.
    sweep: bool,
}

static TIMERS: AtomicPtr<Timers> = AtomicPtr::new(std::ptr::null_mut());

/// This process's timers, with their thread started on first use.
fn timers() -> &'static Timers {
    let generation = crate::fork::generation();
    let current = TIMERS.load(Ordering::Acquire);
    // SAFETY: TIMERS only ever holds null or a leaked, never freed `Timers`.
    match unsafe { current.as_ref() } {
        Some(timers) if timers.generation == generation => timers,
        _ => start(current, generation),
    }
}

#[cold]
fn start(seen: *mut Timers, generation: u64) -> &'static Timers {
    let timers: &'static Timers = Box::leak(Box::new(Timers {
        generation,
        list: Mutex::new(List {
            entries: Vec::new(),
            next: None,
            swept: 0,
            sweep: false,
        }),
        wake: Condvar::new(),
    }));
    let fresh = std::ptr::from_ref(timers).cast_mut();
    match TIMERS.compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            std::thread::Builder::new()
                .name("keyfailover-timer".into())
                .spawn(move || timers.run())
                .expect("cannot start keyfailover's timer thread");
            timers
        }
        // Another thread started them first (the one left here is a few
        // bytes, leaked once).
        Err(_) => self::timers(),
    }
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, List> {
        // Nothing panics while holding it; should something, the list is
        // still whole.
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, entry: Arc<Entry>) {
        let at = entry.at;
        let mut list = self.lock();
        list.entries.push(entry);
        let earlier = list.next.is_none_or(|next| at < next);
        if earlier {
            list.next = Some(at);
        }
        let full = !list.sweep && list.entries.len() >= list.swept + SWEEP_BATCH;
        if full {
            list.sweep = true;
        }
        drop(list);
        if earlier || full {
            self.wake.notify_one();
        }
    }

    fn run(&self) {
        // Kept between sweeps for its capacity.
        let mut spare: Vec<Arc<Entry>> = Vec::new();
        let mut fired: Vec<Arc<Entry>> = Vec::new();
        let mut list = self.lock();
        loop {
            let now = Instant::now();
            let due = list.next.is_some_and(|next| now >= next);
            if !(due || list.sweep) {
                list = match list.next {
                    None => self.wake.wait(list).unwrap_or_else(PoisonError::into_inner),
                    Some(next) => match self.wake.wait_timeout(list, next - now) {
                        Ok((list, _)) => list,
                        Err(poisoned) => poisoned.into_inner().0,
                    },
                };
                continue;
            }
            // Swept with the lock let go: deadlines added meanwhile go on
            // the fresh list, and lower `next` if earlier.
            let mut entries = std::mem::replace(&mut list.entries, std::mem::take(&mut spare));
            list.next = None;
            list.sweep = false;
            drop(list);
            let mut next: Option<Instant> = None;
            entries.retain(|entry| {
                if Arc::strong_count(entry) == 1 {
                    // No one waits for it any more.
                    false
                } else if entry.at <= now {
                    fired.push(entry.clone());
                    false
                } else {
                    next = Some(next.map_or(entry.at, |next| next.min(entry.at)));
                    true
                }
            });
            for entry in fired.drain(..) {
                entry.fired.store(true, Ordering::Release);
                entry.waker.wake();
            }
            list = self.lock();
            list.next = match (list.next, next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            spare = std::mem::replace(&mut list.entries, entries);
            list.entries.append(&mut spare);
            list.swept = list.entries.len();
        }
    }
}

#[cfg(test)]
fn held() -> usize {
    timers().lock().entries.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_deadline_fires_when_it_passes_and_not_before() {
        runtime().block_on(async {
            let started = Instant::now();
            Deadline::after(Duration::from_millis(80)).await;
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(80), "{took:?}");
            assert!(took < Duration::from_millis(500), "{took:?}");
            // One already past is ready at once, with nothing to register.
            let past = Deadline::at(Instant::now() - Duration::from_millis(1));
            let started = Instant::now();
            past.await;
            assert!(started.elapsed() < Duration::from_millis(50));
        });
    }

    #[test]
    fn deadlines_added_in_any_order_each_fire_on_time() {
        runtime().block_on(async {
            let started = Instant::now();
            // A far one waited on first: each earlier one added after must
            // wake the thread, which would otherwise sleep until the far one.
            let mut far = Deadline::after(Duration::from_secs(3600));
            let waker = futures_util::task::noop_waker();
            assert!(Pin::new(&mut far)
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            let mut waits = Vec::new();
            for ms in [240u64, 40, 160, 80, 200, 120] {
                waits.push(tokio::spawn(async move {
                    Deadline::after(Duration::from_millis(ms)).await;
                    (ms, started.elapsed())
                }));
            }
            for wait in waits {
                let (ms, took) = wait.await.unwrap();
                assert!(took >= Duration::from_millis(ms), "{ms} ms: {took:?}");
                assert!(
                    took < Duration::from_millis(ms + 300),
                    "{ms} ms: fired late, {took:?}"
                );
            }
            drop(far);
        });
    }

    #[test]
    fn timeout_gives_the_output_or_elapsed() {
        runtime().block_on(async {
            let ready = timeout(Duration::from_secs(5), async { 7 }).await;
            assert_eq!(ready, Ok(7));
            let started = Instant::now();
            let late = timeout(Duration::from_millis(60), std::future::pending::<()>()).await;
            assert_eq!(late, Err(Elapsed));
            assert!(started.elapsed() >= Duration::from_millis(60));
            let slow = timeout_at(
                Instant::now() + Duration::from_secs(5),
                tokio::time::sleep(Duration::from_millis(30)),
            )
            .await;
            assert_eq!(slow, Ok(()));
        });
    }

    #[test]
    fn deadlines_no_longer_waited_for_are_let_go() {
        runtime().block_on(async {
            for _ in 0..(4 * SWEEP_BATCH) {
                // Waited on once (so listed), then dropped unmet.
                let mut deadline = Deadline::after(Duration::from_secs(3600));
                let waker = futures_util::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                assert!(Pin::new(&mut deadline).poll(&mut cx).is_pending());
            }
            let started = Instant::now();
            while held() > 2 * SWEEP_BATCH {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{} held",
                    held()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    #[test]
    fn a_deadline_waited_on_from_another_task_wakes_that_one() {
        runtime().block_on(async {
            let deadline = Deadline::after(Duration::from_millis(50));
            let mut first = Box::pin(deadline);
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(first.as_mut().poll(&mut cx).is_pending());
            // Moved to a task: its waker replaces the first.
            let started = Instant::now();
            tokio::spawn(first).await.unwrap();
            assert!(started.elapsed() < Duration::from_millis(500));
        });
    }
}
