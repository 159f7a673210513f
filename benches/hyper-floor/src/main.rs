//! The floor for a proxy built on hyper, for `make bench`: keyfailover's
//! server (hyper-util's auto builder: HTTP/1.1 and HTTP/2 cleartext) and
//! hyper-util's pooled client (keyfailover's until its own pool on hyper's
//! client connections, which does less per request, replaced it) on one
//! tokio runtime, doing only what the nginx floor does: check the client's
//! token, swap in the key, forward over pooled keep-alive connections, stream
//! the reply. No failover, limits, logs or metrics: the native server's ratio
//! to this is what keyfailover's own work costs, less what its pool saves.
//!
//! Usage: hyper-floor PORT UPSTREAM_PORT THREADS TOKEN KEY SSE_KEY

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

/// keyfailover's allocator front on mimalloc, its very source.
#[path = "../../../src/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

struct Floor {
    client: Client<HttpConnector, Incoming>,
    upstream: String,
    token: HeaderValue,
    key: HeaderValue,
    sse_key: HeaderValue,
}

impl Floor {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        if parts.headers.get("x-api-key") != Some(&self.token) {
            return answer(StatusCode::UNAUTHORIZED);
        }
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let (key, rest) = if let Some(rest) = target.strip_prefix("/anthropic") {
            (&self.key, rest.to_owned())
        } else if let Some(rest) = target.strip_prefix("/sse") {
            (&self.sse_key, format!("/sse1000{rest}"))
        } else {
            return answer(StatusCode::NOT_FOUND);
        };
        let Ok(uri) = format!("{}{rest}", self.upstream).parse::<Uri>() else {
            return answer(StatusCode::BAD_REQUEST);
        };
        parts.uri = uri;
        parts.headers.remove(HOST);
        parts.headers.insert("x-api-key", key.clone());
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(|b| b.boxed_unsync()),
            Err(_) => answer(StatusCode::BAD_GATEWAY),
        }
    }
}

fn answer(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(
        Empty::new()
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, upstream, threads, token, key, sse_key] = &args[..] else {
        eprintln!("usage: hyper-floor PORT UPSTREAM_PORT THREADS TOKEN KEY SSE_KEY");
        std::process::exit(2);
    };
    let header = |v: &str| HeaderValue::from_str(v).expect("a header value");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.parse().expect("THREADS is a number"))
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(tcp);
        let floor: &'static Floor = Box::leak(Box::new(Floor {
            client,
            upstream: format!("http://127.0.0.1:{upstream}"),
            token: header(token),
            key: header(key),
            sse_key: header(sse_key),
        }));
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse().expect("PORT")))
            .await
            .expect("the port to listen on");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server = server.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| async move {
                    Ok::<_, Infallible>(floor.handle(request).await)
                });
                let _ = server.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
}
