//! `llmops-loadtest` against a real server on loopback: its counts match the
//! server's own metrics exactly, and failures are classified by kind. Route
//! keys, users and extra headers are checked against small recording servers
//! (OpenAI-compatible HTTP, llmops gRPC) that keep what each request carried.
//!
//! Each test serves the model under its own name, so the process-wide
//! metrics of other tests running at the same time do not mix in.

use std::collections::BTreeSet;
use std::time::Duration;

use llmops_loadtest::workload::Input;
use llmops_loadtest::{Config, Endpoint, Load, Prompts, Protocol, Report, Workload};

use crate::server::TestServer;

/// Sums of the server's counters for one model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counters {
    success: f64,
    generation: f64,
    prompt: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            success: self.success - o.success,
            generation: self.generation - o.generation,
            prompt: self.prompt - o.prompt,
        }
    }
}

async fn counters(s: &TestServer, model: &str) -> Counters {
    let text = s.metrics_text().await;
    let label = format!("model=\"{model}\"");
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Counters {
        success: sum("llmops_request_success_total"),
        generation: sum("llmops_generation_tokens_total"),
        prompt: sum("llmops_prompt_tokens_total"),
    }
}

/// The counters once `want` requests more than `before` have been counted
/// (the engine may count a request just after its last chunk leaves).
async fn counters_after(s: &TestServer, model: &str, before: Counters, want: u64) -> Counters {
    for _ in 0..100 {
        let now = counters(s, model).await;
        if now.success - before.success >= want as f64 {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    counters(s, model).await
}

async fn serve(
    model: &'static str,
    tweak: impl FnOnce(&mut llmops::config::ServeArgs),
) -> TestServer {
    TestServer::start(|a| {
        a.model_names = vec![model.into()];
        tweak(a);
    })
    .await
}

fn base(model: &str, url: String, protocol: Protocol) -> Config {
    Config {
        url,
        protocol,
        model: model.into(),
        prompts: Prompts::Synthetic {
            tokens: "uniform:4:12".parse().unwrap(),
            vocab: (10, 250),
        },
        max_tokens: "uniform:2:6".parse().unwrap(),
        ignore_eos: true,
        temperature: Some(0.0),
        seed: 11,
        timeout_s: 60.0,
        ..Default::default()
    }
}

/// Prompt and completion tokens the workload asks for in requests `0..n`.
fn planned(cfg: &Config, n: u64) -> (u64, u64) {
    let w = Workload::new(cfg.prompts.clone(), cfg.max_tokens.clone(), cfg.seed).unwrap();
    (0..n).fold((0, 0), |(p, o), i| {
        let r = w.request(i, false);
        let Input::Tokens(ids) = &r.input else {
            panic!("synthetic prompts are token ids")
        };
        (p + ids.len() as u64, o + r.max_tokens as u64)
    })
}

fn assert_clean(r: &Report, n: u64) {
    assert_eq!(
        (r.tally.ok, r.tally.failed),
        (n, 0),
        "errors: {:?} {:?}",
        r.tally.errors,
        r.tally.error_examples
    );
    assert_eq!(r.tally.usage_missing, 0, "the server reports usage");
    assert_eq!(r.e2e.count, n);
    assert_eq!(r.ttft.count, n, "every request generated a token");
    assert!(
        r.ttft.p50_ms > 0.0 && r.ttft.p50_ms <= r.e2e.p50_ms + 1e-9,
        "{:?} {:?}",
        r.ttft,
        r.e2e
    );
    assert!(r.e2e.max_ms >= r.e2e.p99_ms && r.e2e.p99_ms >= r.e2e.p50_ms);
    assert!(r.itl.count > 0 && r.tpot.count > 0);
    assert!(r.requests_per_s > 0.0 && r.output_tokens_per_s > 0.0 && r.duration_s > 0.0);
    let started: u64 = r.timeline.iter().map(|s| s.started).sum();
    let ok: u64 = r.timeline.iter().map(|s| s.ok).sum();
    assert_eq!((started, ok), (n, n), "the timeline covers every request");
    // The report is JSON-serializable and carries no secret.
    let json = serde_json::to_value(r).unwrap();
    assert_eq!(json["ok"], n);
    assert!(json["config"].get("api_key").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_http_and_open_loop_grpc_counts_match_the_server_metrics() {
    let model = "lt-counts";
    let s = serve(model, |a| a.api_keys = vec!["app:inference:lt-key".into()]).await;

    // HTTP, closed loop, 2 warm-up requests then 12 measured.
    let mut cfg = base(model, format!("http://{}", s.http), Protocol::Http);
    cfg.api_key = Some("lt-key".into());
    cfg.load = Load::Closed { concurrency: 3 };
    cfg.requests = Some(12);
    cfg.warmup_requests = 2;
    let before = counters(&s, model).await;
    let r = llmops_loadtest::run(cfg.clone()).await.unwrap();
    let delta = counters_after(&s, model, before, 14).await - before;
    assert_clean(&r, 12);
    assert_eq!((r.warmup.ok, r.warmup.failed), (2, 0));
    assert_eq!(delta.success, (r.tally.ok + r.warmup.ok) as f64, "requests");
    assert_eq!(
        delta.generation,
        (r.tally.output_tokens + r.warmup.output_tokens) as f64,
        "generated tokens"
    );
    assert_eq!(
        delta.prompt,
        (r.tally.prompt_tokens + r.warmup.prompt_tokens) as f64,
        "prompt tokens"
    );
    // Request i is the same whatever the timing: the totals are the plan's.
    let (p, o) = planned(&cfg, 14);
    assert_eq!(
        (
            r.tally.prompt_tokens + r.warmup.prompt_tokens,
            r.tally.output_tokens + r.warmup.output_tokens
        ),
        (p, o)
    );

    // gRPC, open loop.
    let mut cfg = base(model, format!("http://{}", s.grpc), Protocol::Grpc);
    cfg.api_key = Some("lt-key".into());
    cfg.load = Load::Open { rate: 40.0 };
    cfg.requests = Some(12);
    cfg.seed = 12;
    let before = counters(&s, model).await;
    let r = llmops_loadtest::run(cfg.clone()).await.unwrap();
    let delta = counters_after(&s, model, before, 12).await - before;
    assert_clean(&r, 12);
    assert_eq!(delta.success, r.tally.ok as f64);
    assert_eq!(delta.generation, r.tally.output_tokens as f64);
    assert_eq!(delta.prompt, r.tally.prompt_tokens as f64);
    assert_eq!(
        (r.tally.prompt_tokens, r.tally.output_tokens),
        planned(&cfg, 12)
    );

    // A wrong key is an error of kind HTTP 401 / gRPC unauthenticated, not a crash.
    for (protocol, addr, kind) in [
        (Protocol::Http, s.http, "http_401"),
        (Protocol::Grpc, s.grpc, "grpc_unauthenticated"),
    ] {
        let mut cfg = base(model, format!("http://{addr}"), protocol);
        cfg.api_key = Some("wrong".into());
        cfg.requests = Some(3);
        let r = llmops_loadtest::run(cfg).await.unwrap();
        assert_eq!((r.tally.ok, r.tally.failed), (0, 3));
        assert_eq!(r.tally.errors.get(kind), Some(&3), "{:?}", r.tally.errors);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_queue_limit_is_counted_as_429s_and_resource_exhausted() {
    let model = "lt-burst";
    let s = serve(model, |a| {
        a.scheduler.max_waiting = Some(1);
        a.scheduler.max_running = Some(1);
        a.scheduler.max_batched_tokens = Some(8);
    })
    .await;
    for (protocol, addr, kind) in [
        (Protocol::Http, s.http, "http_429"),
        (Protocol::Grpc, s.grpc, "grpc_resource_exhausted"),
    ] {
        let mut cfg = base(model, format!("http://{addr}"), protocol);
        cfg.load = Load::Open { rate: 400.0 };
        cfg.requests = Some(40);
        cfg.max_tokens = "24".parse().unwrap();
        cfg.prompts = Prompts::Synthetic {
            tokens: "8".parse().unwrap(),
            vocab: (10, 250),
        };
        let before = counters(&s, model).await;
        let r = llmops_loadtest::run(cfg).await.unwrap();
        assert_eq!(r.tally.ok + r.tally.failed, 40);
        assert!(r.tally.ok >= 1, "admitted requests complete: {r:?}");
        let limited = r.tally.errors.get(kind).copied().unwrap_or(0);
        assert!(limited >= 1, "{kind} expected: {:?}", r.tally.errors);
        assert_eq!(
            limited, r.tally.failed,
            "only {kind}: {:?} {:?}",
            r.tally.errors, r.tally.error_examples
        );
        let per_second: u64 = r
            .timeline
            .iter()
            .map(|t| t.errors.get(kind).copied().unwrap_or(0))
            .sum();
        assert_eq!(per_second, limited, "the timeline has every error");
        // Refused requests generate nothing: the server counted only the admitted ones.
        let delta = counters_after(&s, model, before, r.tally.ok).await - before;
        assert_eq!(delta.success, r.tally.ok as f64);
        assert_eq!(delta.generation, r.tally.output_tokens as f64);
        assert_eq!(r.tally.output_tokens, 24 * r.tally.ok);
        s.wait_idle().await;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_gives_connect_errors_and_a_report() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let mut cfg = base("none", format!("http://127.0.0.1:{port}"), protocol);
        cfg.load = Load::Closed { concurrency: 2 };
        cfg.requests = Some(6);
        let r = llmops_loadtest::run(cfg).await.unwrap();
        assert_eq!((r.tally.ok, r.tally.failed), (0, 6), "{protocol:?}");
        assert_eq!(
            r.tally.errors.get("connect"),
            Some(&6),
            "{protocol:?}: {:?} {:?}",
            r.tally.errors,
            r.tally.error_examples
        );
        assert_eq!((r.requests_per_s, r.tally.output_tokens), (0.0, 0));
        assert!(!r.table().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_mid_run_gives_connection_errors_and_a_report() {
    for protocol in [Protocol::Http, Protocol::Grpc] {
        let model = "lt-stop";
        let s = serve(model, |a| a.shutdown_timeout = Some(1)).await;
        let addr = if protocol == Protocol::Http {
            s.http
        } else {
            s.grpc
        };
        let mut cfg = base(model, format!("http://{addr}"), protocol);
        cfg.load = Load::Closed { concurrency: 2 };
        cfg.duration_s = Some(2.5);
        cfg.max_tokens = "uniform:8:40".parse().unwrap();
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            s.stop().await;
        };
        let (r, ()) = tokio::join!(llmops_loadtest::run(cfg), stopper);
        let r = r.unwrap();
        assert!(
            r.tally.ok >= 1,
            "{protocol:?}: requests finished before the stop: {r:?}"
        );
        assert!(
            r.tally.failed >= 1,
            "{protocol:?}: requests failed after the stop"
        );
        let kinds: BTreeSet<&str> = r.tally.errors.keys().map(String::as_str).collect();
        let allowed: BTreeSet<&str> =
            ["connect", "disconnect", "http_503", "grpc_unavailable"].into();
        assert!(
            kinds.is_subset(&allowed),
            "{protocol:?}: {:?} {:?}",
            r.tally.errors,
            r.tally.error_examples
        );
        assert!(
            kinds.contains("connect") || kinds.contains("disconnect"),
            "{protocol:?}: {:?}",
            r.tally.errors
        );
        assert!(
            r.duration_s >= 2.0,
            "the run went on after the server stopped"
        );
    }
}

/// What a recording server saw of one request: its route key, its `user`,
/// its `x-tenant` header, whether it came to the chat endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    session: Option<String>,
    user: Option<String>,
    tenant: Option<String>,
    chat: bool,
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<Seen>>>;

/// An OpenAI-compatible HTTP server on loopback that records what each
/// request carried and streams one token back.
async fn recording_http_server() -> (std::net::SocketAddr, Log) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    use serde_json::{Value, json};

    async fn handle(
        State(log): State<Log>,
        headers: HeaderMap,
        axum::Json(body): axum::Json<Value>,
    ) -> impl axum::response::IntoResponse {
        let header = |n: &str| {
            headers
                .get(n)
                .map(|v| v.to_str().unwrap_or("<not text>").to_string())
        };
        let chat = body.get("messages").is_some();
        log.lock().unwrap().push(Seen {
            session: header("x-llmops-route-key"),
            user: body
                .get("user")
                .map(|u| u.as_str().unwrap_or("<not a string>").to_string()),
            tenant: header("x-tenant"),
            chat,
        });
        let (token, end) = if chat {
            (
                json!({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
            )
        } else {
            (
                json!({"choices": [{"index": 0, "text": "hi", "finish_reason": null}]}),
                json!({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
            )
        };
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}});
        (
            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
            format!("data: {token}\n\ndata: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n"),
        )
    }
    let log = Log::default();
    let app = axum::Router::new()
        .route("/v1/completions", axum::routing::post(handle))
        .route("/v1/chat/completions", axum::routing::post(handle))
        .with_state(log.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, log)
}

/// llmops's gRPC `Inference` on loopback, recording what each
/// `GenerateStream` carried and streaming one token back.
struct RecordingGrpc(Log);

#[tonic::async_trait]
impl llmops::proto::inference_server::Inference for RecordingGrpc {
    async fn generate(
        &self,
        _: tonic::Request<llmops::proto::GenerateRequest>,
    ) -> Result<tonic::Response<llmops::proto::GenerateResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streaming only"))
    }

    type GenerateStreamStream = tokio_stream::Iter<
        std::vec::IntoIter<Result<llmops::proto::GenerateStreamResponse, tonic::Status>>,
    >;

    async fn generate_stream(
        &self,
        req: tonic::Request<llmops::proto::GenerateRequest>,
    ) -> Result<tonic::Response<Self::GenerateStreamStream>, tonic::Status> {
        let meta = |n: &str| {
            req.metadata()
                .get(n)
                .map(|v| v.to_str().unwrap_or("<not text>").to_string())
        };
        let user = &req.get_ref().user;
        self.0.lock().unwrap().push(Seen {
            session: meta("x-llmops-route-key"),
            user: (!user.is_empty()).then(|| user.clone()),
            tenant: meta("x-tenant"),
            chat: false,
        });
        let token = llmops::proto::GenerateStreamResponse {
            text: "hi".into(),
            token_ids: vec![42],
            ..Default::default()
        };
        let end = llmops::proto::GenerateStreamResponse {
            finish_reason: llmops::proto::FinishReason::Length as i32,
            usage: Some(llmops::proto::Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(tonic::Response::new(tokio_stream::iter(vec![
            Ok(token),
            Ok(end),
        ])))
    }

    async fn tokenize(
        &self,
        _: tonic::Request<llmops::proto::TokenizeRequest>,
    ) -> Result<tonic::Response<llmops::proto::TokenizeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streaming only"))
    }

    async fn list_models(
        &self,
        _: tonic::Request<llmops::proto::ListModelsRequest>,
    ) -> Result<tonic::Response<llmops::proto::ListModelsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streaming only"))
    }

    async fn embed(
        &self,
        _: tonic::Request<llmops::proto::EmbedRequest>,
    ) -> Result<tonic::Response<llmops::proto::EmbedResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streaming only"))
    }
}

async fn recording_grpc_server() -> (std::net::SocketAddr, Log) {
    let log = Log::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = llmops::proto::inference_server::InferenceServer::new(RecordingGrpc(log.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
    );
    (addr, log)
}

/// The sessions and users the workload plans for requests `0..n`, sorted.
fn planned_keys(cfg: &Config, n: u64) -> Vec<(Option<String>, Option<String>)> {
    let w = Workload::new(cfg.prompts.clone(), cfg.max_tokens.clone(), cfg.seed)
        .unwrap()
        .with_keys(cfg.sessions, cfg.users);
    let mut keys: Vec<_> = (0..n)
        .map(|i| {
            let r = w.request(i, false);
            (r.session, r.user)
        })
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_users_and_extra_headers_reach_the_server_on_every_request_over_http_and_grpc() {
    let (http, http_log) = recording_http_server().await;
    let (grpc, grpc_log) = recording_grpc_server().await;
    for (protocol, addr, endpoint, log) in [
        (Protocol::Http, http, Endpoint::Completions, &http_log),
        (Protocol::Http, http, Endpoint::Chat, &http_log),
        (Protocol::Grpc, grpc, Endpoint::Completions, &grpc_log),
    ] {
        let what = format!("{protocol:?} {endpoint:?}");
        log.lock().unwrap().clear();
        let mut cfg = base("rec", format!("http://{addr}"), protocol);
        cfg.endpoint = endpoint;
        cfg.load = Load::Closed { concurrency: 3 };
        cfg.requests = Some(60);
        cfg.sessions = Some(4);
        cfg.users = Some(5);
        cfg.headers = vec!["X-Tenant: blue".parse().unwrap()];
        let r = llmops_loadtest::run(cfg.clone()).await.unwrap();
        assert_eq!(
            (r.tally.ok, r.tally.failed),
            (60, 0),
            "{what}: {:?} {:?}",
            r.tally.errors,
            r.tally.error_examples
        );
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 60, "{what}");
        assert!(
            seen.iter().all(|s| s.tenant.as_deref() == Some("blue")),
            "{what}: the extra header on every request: {seen:?}"
        );
        assert!(
            seen.iter().all(|s| s.chat == (endpoint == Endpoint::Chat)),
            "{what}"
        );
        // Every session and every user occurs, and nothing else.
        let sessions: BTreeSet<_> = seen.iter().map(|s| s.session.clone()).collect();
        let users: BTreeSet<_> = seen.iter().map(|s| s.user.clone()).collect();
        let want = |p: &str, n: u64| (0..n).map(|k| Some(format!("{p}-{k}"))).collect();
        assert_eq!(sessions, want("s", 4), "{what}");
        assert_eq!(users, want("u", 5), "{what}");
        // Request i carries the keys the seed gives it, whatever the timing.
        let mut got: Vec<_> = seen.into_iter().map(|s| (s.session, s.user)).collect();
        got.sort();
        assert_eq!(got, planned_keys(&cfg, 60), "{what}");

        // The report says what was sent (the header by name only).
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (
                &json["config"]["sessions"],
                &json["config"]["users"],
                &json["config"]["headers"]
            ),
            (
                &serde_json::json!(4),
                &serde_json::json!(5),
                &serde_json::json!(["x-tenant"])
            ),
            "{what}"
        );
        assert!(
            !json.to_string().contains("blue"),
            "{what}: header values stay out"
        );
        let table = r.table();
        assert!(
            table.contains("4 sessions (x-llmops-route-key: s-0..s-3); 5 users (user: u-0..u-4); headers x-tenant"),
            "{what}: {table}"
        );
    }

    // Without the flags nothing is sent: the server splits each request on its own.
    for (protocol, addr, log) in [
        (Protocol::Http, http, &http_log),
        (Protocol::Grpc, grpc, &grpc_log),
    ] {
        log.lock().unwrap().clear();
        let mut cfg = base("rec", format!("http://{addr}"), protocol);
        cfg.requests = Some(5);
        let r = llmops_loadtest::run(cfg).await.unwrap();
        assert_eq!(r.tally.ok, 5, "{protocol:?}: {:?}", r.tally.error_examples);
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 5);
        assert!(
            seen.iter().all(|s| *s == Seen::default()),
            "{protocol:?}: {seen:?}"
        );
        assert!(
            r.table().contains("keys      no session key; no user\n"),
            "{}",
            r.table()
        );
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["config"]["sessions"].is_null() && json["config"]["users"].is_null());
    }
}
