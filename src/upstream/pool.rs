//! Keep-alive connections to upstreams, on hyper's client connections.
//!
//! hyper-util's pooled client, used before, does more per request than a
//! proxy needs: it hashes its pool key with SipHash when it takes a
//! connection and when it gives one back, builds a connect future beside
//! each checkout, and spawns a task for every HTTP/1 response to hand its
//! connection back once ready. Here an HTTP/1 connection goes back to its
//! host's stack when the response body ends (the body's reader gives it
//! back, see `Response::chunk`), is taken newest first, and is checked for
//! readiness when taken. An HTTP/2 connection is shared by every request to
//! its host, up to the streams the upstream allows open on one connection at
//! once (its `SETTINGS_MAX_CONCURRENT_STREAMS`, 100 until it says); a request
//! that finds every shared connection full makes another, rather than queue
//! behind streams that may stay open for minutes. Idle connections close
//! after `idle_timeout`: they are skipped when taken, and a task started
//! with the first one sweeps them out. A shared HTTP/2 connection is let go
//! once no request took it for that long (its streams still open finish
//! first: hyper closes it when they have).
//!
//! A connection to an HTTPS host may turn out HTTP/2 (ALPN decides), and
//! then one serves every request: while one is being made, requests that
//! find nothing to take wait for it, once, rather than each opening a
//! connection of its own that would carry one request and close (a burst on
//! a cold pool did so). A host seen to answer HTTP/1 is not waited for.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::uri::{Authority, Scheme};
use http::Uri;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use tokio::sync::Notify;

pub(super) type Body = Full<Bytes>;

/// Which connections can serve a request: its scheme and authority
/// (compared and hashed without regard to case, as `Authority` does).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key {
    https: bool,
    authority: Authority,
}

impl Key {
    /// None for a URI without an authority (not an absolute URL).
    pub fn of(uri: &Uri) -> Option<Self> {
        Some(Self {
            https: uri.scheme() == Some(&Scheme::HTTPS),
            authority: uri.authority()?.clone(),
        })
    }
}

/// A connection's request sender.
pub(super) enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// A connection taken from the pool or just made.
pub(super) struct Pooled {
    pub sender: Sender,
    /// Connected to a forward proxy, which takes requests in absolute form.
    pub proxied: bool,
    /// Taken from the pool (so it may have been closed meanwhile).
    pub reused: bool,
    /// On an HTTP/2 connection: the stream the request opens, counted until
    /// the response has ended or is dropped.
    pub stream: Option<Stream>,
}

/// An HTTP/2 connection's streams: how many requests have one open, and how
/// many the upstream allows at once (kept up to date by the connection's
/// task, see [`Load::set_max`]).
#[derive(Debug)]
pub(super) struct Load {
    open: AtomicUsize,
    max: AtomicUsize,
    /// The connection's task, which sets `max` (see [`Load::recheck`]).
    task: AtomicWaker,
}

impl Load {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            task: AtomicWaker::new(),
        })
    }

    /// The most streams the upstream allows open at once, as it last said.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Called by the connection's task each time it runs: `recheck` wakes it.
    pub fn watched_by(&self, task: &std::task::Waker) {
        self.task.register(task);
    }

    /// Has the connection's task look at what the upstream allows now. Its
    /// SETTINGS are applied by a task of hyper's own, which does not wake the
    /// connection's: until something does, `max` is what it was before them.
    pub fn recheck(&self) {
        self.task.wake();
    }

    /// A stream, if the connection has room for one more.
    fn try_open(self: &Arc<Self>) -> Option<Stream> {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Stream(self.clone()))
    }

    /// A stream whether or not there is room (the first request on a new
    /// connection, which it made for itself).
    fn open(self: &Arc<Self>) -> Stream {
        self.open.fetch_add(1, Ordering::AcqRel);
        Stream(self.clone())
    }

    #[cfg(test)]
    fn streams(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A request's stream on an HTTP/2 connection: counted open until dropped.
#[derive(Debug)]
pub(super) struct Stream(Arc<Load>);

impl Stream {
    /// The connection's streams.
    pub fn load(&self) -> &Arc<Load> {
        &self.0
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Idle {
    sender: http1::SendRequest<Body>,
    proxied: bool,
    /// [`crate::clock::coarse_monotonic_nanos`] when given back.
    since: u64,
}

/// One host's connections, and its `Host` header. A response's reader holds
/// its slot, to give its connection back without looking the host up again.
pub(super) struct Slot {
    host: Mutex<Host>,
    /// The value of an HTTP/1 request's `Host` header.
    pub header: http::HeaderValue,
}

#[derive(Default)]
struct Host {
    /// Idle HTTP/1 connections, the newest last.
    idle: Vec<Idle>,
    /// The shared HTTP/2 connections, oldest first (one unless requests
    /// found it full).
    h2: Vec<Shared>,
    /// A connection being made that may turn out HTTP/2: notified once it
    /// is made, or failed.
    connecting: Option<Arc<Notify>>,
    /// The host answered a TLS handshake with HTTP/1.
    h1: bool,
}

/// One of a host's shared HTTP/2 connections.
struct Shared {
    sender: http2::SendRequest<Body>,
    proxied: bool,
    load: Arc<Load>,
    /// Requests that took it: counted rather than timed, so taking it reads
    /// no clock.
    taken: u64,
    /// `taken` at the last sweep, and how many sweeps in a row found it
    /// unchanged.
    swept: u64,
    quiet: u8,
}

/// Whether a connection idle since `since` (coarse monotonic nanoseconds,
/// as `now`) has been for `timeout` or longer.
fn idle_too_long(now: u64, since: u64, timeout: Duration) -> bool {
    u128::from(now.saturating_sub(since)) >= timeout.as_nanos()
}

/// Sweeps in a row that find a shared HTTP/2 connection untaken before it
/// is let go: sweeps come every half idle timeout, so at least that long.
const QUIET_SWEEPS: u8 = 2;

impl Host {
    /// Called every half `timeout` (see [`sweep`]).
    fn sweep(&mut self, now: u64, timeout: Duration) {
        self.idle
            .retain(|c| !c.sender.is_closed() && !idle_too_long(now, c.since, timeout));
        self.h2.retain_mut(|shared| {
            if shared.taken == shared.swept {
                shared.quiet += 1;
            } else {
                (shared.swept, shared.quiet) = (shared.taken, 0);
            }
            !shared.sender.is_closed() && shared.quiet < QUIET_SWEEPS
        });
    }

    fn is_empty(&self) -> bool {
        self.idle.is_empty() && self.h2.is_empty()
    }
}

/// The pool. Cheap to clone: clones share it.
#[derive(Clone)]
pub(super) struct Pool(Arc<Inner>);

struct Inner {
    hosts: Mutex<Hosts>,
    idle_timeout: Duration,
    /// Whether the sweeping task runs.
    sweeping: AtomicBool,
}

#[derive(Default)]
struct Hosts {
    map: HashMap<Key, Arc<Slot>, BuildHasherDefault<Fnv>>,
    /// The slot looked up last, with its key. Most requests go where the
    /// last went, with a URI whose authority shares its bytes with the last
    /// one's (a client's base URL keeps its URIs parsed): found by comparing
    /// two pointers, rather than hashing the host name and comparing it
    /// case-insensitively (some 400 instructions a request).
    last: Option<(Key, Arc<Slot>)>,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Host> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Self {
        Self(Arc::new(Inner {
            hosts: Mutex::default(),
            idle_timeout,
            sweeping: AtomicBool::new(false),
        }))
    }

    /// The slot of `uri`'s host (made the first time); None for a URI
    /// without one.
    pub fn slot(&self, uri: &Uri) -> Option<Arc<Slot>> {
        let authority = uri.authority()?;
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let mut hosts = self.0.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, slot)) = &hosts.last {
            // The same bytes (kept alive by the key, so not another's at
            // the same address since): the same authority.
            let (a, b) = (key.authority.as_str(), authority.as_str());
            if key.https == https && a.len() == b.len() && std::ptr::eq(a.as_ptr(), b.as_ptr()) {
                return Some(slot.clone());
            }
        }
        let key = Key::of(uri)?;
        let slot = match hosts.map.get(&key) {
            Some(slot) => slot.clone(),
            None => {
                let slot = Arc::new(Slot {
                    host: Mutex::default(),
                    header: super::host(uri),
                });
                hosts.map.insert(key.clone(), slot.clone());
                slot
            }
        };
        hosts.last = Some((key, slot.clone()));
        Some(slot)
    }

    /// An open connection of `slot`'s host, if one is idle (HTTP/1) or
    /// shared (HTTP/2) with room for another stream. It may still turn out
    /// closed when used.
    pub fn take(&self, slot: &Slot) -> Option<Pooled> {
        let mut host = slot.lock();
        let mut now = None;
        while let Some(idle) = host.idle.pop() {
            let now = *now.get_or_insert_with(crate::clock::coarse_monotonic_nanos);
            if idle.sender.is_closed() || idle_too_long(now, idle.since, self.0.idle_timeout) {
                continue;
            }
            return Some(Pooled {
                sender: Sender::H1(idle.sender),
                proxied: idle.proxied,
                reused: true,
                stream: None,
            });
        }
        if host.h2.is_empty() {
            return None;
        }
        host.h2.retain(|shared| !shared.sender.is_closed());
        host.h2.iter_mut().find_map(|shared| {
            let stream = shared.load.try_open()?;
            shared.taken += 1;
            Some(Pooled {
                sender: Sender::H2(shared.sender.clone()),
                proxied: shared.proxied,
                reused: true,
                stream: Some(stream),
            })
        })
    }

    /// For a request that found nothing to take: a connection being made
    /// to wait for (`Wait`), or the go-ahead to make one (`Connect`), with a
    /// guard for later requests to wait on when it may turn out HTTP/2
    /// (`https`, to a host not seen to answer HTTP/1). `may_wait` is false
    /// for a request that waited once already.
    pub fn plan(&self, slot: &Arc<Slot>, https: bool, may_wait: bool) -> Plan {
        let mut host = slot.lock();
        match &host.connecting {
            Some(notify) if may_wait => Plan::Wait(notify.clone()),
            Some(_) => Plan::Connect(None),
            None if https && !host.h1 => {
                let notify = Arc::new(Notify::new());
                host.connecting = Some(notify.clone());
                Plan::Connect(Some(Connecting {
                    slot: slot.clone(),
                    notify,
                }))
            }
            None => Plan::Connect(None),
        }
    }

    /// Waits until the connection `notify` stands for is made or failed.
    pub async fn wait(&self, slot: &Slot, notify: &Notify) {
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before looking: a wake-up between the look and the
        // wait is not missed.
        notified.as_mut().enable();
        let still = slot
            .lock()
            .connecting
            .as_ref()
            .is_some_and(|n| std::ptr::eq(Arc::as_ptr(n), notify));
        if still {
            notified.await;
        }
    }

    /// Gives back an HTTP/1 connection whose response has ended.
    pub fn put(&self, slot: &Slot, sender: http1::SendRequest<Body>, proxied: bool) {
        if sender.is_closed() {
            return;
        }
        let idle = Idle {
            sender,
            proxied,
            since: crate::clock::coarse_monotonic_nanos(),
        };
        slot.lock().idle.push(idle);
        self.sweep_later();
    }

    /// Shares a new HTTP/2 connection, whose streams `load` counts; returns
    /// the stream of the request that made it.
    pub fn share(
        &self,
        slot: &Slot,
        sender: &http2::SendRequest<Body>,
        proxied: bool,
        load: Arc<Load>,
    ) -> Stream {
        let stream = load.open();
        let mut host = slot.lock();
        host.h2.retain(|shared| !shared.sender.is_closed());
        host.h2.push(Shared {
            sender: sender.clone(),
            proxied,
            load,
            taken: 0,
            swept: 0,
            quiet: 0,
        });
        drop(host);
        self.sweep_later();
        stream
    }

    /// The most streams the host's shared HTTP/2 connections allow open at
    /// once (the least of them), if it has any: what a new connection to it
    /// assumes until the upstream says otherwise (rather than hyper's 100).
    pub fn streams_allowed(&self, slot: &Slot) -> Option<usize> {
        let host = slot.lock();
        host.h2
            .iter()
            .filter(|shared| !shared.sender.is_closed())
            .map(|shared| shared.load.max.load(Ordering::Relaxed))
            .min()
    }

    /// Stops sharing the HTTP/2 connection whose streams `load` counts (it
    /// refused a request as closed, though it did not look so, or is going
    /// away).
    pub fn unshare(&self, slot: &Slot, load: &Arc<Load>) {
        slot.lock()
            .h2
            .retain(|shared| !Arc::ptr_eq(&shared.load, load));
    }

    /// Starts the task that closes connections idle too long, once, on the
    /// runtime this runs on (none outside one: connections are then still
    /// skipped when too old).
    fn sweep_later(&self) {
        if self.0.sweeping.load(Ordering::Relaxed) || self.0.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.0.sweeping.store(false, Ordering::Release);
            return;
        };
        let pool = Arc::downgrade(&self.0);
        let every = (self.0.idle_timeout / 2).max(Duration::from_millis(10));
        runtime.spawn(sweep(pool, every));
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        let hosts = self.0.hosts.lock().unwrap();
        hosts.map.values().map(|slot| slot.lock().idle.len()).sum()
    }
}

/// What a request that found no connection to take does.
pub(super) enum Plan {
    /// Waits for the connection being made (see [`Pool::wait`]).
    Wait(Arc<Notify>),
    Connect(Option<Connecting>),
}

/// A connection being made that others wait for: dropped once it is made
/// (and shared, if HTTP/2) or failed, which wakes them.
pub(super) struct Connecting {
    slot: Arc<Slot>,
    notify: Arc<Notify>,
}

impl Connecting {
    /// The connection made is HTTP/1: the host is not waited for again.
    pub fn h1(self) {
        self.slot.lock().h1 = true;
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        let mut host = self.slot.lock();
        if host
            .connecting
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
        {
            host.connecting = None;
        }
        drop(host);
        self.notify.notify_waiters();
    }
}

async fn sweep(pool: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let now = crate::clock::coarse_monotonic_nanos();
        let mut hosts = inner.hosts.lock().unwrap_or_else(|e| e.into_inner());
        // A slot no response holds, with nothing left in it, goes (the
        // last one looked up is looked up in the map again).
        hosts.last = None;
        hosts.map.retain(|_, slot| {
            let mut host = slot.lock();
            host.sweep(now, inner.idle_timeout);
            !host.is_empty() || Arc::strong_count(slot) > 1
        });
    }
}

/// FNV-1a: a few instructions a byte for the short keys here (SipHash,
/// the standard map's, costs more than the rest of a lookup).
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1 connection to a server that answers each request with an
    /// empty 200 and keeps the connection (or closes it after the first).
    async fn connection(close: bool) -> http1::SendRequest<Body> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            loop {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
                if close {
                    return;
                }
            }
        });
        let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (sender, conn) = http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    /// An HTTP/2 (prior knowledge) connection to a server that answers each
    /// request with 200 and `parts` body parts `gap` apart; the flag is set
    /// once the server's side of the connection has closed.
    async fn h2_connection(
        parts: usize,
        gap: Duration,
    ) -> (http2::SendRequest<Body>, Arc<AtomicBool>) {
        use futures_util::stream;
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(move |_| async move {
                let body = stream::unfold(0, move |i| async move {
                    if i == parts {
                        return None;
                    }
                    tokio::time::sleep(gap).await;
                    let part = Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from("x")));
                    Some((part, i + 1))
                });
                Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(body)))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(sock), service)
                .await;
            flag.store(true, Ordering::SeqCst);
        });
        let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, closed)
    }

    /// Whether `flag` is set within `seconds`.
    async fn set_within(flag: &AtomicBool, seconds: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
        while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flag.load(Ordering::SeqCst)
    }

    fn request() -> http::Request<Body> {
        let mut request = http::Request::new(Body::default());
        *request.uri_mut() = Uri::from_static("http://api.example/");
        request
    }

    #[tokio::test]
    async fn the_shared_http2_connection_is_let_go_once_no_request_took_it_for_long() {
        let pool = Pool::new(Duration::from_millis(200)); // swept every 100 ms
        let slot = slot(&pool, "https://api.example/");
        let (sender, closed) = h2_connection(0, Duration::ZERO).await;
        drop(pool.share(&slot, &sender, false, Load::new(100)));
        drop(sender);
        // Taken every 10 ms for 400 ms: kept.
        for _ in 0..40 {
            assert!(pool.take(&slot).is_some(), "kept while in use");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Not taken: let go within two or three sweeps, and then closed.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(pool.take(&slot).is_none());
        assert!(set_within(&closed, 3).await, "the connection let go closes");
    }

    #[tokio::test]
    async fn an_http2_connection_takes_no_more_streams_than_the_upstream_allows() {
        let pool = Pool::new(Duration::from_secs(90));
        let slot = slot(&pool, "https://api.example/");
        let (sender, _) = h2_connection(0, Duration::ZERO).await;
        let load = Load::new(3);
        // The request that made the connection has the first stream.
        let first = pool.share(&slot, &sender, false, load.clone());
        let second = pool.take(&slot).and_then(|p| p.stream).expect("room");
        let third = pool.take(&slot).and_then(|p| p.stream).expect("room");
        assert_eq!(load.streams(), 3);
        assert!(pool.take(&slot).is_none(), "full: no fourth stream on it");
        assert_eq!(load.streams(), 3, "a request turned away opens none");
        drop(second);
        let again = pool.take(&slot).expect("a stream ended: room again");
        assert!(pool.take(&slot).is_none());
        // The upstream allowing more (its SETTINGS changed): room at once.
        load.set_max(5);
        let more: Vec<_> = (0..2).filter_map(|_| pool.take(&slot)).collect();
        assert_eq!(more.len(), 2);
        assert!(pool.take(&slot).is_none());
        assert_eq!(load.streams(), 5);
        drop((first, third, again, more));
        assert_eq!(load.streams(), 0, "every stream ended");
    }

    #[tokio::test]
    async fn requests_finding_the_shared_connection_full_make_another_and_share_it() {
        let pool = Pool::new(Duration::from_secs(90));
        let slot = slot(&pool, "https://api.example/");
        let (full, _) = h2_connection(0, Duration::ZERO).await;
        let (other, _) = h2_connection(0, Duration::ZERO).await;
        let (a, b) = (Load::new(1), Load::new(2));
        let _on_a = pool.share(&slot, &full, false, a.clone());
        assert!(pool.take(&slot).is_none());
        // The next request makes a connection, and the ones after it wait for
        // that one rather than each making its own.
        let Plan::Connect(Some(guard)) = pool.plan(&slot, true, true) else {
            panic!("a new connection, with a guard to wait on");
        };
        assert!(matches!(pool.plan(&slot, true, true), Plan::Wait(_)));
        // The new connection assumes what the host's other allows until its
        // upstream says otherwise.
        assert_eq!(pool.streams_allowed(&slot), Some(1));
        let _on_b = pool.share(&slot, &other, false, b.clone());
        drop(guard);
        let Some(Pooled {
            stream: Some(stream),
            reused: true,
            ..
        }) = pool.take(&slot)
        else {
            panic!("a stream on the new connection");
        };
        assert!(Arc::ptr_eq(stream.load(), &b));
        assert_eq!((a.streams(), b.streams()), (1, 2));
        // A connection refusing a request as closed is no longer shared; the
        // other still is.
        pool.unshare(&slot, &b);
        drop(stream);
        assert!(pool.take(&slot).is_none(), "b unshared, a still full");
        drop(_on_a);
        let taken = pool.take(&slot).and_then(|p| p.stream).expect("room on a");
        assert!(Arc::ptr_eq(taken.load(), &a));
    }

    #[tokio::test]
    async fn a_stream_still_open_outlives_its_connection_being_let_go() {
        let pool = Pool::new(Duration::from_millis(100)); // swept every 50 ms
        let slot = slot(&pool, "https://api.example/");
        let (sender, closed) = h2_connection(10, Duration::from_millis(60)).await;
        drop(pool.share(&slot, &sender, false, Load::new(100)));
        drop(sender);
        let Some(Pooled {
            sender: Sender::H2(mut sender),
            ..
        }) = pool.take(&slot)
        else {
            panic!("the shared connection");
        };
        let response = sender.send_request(request()).await.unwrap();
        drop(sender);
        // The pool lets the connection go while the body is still coming
        // (10 parts 60 ms apart); the body still arrives whole.
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(pool.take(&slot).is_none(), "let go meanwhile");
        assert_eq!(body, "x".repeat(10));
        assert!(set_within(&closed, 3).await, "closed once its stream ended");
    }

    #[tokio::test]
    async fn requests_wait_once_for_a_connection_that_may_be_http2() {
        let pool = Pool::new(Duration::from_secs(90));
        let slot = slot(&pool, "https://api.example/");
        let Plan::Connect(Some(guard)) = pool.plan(&slot, true, true) else {
            panic!("the first request makes the connection, with a guard");
        };
        let Plan::Wait(notify) = pool.plan(&slot, true, true) else {
            panic!("the next one waits for it");
        };
        assert!(matches!(pool.plan(&slot, true, false), Plan::Connect(None)));
        let waiting = tokio::spawn({
            let (pool, slot) = (pool.clone(), slot.clone());
            async move { pool.wait(&slot, &notify).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(guard); // made (or failed): the waiter goes on
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken")
            .unwrap();
        // A connection that failed leaves the next request to make one.
        assert!(matches!(
            pool.plan(&slot, true, true),
            Plan::Connect(Some(_))
        ));
    }

    #[tokio::test]
    async fn a_wait_after_the_connection_was_made_returns_at_once() {
        let pool = Pool::new(Duration::from_secs(90));
        let slot = slot(&pool, "https://api.example/");
        let Plan::Connect(Some(guard)) = pool.plan(&slot, true, true) else {
            panic!()
        };
        let Plan::Wait(notify) = pool.plan(&slot, true, true) else {
            panic!()
        };
        drop(guard); // before the waiter looks: its wake-up is not lost
        tokio::time::timeout(Duration::from_secs(1), pool.wait(&slot, &notify))
            .await
            .expect("not left waiting");
    }

    #[tokio::test]
    async fn a_host_that_answered_http1_and_plain_http_are_not_waited_for() {
        let pool = Pool::new(Duration::from_secs(90));
        let tls = slot(&pool, "https://api.example/");
        let Plan::Connect(Some(guard)) = pool.plan(&tls, true, true) else {
            panic!()
        };
        guard.h1();
        assert!(matches!(pool.plan(&tls, true, true), Plan::Connect(None)));
        let plain = slot(&pool, "http://api.example/");
        assert!(matches!(
            pool.plan(&plain, false, true),
            Plan::Connect(None)
        ));
        assert!(matches!(
            pool.plan(&plain, false, true),
            Plan::Connect(None)
        ));
    }

    fn key(url: &str) -> Key {
        Key::of(&url.parse().unwrap()).unwrap()
    }

    fn slot(pool: &Pool, url: &str) -> Arc<Slot> {
        pool.slot(&url.parse().unwrap()).unwrap()
    }

    #[test]
    fn keys_compare_scheme_and_authority_regardless_of_case() {
        assert_eq!(
            key("http://Example.COM:80/a"),
            key("http://example.com:80/b")
        );
        assert_ne!(key("http://example.com/"), key("https://example.com/"));
        assert_ne!(key("http://example.com:81/"), key("http://example.com:80/"));
        assert_eq!(Key::of(&"/path".parse().unwrap()), None);
        let hash = |k: &Key| {
            use std::hash::BuildHasher;
            BuildHasherDefault::<Fnv>::default().hash_one(k)
        };
        assert_eq!(hash(&key("http://A.b/")), hash(&key("http://a.B/")));
        assert_ne!(hash(&key("http://a.b/")), hash(&key("http://a.c/")));
    }

    #[test]
    fn a_host_has_one_slot_however_its_uri_was_made() {
        let pool = Pool::new(Duration::from_secs(90));
        let kept: Uri = "http://Example.com:8080/a".parse().unwrap();
        let first = pool.slot(&kept).unwrap();
        // The same bytes (a clone), then equal ones parsed apart, in
        // another case: one slot.
        assert!(Arc::ptr_eq(&pool.slot(&kept.clone()).unwrap(), &first));
        assert!(Arc::ptr_eq(
            &slot(&pool, "http://example.COM:8080/b"),
            &first
        ));
        let other = slot(&pool, "http://example.com:8081/");
        assert!(!Arc::ptr_eq(&other, &first));
        assert!(!Arc::ptr_eq(
            &slot(&pool, "https://example.com:8080/"),
            &first
        ));
        // Back to the first host, last looked up or not.
        assert!(Arc::ptr_eq(&pool.slot(&kept).unwrap(), &first));
        assert!(Arc::ptr_eq(&pool.slot(&kept).unwrap(), &first));
        assert!(Arc::ptr_eq(
            &slot(&pool, "http://example.com:8081/x"),
            &other
        ));
    }

    #[tokio::test]
    async fn a_connection_given_back_is_taken_again_newest_first() {
        let pool = Pool::new(Duration::from_secs(90));
        let k = slot(&pool, "http://127.0.0.1:1/");
        assert_eq!(k.header, "127.0.0.1:1");
        assert!(pool.take(&k).is_none());
        let (a, b) = (connection(false).await, connection(false).await);
        pool.put(&k, a, false);
        pool.put(&slot(&pool, "http://127.0.0.1:1/a"), b, true);
        let first = pool.take(&k).unwrap();
        assert!(first.reused && first.proxied, "the newest first");
        let second = pool.take(&k).unwrap();
        assert!(!second.proxied);
        assert!(pool.take(&k).is_none());
        assert!(pool.take(&slot(&pool, "http://127.0.0.1:2/")).is_none());
        assert!(pool.slot(&"/no/host".parse().unwrap()).is_none());
    }

    #[tokio::test]
    async fn closed_and_expired_connections_are_not_taken() {
        let pool = Pool::new(Duration::from_millis(300));
        let k = slot(&pool, "http://127.0.0.1:1/");
        let mut closing = connection(true).await;
        let request = http::Request::get("/").body(Body::default()).unwrap();
        closing.send_request(request).await.unwrap();
        pool.put(&k, connection(false).await, false);
        // The server's close arrives while the connection is idle.
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.put(&k, closing, false);
        let taken = pool.take(&k).expect("the open one");
        let Sender::H1(mut sender) = taken.sender else {
            panic!("HTTP/1")
        };
        sender.ready().await.unwrap();
        pool.put(&k, sender, false);
        assert_eq!(pool.idle(), 1);
        // Past the idle timeout it is skipped, and the sweep drops it.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(pool.idle(), 0);
        assert!(pool.take(&k).is_none());
    }
}
