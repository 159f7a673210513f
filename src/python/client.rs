//! Bindings for the failover engine: `FailoverClient`, `Response`,
//! `SyncResponse`, `sse_error_event`. Awaitables come from the one tokio
//! runtime of pyo3-async-runtimes; blocking calls release the GIL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use pyo3::exceptions::{PyStopAsyncIteration, PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};
use pyo3::IntoPyObjectExt;

use super::bridge;
use super::errors::class;
use super::pool::{positive_seconds, PyKeyPool};

use super::runtime::block_on;
use crate::body::{Chunks, ResponseBody};
use crate::error::{Error, ErrorKind, Exhaustion};
use crate::failover::{
    AttemptRecord, ClientOptions, Credential, FailoverClient, Request, Response,
};
use crate::headers::CallerCredential;
use crate::provider::Provider;

/// Chunks handed to Python as one `bytes`: the one copy between the socket
/// and the caller.
struct Chunk(Chunks);

impl<'py> IntoPyObject<'py> for Chunk {
    type Target = PyBytes;
    type Output = Bound<'py, PyBytes>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> PyResult<Self::Output> {
        if let [single] = self.0.as_slice() {
            return Ok(PyBytes::new(py, single));
        }
        let len = self.0.iter().map(Bytes::len).sum();
        PyBytes::new_with(py, len, |buf| {
            let mut at = 0;
            for chunk in &self.0 {
                buf[at..at + chunk.len()].copy_from_slice(chunk);
                at += chunk.len();
            }
            Ok(())
        })
    }
}

/// An awaitable whose value is already known: `await` returns it at once,
/// with no round trip through the runtime. Its own iterator, as asyncio's
/// helpers (`ensure_future`, `wait_for`, `gather`) need an awaitable's to be.
#[pyclass(module = "keyfailover", frozen)]
struct Ready(Py<PyAny>);

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<()> {
        Err(PyStopIteration::new_err((self.0.clone_ref(py),)))
    }
}

/// An awaitable taking from a response body (the next chunks, or with
/// `whole` the rest). What has arrived is taken at once; otherwise it waits on
/// the runtime, taking nothing (`ResponseBody::wait_ready`), and takes when
/// the awaiting task resumes. So a task cancelled while waiting, or after its
/// wait ended but before it ran on, has taken nothing and lost nothing: the
/// next read starts where this one would have.
#[pyclass(module = "keyfailover", frozen)]
struct Take {
    body: Arc<ResponseBody>,
    whole: bool,
}

#[pymethods]
impl Take {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The outcome (as StopIteration, or the error raised), or else the
    /// asyncio future of a wait, yielded to the task as `await` would.
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let body = &self.body;
        let taken = if self.whole {
            // Taken only when all of it is here, under one lock: a take that
            // met a wait midway would have to give back what it took.
            body.try_read_rest().map(|rest| rest.map(Some))
        } else {
            body.try_next_batch()
        };
        match taken {
            Some(Ok(Some(chunks))) => Err(PyStopIteration::new_err((Chunk(chunks),))),
            Some(Ok(None)) => Err(PyStopAsyncIteration::new_err(())),
            Some(Err(err)) => Err(err.into()),
            None => {
                let (body, whole) = (body.clone(), self.whole);
                let wait = bridge::spawn(py, async move {
                    body.wait_ready(whole).await;
                    Ok(())
                })?;
                wait.setattr(pyo3::intern!(py, "_asyncio_future_blocking"), true)?;
                Ok(wait)
            }
        }
    }
}

fn extract_body(body: Option<&Bound<'_, PyAny>>) -> PyResult<Bytes> {
    let Some(body) = body.filter(|b| !b.is_none()) else {
        return Ok(Bytes::new());
    };
    if let Ok(b) = body.cast::<PyBytes>() {
        Ok(Bytes::copy_from_slice(b.as_bytes()))
    } else if let Ok(b) = body.cast::<PyByteArray>() {
        Ok(Bytes::from(b.to_vec()))
    } else if let Ok(s) = body.cast::<PyString>() {
        Ok(Bytes::copy_from_slice(s.to_str()?.as_bytes()))
    } else {
        Err(PyTypeError::new_err(format!(
            "body must be bytes, bytearray or str, not {}",
            body.get_type().name()?
        )))
    }
}

fn build_request(
    client: &FailoverClient,
    method: &str,
    path: &str,
    headers: Option<&Bound<'_, PyAny>>,
    body: Option<&Bound<'_, PyAny>>,
    credential: Option<&str>,
) -> PyResult<Request> {
    // The caller's method and header names, echoed by an error, may be a
    // key in the wrong place.
    let headers = crate::headers::header_map(super::rules::extract_pairs(headers)?)
        .map_err(|e| client.redacted(e))?;
    let mut request =
        Request::new(method, path, headers, extract_body(body)?).map_err(|e| client.redacted(e))?;
    if let Some(credential) = credential {
        if credential.trim().is_empty() {
            return Err(Error::BadRequest(
                "the credential is empty: pass the caller's key, or None to use the pool".into(),
            )
            .into());
        }
        let (name, value) = client.caller_key_header(path, credential);
        let value = HeaderValue::from_str(&value).map_err(|_| {
            Error::BadRequest("the credential holds bytes a header cannot carry".into())
        })?;
        request.credential = Credential::Caller(CallerCredential {
            header: HeaderName::from_static(name),
            value,
        });
    }
    Ok(request)
}

/// Sends requests upstream through a key pool, failing over across its keys.
#[pyclass(name = "FailoverClient", module = "keyfailover", frozen)]
pub struct PyFailoverClient {
    pub(crate) client: Arc<FailoverClient>,
    pool: Py<PyKeyPool>,
}

#[pymethods]
impl PyFailoverClient {
    #[new]
    #[pyo3(signature = (pool, *, base_url, provider = "anthropic", timeout = 600.0, connect_timeout = 10.0, http2 = true, name = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        pool: Bound<'_, PyKeyPool>,
        base_url: String,
        provider: &str,
        timeout: f64,
        connect_timeout: f64,
        http2: bool,
        name: Option<String>,
    ) -> PyResult<Self> {
        let options = ClientOptions {
            base_url,
            provider: provider.parse()?,
            timeout: positive_seconds("timeout", timeout)?,
            connect_timeout: positive_seconds("connect_timeout", connect_timeout)?,
            http2,
            name,
        };
        let client = FailoverClient::new(pool.get().pool.clone(), options)?;
        Ok(Self {
            client: Arc::new(client),
            pool: pool.unbind(),
        })
    }

    /// Sends a request; awaits the response head (after any failover).
    /// `credential`: the caller's own key (BYOK), sent once in the
    /// provider's auth header; None (the default) uses the pool.
    #[pyo3(signature = (method, path, *, headers = None, body = None, credential = None))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        path: &str,
        headers: Option<&Bound<'py, PyAny>>,
        body: Option<&Bound<'py, PyAny>>,
        credential: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = build_request(&self.client, method, path, headers, body, credential)?;
        let client = self.client.clone();
        bridge::spawn(py, async move {
            Ok(PyResponse::from(client.request(request).await?))
        })
    }

    /// The blocking twin of `request`, for sync code: the GIL is released
    /// while the request runs on the same runtime; Ctrl-C interrupts it.
    #[pyo3(signature = (method, path, *, headers = None, body = None, credential = None))]
    fn request_sync(
        &self,
        py: Python<'_>,
        method: &str,
        path: &str,
        headers: Option<&Bound<'_, PyAny>>,
        body: Option<&Bound<'_, PyAny>>,
        credential: Option<&str>,
    ) -> PyResult<PySyncResponse> {
        let request = build_request(&self.client, method, path, headers, body, credential)?;
        let client = self.client.clone();
        let response = block_on(py, async move { client.request(request).await })??;
        Ok(PySyncResponse(Meta::from(response)))
    }

    /// Ends every request in flight and refuses new ones (503): for a
    /// server's shutdown once its grace period is over. Streams end with an
    /// SSE error event.
    fn shutdown(&self) {
        self.client.shutdown();
    }

    #[getter]
    fn pool(&self, py: Python<'_>) -> Py<PyKeyPool> {
        self.pool.clone_ref(py)
    }

    #[getter]
    fn provider(&self) -> &'static str {
        self.client.provider().as_str()
    }

    #[getter]
    fn base_url(&self) -> &str {
        self.client.base_url()
    }

    /// Counters since the client was created: requests, attempts, failovers
    /// by reason, exhaustions, upstream errors.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.client.stats();
        let out = PyDict::new(py);
        for (name, value) in [
            ("requests", s.requests),
            ("attempts", s.attempts),
            ("byok", s.byok),
            ("rate_limited", s.rate_limited),
            ("quota_exhausted", s.quota_exhausted),
            ("revoked", s.revoked),
            ("unreachable", s.unreachable),
            ("exhausted_transient", s.exhausted_transient),
            ("exhausted_permanent", s.exhausted_permanent),
            ("upstream_errors", s.upstream_errors),
        ] {
            out.set_item(name, value)?;
        }
        Ok(out)
    }

    #[getter]
    fn timeout(&self) -> f64 {
        self.client.timeout().as_secs_f64()
    }

    /// The pool's name in logs and metrics (the `pool` label).
    #[getter]
    fn name(&self) -> &str {
        self.client.name()
    }

    /// The pool's metrics in the Prometheus text exposition format.
    fn metrics(&self, py: Python<'_>) -> String {
        let client = self.client.clone();
        py.detach(|| client.metrics())
    }

    fn __repr__(&self) -> String {
        format!(
            "FailoverClient(base_url={:?}, provider={:?}, keys={})",
            self.client.base_url(),
            self.client.provider().as_str(),
            self.client.pool().len()
        )
    }
}

/// What both response classes share: the head and the body handle.
struct Meta {
    status: u16,
    headers: HeaderMap,
    attempts: u32,
    key_label: Option<Arc<str>>,
    exhausted: bool,
    attempt_log: Vec<AttemptRecord>,
    body: Arc<ResponseBody>,
}

impl From<Response> for Meta {
    fn from(r: Response) -> Self {
        Self {
            status: r.status,
            headers: r.headers,
            attempts: r.attempts,
            key_label: r.key_label,
            exhausted: r.exhausted,
            attempt_log: r.attempt_log,
            body: Arc::new(r.body),
        }
    }
}

impl Meta {
    fn repr(&self, class: &str) -> String {
        let label = match &self.key_label {
            Some(label) => format!("'{label}'"),
            None => "None".into(),
        };
        let exhausted = if self.exhausted { " exhausted" } else { "" };
        format!(
            "<{class} [{}] attempts={} key_label={label}{exhausted}>",
            self.status, self.attempts
        )
    }
}

/// The `#[pymethods]` of a response class: the getters both share, then its own.
macro_rules! response_methods {
    ($ty:ty, { $($own:tt)* }) => {
        #[pymethods]
        impl $ty {
            $($own)*

            #[getter]
            fn status(&self) -> u16 {
                self.0.status
            }

            /// (name, value) pairs; names lower-case, hop-by-hop headers
            /// removed, values decoded as Latin-1 (so no byte is lost).
            #[getter]
            fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
                headers_list(py, &self.0.headers, |py, value| {
                    let text: String = value.iter().map(|&b| char::from(b)).collect();
                    PyString::new(py, &text).into_any()
                })
            }

            /// The same pairs as bytes, exactly as upstream sent them.
            #[getter]
            fn raw_headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
                headers_list(py, &self.0.headers, |py, value| PyBytes::new(py, value).into_any())
            }

            #[getter]
            fn attempts(&self) -> u32 {
                self.0.attempts
            }

            #[getter]
            fn key_label(&self) -> Option<&str> {
                self.0.key_label.as_deref()
            }

            #[getter]
            fn exhausted(&self) -> bool {
                self.0.exhausted
            }

            /// Each upstream attempt: {"key", "status", "reason", "started", "seconds"}
            /// (key label or None for BYOK; status None when unreachable; reason
            /// for moving on, or None; start as Unix seconds; seconds to the head).
            #[getter]
            fn attempt_log<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
                attempt_log(py, &self.0.attempt_log)
            }

            #[getter]
            fn closed(&self) -> bool {
                self.0.body.is_closed()
            }
        }
    };
}

fn attempt_log<'py>(py: Python<'py>, log: &[AttemptRecord]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    let now = (std::time::SystemTime::now(), std::time::Instant::now());
    for attempt in log {
        let entry = PyDict::new(py);
        entry.set_item("key", attempt.key_label.as_deref())?;
        entry.set_item("status", attempt.status)?;
        entry.set_item("reason", attempt.reason.map(|r| r.as_str()))?;
        entry.set_item("started", attempt.started_unix_nanos(now) as f64 / 1e9)?;
        entry.set_item("seconds", attempt.seconds)?;
        list.append(entry)?;
    }
    Ok(list)
}

/// (name, value) tuples, the name as `str` and bytes, the value as `value` makes it.
fn headers_list<'py>(
    py: Python<'py>,
    headers: &HeaderMap,
    value: impl Fn(Python<'py>, &[u8]) -> Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyList>> {
    PyList::new(
        py,
        headers.iter().map(|(n, v)| {
            PyTuple::new(
                py,
                [value(py, n.as_str().as_bytes()), value(py, v.as_bytes())],
            )
            .expect("a tuple of two")
        }),
    )
}

/// A response to `FailoverClient.request`: read it, or iterate it with
/// `async for`; close it (or use `async with`) to drop the connection early.
#[pyclass(name = "Response", module = "keyfailover", frozen)]
pub struct PyResponse(Meta);

/// A response to `FailoverClient.request_sync`.
#[pyclass(name = "SyncResponse", module = "keyfailover", frozen)]
pub struct PySyncResponse(Meta);

impl From<Response> for PyResponse {
    fn from(r: Response) -> Self {
        Self(Meta::from(r))
    }
}

response_methods!(PyResponse, {
    /// The rest of the body.
    fn read(&self) -> Take {
        Take {
            body: self.0.body.clone(),
            whole: true,
        }
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The next chunks; the end and an error too are raised by the
    /// awaitable, not by this call (`anext(response, default)` relies on it).
    fn __anext__(&self) -> Take {
        Take {
            body: self.0.body.clone(),
            whole: false,
        }
    }

    /// Closes the response and its upstream connection at once.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.0.body.close();
        Ready(py.None()).into_bound_py_any(py)
    }

    fn __aenter__<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        Ready(slf.into_any().unbind()).into_bound_py_any(py)
    }

    #[pyo3(signature = (*_args))]
    fn __aexit__<'py>(
        &self,
        py: Python<'py>,
        _args: &Bound<'py, pyo3::types::PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.aclose(py)
    }

    fn __repr__(&self) -> String {
        self.0.repr("Response")
    }
});

response_methods!(PySyncResponse, {
    /// The rest of the body (blocking; the GIL is released).
    fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let body = self.0.body.clone();
        let bytes = block_on(py, async move { body.read_all().await })??;
        Ok(PyBytes::new(py, &bytes))
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let body = self.0.body.clone();
        match block_on(py, async move { body.next_batch().await })?? {
            Some(chunks) => Chunk(chunks).into_pyobject(py),
            None => Err(PyStopIteration::new_err(())),
        }
    }

    fn close(&self) {
        self.0.body.close();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close();
    }

    fn __repr__(&self) -> String {
        self.0.repr("SyncResponse")
    }
});

/// The answer a Python exception stands for, for `sse_error_event`.
fn exception_answer(error: &Bound<'_, PyAny>) -> PyResult<(ErrorKind, String)> {
    let py = error.py();
    let message = || -> PyResult<String> { Ok(error.str()?.to_str()?.to_owned()) };
    let err = if error.is_instance(&class(py, "TransientExhaustion")?)? {
        let retry_after: f64 = error.getattr("retry_after")?.extract()?;
        let retry_after =
            Duration::try_from_secs_f64(retry_after.max(0.0)).unwrap_or(Duration::ZERO);
        if error.is_instance(&class(py, "UnreachableExhaustion")?)? {
            Exhaustion::Unreachable { retry_after }.into()
        } else {
            Exhaustion::Transient { retry_after }.into()
        }
    } else if error.is_instance(&class(py, "PermanentExhaustion")?)? {
        Exhaustion::Permanent.into()
    } else if error.is_instance(&class(py, "ConfigError")?)?
        || error.is_instance(&class(py, "InvalidRequestError")?)?
    {
        Error::BadRequest(message()?)
    } else if error.is_instance(&class(py, "KeyfailoverError")?)? {
        Error::Upstream(message()?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "sse_error_event takes an error type and a message, or a KeyfailoverError; got {}",
            error.get_type().name()?
        )));
    };
    Ok(err.answer())
}

fn error_kind(error_type: &str) -> PyResult<ErrorKind> {
    ErrorKind::from_type_name(error_type).ok_or_else(|| {
        // Several kinds share a type name (api_error): each named once.
        let mut known: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.type_name()).collect();
        known.sort_unstable();
        known.dedup();
        Error::Config(format!(
            "unknown error type {error_type:?}: expected one of {}",
            known.join(", ")
        ))
        .into()
    })
}

/// An error response of keyfailover's own: (status, JSON body in the
/// provider's envelope), for an error type such as "request_too_large".
#[pyfunction]
#[pyo3(signature = (error_type, message, *, provider = "anthropic"))]
pub fn error_response<'py>(
    py: Python<'py>,
    error_type: &str,
    message: &str,
    provider: &str,
) -> PyResult<(u16, Bound<'py, PyBytes>)> {
    let provider: Provider = provider.parse()?;
    let kind = error_kind(error_type)?;
    Ok((
        kind.status(),
        PyBytes::new(py, &provider.error_body(kind, message)),
    ))
}

/// One SSE error event in the provider's shape: for an error type and
/// message (as `error_response`), or for a `KeyfailoverError` (such as the
/// `TransientExhaustion` of a second upstream call in a chained stream).
#[pyfunction]
#[pyo3(signature = (error, message = None, *, provider = "anthropic"))]
pub fn sse_error_event<'py>(
    py: Python<'py>,
    error: &Bound<'py, PyAny>,
    message: Option<&str>,
    provider: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let provider: Provider = provider.parse()?;
    let (kind, message) = match (error.cast::<PyString>(), message) {
        (Ok(error_type), Some(message)) => (error_kind(error_type.to_str()?)?, message.to_owned()),
        (Ok(_), None) => {
            return Err(PyTypeError::new_err(
                "sse_error_event(error_type, message): the message is missing",
            ))
        }
        (Err(_), None) => exception_answer(error)?,
        (Err(_), Some(_)) => {
            return Err(PyTypeError::new_err(
                "sse_error_event takes a message only with an error type (a str)",
            ))
        }
    };
    Ok(PyBytes::new(py, &provider.sse_error_event(kind, &message)))
}
