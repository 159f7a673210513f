//! Server-sent events on bytes: finding event boundaries, reading one event's
//! fields, and relaying a stream in whole events.
//!
//! Everything works on bytes and only decodes whole field values, so a
//! multi-byte character split across network chunks is never corrupted.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// A held partial event larger than this is relayed anyway: the stream is
/// evidently not framed as SSE, and memory stays bounded.
const MAX_HELD: usize = 1 << 20;

/// Terminated lines of `buf`: (content range, offset just past the terminator).
/// A trailing `\r` is not taken as a terminator yet: it may be half of `\r\n`.
fn lines(buf: &[u8]) -> impl Iterator<Item = (Range<usize>, usize)> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let rest = &buf[pos..];
        let i = memchr::memchr2(b'\n', b'\r', rest)?;
        let next = match (rest[i], rest.get(i + 1)) {
            (b'\r', None) => return None,
            (b'\r', Some(b'\n')) => pos + i + 2,
            _ => pos + i + 1,
        };
        let line = pos..pos + i;
        pos = next;
        Some((line, next))
    })
}

/// The complete event blocks of `buf`, each with its terminating blank line.
pub fn events(buf: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    lines(buf).filter_map(move |(line, next)| {
        if line.is_empty() {
            let block = start..next;
            start = next;
            Some(block)
        } else {
            None
        }
    })
}

/// Where the last complete event of `buf` ends (as `events(buf).last()`
/// does), found from the end: what a chunk holds after its last blank line
/// is all that needs a look, not every line before it.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    // A trailing CR is not a line ending yet: it may be half of a CRLF.
    let mut end = buf.len() - usize::from(buf.last() == Some(&b'\r'));
    loop {
        // The last byte of a line ending: a CRLF, a lone LF or a lone CR (a
        // CR followed by LF always pairs with it, read either way).
        let last = memchr::memrchr2(b'\n', b'\r', &buf[..end])?;
        let start = if buf[last] == b'\n' && last > 0 && buf[last - 1] == b'\r' {
            last - 1
        } else {
            last
        };
        // It ends a blank line when another line ending (or the start of
        // the buffer, the start of a line) comes right before it.
        if start == 0 || matches!(buf[start - 1], b'\n' | b'\r') {
            return Some(last + 1);
        }
        end = start;
    }
}

/// One event's fields, borrowed from its block where they can be: a stream
/// is checked event by event for its final one, so reading an event copies
/// nothing unless its data spans several lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event:` field, if any.
    pub name: Option<Cow<'a, str>>,
    /// The `data:` lines joined with `\n`.
    pub data: Cow<'a, [u8]>,
    /// False for a block of comments only (such as `: ping`).
    pub has_fields: bool,
}

/// Reads one event block.
pub fn parse_event(block: &[u8]) -> Event<'_> {
    let mut event = Event::default();
    let mut data_lines = 0;
    for (line, _) in lines(block) {
        let line = &block[line];
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        event.has_fields = true;
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (
                &line[..i],
                line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..]),
            ),
            None => (line, &b""[..]),
        };
        match field {
            b"event" => event.name = Some(String::from_utf8_lossy(value)),
            b"data" => {
                event.data = if data_lines == 0 {
                    Cow::Borrowed(value)
                } else {
                    let mut joined = std::mem::take(&mut event.data).into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                    Cow::Owned(joined)
                };
                data_lines += 1;
            }
            _ => {}
        }
    }
    event
}

/// The first event with fields among the complete events of `buf`: its
/// `data`, or None when no such event is complete yet. (What that event
/// means for the key is `verdict::first_event_verdict`'s call.)
pub fn first_event_data(buf: &[u8]) -> Option<Vec<u8>> {
    events(buf)
        .map(|block| parse_event(&buf[block]))
        .find(|event| event.has_fields)
        .map(|event| event.data.into_owned())
}

/// Cuts a byte stream into runs of whole events. Chunks that end on an event
/// boundary pass through without a copy; only a partial event at the end of a
/// chunk is held back (and copied once) until the rest of it arrives.
#[derive(Debug, Default)]
pub struct Framer {
    held: Bytes,
}

impl Framer {
    /// Adds a chunk; returns the whole events now available, if any.
    pub fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        let mut buf = if self.held.is_empty() {
            chunk
        } else {
            let mut joined = BytesMut::with_capacity(self.held.len() + chunk.len());
            joined.extend_from_slice(&self.held);
            joined.extend_from_slice(&chunk);
            joined.freeze()
        };
        let end = match last_event_end(&buf) {
            Some(end) => end,
            None if buf.len() > MAX_HELD => buf.len(),
            None => 0,
        };
        let out = buf.split_to(end);
        self.held = buf;
        (!out.is_empty()).then_some(out)
    }

    /// True when nothing is held: what was relayed ended on an event boundary.
    #[cfg(test)]
    fn at_boundary(&self) -> bool {
        self.held.is_empty()
    }

    /// Whatever partial event is held, at the end of the stream.
    pub fn take_held(&mut self) -> Bytes {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(buf: &str) -> Vec<&str> {
        events(buf.as_bytes()).map(|r| &buf[r]).collect()
    }

    #[test]
    fn finds_event_boundaries_with_any_line_ending() {
        assert_eq!(
            blocks("data: a\n\ndata: b\n\ndata: c"),
            ["data: a\n\n", "data: b\n\n"]
        );
        assert_eq!(
            blocks("data: a\r\n\r\nevent: x\r\ndata: b\r\n\r\n"),
            ["data: a\r\n\r\n", "event: x\r\ndata: b\r\n\r\n"]
        );
        assert_eq!(blocks("data: a\r\rdata: b\r"), ["data: a\r\r"]);
        assert_eq!(
            blocks("data: a\r\n\r"),
            Vec::<&str>::new(),
            "a trailing CR may be half a CRLF"
        );
        assert_eq!(blocks(""), Vec::<&str>::new());
    }

    proptest::proptest! {
        /// Searched from the end, the last event ends where reading every
        /// line from the start says it does, for any mix of line endings.
        #[test]
        fn the_last_event_end_is_found_from_the_end(
            buf in proptest::collection::vec(
                proptest::sample::select(vec![b'a', b':', b' ', b'\n', b'\r']),
                0..40,
            ),
        ) {
            proptest::prop_assert_eq!(
                last_event_end(&buf),
                events(&buf).last().map(|block| block.end)
            );
        }
    }

    #[test]
    fn parses_fields() {
        let event = parse_event(b"event: error\ndata: {\"a\":\ndata:1}\n: comment\nid: 7\n\n");
        assert_eq!(event.name.as_deref(), Some("error"));
        assert_eq!(&*event.data, b"{\"a\":\n1}");
        assert!(event.has_fields);
        assert!(!parse_event(b": ping\n\n").has_fields);
        assert_eq!(&*parse_event(b"data\n\n").data, b"");
        // One data line is read in place; several are joined into a copy.
        assert!(matches!(
            parse_event(b"data: x\n\n").data,
            Cow::Borrowed(b"x")
        ));
        assert!(matches!(
            parse_event(b"data: x\ndata: y\n\n").data,
            Cow::Owned(_)
        ));
    }

    #[test]
    fn first_event_with_fields() {
        let anthropic_429 = b"event: error\ndata: {\"type\":\"error\"}\n\n";
        assert_eq!(
            first_event_data(anthropic_429).as_deref(),
            Some(&b"{\"type\":\"error\"}"[..])
        );
        assert_eq!(
            first_event_data(b": keepalive\n\ndata: x\n\n").as_deref(),
            Some(&b"x"[..]),
            "comment blocks are skipped"
        );
        assert_eq!(
            first_event_data(b": ping\n\nevent: message_start\ndata: {\"ty"),
            None
        );
    }

    #[test]
    fn framer_relays_whole_events_without_copying_aligned_chunks() {
        let mut framer = Framer::default();
        let chunk = Bytes::from_static(b"data: 1\n\ndata: 2\n\n");
        let out = framer.push(chunk.clone()).unwrap();
        assert_eq!(
            out.as_ptr(),
            chunk.as_ptr(),
            "aligned chunk passed through as is"
        );
        assert!(framer.at_boundary());

        assert_eq!(
            framer
                .push(Bytes::from_static(b"data: 3\n\ndata: \xe2\x82"))
                .unwrap(),
            &b"data: 3\n\n"[..]
        );
        assert!(!framer.at_boundary());
        assert_eq!(framer.push(Bytes::from_static(b"\xac\n")), None);
        assert_eq!(
            framer.push(Bytes::from_static(b"\n")).unwrap(),
            "data: €\n\n".as_bytes()
        );
        assert!(framer.at_boundary());
        framer.push(Bytes::from_static(b"data: tail"));
        assert_eq!(framer.take_held(), &b"data: tail"[..]);
    }

    #[test]
    fn framer_bounds_what_it_holds() {
        let mut framer = Framer::default();
        let big = Bytes::from(vec![b'x'; MAX_HELD + 1]);
        assert_eq!(framer.push(big).unwrap().len(), MAX_HELD + 1);
        assert!(framer.at_boundary());
    }
}
