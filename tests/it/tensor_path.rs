//! The tensor path (device KV cache and attention; `--engine-path tensor`)
//! serving over real HTTP on candle's CPU device, against the host path
//! serving the same model: the same greedy text for concurrent requests,
//! streamed and not.

use futures::StreamExt;
use llmops::engine::EnginePath;
use llmops::engine::synth::SynthSpec;
use serde_json::{Value, json};

use crate::server::TestServer;

async fn completion(c: &reqwest::Client, s: &TestServer, prompt: &str) -> String {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0});
    let r = c
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// A streamed chat completion's text, joined from its SSE deltas.
async fn streamed_chat(c: &reqwest::Client, s: &TestServer, content: &str) -> String {
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": true,
    });
    let r = c
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut raw = vec![];
    while let Some(chunk) = bytes.next().await {
        raw.extend_from_slice(&chunk.unwrap());
    }
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.contains("data: [DONE]"), "{raw}");
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// What one server answers to a fixed mix of concurrent requests.
async fn answers(s: &TestServer) -> Vec<String> {
    let c = reqwest::Client::new();
    let prompts = [
        "The tensor path",
        "a",
        "Once upon a time, in a land far away, there lived",
        "0123456789",
        "hello hello hello",
        "zz",
    ];
    let plain = futures::future::join_all(prompts.iter().map(|p| completion(&c, s, p)));
    let streamed = futures::future::join_all(prompts[..3].iter().map(|p| streamed_chat(&c, s, p)));
    let (mut a, b) = futures::join!(plain, streamed);
    a.extend(b);
    a
}

async fn engine_path_of(s: &TestServer) -> String {
    let v: Value = reqwest::get(s.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"][0]["engine_path"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tensor_path_serves_over_http_what_the_host_path_serves() {
    // Gemma 3's sliding windows, q/k norms and soft caps, and GQA.
    let spec = SynthSpec {
        seed: 11,
        ..SynthSpec::tiny_gemma3()
    };
    let host = TestServer::start_with(spec.clone(), |a| {
        a.engine_path = Some(EnginePath::Host);
    })
    .await;
    let tensor = TestServer::start_with(spec, |a| {
        a.engine_path = Some(EnginePath::Tensor);
        // Small steps, so prompts are chunked and share steps with decodes.
        a.scheduler.max_batched_tokens = Some(16);
        a.scheduler.max_running = Some(8);
    })
    .await;
    assert_eq!(engine_path_of(&host).await, "host");
    assert_eq!(engine_path_of(&tensor).await, "tensor");
    let (want, got) = futures::join!(answers(&host), answers(&tensor));
    assert!(want.iter().any(|t| !t.is_empty()), "{want:?}");
    assert_eq!(want, got, "host path against tensor path");
    host.stop().await;
    tensor.stop().await;
}
