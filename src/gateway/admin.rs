//! The admin endpoints below `/_keyfailover/`, for every front end:
//!
//! | path | method | access |
//! | --- | --- | --- |
//! | `/` (the dashboard page) | GET | open: the page holds no data |
//! | `livez`, `readyz` | GET | open: for probes; counts only |
//! | `health`, `keys`, `metrics`, `events` | GET | client or admin token, when any is configured |
//! | `keys/{label}/reset`, `keys/{label}/retire`, `reload` | POST | client or admin token; refused when neither is configured |
//!
//! Unknown paths answer 404, other methods 405; every action is logged on
//! `keyfailover.admin` with who did it (the token's hint) and what.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::history::History;
use super::{constant_time_eq, Gateway, ADMIN_PREFIX};
use crate::body::ResponseBody;
use crate::error::ErrorKind;
use crate::events::{self, Field, Level, Record};
use crate::failover::Response;
use crate::headers::caller_credential;
use crate::metrics::Outcome;
use crate::pool::{mask, Cause, KeyState, Reason};

/// The dashboard page: one self-contained file, no network.
const DASHBOARD: &str = include_str!("dashboard.html");
/// How often the dashboard's event stream sends the pool's state.
const EVENTS_EVERY: Duration = Duration::from_secs(1);

/// Who is asking, by their token's hint; or the answer that refuses them.
enum Access {
    Granted(String),
    Refused(Box<Response>),
}

impl Gateway {
    pub(super) fn admin(&self, method: &str, path: &str, headers: &HeaderMap) -> Response {
        let endpoint = path
            .strip_prefix(ADMIN_PREFIX)
            .or_else(|| path.strip_prefix(&ADMIN_PREFIX[..ADMIN_PREFIX.len() - 1]))
            .unwrap_or_default();
        let get = matches!(method, "GET" | "HEAD");
        let post = method == "POST";
        let action = endpoint
            .strip_prefix("keys/")
            .and_then(|rest| rest.rsplit_once('/'))
            .filter(|(_, verb)| matches!(*verb, "reset" | "retire"));
        match (endpoint, action) {
            ("", _) if get => page(),
            ("livez", _) if get => Response::json(200, r#"{"status":"ok"}"#),
            ("readyz", _) if get => self.readyz(),
            ("health" | "keys" | "metrics" | "events", _) if get => match self.read_access(headers)
            {
                Access::Refused(answer) => *answer,
                Access::Granted(_) => self.read(endpoint, headers),
            },
            (_, Some((label, verb))) if post => match self.action_access(headers) {
                Access::Refused(answer) => *answer,
                Access::Granted(who) => self.key_action(label, verb, &who),
            },
            ("reload", _) if post && self.reload.is_some() => match self.action_access(headers) {
                Access::Refused(answer) => *answer,
                Access::Granted(who) => self.reload(&who),
            },
            // The path echoed may hold a key (in place of a label).
            ("" | "livez" | "readyz" | "health" | "keys" | "metrics" | "events", _) => {
                self.not_allowed(path, "GET, HEAD")
            }
            (_, Some(_)) => self.not_allowed(path, "POST"),
            ("reload", _) if self.reload.is_some() => self.not_allowed(path, "POST"),
            _ => {
                let shown = self.client.pool().redact(path);
                self.answer(ErrorKind::NotFound, &format!("no admin endpoint {shown}"))
            }
        }
    }

    /// 405 for an admin endpoint, with the `Allow` header RFC 9110 asks for.
    fn not_allowed(&self, path: &str, allow: &'static str) -> Response {
        let only = if allow == "POST" { "POST" } else { "GET" };
        // The path echoed may hold a key (in place of a label).
        let shown = self.client.pool().redact(path);
        let mut answer = self.answer(
            ErrorKind::MethodNotAllowed,
            &format!("{shown} answers {only} only"),
        );
        answer
            .headers
            .insert(http::header::ALLOW, HeaderValue::from_static(allow));
        answer
    }

    /// The token the caller presents, if it is a client or admin token.
    fn admin_caller(&self, headers: &HeaderMap) -> Option<String> {
        let credential = caller_credential(headers)?;
        let given = credential.token();
        let known = self
            .tokens
            .iter()
            .chain(self.admin_tokens.iter())
            .flatten()
            .fold(false, |found, token| found | constant_time_eq(given, token));
        known.then(|| format!("token {}", mask(&String::from_utf8_lossy(given))))
    }

    fn read_access(&self, headers: &HeaderMap) -> Access {
        if self.tokens.is_none() && self.admin_tokens.is_none() {
            return Access::Granted("an open admin endpoint".into());
        }
        match self.admin_caller(headers) {
            Some(who) => Access::Granted(who),
            None => Access::Refused(Box::new(self.refusal(
                ErrorKind::Authentication,
                "admin endpoints need a client or admin token",
            ))),
        }
    }

    fn action_access(&self, headers: &HeaderMap) -> Access {
        if self.tokens.is_none() && self.admin_tokens.is_none() {
            return Access::Refused(Box::new(self.refusal(
                ErrorKind::Permission,
                "admin actions are off: the proxy has neither client_tokens nor admin_tokens",
            )));
        }
        match self.admin_caller(headers) {
            Some(who) => Access::Granted(who),
            None => Access::Refused(Box::new(self.refusal(
                ErrorKind::Authentication,
                "admin actions need a client or admin token",
            ))),
        }
    }

    fn refusal(&self, kind: ErrorKind, message: &str) -> Response {
        self.client.pool().counters().outcome(Outcome::Rejected);
        self.answer(kind, message)
    }

    /// 200 while a key is valid or will be by itself; 503 when every key is
    /// retired, or once the proxy is shut down (it refuses every request).
    fn readyz(&self) -> Response {
        let health = self.client.pool().health();
        let shut_down = self.client.is_shut_down();
        let ready = health.valid + health.temporary > 0 && !shut_down;
        let status = match (ready, shut_down) {
            (true, _) => "ready",
            (false, true) => "shutting_down",
            (false, false) => "unavailable",
        };
        let body = json!({
            "status": status,
            "keys": {"valid": health.valid, "temporary": health.temporary, "permanent": health.permanent},
        });
        Response::json(if ready { 200 } else { 503 }, body.to_string())
    }

    fn read(&self, endpoint: &str, headers: &HeaderMap) -> Response {
        let pool = self.client.pool();
        match endpoint {
            "metrics" => {
                let mut response = Response::json(200, self.client.metrics());
                response.headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                response
            }
            "health" => {
                let health = pool.health();
                let retired = health.valid + health.temporary == 0;
                Response::json(
                    if retired { 503 } else { 200 },
                    health.to_json().to_string(),
                )
            }
            "keys" => {
                let keys: Vec<Value> = pool.snapshot().iter().map(|k| k.to_json()).collect();
                Response::json(200, json!({ "keys": keys }).to_string())
            }
            _ => self.events(matches!(self.action_access(headers), Access::Granted(_))),
        }
    }

    /// `reset` or `retire` a key by label.
    fn key_action(&self, label: &str, verb: &str, who: &str) -> Response {
        let pool = self.client.pool();
        let label = percent_decode(label);
        let key = match pool.key(&label) {
            Ok(key) => key,
            Err(err) => return self.answer(ErrorKind::NotFound, &err.to_string()),
        };
        if verb == "reset" {
            key.reset();
        } else {
            key.retire(Cause::new(Reason::Manual, None));
        }
        admin_record(
            format!(
                "{verb} key {} ({}) of pool {} by {who}",
                key.label(),
                key.hint(),
                pool.name()
            ),
            who,
            verb,
            Some(key.label()),
        );
        let snapshot = pool
            .snapshot()
            .into_iter()
            .find(|k| k.label == key.label())
            .map(|k| k.to_json());
        Response::json(200, json!({"ok": true, "key": snapshot}).to_string())
    }

    fn reload(&self, who: &str) -> Response {
        let Some(reload) = &self.reload else {
            return self.answer(ErrorKind::NotFound, "no admin endpoint reload");
        };
        match reload().and_then(|keys| self.client.pool().reload(keys)) {
            Ok(report) => {
                admin_record(
                    format!("reload by {who}: {}", report.summary()),
                    who,
                    "reload",
                    None,
                );
                Response::json(200, report.to_json().to_string())
            }
            Err(err) => {
                // A callback's own message may quote a key it was given.
                let err = self.client.pool().redact(&err.to_string()).into_owned();
                admin_record_at(
                    Level::Warning,
                    format!("reload by {who} failed: {err}"),
                    who,
                    "reload",
                    None,
                );
                self.answer(ErrorKind::InvalidRequest, &format!("reload failed: {err}"))
            }
        }
    }

    /// The dashboard's stream: the pool's state as an SSE event every second.
    fn events(&self, actions: bool) -> Response {
        let runtime = match self.runtime() {
            Some(runtime) => runtime,
            None => return self.answer(ErrorKind::Unavailable, "no runtime for the event stream"),
        };
        let (tx, rx) = mpsc::channel(4);
        let client = self.client.clone();
        let reload = self.reload.is_some();
        let history = self.history.clone();
        let drained = self.drained.clone();
        let shut_down = self.client.shutdown_latch();
        let ending = self.drained_why.clone();
        let task = runtime.spawn(async move {
            loop {
                if drained.is_set() || shut_down.is_set() {
                    // Ended with an error event, as a stream cut short is.
                    let why = ending
                        .get()
                        .copied()
                        .unwrap_or("the server is shutting down");
                    let event = client
                        .provider()
                        .sse_error_event(ErrorKind::Unavailable, why);
                    let _ = tx.send(Ok(Bytes::from(event))).await;
                    return;
                }
                let state = {
                    let history = history
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    dashboard_state(&client, &history, actions, reload)
                };
                let event = Bytes::from(format!("event: state\ndata: {state}\n\n"));
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = drained.wait() => {}
                    _ = shut_down.wait() => {}
                    _ = tokio::time::sleep(EVENTS_EVERY) => {}
                }
            }
        });
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Response {
            status: 200,
            headers,
            attempts: 0,
            key_label: None,
            exhausted: false,
            attempt_log: Vec::new(),
            body: ResponseBody::from_channel(rx, task.abort_handle()),
        }
    }
}

fn page() -> Response {
    let mut response = Response::json(200, DASHBOARD);
    let headers = &mut response.headers;
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page talks to its own origin only, and runs nothing from elsewhere.
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Everything the dashboard shows, from what every worker shares (states,
/// counters) rather than any one process's memory.
pub fn dashboard_state(
    client: &crate::failover::FailoverClient,
    history: &History,
    actions: bool,
    reload: bool,
) -> Value {
    let pool = client.pool();
    let health = pool.health();
    let snapshot = pool.snapshot();
    let keys: Vec<Value> = pool
        .keys()
        .iter()
        .zip(&snapshot)
        .map(|(key, snap)| {
            let counters = key.counters();
            let (responses, transitions) = counters.totals();
            let mut entry = snap.to_json();
            entry["responses"] = json!(responses);
            entry["transitions"] = transitions
                .iter()
                .map(|(r, n)| (r.as_str().to_owned(), json!(n)))
                .collect::<serde_json::Map<_, _>>()
                .into();
            entry["last_minute"] = history.last_minute(key.label()).map_or(
                Value::Null,
                |(requests, failovers)| json!({"requests": requests, "failovers": failovers}),
            );
            entry["failovers"] = json!(counters.failovers());
            entry["last_error"] = counters.last_error().map_or(
                Value::Null,
                |(status, at)| json!({"status": status, "at": at as f64 / 1000.0}),
            );
            entry
        })
        .collect();
    let requests = pool.counters().outcomes();
    json!({
        "time": unix_now(),
        "pool": pool.name(),
        "provider": client.provider().as_str(),
        "backend": pool.state_backend(),
        "strategy": pool.strategy().as_str(),
        "status": health.status(),
        "health": {"valid": health.valid, "temporary": health.temporary, "permanent": health.permanent},
        "requests": requests
            .iter()
            .map(|(o, n)| (o.as_str().to_owned(), json!(n)))
            .collect::<serde_json::Map<_, _>>(),
        "keys": keys,
        "states": [KeyState::Valid.as_str(), KeyState::Temporary.as_str(), KeyState::Permanent.as_str()],
        "actions": actions,
        "reload": reload,
        "timeline": history.timeline(50),
        "rates": {"bucket_seconds": 10, "points": history.rates()},
    })
}

/// Now, in Unix seconds.
pub(super) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn admin_record(message: String, who: &str, action: &str, key: Option<&str>) {
    admin_record_at(Level::Info, message, who, action, key);
}

/// An admin record at `level` (a failed action is a warning).
fn admin_record_at(level: Level, message: String, who: &str, action: &str, key: Option<&str>) {
    events::emit(Record {
        logger: "keyfailover.admin",
        level,
        message,
        fields: vec![
            ("who", Field::from(who)),
            ("action", Field::from(action)),
            ("key", Field::from(key)),
        ],
    });
}

/// A path segment with its %XX escapes decoded (labels may hold spaces).
fn percent_decode(segment: &str) -> String {
    String::from_utf8_lossy(&crate::target::percent_decoded(segment.as_bytes(), false)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::{ClientOptions, FailoverClient};
    use crate::gateway::{GatewayOptions, Step};
    use crate::headers::header_map;
    use crate::pool::{Cooldowns, KeyPool, KeySpec};
    use crate::provider::Provider;
    use std::sync::Arc;

    const KEYS: [&str; 2] = ["sk-ant-admin-key-0-xxxxxxxx", "sk-ant-admin-key-1-xxxxxxxx"];

    fn gateway(options: GatewayOptions) -> Gateway {
        let pool = KeyPool::from_keys(KEYS, Cooldowns::default(), None).unwrap();
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
        Gateway::new(Arc::new(client), options).unwrap()
    }

    fn call(g: &Gateway, method: &str, path: &str, token: Option<&str>) -> Response {
        let headers = match token {
            Some(t) => header_map([(b"x-api-key".as_slice(), t.as_bytes())]).unwrap(),
            None => HeaderMap::new(),
        };
        match g.begin(method, path, headers) {
            Step::Respond(response) => response,
            Step::Forward(_) => panic!("{method} {path} was forwarded"),
        }
    }

    fn tokens(client: &[&str], admin: Option<&[&str]>) -> GatewayOptions {
        GatewayOptions {
            client_tokens: (!client.is_empty())
                .then(|| client.iter().map(|t| t.to_string()).collect()),
            admin_tokens: admin.map(|a| a.iter().map(|t| t.to_string()).collect()),
            ..GatewayOptions::default()
        }
    }

    #[test]
    fn probes_answer_without_a_token() {
        let g = gateway(tokens(&["team"], None));
        assert_eq!(call(&g, "GET", "/_keyfailover/livez", None).status, 200);
        assert_eq!(call(&g, "GET", "/_keyfailover/readyz", None).status, 200);
        assert_eq!(call(&g, "GET", "/_keyfailover/health", None).status, 401);
        let pool = g.client.pool();
        pool.key("key-0")
            .unwrap()
            .mark_temporary(Some(Duration::from_secs(60)));
        pool.key("key-1").unwrap().mark_permanent();
        assert_eq!(
            call(&g, "GET", "/_keyfailover/readyz", None).status,
            200,
            "key-0 comes back"
        );
        pool.key("key-0").unwrap().mark_permanent();
        assert_eq!(call(&g, "GET", "/_keyfailover/readyz", None).status, 503);
        assert_eq!(
            call(&g, "GET", "/_keyfailover/health", Some("team")).status,
            503
        );
    }

    #[test]
    fn a_proxy_shut_down_is_not_ready() {
        let g = gateway(tokens(&["team"], None));
        g.client.shutdown();
        let answer = call(&g, "GET", "/_keyfailover/readyz", None);
        assert_eq!(answer.status, 503);
        let body: serde_json::Value = serde_json::from_slice(
            &futures_util::FutureExt::now_or_never(answer.body.read_all())
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["status"], "shutting_down");
        assert_eq!(call(&g, "GET", "/_keyfailover/livez", None).status, 200);
    }

    #[test]
    fn who_may_do_what() {
        let cases: &[(GatewayOptions, Option<&str>, u16, u16)] = &[
            // (options, token, a read, an action)
            (tokens(&[], None), None, 200, 403),
            (tokens(&[], Some(&["ops"])), None, 401, 401),
            (tokens(&[], Some(&["ops"])), Some("ops"), 200, 200),
            (tokens(&["team"], None), Some("team"), 200, 200),
            (tokens(&["team"], None), Some("nope"), 401, 401),
            (tokens(&["team"], Some(&["ops"])), Some("ops"), 200, 200),
        ];
        for (options, token, read, action) in cases.iter().cloned() {
            let g = gateway(options);
            assert_eq!(
                call(&g, "GET", "/_keyfailover/keys", token).status,
                read,
                "{token:?}"
            );
            let reset = call(&g, "POST", "/_keyfailover/keys/key-0/reset", token);
            assert_eq!(reset.status, action, "{token:?}");
        }
    }

    #[test]
    fn actions_reset_and_retire_by_label() {
        let g = gateway(tokens(&["team"], None));
        assert_eq!(
            call(&g, "POST", "/_keyfailover/keys/key-1/retire", Some("team")).status,
            200
        );
        assert_eq!(
            g.client.pool().key("key-1").unwrap().state(),
            KeyState::Permanent
        );
        assert_eq!(
            call(&g, "POST", "/_keyfailover/keys/key-1/reset", Some("team")).status,
            200
        );
        assert_eq!(
            g.client.pool().key("key-1").unwrap().state(),
            KeyState::Valid
        );
        assert_eq!(
            call(&g, "POST", "/_keyfailover/keys/key-9/reset", Some("team")).status,
            404
        );
        assert_eq!(
            call(&g, "GET", "/_keyfailover/keys/key-1/reset", Some("team")).status,
            405
        );
        assert_eq!(
            call(&g, "POST", "/_keyfailover/keys", Some("team")).status,
            405
        );
        assert_eq!(
            call(&g, "POST", "/_keyfailover/reload", Some("team")).status,
            404,
            "no hook"
        );
        assert_eq!(
            call(&g, "GET", "/_keyfailover/nothing", Some("team")).status,
            404
        );
    }

    #[test]
    fn reload_runs_the_hook() {
        let mut options = tokens(&["team"], None);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        options.reload = Some(Arc::new(move || {
            match seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Ok(vec![KeySpec::new("only", KEYS[1])]),
                _ => Err(crate::Error::Config("keys file, line 2: bad".into())),
            }
        }));
        let g = gateway(options);
        let response = call(&g, "POST", "/_keyfailover/reload", Some("team"));
        assert_eq!(response.status, 200);
        assert_eq!(g.client.pool().len(), 1);
        let failed = call(&g, "POST", "/_keyfailover/reload", Some("team"));
        assert_eq!(failed.status, 400);
        assert_eq!(g.client.pool().len(), 1, "the old keys stay");
        assert_eq!(
            call(&g, "GET", "/_keyfailover/reload", Some("team")).status,
            405
        );
    }

    #[test]
    fn the_page_is_open_and_locked_down() {
        let g = gateway(tokens(&["team"], None));
        for path in ["/_keyfailover/", "/_keyfailover"] {
            let page = call(&g, "GET", path, None);
            assert_eq!(page.status, 200);
            assert!(page.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"));
            assert!(page.headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("connect-src 'self'"));
        }
    }

    #[tokio::test]
    async fn the_event_stream_sends_the_state_every_second() {
        let g = gateway(tokens(&["team"], None));
        g.client.pool().key("key-0").unwrap().mark_permanent();
        let stream = call(&g, "GET", "/_keyfailover/events", Some("team"));
        assert_eq!(stream.headers["content-type"], "text/event-stream");
        let first = stream.body.next_batch().await.unwrap().unwrap().concat();
        let text = String::from_utf8(first).unwrap();
        let data: Value =
            serde_json::from_str(text.strip_prefix("event: state\ndata: ").unwrap().trim())
                .unwrap();
        assert_eq!(data["keys"][0]["state"], "permanent");
        assert_eq!(data["keys"][0]["transitions"]["manual"], 1);
        assert_eq!(data["actions"], true);
        assert!(!text.contains(KEYS[0]));
        let started = std::time::Instant::now();
        assert!(stream.body.next_batch().await.unwrap().is_some());
        assert!(started.elapsed() >= Duration::from_millis(900));
        stream.body.close();
    }
}
