//! Bindings for the marking rules: `parse_retry_after`, `mark_key_on_response`.

use std::time::SystemTime;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use pyo3::IntoPyObjectExt;

use http::header::HeaderMap;

use super::pool::{KeyRef, PyKey};
use crate::headers;
use crate::keyfile;
use crate::retry_after::{self, unix_time};
use crate::verdict;

/// A header name or value given as `str` or `bytes` (as ASGI servers do).
fn header_part(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = obj.cast::<PyString>() {
        let text = super::pool::utf8(s, "a header").map_err(crate::error::Error::BadRequest)?;
        Ok(text.as_bytes().to_vec())
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else {
        Err(PyTypeError::new_err(
            "header names and values must be str or bytes",
        ))
    }
}

/// (name, value) byte pairs from a mapping or an iterable of pairs, each
/// `str` (encoded as UTF-8) or `bytes` (taken as they are); None is empty.
pub(crate) fn extract_pairs(
    headers: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let Some(headers) = headers.filter(|h| !h.is_none()) else {
        return Ok(Vec::new());
    };
    let pairs = if headers.hasattr("items")? {
        headers.call_method0("items")?
    } else {
        headers.clone()
    };
    pairs
        .try_iter()?
        .map(|pair| {
            let (name, value): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
                pair?.extract().map_err(|_| {
                    PyTypeError::new_err(
                        "headers must be a mapping or an iterable of (name, value) pairs",
                    )
                })?;
            Ok((header_part(&name)?, header_part(&value)?))
        })
        .collect()
}

/// Headers for a request: as [`extract_pairs`], validated as HTTP headers.
pub(crate) fn extract_headers(headers: Option<&Bound<'_, PyAny>>) -> PyResult<HeaderMap> {
    Ok(headers::header_map(extract_pairs(headers)?)?)
}

/// Pairs for the rules, which take any bytes (names decoded leniently).
fn pairs(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, &[u8])> {
    headers
        .iter()
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.as_slice()))
        .collect()
}

fn now_or_wall_clock(now: Option<f64>) -> PyResult<SystemTime> {
    match now {
        None => Ok(SystemTime::now()),
        Some(now) if now.is_finite() && now >= 0.0 => Ok(unix_time(now)),
        Some(now) => Err(crate::error::Error::Config(format!(
            "now must be a Unix time in seconds (a finite number, 0 or more), not {now}"
        ))
        .into()),
    }
}

/// The cooldown in seconds that response headers ask for, or None.
#[pyfunction]
#[pyo3(signature = (headers, *, now = None))]
pub fn parse_retry_after(headers: &Bound<'_, PyAny>, now: Option<f64>) -> PyResult<Option<f64>> {
    let headers = extract_pairs(Some(headers))?;
    let pairs = pairs(&headers);
    Ok(retry_after::parse_retry_after(
        pairs.iter().map(|(n, v)| (n.as_str(), *v)),
        now_or_wall_clock(now)?,
    )
    .map(|d| d.as_secs_f64()))
}

/// Marks `key` from an upstream response; True when the failure is
/// key-specific and the next key should be tried.
#[pyfunction]
#[pyo3(signature = (key, status, headers = None, body = None))]
pub fn mark_key_on_response(
    key: &PyKey,
    status: i64,
    headers: Option<&Bound<'_, PyAny>>,
    body: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .ok_or_else(|| {
            crate::error::Error::Config(format!(
                "status must be an HTTP status code (100 to 599), not {status}"
            ))
        })?;
    let headers = extract_pairs(headers)?;
    let pairs = pairs(&headers);
    let body = body.filter(|b| !b.is_none()).map(header_part).transpose()?;
    Ok(verdict::mark_key_on_response(
        key.bound()?,
        status,
        pairs.iter().map(|(n, v)| (n.as_str(), *v)),
        body.as_deref(),
        SystemTime::now(),
    ))
}

/// Keys from the text of a keys file (or `--keys-env`): a list of bare keys
/// or a dict label -> key; `ConfigError` naming the line for bad input.
#[pyfunction]
#[pyo3(signature = (text, *, source = "keys", separators = "\n"))]
pub fn parse_keys<'py>(
    py: Python<'py>,
    text: &Bound<'py, PyString>,
    source: &str,
    separators: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let text = super::pool::utf8(text, source).map_err(crate::error::Error::Config)?;
    let separators: Vec<char> = separators.chars().collect();
    // A key with settings comes as a Key(value, group=..., base_url=...).
    let entry = |py: Python<'py>, e: keyfile::Entry| -> PyResult<Bound<'py, PyAny>> {
        if e.group.is_none() && e.base_url.is_none() {
            return e.value.into_bound_py_any(py);
        }
        let key = PyKey {
            key: KeyRef::Unbound {
                hint: crate::pool::mask(&e.value),
                value: e.value,
                group: e.group,
                base_url: e.base_url,
            },
        };
        key.into_bound_py_any(py)
    };
    Ok(match keyfile::parse(text, source, &separators)? {
        keyfile::Keys::Bare(entries) => {
            let list = PyList::empty(py);
            for e in entries {
                list.append(entry(py, e)?)?;
            }
            list.into_any()
        }
        keyfile::Keys::Labelled(pairs) => {
            let dict = pyo3::types::PyDict::new(py);
            for (label, e) in pairs {
                dict.set_item(label, entry(py, e)?)?;
            }
            dict.into_any()
        }
    })
}

/// The shared-memory file of a namespace (for operators and tests).
#[pyfunction]
pub fn _shm_path(namespace: &str) -> String {
    crate::state::shm::path_for(namespace)
        .to_string_lossy()
        .into_owned()
}
