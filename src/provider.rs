//! What differs between providers: where the key goes, and the shape of the
//! errors keyfailover creates itself (JSON bodies and SSE error events).

use std::fmt;
use std::str::FromStr;

use serde_json::json;

use crate::error::{Error, ErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Keys in `x-api-key`; errors `{"type":"error","error":{"type","message"}}`.
    Anthropic,
    /// Keys in `Authorization: Bearer`; errors `{"error":{"message","type","param","code"}}`.
    OpenAi,
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "anthropic" => Ok(Provider::Anthropic),
            "openai" => Ok(Provider::OpenAi),
            other => Err(Error::Config(format!(
                "unknown provider {other:?}: expected \"anthropic\" or \"openai\""
            ))),
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }

    /// The header that carries a key, and its value.
    pub fn auth_header(self, key: &str) -> (&'static str, String) {
        match self {
            Provider::Anthropic => ("x-api-key", key.to_owned()),
            Provider::OpenAi => ("authorization", format!("Bearer {key}")),
        }
    }

    fn error_value(self, kind: ErrorKind, message: &str) -> serde_json::Value {
        match self {
            Provider::Anthropic => json!({
                "type": "error",
                "error": {"type": kind.type_name(), "message": message},
            }),
            Provider::OpenAi => json!({
                "error": {
                    "message": message,
                    "type": kind.type_name(),
                    "param": null,
                    "code": kind.code(),
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
    /// error object).
    pub fn is_final_event(self, event: &crate::sse::Event) -> bool {
        match self {
            Provider::Anthropic => {
                matches!(event.name.as_deref(), Some("message_stop") | Some("error"))
            }
            Provider::OpenAi => {
                let data = event.data.trim_ascii();
                data == b"[DONE]" || data.starts_with(b"{\"error\"")
            }
        }
    }

    /// One SSE error event in the provider's shape.
    pub fn sse_error_event(self, kind: ErrorKind, message: &str) -> Vec<u8> {
        let data = self.error_value(kind, message);
        match self {
            Provider::Anthropic => format!("event: error\ndata: {data}\n\n"),
            Provider::OpenAi => format!("data: {data}\n\n"),
        }
        .into_bytes()
    }
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
        assert!("azure".parse::<Provider>().is_err());
        assert_eq!(
            Provider::OpenAi.auth_header("k"),
            ("authorization", "Bearer k".into())
        );
    }
}
