//! One key's state: a single atomic word, in this process's memory or in a
//! memory-mapped file shared by every process on the host.
//!
//! * `0`: valid;
//! * `u64::MAX`: permanent;
//! * anything else: the clock reading (nanoseconds of the system's monotonic
//!   clock, the same in every process of a host) at which the cooldown ends.
//!   Once the clock reaches it the key is valid again, with no write needed.
//!
//! So a state and its remaining cooldown are always read together (no torn
//! reads) and marking is a compare-and-swap loop: the later deadline wins,
//! and permanent wins over temporary.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::KeyCounters;

pub(crate) const VALID: u64 = 0;
pub(crate) const PERMANENT: u64 = u64::MAX;

/// The three states of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    Valid,
    Temporary,
    Permanent,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Valid => "valid",
            KeyState::Temporary => "temporary",
            KeyState::Permanent => "permanent",
        }
    }
}

/// A key's state with its remaining cooldown (zero unless temporary), read at
/// one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStatus {
    pub state: KeyState,
    pub cooldown_remaining: Duration,
}

/// Where a key's state word lives.
pub(crate) enum Word {
    Local(AtomicU64),
    /// A word in a shared mapping, kept alive by `owner`.
    Shared {
        ptr: NonNull<AtomicU64>,
        _owner: Arc<dyn std::any::Any + Send + Sync>,
    },
}

// SAFETY: a shared word is an AtomicU64 in a mapping that its owner keeps
// alive for as long as the word exists; atomics are Sync.
unsafe impl Send for Word {}
unsafe impl Sync for Word {}

impl Word {
    /// A word in this process's memory, valid (zero).
    pub fn local() -> Self {
        Word::Local(AtomicU64::new(VALID))
    }
}

impl std::ops::Deref for Word {
    type Target = AtomicU64;

    fn deref(&self) -> &AtomicU64 {
        match self {
            Word::Local(word) => word,
            // SAFETY: see above.
            Word::Shared { ptr, .. } => unsafe { ptr.as_ref() },
        }
    }
}

/// What a mark did to the word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marked {
    /// Nothing: the key was already permanent, or cooling down for longer.
    Unchanged,
    /// The cooldown was extended: still temporary, a later deadline.
    Extended,
    /// The key changed state (valid to temporary, or to permanent).
    Transition,
}

impl Marked {
    pub fn changed(self) -> bool {
        self != Marked::Unchanged
    }
}

/// A key's state and what goes with it across reloads and processes.
pub(crate) struct Cell {
    pub word: Word,
    /// For shared state across hosts: the wall-clock time (Unix µs) of the
    /// last reset this process knows of. Marks made before it are stale.
    pub reset_at: AtomicU64,
    pub counters: KeyCounters,
    /// Requests using the key right now (this process's).
    in_flight: AtomicU32,
    /// The latest deadline set because the key's own endpoint could not be
    /// reached, beside the state word (in shared memory with it, with shm):
    /// while the word holds no later deadline, that is why the key cools
    /// down. A reset clears it; a later mark for another reason (a rate
    /// limit, here or in another process) writes a later deadline and so
    /// ends it. Never later than the word, except for an instant while a
    /// mark is made.
    unreachable_until: Word,
}

impl Cell {
    /// A cell in this process's memory.
    pub fn local(counters: KeyCounters) -> Self {
        Self::new(Word::local(), Word::local(), counters)
    }

    /// `word` and `unreachable_until` in the same memory, with their owner.
    pub fn new(word: Word, unreachable_until: Word, counters: KeyCounters) -> Self {
        Self {
            word,
            reset_at: AtomicU64::new(0),
            counters,
            in_flight: AtomicU32::new(0),
            unreachable_until,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn headroom(&self) -> f64 {
        // The word of an available key: VALID, or the end of its latest
        // cooldown (kept until the next mark).
        let cooled_until = self.word.load(Ordering::Acquire);
        self.counters.headroom(self.in_flight(), cooled_until)
    }

    pub fn status(&self, now: u64) -> KeyStatus {
        status_of(self.word.load(Ordering::Acquire), now)
    }

    /// The status, and whether the key cools down because its endpoint was
    /// unreachable: the latest cooldown set was for that, whichever process
    /// of the host (shm) or host (Redis) set it.
    pub fn status_and_unreachable(&self, now: u64) -> (KeyStatus, bool) {
        let word = self.word.load(Ordering::Acquire);
        let status = status_of(word, now);
        let unreachable = status.state == KeyState::Temporary
            && word <= self.unreachable_until.load(Ordering::Acquire);
        (status, unreachable)
    }

    /// Cools the key down until `deadline` because its endpoint could not be
    /// reached: as [`cool_until`](Self::cool_until), recording the reason
    /// first, so that whoever reads the new deadline also reads why.
    pub fn cool_unreachable_until(&self, deadline: u64, now: u64) -> Marked {
        self.unreachable_until.fetch_max(deadline, Ordering::AcqRel);
        self.cool_until(deadline, now)
    }

    pub fn is_available(&self, now: impl FnOnce() -> u64) -> bool {
        match self.word.load(Ordering::Acquire) {
            VALID => true,
            PERMANENT => false,
            deadline => now() >= deadline,
        }
    }

    /// Cools the key down until `deadline` (a clock reading, not VALID or
    /// PERMANENT), unless it is permanent or cooling down for longer.
    pub fn cool_until(&self, deadline: u64, now: u64) -> Marked {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            if current == PERMANENT {
                return Marked::Unchanged;
            }
            let was_valid = current <= now;
            if !was_valid && current >= deadline {
                return Marked::Unchanged;
            }
            match self.word.compare_exchange_weak(
                current,
                deadline,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) if was_valid => return Marked::Transition,
                Ok(_) => return Marked::Extended,
                Err(actual) => current = actual,
            }
        }
    }

    /// Retires the key; a transition only the first time.
    pub fn retire(&self) -> Marked {
        if self.word.swap(PERMANENT, Ordering::AcqRel) == PERMANENT {
            Marked::Unchanged
        } else {
            Marked::Transition
        }
    }

    /// Valid again, whatever the state; true when it was not valid.
    pub fn reset(&self, now: u64) -> bool {
        let before = self.word.swap(VALID, Ordering::AcqRel);
        self.unreachable_until.store(VALID, Ordering::Release);
        before == PERMANENT || before > now
    }

    /// Takes a state word from elsewhere as it is (a reset this process had
    /// not seen came with it), and the reason of its cooldown.
    pub fn replace(&self, word: u64, unreachable: bool) {
        let until = if unreachable { word } else { VALID };
        self.unreachable_until.store(until, Ordering::Release);
        self.word.store(word, Ordering::Release);
    }
}

pub(crate) fn status_of(word: u64, now: u64) -> KeyStatus {
    let (state, left) = match word {
        VALID => (KeyState::Valid, 0),
        PERMANENT => (KeyState::Permanent, 0),
        deadline if deadline > now => (KeyState::Temporary, deadline - now),
        _ => (KeyState::Valid, 0),
    };
    KeyStatus {
        state,
        cooldown_remaining: Duration::from_nanos(left),
    }
}

/// A request using a key: counted in the key's in-flight count from the
/// attempt's start to the end of its response body.
pub struct InFlight(Arc<Cell>);

impl InFlight {
    pub(crate) fn new(cell: Arc<Cell>) -> Self {
        cell.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(cell)
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
