//! Bindings for the native server: `Server`, which `keyfailover serve` runs.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use super::gateway::PyGateway;
use super::runtime::{runtime, SIGNAL_CHECK};
use crate::error::Error;
use crate::server::access_log::{AccessLog, Format};
use crate::server::{listener_from_fd, Route, Server, ServerOptions};

/// The native HTTP server: `routes` are (prefix, Gateway) pairs ("" takes
/// every path, and is then the only route; a prefix is a URL path without
/// escapes and outside the admin areas, no `_keyfailover` segment, else
/// ConfigError). `serve(fd)` blocks
/// until `shutdown()` (or Ctrl-C) and the drain after it, with the GIL
/// released.
#[pyclass(name = "Server", module = "keyfailover", frozen)]
pub struct PyServer {
    server: Arc<Server>,
}

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::Config(format!("{name} must be a positive number of seconds")).into())
}

#[pymethods]
impl PyServer {
    #[new]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments
    #[pyo3(signature = (routes, *, header_timeout = 30.0, max_connections = 10_000, max_header_bytes = 65_536, grace = 10.0, http2 = true, access_log = None, admin_tokens = None))]
    fn new(
        routes: Vec<(String, PyRef<'_, PyGateway>)>,
        header_timeout: f64,
        max_connections: i64,
        max_header_bytes: i64,
        grace: f64,
        http2: bool,
        access_log: Option<&str>,
        admin_tokens: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let options = ServerOptions {
            header_timeout: seconds(header_timeout, "header_timeout")?,
            max_connections: usize::try_from(max_connections)
                .map_err(|_| Error::Config("max_connections must not be negative".into()))?,
            max_header_bytes: usize::try_from(max_header_bytes)
                .map_err(|_| Error::Config("max_header_bytes must not be negative".into()))?,
            grace: Duration::try_from_secs_f64(grace).map_err(|_| {
                Error::Config("grace must be a number of seconds, 0 or more".into())
            })?,
            http2,
            access_log: access_log
                .map(|f| f.parse::<Format>().map(AccessLog::stderr))
                .transpose()?,
            admin_tokens: admin_tokens
                .map(|tokens| tokens.into_iter().map(String::into_bytes).collect()),
        };
        Ok(Self {
            server: Arc::new(Server::new(to_routes(routes), options)?),
        })
    }

    /// Replaces the routes (a reloaded configuration); requests in flight
    /// finish on the old ones.
    fn set_routes(&self, routes: Vec<(String, PyRef<'_, PyGateway>)>) -> PyResult<()> {
        Ok(self.server.set_routes(to_routes(routes))?)
    }

    /// Serves the listening socket `fd` until `shutdown()` and the drain
    /// after it. The descriptor is the server's from then on (pass
    /// `sock.detach()`): it is closed as soon as the server stops accepting,
    /// so that new connections are refused while those in flight finish. A
    /// signal handler that raises (Ctrl-C's KeyboardInterrupt) starts the
    /// shutdown; its exception is raised once the server has drained.
    fn serve(&self, py: Python<'_>, fd: i32) -> PyResult<()> {
        let listener = listener_from_fd(fd)?;
        let runtime = runtime();
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::Config(format!("cannot use the listening socket: {e}")))?
        };
        let mut task = runtime.spawn(self.server.clone().run(listener));
        let mut raised: Option<PyErr> = None;
        loop {
            let slice = py.detach(|| {
                runtime.block_on(async { tokio::time::timeout(SIGNAL_CHECK, &mut task).await })
            });
            match slice {
                Ok(done) => {
                    let result =
                        done.map_err(|e| Error::Upstream(format!("the server failed: {e}")));
                    if let Some(err) = raised {
                        return Err(err);
                    }
                    result??;
                    return Ok(());
                }
                Err(_) => {
                    if let Err(err) = py.check_signals() {
                        self.server.shutdown();
                        raised.get_or_insert(err);
                    }
                }
            }
        }
    }

    /// Stops accepting; requests in flight get the grace period, then end
    /// with a proper error. Safe from signal handlers and other threads.
    fn shutdown(&self) {
        self.server.shutdown();
    }

    /// Connections open now.
    #[getter]
    fn connections(&self) -> usize {
        self.server.connections()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.server)
    }
}

fn to_routes(routes: Vec<(String, PyRef<'_, PyGateway>)>) -> Vec<Route> {
    routes
        .into_iter()
        .map(|(prefix, gateway)| Route {
            prefix,
            gateway: gateway.gateway.clone(),
        })
        .collect()
}
