//! The server-wide admin area: `/_keyfailover/` of a server with several
//! routes (none at `/`: refused), over every route's pool. Each route keeps
//! its own full admin area (dashboard, actions) below its prefix.
//!
//! | path | method | |
//! | --- | --- | --- |
//! | `livez` | GET | open |
//! | `readyz` | GET | open: 200 when every pool has a usable key, else 503 naming those without |
//! | `health`, `keys` | GET | each pool's, by route name |
//! | `metrics` | GET | one exposition for every pool (label `pool`) |
//!
//! `health`, `keys` and `metrics` take one of the server's admin tokens
//! (`x-api-key` or `Authorization: Bearer`); with none configured they are
//! open only when no route has client tokens either.

use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use serde_json::{json, Map, Value};

use super::{Route, Server};
use crate::error::ErrorKind;
use crate::failover::Response;
use crate::gateway::{constant_time_eq, ADMIN_PREFIX};
use crate::headers::caller_credential;

/// Whether `path` is in the admin area.
pub(super) fn is_admin_path(path: &str) -> bool {
    path.starts_with(ADMIN_PREFIX) || path == &ADMIN_PREFIX[..ADMIN_PREFIX.len() - 1]
}

impl Server {
    pub(super) fn admin(
        &self,
        routes: &[Route],
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Response {
        let gateway = &routes[routes.len() - 1].gateway;
        let endpoint = path
            .strip_prefix(ADMIN_PREFIX)
            .unwrap_or_default()
            .trim_end_matches('/');
        let known = matches!(endpoint, "livez" | "readyz" | "health" | "keys" | "metrics");
        // The path echoed may hold a key (in place of a label).
        if !known {
            return gateway.answer(
                ErrorKind::NotFound,
                &format!(
                    "no admin endpoint {} (the server-wide area has livez, readyz, health, \
                     keys and metrics; each route has its own below its prefix)",
                    super::redacted(routes, path)
                ),
            );
        }
        if !matches!(method, "GET" | "HEAD") {
            let mut answer = gateway.answer(
                ErrorKind::MethodNotAllowed,
                &format!("{path} answers GET only"),
            );
            answer
                .headers
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return answer;
        }
        let pools = || {
            routes
                .iter()
                .map(|route| (route.gateway.client().name(), route.gateway.client().pool()))
        };
        match endpoint {
            "livez" => Response::json(200, r#"{"status":"ok"}"#),
            "readyz" => {
                let without: Vec<&str> = pools()
                    .filter(|(_, pool)| {
                        let health = pool.health();
                        health.valid + health.temporary == 0
                    })
                    .map(|(name, _)| name)
                    .collect();
                let (status, body) = if without.is_empty() {
                    (200, json!({"status": "ready"}))
                } else {
                    (
                        503,
                        json!({"status": "unavailable", "pools_without_keys": without}),
                    )
                };
                Response::json(status, body.to_string())
            }
            _ if !self.may_read(routes, headers) => gateway.answer(
                ErrorKind::Authentication,
                "the server-wide admin area takes an admin token",
            ),
            "metrics" => {
                let pools: Vec<_> = pools().map(|(name, pool)| (pool, name)).collect();
                let mut response = Response::json(200, crate::metrics::exposition_of(&pools));
                response.headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                response
            }
            _ => {
                let by_pool: Map<String, Value> = pools()
                    .map(|(name, pool)| {
                        let value = if endpoint == "health" {
                            pool.health().to_json()
                        } else {
                            Value::Array(pool.snapshot().iter().map(|k| k.to_json()).collect())
                        };
                        (name.to_owned(), value)
                    })
                    .collect();
                Response::json(200, json!({ "pools": by_pool }).to_string())
            }
        }
    }

    fn may_read(&self, routes: &[Route], headers: &HeaderMap) -> bool {
        let Some(tokens) = &self.options.admin_tokens else {
            return routes.iter().all(|r| !r.gateway.has_client_tokens());
        };
        caller_credential(headers).is_some_and(|given| {
            tokens.iter().fold(false, |found, token| {
                found | constant_time_eq(given.token(), token)
            })
        })
    }
}
