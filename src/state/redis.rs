//! Key states shared across hosts through Redis (or Valkey), 6.2 or later.
//!
//! Each process keeps working on its own memory: a walker never waits for
//! Redis. A mark changes the local word at once and queues a transition; a
//! background task on the tokio runtime applies queued transitions on the
//! server with one Lua script (which keeps the later deadline, lets a
//! permanent mark win, and ignores marks made before the key's last reset),
//! and the script publishes the key's resulting state to every process. Each
//! process also re-reads every key's state at a fixed interval and after each
//! reconnect, so a lost message is repaired within that interval; a key it
//! finds with no state there (a restart, a flush, an eviction) gets this
//! process's state again unless that is valid.
//!
//! Per key, Redis holds a hash `kf:{namespace}:k:{fingerprint}` with `r` (the
//! last reset, Unix µs), `s` (0 valid, 1 temporary, 2 permanent), `u` (the
//! end of a cooldown, Unix µs) and `w` (the same as `u` when that cooldown is
//! for the key's own endpoint being unreachable, else 0; a version before it
//! neither writes nor clears it, and a cooldown it sets has another `u`) and
//! `m` (when the mark the state is from was made: a reset written back
//! drops the state of marks made before it);
//! never a key or part of one. A key whose hash does not parse (put there
//! by hand, or not a hash) has no shared state, is logged once by its
//! fingerprint, and is overwritten by the next write of the key (a re-read
//! makes one where this process's state is not valid); every other key goes
//! on. Deadlines cross processes as wall-clock time; each process turns them
//! into readings of its own monotonic clock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::{clocks, Fingerprint, SyncStatus};
use crate::error::{Error, Result};
use crate::events::{self, Field, Level, Record};
use crate::pool::cell::{Cell, Marked, PERMANENT, VALID};

/// Keeps the later deadline, permanent over temporary, and a reset over
/// every mark made before it (or at the same microsecond); publishes the
/// result. Every write carries the last reset its writer knows of: Redis
/// takes it when it holds an earlier one (it lost the reset: flushed, or
/// restarted empty or from an older snapshot), and drops with it the state
/// of marks made before it (`m`, the time of the mark the state is from). A
/// `known` write brings back only that. Times are Unix microseconds. What
/// does not parse (a field that is no number in range, a value that is no
/// hash, both put there by hand) counts as absent and is overwritten: one
/// damaged key must not stop its writes.
const SCRIPT: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'hash' and t ~= 'none' then redis.call('DEL', KEYS[1]) end
local function field(name)
  local v = tonumber(redis.call('HGET', KEYS[1], name))
  if v == nil or v ~= v or v < 0 or v >= 18446744073709551616 then return 0 end
  return v
end
local r = field('r')
local s = field('s')
local u = field('u')
local w = field('w')
local m = field('m')
local op = ARGV[1]
local at = tonumber(ARGV[2])
local changed = false
-- A reset more than a day ahead of the server's clock (clocks differ by
-- seconds) is damage too: kept, it would make the key ignore every mark for
-- good.
local now = redis.call('TIME')
local limit = tonumber(now[1]) * 1000000 + tonumber(now[2]) + 86400000000
if r > limit then r = 0; s = 0; u = 0; w = 0; m = 0 end
local base = tonumber(ARGV[7]) or 0
if base > r and base <= limit then
  r = base
  changed = true
  if m <= base then s = 0; u = 0; w = 0; m = base end
end
if op == 'reset' then
  if not (at < r or (at == r and s == 0)) then
    r = at; s = 0; u = 0; w = 0; m = at; changed = true
  end
elseif op == 'known' or at <= r then
  -- Only the reset above; or a mark made before the last reset.
elseif op == 'retire' then
  if s ~= 2 then s = 2; u = 0; w = 0; m = at; changed = true end
else
  local untl = tonumber(ARGV[3])
  if not (s == 2 or (s == 1 and u >= untl)) then
    s = 1; u = untl; m = at; changed = true
    if ARGV[6] == '1' then w = untl else w = 0 end
  end
end
if not changed then return 0 end
-- Whole numbers: Lua would write 1.8e+15 for a time in microseconds.
local state = string.format('%.0f %d %.0f %.0f', r, s, u, w)
redis.call('HSET', KEYS[1], 'r', string.format('%.0f', r), 's', s, 'u', string.format('%.0f', u),
  'w', string.format('%.0f', w), 'm', string.format('%.0f', m))
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. state)
return 1
"#;

/// The longest cooldown this crate sets by itself: a monthly spend limit's,
/// until the 1st of the next month (31 days at most; the others are a day or
/// less unless configured). A deadline from Redis further out is clamped to
/// it: it is damage or tampering, not a plan. A longer configured or manual
/// cooldown reaches other processes as this long (the marking one keeps its
/// own).
pub(crate) const LONGEST_COOLDOWN: Duration = Duration::from_secs(31 * 24 * 3600);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The transitions of one key waiting to be written; later ones merge in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pending {
    /// A reset, at this wall-clock time (µs).
    reset: Option<u64>,
    /// Cooldowns, in wall-clock µs; none made earlier with an earlier
    /// deadline than another (it would add nothing).
    cooled: Vec<Cooled>,
    /// Retired, at this time.
    retired: Option<u64>,
    /// Redis holds an earlier reset than this process knows of: write back
    /// the one known (see the script).
    known: bool,
}

/// A cooldown to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cooled {
    made: u64,
    until: u64,
    /// For the key's own endpoint being unreachable.
    unreachable: bool,
}

impl Pending {
    fn cool(&mut self, cooled: Cooled) {
        let Cooled { made, until, .. } = cooled;
        if self
            .cooled
            .iter()
            .any(|c| c.made >= made && c.until >= until)
        {
            return;
        }
        self.cooled
            .retain(|c| !(made >= c.made && until >= c.until));
        self.cooled.push(cooled);
    }

    /// Drops what was made at or before a reset at `at`: it is stale.
    fn drop_before(&mut self, at: u64) {
        self.cooled.retain(|c| c.made > at);
        if self.retired.is_some_and(|made| made <= at) {
            self.retired = None;
        }
        if self.reset.is_some_and(|reset| reset <= at) {
            self.reset = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.reset.is_none() && self.cooled.is_empty() && self.retired.is_none() && !self.known
    }
}

/// What went wrong with a key's shared state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Damage {
    Read,
    Write,
}

#[derive(Debug, Default)]
struct Status {
    connected: bool,
    last_error: Option<String>,
    /// Whether the loss of the connection was logged (once per outage).
    outage_logged: bool,
}

pub(crate) struct RedisSync {
    client: redis::Client,
    /// The URL with any password masked, for messages.
    shown: String,
    password: Option<String>,
    namespace: String,
    prefix: String,
    channel: String,
    refresh: Duration,
    /// The cells following each key: one per pool holding it (pools of one
    /// namespace share a sync).
    cells: Mutex<HashMap<Fingerprint, Vec<Weak<Cell>>>>,
    pending: Mutex<HashMap<Fingerprint, Pending>>,
    /// Keys whose shared state does not parse, or could not be written:
    /// logged once, until it reads back (or is written) fine.
    damaged: Mutex<HashSet<(Fingerprint, Damage)>>,
    wake: Notify,
    status: Mutex<Status>,
    task: Mutex<Option<AbortHandle>>,
}

/// The handle the pools of one URL and namespace share: when the last of
/// them drops it, the background task stops (and with it the connections).
pub(crate) struct RedisHandle(pub Arc<RedisSync>);

/// The open handles of this process, by URL and namespace: the pools of one
/// namespace share one connection and one subscription.
static HANDLES: Mutex<Vec<(String, String, Weak<RedisHandle>)>> = Mutex::new(Vec::new());

impl RedisHandle {
    /// The handle of `url` and `namespace`: this process's open one, or a
    /// new one whose task starts on `runtime`.
    pub fn open(url: &str, namespace: &str, runtime: &Handle) -> Result<Arc<Self>> {
        let mut handles = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
        handles.retain(|(_, _, h)| h.strong_count() > 0);
        let open = handles
            .iter()
            .find(|(u, ns, _)| u == url && ns == namespace)
            .and_then(|(_, _, h)| h.upgrade());
        if let Some(handle) = open {
            return Ok(handle);
        }
        let sync = RedisSync::new(url, namespace, super::DEFAULT_REFRESH)?;
        sync.start(runtime);
        let handle = Arc::new(RedisHandle(sync));
        handles.push((
            url.to_owned(),
            namespace.to_owned(),
            Arc::downgrade(&handle),
        ));
        Ok(handle)
    }
}

impl Drop for RedisHandle {
    fn drop(&mut self) {
        if let Some(task) = self.0.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// Every sync of this process, for restarting their tasks after a fork.
static SYNCS: Mutex<Vec<Weak<RedisSync>>> = Mutex::new(Vec::new());

/// Restarts every background task on `runtime`: in a forked child the
/// parent's tasks (and threads) are gone.
pub fn restart_after_fork(runtime: impl FnOnce() -> Handle) {
    let syncs: Vec<Arc<RedisSync>> = {
        let mut all = SYNCS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|s| s.strong_count() > 0);
        all.iter().filter_map(Weak::upgrade).collect()
    };
    if syncs.is_empty() {
        return;
    }
    let runtime = runtime();
    for sync in syncs {
        *sync.status.lock().unwrap_or_else(|e| e.into_inner()) = Status::default();
        sync.start(&runtime);
    }
}

fn mask_password(url: &str, password: Option<&str>) -> String {
    match password.filter(|p| !p.is_empty()) {
        Some(p) => url.replace(p, "***"),
        None => url.to_owned(),
    }
}

impl RedisSync {
    pub fn new(url: &str, namespace: &str, refresh: Duration) -> Result<Arc<Self>> {
        // In the userinfo, or (a unix socket's, as redis-rs reads it) `?pass=`.
        let password = url::Url::parse(url).ok().and_then(|u| {
            u.password().map(str::to_owned).or_else(|| {
                u.query_pairs()
                    .find(|(name, _)| name == "pass" || name == "password")
                    .map(|(_, value)| value.into_owned())
            })
        });
        let shown = crate::target::masked_url(url).into_owned();
        let client = redis::Client::open(url).map_err(|e| {
            Error::Config(format!(
                "state {shown:?} is not a usable Redis URL: {}",
                mask_password(&e.to_string(), password.as_deref())
            ))
        })?;
        let sync = Arc::new(Self {
            client,
            shown,
            password,
            namespace: namespace.to_owned(),
            prefix: format!("kf:{namespace}:k:"),
            channel: format!("kf:{namespace}:events"),
            refresh,
            cells: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            damaged: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            status: Mutex::new(Status::default()),
            task: Mutex::new(None),
        });
        SYNCS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&sync));
        Ok(sync)
    }

    /// Makes `cell` follow the shared state of the key with `fingerprint`.
    pub fn register(&self, fingerprint: Fingerprint, cell: &Arc<Cell>) {
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        cells.retain(|_, followers| {
            followers.retain(|c| c.strong_count() > 0);
            !followers.is_empty()
        });
        cells
            .entry(fingerprint)
            .or_default()
            .push(Arc::downgrade(cell));
        drop(cells);
        self.wake.notify_one();
    }

    /// Starts (or restarts) the background task on `runtime`.
    pub fn start(self: &Arc<Self>, runtime: &Handle) {
        let task = runtime.spawn(run(Arc::downgrade(self))).abort_handle();
        if let Some(old) = self
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    pub fn status(&self) -> SyncStatus {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        SyncStatus {
            backend: "redis",
            connected: status.connected,
            last_error: status.last_error.clone(),
            pending: self.pending.lock().unwrap_or_else(|e| e.into_inner()).len(),
        }
    }

    fn queue(&self, fingerprint: Fingerprint, merge: impl FnOnce(&mut Pending)) {
        merge(
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(fingerprint)
                .or_default(),
        );
        self.wake.notify_one();
    }

    /// A local cooldown until `deadline` (monotonic ns), to share; whether
    /// it is for the key's own endpoint being unreachable.
    pub fn cooled(&self, fingerprint: Fingerprint, deadline: u64, unreachable: bool) {
        let (now_wall, now_mono) = clocks();
        let until = now_wall + deadline.saturating_sub(now_mono) / 1_000;
        self.queue(fingerprint, |p| {
            p.cool(Cooled {
                made: now_wall,
                until,
                unreachable,
            })
        });
    }

    pub fn retired(&self, fingerprint: Fingerprint) {
        let now = clocks().0;
        self.queue(fingerprint, |p| p.retired = Some(now));
    }

    /// A local reset at `at` (wall µs): earlier marks queued here are stale.
    pub fn reset(&self, fingerprint: Fingerprint, at: u64) {
        self.queue(fingerprint, |p| {
            p.drop_before(at);
            p.reset = Some(at);
        });
    }

    /// Applies a key's shared state to its cell; a reset newer than what is
    /// queued here makes the queued marks stale. A state from before the
    /// reset this process knows of means Redis lost that reset: it is
    /// written back, so that every process judges marks by it again.
    fn apply(&self, fingerprint: &Fingerprint, cell: &Cell, shared: Shared) {
        let reset_at = shared.reset_at;
        if reset_at < cell.reset_at.load(std::sync::atomic::Ordering::Acquire) {
            self.queue(*fingerprint, |p| p.known = true);
        }
        if apply(cell, shared) {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = pending.get_mut(fingerprint) {
                p.drop_before(reset_at);
                if p.is_empty() {
                    pending.remove(fingerprint);
                }
            }
        }
    }

    fn set_connected(&self, connected: bool, error: Option<String>) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let was = status.connected;
        status.connected = connected;
        if let Some(error) = error {
            let error = mask_password(&error, self.password.as_deref());
            if !status.outage_logged {
                status.outage_logged = true;
                self.log(format!(
                    "lost the shared state of namespace {:?} at {}: {error}; \
                     working on local state until it returns",
                    self.namespace, self.shown
                ));
            }
            status.last_error = Some(error);
        } else if connected && !was {
            if status.outage_logged {
                self.log(format!(
                    "the shared state of namespace {:?} at {} is back",
                    self.namespace, self.shown
                ));
            }
            status.outage_logged = false;
        }
    }

    /// A warning on `keyfailover.state` (connection lost, and back).
    fn log(&self, message: String) {
        self.log_with(message, Vec::new());
    }

    fn log_with(&self, message: String, mut fields: Vec<(&'static str, Field)>) {
        fields.splice(
            0..0,
            [
                ("backend", Field::from("redis")),
                ("url", Field::from(self.shown.as_str())),
                ("namespace", Field::from(self.namespace.as_str())),
            ],
        );
        events::emit(Record {
            logger: "keyfailover.state",
            level: Level::Warning,
            message,
            fields,
        });
    }

    /// A key's shared state is damaged (`what` says how): logged once, by
    /// its Redis key (a fingerprint, never the key), until it reads back
    /// (or is written) fine.
    fn damaged(&self, fingerprint: &Fingerprint, damage: Damage, what: &str) {
        let new = self
            .damaged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((*fingerprint, damage));
        if new {
            let hex = fingerprint.hex();
            self.log_with(
                format!(
                    "the shared state of a key of namespace {:?} at {} ({}{hex}) {what}; \
                     it counts as absent there until written again, and every other key \
                     keeps being shared",
                    self.namespace, self.shown, self.prefix
                ),
                vec![("fingerprint", Field::from(hex))],
            );
        }
    }

    /// A key's shared state reads back (or is written) fine.
    fn sound(&self, fingerprint: &Fingerprint, damage: Damage) {
        let mut damaged = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
        if !damaged.is_empty() {
            damaged.remove(&(*fingerprint, damage));
        }
    }

    /// Every key followed, with its live cells.
    fn cells(&self) -> Vec<(Fingerprint, Vec<Arc<Cell>>)> {
        self.cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(fp, followers)| {
                let cells: Vec<Arc<Cell>> = followers.iter().filter_map(Weak::upgrade).collect();
                (!cells.is_empty()).then_some((*fp, cells))
            })
            .collect()
    }

    fn cells_of(&self, fingerprint: &Fingerprint) -> Vec<Arc<Cell>> {
        self.cells
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(fingerprint)
            .map_or_else(Vec::new, |followers| {
                followers.iter().filter_map(Weak::upgrade).collect()
            })
    }
}

/// A key's state as Redis holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shared {
    /// The last reset (Unix µs).
    pub reset_at: u64,
    /// 0 valid, 1 temporary, 2 permanent.
    pub state: u8,
    /// The end of a cooldown (Unix µs).
    pub until: u64,
    /// The cooldown is for the key's own endpoint being unreachable.
    pub unreachable: bool,
}

impl Shared {
    /// From its fields as written: the cooldown is for an unreachable
    /// endpoint when `w` names its end (`w` is absent, or stale, where an
    /// earlier version wrote).
    fn parse(r: &str, s: &str, u: &str, w: Option<&str>) -> Option<Self> {
        Some(Self {
            reset_at: r.parse().ok()?,
            state: s.parse().ok()?,
            until: u.parse().ok()?,
            unreachable: w.is_some_and(|w| w == u && w != "0"),
        })
    }
}

/// Applies a key's shared state to a local cell; true when it brought a
/// reset this process had not seen.
pub(crate) fn apply(cell: &Cell, shared: Shared) -> bool {
    use std::sync::atomic::Ordering;
    let Shared {
        reset_at,
        state,
        until,
        unreachable,
    } = shared;
    let (now_wall, now_mono) = clocks();
    // Saturating, and clamped: a deadline of centuries would wrap around.
    let longest = u64::try_from(LONGEST_COOLDOWN.as_micros()).unwrap_or(u64::MAX);
    let deadline = (until > now_wall).then(|| {
        let left = (until - now_wall).min(longest);
        now_mono
            .saturating_add(left.saturating_mul(1_000))
            .min(PERMANENT - 1)
    });
    let local = cell.reset_at.fetch_max(reset_at, Ordering::AcqRel);
    if reset_at > local {
        // A reset this process had not seen: the shared state replaces ours.
        match (state, deadline) {
            (2, _) => cell.replace(PERMANENT, false),
            (1, Some(deadline)) => cell.replace(deadline, unreachable),
            _ => cell.replace(VALID, false),
        }
        return true;
    }
    if reset_at == local {
        let _: Marked = match (state, deadline) {
            (2, _) => cell.retire(),
            (1, Some(deadline)) if unreachable => cell.cool_unreachable_until(deadline, now_mono),
            (1, Some(deadline)) => cell.cool_until(deadline, now_mono),
            _ => Marked::Unchanged,
        };
    }
    false
}

/// The background task: connect, push, pull, listen; reconnect on error.
async fn run(sync: Weak<RedisSync>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some(this) = sync.upgrade() else { return };
        let outcome = session(&this).await;
        let error = match outcome {
            Ok(()) => return,
            Err(e) => e,
        };
        // A session that connected starts the backoff over: one long outage
        // must not slow the recovery from every later blip.
        if this
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connected
        {
            backoff = BACKOFF_MIN;
        }
        this.set_connected(false, Some(error));
        drop(this);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A Redis error on one line (a parser's message spans several), saying so
/// when the server did not answer as Redis does.
fn describe(error: &redis::RedisError) -> String {
    let text = error
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match error.kind() {
        redis::ErrorKind::Parse => format!("the server did not answer as Redis does ({text})"),
        _ => text,
    }
}

async fn with_timeout<T>(
    what: &str,
    future: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> std::result::Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {}", describe(&e))),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            COMMAND_TIMEOUT.as_secs()
        )),
    }
}

/// One connected session; returns an error when the connection is lost (or
/// Ok when the pool is gone).
async fn session(sync: &RedisSync) -> std::result::Result<(), String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    let mut conn = with_timeout(
        "connect",
        sync.client
            .get_multiplexed_async_connection_with_config(&config),
    )
    .await?;
    let mut pubsub = with_timeout("subscribe", sync.client.get_async_pubsub()).await?;
    with_timeout("subscribe", pubsub.subscribe(&sync.channel)).await?;
    let mut messages = pubsub.into_on_message();
    let sha: String = with_timeout(
        "load the script",
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SCRIPT)
            .query_async(&mut conn),
    )
    .await?;
    sync.set_connected(true, None);
    republish(sync);
    let mut refresh = tokio::time::interval(sync.refresh);
    // Keys whose last write failed on the server: tried again at the next
    // re-read, not at every wake-up.
    let mut held = HashSet::new();
    loop {
        push(sync, &mut conn, &sha, &mut held).await?;
        tokio::select! {
            _ = sync.wake.notified() => {}
            _ = refresh.tick() => {
                held.clear();
                pull(sync, &mut conn).await?;
            }
            message = messages.next() => match message {
                Some(message) => receive(sync, &message),
                None => return Err("the subscription connection closed".into()),
            },
        }
    }
}

/// Queues every key's local state, so a Redis that restarted empty learns it
/// again. Each goes as made just after the last reset this process knows of,
/// so it cannot undo a reset made elsewhere meanwhile.
fn republish(sync: &RedisSync) {
    for (fp, cells) in sync.cells() {
        republish_key(sync, fp, &cells);
    }
}

/// Queues one key's local state (retired, cooling down; nothing when valid),
/// as [`republish`] does.
fn republish_key(sync: &RedisSync, fp: Fingerprint, cells: &[Arc<Cell>]) {
    use std::sync::atomic::Ordering;
    let now = clocks().1;
    for cell in cells {
        let known_reset = cell.reset_at.load(Ordering::Acquire) + 1;
        let (_, unreachable) = cell.status_and_unreachable(now);
        match cell.word.load(Ordering::Acquire) {
            VALID => {}
            PERMANENT => sync.queue(fp, |p| {
                p.retired.get_or_insert(known_reset);
            }),
            deadline if deadline > now => {
                let until = clocks().0 + (deadline - now) / 1_000;
                sync.queue(fp, |p| {
                    p.cool(Cooled {
                        made: known_reset,
                        until,
                        unreachable,
                    })
                });
            }
            _ => {}
        }
    }
}

/// Whether a server's error answer concerns the one key it was about (its
/// value is no hash, the script failed on it) rather than the connection or
/// the server (NOSCRIPT, READONLY, LOADING, OOM...: a new session, after a
/// pause, is the cure).
fn key_error(error: &redis::RedisError) -> bool {
    matches!(error.code(), Some("ERR" | "WRONGTYPE"))
}

/// Writes every queued transition but those `held`, in one pipeline; they
/// stay queued if it fails. A key whose write the server refuses stays
/// queued and joins `held`; the others go on.
async fn push(
    sync: &RedisSync,
    conn: &mut redis::aio::MultiplexedConnection,
    sha: &str,
    held: &mut HashSet<Fingerprint>,
) -> std::result::Result<(), String> {
    let batch: Vec<(Fingerprint, Pending)> = sync
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(fp, _)| !held.contains(fp))
        .map(|(fp, p)| (*fp, p.clone()))
        .collect();
    if batch.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    // The key of each command, in order.
    let mut of = Vec::new();
    for (fp, pending) in &batch {
        let hex = fp.hex();
        let key = format!("{}{hex}", sync.prefix);
        // The last reset this process knows of, for the marks.
        let known_reset = sync
            .cells_of(fp)
            .iter()
            .map(|cell| cell.reset_at.load(std::sync::atomic::Ordering::Acquire))
            .max()
            .unwrap_or(0);
        let mut call = |op: &str, at: u64, until: u64, unreachable: bool| {
            pipe.cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(&key)
                .arg(op)
                .arg(at)
                .arg(until)
                .arg(&sync.channel)
                .arg(&hex)
                .arg(u8::from(unreachable))
                .arg(if op == "reset" { 0 } else { known_reset });
            of.push(*fp);
        };
        if let Some(at) = pending.reset {
            call("reset", at, 0, false);
        }
        for cooled in &pending.cooled {
            call("cool", cooled.made, cooled.until, cooled.unreachable);
        }
        if let Some(at) = pending.retired {
            call("retire", at, 0, false);
        }
        if pending.known {
            call("known", known_reset, 0, false);
        }
    }
    let results: Vec<redis::RedisResult<redis::Value>> =
        with_timeout("write transitions", pipe.query_async(conn)).await?;
    let mut failed = HashSet::new();
    for (fp, result) in of.iter().zip(results) {
        if let Err(e) = result {
            if !key_error(&e) {
                return Err(format!("write transitions: {}", describe(&e)));
            }
            if failed.insert(*fp) {
                sync.damaged(
                    fp,
                    Damage::Write,
                    &format!("could not be written ({})", describe(&e)),
                );
            }
        }
    }
    let mut pending = sync.pending.lock().unwrap_or_else(|e| e.into_inner());
    for (fp, written) in batch {
        // A transition queued while the pipeline ran stays for the next push.
        if failed.contains(&fp) {
            held.insert(fp);
            continue;
        }
        sync.sound(&fp, Damage::Write);
        if pending.get(&fp) == Some(&written) {
            pending.remove(&fp);
        }
    }
    Ok(())
}

/// Re-reads every key's shared state. A key with none there (Redis was
/// flushed, or evicted it; or its data does not parse) gets this process's
/// state again when that is not valid, as after a reconnect: a flush does not
/// disconnect, and a process started afterwards would use a key retired here.
async fn pull(
    sync: &RedisSync,
    conn: &mut redis::aio::MultiplexedConnection,
) -> std::result::Result<(), String> {
    let cells = sync.cells();
    if cells.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (fp, _) in &cells {
        pipe.cmd("HMGET")
            .arg(format!("{}{}", sync.prefix, fp.hex()))
            .arg("r")
            .arg("s")
            .arg("u")
            .arg("w");
    }
    type Fields = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let states: Vec<redis::RedisResult<redis::Value>> =
        with_timeout("read states", pipe.query_async(conn)).await?;
    for ((fp, followers), state) in cells.iter().zip(states) {
        // A key whose state does not parse has none: the others go on.
        let fields = match state {
            Ok(value) => redis::from_redis_value::<Fields>(value),
            Err(e) if key_error(&e) => {
                sync.damaged(
                    fp,
                    Damage::Read,
                    &format!("is not a hash ({})", describe(&e)),
                );
                republish_key(sync, *fp, followers);
                continue;
            }
            Err(e) => return Err(format!("read states: {}", describe(&e))),
        };
        let shared = match fields {
            Ok((None, None, None, None)) => {
                republish_key(sync, *fp, followers);
                continue;
            }
            Ok((Some(r), Some(s), Some(u), w)) => Shared::parse(&r, &s, &u, w.as_deref()),
            _ => None,
        };
        let Some(shared) = shared else {
            sync.damaged(fp, Damage::Read, "does not parse");
            republish_key(sync, *fp, followers);
            continue;
        };
        sync.sound(fp, Damage::Read);
        for cell in followers {
            sync.apply(fp, cell, shared);
        }
    }
    Ok(())
}

fn receive(sync: &RedisSync, message: &redis::Msg) {
    let Ok(payload) = message.get_payload::<String>() else {
        return;
    };
    // "fingerprint r s u w" (no w from a version before it).
    let mut parts = payload.split(' ');
    let (Some(fp), Some(r), Some(s), Some(u)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Some(fp), Some(shared)) = (
        Fingerprint::from_hex(fp),
        Shared::parse(r, s, u, parts.next()),
    ) else {
        return;
    };
    for cell in sync.cells_of(&fp) {
        sync.apply(&fp, &cell, shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::cell::KeyState;
    use std::sync::atomic::Ordering;

    fn cell() -> Cell {
        Cell::local(crate::metrics::KeyCounters(crate::metrics::Block::local(1)))
    }

    fn shared(reset_at: u64, state: u8, until: u64) -> Shared {
        Shared {
            reset_at,
            state,
            until,
            unreachable: false,
        }
    }

    fn unreachable(reset_at: u64, until: u64) -> Shared {
        Shared {
            unreachable: true,
            ..shared(reset_at, 1, until)
        }
    }

    #[test]
    fn applying_shared_states_keeps_the_rules() {
        let (wall, mono) = clocks();
        let state = |c: &Cell| c.status(clocks().1).state;
        // A cooldown elsewhere reaches this process.
        let c = cell();
        apply(&c, shared(0, 1, wall + 60_000_000));
        assert_eq!(state(&c), KeyState::Temporary);
        let left = c.word.load(Ordering::Acquire) - mono;
        assert!(
            left > 59_000_000_000 && left <= 60_000_000_000 + 10_000_000,
            "{left}"
        );
        // An earlier deadline does not shorten it.
        apply(&c, shared(0, 1, wall + 1_000_000));
        assert!(c.word.load(Ordering::Acquire) - mono > 59_000_000_000);
        // A newer reset replaces it; a stale mark (older reset) is ignored.
        apply(&c, shared(wall, 0, 0));
        assert_eq!(state(&c), KeyState::Valid);
        apply(&c, shared(wall - 1, 2, 0));
        assert_eq!(state(&c), KeyState::Valid, "made before the reset");
        apply(&c, shared(wall, 2, 0));
        assert_eq!(state(&c), KeyState::Permanent);
        // An expired cooldown is no cooldown.
        let c = cell();
        apply(&c, shared(0, 1, wall.saturating_sub(5)));
        assert_eq!(state(&c), KeyState::Valid);
    }

    #[test]
    fn why_a_key_cools_down_travels_with_its_state() {
        let (wall, _) = clocks();
        let why = |c: &Cell| {
            let (status, unreachable) = c.status_and_unreachable(clocks().1);
            (status.state, unreachable)
        };
        // Another process's cooldown for an unreachable endpoint.
        let c = cell();
        apply(&c, unreachable(0, wall + 60_000_000));
        assert_eq!(why(&c), (KeyState::Temporary, true));
        // The same state again (each re-read converts it anew): still so.
        apply(&c, unreachable(0, wall + 60_000_000));
        apply(&c, unreachable(0, wall + 59_999_999));
        assert_eq!(why(&c), (KeyState::Temporary, true));
        // A shorter rate limit changes nothing; a longer one is the reason.
        apply(&c, shared(0, 1, wall + 30_000_000));
        assert_eq!(why(&c), (KeyState::Temporary, true));
        apply(&c, shared(0, 1, wall + 90_000_000));
        assert_eq!(why(&c), (KeyState::Temporary, false));
        // A reset from elsewhere brings the state and its reason as they are.
        apply(&c, unreachable(wall, wall + 10_000_000));
        assert_eq!(why(&c), (KeyState::Temporary, true));
        apply(&c, shared(wall + 1, 1, wall + 10_000_000));
        assert_eq!(why(&c), (KeyState::Temporary, false));
        // A local reset clears it.
        apply(&c, unreachable(wall + 1, wall + 120_000_000));
        assert_eq!(why(&c), (KeyState::Temporary, true));
        c.reset(clocks().1);
        c.cool_until(clocks().1 + 1_000_000_000, clocks().1);
        assert_eq!(why(&c), (KeyState::Temporary, false));
    }

    #[test]
    fn states_parse_with_and_without_the_reason() {
        assert_eq!(
            Shared::parse("5", "1", "900", Some("900")),
            Some(unreachable(5, 900))
        );
        assert_eq!(
            Shared::parse("5", "1", "900", Some("0")),
            Some(shared(5, 1, 900))
        );
        // Left by an unreachable cooldown that an earlier version's mark then
        // replaced (its script leaves `w` as it was).
        assert_eq!(
            Shared::parse("5", "1", "950", Some("900")),
            Some(shared(5, 1, 950))
        );
        assert_eq!(
            Shared::parse("5", "0", "0", Some("0")),
            Some(shared(5, 0, 0))
        );
        // As a version before the reason wrote it.
        assert_eq!(
            Shared::parse("5", "1", "900", None),
            Some(shared(5, 1, 900))
        );
        assert_eq!(Shared::parse("5", "x", "900", None), None);
    }

    #[test]
    fn deadlines_out_of_range_are_clamped_to_the_longest_cooldown() {
        let longest = LONGEST_COOLDOWN.as_nanos() as u64;
        for u in [
            "18446744073709551615",
            "18446744073709551000",
            "18446744073709000000",
        ] {
            let shared = Shared::parse("0", "1", u, Some("0")).unwrap();
            let c = cell();
            let mono = clocks().1;
            apply(&c, shared);
            let status = c.status(clocks().1);
            assert_eq!(status.state, KeyState::Temporary, "u={u}");
            let left = c.word.load(Ordering::Acquire) - mono;
            assert!(
                left <= longest + 10_000_000 && left > longest - 10_000_000_000,
                "u={u}: {left} ns"
            );
        }
        // No cooldown the crate sets is longer.
        let next_month = crate::verdict::until_next_month(std::time::SystemTime::now());
        assert!(next_month <= LONGEST_COOLDOWN);
    }

    #[test]
    fn queued_transitions_merge() {
        let sync = RedisSync::new("redis://127.0.0.1:1/0", "t", Duration::from_secs(1)).unwrap();
        let fp = Fingerprint::of("t", "sk-value");
        let mono = clocks().1;
        sync.cooled(fp, mono + 5_000_000_000, false);
        std::thread::sleep(Duration::from_millis(1));
        sync.cooled(fp, mono + 1_000_000_000, true);
        let cooled = sync.pending.lock().unwrap()[&fp].cooled.clone();
        assert_eq!(
            cooled.len(),
            2,
            "made later with an earlier deadline: both kept"
        );
        assert!(cooled[0].until >= clocks().0 + 4_000_000);
        assert!(!cooled[0].unreachable && cooled[1].unreachable);
        sync.reset(fp, clocks().0);
        let pending = sync.pending.lock().unwrap()[&fp].clone();
        assert!(
            pending.cooled.is_empty(),
            "a reset drops what was queued before it"
        );
        assert!(pending.reset.is_some());
        assert_eq!(sync.status().pending, 1);
        // A newer reset from elsewhere makes queued marks stale too.
        sync.cooled(fp, clocks().1 + 5_000_000_000, false);
        let cell = cell();
        sync.apply(&fp, &cell, shared(clocks().0 + 1, 0, 0));
        assert!(!sync.pending.lock().unwrap().contains_key(&fp));
    }

    /// A redis-server of the test's own on a free loopback port, saving
    /// nothing; killed when dropped.
    pub(crate) struct Server {
        child: std::process::Child,
        pub url: String,
    }

    impl Server {
        pub fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(std::env::temp_dir())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is not installed: run .ci/install-deps.sh");
            let server = Self {
                child,
                url: format!("redis://127.0.0.1:{port}/0"),
            };
            for _ in 0..500 {
                if server.try_conn().is_some() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("redis-server did not start");
        }

        fn try_conn(&self) -> Option<redis::Connection> {
            let mut conn = redis::Client::open(self.url.as_str())
                .ok()?
                .get_connection()
                .ok()?;
            redis::cmd("PING").query::<String>(&mut conn).ok()?;
            Some(conn)
        }

        pub fn conn(&self) -> redis::Connection {
            self.try_conn()
                .expect("a connection to the test's redis-server")
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A sync of `namespace` on `runtime`, as one process's, following
    /// `fingerprints` with a cell each.
    fn follower(
        server: &Server,
        namespace: &str,
        runtime: &tokio::runtime::Runtime,
        fingerprints: &[Fingerprint],
    ) -> (Arc<RedisSync>, Vec<Arc<Cell>>) {
        let sync = RedisSync::new(&server.url, namespace, super::super::DEFAULT_REFRESH).unwrap();
        let cells: Vec<Arc<Cell>> = fingerprints
            .iter()
            .map(|fp| {
                let c = Arc::new(cell());
                sync.register(*fp, &c);
                c
            })
            .collect();
        sync.start(runtime.handle());
        (sync, cells)
    }

    /// Whether `done` comes true within `within`.
    fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + within;
        while std::time::Instant::now() < end {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        done()
    }

    /// Retires `fp` in `sync`'s process, as a pool would.
    fn retire(sync: &RedisSync, cell: &Cell, fp: Fingerprint) {
        cell.retire();
        sync.retired(fp);
    }

    fn hash_key(namespace: &str, fp: Fingerprint) -> String {
        format!("kf:{namespace}:k:{}", fp.hex())
    }

    /// Garbage in one key's Redis data (a field that is no number, a value
    /// that is no hash): every other key keeps being shared, within the
    /// usual sync time, and a write repairs the damaged one.
    #[test]
    fn one_damaged_key_does_not_stop_the_sharing_of_the_others() {
        let server = Server::start();
        let mut redis = server.conn();
        for (namespace, damage) in [("garbage", "field"), ("wrongtype", "string")] {
            let rt = runtime();
            let fps = [
                Fingerprint::of(namespace, "sk-test-damaged"),
                Fingerprint::of(namespace, "sk-test-other"),
            ];
            let (a, a_cells) = follower(&server, namespace, &rt, &fps);
            let (b, b_cells) = follower(&server, namespace, &rt, &fps);
            assert!(eventually(Duration::from_secs(5), || a.status().connected
                && b.status().connected));
            let damaged = hash_key(namespace, fps[0]);
            if damage == "field" {
                redis::cmd("HSET")
                    .arg(&damaged)
                    .arg(&["r", "garbage", "s", "0", "u", "0"])
                    .query::<()>(&mut redis)
                    .unwrap();
                // A's write of the damaged key goes through.
                let deadline = clocks().1 + 60_000_000_000;
                a_cells[0].cool_until(deadline, clocks().1);
                a.cooled(fps[0], deadline, false);
            } else {
                redis::cmd("SET")
                    .arg(&damaged)
                    .arg("not a hash")
                    .query::<()>(&mut redis)
                    .unwrap();
            }
            // Let A's re-read meet the damage.
            std::thread::sleep(Duration::from_millis(1_500));
            retire(&b, &b_cells[1], fps[1]);
            assert!(
                eventually(Duration::from_secs(2), || a_cells[1]
                    .word
                    .load(Ordering::Acquire)
                    == PERMANENT),
                "{damage}: B's retirement of the other key did not reach A: {:?}",
                a.status()
            );
            let status = a.status();
            assert!(
                status.connected && status.last_error.is_none(),
                "{status:?}"
            );
            assert_eq!(status.pending, 0, "{damage}: {status:?}");
            if damage == "string" {
                assert!(a.damaged.lock().unwrap().contains(&(fps[0], Damage::Read)));
                // The next write of the damaged key replaces the string.
                retire(&b, &b_cells[0], fps[0]);
            }
            let want = if damage == "field" { "1" } else { "2" };
            let mut found = None;
            eventually(Duration::from_secs(2), || {
                found = redis::cmd("HGET")
                    .arg(&damaged)
                    .arg("s")
                    .query::<Option<String>>(&mut redis)
                    .ok()
                    .flatten();
                found.as_deref() == Some(want)
            });
            assert_eq!(found.as_deref(), Some(want), "{damage}");
            if damage == "string" {
                assert!(eventually(Duration::from_secs(2), || a_cells[0]
                    .word
                    .load(Ordering::Acquire)
                    == PERMANENT));
            }
        }
    }

    /// Fields that are no whole number in range count as absent in the
    /// script, which then writes the key as if it had none.
    #[test]
    fn the_script_takes_fields_that_are_no_numbers_for_absent() {
        let server = Server::start();
        let mut redis = server.conn();
        let (wall, _) = clocks();
        let until = wall + 60_000_000;
        for bad in [
            "garbage",
            "",
            "nan",
            "-nan",
            "inf",
            "-5",
            "1e30",
            "18446744073709551615",
        ] {
            redis::cmd("DEL").arg("k").query::<()>(&mut redis).unwrap();
            redis::cmd("HSET")
                .arg("k")
                .arg(&["r", bad, "s", bad, "u", bad, "w", bad])
                .query::<()>(&mut redis)
                .unwrap();
            assert_eq!(
                cool_k(&mut redis, wall, until),
                (1, Some(shared(0, 1, until))),
                "{bad:?}"
            );
        }
    }

    /// Runs the script on hash `k` for a cooldown from `wall` until `until`;
    /// returns whether it wrote, and what `k` then holds.
    fn cool_k(redis: &mut redis::Connection, wall: u64, until: u64) -> (i64, Option<Shared>) {
        let written: i64 = redis::cmd("EVAL")
            .arg(SCRIPT)
            .arg(1)
            .arg("k")
            .arg(&[
                "cool",
                &wall.to_string(),
                &until.to_string(),
                "c",
                "fp",
                "0",
            ])
            .query(redis)
            .unwrap();
        let fields: (String, String, String, String) = redis::cmd("HMGET")
            .arg("k")
            .arg(&["r", "s", "u", "w"])
            .query(redis)
            .unwrap();
        let held = Shared::parse(&fields.0, &fields.1, &fields.2, Some(&fields.3));
        (written, held)
    }

    #[test]
    fn a_reset_far_in_the_future_counts_as_damage() {
        let server = Server::start();
        let mut redis = server.conn();
        let (wall, _) = clocks();
        let until = wall + 60_000_000;
        let far = (wall + 10 * 86_400_000_000).to_string();
        redis::cmd("HSET")
            .arg("k")
            .arg(&["r", far.as_str(), "s", "0", "u", "0", "w", "0"])
            .query::<()>(&mut redis)
            .unwrap();
        assert_eq!(
            cool_k(&mut redis, wall, until),
            (1, Some(shared(0, 1, until)))
        );
    }

    /// Redis flushed (a flush does not disconnect): the next re-read writes
    /// a key retired here back, so a process started afterwards sees it.
    #[test]
    fn a_flushed_key_state_is_written_again() {
        let server = Server::start();
        let mut redis = server.conn();
        let rt = runtime();
        let namespace = "flushed";
        let fps = [
            Fingerprint::of(namespace, "sk-test-retired"),
            Fingerprint::of(namespace, "sk-test-valid"),
        ];
        let (a, a_cells) = follower(&server, namespace, &rt, &fps);
        assert!(eventually(Duration::from_secs(5), || a.status().connected));
        retire(&a, &a_cells[0], fps[0]);
        let state = |redis: &mut redis::Connection| {
            redis::cmd("HGET")
                .arg(hash_key(namespace, fps[0]))
                .arg("s")
                .query::<Option<String>>(redis)
                .unwrap()
        };
        assert!(eventually(Duration::from_secs(2), || state(&mut redis)
            .as_deref()
            == Some("2")));
        redis::cmd("FLUSHALL").query::<()>(&mut redis).unwrap();
        assert!(
            eventually(Duration::from_millis(2_500), || state(&mut redis)
                .as_deref()
                == Some("2")),
            "not written again: {:?}",
            state(&mut redis)
        );
        // Nothing is written for a valid key.
        let valid: bool = redis::cmd("EXISTS")
            .arg(hash_key(namespace, fps[1]))
            .query(&mut redis)
            .unwrap();
        assert!(!valid);
        let (_b, b_cells) = follower(&server, namespace, &rt, &fps);
        assert!(eventually(Duration::from_secs(2), || b_cells[0]
            .word
            .load(Ordering::Acquire)
            == PERMANENT));
    }

    #[test]
    fn passwords_never_show() {
        let err = RedisSync::new("redis://:hunter2@bad host/0", "t", Duration::from_secs(1))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let sync = RedisSync::new(
            "redis://user:hunter2@127.0.0.1:1/0",
            "t",
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!sync.shown.contains("hunter2"));
        assert!(sync.shown.contains("***"));
    }
}
