//! The attempt loop end to end against a scripted upstream on loopback:
//! failover, exhaustion, broken and odd answers, shutdown.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderMap;
use keyfailover::failover::{ClientOptions, Credential, FailoverClient, Request, Response};
use keyfailover::headers::CallerCredential;
use keyfailover::pool::{Cooldowns, KeyPool, KeySpec, KeyState, PoolOptions, Reason};
use keyfailover::provider::Provider;
use keyfailover::verdict::UNREACHABLE_COOLDOWN;
use support::{anthropic_error, json, response, sse_head, Seen, Step, Upstream, OK_BODY};

const KEYS: [&str; 3] = [
    "sk-ant-test-0-xxxxxxxxxxxxxxxxxxxxxxxx0000",
    "sk-ant-test-1-xxxxxxxxxxxxxxxxxxxxxxxx0001",
    "sk-ant-test-2-xxxxxxxxxxxxxxxxxxxxxxxx0002",
];

fn make_client(upstream: &Upstream, keys: usize, timeout: Duration) -> FailoverClient {
    let pool =
        KeyPool::from_keys(KEYS[..keys].iter().copied(), Cooldowns::default(), None).unwrap();
    FailoverClient::new(
        pool,
        ClientOptions {
            base_url: upstream.url.clone(),
            provider: Provider::Anthropic,
            timeout,
            connect_timeout: Duration::from_secs(2),
            http2: true,
            name: None,
        },
    )
    .unwrap()
}

async fn send(client: &FailoverClient) -> (Response, Result<Bytes, keyfailover::Error>) {
    let request = Request::new(
        "POST",
        "/v1/messages",
        HeaderMap::new(),
        Bytes::from_static(b"{}"),
    )
    .unwrap();
    let response = client.request(request).await.unwrap();
    let body = response.body.read_all().await;
    (response, body)
}

fn key_index(seen: &Seen) -> usize {
    KEYS.iter()
        .position(|k| Some(*k) == seen.key.as_deref())
        .unwrap()
}

fn state(client: &FailoverClient, label: &str) -> KeyState {
    client.pool().key(label).unwrap().state()
}

fn text(body: &Result<Bytes, keyfailover::Error>) -> String {
    String::from_utf8_lossy(body.as_ref().unwrap()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_then_200_fails_over_and_cools_the_key() {
    let up = Upstream::start(|seen| match key_index(seen) {
        0 => anthropic_error(429, "rate_limit_error", &[("retry-after", "5")]),
        _ => json(200, OK_BODY),
    })
    .await;
    let client = make_client(&up, 2, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert_eq!(resp.key_label.as_deref(), Some("key-1"));
    assert_eq!(text(&body), OK_BODY);
    let status = client.pool().key("key-0").unwrap().status();
    assert_eq!(status.state, KeyState::Temporary);
    assert!(status.cooldown_remaining > Duration::from_secs(4));
    // The next request goes straight to key-1.
    let _ = send(&client).await;
    assert_eq!(up.keys(), [KEYS[0], KEYS[1], KEYS[1]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_then_200_retires_the_key() {
    let up = Upstream::start(|seen| match key_index(seen) {
        0 => anthropic_error(401, "authentication_error", &[]),
        _ => json(200, OK_BODY),
    })
    .await;
    let client = make_client(&up, 2, Duration::from_secs(5));
    let (resp, _) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert_eq!(state(&client, "key-0"), KeyState::Permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_both_ways() {
    let up = Upstream::start(|seen| match key_index(seen) {
        0 => anthropic_error(429, "rate_limit_error", &[("retry-after", "7")]),
        _ => anthropic_error(429, "rate_limit_error", &[("retry-after", "3")]),
    })
    .await;
    let client = make_client(&up, 2, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts, resp.exhausted), (429, 2, true));
    assert_eq!(resp.headers["retry-after"], "3", "the shortest cooldown");
    assert!(text(&body).contains("all configured keys are rate-limited"));

    let up = Upstream::start(|_| anthropic_error(403, "permission_error", &[])).await;
    let client = make_client(&up, 2, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.exhausted), (502, true));
    assert!(resp.headers.get("retry-after").is_none());
    assert!(text(&body).contains("all configured keys failed authentication"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_before_its_first_event_is_a_502_and_marks_nothing() {
    let up = Upstream::start(|_| {
        vec![
            Step::Send(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\ndata:"
                    .to_vec(),
            ),
            Step::Close,
        ]
    })
    .await;
    let client = make_client(&up, 2, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (502, 1));
    assert!(
        text(&body).contains("the stream broke before its first event"),
        "{}",
        text(&body)
    );
    assert_eq!(state(&client, "key-0"), KeyState::Valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_broken_before_its_first_byte_is_a_502_however_late_the_break() {
    // The close comes with the head, or a while after it: either way nothing
    // of the body was sent, and the caller gets a 502 rather than the head.
    for pause in [None, Some(Duration::from_millis(100))] {
        let up = Upstream::start(move |_| {
            let mut steps = vec![Step::Send(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n"
                    .to_vec(),
            )];
            steps.extend(pause.map(Step::Sleep));
            steps.push(Step::Close);
            steps
        })
        .await;
        let client = make_client(&up, 2, Duration::from_secs(5));
        let (resp, body) = send(&client).await;
        assert_eq!((resp.status, resp.attempts), (502, 1), "pause {pause:?}");
        assert!(
            text(&body).contains("the response body broke before its first byte"),
            "{}",
            text(&body)
        );
        assert_eq!(state(&client, "key-0"), KeyState::Valid);
        assert_eq!(up.seen().len(), 1, "no failover");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_as_the_first_event_fails_over() {
    let up = Upstream::start(|seen| match key_index(seen) {
        0 => {
            let mut bytes = sse_head();
            bytes.extend_from_slice(
                b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"x\"}}\n\n",
            );
            vec![Step::Send(bytes), Step::Close]
        }
        _ => {
            let mut bytes = sse_head();
            bytes.extend_from_slice(b"event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n");
            vec![Step::Send(bytes), Step::Close]
        }
    })
    .await;
    let client = make_client(&up, 2, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert!(text(&body).ends_with("event: message_stop\ndata: {}\n\n"));
    assert_eq!(state(&client, "key-0"), KeyState::Temporary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_broken_after_its_first_event_ends_with_an_error_event() {
    let up = Upstream::start(|_| {
        vec![
            Step::Send(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n1f\r\nevent: message_start\ndata: {}\n\n\r\n"
                    .to_vec(),
            ),
            Step::Sleep(Duration::from_millis(50)),
            Step::Close,
        ]
    })
    .await;
    let client = make_client(&up, 1, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!(resp.status, 200);
    let body = text(&body);
    assert!(
        body.starts_with("event: message_start\ndata: {}\n\nevent: error\ndata: {"),
        "{body}"
    );
    assert!(body.contains("upstream stream broke"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_stream_ending_mid_event_ends_with_an_error_event() {
    let up = Upstream::start(|_| {
        let mut bytes = sse_head();
        bytes.extend_from_slice(
            b"event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {\"par",
        );
        vec![Step::Send(bytes), Step::Close]
    })
    .await;
    let client = make_client(&up, 1, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!(resp.status, 200);
    let body = text(&body);
    assert!(
        body.starts_with("event: message_start\ndata: {}\n\nevent: error\n"),
        "the partial event is dropped, an error event ends the stream: {body}"
    );
    assert!(body.contains("ended in the middle of an event"));
    assert!(!body.contains("\"par"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_a_server_cannot_send_become_502() {
    for head in [
        "HTTP/1.1 999 Weird\r\ncontent-length: 0\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ] {
        let head = head.to_owned();
        let up = Upstream::start(move |_| vec![Step::Send(head.clone().into_bytes()), Step::Close])
            .await;
        let client = make_client(&up, 2, Duration::from_secs(5));
        let (resp, body) = send(&client).await;
        assert_eq!(resp.status, 502, "{}", text(&body));
        assert_eq!(state(&client, "key-0"), KeyState::Valid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_429_body_does_not_hold_failover_for_the_request_timeout() {
    let up = Upstream::start(|seen| match key_index(seen) {
        0 => {
            let mut steps = vec![Step::Send(
                b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 60\r\nretry-after: 5\r\n\r\n{"
                    .to_vec(),
            )];
            for _ in 0..59 {
                steps.push(Step::Sleep(Duration::from_millis(500)));
                steps.push(Step::Send(b" ".to_vec()));
            }
            steps
        }
        _ => json(200, OK_BODY),
    })
    .await;
    let client = make_client(&up, 2, Duration::from_secs(10));
    let started = Instant::now();
    let (resp, _) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(state(&client, "key-0"), KeyState::Temporary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_echoed_by_an_error_body_is_scrubbed_even_split_across_chunks() {
    let up = Upstream::start(|seen| {
        let key = seen.key.clone().unwrap();
        let (a, b) = key.split_at(10);
        let head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        let first = format!("{{\"error\":\"bad key {a}");
        let second = format!("{b}\"}}");
        let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len()).into_bytes();
        vec![
            Step::Send(head.to_vec()),
            Step::Send(chunk(&first)),
            Step::Sleep(Duration::from_millis(30)),
            Step::Send(chunk(&second)),
            Step::Send(b"0\r\n\r\n".to_vec()),
        ]
    })
    .await;
    let client = make_client(&up, 1, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!(resp.status, 400);
    let body = text(&body);
    assert!(!body.contains(KEYS[0]), "{body}");
    assert_eq!(body, "{\"error\":\"bad key sk-a...0000\"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_waiting_requests_and_streams_with_errors() {
    let up = Upstream::start(|seen| {
        if seen.path.contains("stream") {
            let mut bytes = sse_head();
            bytes.extend_from_slice(b"event: message_start\ndata: {}\n\n");
            vec![Step::Send(bytes), Step::Sleep(Duration::from_secs(30))]
        } else {
            vec![Step::Sleep(Duration::from_secs(30))]
        }
    })
    .await;
    let client = std::sync::Arc::new(make_client(&up, 1, Duration::from_secs(60)));
    let stream = client
        .request(Request::new("POST", "/stream", HeaderMap::new(), Bytes::new()).unwrap())
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .request(Request::new("POST", "/wait", HeaderMap::new(), Bytes::new()).unwrap())
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    client.shutdown();
    let waited = waiting.await.unwrap();
    assert_eq!(waited.status, 503);
    let body = stream.body.read_all().await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("event: message_start\ndata: {}\n\nevent: error\n"),
        "{body}"
    );
    assert!(body.contains("shutting down"));
    assert!(started.elapsed() < Duration::from_secs(1));
    let refused = client
        .request(Request::new("GET", "/x", HeaderMap::new(), Bytes::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(refused.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_is_a_502_and_marks_nothing() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let pool = KeyPool::from_keys(KEYS[..2].iter().copied(), Cooldowns::default(), None).unwrap();
    let client = FailoverClient::new(
        pool,
        ClientOptions {
            base_url: url,
            provider: Provider::OpenAi,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            http2: true,
            name: None,
        },
    )
    .unwrap();
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (502, 1));
    assert!(text(&body).contains("could not connect"), "{}", text(&body));
    assert_eq!(state(&client, "key-0"), KeyState::Valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_stream_ending_without_its_final_event_ends_with_an_error_event() {
    let up = Upstream::start(|seen| {
        let mut bytes = sse_head();
        bytes.extend_from_slice(b"event: message_start\ndata: {}\n\n");
        if seen.path.contains("complete") {
            bytes.extend_from_slice(b"event: message_stop\ndata: {}\n\n");
        }
        vec![Step::Send(bytes), Step::Close]
    })
    .await;
    let client = make_client(&up, 1, Duration::from_secs(5));
    let cut = client
        .request(Request::new("POST", "/cut", HeaderMap::new(), Bytes::new()).unwrap())
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&cut.body.read_all().await.unwrap()).into_owned();
    assert!(
        body.starts_with("event: message_start\ndata: {}\n\nevent: error\n")
            && body.contains("before its final event"),
        "{body}"
    );
    let complete = client
        .request(Request::new("POST", "/complete", HeaderMap::new(), Bytes::new()).unwrap())
        .await
        .unwrap();
    let body = complete.body.read_all().await.unwrap();
    assert!(body.ends_with(b"event: message_stop\ndata: {}\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrubbed_error_body_loses_its_content_length() {
    let up = Upstream::start(|seen| {
        let body = format!("{{\"error\":\"bad key {}\"}}", seen.key.clone().unwrap());
        vec![Step::Send(response(400, &[], body.as_bytes()))]
    })
    .await;
    let client = make_client(&up, 1, Duration::from_secs(5));
    let (resp, body) = send(&client).await;
    assert_eq!(resp.status, 400);
    assert!(resp.headers.get("content-length").is_none());
    assert_eq!(text(&body), "{\"error\":\"bad key sk-a...0000\"}");
}

/// A loopback URL with nothing listening on it.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// A client whose keys have their own endpoints (`None`: the client's).
fn client_with_endpoints(base_url: &str, endpoints: &[Option<&str>]) -> FailoverClient {
    let specs = endpoints.iter().enumerate().map(|(i, endpoint)| KeySpec {
        base_url: endpoint.map(str::to_owned),
        ..KeySpec::new(format!("key-{i}"), KEYS[i])
    });
    let pool = KeyPool::build(specs, PoolOptions::default()).unwrap();
    FailoverClient::new(
        pool,
        ClientOptions {
            base_url: base_url.to_owned(),
            provider: Provider::Anthropic,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            http2: true,
            name: None,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_goes_to_its_own_endpoint_and_an_unreachable_one_fails_over() {
    let east = closed_port_url();
    let west = Upstream::start(|_| json(200, OK_BODY)).await;
    let shared = Upstream::start(|_| json(200, OK_BODY)).await;
    let client = client_with_endpoints(&shared.url, &[Some(&east), Some(&west.url), None]);
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert_eq!(text(&body), OK_BODY);
    assert_eq!(resp.key_label.as_deref(), Some("key-1"));
    assert_eq!(west.keys(), [KEYS[1]], "key-1 went to its own endpoint");
    assert!(shared.seen().is_empty());
    let reasons: Vec<_> = resp.attempt_log.iter().map(|a| a.reason).collect();
    assert_eq!(reasons, [Some(Reason::Unreachable), None]);
    assert_eq!(resp.attempt_log[0].status, None);
    let status = client.pool().key("key-0").unwrap().status();
    assert_eq!(status.state, KeyState::Temporary, "cooled, not retired");
    assert!(status.cooldown_remaining <= UNREACHABLE_COOLDOWN);
    assert!(status.cooldown_remaining > UNREACHABLE_COOLDOWN - Duration::from_secs(2));
    assert_eq!(client.stats().unreachable, 1);
    // Meanwhile, requests skip key-0 without paying its connect failure.
    let (resp, _) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 1));
    // Without an endpoint of its own, a key goes to the client's.
    client.pool().key("key-1").unwrap().mark_permanent();
    let (resp, _) = send(&client).await;
    assert_eq!(resp.key_label.as_deref(), Some("key-2"));
    assert_eq!(shared.keys(), [KEYS[2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_from_a_keys_own_endpoint_fails_over_and_from_the_shared_one_is_relayed() {
    let gateway = Upstream::start(|_| json(504, r#"{"error":"gateway timeout"}"#)).await;
    let healthy = Upstream::start(|_| json(200, OK_BODY)).await;
    let client = client_with_endpoints(&healthy.url, &[Some(&gateway.url), Some(&healthy.url)]);
    let (resp, _) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (200, 2));
    assert_eq!(resp.attempt_log[0].status, Some(504));
    assert_eq!(resp.attempt_log[0].reason, Some(Reason::Unreachable));
    assert_eq!(state(&client, "key-0"), KeyState::Temporary);

    // Every key on the client's endpoint: a 504 is upstream's answer, as
    // any other status that is not about the key.
    let client = client_with_endpoints(&gateway.url, &[None, None]);
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (504, 1));
    assert_eq!(text(&body), r#"{"error":"gateway timeout"}"#);
    assert_eq!(state(&client, "key-0"), KeyState::Valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_keys_endpoint_unreachable_is_a_502_and_a_shared_dead_endpoint_marks_nothing() {
    let (east, west) = (closed_port_url(), closed_port_url());
    let client = client_with_endpoints(&closed_port_url(), &[Some(&east), Some(&west)]);
    let (resp, body) = send(&client).await;
    assert_eq!(
        (resp.status, resp.attempts, resp.exhausted),
        (502, 2, false)
    );
    assert!(text(&body).contains("could not connect"), "{}", text(&body));
    assert_eq!(state(&client, "key-1"), KeyState::Temporary);
    // While both cool down, the pool is exhausted for a short while, and
    // says why: not a rate limit.
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.attempts, resp.exhausted), (502, 0, true));
    assert!(
        text(&body).contains("the endpoints of all configured keys are unreachable"),
        "{}",
        text(&body)
    );
    assert_eq!(client.stats().exhausted_transient, 1);
    let retry_after: u64 = resp.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_after <= UNREACHABLE_COOLDOWN.as_secs(),
        "{retry_after}"
    );

    // One rate-limited key among them: the pool is rate-limited, as before.
    client.pool().key("key-0").unwrap().mark_temporary(None);
    let (resp, body) = send(&client).await;
    assert_eq!((resp.status, resp.exhausted), (429, true));
    assert!(text(&body).contains("rate-limited"), "{}", text(&body));

    let client = client_with_endpoints(&closed_port_url(), &[None, None]);
    let (resp, _) = send(&client).await;
    assert_eq!((resp.status, resp.attempts), (502, 1));
    assert_eq!(state(&client, "key-0"), KeyState::Valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byok_goes_to_the_clients_endpoint() {
    let shared = Upstream::start(|_| json(200, OK_BODY)).await;
    let own = Upstream::start(|_| json(200, OK_BODY)).await;
    let client = client_with_endpoints(&shared.url, &[Some(&own.url)]);
    let mut request = Request::new("POST", "/v1/messages", HeaderMap::new(), Bytes::new()).unwrap();
    request.credential = Credential::Caller(CallerCredential {
        header: http::header::HeaderName::from_static("x-api-key"),
        value: http::header::HeaderValue::from_static("sk-callers-own-key"),
    });
    let resp = client.request(request).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(shared.keys(), ["sk-callers-own-key"]);
    assert!(own.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_keys_go_in_its_headers_and_a_query_key_is_dropped() {
    let up = Upstream::start(|_| {
        let mut bytes = sse_head();
        bytes.extend_from_slice(
            b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]},\"finishReason\":\"STOP\"}]}\r\n\r\n",
        );
        vec![Step::Send(bytes), Step::Close]
    })
    .await;
    let pool = KeyPool::from_keys(KEYS[..1].iter().copied(), Cooldowns::default(), None).unwrap();
    let client = FailoverClient::new(
        pool,
        ClientOptions {
            base_url: up.url.clone(),
            provider: Provider::Gemini,
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            http2: true,
            name: None,
        },
    )
    .unwrap();
    for target in [
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=AIza-callers",
        "/v1beta/openai/chat/completions?key=AIza-callers",
    ] {
        let request = Request::new("POST", target, HeaderMap::new(), Bytes::new()).unwrap();
        let resp = client.request(request).await.unwrap();
        let body = resp.body.read_all().await.unwrap();
        if target.contains("streamGenerateContent") {
            // A close-delimited Gemini stream ends complete at its
            // finishReason chunk: no error event added.
            assert!(
                body.ends_with(b"\"finishReason\":\"STOP\"}]}\r\n\r\n"),
                "{body:?}"
            );
        }
    }
    let seen = up.seen();
    assert_eq!(
        seen[0].path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert_eq!(seen[0].header("x-goog-api-key"), Some(KEYS[0].as_bytes()));
    assert_eq!(seen[0].header("authorization"), None);
    assert_eq!(seen[1].path, "/v1beta/openai/chat/completions");
    assert_eq!(
        seen[1].header("authorization"),
        Some(format!("Bearer {}", KEYS[0]).as_bytes())
    );
    assert_eq!(seen[1].header("x-goog-api-key"), None);
}

fn in_flight(client: &FailoverClient) -> u32 {
    client.pool().snapshot()[0].in_flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_no_one_reads_yet_is_closed_at_once() {
    let up = Upstream::start(|_| {
        let mut steps = vec![Step::Send(sse_head())];
        for _ in 0..100 {
            steps.push(Step::Send(b"event: message_start\ndata: {}\n\n".to_vec()));
            steps.push(Step::Sleep(Duration::from_millis(20)));
        }
        steps
    })
    .await;
    let client = make_client(&up, 1, Duration::from_secs(5));
    let request = || {
        Request::new(
            "POST",
            "/v1/messages",
            HeaderMap::new(),
            Bytes::from_static(b"{}"),
        )
        .unwrap()
    };
    // Not read: the stream waits (no task reads it) and holds its key.
    let response = client.request(request()).await.unwrap();
    assert_eq!(response.status, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(in_flight(&client), 1);
    response.body.close();
    assert_eq!(in_flight(&client), 0, "closing drops the stream at once");
    assert_eq!(response.body.next_batch().await.unwrap(), None);

    // Read: the first read starts the pump, which reads ahead.
    let response = client.request(request()).await.unwrap();
    let first = response.body.next_batch().await.unwrap().unwrap().concat();
    assert!(first.starts_with(b"event: message_start"));
    assert_eq!(in_flight(&client), 1);
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(2);
    while in_flight(&client) != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(in_flight(&client), 0, "dropping the body ends the pump");
}
