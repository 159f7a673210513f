//! Key states shared by every process on one host: a memory-mapped file in
//! `/dev/shm` (mode 0600), one per user and namespace, holding a table of
//! slots found by key fingerprint. A key's state is the same single atomic
//! word as in a private pool, only in shared memory, so marking costs the
//! same; deadlines are readings of the system's monotonic clock, which every
//! process of the host shares.
//!
//! Layout (version 1), all little-endian u64:
//!
//! ```text
//! 0        magic "KFSTATE\x01", version, capacity, slot size; at 64, the
//!          pool counters of versions before pools had blocks of their own
//!          (unused now); at 512, a table of pools by name: a fingerprint of
//!          the name (0 = free), then that pool's counters (metrics)
//! HEADER   slot 0: fingerprint (0 = free), state word, the key's counters;
//!          in its last word, the latest cooldown deadline set because the
//!          key's own endpoint was unreachable (0: none)
//!          slot 1 ...
//! ```
//!
//! The file holds fingerprints and states only, never a key or part of one.
//!
//! A slot keeps its key's state while no process uses the key (a restart
//! finds it), but not for good: a key that no process holds any more (keys
//! rotated out) leaves its slot to be taken over when the table is full.
//! Each process holds a read lock (an open file description lock, which a
//! killed process loses with its descriptors) on the first byte of every
//! slot one of its pools uses; a process that finds the table full takes the
//! first slot on its key's path that nobody holds. Claims are serialized by
//! an exclusive `flock` on the file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::MmapMut;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const MAGIC: u64 = u64::from_le_bytes(*b"KFSTATE\x01");
const VERSION: u64 = 1;
/// Keys one namespace can hold.
pub const CAPACITY: u64 = 1024;
/// Room after the header fields, for counters shared by the whole host.
const HEADER: usize = 64 * 1024;
/// Bytes a key's slot takes: its fingerprint, its state word, and room for
/// per-key counters.
const SLOT: usize = 512;
/// Counters a key's slot has room for, between its fingerprint and state
/// word and its last word.
pub const KEY_ROOM: usize = SLOT / 8 - 3;
const _: () = assert!(crate::metrics::KEY_COUNTERS <= KEY_ROOM);
/// Where the table of pools starts (in words): after the fields and the
/// one block of pool counters earlier versions use.
const POOLS_AT: usize = 64;
/// Words a pool's entry takes: its name's fingerprint, then its counters.
const POOL_ENTRY: usize = 1 + crate::metrics::POOL_COUNTERS;
/// Pools of different names one namespace can count apart.
pub const POOL_CAPACITY: usize = (HEADER / 8 - POOLS_AT) / POOL_ENTRY;
const _: () = assert!(POOL_CAPACITY >= 64);
const SIZE: usize = HEADER + SLOT * CAPACITY as usize;

/// One namespace's shared mapping.
pub struct Region {
    map: MmapMut,
    path: PathBuf,
    holds: Mutex<Holds>,
}

/// The slots this process holds, through an open file description of its
/// own (a forked child opens the file again: the description it inherited
/// is its parent's too, and a lock released there would be released for
/// both).
struct Holds {
    generation: u64,
    file: File,
    /// Cells of this process using each slot (by index).
    count: HashMap<usize, usize>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("path", &self.path).finish()
    }
}

/// The file of `namespace`: in `/dev/shm` where it exists, else the
/// temporary directory; named from the user and a hash of the namespace.
pub fn path_for(namespace: &str) -> PathBuf {
    let digest = Sha256::digest(format!("keyfailover-shm\0{namespace}").as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = PathBuf::from("/dev/shm");
    let dir = if dir.is_dir() {
        dir
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("keyfailover-{uid}-{name}"))
}

impl Region {
    /// Opens (creating if needed) the region of `namespace`.
    pub fn open(namespace: &str) -> Result<Self> {
        let path = path_for(namespace);
        let fail = |what: &str, e: std::io::Error| {
            Error::Config(format!(
                "shared state for namespace {namespace:?}: cannot {what} {}: {e}",
                path.display()
            ))
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail("open", e))?;
        let meta = file.metadata().map_err(|e| fail("read", e))?;
        // SAFETY: getuid cannot fail.
        if meta.uid() != unsafe { libc::getuid() } {
            return Err(Error::Config(format!(
                "shared state for namespace {namespace:?}: {} belongs to another user",
                path.display()
            )));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail("restrict", e))?;
        }
        let lock = FileLock::exclusive(&file).map_err(|e| fail("lock", e))?;
        let len = file.metadata().map_err(|e| fail("read", e))?.len();
        let fresh = len == 0;
        if fresh {
            file.set_len(SIZE as u64).map_err(|e| fail("size", e))?;
        } else if len != SIZE as u64 {
            return Err(Error::Config(format!(
                "shared state for namespace {namespace:?}: {} has an unexpected size \
                 (another keyfailover version?); remove it when no process uses it",
                path.display()
            )));
        }
        // Its pages taken now: a sparse file would get them at its first write
        // of each, and with /dev/shm full that write is a SIGBUS that kills
        // the process (and every worker after it) instead of this error.
        // (macOS has no posix_fallocate, nor /dev/shm: the file is on disk.)
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        {
            // SAFETY: a valid descriptor and range.
            let taken = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, SIZE as libc::off_t) };
            if taken != 0 && taken != libc::EOPNOTSUPP && taken != libc::EINVAL {
                return Err(fail(
                    "take room for",
                    std::io::Error::from_raw_os_error(taken),
                ));
            }
        }
        // SAFETY: the file is ours (0600), sized above, and only ever accessed
        // through atomics at aligned offsets.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| fail("map", e))?;
        let header = |map: &MmapMut, i: usize| -> u64 {
            u64::from_le_bytes(map[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        if fresh {
            for (i, value) in [MAGIC, VERSION, CAPACITY, SLOT as u64]
                .into_iter()
                .enumerate()
            {
                map[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
            }
            map.flush().map_err(|e| fail("write", e))?;
        } else if header(&map, 0) != MAGIC
            || header(&map, 1) != VERSION
            || header(&map, 2) != CAPACITY
            || header(&map, 3) != SLOT as u64
        {
            return Err(Error::Config(format!(
                "shared state for namespace {namespace:?}: {} was written by another \
                 keyfailover version; remove it when no process uses it",
                path.display()
            )));
        }
        drop(lock);
        Ok(Self {
            map,
            path,
            holds: Mutex::new(Holds {
                generation: crate::fork::generation(),
                file,
                count: HashMap::new(),
            }),
        })
    }

    /// This process's holds, on a description of its own (see [`Holds`]).
    fn holds(&self) -> MutexGuard<'_, Holds> {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        let generation = crate::fork::generation();
        if holds.generation != generation {
            // Locked again on a description of this process's own before
            // the inherited one is let go; if the file cannot be opened
            // (removed), the inherited description goes on.
            if let Ok(file) = OpenOptions::new().read(true).write(true).open(&self.path) {
                for &index in holds.count.keys() {
                    let _ = lock_slot(&file, index, libc::F_RDLCK);
                }
                holds.file = file;
            }
            holds.generation = generation;
        }
        holds
    }

    /// Holds this process's slots on a description of its own (after a fork).
    pub fn own_holds(&self) {
        drop(self.holds());
    }

    /// Lets go of a slot a cell of this process held.
    fn release(&self, index: usize) {
        let mut holds = self.holds();
        let Some(count) = holds.count.get_mut(&index) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            holds.count.remove(&index);
            let _ = lock_slot(&holds.file, index, libc::F_UNLCK);
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn atomic(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= self.map.len());
        // SAFETY: in bounds, 8-aligned (the mapping is page-aligned), and the
        // memory is only accessed atomically.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    /// The first of the counters of the pools named `name` (those of every
    /// process of the namespace), claiming an entry on first use; None when
    /// [`POOL_CAPACITY`] names have entries.
    pub fn pool_counters(&self, name: &str) -> Option<NonNull<AtomicU64>> {
        let digest = Sha256::digest(format!("keyfailover-pool\0{name}").as_bytes());
        let fingerprint = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")).max(1);
        let start = (fingerprint % POOL_CAPACITY as u64) as usize;
        (0..POOL_CAPACITY).find_map(|probe| {
            let entry = (POOLS_AT + (start + probe) % POOL_CAPACITY * POOL_ENTRY) * 8;
            let owner = self.atomic(entry);
            match owner.compare_exchange(0, fingerprint, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => true,
                Err(current) => current == fingerprint,
            }
            .then(|| NonNull::from(self.atomic(entry + 8)))
        })
    }

    /// The slot of the key with this fingerprint (non-zero), claiming a free
    /// one for it on first use, or, when the table is full, one whose key no
    /// process holds. Held until the returned [`Slot`]'s hold is dropped.
    pub fn slot(self: &Arc<Self>, fingerprint: u64) -> Result<Slot> {
        debug_assert_ne!(fingerprint, 0);
        let mut holds = self.holds();
        let fail = |what: &str, e: std::io::Error| {
            Error::Config(format!(
                "shared state file {}: cannot {what}: {e}",
                self.path.display()
            ))
        };
        let _claiming = FileLock::exclusive(&holds.file).map_err(|e| fail("lock", e))?;
        let start = fingerprint % CAPACITY;
        let path = (0..CAPACITY).map(|probe| ((start + probe) % CAPACITY) as usize);
        // The key's slot, or the first free one on its path (a slot is
        // never freed, only taken over: a path has no gaps).
        let mut found = None;
        for index in path.clone() {
            let owner = self.atomic(slot_at(index));
            match owner.compare_exchange(0, fingerprint, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => found = Some(index),
                Err(current) if current == fingerprint => found = Some(index),
                Err(_) => continue,
            }
            break;
        }
        if found.is_none() {
            // Full: the first slot on the path whose key nobody holds, its
            // state and counters (of a key gone) started afresh.
            for index in path {
                if holds.count.contains_key(&index)
                    || held_elsewhere(&holds.file, index).map_err(|e| fail("read locks of", e))?
                {
                    continue;
                }
                let at = slot_at(index);
                for word in (at + 8..at + SLOT).step_by(8) {
                    self.atomic(word).store(0, Ordering::Release);
                }
                self.atomic(at).store(fingerprint, Ordering::Release);
                found = Some(index);
                break;
            }
        }
        let Some(index) = found else {
            return Err(Error::Config(format!(
                "shared state file {} is full: {CAPACITY} keys in use at once (pools of this \
                 namespace on this host, counting a reload's old and new keys while it \
                 happens); use another namespace",
                self.path.display()
            )));
        };
        if !holds.count.contains_key(&index) {
            lock_slot(&holds.file, index, libc::F_RDLCK).map_err(|e| fail("lock a slot of", e))?;
        }
        *holds.count.entry(index).or_insert(0) += 1;
        let at = slot_at(index);
        Ok(Slot {
            word: NonNull::from(self.atomic(at + 8)),
            counters: NonNull::from(self.atomic(at + 16)),
            unreachable_until: NonNull::from(self.atomic(at + SLOT - 8)),
            hold: Arc::new(SlotHold {
                region: self.clone(),
                index,
            }),
        })
    }
}

/// Where slot `index` starts in the mapping.
fn slot_at(index: usize) -> usize {
    HEADER + index * SLOT
}

/// Sets (`F_RDLCK`) or clears (`F_UNLCK`) this description's lock on the
/// first byte of slot `index`.
fn lock_slot(file: &File, index: usize, kind: libc::c_int) -> std::io::Result<()> {
    let mut lock = slot_lock(index, kind);
    // SAFETY: a valid descriptor and lock description.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description (another process) holds slot `index`.
fn held_elsewhere(file: &File, index: usize) -> std::io::Result<bool> {
    let mut lock = slot_lock(index, libc::F_WRLCK);
    // SAFETY: a valid descriptor and lock description.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

fn slot_lock(index: usize, kind: libc::c_int) -> libc::flock {
    // SAFETY: plain data; zero is a valid start (and OFD locks need l_pid 0).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = slot_at(index) as libc::off_t;
    lock.l_len = 1;
    lock
}

/// A cell's hold on its slot: keeps the mapping alive, and lets go of the
/// slot when the last cell of this process using it is gone.
pub struct SlotHold {
    region: Arc<Region>,
    index: usize,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.region.release(self.index);
    }
}

/// Where a key's words are in the mapping (valid while `hold` is).
pub struct Slot {
    pub word: NonNull<AtomicU64>,
    /// The first of [`KEY_ROOM`] counters.
    pub counters: NonNull<AtomicU64>,
    pub unreachable_until: NonNull<AtomicU64>,
    pub hold: Arc<SlotHold>,
}

/// An advisory lock on a file while a region is created or checked, or a
/// slot claimed (by its descriptor: the file outlives it).
struct FileLock(std::os::fd::RawFd);

impl FileLock {
    fn exclusive(file: &File) -> std::io::Result<Self> {
        // SAFETY: a valid descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(file.as_raw_fd()))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: the descriptor of a file that outlives the lock.
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(test: &str) -> String {
        format!("test-{test}-{}", std::process::id())
    }

    fn open(ns: &str) -> Arc<Region> {
        Arc::new(Region::open(ns).unwrap())
    }

    #[test]
    fn two_mappings_of_a_namespace_share_words() {
        let ns = namespace("share");
        let a = open(&ns);
        let b = open(&ns);
        let (sa, sb) = (a.slot(42).unwrap(), b.slot(42).unwrap());
        // SAFETY: test pointers into live mappings.
        unsafe {
            sa.word.as_ref().store(7, Ordering::Release);
            assert_eq!(sb.word.as_ref().load(Ordering::Acquire), 7);
        }
        assert_ne!(a.slot(43).unwrap().word, sa.word);
        let meta = std::fs::metadata(a.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Not sparse: every page is there before the first write needs it.
        assert!(
            meta.blocks() * 512 >= SIZE as u64,
            "{} blocks",
            meta.blocks()
        );
        std::fs::remove_file(a.path()).unwrap();
    }

    /// Fingerprints whose paths all start at slot 0, so the table fills in order.
    fn colliding(i: u64) -> u64 {
        i * CAPACITY
    }

    #[test]
    fn colliding_fingerprints_probe_onwards_and_a_full_table_is_an_error() {
        let ns = namespace("full");
        let region = open(&ns);
        let slots: Vec<_> = (1..=CAPACITY)
            .map(|i| region.slot(colliding(i)).unwrap())
            .collect();
        let distinct: std::collections::HashSet<_> = slots.iter().map(|s| s.word).collect();
        assert_eq!(distinct.len(), CAPACITY as usize);
        let again = region.slot(colliding(1)).unwrap();
        assert_eq!(again.word, slots[0].word, "found again");
        let err = region.slot(12345).err().unwrap().to_string();
        assert!(err.contains("full"), "{err}");
        std::fs::remove_file(region.path()).unwrap();
    }

    #[test]
    fn a_full_table_gives_a_slot_no_process_holds_to_a_new_key() {
        let ns = namespace("reuse");
        let ours = open(&ns);
        let theirs = open(&ns); // another description: as another process
        let half = CAPACITY / 2;
        let mut held: Vec<_> = (1..=half)
            .map(|i| ours.slot(colliding(i)).unwrap())
            .collect();
        let mut others: Vec<_> = (half + 1..=CAPACITY)
            .map(|i| theirs.slot(colliding(i)).unwrap())
            .collect();
        // SAFETY: test pointers into live mappings.
        unsafe { held[3].word.as_ref().store(99, Ordering::Release) };
        assert!(ours.slot(colliding(5000)).is_err(), "every slot held");
        // Our key number 4 goes (a reload dropped it; its state stays until
        // its slot is needed), and one of theirs.
        let ours_gone = held.remove(3).word;
        let theirs_gone = others.remove(10).word;
        let new = ours.slot(colliding(5000)).unwrap();
        assert_eq!(
            new.word, ours_gone,
            "the first slot on its path nobody holds"
        );
        // SAFETY: as above.
        assert_eq!(
            unsafe { new.word.as_ref().load(Ordering::Acquire) },
            0,
            "afresh"
        );
        let next = theirs.slot(colliding(5001)).unwrap();
        assert_eq!(next.word, theirs_gone, "the one held now is passed by");
        assert!(theirs.slot(colliding(5002)).is_err(), "full again");
        // A held key is found where it is, never moved.
        assert_eq!(ours.slot(colliding(1)).unwrap().word, held[0].word);
        assert_eq!(ours.slot(colliding(5000)).unwrap().word, new.word);
        std::fs::remove_file(ours.path()).unwrap();
    }

    #[test]
    fn pools_count_apart_by_name_in_one_namespace() {
        let ns = namespace("pools");
        let a = open(&ns);
        let b = open(&ns);
        let at = |region: &Region, ptr: NonNull<AtomicU64>| {
            ptr.as_ptr() as usize - region.map.as_ptr() as usize
        };
        let first = a.pool_counters("anthropic").unwrap();
        let found = b.pool_counters("anthropic").unwrap();
        assert_eq!(at(&b, found), at(&a, first), "one name, one block");
        let other = a.pool_counters("openai").unwrap();
        let distance = (other.as_ptr() as usize).abs_diff(first.as_ptr() as usize);
        assert!(
            distance >= crate::metrics::POOL_COUNTERS * 8,
            "blocks do not overlap"
        );
        let names: Vec<_> = (0..POOL_CAPACITY)
            .map(|i| a.pool_counters(&format!("pool-{i}")))
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.is_some()).count(),
            POOL_CAPACITY - 2
        );
        assert!(a.pool_counters("one-too-many").is_none());
        assert_eq!(
            a.pool_counters("openai").unwrap(),
            other,
            "still found when full"
        );
        std::fs::remove_file(a.path()).unwrap();
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let ns = namespace("foreign");
        std::fs::write(path_for(&ns), b"not ours").unwrap();
        let err = Region::open(&ns).unwrap_err().to_string();
        assert!(err.contains("unexpected size"), "{err}");
        std::fs::remove_file(path_for(&ns)).unwrap();
    }
}
