//! Bindings for the marking rules: `parse_retry_after`, `mark_key_on_response`.

use std::time::SystemTime;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::pool::PyKey;
use crate::failover;
use crate::retry_after::{self, unix_time};
use crate::verdict;

/// A header name or value given as `str` or `bytes` (as ASGI servers do).
fn header_part(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = obj.cast::<PyString>() {
        Ok(s.to_str()?.as_bytes().to_vec())
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else {
        Err(PyTypeError::new_err(
            "header names and values must be str or bytes",
        ))
    }
}

/// Headers from a mapping or an iterable of (name, value) pairs; None is empty.
pub(crate) fn extract_headers(
    headers: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(String, Vec<u8>)>> {
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
            let name = String::from_utf8_lossy(&header_part(&name)?).into_owned();
            Ok((name, header_part(&value)?))
        })
        .collect()
}

pub(crate) fn borrowed(headers: &[(String, Vec<u8>)]) -> impl Iterator<Item = (&str, &[u8])> {
    headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
}

fn now_or_wall_clock(now: Option<f64>) -> SystemTime {
    now.map_or_else(SystemTime::now, unix_time)
}

/// The cooldown in seconds that response headers ask for, or None.
#[pyfunction]
#[pyo3(signature = (headers, *, now = None))]
pub fn parse_retry_after(headers: &Bound<'_, PyAny>, now: Option<f64>) -> PyResult<Option<f64>> {
    let headers = extract_headers(Some(headers))?;
    Ok(
        retry_after::parse_retry_after(borrowed(&headers), now_or_wall_clock(now))
            .map(|d| d.as_secs_f64()),
    )
}

/// Marks `key` from an upstream response; True when the failure is
/// key-specific and the next key should be tried.
#[pyfunction]
#[pyo3(signature = (key, status, headers = None, body = None))]
pub fn mark_key_on_response(
    key: &PyKey,
    status: u16,
    headers: Option<&Bound<'_, PyAny>>,
    body: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let headers = extract_headers(headers)?;
    let body = body.filter(|b| !b.is_none()).map(header_part).transpose()?;
    Ok(verdict::mark_key_on_response(
        &key.key,
        status,
        borrowed(&headers),
        body.as_deref(),
        SystemTime::now(),
    ))
}

/// The caller's own credential among request headers: a non-blank
/// `x-api-key`, else an `Authorization: Bearer` token; None when neither.
/// The same rule the client uses to decide on BYOK.
#[pyfunction]
pub fn caller_credential(headers: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    let headers = extract_headers(Some(headers))?;
    Ok(failover::caller_credential(borrowed(&headers))
        .map(|credential| String::from_utf8_lossy(credential.token()).into_owned()))
}
