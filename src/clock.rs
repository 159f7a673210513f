//! Clocks for cooldowns: the system's monotonic clock for real use and a
//! manual one for tests.
//!
//! Time is a count of nanoseconds. The pool only ever compares and subtracts
//! these values. The real clock reads `CLOCK_MONOTONIC` itself (what
//! `Instant` reads too), so its readings mean the same in every process of a
//! host: a cooldown deadline written to shared memory by one process is read
//! correctly by another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A source of monotonic time.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since the clock's origin; never goes backwards.
    fn now_nanos(&self) -> u64;

    /// True for the real clock, whose readings other processes share.
    fn is_system(&self) -> bool {
        false
    }
}

/// The system's monotonic clock, in nanoseconds since boot (never zero).
pub fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let nanos = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    nanos.max(1)
}

/// The system's monotonic clock as of its last tick (a few milliseconds
/// coarse), in nanoseconds since boot: about a quarter of a precise
/// reading's cost, for times kept in seconds (idle connections).
pub fn coarse_monotonic_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = libc::CLOCK_MONOTONIC_COARSE;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let id = libc::CLOCK_MONOTONIC;
    // SAFETY: a valid timespec and a clock that exists.
    unsafe { libc::clock_gettime(id, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The default clock: the system's monotonic clock, so wall-clock jumps
/// never touch a cooldown.
#[derive(Debug, Default)]
pub struct MonotonicClock;

impl MonotonicClock {
    pub fn new() -> Self {
        Self
    }
}

impl Clock for MonotonicClock {
    fn now_nanos(&self) -> u64 {
        monotonic_nanos()
    }

    fn is_system(&self) -> bool {
        true
    }
}

/// A clock that only moves when told to, for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Duration) -> Arc<Self> {
        Arc::new(Self {
            nanos: AtomicU64::new(duration_to_nanos(start)),
        })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = duration_to_nanos(by);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }

    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }
}

impl Clock for ManualClock {
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::Acquire)
    }
}

pub(crate) fn duration_to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(Duration::from_secs(5));
        assert_eq!(clock.now(), Duration::from_secs(5));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), Duration::from_millis(6500));
        clock.advance(Duration::MAX);
        assert_eq!(clock.now_nanos(), u64::MAX);
    }

    #[test]
    fn the_coarse_clock_is_the_precise_one_to_a_tick() {
        let coarse = coarse_monotonic_nanos();
        let precise = monotonic_nanos();
        // Read after it, the precise clock is no earlier, and a tick (at
        // most 10 ms, at 100 Hz) at the most later.
        assert!(precise >= coarse, "{precise} < {coarse}");
        assert!(precise - coarse < 20_000_000, "{precise} - {coarse}");
    }

    #[test]
    fn monotonic_clock_never_goes_backwards() {
        let clock = MonotonicClock::new();
        let a = clock.now_nanos();
        let b = clock.now_nanos();
        assert!(b >= a);
    }
}
