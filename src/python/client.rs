//! Bindings for the failover engine: `FailoverClient`, `Response`,
//! `SyncResponse`, `sse_error_event`. Awaitables come from the one tokio
//! runtime of pyo3-async-runtimes; blocking calls release the GIL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyStopAsyncIteration, PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyString};
use pyo3::IntoPyObjectExt;
use pyo3_async_runtimes::tokio::get_runtime;

use super::bridge::{self, Failure};

use super::errors::class;
use super::pool::{positive_seconds, PyKeyPool};
use super::rules::extract_headers;
use crate::error::{Error, Exhaustion};
use crate::failover::{Chunks, ClientOptions, FailoverClient, Request, Response, ResponseBody};
use crate::provider::{ErrorKind, Provider};

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

/// An awaitable whose result is already known: `await` returns it at once,
/// with no round trip through the runtime.
#[pyclass(module = "keyfailover", frozen)]
struct Ready(Py<PyAny>);

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<()> {
        Err(PyStopIteration::new_err((self.0.clone_ref(py),)))
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
    method: String,
    path: String,
    headers: Option<&Bound<'_, PyAny>>,
    body: Option<&Bound<'_, PyAny>>,
) -> PyResult<Request> {
    Ok(Request {
        method,
        path,
        headers: extract_headers(headers)?,
        body: extract_body(body)?,
    })
}

/// Sends requests upstream through a key pool, failing over across its keys.
#[pyclass(name = "FailoverClient", module = "keyfailover", frozen)]
pub struct PyFailoverClient {
    client: Arc<FailoverClient>,
    pool: Py<PyKeyPool>,
}

#[pymethods]
impl PyFailoverClient {
    #[new]
    #[pyo3(signature = (pool, *, base_url, provider = "anthropic", timeout = 600.0, connect_timeout = 10.0))]
    fn new(
        pool: Bound<'_, PyKeyPool>,
        base_url: String,
        provider: &str,
        timeout: f64,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let options = ClientOptions {
            base_url,
            provider: provider.parse()?,
            timeout: positive_seconds("timeout", timeout)?,
            connect_timeout: positive_seconds("connect_timeout", connect_timeout)?,
        };
        let client = FailoverClient::new(pool.get().pool.clone(), options)?;
        Ok(Self {
            client: Arc::new(client),
            pool: pool.unbind(),
        })
    }

    /// Sends a request; awaits the response head (after any failover).
    #[pyo3(signature = (method, path, *, headers = None, body = None))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        method: String,
        path: String,
        headers: Option<&Bound<'py, PyAny>>,
        body: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = build_request(method, path, headers, body)?;
        let client = self.client.clone();
        bridge::spawn(py, async move {
            Ok(PyResponse::from(client.request(request).await?))
        })
    }

    /// The blocking twin of `request`, for sync code: the GIL is released
    /// while the request runs on the same runtime.
    #[pyo3(signature = (method, path, *, headers = None, body = None))]
    fn request_sync(
        &self,
        py: Python<'_>,
        method: String,
        path: String,
        headers: Option<&Bound<'_, PyAny>>,
        body: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PySyncResponse> {
        let request = build_request(method, path, headers, body)?;
        let client = self.client.clone();
        let response = py.detach(|| get_runtime().block_on(client.request(request)))?;
        Ok(PySyncResponse(Meta::from(response)))
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
            ("exhausted_transient", s.exhausted_transient),
            ("exhausted_permanent", s.exhausted_permanent),
            ("upstream_errors", s.upstream_errors),
        ] {
            out.set_item(name, value)?;
        }
        Ok(out)
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
    headers: Vec<(String, String)>,
    attempts: u32,
    key_label: Option<String>,
    exhausted: bool,
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

            /// (name, value) pairs; names lower-case, hop-by-hop headers removed.
            #[getter]
            fn headers(&self) -> Vec<(String, String)> {
                self.0.headers.clone()
            }

            #[getter]
            fn attempts(&self) -> u32 {
                self.0.attempts
            }

            #[getter]
            fn key_label(&self) -> Option<String> {
                self.0.key_label.clone()
            }

            #[getter]
            fn exhausted(&self) -> bool {
                self.0.exhausted
            }

            #[getter]
            fn closed(&self) -> bool {
                self.0.body.is_closed()
            }
        }
    };
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
    fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let body = self.0.body.clone();
        bridge::spawn(py, async move { Ok(Chunk(vec![body.read_all().await?])) })
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let body = self.0.body.clone();
        // Chunks already received are handed over at once; only a wait for
        // the network goes through the runtime.
        match body.try_next_batch() {
            Some(Ok(Some(chunks))) => {
                Ok(Ready(Chunk(chunks).into_pyobject(py)?.into_any().unbind())
                    .into_pyobject(py)?
                    .into_any())
            }
            Some(Ok(None)) => Err(PyStopAsyncIteration::new_err(())),
            Some(Err(err)) => Err(err.into()),
            None => bridge::spawn(py, async move {
                match body.next_batch().await? {
                    Some(chunks) => Ok(Chunk(chunks)),
                    None => Err(Failure::StopAsyncIteration),
                }
            }),
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
        let bytes = py.detach(|| get_runtime().block_on(body.read_all()))?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let body = self.0.body.clone();
        match py.detach(|| get_runtime().block_on(body.next_batch()))? {
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

/// The core error a Python exception stands for, for `sse_error_event`.
fn core_error(error: &Bound<'_, PyAny>) -> PyResult<Error> {
    let py = error.py();
    let message = || -> PyResult<String> { Ok(error.str()?.to_str()?.to_owned()) };
    if error.is_instance(&class(py, "TransientExhaustion")?)? {
        let retry_after: f64 = error.getattr("retry_after")?.extract()?;
        let retry_after =
            Duration::try_from_secs_f64(retry_after.max(0.0)).unwrap_or(Duration::ZERO);
        Ok(Exhaustion::Transient { retry_after }.into())
    } else if error.is_instance(&class(py, "PermanentExhaustion")?)? {
        Ok(Exhaustion::Permanent.into())
    } else if error.is_instance(&class(py, "ConfigError")?)? {
        Ok(Error::Config(message()?))
    } else if error.is_instance(&class(py, "KeyfailoverError")?)? {
        Ok(Error::Upstream(message()?))
    } else {
        Err(PyTypeError::new_err(
            "sse_error_event takes a KeyfailoverError",
        ))
    }
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
    let kind = ErrorKind::from_type_name(error_type)
        .ok_or_else(|| Error::Config(format!("unknown error type {error_type:?}")))?;
    Ok((
        kind.status(),
        PyBytes::new(py, &provider.error_body(kind, message)),
    ))
}

/// One SSE error event, in the provider's shape, for `error`.
#[pyfunction]
#[pyo3(signature = (error, *, provider = "anthropic"))]
pub fn sse_error_event<'py>(
    py: Python<'py>,
    error: &Bound<'py, PyAny>,
    provider: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let provider: Provider = provider.parse()?;
    let (kind, message) = core_error(error)?.answer();
    Ok(PyBytes::new(py, &provider.sse_error_event(kind, &message)))
}
