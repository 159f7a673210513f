//! The keys file format (also `--keys-env`): one key per entry, either every
//! key labelled (`label=key`) or none; blank entries and `#` comments skipped.
//!
//! ```text
//! # team keys
//! prod=sk-ant-api03-...
//! backup=sk-ant-api03-...
//! ```
//!
//! A label is letters, digits, `_`, `.` and `-`. A key that itself contains
//! `=` (some base64 keys end in `=`) is told apart by that: `abc==` is a bare
//! key, `abc=def` a labelled one; label every key when in doubt.

use crate::error::{Error, Result};

/// Keys as a file gives them: all labelled, or all bare (labelled `key-0`,
/// `key-1`, ... by the pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    Bare(Vec<String>),
    Labelled(Vec<(String, String)>),
}

/// Parses `text`, whose entries are separated by any of `separators`;
/// `source` names it in errors ("keys file 'k.txt'"), which give the line
/// (or, for other separators, the entry) number and never a key.
pub fn parse(text: &str, source: &str, separators: &[char]) -> Result<Keys> {
    let unit = if separators == ['\n'] {
        "line"
    } else {
        "entry"
    };
    let mut bare: Vec<(usize, String)> = Vec::new();
    let mut labelled: Vec<(usize, String, String)> = Vec::new();
    for (i, entry) in text.split(|c| separators.contains(&c)).enumerate() {
        let n = i + 1;
        let entry = entry.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let at = |message: String| Error::Config(format!("{source}, {unit} {n}: {message}"));
        if entry.contains(char::is_whitespace) {
            return Err(at("a key holds no whitespace (one key per entry)".into()));
        }
        match split_label(entry) {
            Some((label, key)) => {
                if let Some((m, ..)) = labelled.iter().find(|(_, l, _)| l == label) {
                    return Err(at(format!(
                        "duplicate label {label:?} (also on {unit} {m})"
                    )));
                }
                labelled.push((n, label.to_owned(), key.to_owned()));
            }
            None => bare.push((n, entry.to_owned())),
        }
        if let (Some((b, _)), Some((l, ..))) = (bare.first(), labelled.first()) {
            let (this, other, other_kind) = if n == *b {
                ("a bare key", l, "labelled")
            } else {
                ("a labelled key", b, "bare")
            };
            return Err(at(format!(
                "{this} among {other_kind} ones ({unit} {other} is {other_kind}): \
                 label every key (label=key) or none"
            )));
        }
    }
    match (bare.is_empty(), labelled.is_empty()) {
        (true, true) => Err(Error::Config(format!("{source} holds no keys"))),
        (false, _) => Ok(Keys::Bare(bare.into_iter().map(|(_, k)| k).collect())),
        (_, false) => Ok(Keys::Labelled(
            labelled.into_iter().map(|(_, l, k)| (l, k)).collect(),
        )),
    }
}

/// `label=key` when the part before the first `=` is a label and a key
/// (not only `=` padding) follows.
fn split_label(entry: &str) -> Option<(&str, &str)> {
    let (label, key) = entry.split_once('=')?;
    let is_label = !label.is_empty()
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    (is_label && key.bytes().any(|b| b != b'=')).then_some((label, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sk-ant-api03-aaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sk-ant-api03-bbbbbbbbbbbbbbbbbbbb";

    fn lines(text: &str) -> Result<Keys> {
        parse(text, "keys file 'k.txt'", &['\n'])
    }

    #[test]
    fn formats() {
        assert_eq!(
            lines(&format!("{A}\n{B}\n")).unwrap(),
            Keys::Bare(vec![A.into(), B.into()])
        );
        assert_eq!(
            lines(&format!("# team\n\nprod={A}\nbackup={B}\n")).unwrap(),
            Keys::Labelled(vec![("prod".into(), A.into()), ("backup".into(), B.into())])
        );
        assert_eq!(
            lines("c2stYmFzZTY0a2V5==\nc2stb3RoZXI=\n").unwrap(),
            Keys::Bare(vec!["c2stYmFzZTY0a2V5==".into(), "c2stb3RoZXI=".into()])
        );
        assert_eq!(
            parse(&format!("{A}, {B}\n"), "x", &[',', '\n']).unwrap(),
            Keys::Bare(vec![A.into(), B.into()])
        );
    }

    #[test]
    fn errors_name_the_line_and_never_a_key() {
        let cases = [
            (
                format!("a={A}\n{B}\n"),
                "keys file 'k.txt', line 2: a bare key among labelled ones (line 1 is labelled)",
            ),
            (
                format!("{B}\n# x\na={A}\n"),
                "keys file 'k.txt', line 3: a labelled key among bare ones (line 1 is bare)",
            ),
            (
                format!("a={A}\na={B}\n"),
                "keys file 'k.txt', line 2: duplicate label \"a\" (also on line 1)",
            ),
            (
                format!("{A} trailing\n"),
                "keys file 'k.txt', line 1: a key holds no whitespace",
            ),
            (
                "# only comments\n\n".to_owned(),
                "keys file 'k.txt' holds no keys",
            ),
        ];
        for (text, expected) in cases {
            let message = lines(&text).unwrap_err().to_string();
            assert!(message.starts_with(expected), "{message}");
            assert!(!message.contains(A) && !message.contains(B), "{message}");
        }
        let message = parse("a=x,y", "environment variable K", &[',', '\n'])
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("environment variable K, entry 2:"),
            "{message}"
        );
    }
}
