//! Faults inside the server: an engine thread that panics mid-stream.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use llmops::api::auth::Authenticator;
use llmops::api::http::{HttpState, app};
use llmops::config::LimitsConfig;
use llmops::engine::synth::SynthSpec;
use llmops::router::{Router, Target};
use llmops::scheduler::{EngineHandle, EngineLabels, SchedulerConfig};
use serde_json::json;

use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_engine_ends_its_streams_with_an_error_and_turns_ready_off() {
    // A long context, so the stream below outlasts the panic's way through
    // the intake queue by seconds even on a loaded machine: with 480 tokens
    // the tiny model could finish before the panic was taken.
    let spec = SynthSpec {
        max_position_embeddings: 8192,
        ..SynthSpec::tiny_llama()
    };
    let (_tmp, path) = support::write_model(&spec);
    let engine = EngineHandle::spawn(
        support::load(&path),
        SchedulerConfig::default(),
        EngineLabels {
            model: "tiny".into(),
            version: "v1".into(),
        },
    )
    .unwrap();
    let router = Arc::new(Router::default());
    router.set_stable(
        "tiny",
        Arc::new(Target {
            version: "v1".into(),
            engine: engine.clone(),
        }),
    );
    let state = HttpState {
        router,
        auth: Authenticator::new(&[]),
        limits: Arc::new(LimitsConfig {
            max_body_bytes: 1 << 20,
            max_prompt_tokens: None,
            max_tokens: None,
            request_timeout: Duration::from_secs(60),
        }),
        expected_models: Arc::new(vec!["tiny".into()]),
        metrics: None,
        ops: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app(state, None)).await });
    let c = reqwest::Client::new();
    assert_eq!(
        c.get(format!("{base}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A long stream, then the engine dies under it.
    let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 8000, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = c
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    engine.inject_panic();
    let mut rest = String::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = stream.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(read.is_ok(), "the stream must end, not hang");
    assert!(
        !rest.contains("[DONE]"),
        "a dead engine is not a finished answer: {rest}"
    );
    let last = rest.trim().rsplit("data: ").next().unwrap_or_default();
    let err: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(err["error"]["type"], "server_error", "{err}");

    // The thread marks itself failed as it finishes unwinding, just after
    // the streams it held were closed.
    for _ in 0..200 {
        if engine.has_failed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(engine.has_failed());
    let ready = c.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // New requests are refused with an error, not queued for a dead thread.
    let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 4});
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
}

/// A body that trickles in: `chunks` of 1 MiB, one every `gap`.
fn slow_body(chunks: usize, gap: Duration) -> reqwest::Body {
    let s = futures::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(gap).await;
        Some((Ok::<_, std::io::Error>(vec![b' '; 1 << 20]), i + 1))
    });
    reqwest::Body::wrap_stream(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inference_key_is_refused_before_its_admin_body_is_read_and_admin_bodies_are_capped() {
    let s = crate::server::TestServer::start(|a| {
        a.api_keys = vec!["ops:admin:adm1n".into(), "app:inference:1nf".into()];
    })
    .await;
    let c = reqwest::Client::new();
    let url = s.url("/admin/v1/models/tiny/versions/v1/load");
    // 20 MiB over 4 s: answered long before the body could have been read.
    let t0 = std::time::Instant::now();
    let r = c
        .post(&url)
        .bearer_auth("1nf")
        .body(slow_body(20, Duration::from_millis(200)))
        .send()
        .await;
    let took = t0.elapsed();
    match r {
        Ok(r) => assert_eq!(r.status(), 403),
        // The server may close the connection on the unread rest once it
        // has answered; either way it did not wait for the body.
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    assert!(
        took < Duration::from_secs(3),
        "answered after {took:?}: the body was read first"
    );
    // An admin's oversized body is refused in the OpenAI shape, not read whole.
    let big = vec![b' '; 8 << 20];
    let r = c
        .post(&url)
        .bearer_auth("adm1n")
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    s.stop().await;
}
