//! Where key states live: in this process (`local`), in a file every process
//! of the host maps (`shm`), or in Redis for every host (`redis`). The pool
//! asks its backend for each key's state word and tells it about marks; it
//! never knows which backend it has.
//!
//! Keys are known across processes by a fingerprint of the namespace and the
//! key's value, never by the value or its position.

pub mod redis;
pub mod shm;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::clock::monotonic_nanos;
use crate::error::{Error, Result};
use crate::metrics::{Block, KeyCounters, PoolCounters, KEY_COUNTERS, POOL_COUNTERS};
use crate::pool::cell::{Cell, Word};

/// How often a Redis-backed pool re-reads every key's state.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

/// Which backend a pool uses, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSpec {
    Local,
    Shm { namespace: String },
    Redis { url: String, namespace: String },
}

impl StateSpec {
    /// From the `state` and `namespace` settings: None (local), `"shm"`, or
    /// a `redis://`, `rediss://` or `unix://` URL.
    pub fn parse(state: Option<&str>, namespace: &str) -> Result<Self> {
        if namespace.is_empty()
            || namespace
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Error::Config(format!(
                "namespace {:?} must be a non-empty name without spaces",
                crate::target::masked_words(namespace)
            )));
        }
        let namespace = namespace.to_owned();
        match state {
            None | Some("local") => Ok(StateSpec::Local),
            Some("shm") => Ok(StateSpec::Shm { namespace }),
            Some(url)
                if ["redis://", "rediss://", "unix://", "redis+unix://"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme)) =>
            {
                Ok(StateSpec::Redis {
                    url: url.to_owned(),
                    namespace,
                })
            }
            Some(_) => Err(Error::Config(
                "state must be None, \"shm\", or a redis://, rediss:// or unix:// URL".into(),
            )),
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self, StateSpec::Local)
    }
}

/// A key's identity across processes: the first 16 bytes of
/// SHA-256("keyfailover\0" namespace "\0" value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    pub fn of(namespace: &str, value: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"keyfailover\0");
        hasher.update(namespace.as_bytes());
        hasher.update(b"\0");
        hasher.update(value.as_bytes());
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(bytes)
    }

    /// The first 8 bytes as a non-zero number (the shared memory table's key).
    pub fn short(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")).max(1)
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Self(bytes))
    }
}

/// How a pool's sharing goes (`pool.sync_status()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStatus {
    pub backend: &'static str,
    /// Local and shm are always "connected".
    pub connected: bool,
    /// The last connection error (passwords masked), if any.
    pub last_error: Option<String>,
    /// Transitions not yet written to the shared state.
    pub pending: usize,
}

impl SyncStatus {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend,
            "connected": self.connected,
            "last_error": self.last_error,
            "pending": self.pending,
        })
    }
}

/// The wall clock (Unix µs) and the monotonic clock (ns), read together.
pub(crate) fn clocks() -> (u64, u64) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    (wall, monotonic_nanos())
}

/// A pool's backend.
pub(crate) enum Backend {
    Local,
    Shm(Arc<shm::Region>),
    Redis(Arc<redis::RedisHandle>),
}

/// Open shm regions of this process, by namespace, so pools of one
/// namespace share one mapping.
static REGIONS: Mutex<Vec<(String, std::sync::Weak<shm::Region>)>> = Mutex::new(Vec::new());

/// In a forked child: each shared mapping holds its slots on a file
/// description of the child's own from now on (see `shm::Region`), before
/// the parent can let go of one the child still uses.
pub fn after_fork() {
    let regions: Vec<Arc<shm::Region>> = REGIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|(_, r)| r.upgrade())
        .collect();
    for region in regions {
        region.own_holds();
    }
}

impl Backend {
    /// Opens the backend for `spec`; a Redis backend's task starts on
    /// `runtime` (required for Redis).
    pub fn open(spec: &StateSpec, runtime: Option<&tokio::runtime::Handle>) -> Result<Self> {
        Ok(match spec {
            StateSpec::Local => Backend::Local,
            StateSpec::Shm { namespace } => {
                let mut regions = REGIONS.lock().unwrap_or_else(|e| e.into_inner());
                regions.retain(|(_, r)| r.strong_count() > 0);
                let found = regions
                    .iter()
                    .find(|(ns, _)| ns == namespace)
                    .and_then(|(_, r)| r.upgrade());
                let region = match found {
                    Some(region) => region,
                    None => {
                        let region = Arc::new(shm::Region::open(namespace)?);
                        regions.push((namespace.clone(), Arc::downgrade(&region)));
                        region
                    }
                };
                Backend::Shm(region)
            }
            StateSpec::Redis { url, namespace } => {
                let runtime = runtime.ok_or_else(|| {
                    Error::Config("a Redis state backend needs a tokio runtime".into())
                })?;
                Backend::Redis(redis::RedisHandle::open(url, namespace, runtime)?)
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Shm(_) => "shm",
            Backend::Redis(_) => "redis",
        }
    }

    /// The cell of a key: a fresh local word, or the key's word in shared
    /// memory; Redis-backed cells start local and follow the shared state.
    pub fn cell(&self, fingerprint: Fingerprint) -> Result<Arc<Cell>> {
        let local = || Cell::local(KeyCounters(Block::local(KEY_COUNTERS)));
        Ok(match self {
            Backend::Local => Arc::new(local()),
            Backend::Shm(region) => {
                // The slot's hold keeps the mapping alive, and the slot this
                // key's while the cell lives.
                let slot = region.slot(fingerprint.short())?;
                Arc::new(Cell::new(
                    Word::Shared {
                        ptr: slot.word,
                        _owner: slot.hold.clone(),
                    },
                    Word::Shared {
                        ptr: slot.unreachable_until,
                        _owner: slot.hold.clone(),
                    },
                    KeyCounters(Block::Shared {
                        ptr: slot.counters,
                        len: KEY_COUNTERS.min(shm::KEY_ROOM),
                        _owner: slot.hold,
                    }),
                ))
            }
            Backend::Redis(handle) => {
                let cell = Arc::new(local());
                handle.0.register(fingerprint, &cell);
                cell
            }
        })
    }

    /// The counters of the pool named `name`: with shm, those of the pools
    /// of that name in every process of the host (this process's own when
    /// the namespace has no room for another name); this process's own
    /// otherwise.
    pub fn pool_counters(&self, name: &str) -> PoolCounters {
        match self {
            Backend::Shm(region) => match region.pool_counters(name) {
                Some(ptr) => PoolCounters(Block::Shared {
                    ptr,
                    len: POOL_COUNTERS,
                    _owner: region.clone(),
                }),
                None => PoolCounters(Block::local(POOL_COUNTERS)),
            },
            _ => PoolCounters(Block::local(POOL_COUNTERS)),
        }
    }

    pub fn status(&self) -> SyncStatus {
        match self {
            Backend::Redis(handle) => handle.0.status(),
            other => SyncStatus {
                backend: other.name(),
                connected: true,
                last_error: None,
                pending: 0,
            },
        }
    }

    pub fn redis(&self) -> Option<&redis::RedisSync> {
        match self {
            Backend::Redis(handle) => Some(&handle.0),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(StateSpec::parse(None, "default").unwrap(), StateSpec::Local);
        assert_eq!(
            StateSpec::parse(Some("shm"), "team").unwrap(),
            StateSpec::Shm {
                namespace: "team".into()
            }
        );
        assert!(matches!(
            StateSpec::parse(Some("rediss://h:6380/1"), "n").unwrap(),
            StateSpec::Redis { .. }
        ));
        assert!(StateSpec::parse(Some("memcached://x"), "n").is_err());
        assert!(StateSpec::parse(Some("shm"), "").is_err());
        assert!(StateSpec::parse(Some("shm"), "a b").is_err());
    }

    #[test]
    fn fingerprints_hide_the_key_and_separate_namespaces() {
        let a = Fingerprint::of("one", "sk-ant-secret-value-1234");
        assert_eq!(a, Fingerprint::of("one", "sk-ant-secret-value-1234"));
        assert_ne!(a, Fingerprint::of("two", "sk-ant-secret-value-1234"));
        assert_eq!(Fingerprint::from_hex(&a.hex()), Some(a));
        assert_eq!(a.hex().len(), 32);
        assert!(Fingerprint::from_hex("zz").is_none());
        assert_ne!(a.short(), 0);
    }
}
