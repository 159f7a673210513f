//! A walk through the pool for one request.

use std::sync::Arc;

use super::{exhaustion_of, Key, KeyPool, KeySet};
use crate::error::Exhaustion;

/// A key-specific cursor through the pool for one request. Read-only: it
/// never changes any key's state, so concurrent requests never interfere.
/// It walks the key list as it was when the walk began, even if the pool is
/// reloaded meanwhile.
///
/// It offers each key at most once: first every available key in order from
/// where the pool's strategy starts it (wrapping around), then any key it
/// skipped as unavailable that has since recovered (a short cooldown may end
/// while the walk is still going).
#[derive(Clone)]
pub struct Walker {
    pool: KeyPool,
    keys: Arc<KeySet>,
    /// Where the walk began (the pool's strategy chose it).
    start: usize,
    /// How many keys the first pass has looked at.
    pos: usize,
    /// Keys passed over as unavailable, in order; empty on the usual path.
    skipped: Vec<usize>,
}

impl std::fmt::Debug for Walker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walker").field("pos", &self.pos).finish()
    }
}

impl Walker {
    pub(crate) fn new(pool: KeyPool, keys: Arc<KeySet>) -> Self {
        let start = pool.start(&keys);
        Self {
            pool,
            keys,
            start,
            pos: 0,
            skipped: Vec::new(),
        }
    }

    fn available(&self, index: usize) -> bool {
        self.keys.slots[index]
            .cell
            .is_available(|| self.pool.clock().now_nanos())
    }

    fn key(&self, index: usize) -> Key {
        Key::new(self.pool.clone(), self.keys.slots[index].clone())
    }

    /// The next available key the walker has not offered yet.
    pub fn next_key(&mut self) -> Result<Key, Exhaustion> {
        let n = self.keys.slots.len();
        while self.pos < n {
            let index = (self.start + self.pos) % n;
            self.pos += 1;
            if self.available(index) {
                return Ok(self.key(index));
            }
            self.skipped.push(index);
        }
        if let Some(i) = self.skipped.iter().position(|&k| self.available(k)) {
            let index = self.skipped.remove(i);
            return Ok(self.key(index));
        }
        Err(exhaustion_of(&self.keys, self.pool.clock().now_nanos()))
    }
}
