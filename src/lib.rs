//! keyfailover: API-key failover for LLM provider APIs.
//!
//! The core is plain Rust: [`pool`] holds the keys and their states,
//! [`retry_after`] reads cooldown hints, [`verdict`] turns a response into a
//! key verdict. The PyO3 bindings live in `python/` behind the `python`
//! feature, which maturin enables.

pub mod alloc;
pub mod body;
pub mod clock;
pub mod error;
pub mod events;
pub mod failover;
pub mod fork;
pub mod gateway;
pub mod headers;
pub mod keyfile;
pub mod latch;
pub mod metrics;
pub mod pool;
pub mod provider;
pub mod ratelimit;
pub mod retry_after;
pub mod server;
pub mod sse;
pub mod state;
pub mod stats;
pub mod target;
pub mod timer;
mod upstream;
pub mod verdict;

#[cfg(feature = "python")]
mod python;

/// The extension's own allocations (a proxied request makes dozens: header
/// maps, buffers, futures) go to mimalloc rather than the C library's malloc
/// (3-6% less CPU per request on the native server, A/B, alternating
/// rounds), through [`alloc::MiMalloc`].
/// Built without transparent huge pages, which would add 25 MB to a server
/// holding 1,000 streams (without them the cost is 1-2 MB), and with the
/// local-dynamic TLS model, which a library loaded by `dlopen` (as Python
/// loads an extension) can always get, unlike initial-exec TLS.
#[cfg(feature = "python")]
#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

pub use error::{Error, ErrorKind, Exhaustion};
