//! Real HTTP and gRPC servers on loopback: the bad-input table, overload,
//! client disconnects, deadlines.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use llmops::config::{Config, ServeArgs};
use llmops::engine::synth::SynthSpec;
use llmops::proto as pb;
use serde_json::{Value, json};

/// A server running in this process on ephemeral ports.
pub struct TestServer {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _model: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server for the tiny synthetic model named `tiny`; `tweak`
    /// adjusts the flags.
    pub async fn start(tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::start_with(
            SynthSpec {
                seed: 9,
                ..SynthSpec::tiny_llama()
            },
            tweak,
        )
        .await
    }

    /// Like [`TestServer::start`], for another model (still named `tiny`).
    pub async fn start_with(spec: SynthSpec, tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny");
        spec.write(&path, None).unwrap();
        let data = dir.path().join("registry");
        Self::launch(&path, &data, tweak, Some(dir)).await
    }

    /// Serves the model at `model` (named `tiny`) with its registry in
    /// `data`, so a second server can start where a stopped one left off.
    pub async fn start_in(model: &Path, data: &Path, tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::launch(model, data, tweak, None).await
    }

    async fn launch(
        model: &Path,
        data: &Path,
        tweak: impl FnOnce(&mut ServeArgs),
        owned: Option<tempfile::TempDir>,
    ) -> Self {
        let mut args = ServeArgs {
            models: vec![model.to_path_buf()],
            model_names: vec!["tiny".into()],
            data_dir: Some(data.to_path_buf()),
            ..Default::default()
        };
        tweak(&mut args);
        let cfg = Config::load(&args).unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listeners = llmops::app::Listeners {
            http,
            grpc,
            metrics: None,
        };
        let task = tokio::spawn(llmops::app::run(cfg, listeners, async move {
            let _ = rx.await;
        }));
        let s = TestServer {
            http: http_addr,
            grpc: grpc_addr,
            stop: Some(tx),
            task: Some(task),
            _model: owned,
        };
        for _ in 0..200 {
            if let Ok(r) = reqwest::get(s.url("/ready")).await
                && r.status() == 200
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn grpc_client(
        &self,
    ) -> pb::inference_client::InferenceClient<tonic::transport::Channel> {
        pb::inference_client::InferenceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// The `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of `llmops_num_requests_running` for the model.
    pub async fn running(&self) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| {
                l.starts_with("llmops_num_requests_running{") && l.contains("model=\"tiny\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub async fn wait_idle(&self) {
        for _ in 0..300 {
            if self.running().await == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("requests are still running");
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

async fn post(
    client: &reqwest::Client,
    url: String,
    body: Vec<u8>,
    key: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

fn ok_completion() -> Vec<u8> {
    json!({"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_documented_error_and_the_server_keeps_serving() {
    let s = TestServer::start(|a| {
        a.api_keys = vec!["ops:admin:adm1n".into(), "app:inference:1nf".into()];
    })
    .await;
    let c = reqwest::Client::new();
    let key = Some("1nf");
    let chat = |body: Value| body.to_string().into_bytes();
    let long_prompt = "x ".repeat(600);
    // (case, path, body, key, status, param), one row a case.
    #[rustfmt::skip]
    let rows: Vec<(&str, String, Vec<u8>, Option<&str>, u16, Option<&str>)> = vec![
        ("malformed JSON", "/v1/completions".into(), b"{\"model\": \"tiny\", ".to_vec(), key, 400, None),
        ("wrong type", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": "hi", "temperature": "hot"})), key, 400, Some("temperature")),
        ("empty messages", "/v1/chat/completions".into(), chat(json!({"model": "tiny", "messages": []})), key, 400, Some("messages")),
        ("unknown role", "/v1/chat/completions".into(), chat(json!({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]})), key, 400, Some("messages")),
        ("invalid UTF-8", "/v1/completions".into(), b"{\"model\": \"tiny\", \"prompt\": \"\xff\xfe\"}".to_vec(), key, 400, None),
        ("10 MB body", "/v1/completions".into(), vec![b' '; 10 << 20], key, 413, None),
        ("negative max_tokens", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": "hi", "max_tokens": -5})), key, 400, Some("max_tokens")),
        ("zero max_tokens", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": "hi", "max_tokens": 0})), key, 400, Some("max_tokens")),
        ("huge max_tokens", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": "hi", "max_tokens": 1_000_000_000u64})), key, 400, Some("max_tokens")),
        ("max_tokens 2^64-1", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": "hi", "max_tokens": u64::MAX})), key, 400, Some("max_tokens")),
        ("chat max_tokens 2^64-1", "/v1/chat/completions".into(), chat(json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": u64::MAX})), key, 400, Some("max_tokens")),
        ("temperature < 0", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": "hi", "temperature": -0.5})), key, 400, Some("temperature")),
        ("top_p > 1", "/v1/chat/completions".into(), chat(json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5})), key, 400, Some("top_p")),
        ("prompt over context", "/v1/completions".into(), chat(json!({"model": "tiny", "prompt": long_prompt})), key, 400, Some("prompt")),
        ("unknown model", "/v1/completions".into(), chat(json!({"model": "nope", "prompt": "hi"})), key, 404, Some("model")),
        ("missing key", "/v1/completions".into(), ok_completion(), None, 401, None),
        ("bad key", "/v1/completions".into(), ok_completion(), Some("wrong"), 401, None),
        ("inference key on an admin route", "/admin/v1/serving".into(), vec![], key, 403, None),
    ];
    for (name, path, body, k, want, param) in rows {
        let (status, err, _) = if path.starts_with("/admin") {
            let r = c
                .get(s.url(&path))
                .bearer_auth(k.unwrap_or_default())
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (
                st,
                r.json().await.unwrap_or(Value::Null),
                Default::default(),
            )
        } else {
            post(&c, s.url(&path), body, k).await
        };
        assert_eq!(status, want, "{name}: {err}");
        let e = &err["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: message in {err}"
        );
        assert!(e["type"].is_string(), "{name}: type in {err}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{name}: param in {err}");
        }
        if [
            "prompt over context",
            "huge max_tokens",
            "max_tokens 2^64-1",
            "chat max_tokens 2^64-1",
        ]
        .contains(&name)
        {
            assert_eq!(e["code"], "context_length_exceeded", "{name}");
        }
        if name.contains("2^64-1") {
            // The sum is the true one (a wrapped one said "2 tokens").
            let m = e["message"].as_str().unwrap();
            let prompt: u128 = m
                .split_once("tokens (")
                .and_then(|(_, rest)| rest.split(' ').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{name}: no prompt count in `{m}`"));
            let want = format!(
                "you requested {} tokens ({prompt} in the {}, 18446744073709551615 for the completion)",
                prompt + u128::from(u64::MAX),
                if name.starts_with("chat") {
                    "messages"
                } else {
                    "prompt"
                },
            );
            assert!(m.contains(&want), "{name}: `{m}` lacks `{want}`");
            assert!(m.contains("reduce max_tokens"), "{name}: {m}");
        }
        // The next valid request is served correctly.
        let (status, ok, _) = post(&c, s.url("/v1/completions"), ok_completion(), key).await;
        assert_eq!(status, 200, "after {name}: {ok}");
        assert_eq!(ok["usage"]["completion_tokens"], 3);
    }
    // The admin key passes the admin route.
    let r = c
        .get(s.url("/admin/v1/serving"))
        .bearer_auth("adm1n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_errors_carry_the_right_status_codes() {
    let s = TestServer::start(|a| a.api_keys = vec!["app:inference:k".into()]).await;
    let mut cl = s.grpc_client().await;
    let req = |model: &str, prompt: &str| {
        let mut r = tonic::Request::new(pb::GenerateRequest {
            model: model.into(),
            input: Some(pb::generate_request::Input::Prompt(prompt.into())),
            max_tokens: 4,
            ..Default::default()
        });
        r.metadata_mut()
            .insert("authorization", "Bearer k".parse().unwrap());
        r
    };
    let code = |r: Result<tonic::Response<pb::GenerateResponse>, tonic::Status>| {
        r.err().map(|e| (e.code(), e.message().to_string()))
    };

    let (c, m) = code(cl.generate(req("nope", "hi")).await).unwrap();
    assert_eq!(c, tonic::Code::NotFound, "{m}");
    let mut unauth = req("tiny", "hi");
    unauth.metadata_mut().remove("authorization");
    assert_eq!(
        code(cl.generate(unauth).await).unwrap().0,
        tonic::Code::Unauthenticated
    );
    let mut bad = req("tiny", "hi");
    bad.get_mut().sampling = Some(pb::SamplingParams {
        temperature: Some(-1.0),
        ..Default::default()
    });
    let (c, m) = code(cl.generate(bad).await).unwrap();
    assert_eq!(c, tonic::Code::InvalidArgument);
    assert!(m.contains("temperature"), "{m}");
    let (c, m) = code(cl.generate(req("tiny", &"x ".repeat(600))).await).unwrap();
    assert_eq!(c, tonic::Code::InvalidArgument);
    assert!(m.contains("context length"), "{m}");
    let mut none = req("tiny", "");
    none.get_mut().input = None;
    assert_eq!(
        code(cl.generate(none).await).unwrap().0,
        tonic::Code::InvalidArgument
    );

    let ok = cl.generate(req("tiny", "hi")).await.unwrap().into_inner();
    assert_eq!(ok.usage.unwrap().completion_tokens, 4);
    assert!(!ok.version.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_ends_as_deadline_exceeded_and_frees_the_sequence() {
    // A long context, so that the request would run for seconds.
    let mut spec = SynthSpec {
        seed: 9,
        ..SynthSpec::tiny_llama()
    };
    spec.max_position_embeddings = 16384;
    let s = TestServer::start_with(spec, |_| {}).await;
    let mut cl = s.grpc_client().await;
    let mut slow = tonic::Request::new(pb::GenerateRequest {
        model: "tiny".into(),
        input: Some(pb::generate_request::Input::Prompt("hi".into())),
        max_tokens: 16000,
        ignore_eos: true,
        ..Default::default()
    });
    // tonic's client enforces the header too; the server answers 30 ms
    // (a tenth) earlier, so its DEADLINE_EXCEEDED arrives first.
    slow.metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let started = std::time::Instant::now();
    let status = cl.generate(slow).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    s.wait_idle().await;
    // And the next request works.
    let ok = cl
        .generate(pb::GenerateRequest {
            model: "tiny".into(),
            input: Some(pb::generate_request::Input::Prompt("hi".into())),
            max_tokens: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.usage.unwrap().completion_tokens, 4);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_queue_limit_gets_fast_429s_while_admitted_requests_complete() {
    let s = TestServer::start(|a| {
        a.scheduler.max_waiting = Some(2);
        a.scheduler.max_running = Some(1);
        a.scheduler.max_batched_tokens = Some(16);
    })
    .await;
    let c = reqwest::Client::new();
    let body = json!({"model": "tiny", "prompt": "hello there", "max_tokens": 40, "temperature": 0, "ignore_eos": true}).to_string();
    let futs = (0..20).map(|_| {
        let c = c.clone();
        let url = s.url("/v1/completions");
        let body = body.clone();
        async move {
            let started = std::time::Instant::now();
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let v: Value = r.json().await.unwrap();
            (status, retry, v, started.elapsed())
        }
    });
    let results = futures::future::join_all(futs).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 1, "some requests are admitted");
    assert!(!limited.is_empty(), "the burst is refused in part");
    assert_eq!(ok + limited.len(), 20, "only 200s and 429s");
    for r in &limited {
        assert!(
            r.1.as_deref()
                .is_some_and(|v| v.parse::<u64>().unwrap() >= 1),
            "Retry-After on 429"
        );
        assert_eq!(r.2["error"]["type"], "rate_limit_error");
        assert!(
            r.3 < Duration::from_millis(500),
            "429 is immediate: {:?}",
            r.3
        );
    }
    for r in results.iter().filter(|r| r.0 == 200) {
        assert_eq!(
            r.2["usage"]["completion_tokens"], 40,
            "admitted requests complete"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_request() {
    // A long context, so that one request runs for seconds, far beyond the
    // client's patience below, however fast the machine.
    let mut spec = SynthSpec {
        seed: 9,
        ..SynthSpec::tiny_llama()
    };
    spec.max_position_embeddings = 16384;
    let s = TestServer::start_with(spec, |_| {}).await;
    let long = json!({"model": "tiny", "prompt": "hello", "max_tokens": 16000, "ignore_eos": true, "temperature": 0});
    // Non-streaming: give up on the response mid-generation.
    let c = reqwest::Client::new();
    let fut = c.post(s.url("/v1/completions")).json(&long).send();
    assert!(
        tokio::time::timeout(Duration::from_millis(150), fut)
            .await
            .is_err()
    );
    s.wait_idle().await;
    // Streaming: read a few chunks, then drop the stream.
    let mut with_stream = long.clone();
    with_stream["stream"] = true.into();
    let resp = c
        .post(s.url("/v1/completions"))
        .json(&with_stream)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let _ = body.next().await;
    // The gauge is published after the step that sent the first token, so
    // on a loaded machine the token can arrive first: poll for it.
    let t0 = std::time::Instant::now();
    while s.running().await < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the streamed request never showed as running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(body);
    s.wait_idle().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_grpc_stream_frees_its_sequence() {
    let s = TestServer::start(|_| {}).await;
    let mut cl = s.grpc_client().await;
    let stream = cl
        .generate_stream(pb::GenerateRequest {
            model: "tiny".into(),
            input: Some(pb::generate_request::Input::Prompt("hello".into())),
            max_tokens: 450,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = stream;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.token_ids.len(), 1);
    assert!(!first.version.is_empty());
    drop(stream);
    s.wait_idle().await;
    s.stop().await;
}
