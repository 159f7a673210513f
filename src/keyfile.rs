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
//!
//! Settings of a key follow it on its line, separated by spaces:
//! `group=NAME` (the organization or project whose limits it shares) and
//! `base_url=URL` (its own endpoint):
//!
//! ```text
//! east=sk-1 group=org-1 base_url=https://east.example.com
//! ```

use crate::error::{Error, Result};
use crate::pool::KeySpec;

/// Keys as a file gives them: all labelled, or all bare (labelled `key-0`,
/// `key-1`, ... by the pool), each with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    Bare(Vec<Entry>),
    Labelled(Vec<(String, Entry)>),
}

/// A key with the settings its line gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    pub group: Option<String>,
    pub base_url: Option<String>,
}

impl Keys {
    /// The keys as pool specs, labelled as the pool would label them.
    pub fn into_specs(self) -> Vec<KeySpec> {
        let spec = |label: String, e: Entry| KeySpec {
            label,
            value: e.value,
            group: e.group,
            base_url: e.base_url,
        };
        match self {
            Keys::Bare(entries) => entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| spec(format!("key-{i}"), e))
                .collect(),
            Keys::Labelled(entries) => entries.into_iter().map(|(l, e)| spec(l, e)).collect(),
        }
    }
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
    let mut bare: Vec<(usize, Entry)> = Vec::new();
    let mut labelled: Vec<(usize, String, Entry)> = Vec::new();
    for (i, entry) in text.split(|c| separators.contains(&c)).enumerate() {
        let n = i + 1;
        let entry = entry.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        let at = |message: String| Error::Config(format!("{source}, {unit} {n}: {message}"));
        let mut words = entry.split_whitespace();
        let first = words.next().unwrap_or_default();
        let mut settings = Entry::default();
        for word in words {
            match word.split_once('=') {
                Some(("group", value)) if !value.is_empty() => {
                    settings.group = Some(value.to_owned())
                }
                Some(("base_url", value)) if !value.is_empty() => {
                    settings.base_url = Some(value.to_owned())
                }
                Some((name @ ("group" | "base_url"), _)) => {
                    return Err(at(format!("{name}= needs a value")))
                }
                // `my key=sk-...`: a first word too short to be a key is a
                // label cut by a space (and, being no key, may be named).
                Some(_) if !first.contains('=') && first.chars().count() < 8 => {
                    return Err(at(format!(
                        "{first:?} is too short for a key: a label with a space in it? Labels \
                         are letters, digits, `_`, `.` and `-` (label=key)"
                    )))
                }
                _ => {
                    return Err(at(format!(
                        "unexpected {} after the key: settings are group=NAME and base_url=URL",
                        unexpected(word)
                    )))
                }
            }
        }
        match split_label(first) {
            Some((label, key)) => {
                // `sk-ant-...=prod`: label and key swapped (named by line, as
                // the label is the key then).
                if key.chars().count() < 8 {
                    return Err(at(format!(
                        "the key after `=` is {} characters long; keys are 8 or more (a \
                         label and its key swapped? label=key)",
                        key.chars().count()
                    )));
                }
                if let Some((m, ..)) = labelled.iter().find(|(_, l, _)| l == label) {
                    return Err(at(format!(
                        "duplicate label {label:?} (also on {unit} {m})"
                    )));
                }
                settings.value = key.to_owned();
                labelled.push((n, label.to_owned(), settings));
            }
            None => {
                // `name=` alone could be a base64 key with its padding, but
                // not one shorter than any key: a label whose key is missing.
                if let Some((name, _)) = first.split_once('=').filter(|(name, padding)| {
                    name.len() < 8
                        && split_label(&format!("{name}=k")).is_some()
                        && padding.bytes().all(|b| b == b'=')
                }) {
                    return Err(at(format!(
                        "a label with no key after its `=` ({name:?}; a key is 8 \
                         characters or more)"
                    )));
                }
                // `prod:east=sk-...`: a label of characters labels cannot
                // have, or a key holding `=`, which must be labelled.
                if first.trim_end_matches('=').contains('=') {
                    return Err(at(
                        "a label of other characters than letters, digits, `_`, \
                         `.` and `-`, or a key holding `=` (which must be labelled: label=key)"
                            .to_owned(),
                    ));
                }
                settings.value = first.to_owned();
                bare.push((n, settings));
            }
        }
        if let (Some((b, _)), Some((l, ..))) = (bare.first(), labelled.first()) {
            // Among labelled keys, `name=` is a key left out (alone, it
            // could be a base64 key with its padding).
            // Not named: it may as well be a key.
            if first
                .strip_suffix('=')
                .is_some_and(|l| n == *b && split_label(&format!("{l}=k")).is_some())
            {
                return Err(at(
                    "a label with no key after its `=`, or a bare key among labelled ones"
                        .to_owned(),
                ));
            }
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
        (false, _) => Ok(Keys::Bare(bare.into_iter().map(|(_, e)| e).collect())),
        (_, false) => Ok(Keys::Labelled(
            labelled.into_iter().map(|(_, l, e)| (l, e)).collect(),
        )),
    }
}

/// `text` cut short, for messages (a word after a key might be a key too).
/// Names an unexpected word in an error: a setting by its name, anything
/// else not at all (it may be part of a key cut by a space).
fn unexpected(word: &str) -> String {
    match word.split_once('=') {
        Some((name, _))
            if (1..=20).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
        {
            format!("setting {name:?}")
        }
        _ => "text".to_owned(),
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
    const PADDED: &str = "c2stTEVBS0NBTkFSWXBhZA=";

    fn lines(text: &str) -> Result<Keys> {
        parse(text, "keys file 'k.txt'", &['\n'])
    }

    #[test]
    fn formats() {
        let e = |v: &str| Entry {
            value: v.into(),
            ..Entry::default()
        };
        assert_eq!(
            lines(&format!("{A}\n{B}\n")).unwrap(),
            Keys::Bare(vec![e(A), e(B)])
        );
        assert_eq!(
            lines(&format!("# team\n\nprod={A}\nbackup={B}\n")).unwrap(),
            Keys::Labelled(vec![("prod".into(), e(A)), ("backup".into(), e(B))])
        );
        assert_eq!(
            lines("c2stYmFzZTY0a2V5==\nc2stb3RoZXI=\n").unwrap(),
            Keys::Bare(vec![e("c2stYmFzZTY0a2V5=="), e("c2stb3RoZXI=")])
        );
        // A label of other characters is not a bare key holding `=`.
        for bad in ["prod:east", "\u{fc}", "a/b"] {
            let err = lines(&format!("{bad}={A}\n")).unwrap_err().to_string();
            assert!(
                err.contains("line 1: a label of other characters"),
                "{bad:?}: {err}"
            );
            assert!(!err.contains(A), "{err}");
        }
        // Too short to be a key with its padding: a label whose key is missing
        // (a file caught half written), with or without other lines.
        for text in ["c=\n", "prod=\n", "a=\nb=\n", "c==\n"] {
            let err = lines(text).unwrap_err().to_string();
            assert!(
                err.contains("line 1: a label with no key"),
                "{text:?}: {err}"
            );
        }
        assert_eq!(
            parse(&format!("{A}, {B}\n"), "x", &[',', '\n']).unwrap(),
            Keys::Bare(vec![e(A), e(B)])
        );
        let with_settings = lines(&format!(
            "east={A} group=org-1 base_url=https://east.example.com\nwest={B}  group=org-1\n"
        ))
        .unwrap();
        let specs = with_settings.into_specs();
        assert_eq!(specs[0].group.as_deref(), Some("org-1"));
        assert_eq!(
            specs[0].base_url.as_deref(),
            Some("https://east.example.com")
        );
        assert_eq!(
            (specs[1].label.as_str(), specs[1].base_url.as_deref()),
            ("west", None)
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
                "keys file 'k.txt', line 1: unexpected text after the key",
            ),
            (
                format!("{A} {B}\n"),
                "keys file 'k.txt', line 1: unexpected text after the key",
            ),
            (
                format!("{A} gruop=x\n"),
                "keys file 'k.txt', line 1: unexpected setting \"gruop\" after the key",
            ),
            (
                format!("{A} group=\n"),
                "keys file 'k.txt', line 1: group= needs a value",
            ),
            (
                format!("{A}=prod\n"),
                "keys file 'k.txt', line 1: the key after `=` is 4 characters long",
            ),
            (
                format!("my key={A}\n"),
                "keys file 'k.txt', line 1: \"my\" is too short for a key: a label with a \
                 space in it?",
            ),
            (
                format!("a={A}\nb=\n"),
                "keys file 'k.txt', line 2: a label with no key after its `=`",
            ),
            (
                // A bare base64 key with its padding, among labelled ones.
                format!("a={A}\n{PADDED}\n"),
                "keys file 'k.txt', line 2: a label with no key after its `=`",
            ),
            (
                "# only comments\n\n".to_owned(),
                "keys file 'k.txt' holds no keys",
            ),
        ];
        for (text, expected) in cases {
            let message = lines(&text).unwrap_err().to_string();
            assert!(message.starts_with(expected), "{message}");
            for secret in [A, B, PADDED, &PADDED[..PADDED.len() - 1], &B[6..]] {
                assert!(!message.contains(secret), "{message}");
            }
        }
        let message = parse("a=xxxxxxxx,y", "environment variable K", &[',', '\n'])
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("environment variable K, entry 2:"),
            "{message}"
        );
    }
}
