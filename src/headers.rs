//! Header rules, both ways: which request headers go upstream, whose
//! credential a request carries, which response headers come back.
//!
//! Headers stay bytes (`http::HeaderMap`) from the front end to upstream and
//! back: a value is never decoded and re-encoded on the way.

use bytes::BytesMut;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_LENGTH,
    EXPECT, HOST, TRANSFER_ENCODING, UPGRADE,
};

use crate::error::{Error, Result};

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

/// The headers that carry an API key, for every provider keyfailover speaks:
/// never forwarded from a caller except as that caller's own key (BYOK).
pub const CREDENTIAL_HEADERS: [&str; 4] =
    ["x-api-key", "api-key", "x-goog-api-key", "authorization"];

/// [`CREDENTIAL_HEADERS`] but `Authorization`, as names made once: a lookup
/// by `&str` parses the name every time.
const KEY_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static(CREDENTIAL_HEADERS[0]),
    HeaderName::from_static(CREDENTIAL_HEADERS[1]),
    HeaderName::from_static(CREDENTIAL_HEADERS[2]),
];

/// Request headers the client sets itself (or hyper does).
#[cfg(test)]
const SET_BY_CLIENT: [&str; 3] = ["host", "content-length", "accept-encoding"];

/// Whether `name` (lower-case, as `HeaderName` has it) is a hop-by-hop
/// header. A test checks it against [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &str) -> bool {
    // One match, not a loop over the list: this runs for every header of
    // every request and response.
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "trailers"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Whether a request header named `name` (lower-case) stays behind:
/// hop-by-hop, a credential, or set by the client.
fn not_forwarded(name: &str) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name,
            "x-api-key" | "api-key" | "x-goog-api-key" | "authorization" // CREDENTIAL_HEADERS
                | "host" | "content-length" | "accept-encoding" // SET_BY_CLIENT
        )
}

/// The header names that `Connection` header values nominate as hop-by-hop
/// (RFC 9110, section 7.6.1), lower-case. Options that are dropped anyway
/// (`close`, `keep-alive`, the hop-by-hop names) nominate nothing more.
fn connection_options(headers: &HeaderMap) -> impl Fn(&str) -> bool + '_ {
    let nominated = nominated_options(headers);
    move |name| {
        nominated
            .iter()
            .any(|option| option.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The options of `headers`' `Connection` fields that name a field to
/// drop, beyond those dropped anyway. Most messages have no `Connection`
/// field, or one that nominates nothing: then nothing is allocated.
fn nominated_options(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut nominated = Vec::new();
    // Found by walking the fields: a lookup hashes the name, even to find
    // nothing.
    for (name, value) in headers {
        if *name != CONNECTION {
            continue;
        }
        let value = value.as_bytes();
        // What servers mostly send, whole: nothing to take apart.
        if value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close") {
            continue;
        }
        for option in value.split(|&b| b == b',') {
            let option = option.trim_ascii();
            let dropped_anyway = option.is_empty()
                || option.eq_ignore_ascii_case(b"keep-alive")
                || option.eq_ignore_ascii_case(b"close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| option.eq_ignore_ascii_case(h.as_bytes()));
            if !dropped_anyway {
                nominated.push(option);
            }
        }
    }
    nominated
}

/// Whether `headers` have a field named `name`, found by walking the names:
/// cheaper than a lookup (which hashes the name) for the dozen or so fields
/// a message usually has, and a comparison of two standard names is one of
/// two small numbers.
pub fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|n| n == name)
}

/// A header map from (name, value) byte pairs, as front ends receive them;
/// names are lower-cased, values kept byte for byte.
pub fn header_map<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Result<HeaderMap>
where
    N: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let pairs = pairs.into_iter();
    let mut map = HeaderMap::with_capacity(pairs.size_hint().0);
    for (name, value) in pairs {
        let (name, value) = (name.as_ref(), value.as_ref());
        let header_name = HeaderName::from_bytes(name).map_err(|_| {
            Error::BadRequest(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let header_value = HeaderValue::from_bytes(value).map_err(|_| {
            Error::BadRequest(format!(
                "invalid value for header {:?}",
                header_name.as_str()
            ))
        })?;
        map.append(header_name, header_value);
    }
    Ok(map)
}

/// The headers sent upstream for a caller's headers and a body of
/// `body_len` bytes: hop-by-hop headers, the ones the `Connection` header
/// nominates, the caller's credentials and the ones the client sets itself
/// are dropped; `Accept-Encoding: identity` is added, so error bodies and
/// streams can be read as sent. The caller's `Content-Length` stays when it
/// is the body's length (the client would otherwise write the same anew).
///
/// A new map, in the caller's order: copying the fields that stay costs less
/// than removing the others from the caller's map (each removal moves the
/// last field and looks it up again) and copying that for each attempt.
pub fn forwarded(headers: &HeaderMap, body_len: usize) -> HeaderMap {
    let nominated = connection_options(headers);
    let mut map = HeaderMap::with_capacity(headers.len() + 2);
    let (mut length, mut lengths) = (None, 0);
    for (name, value) in headers {
        if name == CONTENT_LENGTH {
            length = Some(value);
            lengths += 1;
            continue;
        }
        let n = name.as_str();
        let dropped = not_forwarded(n) || nominated(n);
        if !dropped {
            map.append(name.clone(), value.clone());
        }
    }
    if let (Some(length), 1) = (length, lengths) {
        if decimal(length.as_bytes()) == Some(body_len as u64) {
            map.append(CONTENT_LENGTH, length.clone());
        }
    }
    map.append(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    map
}

/// The number `digits` writes (only ASCII digits, at least one; None past
/// `u64`).
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The response headers relayed to the caller: hop-by-hop and nominated
/// headers removed, and `Content-Length` too when keyfailover may rewrite the
/// body (a stream may end with an error event of its own, an error body may
/// have a key scrubbed).
///
/// The fields keep upstream's order. When what goes is the last few fields
/// (often only upstream's `Connection`, which servers send last) and no name
/// has several values, they are removed in place, sparing a new map: removing
/// a map's last field moves no other. Otherwise what stays is copied to a new
/// map (`HeaderMap::remove` of an earlier field moves the last into its place).
///
/// With `detach`, the values are copied into one buffer of their own. The
/// upstream connection parsed them in place, in its read buffer, so values
/// kept for as long as a stream is open would keep that whole buffer (8 KB
/// or more) alive beside the one it must then allocate for the next read.
pub fn relayed(mut headers: HeaderMap, rewritten: bool, detach: bool) -> HeaderMap {
    let mut tail: [Option<HeaderName>; 4] = Default::default();
    {
        let nominated = connection_options(&headers);
        let dropped = |name: &str| {
            is_hop_by_hop(name) || nominated(name) || (rewritten && name == "content-length")
        };
        if detach
            || headers.keys_len() != headers.len()
            || !dropped_tail(headers.keys(), dropped, &mut tail)
        {
            let kept = || headers.iter().filter(|(name, _)| !dropped(name.as_str()));
            let mut map = copied(kept, headers.len(), detach);
            // A Content-Length upstream repeated (with one value: hyper's
            // client refuses others) goes on once, as hyper's server sends it.
            if map.get_all(CONTENT_LENGTH).iter().nth(1).is_some() {
                if let Some(length) = map.get(CONTENT_LENGTH).cloned() {
                    map.insert(CONTENT_LENGTH, length);
                }
            }
            return map;
        }
    }
    // Last first: each is the map's last field when it goes.
    for name in tail.iter().rev().flatten() {
        headers.remove(name);
    }
    headers
}

/// Puts the names that `dropped` takes into `tail`, in order. False unless
/// they are the last of `names` and no more than `tail` holds.
fn dropped_tail<'h>(
    names: impl Iterator<Item = &'h HeaderName>,
    dropped: impl Fn(&str) -> bool,
    tail: &mut [Option<HeaderName>],
) -> bool {
    let mut found = 0;
    for name in names {
        if dropped(name.as_str()) {
            let Some(slot) = tail.get_mut(found) else {
                return false;
            };
            *slot = Some(name.clone());
            found += 1;
        } else if found > 0 {
            return false;
        }
    }
    true
}

/// The fields `kept` gives in a new map; with `detach`, their values in one
/// buffer of their own.
fn copied<'h, I>(kept: impl Fn() -> I, capacity: usize, detach: bool) -> HeaderMap
where
    I: Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
{
    let mut map = HeaderMap::with_capacity(capacity);
    if !detach {
        for (name, value) in kept() {
            map.append(name.clone(), value.clone());
        }
        return map;
    }
    let mut values = BytesMut::with_capacity(kept().map(|(_, v)| v.len()).sum());
    for (_, value) in kept() {
        values.extend_from_slice(value.as_bytes());
    }
    let mut values = values.freeze();
    for (name, value) in kept() {
        let own = values.split_to(value.len());
        // The same bytes as a valid value: cannot fail.
        let own = HeaderValue::from_maybe_shared(own).unwrap_or_else(|_| value.clone());
        map.append(name.clone(), own);
    }
    map
}

/// Whether upstream's `Content-Length` still gives the length of the body
/// relayed: not when `Transfer-Encoding` framed the body (RFC 9112, section
/// 6.3: it overrides the length, which a proxy must then remove), nor for a
/// status that has no body (RFC 9110, section 8.6).
pub fn length_holds(status: u16, headers: &HeaderMap) -> bool {
    status != 204 && !(100..200).contains(&status) && !has(headers, &TRANSFER_ENCODING)
}

/// True when the response is a server-sent event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    // The first value, found by walking the names (see `has`).
    headers
        .iter()
        .find(|(name, _)| *name == http::header::CONTENT_TYPE)
        .map(|(_, v)| v.as_bytes().trim_ascii_start())
        .is_some_and(|v| v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream"))
}

/// The protocol a request asks to switch to with `Upgrade`, other than
/// `h2c` (which a server may ignore); such requests cannot be proxied.
pub fn upgrade_requested(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|p| String::from_utf8_lossy(p.trim_ascii()).into_owned())
        .find(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
}

/// The first transfer coding of a request other than `chunked`, which is
/// all keyfailover can forward: the server takes the chunks apart, and a
/// body still in another coding (`gzip, chunked`) would go upstream with
/// nothing to say it is coded.
pub fn unsupported_transfer_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"))
        .map(|coding| String::from_utf8_lossy(coding).into_owned())
}

/// A caller's own credential, found among its request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerCredential {
    /// The header it came in (one of [`CREDENTIAL_HEADERS`]).
    pub header: HeaderName,
    /// The header's value as sent.
    pub value: HeaderValue,
}

impl CallerCredential {
    /// The key or token itself, without the `Bearer` scheme.
    pub fn token(&self) -> &[u8] {
        let value = self.value.as_bytes();
        match self.header.as_str() {
            "authorization" => value[7..].trim_ascii(),
            _ => value.trim_ascii(),
        }
    }
}

/// The caller's credential among request headers: the first non-blank
/// `x-api-key`, `api-key` or `x-goog-api-key` (in that order), else an
/// `Authorization: Bearer` token. The one rule for it: the proxy checks it
/// against its client tokens, and sends it once as the caller's own key when
/// BYOK is allowed.
pub fn caller_credential(headers: &HeaderMap) -> Option<CallerCredential> {
    for name in KEY_HEADERS {
        if let Some(value) = headers
            .get_all(&name)
            .iter()
            .find(|v| !v.as_bytes().trim_ascii().is_empty())
        {
            return Some(CallerCredential {
                header: name,
                value: value.clone(),
            });
        }
    }
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .find(|v| is_bearer(v.as_bytes()))
        .map(|value| CallerCredential {
            header: AUTHORIZATION,
            value: value.clone(),
        })
}

/// What the gateway's rules read in a request's head, gathered in one walk
/// over its fields: looking each up by name would hash a dozen names a
/// request, mostly for fields it does not have.
#[derive(Debug, Default)]
pub struct RequestHead {
    /// How many `Host` fields there are.
    pub hosts: usize,
    /// Whether the first `Expect` field is `100-continue`.
    pub expects_continue: bool,
    /// The caller's credential, as [`caller_credential`] finds it.
    pub credential: Option<CallerCredential>,
    /// The first `Content-Length` field's value as a number (surrounding
    /// blanks allowed); None when there is none or it is not one.
    pub content_length: Option<u64>,
    /// Whether an `Upgrade` field is present (see [`upgrade_requested`]).
    pub upgrade: bool,
    /// Whether a `Transfer-Encoding` field is present (see
    /// [`unsupported_transfer_coding`]).
    pub transfer_encoding: bool,
}

impl RequestHead {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut head = Self::default();
        let (mut expect_seen, mut length_seen) = (false, false);
        // The credential's rank in `caller_credential`'s order of preference.
        let mut rank = usize::MAX;
        // Names compared as names, not strings: two standard names compare
        // as two small numbers.
        for (name, value) in headers {
            let found = if name == HOST {
                head.hosts += 1;
                continue;
            } else if name == CONTENT_LENGTH {
                if !length_seen {
                    length_seen = true;
                    head.content_length = decimal(value.as_bytes().trim_ascii());
                }
                continue;
            } else if name == EXPECT {
                if !expect_seen {
                    expect_seen = true;
                    head.expects_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
                }
                continue;
            } else if name == UPGRADE {
                head.upgrade = true;
                continue;
            } else if name == TRANSFER_ENCODING {
                head.transfer_encoding = true;
                continue;
            } else if name == AUTHORIZATION {
                3
            } else if let Some(rank) = KEY_HEADERS.iter().position(|key| name == key) {
                rank
            } else {
                continue;
            };
            let usable = if found == 3 {
                is_bearer(value.as_bytes())
            } else {
                !value.as_bytes().trim_ascii().is_empty()
            };
            // The first usable value of the most preferred name: a name's
            // values come one after another, in order.
            if usable && found < rank {
                rank = found;
                head.credential = Some(CallerCredential {
                    header: name.clone(),
                    value: value.clone(),
                });
            }
        }
        head
    }
}

fn is_bearer(value: &[u8]) -> bool {
    value.len() > 7
        && value[..7].eq_ignore_ascii_case(b"bearer ")
        && !value[7..].trim_ascii().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn map(pairs: &[(&str, &[u8])]) -> HeaderMap {
        header_map(pairs.iter().map(|(n, v)| (n.as_bytes(), *v))).unwrap()
    }

    fn found(pairs: &[(&str, &str)]) -> Option<(String, String)> {
        let headers = map(&pairs
            .iter()
            .map(|(n, v)| (*n, v.as_bytes()))
            .collect::<Vec<_>>());
        caller_credential(&headers).map(|c| {
            (
                c.header.as_str().to_owned(),
                String::from_utf8(c.token().to_vec()).unwrap(),
            )
        })
    }

    #[test]
    fn caller_credential_rule() {
        assert_eq!(found(&[]), None);
        assert_eq!(
            found(&[("x-api-key", " sk-1 ")]),
            Some(("x-api-key".into(), "sk-1".into()))
        );
        assert_eq!(
            found(&[("Authorization", "bearer tok ")]),
            Some(("authorization".into(), "tok".into()))
        );
        assert_eq!(
            found(&[("authorization", "Bearer tok"), ("X-Api-Key", "sk-1")]),
            Some(("x-api-key".into(), "sk-1".into())),
            "x-api-key takes priority"
        );
        assert_eq!(
            found(&[("x-goog-api-key", "g"), ("api-key", "az")]),
            Some(("api-key".into(), "az".into()))
        );
        assert_eq!(
            found(&[("authorization", "Basic dXNlcg=="), ("x-api-key", "  ")]),
            None
        );
        assert_eq!(found(&[("authorization", "Bearer  ")]), None);
    }

    #[test]
    fn a_request_head_reads_what_the_lookups_would() {
        let tables: [&[(&str, &[u8])]; 9] = [
            &[],
            &[("x-api-key", b" sk-1 "), ("host", b"a")],
            &[("authorization", b"Bearer tok"), ("X-Api-Key", b"sk-1")],
            &[("x-goog-api-key", b"g"), ("api-key", b"az")],
            &[("authorization", b"Basic dXNlcg=="), ("x-api-key", b"  ")],
            &[
                ("x-api-key", b" "),
                ("x-api-key", b"second"),
                ("api-key", b"az"),
            ],
            &[
                ("authorization", b"Bearer  "),
                ("authorization", b"bearer t2"),
            ],
            &[
                ("api-key", b"az"),
                ("x-goog-api-key", b"g"),
                ("x-api-key", b"k"),
            ],
            &[("authorization", b"Bearer a"), ("x-goog-api-key", b"g")],
        ];
        for pairs in tables {
            let headers = map(pairs);
            assert_eq!(
                RequestHead::of(&headers).credential,
                caller_credential(&headers),
                "{pairs:?}"
            );
        }
        let head = RequestHead::of(&map(&[
            ("Host", b"a"),
            ("host", b"b"),
            ("expect", b"100-Continue"),
            ("expect", b"other"),
            ("content-length", b" 12 "),
            ("content-length", b"13"),
            ("upgrade", b"h2c"),
        ]));
        assert_eq!(head.hosts, 2);
        assert!(head.expects_continue, "the first Expect field counts");
        assert_eq!(head.content_length, Some(12), "the first length, trimmed");
        assert!(head.upgrade && !head.transfer_encoding);
        let head = RequestHead::of(&map(&[
            ("expect", b"other"),
            ("expect", b"100-continue"),
            ("content-length", b"1x"),
            ("transfer-encoding", b"chunked"),
        ]));
        assert_eq!(head.hosts, 0);
        assert!(!head.expects_continue);
        assert_eq!(head.content_length, None, "not a number");
        assert!(!head.upgrade && head.transfer_encoding);
        let huge = map(&[("content-length", b"99999999999999999999999")]);
        assert_eq!(RequestHead::of(&huge).content_length, None);
        assert!(has(&huge, &CONTENT_LENGTH) && !has(&huge, &CONNECTION));
    }

    #[test]
    fn the_names_not_forwarded_are_the_lists() {
        let listed: Vec<&str> = HOP_BY_HOP
            .iter()
            .chain(&CREDENTIAL_HEADERS)
            .chain(&SET_BY_CLIENT)
            .copied()
            .collect();
        for name in &listed {
            assert!(not_forwarded(name), "{name}");
        }
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in CREDENTIAL_HEADERS.iter().chain(&SET_BY_CLIENT) {
            assert!(!is_hop_by_hop(name), "{name}");
        }
        for name in [
            "x-foo",
            "content-type",
            "anthropic-version",
            "x-api-keys",
            "t",
            "",
        ] {
            assert!(!not_forwarded(name), "{name}");
        }
        // Connection options nominate names; tokens dropped anyway do not.
        let nominated = |value: &[u8], name: &str| {
            let headers = map(&[("connection", value)]);
            let nominated = connection_options(&headers)(name);
            nominated
        };
        assert!(nominated(b"keep-alive, X-Trace", "x-trace"));
        assert!(nominated(b" close ,x-a,,x-b", "x-b"));
        assert!(!nominated(b"keep-alive, close", "keep-alive"));
        assert!(!nominated(b"keep-alive", "x-trace"));
        assert!(!nominated(b"", "x-trace"));
    }

    #[test]
    fn forwarding_drops_connection_headers_and_credentials_and_keeps_bytes() {
        let headers = map(&[
            ("Connection", b"keep-alive, X-Trace"),
            ("x-trace", b"1"),
            ("x-api-key", b"sk-caller"),
            ("authorization", b"Bearer tok"),
            ("x-goog-api-key", b"g"),
            ("host", b"proxy"),
            ("content-length", b"2"),
            ("accept-encoding", b"gzip"),
            ("te", b"trailers"),
            ("x-foo", b"caf\xe9"),
            ("x-multi", b"first"),
            ("anthropic-version", b"2023-06-01"),
            ("x-multi", b"second"),
        ]);
        // The fields that stay, sorted by name (their order carries no
        // meaning); the values of one name in their order.
        let fields = |out: HeaderMap| {
            let mut fields: Vec<(String, Vec<u8>)> = out
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect();
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            fields
        };
        let field = |n: &str, v: &[u8]| (n.to_owned(), v.to_vec());
        assert_eq!(
            fields(forwarded(&headers, 3)),
            [
                field("accept-encoding", b"identity"),
                field("anthropic-version", b"2023-06-01"),
                field("x-foo", b"caf\xe9"),
                field("x-multi", b"first"),
                field("x-multi", b"second"),
            ],
            "bytes unchanged; the caller's Accept-Encoding replaced"
        );
        // The caller's length goes when it is the body's (the client sets it
        // otherwise), and only then.
        let out = forwarded(&headers, 2);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "x-foo",
                "x-multi",
                "anthropic-version",
                "content-length",
                "accept-encoding"
            ],
            "in the caller's order"
        );
        assert_eq!(out["content-length"], "2");
        assert_eq!(out.len(), 6);
        for length in [
            &b"+2"[..],
            b"2 ",
            b"",
            b"0x2",
            b"-2",
            b"99999999999999999999999",
        ] {
            let one = map(&[("content-length", length)]);
            assert!(
                !forwarded(&one, 2).contains_key("content-length"),
                "{length:?}"
            );
        }
        let two = map(&[("content-length", b"2"), ("content-length", b"2")]);
        assert!(!forwarded(&two, 2).contains_key("content-length"));
        assert_eq!(
            forwarded(&map(&[("content-length", b"02")]), 2)["content-length"],
            "02"
        );
        // Nothing to drop: the map as it came, with Accept-Encoding set.
        let plain = map(&[("content-type", b"application/json")]);
        assert_eq!(
            fields(forwarded(&plain, 0)),
            [
                field("accept-encoding", b"identity"),
                field("content-type", b"application/json"),
            ]
        );
    }

    #[test]
    fn a_length_holds_only_for_a_body_it_framed() {
        let length = map(&[("content-length", b"3")]);
        let both = map(&[("content-length", b"3"), ("transfer-encoding", b"chunked")]);
        assert!(length_holds(200, &length));
        assert!(length_holds(304, &length));
        assert!(!length_holds(200, &both), "chunked framing overrides it");
        assert!(!length_holds(204, &length), "204 has no body");
        assert!(!length_holds(103, &length));
    }

    #[test]
    fn relayed_headers() {
        let headers = map(&[
            ("connection", b"close, x-hop"),
            ("x-hop", b"1"),
            ("transfer-encoding", b"chunked"),
            ("content-length", b"10"),
            ("content-type", b"text/event-stream; charset=utf-8"),
        ]);
        assert!(is_event_stream(&headers));
        let names = |m: HeaderMap| m.keys().map(|n| n.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(
            names(relayed(headers.clone(), true, false)),
            ["content-type"]
        );
        assert_eq!(
            names(relayed(headers.clone(), false, false)),
            ["content-length", "content-type"]
        );
        // What stays keeps its values, in order for one name.
        let mut multi = headers.clone();
        multi.append("x-multi", HeaderValue::from_static("a"));
        multi.append("x-multi", HeaderValue::from_static("b"));
        let kept = relayed(multi, false, false);
        let values: Vec<_> = kept.get_all("x-multi").iter().collect();
        assert_eq!(values, ["a", "b"]);
        assert_eq!(kept.get("content-length").unwrap(), "10");
        // A Content-Length repeated goes on once, streams (detached) too.
        for detach in [false, true] {
            let mut twice = headers.clone();
            twice.append("content-length", HeaderValue::from_static("10"));
            let once = relayed(twice, false, detach);
            let lengths: Vec<_> = once.get_all("content-length").iter().collect();
            assert_eq!(lengths, ["10"], "detach {detach}");
        }
        // Each Connection field counts, the second as much as the first.
        let mut two = map(&[
            ("connection", b"keep-alive"),
            ("x-one", b"1"),
            ("x-two", b"2"),
            ("content-type", b"application/json"),
        ]);
        two.append("connection", HeaderValue::from_static("x-two"));
        assert_eq!(
            names(relayed(two.clone(), false, false)),
            ["x-one", "content-type"]
        );
        assert!(forwarded(&two, 0).get("x-two").is_none());
        assert!(forwarded(&two, 0).get("x-one").is_some());
    }

    #[test]
    fn relayed_fields_keep_their_order_wherever_the_dropped_ones_are() {
        // Every order of these fields (two to drop, one more when the body
        // is rewritten), in place or copied: what stays, in upstream's order.
        let fields: [(&str, &[u8]); 6] = [
            ("server", b"nginx"),
            ("connection", b"keep-alive, x-hop"),
            ("content-length", b"2"),
            ("x-hop", b"1"),
            ("content-type", b"application/json"),
            ("date", b"Fri, 04 Dec 2026 16:00:00 GMT"),
        ];
        let mut order: Vec<usize> = (0..fields.len()).collect();
        let mut seen = 0;
        permutations(&mut order, 0, &mut |order| {
            seen += 1;
            let upstream = map(&order.iter().map(|&i| fields[i]).collect::<Vec<_>>());
            for rewritten in [false, true] {
                let expected: Vec<(&str, &[u8])> = order
                    .iter()
                    .map(|&i| fields[i])
                    .filter(|(n, _)| {
                        let hop = matches!(*n, "connection" | "x-hop");
                        !(hop || rewritten && *n == "content-length")
                    })
                    .collect();
                for detach in [false, true] {
                    let relayed = relayed(upstream.clone(), rewritten, detach);
                    let got: Vec<(&str, &[u8])> = relayed
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_bytes()))
                        .collect();
                    assert_eq!(got, expected, "{order:?} rewritten={rewritten}");
                }
            }
        });
        assert_eq!(seen, 720);
        // More dropped fields at the end than are removed in place: copied.
        let many = map(&[
            ("content-type", b"text/plain"),
            ("connection", b"a, b, c, d"),
            ("a", b"1"),
            ("b", b"1"),
            ("c", b"1"),
            ("d", b"1"),
        ]);
        assert_eq!(
            relayed(many, false, false).keys().collect::<Vec<_>>(),
            ["content-type"]
        );
    }

    fn permutations(items: &mut [usize], at: usize, each: &mut impl FnMut(&[usize])) {
        if at == items.len() {
            return each(items);
        }
        for i in at..items.len() {
            items.swap(at, i);
            permutations(items, at + 1, each);
            items.swap(at, i);
        }
    }

    #[test]
    fn detached_values_are_equal_and_hold_nothing_of_the_read_buffer() {
        // As hyper parses a response head: every value a slice of one buffer.
        let read = Bytes::from(b"text/event-streamabccloseid-\xe912".to_vec());
        let slice = |r: std::ops::Range<usize>| {
            HeaderValue::from_maybe_shared(read.slice(r)).expect("a valid value")
        };
        let mut upstream = HeaderMap::new();
        upstream.append("content-type", slice(0..17));
        upstream.append("x-multi", slice(17..20));
        upstream.append("connection", slice(20..25));
        upstream.append("x-multi", slice(25..29));
        upstream.append("content-length", slice(29..31));
        let shared = relayed(upstream.clone(), true, false);
        let detached = relayed(upstream.clone(), true, true);
        assert_eq!(detached, shared);
        let values: Vec<(&str, &[u8])> = detached
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            values,
            [
                ("content-type", &b"text/event-stream"[..]),
                ("x-multi", b"abc"),
                ("x-multi", b"id-\xe9"),
            ]
        );
        drop((upstream, shared));
        assert!(read.is_unique(), "the detached values hold none of it");
    }

    #[test]
    fn upgrades() {
        assert_eq!(upgrade_requested(&map(&[("upgrade", b"h2c")])), None);
        assert_eq!(
            upgrade_requested(&map(&[("upgrade", b"websocket")])).as_deref(),
            Some("websocket")
        );
        assert_eq!(upgrade_requested(&map(&[])), None);
    }

    #[test]
    fn only_chunked_is_a_supported_transfer_coding() {
        let coding = |pairs: &[(&str, &[u8])]| unsupported_transfer_coding(&map(pairs));
        assert_eq!(coding(&[]), None);
        assert_eq!(coding(&[("transfer-encoding", b"chunked")]), None);
        assert_eq!(coding(&[("transfer-encoding", b" CHUNKED ,")]), None);
        assert_eq!(
            coding(&[("transfer-encoding", b"gzip, chunked")]).as_deref(),
            Some("gzip")
        );
        assert_eq!(
            coding(&[
                ("transfer-encoding", b"chunked"),
                ("transfer-encoding", b"x-custom")
            ])
            .as_deref(),
            Some("x-custom")
        );
    }

    #[test]
    fn bad_header_bytes_are_bad_requests() {
        let bad_name = header_map([(&b"x y"[..], &b"1"[..])]).unwrap_err();
        assert!(matches!(bad_name, Error::BadRequest(m) if m.contains("header name")));
        let bad_value = header_map([(&b"x"[..], &b"a\nb"[..])]).unwrap_err();
        assert!(matches!(bad_value, Error::BadRequest(m) if m.contains("\"x\"")));
    }
}
