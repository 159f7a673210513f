//! Response bodies: an upstream body read ahead by a pump task and handed to
//! the caller in batches, or bytes keyfailover made itself.
//!
//! On the way, a body is kept honest: a server-sent event stream is relayed
//! in whole events and one that breaks (or ends mid-event) gets a final error
//! event in the provider's shape, never a silent end; any other body that
//! breaks raises [`Error::Upstream`], so a server aborts the connection
//! rather than present a truncated body as complete; and an error body that
//! echoes one of the pool's keys has it replaced by the key's hint.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::latch::Latch;
use crate::metrics::Outcome;
use crate::pool::{KeyPool, KeySet};
use crate::provider::Provider;
use crate::sse::Framer;

/// Chunks of a body in arrival order, handed over together.
pub type Chunks = Vec<Bytes>;

/// How many bytes of already-received chunks one batch gathers, at most.
pub const BATCH_LIMIT: usize = 256 * 1024;

/// How many chunks the pump reads ahead of the caller.
const READ_AHEAD: usize = 64;

/// Why an upstream body ended early, worded for the error event or error.
const SHUTTING_DOWN: &str = "the server is shutting down";

/// An upstream body as the pump reads it.
#[derive(Debug)]
pub(crate) struct Stream {
    pub resp: crate::upstream::Response,
    /// Bytes already read from `resp` (while judging it), relayed first.
    pub pending: VecDeque<Bytes>,
    /// For `text/event-stream`: relay whole events and end a broken stream
    /// with an error event in this provider's shape.
    pub sse: Option<(Framer, Provider)>,
    /// For a stream whose end only a closed connection marks (HTTP/1 with
    /// neither Content-Length nor chunked encoding): whether the last event
    /// relayed was the provider's final one. Without it, the end is a break.
    pub final_event_seen: Option<bool>,
    /// Set when the body ended by breaking (an error, or an error event of ours).
    pub broke: bool,
    /// For error (non-2xx) bodies: replaces the pool's keys by their hints.
    pub scrubber: Option<Scrubber>,
    /// For a successful event stream whose first event is an error (not the
    /// key's, or it would have failed over): the pool's keys, replaced by
    /// their hints in a batch of whole events that may hold an error event
    /// (one look for `error` first). Other streams go by unread.
    pub error_keys: Option<Keys>,
    /// For an error body upstream content-coded: takes the coding apart
    /// before the scrubber looks at the bytes.
    pub decoder: Option<Box<Decoder>>,
    /// Set when the client shuts down: the body ends with an error.
    pub shutdown: Latch,
    /// Counts the request's outcome once the body is done with.
    pub outcome: Option<Arc<OutcomeOnDrop>>,
    /// Keeps the key counted as in use until the body is done with.
    pub _in_flight: Option<crate::pool::InFlight>,
    pub done: bool,
}

impl Stream {
    /// The next chunk; None once the body ended (not to be called again
    /// after None or an error). Dropping the stream counts its outcome.
    pub(crate) async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let chunk = self.next_clean().await;
        if let (Some(outcome), true) = (&self.outcome, self.done) {
            // The stream ended: by an error, or with an error event of ours.
            let broken = chunk.is_err() || self.broke;
            outcome.broken.fetch_or(broken, Ordering::Relaxed);
        }
        chunk
    }

    async fn next_clean(&mut self) -> Result<Option<Bytes>> {
        loop {
            let chunk = self.next_read().await?;
            let Some(scrubber) = &mut self.scrubber else {
                return Ok(chunk);
            };
            match chunk {
                Some(chunk) => {
                    if let Some(clean) = scrubber.push(&chunk) {
                        return Ok(Some(clean));
                    }
                }
                None => return Ok(scrubber.finish()),
            }
        }
    }

    /// The next piece of the body as the caller reads it: upstream's bytes
    /// (those read while judging the response first), taken out of an
    /// unasked content coding, then cut into whole events for a stream.
    async fn next_read(&mut self) -> Result<Option<Bytes>> {
        while !self.done {
            // Checked before each read, so a stream that always has data
            // ready still ends at shutdown; raced against a read that waits.
            // A read that is ready at once never registers for the shutdown.
            let read = if let Some(chunk) = self.pending.pop_front() {
                Ok(Some(chunk))
            } else if self.shutdown.is_set() {
                Err(None)
            } else {
                tokio::select! {
                    biased;
                    read = self.resp.chunk() => read.map_err(Some),
                    _ = self.shutdown.wait() => Err(None),
                }
            };
            let chunk = match read {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    self.done = true;
                    return self.end();
                }
                Err(cause) => {
                    let message = match &cause {
                        Some(e) => format!("upstream stream broke: {}", describe(e)),
                        None => SHUTTING_DOWN.to_owned(),
                    };
                    return self.fail(match cause {
                        Some(e) if self.sse.is_none() => describe(&e),
                        _ => message,
                    });
                }
            };
            let chunk = match &mut self.decoder {
                None => chunk,
                Some(decoder) => match decoder.push(&chunk) {
                    Ok(decoded) => Bytes::from(decoded),
                    Err(e) => return self.fail(e.to_string()),
                },
            };
            match &mut self.sse {
                None => {
                    // The last piece, by the body's framing: the end needs
                    // no read of its own (a small body is whole at once).
                    // A coded body's end still has its decoder's rest.
                    self.done =
                        self.decoder.is_none() && self.pending.is_empty() && self.resp.is_end();
                    if !chunk.is_empty() {
                        return Ok(Some(chunk));
                    }
                }
                Some((framer, _)) => {
                    if let Some(events) = framer.push(chunk) {
                        self.watch_for_final_event(&events);
                        return Ok(Some(self.scrub_error_events(events)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Notes whether `events` hold the provider's final event, for a stream
    /// whose end only a closed connection marks. Once it has come, the
    /// stream is complete: a Gemini stream's last chunk is known only by its
    /// finishReason, and a trailing event (a ping, a usage-only chunk) after
    /// it does not make the end a break.
    fn watch_for_final_event(&mut self, events: &[u8]) {
        if let (Some(seen @ false), Some((_, provider))) = (&mut self.final_event_seen, &self.sse) {
            if provider.may_hold_final_event(events) {
                *seen = crate::sse::events(events).any(|block| {
                    let event = crate::sse::parse_event(&events[block]);
                    event.has_fields && provider.is_final_event(&event)
                });
            }
        }
    }

    /// `events` with the pool's keys replaced by their hints, for a
    /// successful stream's batch that may hold an error event.
    fn scrub_error_events(&self, events: Bytes) -> Bytes {
        match &self.error_keys {
            Some(Keys(keys)) if memchr::memmem::find(&events, b"error").is_some() => {
                scrub_value(&events, keys.secrets()).map_or(events, Bytes::from)
            }
            _ => events,
        }
    }

    /// The body's end, once upstream's ended: what a decoder still held, and
    /// for a stream an error event if it ended inside an event or before its
    /// final one.
    fn end(&mut self) -> Result<Option<Bytes>> {
        let tail = match self.decoder.take().map(|decoder| decoder.finish()) {
            None => Bytes::new(),
            Some(Ok(tail)) => Bytes::from(tail),
            Some(Err(e)) => return self.fail(e.to_string()),
        };
        let Some((framer, provider)) = &mut self.sse else {
            return Ok((!tail.is_empty()).then_some(tail));
        };
        let provider = *provider;
        let events = framer.push(tail).unwrap_or_default();
        // Whatever partial event is held was never relayed: a stream that
        // ends inside an event broke.
        let held = framer.take_held();
        self.watch_for_final_event(&events);
        let events = self.scrub_error_events(events);
        let broke = if !held.trim_ascii().is_empty() {
            Some("upstream stream ended in the middle of an event")
        } else if self.final_event_seen == Some(false) {
            Some("upstream stream ended before its final event")
        } else {
            None
        };
        let Some(message) = broke else {
            return Ok((!events.is_empty()).then_some(events));
        };
        self.broke = true;
        let error = error_event(provider, message);
        Ok(Some(if events.is_empty() {
            error
        } else {
            Bytes::from([&events[..], &error[..]].concat())
        }))
    }

    /// Ends the body early: a stream with an error event, anything else
    /// with an error (so that a server aborts rather than end it cleanly).
    fn fail(&mut self, message: String) -> Result<Option<Bytes>> {
        self.done = true;
        self.broke = true;
        match &self.sse {
            Some((_, provider)) => Ok(Some(error_event(*provider, &message))),
            None => Err(Error::Upstream(message)),
        }
    }

    /// Reads the body into `tx` as fast as upstream sends it (up to
    /// READ_AHEAD chunks ahead), so the caller finds chunks waiting instead
    /// of waiting for each one; stops when the caller goes away.
    async fn pump(mut self, tx: mpsc::Sender<Result<Bytes>>) {
        loop {
            let item = match self.next_chunk().await {
                Ok(Some(chunk)) => Ok(chunk),
                Ok(None) => break,
                Err(err) => Err(err),
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                break;
            }
        }
        // The outcome is counted (with the stream) before the reader sees the
        // end, so a scrape right after a body was read includes it.
        drop(self);
        drop(tx);
    }
}

/// A pool's keys, to scrub a stream's error events with; shown by count.
pub(crate) struct Keys(pub Arc<KeySet>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({})", self.0.secrets().count())
    }
}

/// Counts a request's outcome when the last holder of its body lets go:
/// `stream_broken` if the body broke, `ok` otherwise.
pub(crate) struct OutcomeOnDrop {
    pub pool: KeyPool,
    pub broken: AtomicBool,
}

impl std::fmt::Debug for OutcomeOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeOnDrop").finish()
    }
}

impl Drop for OutcomeOnDrop {
    fn drop(&mut self) {
        self.pool
            .counters()
            .outcome(if self.broken.load(Ordering::Relaxed) {
                Outcome::StreamBroken
            } else {
                Outcome::Ok
            });
    }
}

fn error_event(provider: Provider, message: &str) -> Bytes {
    Bytes::from(provider.sse_error_event(ErrorKind::Api, message))
}

/// A readable description of a transport error and its causes, without URL.
pub(crate) fn describe(err: &crate::upstream::UpstreamError) -> String {
    use std::error::Error as _;
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// Replaces secrets in a byte stream by their hints, also where a secret is
/// split across chunks: the last `longest - 1` bytes are held back until the
/// next chunk (or the end) shows whether they start a secret.
#[derive(Debug)]
pub(crate) struct Scrubber {
    secrets: Vec<(Vec<u8>, Vec<u8>)>,
    keep: usize,
    held: Vec<u8>,
}

impl Scrubber {
    /// None when there is nothing to scrub for.
    /// A key with a `/` (base64) is also looked for as JSON may write it,
    /// `\/` (PHP's encoder and others escape every slash).
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let mut all: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for (value, hint) in secrets.into_iter().filter(|(value, _)| !value.is_empty()) {
            if value.contains('/') {
                let escaped = value.replace('/', "\\/");
                all.push((escaped.into_bytes(), hint.as_bytes().to_vec()));
            }
            all.push((value.as_bytes().to_vec(), hint.as_bytes().to_vec()));
        }
        let secrets = all;
        let longest = secrets.iter().map(|(v, _)| v.len()).max()?;
        Some(Self {
            secrets,
            keep: longest - 1,
            held: Vec::new(),
        })
    }

    /// Adds a chunk; returns the scrubbed bytes that are safe to send now.
    pub fn push(&mut self, chunk: &[u8]) -> Option<Bytes> {
        self.held.extend_from_slice(chunk);
        self.replace_all();
        let safe = self.held.len().saturating_sub(self.keep);
        (safe > 0).then(|| Bytes::from(self.held.drain(..safe).collect::<Vec<u8>>()))
    }

    /// The rest, at the end of the body.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.replace_all();
        (!self.held.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.held)))
    }

    fn replace_all(&mut self) {
        for (secret, hint) in &self.secrets {
            if let Some(replaced) = replace(&self.held, secret, hint) {
                self.held = replaced;
            }
        }
    }
}

/// Takes apart an error body that upstream sent in a content coding
/// although asked for `identity` (`Accept-Encoding` goes upstream so), so
/// that the scrubber sees the bytes the caller would read: gzip and deflate,
/// which is what servers send unasked. The coding's header goes with it.
pub(crate) struct Decoder {
    coding: &'static str,
    inner: Decoding,
    /// Bytes decoded so far, and the most it may come to: [`DECODED_LIMIT`]
    /// for an error body, none for an event stream.
    decoded: usize,
    limit: usize,
    /// Whether any byte came: a body with none (a HEAD's answer, a 304) is
    /// empty, not a coding cut short.
    seen: bool,
}

enum Decoding {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("coding", &self.coding)
            .finish()
    }
}

impl Decoder {
    /// The decoder a response's `Content-Encoding` calls for: None for none
    /// (or `identity`), or, as the error, the codings when this cannot take
    /// them apart (any but one gzip or deflate).
    pub fn for_headers(headers: &http::HeaderMap) -> std::result::Result<Option<Self>, String> {
        let codings: Vec<&[u8]> = headers
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
            .collect();
        let is = |name: &[u8]| codings.len() == 1 && codings[0].eq_ignore_ascii_case(name);
        Ok(Some(if is(b"gzip") || is(b"x-gzip") {
            Self {
                coding: "gzip",
                inner: Decoding::Gzip(flate2::write::GzDecoder::new(Vec::new())),
                decoded: 0,
                limit: DECODED_LIMIT,
                seen: false,
            }
        } else if is(b"deflate") {
            Self {
                coding: "deflate",
                inner: Decoding::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
                decoded: 0,
                limit: DECODED_LIMIT,
                seen: false,
            }
        } else if codings.is_empty() {
            return Ok(None);
        } else {
            let names: Vec<_> = codings.iter().map(|c| String::from_utf8_lossy(c)).collect();
            return Err(names.join(", "));
        }))
    }

    /// The same decoder without a limit on what the body decodes to: an event
    /// stream may run long, and is relayed as it is decoded.
    pub fn unlimited(self) -> Self {
        Self {
            limit: usize::MAX,
            ..self
        }
    }

    /// The bytes `chunk` decodes to (often none until enough has come).
    /// Fed a KiB at a time, so that no more than about a MiB (deflate's
    /// largest ratio) is decoded past the limit before it is caught.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>> {
        use std::io::Write;
        self.seen |= !chunk.is_empty();
        let mut out = Vec::new();
        for piece in chunk.chunks(1024) {
            // Flushed: flate2's writers hold what a write decodes until the next.
            let written = match &mut self.inner {
                Decoding::Gzip(d) => d
                    .write_all(piece)
                    .and_then(|()| d.flush())
                    .map(|()| std::mem::take(d.get_mut())),
                Decoding::Deflate(d) => d
                    .write_all(piece)
                    .and_then(|()| d.flush())
                    .map(|()| std::mem::take(d.get_mut())),
            };
            let decoded = written.map_err(|e| broken(self.coding, &e))?;
            self.decoded += decoded.len();
            if self.decoded > self.limit {
                return Err(Error::Upstream(format!(
                    "upstream's {} error body decodes to more than {} MiB",
                    self.coding,
                    self.limit >> 20
                )));
            }
            if out.is_empty() {
                out = decoded;
            } else {
                out.extend_from_slice(&decoded);
            }
        }
        Ok(out)
    }

    /// The rest, at the end of the body.
    pub fn finish(self) -> Result<Vec<u8>> {
        if !self.seen {
            return Ok(Vec::new());
        }
        let coding = self.coding;
        let finished = match self.inner {
            Decoding::Gzip(d) => d.finish(),
            Decoding::Deflate(d) => d.finish(),
        };
        finished.map_err(|e| broken(coding, &e))
    }
}

/// The most an error body may decode to: error bodies are small, and a
/// body that inflates past this is cut off as broken.
const DECODED_LIMIT: usize = 16 << 20;

fn broken(coding: &str, e: &std::io::Error) -> Error {
    Error::Upstream(format!("upstream's {coding} body does not decode: {e}"))
}

/// `haystack` with every `needle` replaced, or None when there is none.
fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let first = find(haystack, needle, 0)?;
    let mut out = Vec::with_capacity(haystack.len());
    let mut at = 0;
    let mut next = Some(first);
    while let Some(i) = next {
        out.extend_from_slice(&haystack[at..i]);
        out.extend_from_slice(with);
        at = i + needle.len();
        next = find(haystack, needle, at);
    }
    out.extend_from_slice(&haystack[at..]);
    Some(out)
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// `value` with the pool's secrets replaced, if it holds any (for headers).
pub(crate) fn scrub_value<'a>(
    value: &[u8],
    secrets: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for (secret, hint) in secrets {
        if secret.is_empty() || value.len() < secret.len() {
            continue;
        }
        let current = out.as_deref().unwrap_or(value);
        if let Some(replaced) = replace(current, secret.as_bytes(), hint.as_bytes()) {
            out = Some(replaced);
        }
    }
    out
}

/// A response body: synthesized bytes, or an upstream stream read by a pump
/// task. Safe to share between tasks; `close()` (or dropping the body) drops
/// the upstream connection at once, even while a task waits for a chunk.
#[derive(Debug)]
pub struct ResponseBody {
    source: tokio::sync::Mutex<Source>,
    closed: Latch,
    pump: std::sync::OnceLock<AbortHandle>,
}

#[derive(Debug)]
enum Source {
    Full(Bytes),
    Channel {
        /// Chunks read before the pump started, handed over first.
        ready: Option<Chunks>,
        rx: mpsc::Receiver<Result<Bytes>>,
        /// An error met while gathering a batch, raised after the batch.
        deferred: Option<Error>,
    },
    /// An upstream body whose pump has not started: it starts on the first
    /// read, unless a server takes the stream to read it itself
    /// ([`ResponseBody::into_direct`]).
    Idle {
        ready: Option<Chunks>,
        stream: Box<Stream>,
        runtime: tokio::runtime::Handle,
    },
    Done,
}

/// A body as a consumer on the runtime reads it ([`ResponseBody::into_direct`]).
pub(crate) enum Direct {
    /// A body complete in memory.
    Full(Bytes),
    /// An upstream body read straight from its connection, with no pump task
    /// or channel between: chunks already read first.
    Stream {
        ready: VecDeque<Bytes>,
        stream: Box<Stream>,
    },
    Body(ResponseBody),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            source: tokio::sync::Mutex::new(Source::Full(bytes.into())),
            closed: Latch::new(),
            pump: std::sync::OnceLock::new(),
        }
    }

    /// A body fed by a task of keyfailover's own (the dashboard's event
    /// stream); closing the body aborts the task.
    pub(crate) fn from_channel(rx: mpsc::Receiver<Result<Bytes>>, task: AbortHandle) -> Self {
        Self {
            source: tokio::sync::Mutex::new(Source::Channel {
                ready: None,
                rx,
                deferred: None,
            }),
            closed: Latch::new(),
            pump: task.into(),
        }
    }

    /// Takes what of the body has already arrived; the rest is read by a
    /// pump task started on the first read (or by a server reading the
    /// stream itself). Call within the tokio runtime. A small body usually
    /// arrives with its head: it is then held whole, and a server sends it
    /// with the head in one write.
    pub(crate) fn stream(mut stream: Stream) -> Self {
        // The first chunk on its own: a small body is mostly one, and needs
        // no list.
        let mut first: Option<Bytes> = None;
        let mut more = Vec::new();
        let mut size = 0;
        let mut deferred = None;
        while size < BATCH_LIMIT {
            // Every await in `next_chunk` is cancel safe: a chunk not yet
            // arrived is read again later.
            match stream.next_chunk().now_or_never() {
                Some(Ok(Some(chunk))) => {
                    size += chunk.len();
                    match first {
                        None => first = Some(chunk),
                        Some(_) => more.push(chunk),
                    }
                }
                Some(Ok(None)) => {
                    // Complete: counted as done now, as the pump would.
                    drop(stream);
                    return Self::full(match first {
                        None => Bytes::new(),
                        Some(one) if more.is_empty() => one,
                        Some(one) => {
                            let mut all = Vec::with_capacity(size);
                            all.extend_from_slice(&one);
                            for chunk in &more {
                                all.extend_from_slice(chunk);
                            }
                            Bytes::from(all)
                        }
                    });
                }
                Some(Err(err)) => {
                    deferred = Some(err);
                    break;
                }
                None => break,
            }
        }
        let ready = first.map(|one| {
            more.insert(0, one);
            more
        });
        let source = match deferred {
            // Broken: the chunks before the break, then the error.
            Some(err) => {
                drop(stream);
                let (_, rx) = mpsc::channel(1);
                Source::Channel {
                    ready,
                    rx,
                    deferred: Some(err),
                }
            }
            None => Source::Idle {
                ready,
                stream: Box::new(stream),
                runtime: tokio::runtime::Handle::current(),
            },
        };
        Self {
            source: tokio::sync::Mutex::new(source),
            closed: Latch::new(),
            pump: std::sync::OnceLock::new(),
        }
    }

    /// The body for a consumer on the runtime: an upstream stream not yet
    /// read is handed over whole, to be read with no task in between.
    pub(crate) fn into_direct(mut self) -> Direct {
        match std::mem::replace(self.source.get_mut(), Source::Done) {
            Source::Idle { ready, stream, .. } => Direct::Stream {
                ready: ready.unwrap_or_default().into(),
                stream,
            },
            Source::Full(bytes) if !self.closed.is_set() => Direct::Full(bytes),
            other => {
                *self.source.get_mut() = other;
                Direct::Body(self)
            }
        }
    }

    /// The next chunks, as they arrive, with any others already received
    /// (up to about BATCH_LIMIT bytes); None at the end or once closed.
    /// A non-SSE body that breaks raises [`Error::Upstream`] after the chunks
    /// received before the break; an SSE body that breaks yields one final
    /// error event instead.
    pub async fn next_batch(&self) -> Result<Option<Chunks>> {
        // Closed is checked first; a lock or chunk that is ready at once
        // never registers for the close (see `Stream::next_read`).
        if self.closed.is_set() {
            return Ok(None);
        }
        let mut source = tokio::select! {
            biased;
            source = self.source.lock() => source,
            _ = self.closed.wait() => return Ok(None),
        };
        self.start_pump(&mut source);
        let (ready, rx, deferred) = match &mut *source {
            Source::Done => return Ok(None),
            Source::Full(bytes) => {
                let bytes = std::mem::take(bytes);
                *source = Source::Done;
                return Ok((!bytes.is_empty()).then(|| vec![bytes]));
            }
            Source::Idle { .. } => unreachable!("started above"),
            Source::Channel {
                ready,
                rx,
                deferred,
            } => (ready, rx, deferred),
        };
        let mut batch = match ready.take() {
            Some(ready) => ready,
            None => {
                if let Some(err) = deferred.take() {
                    *source = Source::Done;
                    return Err(err);
                }
                let first = if self.closed.is_set() {
                    None
                } else {
                    tokio::select! {
                        biased;
                        item = rx.recv() => item,
                        _ = self.closed.wait() => None,
                    }
                };
                match first {
                    Some(Ok(chunk)) => vec![chunk],
                    Some(Err(err)) => {
                        *source = Source::Done;
                        return Err(err);
                    }
                    None => {
                        *source = Source::Done;
                        return Ok(None);
                    }
                }
            }
        };
        // With any others already received.
        let mut size: usize = batch.iter().map(Bytes::len).sum();
        while size < BATCH_LIMIT && deferred.is_none() {
            match rx.try_recv() {
                Ok(Ok(chunk)) => {
                    size += chunk.len();
                    batch.push(chunk);
                }
                Ok(Err(err)) => *deferred = Some(err),
                Err(_) => break,
            }
        }
        Ok(Some(batch))
    }

    /// Starts the pump of an upstream body not read yet.
    fn start_pump(&self, source: &mut Source) {
        if !matches!(source, Source::Idle { .. }) {
            return;
        }
        let Source::Idle {
            ready,
            stream,
            runtime,
        } = std::mem::replace(source, Source::Done)
        else {
            unreachable!("matched above")
        };
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let pump = runtime.spawn(stream.pump(tx)).abort_handle();
        if self.closed.is_set() {
            pump.abort();
        }
        let _ = self.pump.set(pump);
        *source = Source::Channel {
            ready,
            rx,
            deferred: None,
        };
    }

    /// Waits until `next_batch` (or, with `whole`, `read_all`) can answer
    /// without waiting, taking nothing: what arrives meanwhile is kept in the
    /// body. So a wait that is abandoned (its caller cancelled) loses
    /// nothing, which a read abandoned after it took chunks would: the
    /// Python awaitables wait here, then take in the awaiting task.
    pub async fn wait_ready(&self, whole: bool) {
        if self.closed.is_set() {
            return;
        }
        let mut source = tokio::select! {
            biased;
            source = self.source.lock() => source,
            _ = self.closed.wait() => return,
        };
        self.start_pump(&mut source);
        loop {
            let Source::Channel {
                ready,
                rx,
                deferred,
            } = &mut *source
            else {
                return; // complete or ended
            };
            if deferred.is_some() || (ready.is_some() && !whole) {
                return;
            }
            let item = tokio::select! {
                biased;
                item = rx.recv() => item,
                _ = self.closed.wait() => return,
            };
            match item {
                Some(Ok(chunk)) => ready.get_or_insert_with(Vec::new).push(chunk),
                // Raised after the chunks before it, as `next_batch` raises it.
                Some(Err(err)) => *deferred = Some(err),
                None if ready.is_none() => *source = Source::Done,
                None => return,
            }
        }
    }

    /// True when `read_all` would answer without waiting: the rest of the
    /// body is here, or the body broke or was closed.
    pub fn is_complete(&self) -> bool {
        if self.closed.is_set() {
            return true;
        }
        self.source.try_lock().is_ok_and(|source| complete(&source))
    }

    /// The rest of the body when all of it is here (see `is_complete`),
    /// taken under one lock, so that no other read can come between its
    /// batches; None when some of it is still coming or another read holds
    /// the body. A body that broke raises its error, as `read_all` does.
    pub fn try_read_rest(&self) -> Option<Result<Chunks>> {
        if self.closed.is_set() {
            return Some(Ok(Vec::new()));
        }
        let mut source = self.source.try_lock().ok()?;
        if !complete(&source) {
            return None;
        }
        let all = match &mut *source {
            Source::Done => return Some(Ok(Vec::new())),
            Source::Idle { .. } => return None,
            Source::Full(bytes) => {
                let bytes = std::mem::take(bytes);
                *source = Source::Done;
                return Some(Ok(if bytes.is_empty() {
                    Vec::new()
                } else {
                    vec![bytes]
                }));
            }
            Source::Channel {
                ready,
                rx,
                deferred,
            } => {
                let mut all = ready.take().unwrap_or_default();
                while deferred.is_none() {
                    match rx.try_recv() {
                        Ok(Ok(chunk)) => all.push(chunk),
                        Ok(Err(err)) => *deferred = Some(err),
                        Err(_) => break,
                    }
                }
                if let Some(err) = deferred.take() {
                    *source = Source::Done;
                    return Some(Err(err));
                }
                all
            }
        };
        *source = Source::Done;
        Some(Ok(all))
    }

    /// `next_batch` when it can answer without waiting; None when it would wait.
    pub fn try_next_batch(&self) -> Option<Result<Option<Chunks>>> {
        self.next_batch().now_or_never()
    }

    /// The rest of the body. A read cancelled midway (a timeout around it)
    /// gives back what it had read: the next read starts where it started.
    pub async fn read_all(&self) -> Result<Bytes> {
        let chunks = self.read_chunks().await?;
        Ok(match chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            all => {
                let mut out = BytesMut::with_capacity(all.iter().map(Bytes::len).sum());
                for chunk in all {
                    out.extend_from_slice(chunk);
                }
                out.freeze()
            }
        })
    }

    /// `read_all` as the chunks that came, for a consumer that copies them
    /// anyway.
    pub async fn read_chunks(&self) -> Result<Chunks> {
        let mut read = Unread {
            body: self,
            chunks: Vec::new(),
        };
        while let Some(batch) = self.next_batch().await? {
            read.chunks.extend(batch);
        }
        Ok(std::mem::take(&mut read.chunks))
    }

    /// Closes the body and its upstream connection at once.
    pub fn close(&self) {
        self.closed.set();
        if let Some(pump) = self.pump.get() {
            pump.abort();
        }
        // A stream no pump reads yet is dropped here, with its connection
        // (unless a read holds the source: that read sees `closed`).
        if let Ok(mut source) = self.source.try_lock() {
            if matches!(*source, Source::Idle { .. }) {
                *source = Source::Done;
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_set()
    }
}

/// Whether the rest of a body is here (or it broke): nothing more to wait for.
fn complete(source: &Source) -> bool {
    match source {
        Source::Full(_) | Source::Done => true,
        Source::Idle { .. } => false,
        Source::Channel { rx, deferred, .. } => {
            deferred.is_some() || (rx.is_closed() && rx.is_empty())
        }
    }
}

/// What a [`ResponseBody::read_all`] in progress has read: put back ahead of
/// the rest if the read is dropped before it ends (by then the read holds no
/// lock on the body's source). A body that ended or broke has nothing to put
/// it back into: the error was raised.
struct Unread<'a> {
    body: &'a ResponseBody,
    chunks: Chunks,
}

impl Drop for Unread<'_> {
    fn drop(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        let Ok(mut source) = self.body.source.try_lock() else {
            return;
        };
        if let Source::Channel { ready, .. } = &mut *source {
            let mut chunks = std::mem::take(&mut self.chunks);
            chunks.extend(ready.take().unwrap_or_default());
            *ready = Some(chunks);
        }
    }
}

impl Drop for ResponseBody {
    /// As [`ResponseBody::close`], without its flag and lock: nothing else
    /// can be reading a body being dropped.
    fn drop(&mut self) {
        if let Some(pump) = self.pump.get() {
            pump.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_key_with_slashes_is_scrubbed_as_json_may_escape_it() {
        let key = "sk-ant-api03-ab/cd+ef/0001";
        let mut scrubber = Scrubber::new([(key, "sk-a...0001")]).unwrap();
        let body = br#"{"error":{"message":"bad key sk-ant-api03-ab\/cd+ef\/0001 or sk-ant-api03-ab/cd+ef/0001"}}"#;
        let mut out = Vec::new();
        for piece in body.chunks(7) {
            out.extend_from_slice(&scrubber.push(piece).unwrap_or_default());
        }
        out.extend_from_slice(&scrubber.finish().unwrap_or_default());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"error":{"message":"bad key sk-a...0001 or sk-a...0001"}}"#
        );
    }

    const KEY: &str = "sk-ant-api03-secret-value-0001";
    const HINT: &str = "sk-a...0001";

    fn scrub_in_pieces(body: &[u8], cut: &[usize]) -> Vec<u8> {
        let mut scrubber = Scrubber::new([(KEY, HINT), ("short-k", "...")]).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cut.iter().chain([&body.len()]) {
            if let Some(b) = scrubber.push(&body[at..c]) {
                out.extend_from_slice(&b);
            }
            at = c;
        }
        if let Some(b) = scrubber.finish() {
            out.extend_from_slice(&b);
        }
        out
    }

    fn coded(coding: &str, body: &[u8]) -> Vec<u8> {
        use flate2::write::{GzEncoder, ZlibEncoder};
        use std::io::Write;
        match coding {
            "gzip" => {
                let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
            _ => {
                let mut e = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
        }
    }

    fn encoding(values: &[&str]) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        for v in values {
            headers.append(
                http::header::CONTENT_ENCODING,
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn decodes_gzip_and_deflate_bodies_in_any_pieces() {
        let body = format!("{{\"error\": \"bad key {KEY}\"}}").repeat(50);
        for (header, coding) in [("gzip", "gzip"), ("X-Gzip", "gzip"), ("deflate", "deflate")] {
            let sent = coded(coding, body.as_bytes());
            for size in [1, 7, 64, sent.len()] {
                let mut decoder = Decoder::for_headers(&encoding(&[header])).unwrap().unwrap();
                let mut out = Vec::new();
                for piece in sent.chunks(size) {
                    out.extend(decoder.push(piece).unwrap());
                }
                // All of it as soon as all has come (the failover's judge
                // reads only a body's start, and never finishes it).
                assert_eq!(out, body.as_bytes(), "{header} in pieces of {size}");
                assert_eq!(decoder.finish().unwrap(), b"");
            }
        }
    }

    #[test]
    fn only_one_gzip_or_deflate_coding_is_taken_apart() {
        let decoder =
            |values: &[&str]| Decoder::for_headers(&encoding(values)).map(|d| d.is_some());
        assert_eq!(decoder(&[]), Ok(false));
        assert_eq!(decoder(&["identity"]), Ok(false));
        assert_eq!(decoder(&[" gzip "]), Ok(true));
        assert_eq!(decoder(&["br"]), Err("br".to_owned()));
        assert_eq!(decoder(&["gzip, br"]), Err("gzip, br".to_owned()));
        assert_eq!(decoder(&["gzip", "gzip"]), Err("gzip, gzip".to_owned()));
    }

    #[test]
    fn an_empty_body_is_empty_and_one_cut_short_an_upstream_error() {
        for header in ["gzip", "deflate"] {
            let mut empty = Decoder::for_headers(&encoding(&[header])).unwrap().unwrap();
            assert_eq!(empty.push(b"").unwrap(), b"");
            assert_eq!(empty.finish().unwrap(), b"", "{header}");
            let sent = coded(header, b"a body long enough to be cut");
            let mut cut = Decoder::for_headers(&encoding(&[header])).unwrap().unwrap();
            let _ = cut.push(&sent[..sent.len() / 2]).unwrap();
            assert!(matches!(cut.finish(), Err(Error::Upstream(_))), "{header}");
        }
    }

    #[test]
    fn a_body_that_inflates_past_the_limit_is_cut_off() {
        let bomb = coded("gzip", &vec![b'0'; DECODED_LIMIT + 1]);
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        let mut decoder = Decoder::for_headers(&encoding(&["gzip"])).unwrap().unwrap();
        let mut total = 0;
        let err = loop {
            match decoder.push(&bomb) {
                Ok(out) => total += out.len(),
                Err(err) => break err,
            }
        };
        assert!(total <= DECODED_LIMIT);
        assert!(matches!(err, Error::Upstream(m) if m.contains("more than 16 MiB")));
    }

    #[test]
    fn a_body_that_does_not_decode_is_an_upstream_error() {
        let mut decoder = Decoder::for_headers(&encoding(&["gzip"])).unwrap().unwrap();
        let broken = decoder
            .push(b"not gzip at all, not even its header")
            .and_then(|_| decoder.finish());
        assert!(
            matches!(broken, Err(Error::Upstream(m)) if m.contains("gzip body does not decode"))
        );
    }

    #[test]
    fn scrubs_keys_split_across_chunks() {
        let body = format!(r#"{{"error":{{"message":"bad key {KEY}, also {KEY} and short-k"}}}}"#);
        let expected =
            format!(r#"{{"error":{{"message":"bad key {HINT}, also {HINT} and ..."}}}}"#);
        for cut in 0..body.len() {
            assert_eq!(
                scrub_in_pieces(body.as_bytes(), &[cut]),
                expected.as_bytes(),
                "cut at {cut}"
            );
        }
        let every_byte: Vec<usize> = (1..body.len()).collect();
        assert_eq!(
            scrub_in_pieces(body.as_bytes(), &every_byte),
            expected.as_bytes()
        );
        assert_eq!(scrub_in_pieces(b"nothing here", &[3]), b"nothing here");
    }

    #[test]
    fn scrubs_header_values() {
        let secrets = [(KEY, HINT)];
        assert_eq!(scrub_value(b"plain", secrets), None);
        assert_eq!(
            scrub_value(format!("key={KEY}").as_bytes(), secrets).unwrap(),
            format!("key={HINT}").as_bytes()
        );
    }

    #[tokio::test]
    async fn a_read_all_cancelled_midway_gives_back_what_it_had_read() {
        let (tx, rx) = mpsc::channel(4);
        let body = ResponseBody::from_channel(rx, tokio::spawn(async {}).abort_handle());
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"def"))).await.unwrap();
        let timed_out =
            tokio::time::timeout(std::time::Duration::from_millis(50), body.read_all()).await;
        assert!(timed_out.is_err(), "the body has not ended: the read waits");
        tx.send(Ok(Bytes::from_static(b"ghi"))).await.unwrap();
        drop(tx);
        assert_eq!(body.read_all().await.unwrap(), &b"abcdefghi"[..]);
    }

    fn channel_body() -> (mpsc::Sender<Result<Bytes>>, ResponseBody) {
        let (tx, rx) = mpsc::channel(4);
        let body = ResponseBody::from_channel(rx, tokio::spawn(async {}).abort_handle());
        (tx, body)
    }

    fn chunk(text: &'static str) -> Result<Bytes> {
        Ok(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test]
    async fn a_wait_takes_nothing_and_an_abandoned_wait_loses_nothing() {
        let (tx, body) = channel_body();
        assert!(body.try_next_batch().is_none(), "nothing has come");
        let waited = tokio::time::timeout(Duration::from_millis(20), body.wait_ready(false)).await;
        assert!(waited.is_err(), "nothing to wait for yet");
        tx.send(chunk("abc")).await.unwrap();
        tx.send(chunk("def")).await.unwrap();
        body.wait_ready(false).await;
        body.wait_ready(false).await; // again: still there, taken by nobody
        assert!(!body.is_complete(), "the body goes on");
        assert!(
            body.try_read_rest().is_none(),
            "not all of it: nothing taken"
        );
        tx.send(chunk("ghi")).await.unwrap();
        // The take has what the wait kept and what came since, in order.
        let batch = body.try_next_batch().unwrap().unwrap().unwrap();
        assert_eq!(batch.concat(), b"abcdefghi");
        assert!(body.try_next_batch().is_none());
    }

    #[tokio::test]
    async fn a_wait_for_the_whole_body_keeps_its_chunks_then_its_end_or_break() {
        let (tx, body) = channel_body();
        tx.send(chunk("abc")).await.unwrap();
        let waiting = tokio::spawn({
            let body = Arc::new(body);
            let waited = body.clone();
            async move {
                waited.wait_ready(true).await;
                body
            }
        });
        tx.send(chunk("def")).await.unwrap();
        tx.send(Err(Error::Upstream("cut".into()))).await.unwrap();
        let body = waiting.await.unwrap();
        assert!(body.is_complete(), "broken: nothing more to wait for");
        {
            // The whole body taken at once: the break, as `read_all` raises it.
            let (tx, whole) = channel_body();
            tx.send(chunk("abc")).await.unwrap();
            tx.send(Err(Error::Upstream("cut".into()))).await.unwrap();
            whole.wait_ready(true).await;
            assert!(matches!(
                whole.try_read_rest(),
                Some(Err(Error::Upstream(_)))
            ));
            assert!(
                whole.try_read_rest().unwrap().unwrap().is_empty(),
                "then the end"
            );
        }
        // The chunks first, then the break, as a read would have met them.
        let batch = body.try_next_batch().unwrap().unwrap().unwrap();
        assert_eq!(batch.concat(), b"abcdef");
        assert!(matches!(
            body.try_next_batch(),
            Some(Err(Error::Upstream(_)))
        ));
        assert!(matches!(body.try_next_batch(), Some(Ok(None))));

        let (tx, body) = channel_body();
        tx.send(chunk("abc")).await.unwrap();
        drop(tx);
        body.wait_ready(true).await;
        assert!(body.is_complete(), "ended");
        assert_eq!(body.try_read_rest().unwrap().unwrap().concat(), b"abc");
        assert!(body.is_complete());
        assert!(matches!(body.try_next_batch(), Some(Ok(None))));
    }

    #[tokio::test]
    async fn a_wait_ends_when_the_body_is_closed() {
        let (_tx, body) = channel_body();
        let body = Arc::new(body);
        let waiting = tokio::spawn({
            let body = body.clone();
            async move { body.wait_ready(true).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        body.close();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the wait ends on close")
            .unwrap();
        assert!(body.is_complete());
        assert!(matches!(body.try_next_batch(), Some(Ok(None))));
    }
}
