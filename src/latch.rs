//! A one-way flag that async code can wait for: a client's shutdown, a
//! response body's close.
//!
//! On the request path, where tokio-util's `CancellationToken` would take a
//! mutex for every clone, drop and check (shared by every worker thread of a
//! server), a [`Latch`] costs an atomic: only a wait that actually sleeps
//! registers with the [`Notify`], as with the token.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use tokio::sync::Notify;

/// Cloned handles share one flag; see the module.
#[derive(Clone, Debug, Default)]
pub struct Latch(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    set: AtomicBool,
    notify: Notify,
}

impl Latch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the flag and wakes every wait; later waits end at once.
    pub fn set(&self) {
        self.0.set.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    /// Ends once the flag is set. Cancel safe.
    pub async fn wait(&self) {
        loop {
            // Created before the check: a `notify_waiters` after this point
            // completes it, even before its first poll.
            let notified = self.0.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// Runs `fut` until it ends (Some) or the flag is set first (None);
    /// `fut` first, like a biased `select!`. Unlike a `select!` on
    /// [`Latch::wait`], a wait that sleeps registers once, not on every
    /// wake of the task: a connection or request polled many times pays one
    /// atomic load each time.
    pub async fn guard<F: Future>(&self, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let mut wait = pin!(self.wait());
        // The waker the wait is registered with, while it is.
        let mut registered: Option<Waker> = None;
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            match &registered {
                Some(waker) if waker.will_wake(cx.waker()) => {
                    if self.is_set() {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    }
                }
                // First sleep, or polled from another task: (re)register.
                _ => match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(None),
                    Poll::Pending => {
                        registered = Some(cx.waker().clone());
                        Poll::Pending
                    }
                },
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_wait_ends_when_the_flag_is_set_and_not_before() {
        let latch = Latch::new();
        assert!(!latch.is_set());
        let waiting = tokio::spawn({
            let latch = latch.clone();
            async move { latch.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        latch.set();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(latch.is_set());
        // Once set, a wait ends at once.
        tokio::time::timeout(Duration::from_millis(100), latch.wait())
            .await
            .expect("set already");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_wait_ends_when_set_races_with_them() {
        for _ in 0..50 {
            let latch = Latch::new();
            let waits: Vec<_> = (0..20)
                .map(|_| {
                    let latch = latch.clone();
                    tokio::spawn(async move { latch.wait().await })
                })
                .collect();
            tokio::task::yield_now().await;
            latch.set();
            for wait in waits {
                tokio::time::timeout(Duration::from_secs(5), wait)
                    .await
                    .expect("no wait is lost")
                    .unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_guard_gives_the_result_or_none_once_set() {
        let latch = Latch::new();
        assert_eq!(latch.guard(async { 7 }).await, Some(7));
        // A future that sleeps is ended by the flag, however often its task
        // is woken in between.
        let guarded = tokio::spawn({
            let latch = latch.clone();
            async move {
                latch
                    .guard(async {
                        loop {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!guarded.is_finished());
        latch.set();
        let out: Option<()> = tokio::time::timeout(Duration::from_secs(5), guarded)
            .await
            .expect("ended by the flag")
            .unwrap();
        assert_eq!(out, None);
        // Set already: the future still goes first.
        assert_eq!(latch.guard(async { 1 }).await, Some(1));
        assert_eq!(latch.guard(std::future::pending::<()>()).await, None);
    }

    #[tokio::test]
    async fn a_guard_polled_from_another_task_registers_again() {
        let latch = Latch::new();
        let mut guarded = Box::pin({
            let latch = latch.clone();
            async move { latch.guard(std::future::pending::<()>()).await }
        });
        // Polled once here, then moved to a task that waits on it.
        assert!(futures_util::poll!(guarded.as_mut()).is_pending());
        let task = tokio::spawn(guarded);
        tokio::task::yield_now().await;
        latch.set();
        let out = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the new task is woken")
            .unwrap();
        assert_eq!(out, None);
    }
}
