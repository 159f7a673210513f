//! Process forks. A forked child inherits the parent's memory but not its
//! threads: the tokio runtime's workers and the connections they served are
//! gone. Whoever forks (the bindings hook Python's `os.register_at_fork`)
//! calls [`forked`] in the child; whatever holds threads or connections
//! compares [`generation`] with the one it was built in and rebuilds.

use std::sync::atomic::{AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many forks lie between this process and the first one.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Called in a child right after a fork.
pub fn forked() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}
