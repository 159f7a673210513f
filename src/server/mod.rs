//! The native HTTP server of `keyfailover serve`: hyper (HTTP/1.1 with
//! keep-alive and pipelining, HTTP/2 cleartext) on the one tokio runtime,
//! in front of one or more [`Gateway`]s. It only translates: every decision
//! (client tokens, BYOK, limits, admin endpoints, failover) is the gateway's,
//! exactly as for the ASGI app.
//!
//! Bad input gets an answer, not a crash: a malformed request 400 and
//! oversized headers 431 (both from hyper; an HTTP/1.1 request without
//! exactly one `Host` 400 from here), a request head not complete
//! within `header_timeout` a closed connection (slowloris; the same timer
//! closes idle keep-alive connections; a connection that sends no request
//! at all, or only an HTTP/2 preface, closes as late), connections beyond
//! `max_connections` a 503 and a close.
//!
//! Shutdown ([`Server::shutdown`]): stop accepting, let requests and streams
//! in flight finish for `grace`, then end those left with a proper error
//! (503, or an SSE error event for streams) and close.

pub mod access_log;
mod admin;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures_util::{stream, FutureExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::body::Direct;
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, Level, Record};
use crate::failover::Response;
use crate::gateway::{Gateway, Step, ADMIN_SEGMENT};
use crate::headers::RequestHead;
use crate::latch::Latch;
use access_log::{AccessLog, Entry};

/// Once a connection is done, what the client still sends is read (and
/// dropped) for this long and up to this much before the socket is closed:
/// closing with unread data would reset the connection, and the client,
/// still sending a body the server refused, would lose the answer.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 8 * 1024 * 1024;
/// An unneeded request body is drained while its parts arrive at most this
/// far apart.
const DRAIN_PAUSE: Duration = Duration::from_millis(100);

/// How long requests get after the grace period, once ended with an error,
/// to reach their callers before the server stops waiting.
const AFTER_GRACE: Duration = Duration::from_secs(5);

/// Settings of a [`Server`].
#[derive(Clone)]
pub struct ServerOptions {
    /// A request head must arrive within this (also: idle keep-alive
    /// connections close after it).
    pub header_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Request heads larger than this get 431 (at least 8 KiB).
    pub max_header_bytes: usize,
    /// On shutdown, how long requests in flight may take to finish.
    pub grace: Duration,
    /// Serve HTTP/2 cleartext (prior knowledge) besides HTTP/1.1.
    pub http2: bool,
    pub access_log: Option<AccessLog>,
    /// Tokens for the server-wide admin area (`/_keyfailover/` when no
    /// route takes `/`); see [`admin`].
    pub admin_tokens: Option<Vec<Vec<u8>>>,
}

/// The admin tokens are counted, never shown.
impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("header_timeout", &self.header_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("grace", &self.grace)
            .field("http2", &self.http2)
            .field("access_log", &self.access_log.is_some())
            .field(
                "admin_tokens",
                &format_args!("{}", self.admin_tokens.as_ref().map_or(0, Vec::len)),
            )
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_header_bytes: crate::gateway::MAX_HEAD_BYTES,
            grace: Duration::from_secs(10),
            http2: true,
            access_log: None,
            admin_tokens: None,
        }
    }
}

/// Requests whose path is `prefix` or below it go to `gateway`, with the
/// prefix cut off; the empty prefix takes everything.
pub struct Route {
    pub prefix: String,
    pub gateway: Arc<Gateway>,
}

pub type Body = UnsyncBoxBody<Bytes, Error>;

pub struct Server {
    /// Longest prefix first; replaced whole by [`Server::set_routes`].
    routes: ArcSwap<Vec<Route>>,
    options: ServerOptions,
    http: auto::Builder<TokioExecutor>,
    stop: Latch,
    /// Set when the grace period is over: requests still reading their
    /// bodies end then, as those waiting for upstream do.
    expired: Latch,
    connections: Arc<Semaphore>,
    /// The answer to a connection over the limit: 503, then close.
    refusal: Bytes,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field(
                "routes",
                &self
                    .routes
                    .load()
                    .iter()
                    .map(|r| r.prefix.clone())
                    .collect::<Vec<_>>(),
            )
            .field("options", &self.options)
            .finish()
    }
}

impl Server {
    pub fn new(routes: Vec<Route>, options: ServerOptions) -> Result<Self> {
        let routes = checked(routes)?;
        if options.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        let mut http = auto::Builder::new(TokioExecutor::new());
        // The header read timeout is set for every request and met by all
        // but a slowloris: kept coarsely (see `timer`).
        http.http1()
            .timer(crate::timer::Coarse)
            .header_read_timeout(options.header_timeout)
            .max_buf_size(options.max_header_bytes.max(8192));
        // Not `pipeline_flush`: with it, hyper 1.x never sends the 400 or 431
        // it writes for a request head that does not parse.
        http.http2()
            .timer(crate::timer::Coarse)
            .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
        if !options.http2 {
            http = http.http1_only();
        }
        let refusal = refusal(&routes[0].gateway);
        Ok(Self {
            connections: Arc::new(Semaphore::new(options.max_connections)),
            routes: ArcSwap::from_pointee(routes),
            options,
            http,
            stop: Latch::new(),
            expired: Latch::new(),
            refusal,
        })
    }

    /// Replaces the routes (a reloaded configuration): requests from now on
    /// take the new ones; those in flight finish on the old.
    pub fn set_routes(&self, routes: Vec<Route>) -> Result<()> {
        let old = self.routes.swap(Arc::new(checked(routes)?));
        let new = self.routes.load();
        // Dashboards of a route rebuilt or gone reconnect, to what is there now.
        for route in old.iter() {
            if !new.iter().any(|r| Arc::ptr_eq(&r.gateway, &route.gateway)) {
                route
                    .gateway
                    .drain("a reload rebuilt this route: reconnect to see it as it is now");
            }
        }
        Ok(())
    }

    /// Stops accepting and lets requests in flight finish (see the module).
    pub fn shutdown(&self) {
        self.stop.set();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.stop.is_set()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.options.max_connections - self.connections.available_permits()
    }

    /// Serves `listener` until [`Server::shutdown`] and the drain after it.
    /// Call within the runtime.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> Result<()> {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.stop.wait() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    if !is_per_connection(&err) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let server = self.clone();
                    tracker.spawn(async move {
                        server.connection(stream).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    let refusal = self.refusal.clone();
                    tracker.spawn(refuse(stream, refusal));
                }
            }
        }
        drop(listener);
        // Dashboards end now: their streams would hold the drain to the end.
        for route in self.routes.load().iter() {
            route.gateway.drain("the server is shutting down");
        }
        tracker.close();
        if tokio::time::timeout(self.options.grace, tracker.wait())
            .await
            .is_err()
        {
            self.expired.set();
            for route in self.routes.load().iter() {
                route.gateway.client().shutdown();
            }
            let _ = tokio::time::timeout(AFTER_GRACE, tracker.wait()).await;
        }
        Ok(())
    }

    async fn connection(self: &Arc<Self>, stream: TcpStream) {
        let server = self.clone();
        let watch = Arc::new(Watch::default());
        let requests = watch.clone();
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let server = server.clone();
            requests.request();
            // Boxed: a connection holds its service's future for as long as
            // it is open, and a request's (about 4 KB) is only needed until
            // the response head is out, not for the rest of a stream.
            Box::pin(
                async move { Ok::<_, Infallible>(server.unpanicked(server.handle(request)).await) },
            )
        });
        let conn = self
            .http
            .serve_connection(TokioIo::new(Lingering(Some(stream))), service);
        let mut conn = std::pin::pin!(conn);
        let watched = Watched {
            conn: conn.as_mut(),
            watch: &watch,
            sleep: Some(Box::pin(tokio::time::sleep(self.options.header_timeout))),
        };
        match self.stop.guard(watched).await {
            // Done, or closed for sending no request in time.
            Some(_) => {}
            // Shutting down: a connection that never sent a request has none
            // to finish (and a client sending nothing would hold the drain).
            None if !watch.any_request() => {}
            None => {
                // Finish the request in flight (if any), then close.
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// `handling`'s answer; if it panicked (a bug), a 500 in the provider's
    /// envelope and an error logged, not a connection closed unanswered.
    async fn unpanicked(
        &self,
        handling: impl std::future::Future<Output = hyper::Response<Body>>,
    ) -> hyper::Response<Body> {
        match AssertUnwindSafe(handling).catch_unwind().await {
            Ok(response) => response,
            Err(_) => {
                events::emit(Record {
                    logger: "keyfailover.proxy",
                    level: Level::Error,
                    message: "a request failed with an internal error (a bug, see the \
                              panic above): answered 500"
                        .to_owned(),
                    fields: Vec::new(),
                });
                let routes = self.routes.load();
                let gateway = &routes[routes.len() - 1].gateway;
                let mut response =
                    closing(gateway.answer(ErrorKind::Api, "keyfailover internal error (a bug)"));
                response.status = 500;
                into_hyper(response, (hyper::Method::GET, hyper::Uri::default()), None)
            }
        }
    }

    async fn handle(&self, request: hyper::Request<Incoming>) -> hyper::Response<Body> {
        let started = self.options.access_log.is_some().then(Instant::now);
        let (parts, body) = request.into_parts();
        let head = RequestHead::of(&parts.headers);
        // The client waits for a 100 Continue before it sends the body, which
        // hyper sends once the body is read: a body not needed is not asked for.
        let waits = head.expects_continue;
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let routes = self.routes.load_full();
        let method = parts.method.as_str();
        // An HTTP/1.1 request has exactly one Host (RFC 9112, section 3.2: a
        // server answers 400 otherwise; hyper leaves the check to its user).
        // Its value is not looked at: requests go to the route's upstream
        // whatever host the caller named.
        let host_ok = parts.version != http::Version::HTTP_11 || head.hosts == 1;
        // Routed as the route will forward it, dot segments resolved
        // (`/x/../a/v1` is route /a's); a target that will not resolve is
        // left for the route to refuse.
        // Without a dot or a percent sign there is no dot segment.
        let dotted = || memchr::memchr2(b'.', b'%', target.as_bytes()).is_some();
        let resolved = if (routes.len() > 1 || !routes[0].prefix.is_empty()) && dotted() {
            crate::target::normalize_target(target).unwrap_or(Cow::Borrowed(target))
        } else {
            Cow::Borrowed(target)
        };
        let target = &*resolved;
        // What the access log shows: the path with its route's prefix.
        let full = target;
        let (route, target) = match route(&routes, target) {
            Some(found) if host_ok => found,
            // `OPTIONS *` and the like: the gateway refuses them (400), as it
            // does under an ASGI server, which has no routes to miss.
            None if host_ok && !target.starts_with('/') => {
                (&routes[routes.len() - 1], Cow::Borrowed(target))
            }
            _ => {
                let fallback = &routes[routes.len() - 1].gateway;
                let path = target.split('?').next().unwrap_or(target);
                let response = if !host_ok {
                    fallback.answer(
                        ErrorKind::InvalidRequest,
                        "an HTTP/1.1 request needs exactly one Host header",
                    )
                } else if admin::is_admin_path(path) {
                    self.admin(&routes, method, path, &parts.headers)
                } else {
                    fallback.answer(ErrorKind::NotFound, "no route for this path")
                };
                if let Some(log) = &self.options.access_log {
                    log.log(&Entry {
                        method,
                        path: &redacted(&routes, path),
                        status: response.status,
                        attempts: 0,
                        key: None,
                        byok: false,
                        exhausted: false,
                        pool: "",
                        duration: started.map_or(Duration::ZERO, |s| s.elapsed()),
                    });
                }
                let (response, unread) = unneeded(response, body, waits).await;
                return into_hyper(response, (parts.method, parts.uri), unread);
            }
        };
        let gateway = &route.gateway;
        // A body left unread is held until the answer is sent (see `Out`).
        let step = gateway.begin_with(method, &target, parts.headers, head);
        let (response, byok, unread) = match step {
            Step::Respond(response) => {
                let (response, unread) = unneeded(response, body, waits).await;
                (response, false, unread)
            }
            Step::Forward(forward) => {
                let byok = forward.byok();
                let pause = gateway.body_timeout();
                let read = read_body(body, gateway.max_body_bytes(), pause);
                match self
                    .expired
                    .guard(read)
                    .await
                    .unwrap_or(Err(BodyError::Expired))
                {
                    Ok(bytes) => (gateway.forward(forward, bytes).await, byok, None),
                    Err(BodyError::TooLarge(rest)) => {
                        let (response, unread) = unneeded(gateway.too_large(), rest, false).await;
                        (response, byok, unread)
                    }
                    Err(BodyError::Broken) => (
                        gateway.answer(
                            ErrorKind::InvalidRequest,
                            "the request body could not be read",
                        ),
                        byok,
                        None,
                    ),
                    Err(BodyError::Stalled) => (gateway.body_stalled(), byok, None),
                    Err(BodyError::Expired) => (gateway.shutting_down(), byok, None),
                }
            }
        };
        if let Some(log) = &self.options.access_log {
            log.log(&Entry {
                method,
                // Any route's keys: a caller may name another route's.
                path: &redacted(&routes, full.split('?').next().unwrap_or(full)),
                status: response.status,
                attempts: response.attempts,
                key: response.key_label.as_deref(),
                byok,
                exhausted: response.exhausted,
                pool: gateway.client().name(),
                duration: started.map_or(Duration::ZERO, |s| s.elapsed()),
            });
        }
        into_hyper(response, (parts.method, parts.uri), unread)
    }
}

/// Checks `routes` (at least one; prefixes start with `/`, none twice) and
/// sorts them longest prefix first.
fn checked(mut routes: Vec<Route>) -> Result<Vec<Route>> {
    if routes.is_empty() {
        return Err(Error::Config("a server needs at least one route".into()));
    }
    for route in &mut routes {
        let prefix = route.prefix.trim_end_matches('/');
        if !prefix.is_empty() && !prefix.starts_with('/') {
            return Err(Error::Config(format!(
                "route {:?} must start with /",
                route.prefix
            )));
        }
        // What a request line can carry as it is (RFC 3986's path characters,
        // no escapes): a prefix with anything else is never matched.
        let path_char = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b);
        if !prefix.bytes().all(path_char) {
            return Err(Error::Config(format!(
                "route {:?} holds characters a URL path does not carry as they are",
                route.prefix
            )));
        }
        // The admin areas (the server's, and each route's below its prefix)
        // are the server's: a route there would take their requests upstream.
        if prefix.split('/').any(|segment| segment == ADMIN_SEGMENT) {
            return Err(Error::Config(format!(
                "route {:?} is in an admin area (/{ADMIN_SEGMENT})",
                route.prefix
            )));
        }
        route.prefix = prefix.to_owned();
    }
    routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    // With several routes `/_keyfailover/` is the server-wide area, over
    // every pool: a route at `/` would take it for its own.
    if routes.len() > 1 && routes[routes.len() - 1].prefix.is_empty() {
        return Err(Error::Config(format!(
            "a route at \"/\" beside others would take the server-wide admin area \
             (/{ADMIN_SEGMENT}/): with several routes, each needs a prefix"
        )));
    }
    if let Some(pair) = routes.windows(2).find(|w| w[0].prefix == w[1].prefix) {
        return Err(Error::Config(format!(
            "two routes at {:?}",
            if pair[0].prefix.is_empty() {
                "/"
            } else {
                &pair[0].prefix
            }
        )));
    }
    Ok(routes)
}

/// The route for `target` and the target below its prefix.
fn route<'r, 't>(routes: &'r [Route], target: &'t str) -> Option<(&'r Route, Cow<'t, str>)> {
    routes.iter().find_map(|route| {
        let rest = target.strip_prefix(route.prefix.as_str())?;
        match rest.as_bytes().first() {
            None => Some((route, Cow::Borrowed("/"))),
            Some(b'/') => Some((route, Cow::Borrowed(rest))),
            Some(b'?') => Some((route, Cow::Owned(format!("/{rest}")))),
            _ => None,
        }
    })
}

/// `path` with every key of every route's pool replaced by its hint, for
/// the access log: a caller may put a key in a path (an admin action named
/// by the key rather than its label, say).
fn redacted<'p>(routes: &[Route], path: &'p str) -> Cow<'p, str> {
    routes.iter().fold(Cow::Borrowed(path), |path, route| {
        match route.gateway.redact(&path) {
            Cow::Borrowed(_) => path,
            Cow::Owned(clean) => Cow::Owned(clean),
        }
    })
}

/// Accept errors that concern one connection only (it was reset before we
/// took it): go on at once.
fn is_per_connection(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

fn refusal(gateway: &Gateway) -> Bytes {
    let response = gateway.answer(
        ErrorKind::Unavailable,
        "too many connections: try again shortly",
    );
    let body = response
        .body
        .try_next_batch()
        .and_then(|r| r.ok().flatten())
        .map(|chunks| chunks.concat())
        .unwrap_or_default();
    let mut out = BytesMut::new();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    out.freeze()
}

async fn refuse(mut stream: TcpStream, answer: Bytes) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

enum BodyError {
    /// Over the limit; the rest of the body is still on its way.
    TooLarge(Incoming),
    /// The client left, or sent a body that does not parse.
    Broken,
    /// No part of the body came for the pause allowed (a slowloris on the
    /// body rather than the head).
    Stalled,
    /// The server's grace period ended first.
    Expired,
}

/// Reads a request body of at most `limit` bytes whose parts come at most
/// `pause` apart.
async fn read_body(
    mut body: Incoming,
    limit: u64,
    pause: Duration,
) -> std::result::Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut size: u64 = 0;
    loop {
        let frame = match crate::timer::timeout(pause, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => return Err(BodyError::Stalled),
        };
        let frame = frame.map_err(|_| BodyError::Broken)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        size += data.len() as u64;
        if size > limit {
            return Err(BodyError::TooLarge(body));
        }
        match &first {
            None => first = Some(data),
            Some(head) => {
                if rest.is_empty() {
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&data);
            }
        }
        // Its length says it is complete: no read for its end.
        if hyper::body::Body::is_end_stream(&body) {
            break;
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

/// Answers with `response` a request whose body it does not need. What of
/// the body arrives promptly is read and dropped, so that a client still
/// sending gets the answer and may keep its connection; a body that stalls
/// or is too big to drain is left, and the connection closes after the
/// answer (which says so). A client that `waits` for a 100 Continue before
/// sending is not asked for the body at all. Returns what is left of the
/// body, held until the answer is sent.
async fn unneeded(
    response: Response,
    mut body: Incoming,
    waits: bool,
) -> (Response, Option<Incoming>) {
    use hyper::body::Body as _;
    if waits && !body.is_end_stream() {
        return (closing(response), Some(body));
    }
    let mut read = 0;
    while !body.is_end_stream() && read <= LINGER_BYTES {
        match tokio::time::timeout(DRAIN_PAUSE, body.frame()).await {
            Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, Bytes::len),
            Ok(None) => return (response, None),
            Ok(Some(Err(_))) | Err(_) => break,
        }
    }
    if body.is_end_stream() {
        return (response, None);
    }
    (closing(response), Some(body))
}

/// `response`, with the connection closed after it (the request body was
/// left unread).
fn closing(mut response: Response) -> Response {
    response.headers.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

/// `what` names the request (method and path) in the warning logged if its
/// body breaks.
fn into_hyper(
    response: Response,
    what: (hyper::Method, hyper::Uri),
    unread: Option<Incoming>,
) -> hyper::Response<Body> {
    let Response {
        status,
        headers,
        body,
        ..
    } = response;
    let body = match (body.into_direct(), unread) {
        // Whole already, with no request body left to hold: sent as is. Only
        // with its length said: hyper would add one that the ASGI app, which
        // sends such a body chunked, does not.
        (Direct::Full(bytes), None)
            if crate::headers::has(&headers, &hyper::header::CONTENT_LENGTH) =>
        {
            UnsyncBoxBody::new(
                http_body_util::Full::new(bytes).map_err(|never: Infallible| match never {}),
            )
        }
        (body, unread) => UnsyncBoxBody::new(StreamBody::new(stream::unfold(
            Out {
                body: Some(body),
                queue: VecDeque::new(),
                what,
                _unread: unread,
            },
            Out::next,
        ))),
    };
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    *response.headers_mut() = headers;
    response
}

/// A response body as hyper sends it: the chunks as they arrive. A broken
/// non-SSE body ends in an error, so the connection is aborted rather than
/// the truncated body ended cleanly (and a warning says so); dropping it (the
/// client left) closes the upstream stream.
struct Out {
    body: Option<Direct>,
    queue: VecDeque<Bytes>,
    what: (hyper::Method, hyper::Uri),
    /// A request body the answer did not need: dropped with the answer, not
    /// before, since hyper ends a connection without answering when a body
    /// is dropped unread while its rest still arrives.
    _unread: Option<Incoming>,
}

impl Out {
    async fn next(mut self) -> Option<(std::result::Result<Frame<Bytes>, Error>, Self)> {
        loop {
            if let Some(chunk) = self.queue.pop_front() {
                return Some((Ok(Frame::data(chunk)), self));
            }
            let read = match self.body.as_mut()? {
                // An upstream stream, read straight from its connection.
                Direct::Stream { ready, stream } => match ready.pop_front() {
                    Some(chunk) => Ok(Some(vec![chunk])),
                    None => stream.next_chunk().await.map(|c| c.map(|c| vec![c])),
                },
                Direct::Full(bytes) => {
                    let bytes = std::mem::take(bytes);
                    self.body = None;
                    if bytes.is_empty() {
                        return None;
                    }
                    return Some((Ok(Frame::data(bytes)), self));
                }
                Direct::Body(body) => body.next_batch().await,
            };
            match read {
                Ok(Some(batch)) => self.queue.extend(batch),
                Ok(None) => {
                    // The stream's outcome is counted before the end is sent.
                    self.body = None;
                    return None;
                }
                Err(err) => {
                    events::emit(Record {
                        logger: "keyfailover.proxy",
                        level: Level::Warning,
                        message: format!(
                            "{} {}: the response broke after its head was sent ({err}); \
                             the connection is aborted",
                            self.what.0,
                            self.what.1.path()
                        ),
                        fields: Vec::new(),
                    });
                    self.body = None;
                    return Some((Err(err), self));
                }
            }
        }
    }
}

/// Whether a connection sent a request (see [`Watched`]).
#[derive(Default)]
struct Watch(std::sync::atomic::AtomicBool);

impl Watch {
    fn request(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.0.load(Relaxed) {
            self.0.store(true, Relaxed);
        }
    }

    fn any_request(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A connection, closed when no request has come `timeout` after it
/// opened: it sent nothing, or not even enough for hyper to tell HTTP/1
/// from HTTP/2 (whose header timeouts only start then), or an HTTP/2
/// preface and no request. From its first request on, hyper's timers keep
/// it, and the watchdog's sleep goes (the connection pays a flag's load a
/// wake-up for it). An HTTP/2 connection is then not closed for idleness:
/// closing one while a slow client still reads an answer the kernel holds
/// would lose it, and `max_connections` bounds them.
struct Watched<'a, F> {
    conn: Pin<&'a mut F>,
    watch: &'a Watch,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F: std::future::Future> std::future::Future for Watched<'_, F> {
    /// None: closed for sending no request.
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if this.watch.any_request() {
            this.sleep = None;
            return Poll::Pending;
        }
        match this.sleep.as_mut().map(|sleep| sleep.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// A connection's socket, closed with a linger (see [`LINGER`]) when hyper
/// is done with it.
struct Lingering(Option<TcpStream>);

impl Lingering {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.0.as_mut().expect("a socket until dropped"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(mut stream), Ok(runtime)) =
            (self.0.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async {
                let _ = stream.shutdown().await;
                let mut buf = vec![0u8; 16 * 1024];
                let mut read = 0;
                while read < LINGER_BYTES {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                }
            })
            .await;
        });
    }
}

/// A listening socket from its file descriptor, which it takes over (the
/// caller must not use or close it again): closing it when the server stops
/// accepting is what makes the kernel refuse new connections, rather than
/// queue them for no one, while requests in flight finish.
pub fn listener_from_fd(fd: i32) -> Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a plain query into a local of the size given.
    let queried = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &raw mut len,
        )
    };
    if fd < 0 || queried != 0 || listening == 0 {
        let why = if fd < 0 || queried != 0 {
            std::io::Error::last_os_error().to_string()
        } else {
            "it is not listening".to_owned()
        };
        if fd >= 0 {
            // Handed over all the same: not left open for no one.
            // SAFETY: the caller gave this descriptor up.
            unsafe { libc::close(fd) };
        }
        return Err(Error::Config(format!(
            "descriptor {fd} is not a socket to listen on: {why}"
        )));
    }
    // SAFETY: a listening socket whose descriptor the caller hands over.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Config(format!("cannot use the listening socket: {e}")))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::{ClientOptions, FailoverClient};
    use crate::gateway::GatewayOptions;
    use crate::pool::{Cooldowns, KeyPool};
    use crate::provider::Provider;

    fn route(prefix: &str) -> Route {
        let pool = KeyPool::from_keys(["sk-ant-server-key-0-xxxxxxxx"], Cooldowns::default(), None)
            .unwrap();
        let client = FailoverClient::new(
            pool,
            ClientOptions {
                base_url: "http://127.0.0.1:9".into(),
                provider: Provider::Anthropic,
                timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
                http2: true,
                name: None,
            },
        )
        .unwrap();
        Route {
            prefix: prefix.to_owned(),
            gateway: Arc::new(Gateway::new(Arc::new(client), GatewayOptions::default()).unwrap()),
        }
    }

    fn found<'t>(routes: &[Route], target: &'t str) -> Option<(String, Cow<'t, str>)> {
        super::route(routes, target).map(|(r, rest)| (r.prefix.clone(), rest))
    }

    #[test]
    fn the_longest_prefix_takes_a_path_cut_at_a_segment() {
        let routes = checked(vec![route("/a"), route("/a/b/")]).unwrap();
        assert_eq!(
            routes.iter().map(|r| r.prefix.as_str()).collect::<Vec<_>>(),
            ["/a/b", "/a"]
        );
        let at = |target| found(&routes, target).map(|(p, rest)| (p, rest.into_owned()));
        assert_eq!(
            at("/a/b/v1/x?q=1"),
            Some(("/a/b".into(), "/v1/x?q=1".into()))
        );
        assert_eq!(at("/a/v1"), Some(("/a".into(), "/v1".into())));
        assert_eq!(at("/a"), Some(("/a".into(), "/".into())));
        assert_eq!(at("/a?x=1"), Some(("/a".into(), "/?x=1".into())));
        // "/ab" is not below "/a".
        assert_eq!(at("/ab/v1"), None);
        // A route at "/", alone, takes every path whole.
        let root = checked(vec![route("/")]).unwrap();
        assert_eq!(found(&root, "/ab/v1"), Some(("".into(), "/ab/v1".into())));
    }

    #[test]
    fn routes_are_checked() {
        let error = |routes| match checked(routes) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        };
        assert!(error(vec![]).contains("at least one route"));
        assert!(error(vec![route("a")]).contains("must start with /"));
        assert!(error(vec![route("/a"), route("/a/")]).contains("two routes at \"/a\""));
        assert!(error(vec![route(""), route("/")]).contains("a route at \"/\" beside others"));
        assert!(error(vec![route("/a"), route("/")]).contains("server-wide admin area"));
        let only = checked(vec![route("/a")]).unwrap();
        assert!(found(&only, "/b").is_none());
        for admin in ["/_keyfailover", "/_keyfailover/x", "/v1/_keyfailover"] {
            assert!(error(vec![route(admin)]).contains("admin area"), "{admin}");
        }
        for odd in ["/a b", "/caf\u{e9}", "/a%20b", "/a?b", "/a#b", "/a\tb"] {
            assert!(error(vec![route(odd)]).contains("URL path"), "{odd:?}");
        }
        assert!(checked(vec![route("/_keyfailover2"), route("/v1/x_keyfailover")]).is_ok());
    }

    #[test]
    fn only_a_listening_socket_is_taken_and_closing_it_refuses_connections() {
        use std::os::fd::IntoRawFd;
        let error = |fd| listener_from_fd(fd).unwrap_err().to_string();
        assert!(error(-1).contains("not a socket to listen on"));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(error(udp.into_raw_fd()).contains("it is not listening"));
        let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listening.local_addr().unwrap();
        let taken = listener_from_fd(listening.into_raw_fd()).unwrap();
        assert_eq!(taken.local_addr().unwrap(), address);
        drop(taken);
        let refused = std::net::TcpStream::connect(address).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn the_debug_form_counts_admin_tokens_and_never_shows_them() {
        let options = ServerOptions {
            admin_tokens: Some(vec![b"admin-secret-token".to_vec(), b"second".to_vec()]),
            ..ServerOptions::default()
        };
        let server = Server::new(vec![route("/a")], options).unwrap();
        let shown = format!("{server:?}");
        assert!(shown.contains("admin_tokens: 2"), "{shown}");
        let bytes = format!("{:?}", b"admin-secret-token".to_vec());
        assert!(
            !shown.contains("admin-secret") && !shown.contains(&bytes[..12]),
            "{shown}"
        );
    }

    #[test]
    fn access_log_paths_show_hints_of_any_routes_keys() {
        let routes = checked(vec![route("/a"), route("/b")]).unwrap();
        let path = "/_keyfailover/keys/sk-ant-server-key-0-xxxxxxxx/retire";
        let shown = redacted(&routes, path);
        assert!(!shown.contains("server-key-0"), "{shown}");
        assert!(shown.starts_with("/_keyfailover/keys/") && shown.ends_with("/retire"));
        assert!(matches!(
            redacted(&routes, "/v1/messages"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn new_routes_take_the_next_request() {
        let server = Server::new(vec![route("/a")], ServerOptions::default()).unwrap();
        server.set_routes(vec![route("/b"), route("/c")]).unwrap();
        let routes = server.routes.load_full();
        assert!(found(&routes, "/a/v1").is_none());
        assert_eq!(found(&routes, "/c/v1").unwrap().0, "/c");
        // A bad set changes nothing.
        assert!(server.set_routes(vec![]).is_err());
        assert_eq!(server.routes.load().len(), 2);
    }

    #[tokio::test]
    async fn a_request_whose_handling_panics_is_answered_500() {
        let server = Server::new(vec![route("/a")], ServerOptions::default()).unwrap();
        let response = server
            .unpanicked(async { panic!("a bug in handling a request") })
            .await;
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()["connection"], "close");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "api_error");
        assert_eq!(
            body["error"]["message"],
            "keyfailover internal error (a bug)"
        );
    }
}
