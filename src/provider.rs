//! What differs between providers: where the key goes, and the shape of the
//! errors keyfailover creates itself (JSON bodies and SSE error events).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde_json::json;

use crate::error::{Error, ErrorKind};

/// How a key is written in the value of the header that carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthForm {
    /// The key itself.
    Raw = 0,
    /// `Bearer <key>`.
    Bearer = 1,
}

impl AuthForm {
    pub fn value(self, key: &str) -> String {
        match self {
            AuthForm::Raw => key.to_owned(),
            AuthForm::Bearer => format!("Bearer {key}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Keys in `x-api-key`; errors `{"type":"error","error":{"type","message"}}`.
    Anthropic,
    /// Keys in `Authorization: Bearer`; errors `{"error":{"message","type","param","code"}}`.
    /// Also every OpenAI-compatible API (Groq, Mistral, DeepSeek, OpenRouter,
    /// Together, ...) with its own `base_url`.
    OpenAi,
    /// Google's Gemini API (generativelanguage.googleapis.com). Keys in
    /// `x-goog-api-key` for the native API, and in `Authorization: Bearer`
    /// for its OpenAI-compatible endpoint (`/v1beta/openai/...`): both as
    /// ai.google.dev/gemini-api/docs/api-key and .../docs/openai show them.
    /// Errors in Google's envelope `{"error":{"code","message","status"}}`
    /// (ai.google.dev/gemini-api/docs/troubleshooting), which the
    /// google-genai SDK turns into its `ClientError`/`ServerError`.
    Gemini,
    /// Azure OpenAI (`https://NAME.openai.azure.com`). Keys in `api-key`, the
    /// header Azure's REST reference documents for key authentication, on
    /// the deployments API (`/openai/deployments/{d}/...?api-version=`) and
    /// on the v1 API (`/openai/v1/...`) alike; `Authorization: Bearer` is
    /// for Entra ID tokens on the deployments API, so one header serves both
    /// (learn.microsoft.com/azure/ai-foundry/openai/reference). Errors as
    /// OpenAI's.
    AzureOpenAi,
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown provider {:?}: expected one of {}",
                    crate::pool::echoed(s),
                    Provider::ALL
                        .iter()
                        .map(|p| format!("{:?}", p.as_str()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a URL path is Gemini's OpenAI-compatible endpoint
/// (`/v1beta/openai/chat/completions` and the like).
fn is_openai_compatible(path: &str) -> bool {
    path.split('/').any(|segment| segment == "openai")
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Anthropic,
        Provider::OpenAi,
        Provider::Gemini,
        Provider::AzureOpenAi,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
            Provider::Gemini => "gemini",
            Provider::AzureOpenAi => "azure_openai",
        }
    }

    /// The header that carries a key, and its value, for the provider's
    /// main API (for Gemini, the native one).
    pub fn auth_header(self, key: &str) -> (&'static str, String) {
        let (name, form) = self.auth_scheme();
        (name, form.value(key))
    }

    /// The header that carries a key for a request to `url` (a full URL or
    /// its path): Gemini's OpenAI-compatible endpoint takes a Bearer token,
    /// its native API `x-goog-api-key`; the others have one header.
    pub fn auth_header_for(self, key: &str, url: &str) -> (&'static str, String) {
        let (name, form) = self.auth_scheme_for(url);
        (name, form.value(key))
    }

    /// [`Provider::auth_header`]'s header and how the key is written in it.
    pub fn auth_scheme(self) -> (&'static str, AuthForm) {
        match self {
            Provider::Anthropic => ("x-api-key", AuthForm::Raw),
            Provider::OpenAi => ("authorization", AuthForm::Bearer),
            Provider::Gemini => ("x-goog-api-key", AuthForm::Raw),
            Provider::AzureOpenAi => ("api-key", AuthForm::Raw),
        }
    }

    /// [`Provider::auth_header_for`]'s header and how the key is written in it.
    pub fn auth_scheme_for(self, url: &str) -> (&'static str, AuthForm) {
        if self != Provider::Gemini {
            return self.auth_scheme();
        }
        let path = url
            .find("://")
            .map_or(url, |i| {
                let rest = &url[i + 3..];
                rest.find('/').map_or("", |j| &rest[j..])
            })
            .split('?')
            .next()
            .unwrap_or("");
        if is_openai_compatible(path) {
            ("authorization", AuthForm::Bearer)
        } else {
            self.auth_scheme()
        }
    }

    /// `target` (path and query) without the credentials a caller may put
    /// in its query string: Gemini accepts a key as `?key=`, which
    /// keyfailover never forwards (the pool's key goes in a header) and
    /// never logs. Other providers take no key in the URL.
    pub fn strip_credential_query(self, target: &str) -> Cow<'_, str> {
        match self {
            Provider::Gemini => crate::target::without_query_param(target, "key"),
            _ => Cow::Borrowed(target),
        }
    }

    fn error_value(self, kind: ErrorKind, message: &str) -> serde_json::Value {
        match self {
            Provider::Anthropic => json!({
                "type": "error",
                "error": {"type": kind.type_name(), "message": message},
            }),
            Provider::OpenAi | Provider::AzureOpenAi => json!({
                "error": {
                    "message": message,
                    "type": kind.type_name(),
                    "param": null,
                    "code": kind.code(),
                },
            }),
            // Google's error model (google.rpc.Status as JSON): the HTTP
            // code, the message, and the canonical status name.
            Provider::Gemini => json!({
                "error": {
                    "code": kind.status(),
                    "message": message,
                    "status": kind.google_status(),
                },
            }),
        }
    }

    /// A JSON error body in the provider's envelope.
    pub fn error_body(self, kind: ErrorKind, message: &str) -> Vec<u8> {
        self.error_value(kind, message).to_string().into_bytes()
    }

    /// Whether `event` ends a stream of this provider: Anthropic's
    /// `message_stop` (or an `error` event), OpenAI's `data: [DONE]` (or an
    /// error object). A Gemini stream has no terminal sentinel: its last
    /// chunk is the one whose candidate carries a `finishReason` (or whose
    /// `promptFeedback` has a `blockReason`: a blocked prompt gets that one
    /// chunk); its OpenAI-compatible streams end with `[DONE]`.
    pub fn is_final_event(self, event: &crate::sse::Event) -> bool {
        let data = event.data.trim_ascii();
        let openai_final = || {
            data == b"[DONE]" || data.starts_with(b"{\"error\"") || data.starts_with(b"[{\"error\"")
        };
        match self {
            Provider::Anthropic => {
                matches!(event.name.as_deref(), Some("message_stop") | Some("error"))
            }
            // The Responses API ends its streams with one of its own events,
            // and no `[DONE]`.
            Provider::OpenAi | Provider::AzureOpenAi => {
                openai_final()
                    || matches!(
                        event.name.as_deref(),
                        Some("response.completed" | "response.incomplete" | "response.failed")
                            | Some("error")
                    )
            }
            Provider::Gemini => openai_final() || gemini_final_chunk(data),
        }
    }

    /// Whether whole events `events` may hold the stream's final event: a
    /// look at the bytes before any event is read, true whenever
    /// [`Provider::is_final_event`] is for one of them. Most of a stream's
    /// events then go by without being read.
    pub fn may_hold_final_event(self, events: &[u8]) -> bool {
        let has = |needle: &[u8]| memchr::memmem::find(events, needle).is_some();
        let openai = || has(b"[DONE]") || has(b"error");
        match self {
            Provider::Anthropic => has(b"message_stop") || has(b"error"),
            Provider::OpenAi | Provider::AzureOpenAi => {
                openai()
                    || has(b"response.completed")
                    || has(b"response.incomplete")
                    || has(b"response.failed")
            }
            Provider::Gemini => openai() || has(b"finishReason") || has(b"blockReason"),
        }
    }

    /// One SSE error event in the provider's shape.
    pub fn sse_error_event(self, kind: ErrorKind, message: &str) -> Vec<u8> {
        let data = self.error_value(kind, message);
        match self {
            Provider::Anthropic => format!("event: error\ndata: {data}\n\n"),
            Provider::OpenAi | Provider::AzureOpenAi | Provider::Gemini => {
                format!("data: {data}\n\n")
            }
        }
        .into_bytes()
    }
}

/// Whether a Gemini `GenerateContentResponse` chunk is the stream's last:
/// a candidate with a `finishReason`, or a blocked prompt. Only chunks that
/// mention either are parsed.
fn gemini_final_chunk(data: &[u8]) -> bool {
    let mentions = |needle: &[u8]| memchr::memmem::find(data, needle).is_some();
    if !mentions(b"finishReason") && !mentions(b"blockReason") {
        return false;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return false;
    };
    let finished = value
        .get("candidates")
        .and_then(|c| c.as_array())
        .is_some_and(|candidates| {
            candidates
                .iter()
                .any(|c| c.get("finishReason").is_some_and(|r| !r.is_null()))
        });
    finished
        || value
            .pointer("/promptFeedback/blockReason")
            .is_some_and(|r| !r.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes() {
        assert_eq!(
            String::from_utf8(
                Provider::Anthropic
                    .error_body(ErrorKind::RateLimit, "all configured keys are rate-limited")
            )
            .unwrap(),
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"all configured keys are rate-limited"}}"#
        );
        let openai: serde_json::Value =
            serde_json::from_slice(&Provider::OpenAi.error_body(ErrorKind::Api, "x \"quoted\""))
                .unwrap();
        assert_eq!(
            openai,
            json!({"error": {"message": "x \"quoted\"", "type": "api_error", "param": null, "code": "upstream_error"}})
        );
    }

    #[test]
    fn sse_error_events() {
        let event = String::from_utf8(Provider::Anthropic.sse_error_event(ErrorKind::Api, "broke"))
            .unwrap();
        assert!(event.starts_with("event: error\ndata: {"));
        assert!(event.ends_with("}\n\n"));
        let event =
            String::from_utf8(Provider::OpenAi.sse_error_event(ErrorKind::Api, "broke")).unwrap();
        assert!(event.starts_with("data: {\"error\":{"));
        assert_eq!(
            event.matches('\n').count(),
            2,
            "one data line, then the blank line"
        );
    }

    #[test]
    fn names() {
        assert_eq!("openai".parse::<Provider>().unwrap(), Provider::OpenAi);
        assert_eq!("gemini".parse::<Provider>().unwrap(), Provider::Gemini);
        assert_eq!(
            "azure_openai".parse::<Provider>().unwrap(),
            Provider::AzureOpenAi
        );
        let err = "azure".parse::<Provider>().unwrap_err().to_string();
        assert!(err.contains("\"azure_openai\""), "{err}");
        for provider in Provider::ALL {
            assert_eq!(provider.as_str().parse::<Provider>().unwrap(), provider);
        }
        assert_eq!(
            Provider::OpenAi.auth_header("k"),
            ("authorization", "Bearer k".into())
        );
    }

    #[test]
    fn auth_headers_by_endpoint() {
        let gemini = Provider::Gemini;
        assert_eq!(
            gemini.auth_header_for(
                "k",
                "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
            ),
            ("x-goog-api-key", "k".into())
        );
        assert_eq!(
            gemini.auth_header_for(
                "k",
                "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
            ),
            ("authorization", "Bearer k".into())
        );
        assert_eq!(
            gemini.auth_header_for("k", "/v1beta/models/openai-like:generateContent?x=/openai/"),
            ("x-goog-api-key", "k".into()),
            "only a whole path segment, and never the query"
        );
        for url in [
            "https://east.openai.azure.com/openai/deployments/gpt/chat/completions?api-version=2024-10-21",
            "https://east.openai.azure.com/openai/v1/chat/completions",
        ] {
            assert_eq!(
                Provider::AzureOpenAi.auth_header_for("k", url),
                ("api-key", "k".into())
            );
        }
    }

    #[test]
    fn gemini_envelopes_and_stream_ends() {
        let body: serde_json::Value = serde_json::from_slice(
            &Provider::Gemini
                .error_body(ErrorKind::RateLimit, "all configured keys are rate-limited"),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": 429, "message": "all configured keys are rate-limited", "status": "RESOURCE_EXHAUSTED"}})
        );
        let event =
            String::from_utf8(Provider::Gemini.sse_error_event(ErrorKind::Api, "broke")).unwrap();
        assert_eq!(
            event,
            "data: {\"error\":{\"code\":502,\"message\":\"broke\",\"status\":\"UNAVAILABLE\"}}\n\n"
        );
        let azure: serde_json::Value =
            serde_json::from_slice(&Provider::AzureOpenAi.error_body(ErrorKind::Timeout, "slow"))
                .unwrap();
        assert_eq!(azure["error"]["code"], "upstream_timeout");

        let final_of = |data: &str| {
            Provider::Gemini.is_final_event(&crate::sse::Event {
                name: None,
                data: data.as_bytes().into(),
                has_fields: true,
            })
        };
        assert!(final_of(
            r#"{"candidates":[{"content":{"parts":[{"text":"."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":3}}"#
        ));
        assert!(final_of(
            r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":3}}"#
        ));
        assert!(final_of(
            r#"{"error":{"code":500,"message":"x","status":"INTERNAL"}}"#
        ));
        assert!(final_of("[DONE]"), "the OpenAI-compatible endpoint");
        assert!(!final_of(
            r#"{"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"},"index":0}]}"#
        ));
        assert!(!final_of(
            r#"{"candidates":[{"content":{"parts":[{"text":"the finishReason is"}]},"finishReason":null}]}"#
        ));
    }

    #[test]
    fn a_gemini_key_in_the_query_is_never_forwarded() {
        let strip = |t: &str| Provider::Gemini.strip_credential_query(t).into_owned();
        assert_eq!(
            strip("/v1beta/models/m:streamGenerateContent?alt=sse&key=AIzaSy-callers-own"),
            "/v1beta/models/m:streamGenerateContent?alt=sse"
        );
        assert_eq!(strip("/v1beta/models?key=AIza"), "/v1beta/models");
        assert_eq!(
            strip("/v1beta/models?key=a&pageSize=5&key=b&keyword=x"),
            "/v1beta/models?pageSize=5&keyword=x"
        );
        assert_eq!(
            strip("/v1beta/models?pageSize=5"),
            "/v1beta/models?pageSize=5"
        );
        // However the name is spelled: a server decodes it before it looks.
        for spelled in ["k%65y", "%6Bey", "%6b%65%79", "KEY", "Key", "k%45y"] {
            assert_eq!(
                strip(&format!("/v1beta/models?pageSize=5&{spelled}=AIza-x")),
                "/v1beta/models?pageSize=5",
                "{spelled}"
            );
        }
        for other in ["keys=1", "k%65y2=1", "ke%79%=1", "%=1", "ke=y", "k+ey=1"] {
            let target = format!("/v1beta/models?{other}");
            assert_eq!(strip(&target), target, "{other}");
        }
        assert_eq!(
            Provider::OpenAi.strip_credential_query("/v1/x?key=1"),
            "/v1/x?key=1"
        );
    }

    const PROVIDERS: [Provider; 4] = [
        Provider::Anthropic,
        Provider::OpenAi,
        Provider::AzureOpenAi,
        Provider::Gemini,
    ];

    fn holds_final(provider: Provider, buf: &[u8]) -> bool {
        crate::sse::events(buf).any(|block| {
            let event = crate::sse::parse_event(&buf[block]);
            event.has_fields && provider.is_final_event(&event)
        })
    }

    #[test]
    fn the_quick_look_finds_each_final_event_and_passes_ordinary_ones() {
        let finals: [(Provider, &[u8]); 11] = [
            // The Responses API's three ends.
            (
                Provider::OpenAi,
                b"event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n",
            ),
            (
                Provider::AzureOpenAi,
                b"event: response.incomplete\ndata: {}\n\n",
            ),
            (Provider::OpenAi, b"event: response.failed\ndata: {}\n\n"),
            (
                Provider::Anthropic,
                b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
            (Provider::Anthropic, b"event:error\r\ndata: {}\r\n\r\n"),
            (Provider::OpenAi, b"data: [DONE]\n\n"),
            (
                Provider::OpenAi,
                b"data: {\"error\":{\"message\":\"x\"}}\n\n",
            ),
            (Provider::AzureOpenAi, b": ping\n\ndata:  [DONE] \n\n"),
            (
                Provider::Gemini,
                b"data: {\"candidates\":[{\"finishReason\":\"STOP\"}]}\n\n",
            ),
            (
                Provider::Gemini,
                b"data: {\"promptFeedback\":{\"blockReason\":\"SAFETY\"}}\n\n",
            ),
            (Provider::Gemini, b"data: [{\"error\":{\"code\":429}}]\n\n"),
        ];
        for (provider, buf) in finals {
            assert!(holds_final(provider, buf), "{provider:?} {buf:?}");
            assert!(provider.may_hold_final_event(buf), "{provider:?} {buf:?}");
        }
        let ordinary: [(Provider, &[u8]); 4] = [
            (
                Provider::OpenAi,
                b"event: response.output_text.delta\ndata: {\"delta\":\"hi\"}\n\n",
            ),
            (
                Provider::Anthropic,
                b"event: content_block_delta\ndata: {\"delta\":{\"text\":\"hi\"}}\n\n",
            ),
            (
                Provider::OpenAi,
                b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            ),
            (
                Provider::Gemini,
                b"data: {\"candidates\":[{\"content\":{}}]}\n\n",
            ),
        ];
        for (provider, buf) in ordinary {
            assert!(!provider.may_hold_final_event(buf), "{provider:?} {buf:?}");
        }
    }

    proptest::proptest! {
        /// Streams of events whose fields are made of the words that matter:
        /// whenever one of the events is final, the quick look says so.
        #[test]
        fn the_quick_look_never_misses_a_final_event(
            events in proptest::collection::vec(
                (
                    proptest::collection::vec(
                        (
                            proptest::sample::select(vec!["event", "data", "id", ""]),
                            proptest::sample::select(vec![":", ": "]),
                            proptest::collection::vec(proptest::sample::select(vec![
                                "message_stop", "error", "[DONE]", "{\"error\"", "[{\"error\"",
                                "{\"candidates\":[{\"finishReason\":\"STOP\"}]}",
                                "{\"promptFeedback\":{\"blockReason\":\"x\"}}",
                                "finishReason", "null", " ", "x", "{",
                                "response.completed", "response.incomplete", "response.failed",
                            ]), 0..3),
                            proptest::sample::select(vec!["\n", "\r\n", "\r"]),
                        ),
                        1..4,
                    ),
                    proptest::sample::select(vec!["\n", "\r\n", "\r"]),
                ),
                0..6,
            ),
        ) {
            let mut buf = String::new();
            for (lines, blank) in &events {
                for (field, sep, words, end) in lines {
                    buf.push_str(field);
                    buf.push_str(sep);
                    buf.push_str(&words.concat());
                    buf.push_str(end);
                }
                buf.push_str(blank);
            }
            for provider in PROVIDERS {
                if holds_final(provider, buf.as_bytes()) {
                    proptest::prop_assert!(provider.may_hold_final_event(buf.as_bytes()));
                }
            }
        }
    }
}
