//! The failover client's attempt loop: send a request upstream with a key
//! from the pool, judge the answer, and fail over to the next key on a
//! key-specific failure, all before anything reaches the caller.
//!
//! The rules live elsewhere: which headers go where in `headers`, where the
//! request goes in `target`, what an answer means for its key in `verdict`,
//! how a body is relayed in `body`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::Method;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::body::{
    describe, scrub_value, Decoder, Keys, OutcomeOnDrop, ResponseBody, Scrubber, Stream,
};
use crate::error::{Error, ErrorKind, Exhaustion, Result};
use crate::events::{self, Field, Level, Record};
use crate::headers::{self, CallerCredential};
use crate::latch::Latch;
use crate::metrics::Outcome;
use crate::pool::{InFlight, Key, KeyPool, Reason};
use crate::provider::Provider;
use crate::sse::{first_event_data, Framer};
use crate::stats::{bump, Stats, StatsSnapshot};
use crate::target::BaseUrl;
use crate::upstream::{self, UpstreamError};
use crate::verdict::{self, Verdict};

/// How much of an error body is read, at most, to judge it.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// How long, at most, reading that much may take: a slow error body must not
/// hold up failover for the whole request timeout. What arrived by then is
/// judged (usually: not enough to be a quota error, so a rate limit).
const ERROR_BODY_DEADLINE: Duration = Duration::from_secs(1);
/// How much of a stream is read, at most, looking for its first event.
const PEEK_LIMIT: usize = 64 * 1024;

/// Settings of a [`FailoverClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub base_url: String,
    pub provider: Provider,
    /// How long to wait for a response head (and, for streams, the first
    /// event), and for each chunk of a body.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Whether HTTP/2 is offered to `https://` upstreams; if not, they are
    /// asked for HTTP/1.1 only.
    pub http2: bool,
    /// What logs and metrics call the pool (the `pool` label); the provider's
    /// name when None.
    pub name: Option<String>,
}

/// Whose key a request is sent with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Credential {
    /// The pool's, with failover.
    #[default]
    Pool,
    /// The caller's own (BYOK): sent once, in the header it came in; the
    /// pool is not touched.
    Caller(CallerCredential),
}

/// One request as the caller gives it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// Path and query, as the caller encoded them.
    pub target: String,
    /// The caller's headers; the client applies the forwarding rules
    /// (credentials, hop-by-hop and the like never go upstream).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub credential: Credential,
}

impl Request {
    pub fn new(
        method: &str,
        target: impl Into<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Self> {
        // A message that echoes a caller's text: see `FailoverClient::redacted`.
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Error::BadRequest(format!("invalid HTTP method {:?}", method)))?;
        Ok(Self {
            method,
            target: target.into(),
            headers,
            body,
            credential: Credential::Pool,
        })
    }
}

/// A response: upstream's, or one the client synthesized.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Hop-by-hop headers removed; values as upstream sent them.
    pub headers: HeaderMap,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The pool key behind the final attempt; None for BYOK or no attempt.
    pub key_label: Option<Arc<str>>,
    /// True when the client synthesized a pool-exhaustion error.
    pub exhausted: bool,
    /// Each upstream attempt behind the response, in order.
    pub attempt_log: Vec<AttemptRecord>,
    pub body: ResponseBody,
}

/// One upstream attempt, for traces and debugging.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    /// The pool key's label; None for the caller's own key (BYOK).
    pub key_label: Option<Arc<str>>,
    /// The response status; None when upstream could not be reached.
    pub status: Option<u16>,
    /// Why the request moved on to the next key, if it did.
    pub reason: Option<Reason>,
    /// When the attempt began ([`AttemptRecord::started_unix_nanos`] in
    /// Unix time): kept as an `Instant`, since a wall-clock reading on every
    /// attempt costs time that only traces need.
    pub started: Instant,
    /// Seconds from sending to the response head (or to the failure).
    pub seconds: f64,
}

impl AttemptRecord {
    /// When the attempt began, in Unix time (nanoseconds), from `now`: one
    /// reading of the wall clock and the monotonic one, the same for every
    /// record of a log (their times then keep their order exactly).
    pub fn started_unix_nanos(&self, now: (SystemTime, Instant)) -> u64 {
        let (wall, monotonic) = now;
        let wall = wall.checked_sub(monotonic.saturating_duration_since(self.started));
        wall.unwrap_or(std::time::UNIX_EPOCH)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl Response {
    /// An error response of keyfailover's own, in the provider's envelope.
    pub fn error(provider: Provider, kind: ErrorKind, message: &str) -> Self {
        Self::json(kind.status(), provider.error_body(kind, message))
    }

    /// A JSON response of keyfailover's own.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        let body = body.into();
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Self {
            status,
            headers,
            attempts: 0,
            key_label: None,
            exhausted: false,
            attempt_log: Vec::new(),
            body: ResponseBody::full(body),
        }
    }
}

/// Why an attempt produced no upstream answer that can be relayed.
enum SendFailure {
    Timeout,
    Connect(String),
    /// A status the caller's server could not send (outside 200..=599).
    BadStatus(u16),
    /// A key's own endpoint answered 504: a gateway in front of it gave up.
    GatewayTimeout,
    /// An error body in a content coding that cannot be checked for keys.
    Uncheckable {
        status: u16,
        coding: String,
    },
}

/// The HTTP client of this process (see [`FailoverClient::http`]).
struct Http {
    generation: u64,
    client: upstream::Http,
}

/// Sends requests through a key pool with failover.
pub struct FailoverClient {
    pool: KeyPool,
    http: ArcSwap<Http>,
    base_url: BaseUrl,
    provider: Provider,
    name: String,
    timeout: Duration,
    connect_timeout: Duration,
    http2: bool,
    stats: Stats,
    shutdown: Latch,
}

impl std::fmt::Debug for FailoverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverClient")
            .field("base_url", &self.base_url.as_str())
            .field("provider", &self.provider)
            .field("keys", &self.pool.len())
            .finish()
    }
}

impl FailoverClient {
    pub fn new(pool: KeyPool, options: ClientOptions) -> Result<Self> {
        // Both are shown (a repr, the metrics' pool label): neither may hold
        // a key.
        let shown = [
            ("base_url", Some(&options.base_url)),
            ("name", options.name.as_ref()),
        ];
        for (what, text) in shown {
            if let Some(std::borrow::Cow::Owned(masked)) = text.map(|t| pool.redact(t)) {
                return Err(Error::Config(format!(
                    "{what} {masked:?} holds one of the pool's keys"
                )));
            }
        }
        let base_url = BaseUrl::parse(&options.base_url).map_err(|e| match e {
            Error::Config(message) => Error::Config(pool.redact(&message).into_owned()),
            other => other,
        })?;
        for (name, d) in [
            ("timeout", options.timeout),
            ("connect_timeout", options.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        let http = build_http(options.timeout, options.connect_timeout, options.http2)?;
        let name = options
            .name
            .unwrap_or_else(|| options.provider.as_str().to_owned());
        if name.is_empty() || name.chars().any(|c| c.is_control()) {
            return Err(Error::Config(format!(
                "name {name:?} must be a non-empty name"
            )));
        }
        pool.adopt_name(&name);
        Ok(Self {
            pool,
            http: ArcSwap::from_pointee(http),
            base_url,
            provider: options.provider,
            name,
            timeout: options.timeout,
            connect_timeout: options.connect_timeout,
            http2: options.http2,
            stats: Stats::default(),
            shutdown: Latch::new(),
        })
    }

    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn base_url(&self) -> &str {
        self.base_url.as_str()
    }

    /// The header a caller's own key (BYOK) goes in for a request to
    /// `target` at the client's base URL (for Gemini it depends on the
    /// endpoint: see [`Provider::auth_header_for`]).
    pub fn caller_key_header(&self, target: &str, key: &str) -> (&'static str, String) {
        let url = self
            .base_url
            .join(target)
            .unwrap_or_else(|_| self.base_url.as_str().to_owned());
        self.provider.auth_header_for(key, &url)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The name of the client's pool in logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Prometheus text exposition of the client's pool.
    pub fn metrics(&self) -> String {
        crate::metrics::exposition(&self.pool, &self.name)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Ends every request in flight and refuses new ones: a request still
    /// waiting for its response head gets 503, a stream ends with an error
    /// event, any other body breaks. For a server's shutdown after its grace
    /// period.
    pub fn shutdown(&self) {
        self.shutdown.set();
    }

    pub fn is_shut_down(&self) -> bool {
        self.shutdown.is_set()
    }

    /// Set by [`FailoverClient::shutdown`], for tasks to wait on.
    pub(crate) fn shutdown_latch(&self) -> Latch {
        self.shutdown.clone()
    }

    /// The HTTP client of this process: rebuilt after a fork, since the
    /// parent's connections (and the runtime that served them) are not the
    /// child's to use.
    fn http(&self) -> Result<Arc<Http>> {
        let generation = crate::fork::generation();
        let http = self.http.load_full();
        if http.generation == generation {
            return Ok(http);
        }
        let fresh = Arc::new(build_http(self.timeout, self.connect_timeout, self.http2)?);
        self.http.store(fresh.clone());
        Ok(fresh)
    }

    /// `err` with any of the pool's keys in its message replaced by their
    /// hints: for errors that echo what a caller passed (a header name, a
    /// method), which may be a key in the wrong place.
    pub fn redacted(&self, err: Error) -> Error {
        match err {
            Error::BadRequest(message) => {
                Error::BadRequest(self.pool.redact(&message).into_owned())
            }
            Error::Config(message) => Error::Config(self.pool.redact(&message).into_owned()),
            other => other,
        }
    }

    /// Sends `request`, failing over across the pool's keys.
    ///
    /// Errors only for a request that cannot be sent (bad method or path);
    /// every upstream problem becomes a response in the provider's envelope.
    pub async fn request(&self, request: Request) -> Result<Response> {
        if matches!(request.method.as_str(), "CONNECT" | "TRACE" | "TRACK") {
            return Err(Error::MethodNotAllowed(request.method.to_string()));
        }
        // A Gemini key in the query string (`?key=`) is the caller's: it is
        // never forwarded (nor logged), whoever's key the request goes with.
        let target = self.provider.strip_credential_query(&request.target);
        let uri = self.base_url.uri(&target).map_err(|e| self.redacted(e))?;
        let http = self.http()?;
        bump(&self.stats.requests);
        if self.shutdown.is_set() {
            return Ok(self.shutting_down());
        }
        let attempt = Attempt {
            client: self,
            http: &http.client,
            method: &request.method,
            target: &target,
            uri: &uri,
            headers: &request.headers,
            body: &request.body,
        };
        // Boxed: the attempts' future (about 2 KB) is most of a request's,
        // and every layer above that held it inline would copy it whole
        // each time it is moved: one allocation costs less.
        match self
            .shutdown
            .guard(Box::pin(attempt.run(request.credential)))
            .await
        {
            Some(response) => Ok(response),
            None => Ok(self.shutting_down()),
        }
    }

    fn shutting_down(&self) -> Response {
        Response::error(
            self.provider,
            ErrorKind::Unavailable,
            "the server is shutting down",
        )
    }

    fn exhausted(&self, exhaustion: Exhaustion) -> Response {
        let (counter, outcome) = match exhaustion {
            Exhaustion::Transient { .. } => (
                &self.stats.exhausted_transient,
                Outcome::ExhaustedRateLimited,
            ),
            Exhaustion::Unreachable { .. } => (
                &self.stats.exhausted_transient,
                Outcome::UpstreamUnreachable,
            ),
            Exhaustion::Permanent => (&self.stats.exhausted_permanent, Outcome::ExhaustedAuth),
        };
        bump(counter);
        self.pool.counters().outcome(outcome);
        let mut response = Response::error(
            self.provider,
            ErrorKind::of_exhaustion(exhaustion),
            exhaustion.message(),
        );
        if let Some(secs) = exhaustion.retry_after_header() {
            response
                .headers
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.exhausted = true;
        response
    }

    fn send_failure(&self, failure: &SendFailure, byok: bool) -> Response {
        bump(&self.stats.upstream_errors);
        let (kind, message, outcome) = match failure {
            SendFailure::Timeout => (
                ErrorKind::Timeout,
                format!(
                    "upstream did not answer within {} s",
                    self.timeout.as_secs_f64()
                ),
                Outcome::UpstreamTimeout,
            ),
            SendFailure::Connect(cause) => (
                ErrorKind::Api,
                format!("upstream request failed: {cause}"),
                Outcome::UpstreamUnreachable,
            ),
            SendFailure::BadStatus(status) => (
                ErrorKind::Api,
                format!("upstream answered with status {status}, which cannot be relayed"),
                Outcome::UpstreamUnreachable,
            ),
            SendFailure::GatewayTimeout => (
                ErrorKind::Timeout,
                "upstream answered 504: a gateway in front of it timed out".to_owned(),
                Outcome::UpstreamTimeout,
            ),
            SendFailure::Uncheckable { status, coding } => (
                ErrorKind::Api,
                format!(
                    "upstream answered {status} with its body in a content coding \
                     keyfailover cannot check for keys ({}), so it is not relayed",
                    self.pool.redact(coding)
                ),
                Outcome::UpstreamUnreachable,
            ),
        };
        self.pool
            .counters()
            .outcome(if byok { Outcome::Byok } else { outcome });
        Response::error(self.provider, kind, &message)
    }

    /// Relays upstream's response, starting with the bytes already read of it.
    fn relay(
        &self,
        mut resp: upstream::Response,
        pending: VecDeque<Bytes>,
        error_first: bool,
        in_flight: Option<InFlight>,
    ) -> Response {
        // Only a pool key's request counts as in flight; BYOK has none.
        let byok = in_flight.is_none();
        let status = resp.status().as_u16();
        // Taken out: a stream holds its response for as long as it is open,
        // and needs its headers no longer than this.
        let upstream = std::mem::take(resp.headers_mut());
        // Error bodies are small and may echo the key that was sent.
        let scrub = !(200..300).contains(&status);
        let keys = self.pool.key_set();
        let scrubber = if scrub {
            Scrubber::new(keys.secrets())
        } else {
            None
        };
        let mut stream = headers::is_event_stream(&upstream);
        // A body upstream content-coded unasked is taken apart where it is
        // read on the way: an error body to be scrubbed, and a stream to be
        // relayed in whole events. In a coding this cannot take apart, the
        // one is not relayed and the other is relayed as it came, unread.
        let coding = if scrubber.is_some() || stream {
            Decoder::for_headers(&upstream)
        } else {
            Ok(None)
        };
        let decoder = match coding {
            Ok(None) => None,
            Ok(Some(decoder)) if scrubber.is_some() => Some(Box::new(decoder)),
            Ok(Some(decoder)) => Some(Box::new(decoder.unlimited())),
            Err(coding) if scrubber.is_some() => {
                return self.send_failure(&SendFailure::Uncheckable { status, coding }, byok)
            }
            Err(_) => {
                stream = false;
                None
            }
        };
        let close_delimited = stream
            && resp.version() <= http::Version::HTTP_11
            && !upstream.contains_key(http::header::CONTENT_LENGTH)
            && !upstream
                .get_all(http::header::TRANSFER_ENCODING)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        // A body keyfailover may rewrite (an error event added to a stream, a
        // key scrubbed) no longer has upstream's length, nor has one whose
        // length upstream gave wrongly.
        // A stream's headers outlive this call (the Python response keeps
        // them): detached from the connection's read buffer.
        let unframed = !headers::length_holds(status, &upstream);
        let mut relayed = headers::relayed(upstream, stream || scrub || unframed, stream);
        if decoder.is_some() {
            relayed.remove(http::header::CONTENT_ENCODING);
        }
        for value in relayed.values_mut() {
            if let Some(clean) = scrub_value(value.as_bytes(), keys.secrets()) {
                *value = HeaderValue::from_bytes(&clean).unwrap_or(HeaderValue::from_static(""));
            }
        }
        // A name cannot be scrubbed: one that holds a key (lower-cased, as
        // names are) is dropped. Names are short, so rarely even compared.
        let echoed: Vec<HeaderName> = relayed
            .keys()
            .filter(|name| name.as_str().len() >= keys.shortest)
            .filter(|name| {
                keys.secrets().any(|(secret, _)| {
                    let name = name.as_str().as_bytes();
                    !secret.is_empty()
                        && name.len() >= secret.len()
                        && name
                            .windows(secret.len())
                            .any(|w| w.eq_ignore_ascii_case(secret.as_bytes()))
                })
            })
            .cloned()
            .collect();
        for name in echoed {
            relayed.remove(name);
        }
        let outcome = if byok {
            self.pool.counters().outcome(Outcome::Byok);
            None
        } else {
            Some(Arc::new(OutcomeOnDrop {
                pool: self.pool.clone(),
                broken: AtomicBool::new(false),
            }))
        };
        Response {
            status,
            headers: relayed,
            attempts: 0,
            key_label: None,
            exhausted: false,
            attempt_log: Vec::new(),
            body: ResponseBody::stream(Stream {
                resp,
                pending,
                sse: stream.then(|| (Framer::default(), self.provider)),
                final_event_seen: close_delimited.then_some(false),
                broke: false,
                // Error bodies have the scrubber; a successful stream that
                // starts with an error event has its events looked at.
                error_keys: (error_first && stream && scrubber.is_none())
                    .then(|| Keys(keys.clone())),
                scrubber,
                decoder,
                shutdown: self.shutdown.clone(),
                outcome,
                _in_flight: in_flight,
                done: false,
            }),
        }
    }
}

fn build_http(timeout: Duration, connect_timeout: Duration, http2: bool) -> Result<Http> {
    let client = upstream::Http::new(timeout, connect_timeout, http2)
        .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
    Ok(Http {
        generation: crate::fork::generation(),
        client,
    })
}

/// One request's attempts.
struct Attempt<'a> {
    client: &'a FailoverClient,
    http: &'a upstream::Http,
    method: &'a Method,
    /// The caller's path and query (normalized, without credentials).
    target: &'a str,
    /// The target at the client's base URL.
    uri: &'a http::Uri,
    /// The caller's headers, as received: each attempt sends a copy
    /// without the hop-by-hop ones (see [`headers::forwarded`]).
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

/// What an upstream answer comes to. `Return`, the large variant, is the
/// common one: boxing it would allocate for nearly every request.
#[allow(clippy::large_enum_variant)]
enum Judged {
    /// A key-specific failure: mark the key and try the next.
    Failover(Verdict),
    /// Relay this response, starting with what was already read of it.
    /// The flag: a successful stream whose first event is an error, whose
    /// events are looked at for the pool's keys as an error body's bytes are.
    Return(upstream::Response, VecDeque<Bytes>, bool),
    Failed(SendFailure),
}

impl Attempt<'_> {
    async fn run(&self, credential: Credential) -> Response {
        // Room for the one attempt most requests make.
        let mut log = Vec::with_capacity(1);
        let (mut response, key_label) = match credential {
            Credential::Caller(caller) => (self.byok(caller, &mut log).await, None),
            Credential::Pool => self.walk(&mut log).await,
        };
        response.attempts = u32::try_from(log.len()).unwrap_or(u32::MAX);
        response.key_label = key_label;
        response.attempt_log = log;
        response
    }

    /// Sends once with the caller's own key; the pool is not touched.
    async fn byok(&self, caller: CallerCredential, log: &mut Vec<AttemptRecord>) -> Response {
        let client = self.client;
        bump(&client.stats.byok);
        let mut headers = headers::forwarded(self.headers, self.body.len());
        let mut value = caller.value;
        value.set_sensitive(true);
        headers.insert(caller.header, value);
        // Not judged, but a body that breaks before its first byte is no
        // answer here either.
        match self.send(headers, None, self.uri, log).await {
            Ok(mut resp) => match resp.read_ahead().await {
                Ok(()) => client.relay(resp, VecDeque::new(), false, None),
                Err(e) => client.send_failure(&broke_before_its_first_byte(&e), true),
            },
            Err(failure) => client.send_failure(&failure, true),
        }
    }

    /// Walks the pool: each available key until one is not a key-specific
    /// failure, or none is left. Returns the response and the last key's label.
    ///
    /// A key with its own endpoint (`base_url`) is sent there; when that
    /// endpoint cannot be reached, times out or answers 504, the key cools
    /// down briefly (reason `unreachable`) and the next key is tried. When
    /// every attempt of the walk ended that way, the answer is the last
    /// failure (502 or 504), not the exhausted pool's 429; while every such
    /// key cools down, the pool is exhausted as unreachable (502).
    async fn walk(&self, log: &mut Vec<AttemptRecord>) -> (Response, Option<Arc<str>>) {
        let client = self.client;
        let mut walker = client.pool.walker();
        let mut last_label = None;
        // The last unreachable endpoint's failure, and whether any attempt
        // failed over for another reason.
        let mut unreachable: Option<SendFailure> = None;
        let mut other_failover = false;
        let response = loop {
            let key = match walker.next_key() {
                Ok(key) => key,
                Err(exhaustion) => match unreachable.take() {
                    Some(failure) if !other_failover => break client.send_failure(&failure, false),
                    _ => break client.exhausted(exhaustion),
                },
            };
            last_label = Some(key.shared_label());
            let own_endpoint = key.base_url().is_some();
            let uri = match key.base_url().map(|base| base.uri(self.target)) {
                Some(Ok(uri)) => Cow::Owned(uri),
                _ => Cow::Borrowed(self.uri),
            };
            let mut attempt_headers = headers::forwarded(self.headers, self.body.len());
            let (name, form) = client.provider.auth_scheme_for(uri.path());
            attempt_headers.insert(HeaderName::from_static(name), key.header_value(form));

            let in_flight = key.in_flight();
            let resp = match self.send(attempt_headers, Some(&key), &uri, log).await {
                Ok(resp) if own_endpoint && resp.status().as_u16() == 504 => {
                    self.fail_over(&key, Verdict::Unreachable, Some(504), log);
                    unreachable = Some(SendFailure::GatewayTimeout);
                    continue;
                }
                Ok(resp) => resp,
                Err(failure @ (SendFailure::Connect(_) | SendFailure::Timeout)) if own_endpoint => {
                    self.fail_over(&key, Verdict::Unreachable, None, log);
                    unreachable = Some(failure);
                    continue;
                }
                Err(failure) => break client.send_failure(&failure, false),
            };
            let status = resp.status().as_u16();
            key.observe_now(resp.headers(), status);
            match self.judge(resp).await {
                Judged::Failover(verdict) => {
                    other_failover = true;
                    self.fail_over(&key, verdict, Some(status), log);
                }
                Judged::Return(resp, pending, error_first) => {
                    break client.relay(resp, pending, error_first, Some(in_flight))
                }
                Judged::Failed(failure) => break client.send_failure(&failure, false),
            }
        };
        client
            .pool
            .counters()
            .attempts(u32::try_from(log.len()).unwrap_or(u32::MAX));
        (response, last_label)
    }

    /// Counts, logs and applies a key-specific failure of the last attempt.
    fn fail_over(
        &self,
        key: &Key,
        verdict: Verdict,
        status: Option<u16>,
        log: &mut [AttemptRecord],
    ) {
        let client = self.client;
        if let Some(reason) = verdict.reason() {
            client.stats.failover(reason);
            key.counters().failover();
            if let Some(attempt) = log.last_mut() {
                attempt.reason = Some(reason);
            }
            failover_record(client, key, status, reason);
        }
        verdict.apply(key, status);
    }

    async fn send(
        &self,
        headers: HeaderMap,
        key: Option<&Key>,
        uri: &http::Uri,
        log: &mut Vec<AttemptRecord>,
    ) -> Result<upstream::Response, SendFailure> {
        let client = self.client;
        bump(&client.stats.attempts);
        let started = Instant::now();
        let send = self
            .http
            .send(self.method.clone(), uri.clone(), headers, self.body.clone());
        // Met by almost every attempt: kept coarsely (see `timer`).
        let deadline = crate::timer::later(started, client.timeout);
        let result = match crate::timer::timeout_at(deadline, send).await {
            Err(_) => Err(SendFailure::Timeout),
            // A connect (or TLS handshake) timeout is a failure to connect.
            Ok(Err(e)) if e.is_timeout() && !e.is_connect() => Err(SendFailure::Timeout),
            Ok(Err(e)) => Err(SendFailure::Connect(describe(&e))),
            Ok(Ok(resp)) => Ok(resp),
        };
        let took = started.elapsed();
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        if let Some(status) = status {
            client.pool.counters().upstream_duration(took);
            if let Some(key) = key {
                key.counters().response(status);
            }
        }
        log.push(AttemptRecord {
            key_label: key.map(Key::shared_label),
            status,
            reason: None,
            started,
            seconds: took.as_secs_f64(),
        });
        result
    }

    /// Decides whether a response head (and, where needed, a bit of its body
    /// or the stream's first event) is a key-specific failure. Retry-After is
    /// parsed once, on the paths that need it.
    async fn judge(&self, mut resp: upstream::Response) -> Judged {
        let status = resp.status().as_u16();
        if !(200..=599).contains(&status) {
            return Judged::Failed(SendFailure::BadStatus(status));
        }
        let retry_after = |resp: &upstream::Response| {
            let headers = || {
                resp.headers()
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_bytes()))
            };
            verdict::head_cooldown(headers, SystemTime::now())
        };
        if verdict::needs_body(status) {
            let deadline = self.client.timeout.min(ERROR_BODY_DEADLINE);
            // Boxed, as is the peek below: off the common path, and inline
            // they would make every request's future larger (see `request`).
            let body = Box::pin(read_prefix(&mut resp, ERROR_BODY_LIMIT, deadline)).await;
            // Judged as the caller would read it: a body upstream content-
            // coded unasked is looked at decoded (as far as its start goes).
            let decoded = match Decoder::for_headers(resp.headers()) {
                Ok(Some(mut decoder)) => decoder.push(&body).ok(),
                _ => None,
            };
            let seen = decoded.as_deref().unwrap_or(&body);
            let verdict = verdict::classify_head(status, retry_after(&resp), Some(seen));
            return if verdict.is_key_specific() {
                Judged::Failover(verdict)
            } else {
                Judged::Return(resp, VecDeque::from([body]), false)
            };
        }
        let verdict = verdict::classify_head(status, None, None);
        if verdict.is_key_specific() {
            return Judged::Failover(verdict);
        }
        if !(resp.status().is_success() && headers::is_event_stream(resp.headers())) {
            // Relayed from its first bytes: a small body has come with its
            // head, so this mostly waits for nothing; a slower one's head
            // goes out with its first bytes.
            return match resp.read_ahead().await {
                Ok(()) => Judged::Return(resp, VecDeque::new(), false),
                Err(e) => Judged::Failed(broke_before_its_first_byte(&e)),
            };
        }
        // A stream upstream content-coded unasked is read decoded; one in a
        // coding this cannot take apart is relayed unread.
        let decoder = match Decoder::for_headers(resp.headers()) {
            Ok(decoder) => decoder.map(Decoder::unlimited),
            Err(_) => return Judged::Return(resp, VecDeque::new(), false),
        };
        let timeout = self.client.timeout;
        let peek = peek_first_event(&mut resp, decoder);
        match Box::pin(tokio::time::timeout(timeout, peek)).await {
            Err(_) => Judged::Failed(SendFailure::Timeout),
            // The read timeout (also `timeout`) may fire first.
            Ok(Err(e)) if e.is_timeout() => Judged::Failed(SendFailure::Timeout),
            Ok(Err(e)) => Judged::Failed(SendFailure::Connect(format!(
                "the stream broke before its first event: {}",
                describe(&e)
            ))),
            Ok(Ok(Peeked {
                data: Some(data),
                chunks,
            })) => match verdict::first_event_verdict(&data, retry_after(&resp)) {
                Verdict::NotKeySpecific => {
                    let error_first = memchr::memmem::find(&data, b"error").is_some();
                    Judged::Return(resp, chunks, error_first)
                }
                verdict => Judged::Failover(verdict),
            },
            Ok(Ok(Peeked { data: None, chunks })) => Judged::Return(resp, chunks, false),
        }
    }
}

/// A DEBUG record on `keyfailover.client` for a failover.
fn failover_record(client: &FailoverClient, key: &Key, status: Option<u16>, reason: Reason) {
    if !events::enabled(Level::Debug) {
        return;
    }
    let what = match status {
        Some(status) => format!("answered {status}"),
        None => "could not reach its endpoint".to_owned(),
    };
    events::emit(Record {
        logger: "keyfailover.client",
        level: Level::Debug,
        message: format!(
            "pool {}: key {} ({}) {what}: {reason}, trying the next key",
            client.name,
            key.label(),
            key.hint()
        ),
        fields: vec![
            ("pool", Field::from(client.name.as_str())),
            ("key", Field::from(key.label())),
            ("hint", Field::from(key.hint())),
            ("status", Field::from(status)),
            ("reason", Field::from(reason.as_str())),
        ],
    });
}

/// A body that breaks before its first byte is no answer: a 502, as a
/// connection closed before the head is. (Relaying its head would leave the
/// caller a status and an aborted body, or, from a server that had not yet
/// written the head, nothing at all.)
fn broke_before_its_first_byte(e: &UpstreamError) -> SendFailure {
    if e.is_timeout() {
        SendFailure::Timeout
    } else {
        SendFailure::Connect(format!(
            "the response body broke before its first byte: {}",
            describe(e)
        ))
    }
}

/// What was read of a stream while looking for its first event.
struct Peeked {
    /// The first event's data; None when the stream ended (or passed
    /// PEEK_LIMIT, or would not decode) first.
    data: Option<Vec<u8>>,
    /// The bytes read, as upstream sent them: the relay reads them again.
    chunks: VecDeque<Bytes>,
}

/// Reads a stream until its first event with fields, keeping what was read.
async fn peek_first_event(
    resp: &mut upstream::Response,
    mut decoder: Option<Decoder>,
) -> Result<Peeked, UpstreamError> {
    let mut framer = Framer::default();
    let mut chunks = VecDeque::new();
    let mut seen = 0;
    while let Some(chunk) = resp.chunk().await? {
        seen += chunk.len();
        chunks.push_back(chunk.clone());
        let chunk = match &mut decoder {
            None => chunk,
            // What will not decode is the relay's to report, in the stream.
            Some(decoder) => match decoder.push(&chunk) {
                Ok(decoded) => Bytes::from(decoded),
                Err(_) => break,
            },
        };
        if let Some(events) = framer.push(chunk) {
            let data = first_event_data(&events);
            if data.is_some() {
                return Ok(Peeked { data, chunks });
            }
        }
        if seen > PEEK_LIMIT {
            break;
        }
    }
    Ok(Peeked { data: None, chunks })
}

/// Up to `limit` bytes of the body; whatever arrived if it breaks or stalls
/// past `deadline`.
async fn read_prefix(resp: &mut upstream::Response, limit: usize, deadline: Duration) -> Bytes {
    let mut buf = BytesMut::new();
    let read = async {
        while buf.len() < limit {
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(deadline, read).await;
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn an_attempts_start_is_told_in_unix_time_from_one_reading() {
        let monotonic = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = |ago: Duration| AttemptRecord {
            key_label: None,
            status: Some(200),
            reason: None,
            started: monotonic - ago,
            seconds: 0.0,
        };
        let now = (wall, monotonic);
        let first = record(Duration::from_millis(2500)).started_unix_nanos(now);
        let second = record(Duration::from_millis(1000)).started_unix_nanos(now);
        assert_eq!(first, 1_799_999_997_500_000_000);
        assert_eq!(second - first, 1_500_000_000);
        // A start after the reading (none is) would not go past it.
        let later = AttemptRecord {
            started: monotonic + Duration::from_secs(1),
            ..record(Duration::ZERO)
        };
        assert_eq!(later.started_unix_nanos(now), 1_800_000_000_000_000_000);
    }
}
