//! The failover engine: sends a request upstream with a key from the pool and
//! fails over to the next key on key-specific failures, before anything has
//! reached the caller. Bodies stream through without buffering.

use std::collections::VecDeque;
use std::error::Error as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use reqwest::Method;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Exhaustion, Result};
use crate::pool::KeyPool;
use crate::provider::{ErrorKind, Provider};
use crate::retry_after::parse_retry_after;
use crate::sse::{first_event, FirstEvent, Framer};
use crate::verdict::{self, Reason, Verdict};

/// How much of a 429 body is read to tell a quota error from a rate limit.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// How much of a stream is read, at most, looking for its first event.
const PEEK_LIMIT: usize = 64 * 1024;

/// Headers that describe one connection, never forwarded either way.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the client replaces or that reqwest sets itself.
const NOT_FORWARDED: [&str; 5] = [
    "host",
    "content-length",
    "accept-encoding",
    "x-api-key",
    "authorization",
];

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Settings of a [`FailoverClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub base_url: String,
    pub provider: Provider,
    /// How long to wait for a response head (and, for streams, the first event).
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

/// One request as the caller gives it. `path` includes any query string.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// Counters since the client was created.
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    attempts: AtomicU64,
    byok: AtomicU64,
    rate_limited: AtomicU64,
    quota_exhausted: AtomicU64,
    revoked: AtomicU64,
    exhausted_transient: AtomicU64,
    exhausted_permanent: AtomicU64,
    upstream_errors: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub attempts: u64,
    pub byok: u64,
    /// Failovers by reason.
    pub rate_limited: u64,
    pub quota_exhausted: u64,
    pub revoked: u64,
    /// Requests answered with a synthesized 429 or 502 for an exhausted pool.
    pub exhausted_transient: u64,
    pub exhausted_permanent: u64,
    /// Requests answered with 502/504 because upstream could not be reached.
    pub upstream_errors: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    fn failover(&self, reason: Reason) {
        bump(match reason {
            Reason::RateLimited => &self.rate_limited,
            Reason::QuotaExhausted => &self.quota_exhausted,
            Reason::Revoked => &self.revoked,
        });
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: get(&self.requests),
            attempts: get(&self.attempts),
            byok: get(&self.byok),
            rate_limited: get(&self.rate_limited),
            quota_exhausted: get(&self.quota_exhausted),
            revoked: get(&self.revoked),
            exhausted_transient: get(&self.exhausted_transient),
            exhausted_permanent: get(&self.exhausted_permanent),
            upstream_errors: get(&self.upstream_errors),
        }
    }
}

/// Sends requests through a key pool with failover.
#[derive(Debug)]
pub struct FailoverClient {
    pool: KeyPool,
    http: reqwest::Client,
    base_url: String,
    provider: Provider,
    timeout: Duration,
    stats: Stats,
}

/// A response: upstream's, or one the client synthesized.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Lower-case names, hop-by-hop headers removed; values decoded as Latin-1.
    pub headers: Vec<(String, String)>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The pool key behind the final attempt; None for BYOK or no attempt.
    pub key_label: Option<String>,
    /// True when the client synthesized a pool-exhaustion error.
    pub exhausted: bool,
    pub body: ResponseBody,
}

/// Why an attempt produced no upstream response.
enum SendFailure {
    Timeout,
    Connect(String),
}

impl FailoverClient {
    pub fn new(pool: KeyPool, options: ClientOptions) -> Result<Self> {
        let url = reqwest::Url::parse(&options.base_url).map_err(|e| {
            Error::Config(format!("base_url {:?} is not a URL: {e}", options.base_url))
        })?;
        if !matches!(url.scheme(), "http" | "https")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(Error::Config(format!(
                "base_url {:?} must be an http or https URL without query or fragment",
                options.base_url
            )));
        }
        for (name, d) in [
            ("timeout", options.timeout),
            ("connect_timeout", options.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.timeout)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            pool,
            http,
            base_url: options.base_url.trim_end_matches('/').to_owned(),
            provider: options.provider,
            timeout: options.timeout,
            stats: Stats::default(),
        })
    }

    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Sends `request`, failing over across the pool's keys.
    ///
    /// Errors only for a malformed request (bad method, path or header); every
    /// upstream problem becomes a response in the provider's error envelope.
    pub async fn request(&self, request: Request) -> Result<Response> {
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|_| Error::Config(format!("invalid HTTP method {:?}", request.method)))?;
        if !request.path.starts_with('/') {
            return Err(Error::Config(format!(
                "path {:?} must start with '/'",
                request.path
            )));
        }
        let url = format!("{}{}", self.base_url, request.path);
        let (headers, byok) = forwarded_headers(&request.headers)?;
        bump(&self.stats.requests);

        if let Some((name, value)) = byok {
            bump(&self.stats.byok);
            let mut headers = headers;
            headers.insert(name, value);
            return Ok(
                match self.send(&method, &url, headers, request.body).await {
                    Ok(resp) => self.relay(resp, 1, None, VecDeque::new(), None),
                    Err(failure) => self.send_failure(failure, 1, None),
                },
            );
        }

        let mut walker = self.pool.walker();
        let mut attempts = 0;
        let mut last_label = None;
        loop {
            let key = match walker.next_key() {
                Ok(key) => key,
                Err(exhaustion) => return Ok(self.exhausted(exhaustion, attempts, last_label)),
            };
            attempts += 1;
            last_label = Some(key.label().to_owned());
            let mut attempt_headers = headers.clone();
            let (auth_name, auth_value) = self.provider.auth_header(key.value());
            let mut auth_value = HeaderValue::from_str(&auth_value).map_err(|_| {
                Error::Config(format!("{} cannot be sent in a header", key.label()))
            })?;
            auth_value.set_sensitive(true);
            attempt_headers.insert(HeaderName::from_static(auth_name), auth_value);

            let resp = match self
                .send(&method, &url, attempt_headers, request.body.clone())
                .await
            {
                Ok(resp) => resp,
                Err(failure) => return Ok(self.send_failure(failure, attempts, last_label)),
            };
            match self.judge(resp).await {
                Judged::Failover(verdict) => {
                    if let Some(reason) = verdict.reason() {
                        self.stats.failover(reason);
                    }
                    verdict.apply(&key);
                }
                Judged::Return(resp, pending, framer) => {
                    return Ok(self.relay(resp, attempts, last_label, pending, framer))
                }
                Judged::Failed(failure) => {
                    return Ok(self.send_failure(failure, attempts, last_label))
                }
            }
        }
    }

    async fn send(
        &self,
        method: &Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<reqwest::Response, SendFailure> {
        bump(&self.stats.attempts);
        let send = self
            .http
            .request(method.clone(), url)
            .headers(headers)
            .body(body)
            .send();
        match tokio::time::timeout(self.timeout, send).await {
            Err(_) => Err(SendFailure::Timeout),
            // A connect (or TLS handshake) timeout is a failure to connect.
            Ok(Err(e)) if e.is_timeout() && !e.is_connect() => Err(SendFailure::Timeout),
            Ok(Err(e)) => Err(SendFailure::Connect(describe(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Decides whether a response head (and, where needed, a bit of its body
    /// or the stream's first event) is a key-specific failure.
    async fn judge(&self, mut resp: reqwest::Response) -> Judged {
        let status = resp.status().as_u16();
        let body = if verdict::needs_body(status) {
            Some(read_prefix(&mut resp, ERROR_BODY_LIMIT, self.timeout).await)
        } else {
            None
        };
        let verdict = verdict::classify(
            status,
            header_pairs(resp.headers()),
            body.as_deref(),
            SystemTime::now(),
        );
        if verdict.is_key_specific() {
            return Judged::Failover(verdict);
        }
        if body.is_some() || !(resp.status().is_success() && is_event_stream(resp.headers())) {
            return Judged::Return(resp, body.into_iter().collect(), None);
        }
        match tokio::time::timeout(self.timeout, peek_first_event(&mut resp)).await {
            Err(_) => Judged::Failed(SendFailure::Timeout),
            // The read timeout (also `self.timeout`) may fire first.
            Ok(Err(e)) if e.is_timeout() => Judged::Failed(SendFailure::Timeout),
            Ok(Err(e)) => Judged::Failed(SendFailure::Connect(format!(
                "the stream broke before its first event: {}",
                describe(&e)
            ))),
            // A stream's rate-limit event carries no Retry-After of its own:
            // the response head's applies, if it has one.
            Ok(Ok(Peeked::KeyFailure(Verdict::RateLimited(None)))) => {
                Judged::Failover(Verdict::RateLimited(parse_retry_after(
                    header_pairs(resp.headers()),
                    SystemTime::now(),
                )))
            }
            Ok(Ok(Peeked::KeyFailure(verdict))) => Judged::Failover(verdict),
            Ok(Ok(Peeked::Relay(chunks, framer))) => Judged::Return(resp, chunks, Some(framer)),
        }
    }

    fn relay(
        &self,
        resp: reqwest::Response,
        attempts: u32,
        key_label: Option<String>,
        pending: VecDeque<Bytes>,
        framer: Option<Framer>,
    ) -> Response {
        let sse =
            is_event_stream(resp.headers()).then(|| (framer.unwrap_or_default(), self.provider));
        Response {
            status: resp.status().as_u16(),
            headers: response_headers(resp.headers(), sse.is_some()),
            attempts,
            key_label,
            exhausted: false,
            body: ResponseBody::stream(Stream {
                resp,
                pending,
                sse,
                done: false,
            }),
        }
    }

    fn exhausted(
        &self,
        exhaustion: Exhaustion,
        attempts: u32,
        key_label: Option<String>,
    ) -> Response {
        let (kind, message, retry_after) = match exhaustion {
            Exhaustion::Transient { retry_after } => {
                bump(&self.stats.exhausted_transient);
                (
                    ErrorKind::RateLimit,
                    "all configured keys are rate-limited",
                    Some(ceil_secs(retry_after)),
                )
            }
            Exhaustion::Permanent => {
                bump(&self.stats.exhausted_permanent);
                (
                    ErrorKind::Api,
                    "all configured keys failed authentication",
                    None,
                )
            }
        };
        let mut response = self.synthesize(kind, message, attempts, key_label);
        if let Some(secs) = retry_after.filter(|s| *s > 0) {
            response
                .headers
                .push(("retry-after".into(), secs.to_string()));
        }
        response.exhausted = true;
        response
    }

    fn send_failure(
        &self,
        failure: SendFailure,
        attempts: u32,
        key_label: Option<String>,
    ) -> Response {
        bump(&self.stats.upstream_errors);
        match failure {
            SendFailure::Timeout => {
                let message = format!(
                    "upstream did not answer within {} s",
                    self.timeout.as_secs_f64()
                );
                self.synthesize(ErrorKind::Timeout, &message, attempts, key_label)
            }
            SendFailure::Connect(cause) => {
                let message = format!("upstream request failed: {cause}");
                self.synthesize(ErrorKind::Api, &message, attempts, key_label)
            }
        }
    }

    /// An error response of the client's own, in the provider's envelope.
    pub fn synthesize(
        &self,
        kind: ErrorKind,
        message: &str,
        attempts: u32,
        key_label: Option<String>,
    ) -> Response {
        Response {
            status: kind.status(),
            headers: vec![("content-type".into(), "application/json".into())],
            attempts,
            key_label,
            exhausted: false,
            body: ResponseBody::full(Bytes::from(self.provider.error_body(kind, message))),
        }
    }
}

enum Judged {
    Failover(Verdict),
    /// Relay this response, starting with what was already read of it.
    Return(reqwest::Response, VecDeque<Bytes>, Option<Framer>),
    Failed(SendFailure),
}

enum Peeked {
    KeyFailure(Verdict),
    Relay(VecDeque<Bytes>, Framer),
}

/// Reads a stream until its first event with fields, keeping what was read.
async fn peek_first_event(resp: &mut reqwest::Response) -> Result<Peeked, reqwest::Error> {
    let mut framer = Framer::default();
    let mut chunks = VecDeque::new();
    let mut seen = 0;
    while let Some(chunk) = resp.chunk().await? {
        seen += chunk.len();
        if let Some(events) = framer.push(chunk) {
            match first_event(&events) {
                FirstEvent::KeyFailure(verdict) => return Ok(Peeked::KeyFailure(verdict)),
                FirstEvent::Relay => {
                    chunks.push_back(events);
                    return Ok(Peeked::Relay(chunks, framer));
                }
                FirstEvent::Pending => chunks.push_back(events),
            }
        }
        if seen > PEEK_LIMIT {
            break;
        }
    }
    Ok(Peeked::Relay(chunks, framer))
}

/// Up to `limit` bytes of the body; whatever arrived if it breaks or stalls.
async fn read_prefix(resp: &mut reqwest::Response, limit: usize, timeout: Duration) -> Bytes {
    let mut buf = BytesMut::new();
    let read = async {
        while buf.len() < limit {
            match resp.chunk().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    buf.freeze()
}

fn header_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &[u8])> {
    headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()))
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// The header names that `Connection` header values nominate as hop-by-hop
/// (RFC 9110, section 7.6.1), lower-case.
fn connection_options<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .flat_map(|value| value.split(|&b| b == b','))
        .filter_map(|option| std::str::from_utf8(option.trim_ascii()).ok())
        .filter(|option| !option.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn response_headers(headers: &HeaderMap, sse: bool) -> Vec<(String, String)> {
    let nominated = connection_options(headers.get_all(CONNECTION).iter().map(|v| v.as_bytes()));
    headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name.as_str()))
        .filter(|(name, _)| !nominated.iter().any(|n| n == name.as_str()))
        // A stream may end with an error event of ours: its length is not upstream's.
        .filter(|(name, _)| !(sse && name.as_str() == "content-length"))
        .map(|(name, value)| (name.as_str().to_owned(), latin1(value.as_bytes())))
        .collect()
}

/// The caller's own credential (BYOK), as found among the request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerCredential<'a> {
    /// "x-api-key" or "authorization".
    pub header: &'static str,
    /// The header's value as sent.
    pub value: &'a [u8],
}

impl<'a> CallerCredential<'a> {
    /// The key or token itself, without the `Bearer` scheme.
    pub fn token(&self) -> &'a [u8] {
        match self.header {
            "authorization" => self.value[7..].trim_ascii(),
            _ => self.value.trim_ascii(),
        }
    }
}

/// The caller's credential among request headers: a non-blank `x-api-key`
/// first, else an `Authorization: Bearer` token. The one rule for it: the
/// client sends such a request once with that credential (BYOK), and the
/// proxy checks it against its client tokens.
pub fn caller_credential<'a, I>(headers: I) -> Option<CallerCredential<'a>>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut bearer = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("x-api-key") && !value.trim_ascii().is_empty() {
            return Some(CallerCredential {
                header: "x-api-key",
                value,
            });
        }
        if bearer.is_none() && name.eq_ignore_ascii_case("authorization") && is_bearer(value) {
            bearer = Some(CallerCredential {
                header: "authorization",
                value,
            });
        }
    }
    bearer
}

type Credential = (HeaderName, HeaderValue);

/// The headers sent upstream, and the caller's own credential (BYOK) if any.
fn forwarded_headers(headers: &[(String, Vec<u8>)]) -> Result<(HeaderMap, Option<Credential>)> {
    let nominated = connection_options(
        headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
            .map(|(_, value)| value.as_slice()),
    );
    let mut map = HeaderMap::with_capacity(headers.len() + 2);
    for (name, value) in headers {
        let header_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::Config(format!("invalid header name {name:?}")))?;
        let header_value = HeaderValue::from_bytes(value)
            .map_err(|_| Error::Config(format!("invalid value for header {name:?}")))?;
        let n = header_name.as_str();
        if !(is_hop_by_hop(n) || NOT_FORWARDED.contains(&n) || nominated.iter().any(|o| o == n)) {
            map.append(header_name, header_value);
        }
    }
    // Plain bytes upstream: error bodies and streams must be readable as sent.
    map.insert(
        reqwest::header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let byok = caller_credential(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
        .map(|credential| -> Result<Credential> {
            let mut value = HeaderValue::from_bytes(credential.value).map_err(|_| {
                Error::Config(format!("invalid value for header {:?}", credential.header))
            })?;
            value.set_sensitive(true);
            Ok((HeaderName::from_static(credential.header), value))
        })
        .transpose()?;
    Ok((map, byok))
}

fn is_bearer(value: &[u8]) -> bool {
    value.len() > 7
        && value[..7].eq_ignore_ascii_case(b"bearer ")
        && !value[7..].trim_ascii().is_empty()
}

/// A readable description of a transport error and its causes, without URL.
fn describe(err: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&dyn std::error::Error> = err.source();
    let top = if err.is_connect() {
        "could not connect to upstream"
    } else if err.is_body() || err.is_decode() {
        "the response body broke"
    } else {
        "the connection failed"
    };
    parts.push(top.to_owned());
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// Chunks of a body in arrival order, handed over together.
pub type Chunks = Vec<Bytes>;

/// How many bytes of already-received chunks one batch gathers, at most.
pub const BATCH_LIMIT: usize = 256 * 1024;

/// How many chunks the pump reads ahead of the caller.
const READ_AHEAD: usize = 64;

/// An upstream body being read by its pump task.
#[derive(Debug)]
struct Stream {
    resp: reqwest::Response,
    pending: VecDeque<Bytes>,
    /// For `text/event-stream`: relay whole events and end a broken stream
    /// with an error event in this provider's shape.
    sse: Option<(Framer, Provider)>,
    done: bool,
}

impl Stream {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if let Some(chunk) = self.pending.pop_front() {
            return Ok(Some(chunk));
        }
        while !self.done {
            match (self.resp.chunk().await, &mut self.sse) {
                (Ok(Some(chunk)), None) => return Ok(Some(chunk)),
                (Ok(Some(chunk)), Some((framer, _))) => {
                    if let Some(events) = framer.push(chunk) {
                        return Ok(Some(events));
                    }
                }
                (Ok(None), framer) => {
                    self.done = true;
                    let tail = framer
                        .as_mut()
                        .map(|(f, _)| f.take_held())
                        .unwrap_or_default();
                    return Ok((!tail.is_empty()).then_some(tail));
                }
                (Err(e), None) => {
                    self.done = true;
                    return Err(Error::Upstream(describe(&e)));
                }
                (Err(e), Some((_, provider))) => {
                    // The partial event held back was never relayed: drop it.
                    self.done = true;
                    let message = format!("upstream stream broke: {}", describe(&e));
                    return Ok(Some(Bytes::from(
                        provider.sse_error_event(ErrorKind::Api, &message),
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Reads the body into `tx` as fast as upstream sends it (up to
    /// READ_AHEAD chunks ahead), so the caller finds chunks waiting instead
    /// of waiting for each one; stops when the caller goes away.
    async fn pump(mut self, tx: mpsc::Sender<Result<Bytes>>) {
        loop {
            let item = match self.next_chunk().await {
                Ok(Some(chunk)) => Ok(chunk),
                Ok(None) => return,
                Err(err) => Err(err),
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    }
}

/// A response body: synthesized bytes, or an upstream stream read by a pump
/// task. Safe to share between tasks; `close()` (or dropping the body) drops
/// the upstream connection at once, even while a task waits for a chunk.
#[derive(Debug)]
pub struct ResponseBody {
    source: tokio::sync::Mutex<Source>,
    closed: CancellationToken,
    pump: Option<AbortHandle>,
}

#[derive(Debug)]
enum Source {
    Full(Bytes),
    Channel {
        rx: mpsc::Receiver<Result<Bytes>>,
        /// An error met while gathering a batch, raised after the batch.
        deferred: Option<Error>,
    },
    Done,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            source: tokio::sync::Mutex::new(Source::Full(bytes)),
            closed: CancellationToken::new(),
            pump: None,
        }
    }

    /// Starts the pump task; call within the tokio runtime.
    fn stream(stream: Stream) -> Self {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let pump = tokio::spawn(stream.pump(tx)).abort_handle();
        Self {
            source: tokio::sync::Mutex::new(Source::Channel { rx, deferred: None }),
            closed: CancellationToken::new(),
            pump: Some(pump),
        }
    }

    /// The next chunks, as they arrive, with any others already received
    /// (up to about BATCH_LIMIT bytes); None at the end or once closed.
    /// A non-SSE body that breaks raises [`Error::Upstream`] after the chunks
    /// received before the break; an SSE body that breaks yields one final
    /// error event instead.
    pub async fn next_batch(&self) -> Result<Option<Chunks>> {
        let mut source = tokio::select! {
            biased;
            _ = self.closed.cancelled() => return Ok(None),
            source = self.source.lock() => source,
        };
        let (rx, deferred) = match &mut *source {
            Source::Done => return Ok(None),
            Source::Full(bytes) => {
                let bytes = std::mem::take(bytes);
                *source = Source::Done;
                return Ok((!bytes.is_empty()).then(|| vec![bytes]));
            }
            Source::Channel { rx, deferred } => (rx, deferred),
        };
        if let Some(err) = deferred.take() {
            *source = Source::Done;
            return Err(err);
        }
        let first = tokio::select! {
            biased;
            _ = self.closed.cancelled() => None,
            item = rx.recv() => item,
        };
        let first = match first {
            Some(Ok(chunk)) => chunk,
            Some(Err(err)) => {
                *source = Source::Done;
                return Err(err);
            }
            None => {
                *source = Source::Done;
                return Ok(None);
            }
        };
        let mut size = first.len();
        let mut batch = vec![first];
        while size < BATCH_LIMIT {
            match rx.try_recv() {
                Ok(Ok(chunk)) => {
                    size += chunk.len();
                    batch.push(chunk);
                }
                Ok(Err(err)) => {
                    *deferred = Some(err);
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(Some(batch))
    }

    /// `next_batch` when it can answer without waiting; None when it would wait.
    pub fn try_next_batch(&self) -> Option<Result<Option<Chunks>>> {
        self.next_batch().now_or_never()
    }

    /// The rest of the body.
    pub async fn read_all(&self) -> Result<Bytes> {
        let mut out = BytesMut::new();
        while let Some(batch) = self.next_batch().await? {
            for chunk in batch {
                out.extend_from_slice(&chunk);
            }
        }
        Ok(out.freeze())
    }

    /// Closes the body and its upstream connection at once.
    pub fn close(&self) {
        self.closed.cancel();
        if let Some(pump) = &self.pump {
            pump.abort();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(headers: &[(&str, &str)]) -> Option<(&'static str, String)> {
        caller_credential(headers.iter().map(|(n, v)| (*n, v.as_bytes())))
            .map(|c| (c.header, String::from_utf8(c.token().to_vec()).unwrap()))
    }

    #[test]
    fn caller_credential_rule() {
        assert_eq!(found(&[]), None);
        assert_eq!(
            found(&[("x-api-key", " sk-1 ")]),
            Some(("x-api-key", "sk-1".into()))
        );
        assert_eq!(
            found(&[("Authorization", "bearer tok ")]),
            Some(("authorization", "tok".into()))
        );
        assert_eq!(
            found(&[("authorization", "Bearer tok"), ("X-Api-Key", "sk-1")]),
            Some(("x-api-key", "sk-1".into())),
            "x-api-key takes priority"
        );
        assert_eq!(
            found(&[("authorization", "Basic dXNlcg=="), ("x-api-key", "  ")]),
            None
        );
        assert_eq!(found(&[("authorization", "Bearer  ")]), None);
    }
}
