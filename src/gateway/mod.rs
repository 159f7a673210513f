//! The proxy's policy, for every front end (the ASGI app, the native server):
//! who may use the pool (client tokens, compared in constant time), whose
//! key a request goes with (BYOK), what is refused before any upstream call
//! (methods, upgrades, paths, transfer codings, bodies over the limit), and
//! the admin endpoints. A front end only translates: it calls
//! [`Gateway::begin`] with the request head, reads the body up to
//! [`Forward::body_limit`], and relays the [`Response`] it gets back.

mod admin;
mod history;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONNECTION};

use crate::error::{Error, ErrorKind, Result};
use crate::failover::{Credential, FailoverClient, Request, Response};
use crate::headers::{unsupported_transfer_coding, upgrade_requested, RequestHead};
use crate::metrics::Outcome;
use crate::target::normalize_target;

/// The most a request head (request line and fields) may hold: the native
/// server's hyper answers 431 beyond, and so does the gateway for a head an
/// ASGI server let through ([`Gateway::refuse_head`]).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Where the admin endpoints live, below the proxy's mount.
pub const ADMIN_PREFIX: &str = "/_keyfailover/";
/// The admin area's path segment.
pub const ADMIN_SEGMENT: &str = "_keyfailover";
/// The `Allow` of a 405 for CONNECT, TRACE and TRACK, which are never
/// forwarded: the standard methods forwarded (any other is too).
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Settings of a [`Gateway`].
#[derive(Clone)]
pub struct GatewayOptions {
    /// Tokens callers must present (as `x-api-key`, `api-key`,
    /// `x-goog-api-key` or `Authorization: Bearer`). None: the host app
    /// authenticates callers itself.
    pub client_tokens: Option<Vec<String>>,
    /// A caller credential that is not a client token is sent upstream once
    /// as the caller's own key, instead of being refused (with tokens) or
    /// stripped (without).
    pub allow_byok: bool,
    /// Larger request bodies get 413 before any upstream call.
    pub max_body_bytes: u64,
    /// A request body pausing longer than this gets 408 (a slowloris on the
    /// body: servers bound only the wait for the request head).
    pub body_timeout: Duration,
    /// Serve the admin endpoints below [`ADMIN_PREFIX`].
    pub admin: bool,
    /// Tokens for the admin endpoints only (reads and actions), besides the
    /// client tokens. Without client tokens, admin actions need one of these.
    pub admin_tokens: Option<Vec<String>>,
    /// Where `POST /_keyfailover/reload` gets the keys to reload the pool
    /// with; without it that endpoint does not exist.
    pub reload: Option<ReloadHook>,
    /// Where the dashboard's sampler and event streams run: a function, as
    /// the runtime of a forked worker is not its parent's. The current
    /// runtime if None.
    pub runtime: Option<RuntimeSource>,
}

/// Gives the runtime to spawn background work on.
pub type RuntimeSource = Arc<dyn Fn() -> tokio::runtime::Handle + Send + Sync>;

/// The keys to reload a pool with, from wherever the host keeps them.
pub type ReloadHook = Arc<dyn Fn() -> Result<Vec<crate::pool::KeySpec>> + Send + Sync>;

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            client_tokens: None,
            allow_byok: false,
            max_body_bytes: 32 * 1024 * 1024,
            body_timeout: Duration::from_secs(30),
            admin: true,
            admin_tokens: None,
            reload: None,
            runtime: None,
        }
    }
}

/// The proxy policy in front of one failover client.
pub struct Gateway {
    client: Arc<FailoverClient>,
    tokens: Option<Vec<Vec<u8>>>,
    admin_tokens: Option<Vec<Vec<u8>>>,
    allow_byok: bool,
    max_body_bytes: u64,
    body_timeout: Duration,
    admin: bool,
    reload: Option<ReloadHook>,
    runtime: Option<RuntimeSource>,
    /// The dashboard's samples, and the fork generation whose sampler fills
    /// them (none yet: `u64::MAX`).
    history: Arc<Mutex<history::History>>,
    sampler: AtomicU64,
    /// Set when the dashboard's event streams are to end (see [`Gateway::drain`]),
    /// with why.
    drained: crate::latch::Latch,
    drained_why: Arc<std::sync::OnceLock<&'static str>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("client", &self.client)
            .field("client_tokens", &self.tokens.as_ref().map(Vec::len))
            .field("allow_byok", &self.allow_byok)
            .finish()
    }
}

/// What to do with a request, decided from its head.
#[derive(Debug)]
pub enum Step {
    /// Answer with this; nothing goes upstream.
    Respond(Response),
    /// Read the body (at most `body_limit` bytes), then [`Gateway::forward`].
    Forward(Forward),
}

/// A request accepted for forwarding, waiting for its body.
#[derive(Debug)]
pub struct Forward {
    request: Request,
    byok: bool,
    /// The request's `Content-Length`, as [`RequestHead`] read it.
    content_length: Option<u64>,
}

impl Forward {
    /// True when the request goes with the caller's own key.
    pub fn byok(&self) -> bool {
        self.byok
    }

    pub fn method(&self) -> &str {
        self.request.method.as_str()
    }
}

impl Gateway {
    pub fn new(client: Arc<FailoverClient>, options: GatewayOptions) -> Result<Self> {
        let tokens = token_list(&client, "client_tokens", options.client_tokens)?;
        let admin_tokens = token_list(&client, "admin_tokens", options.admin_tokens)?;
        // At most a day: a pause longer than that is no upload, and event loops
        // take their timers in bounded units.
        if options.body_timeout.is_zero() || options.body_timeout > Duration::from_secs(86_400) {
            return Err(Error::Config(
                "body_timeout must be above 0 and at most a day (86400 s)".into(),
            ));
        }
        Ok(Self {
            client,
            tokens,
            admin_tokens,
            allow_byok: options.allow_byok,
            max_body_bytes: options.max_body_bytes,
            body_timeout: options.body_timeout,
            admin: options.admin,
            reload: options.reload,
            runtime: options.runtime,
            history: Arc::default(),
            sampler: AtomicU64::new(u64::MAX),
            drained: crate::latch::Latch::new(),
            drained_why: Arc::default(),
        })
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        match &self.runtime {
            Some(source) => Some(source()),
            None => tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Starts the dashboard's sampler once per process (a forked worker
    /// starts its own); it stops when the gateway is dropped. One atomic
    /// load on the request path.
    fn ensure_sampler(&self) {
        let generation = crate::fork::generation();
        let running = self.sampler.load(Ordering::Relaxed);
        if !self.admin || running == generation {
            return;
        }
        let Some(runtime) = self.runtime() else {
            return;
        };
        if self
            .sampler
            .compare_exchange(running, generation, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let history: Weak<Mutex<history::History>> = Arc::downgrade(&self.history);
        let client = Arc::downgrade(&self.client);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(history::SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(history), Some(client)) = (history.upgrade(), client.upgrade()) else {
                    return;
                };
                if crate::fork::generation() != generation {
                    return;
                }
                let sample = history::Sample::read(&client, admin::unix_now());
                history
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(sample);
            }
        });
    }

    pub fn client(&self) -> &Arc<FailoverClient> {
        &self.client
    }

    /// `text` with every key of the pool replaced by its hint.
    pub fn redact<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        self.client.pool().redact(text)
    }

    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes
    }

    /// The longest pause allowed between the parts of a request body.
    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    pub fn has_client_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    pub fn allow_byok(&self) -> bool {
        self.allow_byok
    }

    /// Decides what to do with a request from its head: `target` is the
    /// path below the mount with its query, as the caller encoded it.
    pub fn begin(&self, method: &str, target: &str, headers: HeaderMap) -> Step {
        let head = RequestHead::of(&headers);
        self.begin_with(method, target, headers, head)
    }

    /// [`Gateway::begin`] with the head's fields already read (the native
    /// server reads them first, for checks of its own).
    pub fn begin_with(
        &self,
        method: &str,
        target: &str,
        headers: HeaderMap,
        head: RequestHead,
    ) -> Step {
        self.ensure_sampler();
        let path = crate::target::path_of(target);
        if self.admin
            && (path.starts_with(ADMIN_PREFIX) || path == &ADMIN_PREFIX[..ADMIN_PREFIX.len() - 1])
        {
            return Step::Respond(self.admin(method, path, &headers));
        }
        let credential = head.credential;
        let authorized = credential
            .as_ref()
            .is_some_and(|c| self.is_client_token(c.token()));
        if self.tokens.is_some() && !authorized && !(self.allow_byok && credential.is_some()) {
            return self.refuse(ErrorKind::Authentication, "invalid or missing client token");
        }

        if let Some(protocol) = head.upgrade.then(|| upgrade_requested(&headers)).flatten() {
            // The client may go on in the protocol it asked for: end the
            // connection after the answer rather than read that as HTTP.
            self.client.pool().counters().outcome(Outcome::Rejected);
            let mut response = self.answer(
                ErrorKind::InvalidRequest,
                &format!("protocol upgrades ({protocol}) cannot be proxied"),
            );
            response
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return Step::Respond(response);
        }
        if let Some(coding) = head
            .transfer_encoding
            .then(|| unsupported_transfer_coding(&headers))
            .flatten()
        {
            // The body cannot be read as the caller meant it, nor skipped
            // for certain: answered, and the connection ended.
            self.client.pool().counters().outcome(Outcome::Rejected);
            let message = format!(
                "transfer coding {coding:?} is not supported: send the body as is, \
                 with a Content-Length or chunked"
            );
            return Step::Respond(closing(self.answer(ErrorKind::NotImplemented, &message)));
        }
        // Beside a Transfer-Encoding, a Content-Length says nothing of the
        // body (RFC 9112, section 6.3): the chunks say how long it is.
        let content_length = head.content_length.filter(|_| !head.transfer_encoding);
        if let Some(length) = content_length {
            if length > self.max_body_bytes {
                return Step::Respond(self.too_large());
            }
        }
        let byok = self.allow_byok && credential.is_some() && !authorized;
        let mut request = match normalize_target(target)
            .and_then(|_| Request::new(method, target, headers, Bytes::new()))
        {
            Ok(request) => request,
            Err(err) => return self.reject(&err),
        };
        if matches!(request.method.as_str(), "CONNECT" | "TRACE" | "TRACK") {
            let mut answer = self.reject(&Error::MethodNotAllowed(request.method.to_string()));
            if let Step::Respond(response) = &mut answer {
                response.headers.insert(
                    http::header::ALLOW,
                    http::HeaderValue::from_static(FORWARDED_METHODS),
                );
            }
            return answer;
        }
        if let (true, Some(credential)) = (byok, credential) {
            request.credential = Credential::Caller(credential);
        }
        Step::Forward(Forward {
            request,
            byok,
            content_length,
        })
    }

    /// Refuses a request for `err`, whose message may quote what the caller
    /// sent (a path, a header name): the pool's keys in it are masked.
    fn reject(&self, err: &Error) -> Step {
        let (kind, message) = err.answer();
        self.refuse(kind, &self.client.pool().redact(&message))
    }

    /// The answer for a body over the limit (counted as a rejected request).
    pub fn too_large(&self) -> Response {
        self.client.pool().counters().outcome(Outcome::Rejected);
        self.too_large_answer()
    }

    fn too_large_answer(&self) -> Response {
        self.answer(
            ErrorKind::RequestTooLarge,
            &format!(
                "request body exceeds the limit of {} bytes",
                self.max_body_bytes
            ),
        )
    }

    /// The answer for a request whose body paused for longer than the
    /// body timeout (a slowloris on the body); the connection closes after
    /// it, the body being left unread.
    pub fn body_stalled(&self) -> Response {
        self.client.pool().counters().outcome(Outcome::Rejected);
        let message = format!(
            "the request body paused for longer than {} s",
            self.body_timeout.as_secs_f64()
        );
        closing(self.answer(ErrorKind::RequestTimeout, &message))
    }

    /// Ends the dashboard's event streams, each with an error event saying
    /// `why`: a server that stops ends them at once (they would hold its
    /// shutdown for the whole grace period), and one whose reload replaced
    /// this gateway ends them so the dashboards reconnect to the new one.
    /// Everything else goes on.
    pub fn drain(&self, why: &'static str) {
        let _ = self.drained_why.set(why);
        self.drained.set();
    }

    /// The answer for a request still sending its body when the server's
    /// grace period ends; the connection closes after it.
    pub fn shutting_down(&self) -> Response {
        self.client.pool().counters().outcome(Outcome::Rejected);
        closing(self.answer(ErrorKind::Unavailable, "the server is shutting down"))
    }

    /// Sends an accepted request with its body.
    pub async fn forward(&self, forward: Forward, body: Bytes) -> Response {
        let mut request = forward.request;
        // A server that lost part of the body (uvicorn's httptools parser
        // drops the body of a request that asks for an upgrade) must not
        // have the rest sent upstream, with a pool key, as if it were whole.
        if let Some(length) = forward.content_length {
            if length != body.len() as u64 {
                self.client.pool().counters().outcome(Outcome::Rejected);
                let message = format!(
                    "the request body is {} bytes, but its Content-Length says {length}",
                    body.len()
                );
                return closing(self.answer(ErrorKind::InvalidRequest, &message));
            }
        }
        request.body = body;
        match self.client.request(request).await {
            Ok(response) => response,
            Err(err) => {
                self.client.pool().counters().outcome(Outcome::Rejected);
                self.error_response(&err)
            }
        }
    }

    /// An error answer of keyfailover's own, in the provider's envelope.
    pub fn answer(&self, kind: ErrorKind, message: &str) -> Response {
        Response::error(self.client.provider(), kind, message)
    }

    /// What an ASGI server may let through that the native server refuses
    /// before the gateway sees it: a head over [`MAX_HEAD_BYTES`] (431; uvicorn's
    /// default parser has no limit), and an HTTP/1.1 request without exactly
    /// one `Host` (400; RFC 9112, section 3.2). None when the head is fine.
    pub fn refuse_head(
        &self,
        http11: bool,
        method: &str,
        target: &str,
        headers: &HeaderMap,
    ) -> Option<Response> {
        let size = method.len()
            + target.len()
            + headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        if size > MAX_HEAD_BYTES {
            self.client.pool().counters().outcome(Outcome::Rejected);
            let message = format!("request head exceeds the limit of {MAX_HEAD_BYTES} bytes");
            let mut response = self.answer(ErrorKind::RequestTooLarge, &message);
            response.status = 431;
            return Some(response);
        }
        if http11 && headers.get_all(http::header::HOST).iter().count() != 1 {
            let message = "an HTTP/1.1 request needs exactly one Host header";
            if let Step::Respond(response) = self.refuse(ErrorKind::InvalidRequest, message) {
                return Some(response);
            }
        }
        None
    }

    fn error_response(&self, err: &Error) -> Response {
        let (kind, message) = err.answer();
        self.answer(kind, &message)
    }

    /// An answer instead of forwarding: counted as a rejected request.
    fn refuse(&self, kind: ErrorKind, message: &str) -> Step {
        self.client.pool().counters().outcome(Outcome::Rejected);
        Step::Respond(self.answer(kind, message))
    }

    /// Whether `given` is one of the client tokens. Every token is compared
    /// in full, so timing tells neither which one nor how much matched.
    fn is_client_token(&self, given: &[u8]) -> bool {
        let Some(tokens) = &self.tokens else {
            return false;
        };
        tokens
            .iter()
            .fold(false, |found, token| found | constant_time_eq(given, token))
    }
}

/// A token list option, checked: None stays None; an empty list, a blank
/// token, or a token that is one of the pool's keys is a ConfigError.
/// `response`, with the connection closed after it.
fn closing(mut response: Response) -> Response {
    response
        .headers
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn token_list(
    client: &FailoverClient,
    name: &str,
    tokens: Option<Vec<String>>,
) -> Result<Option<Vec<Vec<u8>>>> {
    let Some(tokens) = tokens else {
        return Ok(None);
    };
    if tokens.is_empty() {
        return Err(Error::Config(format!(
            "{name} is empty: give at least one token, or None"
        )));
    }
    if tokens.iter().any(|t| t.trim().is_empty()) {
        return Err(Error::Config(format!("{name}: tokens must not be blank")));
    }
    let keys = client.pool().key_set();
    if let Some(t) = tokens
        .iter()
        .find(|t| keys.secrets().any(|(k, _)| k == t.as_str()))
    {
        return Err(Error::Config(format!(
            "{name}: token {} is one of the pool's keys",
            client.pool().redact(t)
        )));
    }
    Ok(Some(tokens.into_iter().map(String::into_bytes).collect()))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::ClientOptions;
    use crate::headers::header_map;
    use crate::pool::{Cooldowns, KeyPool};
    use crate::provider::Provider;
    use std::time::Duration;

    const KEY: &str = "sk-ant-api03-pool-key-0000000001";

    fn gateway(options: GatewayOptions) -> Result<Gateway> {
        let pool = KeyPool::from_keys([KEY], Cooldowns::default(), None)?;
        let client = FailoverClient::new(
            pool,
            ClientOptions {
                base_url: "http://127.0.0.1:9/prefix".into(),
                provider: Provider::Anthropic,
                timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
                http2: true,
                name: None,
            },
        )?;
        Gateway::new(Arc::new(client), options)
    }

    fn with_tokens(byok: bool) -> Gateway {
        gateway(GatewayOptions {
            client_tokens: Some(vec!["team-token".into()]),
            allow_byok: byok,
            ..GatewayOptions::default()
        })
        .unwrap()
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        header_map(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))).unwrap()
    }

    fn status(step: &Step) -> Option<u16> {
        match step {
            Step::Respond(r) => Some(r.status),
            Step::Forward(_) => None,
        }
    }

    #[test]
    fn client_tokens_and_byok() {
        let strict = with_tokens(false);
        let post = |g: &Gateway, h: &[(&str, &str)]| g.begin("POST", "/v1/messages", head(h));
        assert_eq!(status(&post(&strict, &[("x-api-key", "team-token")])), None);
        assert_eq!(
            status(&post(&strict, &[("authorization", "Bearer team-token")])),
            None
        );
        assert_eq!(status(&post(&strict, &[("x-api-key", "t")])), Some(401));
        assert_eq!(
            status(&post(&strict, &[("x-api-key", "team-token-x")])),
            Some(401)
        );
        assert_eq!(status(&post(&strict, &[])), Some(401));

        let open = with_tokens(true);
        match post(&open, &[("x-api-key", "sk-callers-own")]) {
            Step::Forward(f) => assert!(f.byok()),
            other => panic!("{other:?}"),
        }
        match post(&open, &[("x-api-key", "team-token")]) {
            Step::Forward(f) => assert!(!f.byok()),
            other => panic!("{other:?}"),
        }
        assert_eq!(status(&post(&open, &[])), Some(401));
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn refused_before_any_upstream_call() {
        let g = gateway(GatewayOptions {
            max_body_bytes: 10,
            ..GatewayOptions::default()
        })
        .unwrap();
        let cases: &[(&str, &str, &[(&str, &str)], u16)] = &[
            ("CONNECT", "/x", &[], 405),
            ("TRACE", "/x", &[], 405),
            (
                "GET",
                "/ws",
                &[("upgrade", "websocket"), ("connection", "upgrade")],
                400,
            ),
            ("GET", "/../admin", &[], 400),
            ("GET", "/%2e%2e/admin", &[], 400),
            ("POST", "/v1/messages", &[("content-length", "11")], 413),
            (
                "POST",
                "/v1/messages",
                &[("transfer-encoding", "gzip, chunked")],
                501,
            ),
            (
                "POST",
                "/v1/messages",
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "br"),
                ],
                501,
            ),
            ("GE T", "/x", &[], 400),
            ("GET", "/_keyfailover/nope", &[], 404),
            ("POST", "/_keyfailover/health", &[], 405),
            ("GET", "/_keyfailover/health", &[], 200),
        ];
        for (method, target, headers, expected) in cases {
            assert_eq!(
                status(&g.begin(method, target, head(headers))),
                Some(*expected),
                "{method} {target}"
            );
        }
        assert_eq!(
            status(&g.begin("GET", "/v1/models", head(&[("upgrade", "h2c")]))),
            None
        );
        assert_eq!(
            status(&g.begin("POST", "/v1/x", head(&[("content-length", "10")]))),
            None
        );
        assert_eq!(
            status(&g.begin("POST", "/v1/x", head(&[("transfer-encoding", " Chunked ")]))),
            None
        );
        assert_eq!(g.too_large().status, 413);
    }

    #[test]
    fn a_refused_path_holding_a_pool_key_is_answered_with_its_hint() {
        let g = gateway(GatewayOptions::default()).unwrap();
        for target in [
            format!("/v1/../../{KEY}"),
            format!("/v1/%2e%2e/%2e%2e/{KEY}"),
            format!("/v1/{KEY}/\u{e9}"),
        ] {
            let Step::Respond(response) = g.begin("GET", &target, head(&[])) else {
                panic!("{target} was forwarded");
            };
            assert_eq!(response.status, 400, "{target}");
            let body = match response.body.into_direct() {
                crate::body::Direct::Full(bytes) => bytes,
                _ => panic!("an error body is whole"),
            };
            let text = String::from_utf8_lossy(&body);
            assert!(!text.contains(KEY), "{text}");
            assert!(text.contains(&crate::pool::mask(KEY)), "{text}");
        }
    }

    #[test]
    fn a_content_length_beside_chunked_is_not_the_bodys_length() {
        // RFC 9112, section 6.3: the chunks say how long the body is; the
        // length is neither held against it nor against the limit.
        let g = gateway(GatewayOptions {
            max_body_bytes: 100,
            ..GatewayOptions::default()
        })
        .unwrap();
        let both = head(&[("content-length", "1000"), ("transfer-encoding", "chunked")]);
        match g.begin("POST", "/v1/x", both) {
            Step::Forward(forward) => assert_eq!(forward.content_length, None),
            Step::Respond(r) => panic!("answered {}", r.status),
        }
        let alone = head(&[("content-length", "1000")]);
        assert_eq!(status(&g.begin("POST", "/v1/x", alone)), Some(413));
    }

    #[test]
    fn bad_token_lists_are_config_errors() {
        for (tokens, expected) in [
            (vec![], "empty"),
            (vec!["  ".to_owned()], "blank"),
            (vec![KEY.to_owned()], "one of the pool's keys"),
        ] {
            let err = gateway(GatewayOptions {
                client_tokens: Some(tokens),
                ..GatewayOptions::default()
            })
            .unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, Error::Config(_)) && message.contains(expected),
                "{message}"
            );
            assert!(!message.contains(KEY));
        }
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
