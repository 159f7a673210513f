//! Bindings for the proxy policy: `Gateway` and `Forward`, which
//! `keyfailover.asgi.FailoverProxy` drives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use pyo3::IntoPyObjectExt;

use super::bridge;
use super::client::{PyFailoverClient, PyResponse};
use super::pool::key_specs;
use super::rules::extract_headers;
use super::runtime::runtime;
use crate::error::Error;
use crate::gateway::{Forward, Gateway, GatewayOptions, ReloadHook, Step};

/// The proxy's policy in front of a `FailoverClient`: client tokens, BYOK,
/// body limit, refused methods and paths, admin endpoints.
#[pyclass(name = "Gateway", module = "keyfailover", frozen)]
pub struct PyGateway {
    pub(crate) gateway: Arc<Gateway>,
    client: Py<PyFailoverClient>,
}

fn token_list(tokens: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Vec<String>>> {
    let Some(tokens) = tokens.filter(|t| !t.is_none()) else {
        return Ok(None);
    };
    if tokens.is_instance_of::<PyString>() || tokens.is_instance_of::<PyBytes>() {
        return Err(Error::Config(format!(
            "{name} must be a list of tokens, not a single string \
             (a string would make each of its characters a token)"
        ))
        .into());
    }
    let items = tokens
        .try_iter()
        .map_err(|_| Error::Config(format!("{name} must be a list of strings")))?;
    items
        .map(|item| {
            let item = item?;
            match item.cast::<PyString>() {
                Ok(s) => Ok(s.to_str()?.to_owned()),
                Err(_) => Err(Error::Config(format!(
                    "{name}: tokens must be str, not {}",
                    item.get_type().name()?
                ))
                .into()),
            }
        })
        .collect::<PyResult<Vec<String>>>()
        .map(Some)
}

/// A reload callback is called as the reload request is answered, and must
/// return the keys: refused at once when it cannot.
fn check_reload_callable(callable: &Bound<'_, PyAny>) -> PyResult<()> {
    let py = callable.py();
    if !callable.is_callable() {
        return Err(Error::Config(format!(
            "reload must be a callable returning the keys, not {}",
            callable.get_type().name()?
        ))
        .into());
    }
    let inspect = py.import("inspect")?;
    if inspect
        .call_method1("iscoroutinefunction", (callable,))?
        .is_truthy()?
        || inspect
            .call_method1("isasyncgenfunction", (callable,))?
            .is_truthy()?
    {
        return Err(Error::Config(
            "reload must be a plain function returning the keys, not an async one: it is \
             called while the reload request waits (read the keys ahead, or in a thread, and \
             return them)"
                .into(),
        )
        .into());
    }
    Ok(())
}

#[pymethods]
impl PyGateway {
    #[new]
    #[pyo3(signature = (client, *, client_tokens = None, allow_byok = false, max_body_bytes = 32 * 1024 * 1024, body_timeout = 30.0, admin = true, admin_tokens = None, reload = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        client: &Bound<'_, PyAny>,
        client_tokens: Option<&Bound<'_, PyAny>>,
        allow_byok: bool,
        max_body_bytes: i64,
        body_timeout: f64,
        admin: bool,
        admin_tokens: Option<&Bound<'_, PyAny>>,
        reload: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let client = client.cast::<PyFailoverClient>().map_err(|_| {
            let given = client
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            let hint = if given == "KeyPool" {
                ": wrap the pool, FailoverClient(pool, base_url=...)"
            } else {
                ""
            };
            Error::Config(format!("a FailoverClient is needed, not {given}{hint}"))
        })?;
        let max_body_bytes = u64::try_from(max_body_bytes)
            .map_err(|_| Error::Config("max_body_bytes must not be negative".into()))?;
        let body_timeout = Duration::try_from_secs_f64(body_timeout).map_err(|_| {
            Error::Config(format!(
                "body_timeout must be a positive number of seconds, not {body_timeout}"
            ))
        })?;
        if let Some(callable) = &reload {
            check_reload_callable(callable.bind(client.py()))?;
        }
        let reload = reload.map(|callable| -> ReloadHook {
            // Called by the gateway while it answers POST /reload: under the
            // ASGI app on the thread that holds the GIL already; under the
            // native server on a runtime thread, which takes the GIL for the
            // time of reading the keys (an admin action, not the request path).
            Arc::new(move || {
                Python::attach(|py| {
                    let keys = callable.bind(py).call0().map_err(|e| {
                        crate::Error::Config(format!("the reload callback raised {e}"))
                    })?;
                    if keys
                        .hasattr(pyo3::intern!(py, "__await__"))
                        .unwrap_or(false)
                    {
                        // Closed, so Python does not warn it was never awaited.
                        let _ = keys.call_method0(pyo3::intern!(py, "close"));
                        return Err(crate::Error::Config(
                            "the reload callback returned an awaitable: it is called while the \
                             request waits, so it must return the keys"
                                .into(),
                        ));
                    }
                    key_specs(&keys).map_err(|e| crate::Error::Config(e.to_string()))
                })
            })
        });
        let options = GatewayOptions {
            client_tokens: token_list(client_tokens, "client_tokens")?,
            allow_byok,
            max_body_bytes,
            body_timeout,
            admin,
            admin_tokens: token_list(admin_tokens, "admin_tokens")?,
            reload,
            runtime: Some(Arc::new(|| runtime().handle().clone())),
        };
        let gateway = Gateway::new(client.get().client.clone(), options)?;
        Ok(Self {
            gateway: Arc::new(gateway),
            client: client.clone().unbind(),
        })
    }

    /// Decides from a request head: a `Response` to send as it is, or a
    /// `Forward` that wants the body. `target` is the path below the mount
    /// with its query, as the caller encoded it; `headers` are (name, value)
    /// pairs as bytes (or str); `http_version` the ASGI scope's ("1.1": one
    /// Host is required). A head over 64 KiB is answered 431.
    #[pyo3(signature = (method, target, headers, *, http_version = None))]
    fn begin<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        target: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        http_version: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let target = match target.cast::<PyBytes>() {
            Ok(raw) => raw.as_bytes().iter().map(|&b| char::from(b)).collect(),
            Err(_) => target.extract::<String>()?,
        };
        let headers = match extract_headers(Some(headers)) {
            Ok(headers) => headers,
            Err(err) => {
                let message = err.value(py).str()?.to_string();
                let answer = self
                    .gateway
                    .answer(crate::error::ErrorKind::InvalidRequest, &message);
                return PyResponse::from(answer).into_bound_py_any(py);
            }
        };
        let http11 = http_version == Some("1.1");
        if let Some(refused) = self.gateway.refuse_head(http11, method, &target, &headers) {
            return PyResponse::from(refused).into_bound_py_any(py);
        }
        match self.gateway.begin(method, &target, headers) {
            Step::Respond(response) => PyResponse::from(response).into_bound_py_any(py),
            Step::Forward(forward) => PyForward {
                gateway: self.gateway.clone(),
                byok: forward.byok(),
                forward: Mutex::new(Some(forward)),
            }
            .into_bound_py_any(py),
        }
    }

    /// The answer for a request body over `max_body_bytes`.
    fn too_large(&self) -> PyResponse {
        PyResponse::from(self.gateway.too_large())
    }

    /// The answer for a request body that paused for longer than
    /// `body_timeout` (408, closing the connection).
    fn body_stalled(&self) -> PyResponse {
        PyResponse::from(self.gateway.body_stalled())
    }

    /// The answer for a request still sending its body when the server's
    /// grace period ends (503, closing the connection).
    fn shutting_down(&self) -> PyResponse {
        PyResponse::from(self.gateway.shutting_down())
    }

    /// `text` with every key of the pool replaced by its hint.
    fn redact(&self, text: &str) -> String {
        self.gateway.redact(text).into_owned()
    }

    /// Ends the dashboard's event streams (a server stopping: they would
    /// hold its shutdown for the grace period); everything else goes on.
    fn drain(&self) {
        self.gateway.drain("the server is shutting down");
    }

    /// Ends every request in flight (see `FailoverClient.shutdown`).
    fn shutdown(&self) {
        self.gateway.client().shutdown();
    }

    #[getter]
    fn client(&self, py: Python<'_>) -> Py<PyFailoverClient> {
        self.client.clone_ref(py)
    }

    #[getter]
    fn max_body_bytes(&self) -> u64 {
        self.gateway.max_body_bytes()
    }

    #[getter]
    fn body_timeout(&self) -> f64 {
        self.gateway.body_timeout().as_secs_f64()
    }

    #[getter]
    fn allow_byok(&self) -> bool {
        self.gateway.allow_byok()
    }

    #[getter]
    fn has_client_tokens(&self) -> bool {
        self.gateway.has_client_tokens()
    }
}

/// A request the gateway accepted, waiting for its body.
#[pyclass(name = "Forward", module = "keyfailover", frozen)]
pub struct PyForward {
    gateway: Arc<Gateway>,
    byok: bool,
    forward: Mutex<Option<Forward>>,
}

#[pymethods]
impl PyForward {
    /// True when the request goes with the caller's own key.
    #[getter]
    fn byok(&self) -> bool {
        self.byok
    }

    /// Sends the request with `body`; awaits the response head. Once only.
    fn send<'py>(
        &self,
        py: Python<'py>,
        body: &Bound<'py, PyBytes>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let forward = self
            .forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::BadRequest("this request was already sent".into()))?;
        let body = Bytes::copy_from_slice(body.as_bytes());
        let gateway = self.gateway.clone();
        bridge::spawn(py, async move {
            Ok(PyResponse::from(gateway.forward(forward, body).await))
        })
    }
}
