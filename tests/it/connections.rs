//! Connections and browsers: slow, idle and stalled clients are closed
//! within the configured timeouts, a flood of idle sockets under a low file
//! limit does not lock `/ready` out for longer than the idle timeout, web
//! pages cannot drive the admin API, and the small protocol answers (405
//! with `Allow`, gRPC's conventional codes).

use std::time::{Duration, Instant};

use llmops::engine::synth::SynthSpec;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::TestServer;

/// Header-read timeout of the servers here.
const HEADER: Duration = Duration::from_secs(1);
/// Idle timeout: longer than the header one, so the two are told apart.
const IDLE: Duration = Duration::from_secs(3);
/// Body-read timeout.
const BODY: Duration = Duration::from_secs(2);
/// What a loaded 2-core machine may add to a timer.
const MARGIN: Duration = Duration::from_secs(6);

async fn short_timeouts() -> TestServer {
    TestServer::start(|a| {
        a.listener.header_read_timeout_secs = Some(HEADER.as_secs_f64());
        a.listener.idle_timeout_secs = Some(IDLE.as_secs_f64());
        a.listener.body_read_timeout_secs = Some(BODY.as_secs_f64());
    })
    .await
}

/// Reads until the server closes the connection (EOF or reset), or
/// `within` passes: what was read, and when it closed (`None`: still open).
async fn until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Option<Instant>) {
    let deadline = Instant::now() + within;
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The sum of a counter's series whose labels include all of `with`.
fn counter(text: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            with.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn timed_out(s: &TestServer, listener: &str, phase: &str) -> f64 {
    counter(
        &s.metrics_text().await,
        "llmops_connections_timed_out_total",
        &[("listener", listener), ("phase", phase)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_idle_and_stalled_body_connections_are_closed_within_their_timeouts() {
    let s = short_timeouts().await;
    let (header0, idle0, body0) = (
        timed_out(&s, "http", "header").await,
        timed_out(&s, "http", "idle").await,
        timed_out(&s, "http", "body").await,
    );

    // Slowloris: a header byte a second, never finishing. It keeps sending
    // (so no idle timeout applies) and is closed by the header timeout.
    let slow = TcpStream::connect(s.http).await.unwrap();
    let (mut slow_read, mut slow_write) = slow.into_split();
    let started = Instant::now();
    let dripping = tokio::spawn(async move {
        let head =
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head.iter().cycle() {
            if slow_write.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    // Idle keep-alive: one request answered, then nothing.
    let mut idle = TcpStream::connect(s.http).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut first = vec![0u8; 1024];
    let n = idle.read(&mut first).await.unwrap();
    let answered = Instant::now();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );

    // Connected, never a byte.
    let mut silent = TcpStream::connect(s.http).await.unwrap();
    let connected = Instant::now();

    // A stalled body: 100 MB declared, a few bytes sent.
    let mut stalled = TcpStream::connect(s.http).await.unwrap();
    stalled
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n{\"model\"",
        )
        .await
        .unwrap();
    let body_sent = Instant::now();

    let (slow_closed, idle_closed, silent_closed, stalled_closed) = tokio::join!(
        async {
            let mut buf = [0u8; 1024];
            tokio::time::timeout(HEADER + MARGIN, async {
                loop {
                    match slow_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return Instant::now(),
                        Ok(_) => {}
                    }
                }
            })
            .await
        },
        until_closed(&mut idle, IDLE + MARGIN),
        until_closed(&mut silent, IDLE + MARGIN),
        until_closed(&mut stalled, BODY + MARGIN),
    );
    dripping.abort();

    let slow_closed = slow_closed.expect("the slowloris connection is still open");
    assert!(
        slow_closed - started >= HEADER,
        "closed after {:?}, before the header timeout",
        slow_closed - started
    );
    let idle_closed = idle_closed
        .1
        .expect("the idle keep-alive connection is still open");
    assert!(
        idle_closed - answered >= IDLE - Duration::from_millis(100),
        "idle connection closed after {:?}",
        idle_closed - answered
    );
    let silent_closed = silent_closed
        .1
        .expect("a connection that never sent a byte is still open");
    assert!(silent_closed - connected >= IDLE - Duration::from_millis(100));
    let (answer, closed) = stalled_closed;
    let closed = closed.expect("the stalled-body connection is still open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body-read timeout"), "{answer}");
    assert!(closed - body_sent >= BODY - Duration::from_millis(100));

    // Each was closed by its own timeout (other tests only add to these).
    assert!(timed_out(&s, "http", "header").await > header0);
    assert!(timed_out(&s, "http", "idle").await >= idle0 + 2.0);
    // The stalled body's connection is usually closed by hyper itself
    // after the 408 (the body is unread), before the watchdog counts it.
    let _ = body0;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_that_keeps_arriving_and_a_reused_connection_are_served() {
    let s = short_timeouts().await;
    // Parts every 250 ms for longer than the body timeout: never waiting
    // BODY for one part, it is read whole.
    let body = json!({"model": "tiny", "prompt": "a slow but steady client"}).to_string();
    let mut c = TcpStream::connect(s.http).await.unwrap();
    c.write_all(
        format!(
            "POST /tokenize HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let chunk = body.len().div_ceil(14);
    for part in body.as_bytes().chunks(chunk) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.write_all(part).await.unwrap();
    }
    assert!(t0.elapsed() > BODY, "the body took less than the timeout");
    let mut buf = vec![0u8; 8192];
    let n = c.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The same connection serves a second request within the idle timeout.
    c.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_grpc_connections_get_a_goaway_and_the_client_reconnects() {
    let s = short_timeouts().await;
    let idle0 = timed_out(&s, "grpc", "idle").await;
    let mut c = s.grpc_client().await;
    let list = llmops::proto::ListModelsRequest::default;
    c.list_models(list()).await.unwrap();
    // The channel's connection sits idle past the timeout and is closed...
    let t0 = Instant::now();
    while timed_out(&s, "grpc", "idle").await <= idle0 {
        assert!(
            t0.elapsed() < IDLE + MARGIN,
            "no idle gRPC connection was closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and the next call on the same channel simply reconnects.
    let models = c.list_models(list()).await.unwrap().into_inner();
    assert!(!models.models.is_empty());
    s.stop().await;
}

/// Raw bytes as a gRPC message, for requests no generated client sends.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_messages_are_invalid_argument_and_oversize_ones_resource_exhausted() {
    let s = TestServer::start(|_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = |bytes: Vec<u8>, path: &'static str| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.unwrap();
            grpc.unary::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(bytes),
                axum::http::uri::PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
        }
    };
    // Field 1 with wire type 7, which does not exist; then a length that
    // runs past the message's end.
    for (case, bytes) in [
        ("bad wire type", vec![0x0f, 0x01]),
        ("truncated string", vec![0x0a, 0x20, b'a']),
    ] {
        for path in [
            "/llmops.v1.Inference/Generate",
            "/llmops.v1.Inference/GenerateStream",
        ] {
            let err = call(bytes.clone(), path).await.unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "{case} on {path}: {err:?}"
            );
            assert!(
                err.message().contains("decode"),
                "{case}: {}",
                err.message()
            );
        }
    }
    // Over tonic's 4 MiB receive limit.
    let err = call(vec![0u8; 5 << 20], "/llmops.v1.Inference/Generate")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // A well-formed request still works on the same channel.
    let ok = call(vec![], "/llmops.v1.Inference/ListModels").await;
    assert!(ok.is_ok(), "{ok:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_and_patch_on_existing_routes_are_405_with_allow_in_the_openai_shape() {
    let s = TestServer::start(|_| {}).await;
    let c = reqwest::Client::new();
    for (method, path, allowed) in [
        ("OPTIONS", "/v1/chat/completions", "POST"),
        ("PATCH", "/v1/chat/completions", "POST"),
        ("OPTIONS", "/v1/models", "GET"),
        ("PATCH", "/admin/v1/models/tiny/aliases/x", "PUT"),
    ] {
        let r = c
            .request(method.parse().unwrap(), s.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        let allow = r
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(allow.contains(allowed), "{method} {path}: Allow `{allow}`");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(method),
            "{v}"
        );
    }
    // An unknown route is still 404.
    let r = c
        .request(reqwest::Method::OPTIONS, s.url("/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_a_web_page_could_send_are_refused_and_change_nothing() {
    // No keys: the anonymous caller is the one a web page borrows.
    let s = TestServer::start(|a| {
        a.listener.allowed_origins = vec!["https://console.example".into()];
    })
    .await;
    let c = reqwest::Client::new();
    let model: Value = c
        .get(s.url("/admin/v1/models/tiny"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stable = model["aliases"]["stable"].as_str().unwrap().to_string();
    let alias = |name: &str| s.url(&format!("/admin/v1/models/tiny/aliases/{name}"));
    let body = json!({"version": stable}).to_string();

    // A form post or fetch from any page: text/plain needs no preflight.
    let r = c
        .put(alias("plain"))
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/json"),
        "{v}"
    );
    // JSON from another origin's page.
    let r = c
        .put(alias("foreign"))
        .header("content-type", "application/json")
        .header("origin", "https://evil.example")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("Origin"),
        "{v}"
    );
    // DNS rebinding: the page's own name, resolved to this server.
    let r = c
        .put(alias("rebound"))
        .header("content-type", "application/json")
        .header("host", format!("attacker.example:{}", s.http.port()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The same JSON from curl, from the server's own origin, and from an
    // allowed origin all pass.
    for (name, origin) in [
        ("curl", None),
        ("own", Some(format!("http://{}", s.http))),
        ("console", Some("https://console.example".to_string())),
    ] {
        let mut r = c
            .put(alias(name))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", r.text().await.unwrap());
    }
    // A body-less DELETE needs no content type.
    let r = c.delete(alias("curl")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let model: Value = c
        .get(s.url("/admin/v1/models/tiny"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let aliases = model["aliases"].as_object().unwrap();
    for refused in ["plain", "foreign", "rebound", "curl"] {
        assert!(!aliases.contains_key(refused), "{refused}: {model}");
    }
    for kept in ["own", "console"] {
        assert!(aliases.contains_key(kept), "{kept}: {model}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_any_host_is_served_unless_allowed_hosts_is_set() {
    let key = "k3y";
    let keyed = |hosts: Vec<String>| {
        move |a: &mut llmops::config::ServeArgs| {
            a.api_keys = vec![format!("ops:admin:{key}")];
            a.listener.allowed_hosts = hosts;
        }
    };
    let c = reqwest::Client::new();
    let get = |s: &TestServer, host: &str| {
        c.get(s.url("/admin/v1/models"))
            .bearer_auth(key)
            .header("host", format!("{host}:{}", s.http.port()))
            .send()
    };
    let any = TestServer::start(keyed(vec![])).await;
    assert_eq!(get(&any, "llm.internal").await.unwrap().status(), 200);
    any.stop().await;
    let listed = TestServer::start(keyed(vec!["llm.prod".into()])).await;
    assert_eq!(get(&listed, "llm.internal").await.unwrap().status(), 403);
    assert_eq!(get(&listed, "llm.prod").await.unwrap().status(), 200);
    assert_eq!(get(&listed, "localhost").await.unwrap().status(), 200);
    listed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_sockets_under_a_low_file_limit_locks_ready_out_no_longer_than_the_idle_timeout()
 {
    use std::os::unix::process::CommandExt;
    let (_dir, model) = crate::support::write_model(&SynthSpec {
        seed: 3,
        ..SynthSpec::tiny_llama()
    });
    let data = tempfile::tempdir().unwrap();
    // 320 descriptors: 256 kept back, 32 connections per listener.
    const FILES: u64 = 320;
    let mut p = crate::process::Served::spawn(
        &model,
        &data.path().join("registry"),
        &data.path().join("server.log"),
        |cmd| {
            cmd.env_remove("LLMOPS_API_KEYS")
                .args([
                    "--idle-timeout-secs",
                    "2",
                    "--header-read-timeout-secs",
                    "1",
                ])
                .env("RUST_LOG", "info");
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child's limits.
            unsafe {
                cmd.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: FILES,
                        rlim_max: FILES,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    p.ready().await;
    // This process opens more sockets than a default soft limit may allow.
    llmops::api::listen::raise_file_limit();
    let log = std::fs::read_to_string(&p.log).unwrap();
    assert!(log.contains("file descriptor limit"), "{}", p.tail(20));

    // More idle sockets than the server has descriptors.
    let mut flood = vec![];
    for _ in 0..FILES + 64 {
        match TcpStream::connect(("127.0.0.1", p.http)).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    let flooded = Instant::now();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    loop {
        if let Ok(r) = c.get(p.url("/ready")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            flooded.elapsed() < Duration::from_secs(2) + MARGIN,
            "/ready locked out for {:?} by idle sockets:\n{}",
            flooded.elapsed(),
            p.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = c
        .get(p.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        counter(
            &text,
            "llmops_connections_refused_total",
            &[("listener", "http")]
        ) > 0.0,
        "the cap refused nothing"
    );
    assert!(text.contains("llmops_connections_open{listener=\"http\"}"));
    // The server never ran out of descriptors: the cap held first.
    assert!(
        !std::fs::read_to_string(&p.log)
            .unwrap()
            .contains("Too many open files"),
        "{}",
        p.tail(30)
    );
    drop(flood);
}
