//! `/v1/embeddings`, the gRPC `Embed` and `/v1/responses` on real servers
//! over loopback: the vectors (unit length, batch-invariant, the same on
//! the host and tensor paths and over both protocols), the bad-input table,
//! and the Responses event stream. The official SDK's view is in
//! `tests/python/test_openai_client.py`.

use futures::StreamExt;
use llmops::engine::EnginePath;
use llmops::engine::synth::SynthSpec;
use llmops::proto as pb;
use serde_json::{Value, json};

use crate::server::TestServer;

const TEXTS: [&str; 3] = [
    "The whale swam under the grey sea at dawn.",
    "a",
    "Once upon a time, in a land far away, there lived a baker who rose at four.",
];

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(s.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The float vectors of `input`, in index order.
async fn embed(s: &TestServer, input: Value) -> Vec<Vec<f32>> {
    let (status, v) = post(
        s,
        "/v1/embeddings",
        json!({"model": "tiny", "input": input, "encoding_format": "float"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_is_a_unit_vector_that_neither_its_batch_nor_the_engine_path_changes() {
    // Gemma 3 (sliding windows, soft caps, scaled embeddings) on both
    // paths; small steps, so long inputs are chunked over several steps
    // and share them with other inputs.
    let spec = SynthSpec {
        seed: 5,
        ..SynthSpec::tiny_gemma3()
    };
    let host = TestServer::start_with(spec.clone(), |a| {
        a.engine_path = Some(EnginePath::Host);
        a.scheduler.max_batched_tokens = Some(8);
        a.scheduler.max_running = Some(8);
    })
    .await;
    let tensor = TestServer::start_with(spec, |a| {
        a.engine_path = Some(EnginePath::Tensor);
        a.scheduler.max_batched_tokens = Some(8);
        a.scheduler.max_running = Some(8);
    })
    .await;
    let batch = embed(&host, json!(TEXTS)).await;
    assert_eq!(batch.len(), TEXTS.len());
    for v in &batch {
        assert!((norm(v) - 1.0).abs() < 1e-5, "{}", norm(v));
    }
    assert!(
        max_diff(&batch[0], &batch[2]) > 1e-3,
        "two texts, one vector"
    );
    for (i, text) in TEXTS.iter().enumerate() {
        let alone = embed(&host, json!(text)).await;
        assert!(max_diff(&batch[i], &alone[0]) < 1e-5, "input {i}");
    }
    let mut reversed = TEXTS;
    reversed.reverse();
    let back = embed(&host, json!(reversed)).await;
    for i in 0..TEXTS.len() {
        assert!(max_diff(&batch[i], &back[TEXTS.len() - 1 - i]) < 1e-5);
    }
    let on_tensor = embed(&tensor, json!(TEXTS)).await;
    for i in 0..TEXTS.len() {
        assert!(
            max_diff(&batch[i], &on_tensor[i]) < 1e-4,
            "input {i}: host against tensor path"
        );
    }
    // While other requests generate on the same engine.
    let c = reqwest::Client::new();
    let generation = c
        .post(host.url("/v1/completions"))
        .json(
            &json!({"model": "tiny", "prompt": "hello there", "max_tokens": 24, "temperature": 0}),
        )
        .send();
    let (during, g) = futures::join!(embed(&host, json!(TEXTS)), generation);
    assert_eq!(g.unwrap().status(), 200);
    for i in 0..TEXTS.len() {
        assert!(max_diff(&batch[i], &during[i]) < 1e-5);
    }
    host.stop().await;
    tensor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_embed_rpc_answers_what_http_answers() {
    let s = TestServer::start(|a| a.api_keys = vec!["app:inference:k".into()]).await;
    let mut cl = s.grpc_client().await;
    let req = |model: &str, inputs: Vec<pb::EmbedInput>, dimensions: u32| {
        let mut r = tonic::Request::new(pb::EmbedRequest {
            model: model.into(),
            inputs,
            dimensions,
            ..Default::default()
        });
        r.metadata_mut()
            .insert("authorization", "Bearer k".parse().unwrap());
        r
    };
    let text = |t: &str| pb::EmbedInput {
        input: Some(pb::embed_input::Input::Text(t.into())),
    };
    let tokens = |ids: Vec<u32>| pb::EmbedInput {
        input: Some(pb::embed_input::Input::Tokens(pb::TokenIds { ids })),
    };
    let out = cl
        .embed(req("tiny", vec![text(TEXTS[0]), tokens(vec![5, 6, 7])], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.embeddings.len(), 2);
    assert!(!out.version.is_empty());
    let usage = out.usage.unwrap();
    assert_eq!(usage.completion_tokens, 0);
    assert_eq!(usage.total_tokens, usage.prompt_tokens);

    let c = reqwest::Client::new();
    let http: Value = c
        .post(s.url("/v1/embeddings"))
        .bearer_auth("k")
        .json(&json!({"model": "tiny", "input": [TEXTS[0], [5, 6, 7]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Mixed text and token input is not OpenAI's shape: one of the two.
    assert_eq!(http["error"]["param"], "input", "{http}");
    let http: Value = c
        .post(s.url("/v1/embeddings"))
        .bearer_auth("k")
        .json(&json!({"model": "tiny", "input": [[5, 6, 7]], "encoding_format": "float"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let want: Vec<f32> = http["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(http["usage"]["prompt_tokens"], 3);
    assert!(max_diff(&out.embeddings[1].values, &want) < 1e-6);
    assert!((norm(&out.embeddings[0].values) - 1.0).abs() < 1e-5);

    let short = cl
        .embed(req("tiny", vec![tokens(vec![5, 6, 7])], 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short.embeddings[0].values.len(), 3);
    assert!((norm(&short.embeddings[0].values) - 1.0).abs() < 1e-5);

    let code = |r: Result<tonic::Response<pb::EmbedResponse>, tonic::Status>| {
        r.err()
            .map(|e| (e.code(), e.message().to_string()))
            .unwrap()
    };
    let (c1, m) = code(cl.embed(req("nope", vec![text("hi")], 0)).await);
    assert_eq!(c1, tonic::Code::NotFound, "{m}");
    let (c2, m) = code(cl.embed(req("tiny", vec![], 0)).await);
    assert_eq!(c2, tonic::Code::InvalidArgument, "{m}");
    let (c3, m) = code(
        cl.embed(req("tiny", vec![pb::EmbedInput { input: None }], 0))
            .await,
    );
    assert_eq!(c3, tonic::Code::InvalidArgument, "{m}");
    let mut unauth = req("tiny", vec![text("hi")], 0);
    unauth.metadata_mut().remove("authorization");
    assert_eq!(code(cl.embed(unauth).await).0, tonic::Code::Unauthenticated);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = TestServer::start(|_| {}).await;
    let many: Vec<&str> = vec!["x"; llmops::embed::MAX_INPUTS + 1];
    let long = "word ".repeat(2000);
    // (body, status, param, words of the message)
    let cases: Vec<(Value, u16, Value, &str)> = vec![
        (
            json!({"model": "tiny", "input": ""}),
            400,
            json!("input"),
            "empty",
        ),
        (
            json!({"model": "tiny", "input": []}),
            400,
            json!("input"),
            "empty",
        ),
        (
            json!({"model": "tiny", "input": ["a", ""]}),
            400,
            json!("input"),
            "input[1]",
        ),
        (
            json!({"model": "tiny", "input": [[]]}),
            400,
            json!("input"),
            "empty",
        ),
        (
            json!({"model": "tiny", "input": many}),
            400,
            json!("input"),
            "at most 2048",
        ),
        (
            json!({"model": "tiny", "input": [[1, 99999]]}),
            400,
            json!("input"),
            "vocabulary",
        ),
        (
            json!({"model": "tiny", "input": long}),
            400,
            json!("input"),
            "context",
        ),
        (
            json!({"model": "tiny", "input": "a", "dimensions": 0}),
            400,
            json!("dimensions"),
            "between 1",
        ),
        (
            json!({"model": "tiny", "input": "a", "dimensions": 100000}),
            400,
            json!("dimensions"),
            "between 1",
        ),
        (
            json!({"model": "tiny", "input": "a", "encoding_format": "int8"}),
            400,
            json!("encoding_format"),
            "base64",
        ),
        (
            json!({"model": "nope", "input": "a"}),
            404,
            json!("model"),
            "nope",
        ),
        (
            json!({"model": "tiny"}),
            400,
            Value::Null,
            "missing field `input`",
        ),
    ];
    for (body, status, param, words) in cases {
        let (got, v) = post(&s, "/v1/embeddings", body.clone()).await;
        let err = &v["error"];
        assert_eq!(got, status, "{body}: {v}");
        assert!(err["type"].is_string(), "{body}: {v}");
        assert_eq!(err["param"], param, "{body}: {v}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(words), "{body}: {message}");
    }
    let (status, v) = post(
        &s,
        "/v1/embeddings",
        json!({"model": "tiny", "input": "ok"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "tiny");
    assert!(v["data"][0]["embedding"].is_array());
    s.stop().await;
}

/// The SSE events of a streamed response: (event name, data).
async fn response_events(s: &TestServer, body: Value) -> Vec<(String, Value)> {
    let r = reqwest::Client::new()
        .post(s.url("/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut raw = vec![];
    let mut bytes = r.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        raw.extend_from_slice(&chunk.unwrap());
    }
    let raw = String::from_utf8(raw).unwrap();
    let mut out = vec![];
    let mut name = String::new();
    for line in raw.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_sends_the_responses_events_in_order_with_the_whole_text() {
    let s = TestServer::start(|_| {}).await;
    let body = json!({"model": "tiny", "input": "hello", "max_output_tokens": 6, "temperature": 0, "ignore_eos": true});
    let (status, whole) = post(&s, "/v1/responses", body.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["output"][0]["content"][0]["text"].as_str().unwrap();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = response_events(&s, streamed).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let last = match whole["status"].as_str().unwrap() {
        "incomplete" => "response.incomplete",
        _ => "response.completed",
    };
    let n = kinds.len();
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        kinds[n - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            last
        ]
    );
    assert!(
        kinds[4..n - 4]
            .iter()
            .all(|k| *k == "response.output_text.delta")
    );
    for (i, (k, v)) in events.iter().enumerate() {
        assert_eq!(v["type"], *k);
        assert_eq!(v["sequence_number"], i);
    }
    let deltas: String = events
        .iter()
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert_eq!(deltas, text);
    assert!(!text.is_empty());
    assert_eq!(whole["status"], "incomplete");
    assert_eq!(whole["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(whole["usage"]["output_tokens"], 6);
    let done = &events[n - 1].1["response"];
    assert_eq!(done["usage"], whole["usage"]);
    assert_eq!(done["output"][0]["content"][0]["text"], text);
    // Stored: retrievable, then deletable.
    let id = done["id"].as_str().unwrap();
    let got: Value = reqwest::get(s.url(&format!("/v1/responses/{id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["id"], id);
    let del = reqwest::Client::new()
        .delete(s.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let (status, v) = post(
        &s,
        "/v1/responses",
        json!({"model": "tiny", "input": "more", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "previous_response_id");
    s.stop().await;
}
