//! Hot-path cost of the key pool: `cargo bench --bench pool`.
//!
//! Plain timing loops (no harness): each figure is ns per operation, best of
//! five runs, printed side by side so they can be compared as ratios.

use std::hint::black_box;
use std::time::{Duration, Instant};

use keyfailover::pool::{Cooldowns, KeyPool};

fn best_ns_per_op(iterations: u32, mut op: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                op();
            }
            start.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let iterations = if smoke { 10_000 } else { 2_000_000 };
    let keys = (0..4).map(|i| format!("sk-bench-key-{i:04}-abcdefghijklmnop"));
    let pool = KeyPool::from_keys(keys, Cooldowns::default(), None).expect("valid keys");
    let cooldown = Some(Duration::from_secs(60));

    let next = best_ns_per_op(iterations, || {
        let mut walker = pool.walker();
        black_box(walker.next_key().ok());
    });
    let next_mark = best_ns_per_op(iterations, || {
        let mut walker = pool.walker();
        let key = walker.next_key().expect("a valid key");
        black_box(key.mark_temporary(cooldown));
        key.reset();
    });
    // The first two keys cooling down: the walker skips them.
    pool.key("key-0").unwrap().mark_temporary(cooldown);
    pool.key("key-1").unwrap().mark_permanent();
    let skip = best_ns_per_op(iterations, || {
        let mut walker = pool.walker();
        black_box(walker.next_key().ok());
    });
    for (name, ns) in [
        ("walker()+next()", next),
        ("walker()+next()+mark_temporary()+reset()", next_mark),
        ("walker()+next(), skipping 2 keys", skip),
    ] {
        println!("{name:44} {ns:8.1} ns/op");
    }
}
