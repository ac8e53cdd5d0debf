//! Soak at twice capacity: a closed loop of twice as many clients as the
//! engine admits (running + waiting), some of them leaving mid-stream, some
//! sending garbage, over HTTP and gRPC, for a bounded time. Every admitted
//! request completes (or ends with its documented error), the excess gets a
//! fast 429 / RESOURCE_EXHAUSTED with a Retry-After, garbage gets a 4xx,
//! the KV pool is empty again at the end, the server still serves, and its
//! resident memory is flat between the warm-up and the end.
//!
//! In CI (`soak_at_twice_capacity`) the server is the real binary in a child
//! process on the tiny synthetic model; `scripts/soak` points the same load at a real
//! `llmops serve` process through `LLMOPS_SOAK_HTTP`, `LLMOPS_SOAK_GRPC`,
//! `LLMOPS_SOAK_MODEL`, `LLMOPS_SOAK_PID` (whose RSS is read from /proc) and
//! `LLMOPS_SOAK_CAPACITY`, for `LLMOPS_SOAK_SECS` seconds.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use llmops::proto as pb;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::Served;

/// Where the load goes.
struct Target {
    http: String,
    grpc: String,
    model: String,
    /// The server's process (RSS).
    pid: u32,
    /// Requests the engine admits at once: running + waiting.
    capacity: usize,
    /// The server's body limit, to send one just over it.
    max_body_bytes: usize,
}

/// Tokens each well-behaved request asks for (`ignore_eos`, so each
/// admitted one must return exactly this many).
const MAX_TOKENS: u64 = 40;
/// A refused client waits this long before its next request: enough to keep
/// the loop from spinning on 429s, short enough to keep the pressure on.
const BACKOFF: Duration = Duration::from_millis(25);
/// No admitted request may take longer: a bound far above the expected
/// latency (queue + generation, ~1 s here), so only starvation trips it.
const ADMITTED_BOUND: Duration = Duration::from_secs(30);

/// The soak server's KV pool: small, so that a leak stands out against it.
const KV_POOL_MB: usize = 32;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[derive(Default)]
struct Tally {
    /// Well-formed generation requests sent.
    offered: u64,
    /// Admitted and completed (200 / OK), with their latency.
    admitted: Vec<Duration>,
    /// Refused with 429 / RESOURCE_EXHAUSTED, with their latency.
    refused: Vec<Duration>,
    /// Admitted streams the client left on purpose.
    left: u64,
    /// Garbage sent (each answered with a 4xx or a closed connection).
    garbage: u64,
    /// Well-formed requests whose connection the server closed before
    /// answering (hyper's `IncompleteMessage` on a reused keep-alive
    /// connection): counted apart, see the assertion in [`soak`].
    conn_closed: Vec<String>,
    /// Anything else: the failures.
    bad: Vec<String>,
}

type Shared = Arc<Mutex<Tally>>;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn completion_body(model: &str, stream: bool, chat: bool, max_tokens: u64) -> Value {
    let mut b = if chat {
        json!({"model": model, "messages": [{"role": "user", "content": "Tell me a story about the sea."}]})
    } else {
        json!({"model": model, "prompt": "It was a dark and stormy night;"})
    };
    b["max_tokens"] = max_tokens.into();
    b["ignore_eos"] = true.into();
    b["temperature"] = 0.7.into();
    b["stream"] = stream.into();
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// Checks a 429: Retry-After of at least a second, the OpenAI error shape.
async fn refused(t: &Shared, r: reqwest::Response, started: Instant) {
    let elapsed = started.elapsed();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body: Value = r.json().await.unwrap_or_default();
    let mut t = t.lock().unwrap();
    if retry.is_none_or(|s| s < 1) || body["error"]["type"] != "rate_limit_error" {
        t.bad
            .push(format!("429 without Retry-After or error body: {body}"));
    }
    t.refused.push(elapsed);
}

/// A client that sends well-formed requests in a closed loop: streaming and
/// not, completions and chat.
async fn http_client(target: Arc<Target>, t: Shared, until: Instant, id: usize) {
    let c = reqwest::Client::new();
    let mut k = id;
    while Instant::now() < until {
        k += 1;
        let (stream, chat) = (k.is_multiple_of(2), k.is_multiple_of(3));
        let path = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let started = Instant::now();
        t.lock().unwrap().offered += 1;
        let r = match c
            .post(format!("{}{path}", target.http))
            .json(&completion_body(&target.model, stream, chat, MAX_TOKENS))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let e = format!("send: {e:?}");
                let mut t = t.lock().unwrap();
                if e.contains("IncompleteMessage") {
                    t.conn_closed.push(e);
                } else {
                    t.bad.push(e);
                }
                continue;
            }
        };
        match r.status().as_u16() {
            429 => {
                refused(&t, r, started).await;
                tokio::time::sleep(BACKOFF).await;
            }
            200 if stream => {
                let text = r.text().await.unwrap_or_default();
                // The usage chunk (stream_options.include_usage) counts the
                // tokens; the stream ends with [DONE], never an error event.
                let tokens = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .find_map(|v| v["usage"]["completion_tokens"].as_u64());
                let done = text.trim_end().ends_with("data: [DONE]");
                let mut t = t.lock().unwrap();
                if !done || text.contains("\"error\"") || tokens != Some(MAX_TOKENS) {
                    t.bad.push(format!(
                        "a stream did not complete: {tokens:?} tokens: {text:.300}"
                    ));
                } else {
                    t.admitted.push(started.elapsed());
                }
            }
            200 => {
                let v: Value = r.json().await.unwrap_or_default();
                let mut t = t.lock().unwrap();
                if v["usage"]["completion_tokens"] != MAX_TOKENS {
                    t.bad.push(format!("short answer: {v:.300}"));
                } else {
                    t.admitted.push(started.elapsed());
                }
            }
            s => {
                let body = r.text().await.unwrap_or_default();
                t.lock()
                    .unwrap()
                    .bad
                    .push(format!("status {s}: {body:.300}"));
            }
        }
    }
}

/// A client that leaves: streams a long answer and drops it after two
/// chunks, or gives up on a non-streaming one after 100 ms.
async fn leaving_client(target: Arc<Target>, t: Shared, until: Instant, id: usize) {
    let c = reqwest::Client::new();
    let mut k = id;
    while Instant::now() < until {
        k += 1;
        let stream = !k.is_multiple_of(3);
        let started = Instant::now();
        t.lock().unwrap().offered += 1;
        let send = c
            .post(format!("{}/v1/completions", target.http))
            .json(&completion_body(&target.model, stream, false, 400))
            .send();
        if !stream {
            match tokio::time::timeout(Duration::from_millis(100), send).await {
                Err(_) => t.lock().unwrap().left += 1,
                Ok(Ok(r)) if r.status() == 429 => {
                    refused(&t, r, started).await;
                    tokio::time::sleep(BACKOFF).await;
                }
                Ok(Ok(r)) if r.status() == 200 => {
                    t.lock().unwrap().admitted.push(started.elapsed())
                }
                Ok(other) => t.lock().unwrap().bad.push(format!("leaver: {other:?}")),
            }
            continue;
        }
        match send.await {
            Ok(r) if r.status() == 200 => {
                let mut body = r.bytes_stream();
                let _ = body.next().await;
                let _ = body.next().await;
                drop(body);
                t.lock().unwrap().left += 1;
            }
            Ok(r) if r.status() == 429 => {
                refused(&t, r, started).await;
                tokio::time::sleep(BACKOFF).await;
            }
            other => t.lock().unwrap().bad.push(format!("leaver: {other:?}")),
        }
    }
}

/// Raw bytes on a fresh connection; returns what came back before the
/// server closed it (or stopped answering within a second).
async fn raw(addr: &str, bytes: &[u8], close_early: bool) -> Vec<u8> {
    let addr = addr.trim_start_matches("http://");
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return b"connect failed".to_vec();
    };
    let _ = s.write_all(bytes).await;
    if close_early {
        return vec![];
    }
    let mut out = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
    out
}

/// A client that sends garbage: bad JSON, wrong types, unknown models,
/// impossible lengths, an oversized body, bytes that are not HTTP, a request
/// cut off mid-body.
async fn garbage_client(target: Arc<Target>, t: Shared, until: Instant, id: usize) {
    let c = reqwest::Client::new();
    let url = format!("{}/v1/completions", target.http);
    let chat = format!("{}/v1/chat/completions", target.http);
    let m = &target.model;
    let mut k = id;
    while Instant::now() < until {
        k += 1;
        let kind = k % 8;
        let expect: &[u16] = match kind {
            0 => &[400],
            1 => &[400],
            2 => &[404],
            3 => &[400],
            4 => &[413],
            5 => &[400],
            _ => &[],
        };
        let body: Option<Vec<u8>> = match kind {
            0 => Some(b"{\"model\": \"tiny\", \"prompt\": \"unterminated".to_vec()),
            1 => Some(
                json!({"model": m, "prompt": 5, "max_tokens": "x"})
                    .to_string()
                    .into(),
            ),
            2 => Some(
                json!({"model": "no-such-model", "prompt": "hi"})
                    .to_string()
                    .into(),
            ),
            3 => Some(
                json!({"model": m, "prompt": "hi", "max_tokens": u64::MAX, "temperature": -3})
                    .to_string()
                    .into(),
            ),
            4 => Some(vec![b' '; target.max_body_bytes + 4096]),
            5 => Some(
                json!({"model": m, "messages": [{"role": "wizard", "content": "<|assistant|>"}]})
                    .to_string()
                    .into(),
            ),
            _ => None,
        };
        t.lock().unwrap().garbage += 1;
        // Some garbage, not a flood: the soak is about the generation load.
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Some(body) = body {
            let to = if kind == 5 { &chat } else { &url };
            match c
                .post(to)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) if expect.contains(&r.status().as_u16()) => {
                    let v: Value = r.json().await.unwrap_or_default();
                    if !v["error"]["message"].is_string() {
                        t.lock()
                            .unwrap()
                            .bad
                            .push(format!("garbage {kind}: error body {v}"));
                    }
                }
                Ok(r) => {
                    let s = r.status();
                    let b = r.text().await.unwrap_or_default();
                    t.lock()
                        .unwrap()
                        .bad
                        .push(format!("garbage {kind}: {s} {b:.200}"));
                }
                // The oversized body may be refused before it is all sent.
                Err(_) if kind == 4 => {}
                Err(e) => t.lock().unwrap().bad.push(format!("garbage {kind}: {e}")),
            }
            continue;
        }
        match kind {
            6 => {
                let mut junk: Vec<u8> = (0..512u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                    .collect();
                junk.extend_from_slice(b"\r\n\r\n");
                let out = raw(&target.http, &junk, false).await;
                if !(out.is_empty() || out.starts_with(b"HTTP/1.1 400")) {
                    t.lock().unwrap().bad.push(format!(
                        "non-HTTP bytes got {:?}",
                        String::from_utf8_lossy(&out[..out.len().min(100)])
                    ));
                }
            }
            _ => {
                let cut = format!(
                    "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\": \"{m}\", \"prompt\""
                );
                raw(&target.http, cut.as_bytes(), true).await;
            }
        }
    }
}

/// A gRPC client: streams, and cancels one stream in three after its first
/// message.
async fn grpc_client(target: Arc<Target>, t: Shared, until: Instant, id: usize) {
    let mut cl = pb::inference_client::InferenceClient::connect(target.grpc.clone())
        .await
        .unwrap();
    let mut k = id;
    while Instant::now() < until {
        k += 1;
        let started = Instant::now();
        t.lock().unwrap().offered += 1;
        let req = pb::GenerateRequest {
            model: target.model.clone(),
            input: Some(pb::generate_request::Input::Prompt(
                "And so it began".into(),
            )),
            max_tokens: MAX_TOKENS as u32,
            ignore_eos: true,
            ..Default::default()
        };
        match cl.generate_stream(req).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                {
                    let mut g = t.lock().unwrap();
                    if s.metadata().get("retry-after").is_none() {
                        g.bad.push("RESOURCE_EXHAUSTED without retry-after".into());
                    }
                    g.refused.push(started.elapsed());
                }
                tokio::time::sleep(BACKOFF).await;
            }
            Err(s) => t.lock().unwrap().bad.push(format!("grpc: {s:?}")),
            Ok(r) => {
                let mut s = r.into_inner();
                if k.is_multiple_of(3) {
                    let _ = s.message().await;
                    drop(s);
                    t.lock().unwrap().left += 1;
                    continue;
                }
                let mut tokens = 0;
                let end = loop {
                    match s.message().await {
                        Ok(Some(m)) => tokens += m.token_ids.len(),
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                let mut g = t.lock().unwrap();
                match end {
                    Ok(()) if tokens as u64 == MAX_TOKENS => g.admitted.push(started.elapsed()),
                    other => g
                        .bad
                        .push(format!("grpc stream: {tokens} tokens, {other:?}")),
                }
            }
        }
    }
}

async fn metric(target: &Target, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", target.http))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let model = format!("model=\"{}\"", target.model);
    let vals: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&model))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

/// Runs the soak against `target` for `secs` and checks what it promises.
async fn soak(target: Target, secs: f64) {
    let target = Arc::new(target);
    let clients = 2 * target.capacity;
    // Warm-up: the same load for a fifth of the time, so allocator arenas,
    // thread stacks and connection pools reach their working size before
    // the first RSS reading.
    let run = |secs: f64| {
        let t: Shared = Arc::default();
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = vec![];
        for i in 0..clients {
            let (target, t) = (target.clone(), t.clone());
            // Of every 8 clients: 5 well-behaved over HTTP, 1 that leaves,
            // 1 that sends garbage, 1 over gRPC.
            tasks.push(tokio::spawn(async move {
                match i % 8 {
                    5 => leaving_client(target, t, until, i).await,
                    6 => garbage_client(target, t, until, i).await,
                    7 => grpc_client(target, t, until, i).await,
                    _ => http_client(target, t, until, i).await,
                }
            }));
        }
        async move {
            for task in tasks {
                task.await.unwrap();
            }
            Arc::try_unwrap(t).ok().unwrap().into_inner().unwrap()
        }
    };
    let warm = run(secs / 5.0).await;
    assert!(
        warm.bad.is_empty(),
        "warm-up: {:?}",
        &warm.bad[..warm.bad.len().min(5)]
    );
    wait_idle(&target).await;
    let rss_before = rss_kib(target.pid);
    let started = Instant::now();
    // RSS through the run, to tell a plateau (allocator) from a slope (leak).
    let pid = target.pid;
    let mut series = vec![];
    let mut t = {
        let load = run(secs);
        let mut load = std::pin::pin!(load);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(secs / 6.0));
        tick.tick().await;
        loop {
            tokio::select! {
                t = &mut load => break t,
                _ = tick.tick() => series.push(rss_kib(pid) / 1024),
            }
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    wait_idle(&target).await;
    let rss_after = rss_kib(target.pid);

    let offered = t.offered;
    let admitted = t.admitted.len();
    let refused = t.refused.len();
    let p50 = percentile(&mut t.admitted, 0.5);
    let p99 = percentile(&mut t.admitted, 0.99);
    let max = percentile(&mut t.admitted, 1.0);
    let r99 = percentile(&mut t.refused, 0.99);
    let rmax = percentile(&mut t.refused, 1.0);
    eprintln!(
        "soak: {clients} clients for {elapsed:.1} s against capacity {} (running + waiting): \
         offered {offered} generation requests ({:.1}/s), admitted and completed {admitted} ({:.1}/s), \
         refused {refused} ({:.1}%), left mid-stream {}, garbage {}; \
         admitted latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; 429 latency p99 {:.1} ms, max {:.1} ms; \
         RSS {} MiB before, {} MiB after ({:+} MiB), through the run {:?} MiB; \
         connections closed under a well-formed request {}",
        target.capacity,
        offered as f64 / elapsed,
        admitted as f64 / elapsed,
        100.0 * refused as f64 / offered.max(1) as f64,
        t.left,
        t.garbage,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        r99.as_secs_f64() * 1e3,
        rmax.as_secs_f64() * 1e3,
        rss_before / 1024,
        rss_after / 1024,
        (rss_after as i64 - rss_before as i64) / 1024,
        series,
        t.conn_closed.len(),
    );
    assert!(
        t.bad.is_empty(),
        "{} failures, the first: {:#?}",
        t.bad.len(),
        &t.bad[..t.bad.len().min(5)]
    );
    // A connection closed under a well-formed request was a server task
    // that died: an entered tracing span held across an await (fixed in
    // api/http.rs) made tracing-subscriber panic on about 1 in 15,000.
    assert!(
        t.conn_closed.is_empty(),
        "{} connections closed under requests: {:?}",
        t.conn_closed.len(),
        &t.conn_closed[..t.conn_closed.len().min(3)]
    );
    assert!(admitted > 0, "nothing was admitted");
    assert!(refused > 0, "at twice capacity some requests are refused");
    assert!(t.left > 0 && t.garbage > 0);
    assert!(max < ADMITTED_BOUND, "an admitted request took {max:?}");
    assert!(
        rmax < Duration::from_secs(1),
        "a 429 took {rmax:?}: refusals must be fast"
    );
    // Bounded memory after the warm-up: the KV pool, whose pages the prefix
    // cache touches one by one (it fills the free blocks with cached ones
    // before it evicts any), plus 64 MiB of slack for the allocator.
    assert!(
        rss_after <= rss_before + (KV_POOL_MB as u64 + 64) * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {} requests",
        offered + t.garbage
    );
    // Nothing left behind: no sequence, no queued request, no KV block.
    assert_eq!(
        settled(&target.http, &target.model).await,
        (0.0, 0.0, 0.0),
        "(running, waiting, KV usage) after the soak"
    );
    // And it still serves.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", target.http))
        .json(&completion_body(&target.model, false, false, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Polls `/metrics` (up to 10 s) until the model has nothing running, nothing
/// waiting and an empty KV pool; returns the last (running, waiting, KV
/// usage) read. A request refused part-way (one of its `n` choices already
/// queued) is cleaned up by the engine a step later, hence the polling.
pub async fn settled(base: &str, model: &str) -> (f64, f64, f64) {
    let mut last = (f64::NAN, f64::NAN, f64::NAN);
    for _ in 0..1000 {
        let Ok(r) = reqwest::get(format!("{base}/metrics")).await else {
            continue;
        };
        let m = r.text().await.unwrap_or_default();
        let model = format!("model=\"{model}\"");
        let value = |name: &str| -> f64 {
            m.lines()
                .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&model))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        last = (
            value("llmops_num_requests_running"),
            value("llmops_num_requests_waiting"),
            value("llmops_kv_cache_usage_perc"),
        );
        // The gauges exist (a missing one would read as 0).
        assert!(m.contains("llmops_kv_cache_usage_perc{"), "no KV gauge");
        if last == (0.0, 0.0, 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    last
}

async fn wait_idle(target: &Target) {
    for _ in 0..1000 {
        if metric(target, "llmops_num_requests_running").await == Some(0.0)
            && metric(target, "llmops_num_requests_waiting").await == Some(0.0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server did not become idle");
}

fn soak_secs(default: f64) -> f64 {
    std::env::var("LLMOPS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The CI soak: the tiny model in this process, 4 running + 4 waiting, 16
/// clients for 20 s (plus a 4 s warm-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_at_twice_capacity() {
    if let Ok(http) = std::env::var("LLMOPS_SOAK_HTTP") {
        // `scripts/soak`: a real server in another process.
        let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is required"));
        let target = Target {
            http,
            grpc: env("LLMOPS_SOAK_GRPC"),
            model: env("LLMOPS_SOAK_MODEL"),
            pid: env("LLMOPS_SOAK_PID").parse().unwrap(),
            capacity: env("LLMOPS_SOAK_CAPACITY").parse().unwrap(),
            max_body_bytes: env("LLMOPS_SOAK_MAX_BODY").parse().unwrap(),
        };
        soak(target, soak_secs(300.0)).await;
        return;
    }
    // A real server in its own process, so that the resident memory read is
    // the server's alone (this test binary runs other servers and training
    // at the same time).
    let (running, waiting, body) = (4, 4, 64 << 10);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    llmops::engine::synth::SynthSpec {
        seed: 9,
        ..llmops::engine::synth::SynthSpec::tiny_llama()
    }
    .write(&model, None)
    .unwrap();
    let mut s = Served::spawn(
        &model,
        &dir.path().join("data"),
        &dir.path().join("server.log"),
        |cmd| {
            cmd.env_remove("LLMOPS_API_KEYS")
                .args(["--max-running", &running.to_string()])
                .args(["--max-waiting", &waiting.to_string()])
                .args(["--max-batched-tokens", "64"])
                .args(["--kv-cache-mb", &KV_POOL_MB.to_string()])
                .args(["--max-body-bytes", &body.to_string()])
                // At info, as operators run it: request spans are live (a
                // span held across an await once killed connections at
                // this level only).
                .env("RUST_LOG", "info");
        },
    );
    s.ready().await;
    let target = Target {
        http: s.url(""),
        grpc: format!("http://127.0.0.1:{}", s.grpc),
        model: "tiny".into(),
        pid: s.pid(),
        capacity: running + waiting,
        max_body_bytes: body,
    };
    soak(target, soak_secs(20.0)).await;
    // What the server itself said went wrong: never a panic.
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    for l in log.lines().filter(|l| !l.contains(" INFO ")).take(20) {
        eprintln!("server: {l}");
    }
    assert!(
        !log.contains("panicked"),
        "the server panicked:\n{}",
        s.tail(40)
    );
}
