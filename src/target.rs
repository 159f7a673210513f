//! Where a request goes: the upstream base URL, and a caller's request
//! target (path and query) joined to it without ever leaving it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use url::Url;

use crate::error::{Error, Result};

/// An upstream base URL: http or https, no credentials, query or fragment.
#[derive(Clone)]
pub struct BaseUrl {
    /// Without a trailing slash.
    url: String,
    /// The ends of the URL's path (`/v1`, `/openai/v1`), longest first, each
    /// with the URL without it. A request path that starts with one (as the
    /// SDKs' `/v1/...` do) is joined to the URL without it, so
    /// `https://api.openai.com/v1` and `https://api.openai.com` both work,
    /// and a path is never doubled (`/openai/openai/...`).
    overlaps: Vec<(String, String)>,
    /// The parsed URLs of the paths seen first, without queries (an API has
    /// few paths): parsing a URL on every request costs a proxy a few percent.
    /// A fast hash: at most PARSED_TARGETS entries, so no key can flood it.
    parsed: Arc<ArcSwap<Parsed>>,
}

/// Each path's URL, and the same as the `http::Uri` a request is sent to
/// (None if `http` refuses it: such a request is refused when it is made).
type Parsed = HashMap<Box<str>, (Url, Option<http::Uri>), foldhash::fast::RandomState>;

impl std::fmt::Debug for BaseUrl {
    /// The URL only: not the targets of the requests sent to it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BaseUrl").field(&self.url).finish()
    }
}

impl PartialEq for BaseUrl {
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
    }
}

impl Eq for BaseUrl {}

/// How many paths a [`BaseUrl`] keeps parsed, and how long one may be.
const PARSED_TARGETS: usize = 64;
const PARSED_TARGET_LEN: usize = 256;

impl BaseUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        // Credentials masked, and any long run of key characters: a key given
        // in the wrong place (as the host, a path, a fragment).
        let shown = masked_url(raw);
        // Refused rather than dropped, as the URL parser would (it trims
        // spaces and controls at the ends and drops tabs and newlines
        // inside): a URL read with its newline is a mistake to point out.
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::Config(format!(
                "base_url {shown:?} holds whitespace or a control character (a newline read \
                 with it?)"
            )));
        }
        let url = url::Url::parse(raw)
            .map_err(|e| Error::Config(format!("base_url {shown:?} is not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Refused rather than masked: the pool's keys are the credentials
            // keyfailover sends, and a URL's userinfo would leak into every
            // place a URL is printed.
            return Err(Error::Config(format!(
                "base_url {shown:?} must not contain credentials (user:password@): \
                 keyfailover sends the pool's keys"
            )));
        }
        if !matches!(url.scheme(), "http" | "https")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(Error::Config(format!(
                "base_url {shown:?} must be an http or https URL without query or fragment"
            )));
        }
        let url = raw.trim_end_matches('/').to_owned();
        // The path as written (the parser would have resolved dot segments
        // and percent-encoded what a request path is compared as sent).
        let after_scheme = &url[url.find("://").map_or(0, |at| at + 3)..];
        let path = after_scheme.find('/').map_or("", |at| &after_scheme[at..]);
        let overlaps = path
            .match_indices('/')
            .map(|(at, _)| {
                (
                    path[at..].to_owned(),
                    url[..url.len() - (path.len() - at)].to_owned(),
                )
            })
            .collect();
        Ok(Self {
            url,
            overlaps,
            parsed: Arc::default(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The upstream URL for a request target (`/path?query`): dot segments
    /// resolved, and refused when they would climb out of the base URL.
    pub fn join(&self, target: &str) -> Result<String> {
        let target = normalize_target(target)?;
        let path = target.split('?').next().unwrap_or("");
        let base = self
            .overlaps
            .iter()
            .find(|(end, _)| {
                path.strip_prefix(end.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map_or(&self.url, |(_, without)| without);
        Ok(format!("{base}{target}"))
    }

    /// [`BaseUrl::join`], parsed.
    pub fn url(&self, target: &str) -> Result<Url> {
        // Paths are kept parsed, not queries: a query (a caller's parameters,
        // Azure's `api-version`) is set on a copy, and is neither remembered
        // nor able to crowd an API's paths out of the cache.
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let cached = self.parsed.load().get(path).map(|(url, _)| url.clone());
        let mut url = match cached {
            Some(url) => {
                check_bytes(target)?;
                url
            }
            None => {
                let joined = self.join(target)?;
                let url = Url::parse(&joined).map_err(|e| {
                    Error::BadRequest(format!("path {:?} is not a valid URL: {e}", shown(target)))
                })?;
                if path.len() <= PARSED_TARGET_LEN && self.parsed.load().len() < PARSED_TARGETS {
                    let mut bare = url.clone();
                    bare.set_query(None);
                    let uri = http::Uri::try_from(bare.as_str()).ok();
                    self.parsed.rcu(|parsed| {
                        let mut parsed = Parsed::clone(parsed);
                        if parsed.len() < PARSED_TARGETS {
                            parsed.insert(path.into(), (bare.clone(), uri.clone()));
                        }
                        parsed
                    });
                }
                return Ok(url);
            }
        };
        if query.is_some() {
            url.set_query(query);
        }
        Ok(url)
    }

    /// [`BaseUrl::url`] as the `http::Uri` a request is sent to. A path
    /// without a query seen before costs no parsing and no allocation: its
    /// `Uri` is kept with its URL and shares their bytes.
    pub fn uri(&self, target: &str) -> Result<http::Uri> {
        // A byte loop: `str::contains` costs more on a target this short.
        if !target.bytes().any(|b| b == b'?') {
            // A path kept was checked (normalized) when it was first seen.
            if let Some((_, Some(uri))) = self.parsed.load().get(target) {
                return Ok(uri.clone());
            }
        }
        let url = self.url(target)?;
        http::Uri::try_from(url.as_str()).map_err(|e| {
            Error::BadRequest(format!("path {:?} is not a valid URL: {e}", shown(target)))
        })
    }
}

/// `raw` with any userinfo, and the values of query parameters that look
/// secret (`pass=`, `password=`, `token=`, `key=`, ...: redis-rs reads a unix
/// socket's password from `?pass=`), replaced by `***`, for messages. The
/// userinfo ends at the last `@`: a password may hold an unencoded `/`, `?`
/// or `#`, so the authority's end cannot be trusted to come after it (a path
/// with an `@` is masked too much, never too little).
pub(crate) fn masked_url(raw: &str) -> Cow<'_, str> {
    match masked_credentials(raw) {
        Cow::Borrowed(raw) => masked_words(raw),
        Cow::Owned(masked) => Cow::Owned(masked_words(&masked).into_owned()),
    }
}

/// `text` with every run of key characters (letters, digits, `-`, `_`)
/// longer than names and host labels are (26) masked as a key's hint is:
/// a key given in the wrong place (as a host, a path, a fragment), which a
/// message quoting `text` would show.
pub(crate) fn masked_words(text: &str) -> Cow<'_, str> {
    let key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::new();
    let mut last = 0;
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        match (key_char(c) && i < text.len(), start) {
            (true, None) => start = Some(i),
            (false, Some(from)) => {
                if i - from > 26 {
                    out.push_str(&text[last..from]);
                    out.push_str(&crate::pool::mask(&text[from..i]));
                    last = i;
                }
                start = None;
            }
            _ => {}
        }
    }
    if last == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

/// `raw` with its userinfo and secret-named query values masked.
fn masked_credentials(raw: &str) -> Cow<'_, str> {
    let Some(scheme_end) = raw.find("://") else {
        return Cow::Borrowed(raw);
    };
    let head = &raw[..scheme_end + 3];
    let mut rest = Cow::Borrowed(&raw[scheme_end + 3..]);
    if let Some(at) = rest.rfind('@') {
        rest = Cow::Owned(format!("***@{}", &rest[at + 1..]));
    }
    if let Some(query_start) = rest.find('?') {
        let (before, query) = rest.split_at(query_start + 1);
        let (query, fragment) = query.split_at(query.find('#').unwrap_or(query.len()));
        let masked: Vec<Cow<'_, str>> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !value.is_empty() && looks_secret(name) => {
                    Cow::Owned(format!("{name}=***"))
                }
                _ => Cow::Borrowed(pair),
            })
            .collect();
        if masked.iter().any(|p| matches!(p, Cow::Owned(_))) {
            rest = Cow::Owned(format!("{before}{}{fragment}", masked.join("&")));
        }
    }
    match rest {
        Cow::Borrowed(_) => Cow::Borrowed(raw),
        Cow::Owned(rest) => Cow::Owned(format!("{head}{rest}")),
    }
}

/// A query parameter name that may carry a credential.
fn looks_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "pwd", "token", "key", "secret", "auth", "sig"]
        .iter()
        .any(|word| name.contains(word))
}

/// A request target with its dot segments (`.`, `..`, also percent-encoded)
/// resolved. Errors for a target that does not start with `/`, holds bytes a
/// request line cannot carry (controls, spaces, backslashes, non-ASCII), or
/// whose `..` segments would climb above its root.
pub fn normalize_target(target: &str) -> Result<Cow<'_, str>> {
    if !target.starts_with('/') {
        return Err(Error::BadRequest(format!(
            "path {:?} must start with '/'",
            shown(target)
        )));
    }
    // One pass over the bytes (targets are short), a table lookup each: any
    // a request line cannot carry, where the query starts, and whether the
    // path holds a dot or a percent sign, without which it has no dot
    // segment.
    let mut query_at = None;
    let mut dotted = false;
    for (i, &b) in target.as_bytes().iter().enumerate() {
        match TARGET_BYTES[usize::from(b)] {
            0 => {}
            BAD => return Err(bad_byte(target, b)),
            QUERY if query_at.is_none() => query_at = Some(i),
            DOT if query_at.is_none() => dotted = true,
            _ => {}
        }
    }
    let (path, query) = target.split_at(query_at.unwrap_or(target.len()));
    if !dotted || !path[1..].split('/').any(|s| dot_segment(s).is_some()) {
        return Ok(Cow::Borrowed(target));
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match dot_segment(segment) {
            Some(DotSegment::Current) => {}
            Some(DotSegment::Parent) => {
                if out.pop().is_none() {
                    return Err(Error::BadRequest(format!(
                        "path {:?} leaves the upstream base URL",
                        shown(target)
                    )));
                }
            }
            None => out.push(segment),
        }
        // "/a/." and "/a/b/.." keep their trailing slash.
        if i == last && dot_segment(segment).is_some() {
            out.push("");
        }
    }
    Ok(Cow::Owned(format!("/{}{query}", out.join("/"))))
}

enum DotSegment {
    Current,
    Parent,
}

/// Errors for a target holding bytes a request line cannot carry (controls,
/// spaces, backslashes, non-ASCII) or a fragment.
fn check_bytes(target: &str) -> Result<()> {
    match target
        .bytes()
        .find(|&b| !b.is_ascii_graphic() || b == b'\\' || b == b'#')
    {
        Some(bad) => Err(bad_byte(target, bad)),
        None => Ok(()),
    }
}

/// The path of a request target: up to its query.
pub fn path_of(target: &str) -> &str {
    // A byte loop: `split('?')` costs more on a target this short.
    match target.bytes().position(|b| b == b'?') {
        Some(at) => &target[..at],
        None => target,
    }
}

const BAD: u8 = 1;
const QUERY: u8 = 2;
const DOT: u8 = 3;

/// What each byte is to [`normalize_target`]: one a request target cannot
/// carry (`BAD`, as [`check_bytes`] has it), `?`, `.` or `%`, or 0.
static TARGET_BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = if !b.is_ascii_graphic() || b == b'\\' || b == b'#' {
            BAD
        } else if b == b'?' {
            QUERY
        } else if b == b'.' || b == b'%' {
            DOT
        } else {
            0
        };
        i += 1;
    }
    table
};

fn bad_byte(target: &str, bad: u8) -> Error {
    // The character the byte starts (a non-ASCII one is several bytes).
    let at = target.bytes().position(|b| b == bad).unwrap_or(0);
    let character = target
        .get(at..)
        .and_then(|rest| rest.chars().next())
        .unwrap_or(char::from(bad));
    Error::BadRequest(format!(
        "path {:?} holds a character a request target cannot carry ({character:?})",
        shown(target),
    ))
}

/// `.` or `..`, either dot also percent-encoded (`%2e`, `%2E`).
fn dot_segment(segment: &str) -> Option<DotSegment> {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return None,
        };
        dots += 1;
    }
    match dots {
        1 => Some(DotSegment::Current),
        2 => Some(DotSegment::Parent),
        _ => None,
    }
}

fn truncated(text: &str) -> &str {
    match text.char_indices().nth(200) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// A request target as error messages show it: the value of any `key`
/// query parameter (Gemini's way of passing an API key in the URL) masked,
/// and at most 200 characters.
fn shown(target: &str) -> String {
    let masked = match target.split_once('?') {
        Some((path, query)) if query.split('&').any(|p| is_param(p, "key")) => {
            let query: Vec<String> = query
                .split('&')
                .map(|p| {
                    if is_param(p, "key") {
                        "key=***".to_owned()
                    } else {
                        p.to_owned()
                    }
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        _ => target.to_owned(),
    };
    truncated(&masked).to_owned()
}

/// Whether a query string pair (`name=value`) is the parameter `name`.
/// Whether a query's `pair` is parameter `name` (lowercase ASCII), as a
/// server reading the query would take it: the name percent-decoded (`k%65y`
/// is `key`), `+` a space, and in any case, so that no spelling of it slips
/// through.
fn is_param(pair: &str, name: &str) -> bool {
    let sent = pair.split('=').next().unwrap_or_default().as_bytes();
    if !sent.contains(&b'%') && !sent.contains(&b'+') {
        return sent.eq_ignore_ascii_case(name.as_bytes());
    }
    percent_decoded(sent, true).eq_ignore_ascii_case(name.as_bytes())
}

/// `bytes` with their `%XX` escapes decoded (a `%` without two hex digits
/// after it stays as it is), and, with `plus_is_space`, `+` a space (as in a
/// query).
pub(crate) fn percent_decoded(bytes: &[u8], plus_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', ..) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// `target` without every `name` query parameter (a `?` left with nothing
/// after it is dropped too), however its name is spelled (see [`is_param`]).
pub fn without_query_param<'a>(target: &'a str, name: &str) -> Cow<'a, str> {
    let Some((path, query)) = target.split_once('?') else {
        return Cow::Borrowed(target);
    };
    if !query.split('&').any(|p| is_param(p, name)) {
        return Cow::Borrowed(target);
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !is_param(p, name))
        .collect();
    if kept.is_empty() {
        Cow::Owned(path.to_owned())
    } else {
        Cow::Owned(format!("{path}?{}", kept.join("&")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(base: &str, target: &str) -> Result<String> {
        BaseUrl::parse(base)?.join(target)
    }

    #[test]
    fn a_bad_character_is_named_as_it_was_sent() {
        for (target, named) in [
            ("/caf\u{e9}", "'\u{e9}'"),
            ("/a b", "' '"),
            ("/x\u{1f600}", "'\u{1f600}'"),
        ] {
            let message = normalize_target(target).unwrap_err().to_string();
            assert!(message.ends_with(&format!("({named})")), "{message}");
        }
    }

    #[test]
    fn targets_never_leave_the_base_url() {
        let base = "http://up/prefix";
        assert_eq!(
            join(base, "/v1/messages").unwrap(),
            "http://up/prefix/v1/messages"
        );
        assert_eq!(
            join(base, "/a/../b?x=/../").unwrap(),
            "http://up/prefix/b?x=/../"
        );
        assert_eq!(join(base, "/a/./b/.").unwrap(), "http://up/prefix/a/b/");
        assert_eq!(join(base, "/a/%2E%2e/b").unwrap(), "http://up/prefix/b");
        for escape in ["/../admin", "/%2e%2e/admin", "/a/../../admin", "/.%2E/x"] {
            let err = join(base, escape).unwrap_err();
            assert!(
                matches!(&err, Error::BadRequest(m) if m.contains("leaves")),
                "{escape}: {err:?}"
            );
        }
        for bad in ["/a\\..\\b", "/a b", "/a\tb", "/caf\u{e9}", "/x#frag", "x"] {
            assert!(
                matches!(join(base, bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
        }
        assert_eq!(join(base, "/..a/b..").unwrap(), "http://up/prefix/..a/b..");
    }

    #[test]
    fn parsed_urls_are_the_joined_ones_and_kept_for_few_targets() {
        let base = BaseUrl::parse("http://up/prefix/v1").unwrap();
        for target in ["/v1/messages", "/models?x=1", "/a/../b", "/v1/messages"] {
            assert_eq!(
                base.url(target).unwrap().as_str(),
                base.join(target).unwrap()
            );
        }
        assert!(matches!(base.url("/../x"), Err(Error::BadRequest(_))));
        assert_eq!(base.parsed.load().len(), 3);
        for i in 0..PARSED_TARGETS * 2 {
            let target = format!("/n/{i}");
            assert!(base.url(&target).unwrap().as_str().ends_with(&target));
        }
        assert_eq!(base.parsed.load().len(), PARSED_TARGETS);
        let shown = format!("{base:?}");
        assert_eq!(shown, "BaseUrl(\"http://up/prefix/v1\")");
        // Clones share what was parsed; equality is the URL's.
        let copy = base.clone();
        assert_eq!(copy.parsed.load().len(), PARSED_TARGETS);
        assert_eq!(copy, BaseUrl::parse("http://up/prefix/v1/").unwrap());
    }

    #[test]
    fn uris_are_the_parsed_urls_and_kept_with_them() {
        let base = BaseUrl::parse("http://up:8080/prefix/v1").unwrap();
        for target in [
            "/v1/messages",
            "/v1/messages",
            "/models?x=1&y=%20",
            "/models?x=2",
            "/a/../b",
            "/deployments/d/chat?",
        ] {
            let uri = base.uri(target).unwrap();
            assert_eq!(
                uri.to_string(),
                base.url(target).unwrap().as_str(),
                "{target}"
            );
            assert_eq!(uri.authority().unwrap().as_str(), "up:8080");
        }
        // Known paths give the kept Uri, sharing its bytes.
        let kept = base
            .parsed
            .load()
            .get("/v1/messages")
            .unwrap()
            .1
            .clone()
            .unwrap();
        let again = base.uri("/v1/messages").unwrap();
        assert_eq!(again.path().as_ptr(), kept.path().as_ptr());
        // What the URL refuses, the Uri refuses the same way, kept or not.
        for bad in ["/../x", "/a b", "/x#frag"] {
            assert!(matches!(base.uri(bad), Err(Error::BadRequest(_))), "{bad}");
        }
        base.uri("/known").unwrap();
        assert!(matches!(base.uri("/known\\"), Err(Error::BadRequest(_))));
    }

    #[test]
    fn queries_are_set_on_a_parsed_path_and_never_kept() {
        let base = BaseUrl::parse("https://res.example/openai").unwrap();
        for target in [
            "/deployments/d/chat?api-version=2024-10-21",
            "/deployments/d/chat?api-version=2025-01-01&x='y'",
            "/deployments/d/chat?",
            "/deployments/d/chat",
            "/deployments/d/./chat?a=%20b",
        ] {
            // Each twice: the first parses, the second finds the path parsed.
            for _ in 0..2 {
                assert_eq!(
                    base.url(target).unwrap(),
                    Url::parse(&base.join(target).unwrap()).unwrap(),
                    "{target}"
                );
            }
        }
        let parsed = base.parsed.load();
        let mut kept: Vec<&str> = parsed.keys().map(|k| &**k).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["/deployments/d/./chat", "/deployments/d/chat"]);
        assert!(parsed.values().all(|(url, _)| url.query().is_none()));
        // A query is checked like the rest of the target, parsed path or not.
        for bad in ["/deployments/d/chat?a=b c", "/deployments/d/chat?a#b"] {
            assert!(matches!(base.url(bad), Err(Error::BadRequest(_))), "{bad}");
        }
    }

    #[test]
    fn dot_segments_are_only_dots() {
        for (segment, dots) in [
            (".", Some(1)),
            ("%2e", Some(1)),
            ("..", Some(2)),
            (".%2E", Some(2)),
            ("%2E%2e", Some(2)),
            ("...", None),
            ("", None),
            ("%2", None),
            ("%2f", None),
            (".a", None),
            ("a.", None),
            ("%2e%2e%2e", None),
        ] {
            let found = dot_segment(segment).map(|d| match d {
                DotSegment::Current => 1,
                DotSegment::Parent => 2,
            });
            assert_eq!(found, dots, "{segment:?}");
        }
    }

    #[test]
    fn a_path_the_base_url_ends_with_is_not_doubled() {
        let base = "https://res.openai.azure.com/openai";
        assert_eq!(
            join(base, "/openai/deployments/d/chat/completions?api-version=1").unwrap(),
            "https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version=1"
        );
        assert_eq!(
            join(base, "/deployments/d").unwrap(),
            "https://res.openai.azure.com/openai/deployments/d"
        );
        // The longest overlap: both segments, not the last alone.
        let groq = "https://api.groq.com/openai/v1";
        for target in [
            "/openai/v1/chat/completions",
            "/v1/chat/completions",
            "/chat/completions",
        ] {
            assert_eq!(
                join(groq, target).unwrap(),
                "https://api.groq.com/openai/v1/chat/completions",
                "{target}"
            );
        }
        assert_eq!(
            join(
                "https://g.googleapis.com/v1beta",
                "/v1beta/models/m:generateContent"
            )
            .unwrap(),
            "https://g.googleapis.com/v1beta/models/m:generateContent"
        );
        // Whole segments only, and only the base's end.
        assert_eq!(
            join("https://x/openai", "/openaiX/y").unwrap(),
            "https://x/openai/openaiX/y"
        );
        assert_eq!(join("https://x/a/b", "/a/c").unwrap(), "https://x/a/b/a/c");
        assert_eq!(join("https://x", "/x/y").unwrap(), "https://x/x/y");
        assert_eq!(join("https://x:8080/", "/y").unwrap(), "https://x:8080/y");
    }

    #[test]
    fn a_trailing_v1_is_not_doubled() {
        let base = "https://api.openai.com/v1/";
        assert_eq!(
            join(base, "/v1/chat/completions").unwrap(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            join(base, "/models").unwrap(),
            "https://api.openai.com/v1/models"
        );
        assert_eq!(
            join(base, "/v1?x=1").unwrap(),
            "https://api.openai.com/v1?x=1"
        );
        assert_eq!(
            join("https://x/v10", "/v1/m").unwrap(),
            "https://x/v10/v1/m"
        );
    }

    #[test]
    fn a_key_given_as_a_base_url_is_quoted_as_its_hint() {
        let key = "sk-ant-api03-SECRETSECRETSECRET1";
        for raw in [
            key.to_owned(),
            format!("{key}:"),
            format!("https://x/#{key}"),
            format!("ftp://x/{key}"),
            format!("https://{key}/v1 "),
        ] {
            let message = BaseUrl::parse(&raw).err().unwrap().to_string();
            assert!(!message.contains("SECRETSECRET"), "{message}");
            assert!(message.contains("sk-a...RET1"), "{message}");
        }
        assert_eq!(
            masked_words("https://api.anthropic.com/v1/messages"),
            "https://api.anthropic.com/v1/messages"
        );
        let message = BaseUrl::parse("api.anthropic.com/v1")
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("\"api.anthropic.com/v1\""), "{message}");
    }

    #[test]
    fn urls_in_messages_hide_credentials() {
        for (raw, shown) in [
            (
                "https://api.anthropic.com/v1",
                "https://api.anthropic.com/v1",
            ),
            ("redis://user:pw@h:6379/0", "redis://***@h:6379/0"),
            // A password with unencoded '/', '?' or '#' (base64 from openssl).
            ("redis://:ab/cd?e#f@h:6379", "redis://***@h:6379"),
            (
                "unix:///run/redis.sock?db=1&pass=pw123",
                "unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "redis://h/?password=pw&x=1#f",
                "redis://h/?password=***&x=1#f",
            ),
            ("https://h/x?api_key=k&q=", "https://h/x?api_key=***&q="),
        ] {
            assert_eq!(masked_url(raw), shown, "{raw}");
        }
    }

    #[test]
    fn targets_normalize_in_one_pass_over_their_bytes() {
        for (target, normal) in [
            ("/v1/messages", Some("/v1/messages")),
            // Dots and percent signs in the query are not the path's.
            (
                "/v1/models?v=1.0&x=%2e%2e",
                Some("/v1/models?v=1.0&x=%2e%2e"),
            ),
            ("/a/./b?x=..", Some("/a/b?x=..")),
            ("/a/%2E%2e/b", Some("/b")),
            ("/a%2e/b.c", Some("/a%2e/b.c")),
            ("/", Some("/")),
            ("/..", None),
            ("/a/b c", None),
            ("/a?b#c", None),
            ("/a?b\\c", None),
            ("/a\u{e9}", None),
        ] {
            let got = normalize_target(target);
            assert_eq!(got.as_deref().ok(), normal, "{target:?}");
            if normal == Some(target) {
                assert!(matches!(got, Ok(Cow::Borrowed(_))), "{target:?}");
            }
        }
        // The first byte a request line cannot carry is the one named.
        let err = normalize_target("/a b\tc").unwrap_err().to_string();
        assert!(err.ends_with("(' ')"), "{err}");
    }

    #[test]
    fn messages_mask_a_key_in_the_query() {
        let err = normalize_target("/../x?alt=sse&key=AIzaSy-secret-value")
            .unwrap_err()
            .to_string();
        assert!(err.contains("?alt=sse&key=***"), "{err}");
        assert!(!err.contains("AIzaSy"), "{err}");
    }

    #[test]
    fn base_urls() {
        assert!(BaseUrl::parse("https://api.anthropic.com").is_ok());
        for bad in ["ftp://x", "http://x/?q=1", "http://x/#f", "not a url"] {
            assert!(
                matches!(BaseUrl::parse(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
        let err = BaseUrl::parse("https://user:hunter2@up.example/p").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("credentials"), "{message}");
        assert!(message.contains("https://***@up.example/p"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        for spaced in [
            "https://up.example/v1\n",
            "https://up.example/v1 ",
            " https://up.example",
            "https://up.exa\tmple",
        ] {
            let message = BaseUrl::parse(spaced).unwrap_err().to_string();
            assert!(
                message.contains("whitespace or a control character"),
                "{message}"
            );
        }
    }
}
