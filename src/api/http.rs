//! The HTTP front end: the OpenAI API (with SSE streaming), tokenization,
//! health, readiness and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use futures::StreamExt;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::{Authenticator, Principal};
use super::error::{ApiError, ErrorType};
use super::generate::{self, finish_reason_str};
use super::openai::*;
use crate::config::LimitsConfig;
use crate::engine::{TokenLogprob, Tokenizer};
use crate::monitor::{Protocol, names};
use crate::router::{Router, Target};
use crate::scheduler::Event;
use crate::validation::{self, GenerationSpec, Input};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// The deployment table.
    pub router: Arc<Router>,
    /// Keys.
    pub auth: Authenticator,
    /// Request limits.
    pub limits: Arc<LimitsConfig>,
    /// Models that must serve for `/ready`.
    pub expected_models: Arc<Vec<String>>,
    /// Prometheus renderer.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Model operations (registry, hot swap) for the admin API.
    pub ops: Option<Arc<crate::registry::ops::ModelOps>>,
}

/// The request id, accepted from `x-request-id` or generated.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A random hex id.
pub fn random_id(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds the router: open endpoints, authenticated API, fallbacks.
pub fn app(state: HttpState, admin: Option<axum::Router<HttpState>>) -> axum::Router {
    let mut api = axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize));
    if let Some(admin) = admin {
        api = api.merge(admin);
    }
    let api = api.layer(middleware::from_fn_with_state(state.clone(), authenticate));
    axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::BadRequest {
                message: "method not allowed on this route".into(),
                param: None,
            }
        })
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn(request_id))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Accepts or generates `x-request-id` and echoes it.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| random_id(16));
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Counts requests by route and status; records failures by error type.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!(names::API_REQUESTS, "protocol" => "http", "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(names::API_DURATION, "protocol" => "http", "route" => route)
        .record(started.elapsed().as_secs_f64());
    if let Some(ErrorType(t)) = resp.extensions().get::<ErrorType>() {
        metrics::counter!(names::FAILURE, "protocol" => "http", "error_type" => *t).increment(1);
    }
    resp
}

async fn authenticate(State(st): State<HttpState>, mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match st.auth.authenticate(header) {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// A JSON body read under the size limit, with errors in the OpenAI shape
/// naming the offending field. An oversized body is read to the end (up to a
/// hard cap) before the 413, so the client sees the answer rather than a
/// reset connection.
pub struct JsonBody<T>(pub T);

/// Bytes read and discarded past the limit before giving up on the connection.
const DRAIN_CAP: usize = 64 << 20;

impl<T: DeserializeOwned> FromRequest<HttpState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &HttpState) -> Result<Self, ApiError> {
        let limit = st.limits.max_body_bytes;
        let mut body = req.into_body();
        let mut buf: Vec<u8> = vec![];
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ApiError::invalid("body", format!("could not read the body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                total += data.len();
                if total <= limit {
                    buf.extend_from_slice(&data);
                } else if total > DRAIN_CAP {
                    break;
                }
            }
        }
        if total > limit {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request body is {}{} bytes; the limit is {limit}",
                if total > DRAIN_CAP { "over " } else { "" },
                total.min(DRAIN_CAP)
            )));
        }
        let de = &mut serde_json::Deserializer::from_slice(&buf);
        match serde_path_to_error::deserialize(de) {
            Ok(v) => Ok(JsonBody(v)),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let param = if path.is_empty() || path == "." {
                    None
                } else {
                    Some(path.clone())
                };
                let message = match inner.classify() {
                    serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                        format!("the body is not valid JSON: {inner}")
                    }
                    _ if param.is_some() => format!("invalid value for `{path}`: {inner}"),
                    _ => format!("invalid request: {inner}"),
                };
                Err(ApiError::BadRequest { message, param })
            }
        }
    }
}

fn u64_to_usize(v: Option<u64>, name: &str, max: usize) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x as u128 > max as u128 => Err(ApiError::invalid(
            name,
            format!("{name} is {x}; at most {max} is allowed"),
        )),
        Some(x) => Ok(Some(x as usize)),
    }
}

fn token_str(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id]).unwrap_or_default()
}

fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: lps
            .iter()
            .map(|l| {
                let token = token_str(tok, l.token);
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: l.logprob,
                    top_logprobs: l
                        .top
                        .iter()
                        .map(|(id, lp)| {
                            let t = token_str(tok, *id);
                            TopLogprob {
                                bytes: t.as_bytes().to_vec(),
                                token: t,
                                logprob: *lp,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

fn completion_logprobs(
    tok: &Tokenizer,
    lps: &[TokenLogprob],
    offset0: usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = offset0;
    for l in lps {
        let t = token_str(tok, l.token);
        out.text_offset.push(offset);
        offset += t.len();
        out.tokens.push(t);
        out.token_logprobs.push(l.logprob);
        out.top_logprobs.push(
            l.top
                .iter()
                .map(|(id, lp)| (token_str(tok, *id), *lp))
                .collect(),
        );
    }
    out
}

async fn chat_completions(
    State(st): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(rid): Extension<RequestId>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let target = st.router.pick(&req.model)?;
    let top = u64_to_usize(
        req.top_logprobs,
        "top_logprobs",
        crate::engine::sampling::MAX_TOP_LOGPROBS,
    )?;
    let logprobs = if req.logprobs {
        Some(top.unwrap_or(0))
    } else if top.is_some() {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs requires logprobs: true",
        ));
    } else {
        None
    };
    let messages = flatten_messages(&req.messages)?;
    let spec = GenerationSpec {
        input: Input::Chat(messages),
        max_tokens: u64_to_usize(
            req.max_completion_tokens.or(req.max_tokens),
            "max_tokens",
            usize::MAX,
        )?,
        sampling: req.sampling().to_params(logprobs)?,
        stop: req
            .stop
            .clone()
            .map(StringOrList::into_vec)
            .unwrap_or_default(),
        stop_token_ids: req.stop_token_ids.clone(),
        ignore_eos: req.ignore_eos,
        n: u64_to_usize(req.n, "n", validation::MAX_N)?.unwrap_or(1),
        deadline: None,
        arrival,
        protocol: Protocol::Http,
    };
    let valid = validation::validate(spec, &target.engine, &st.limits)?;
    let span = tracing::info_span!("chat", request_id = %rid.0, model = %req.model, version = %target.version);
    let _e = span.enter();
    let n = valid.choices.len();
    let sub = generate::submit(&target, valid, principal)?;
    let id = format!("chatcmpl-{}", random_id(12));
    let fingerprint = target.version.clone();
    let model = req.model.clone();
    if req.stream {
        let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
        return Ok(stream_chat(
            target,
            sub,
            id,
            model,
            fingerprint,
            include_usage,
            req.logprobs,
        )
        .into_response());
    }
    let outs =
        futures::future::try_join_all(sub.receivers.into_iter().map(generate::collect)).await;
    let outs = match outs {
        Ok(o) => o,
        Err(e) => {
            sub.principal.refund_tokens(sub.reserved as u64);
            return Err(e);
        }
    };
    let completion_tokens: usize = outs.iter().map(|o| o.completion_tokens).sum();
    let used = completion_tokens;
    let tok = target.engine.tokenizer();
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| ChatChoice {
            index: i,
            logprobs: req.logprobs.then(|| chat_logprobs(tok, &o.logprobs)),
            finish_reason: o.finish_reason.map(finish_reason_str).unwrap_or("stop"),
            message: AssistantMessage {
                role: "assistant",
                content: o.text,
            },
        })
        .collect::<Vec<_>>();
    debug_assert_eq!(choices.len(), n);
    let usage = Usage {
        prompt_tokens: sub.prompt_tokens,
        completion_tokens,
        total_tokens: sub.prompt_tokens + completion_tokens,
    };
    sub.principal
        .refund_tokens(sub.reserved.saturating_sub(sub.prompt_tokens + used) as u64);
    tracing::info!(
        prompt_tokens = usage.prompt_tokens,
        completion_tokens,
        elapsed_ms = arrival.elapsed().as_millis() as u64,
        "chat completion"
    );
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created: unix_now(),
        model,
        system_fingerprint: fingerprint,
        choices,
        usage,
    })
    .into_response())
}

fn sse(data: String) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(data))
}

fn stream_chat(
    target: Arc<Target>,
    sub: generate::Submitted,
    id: String,
    model: String,
    fingerprint: String,
    include_usage: bool,
    want_logprobs: bool,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let created = unix_now();
    let n = sub.receivers.len();
    let prompt_tokens = sub.prompt_tokens;
    let stream = async_stream::stream! {
        let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            system_fingerprint: fingerprint.clone(),
            choices,
            usage,
        };
        for i in 0..n {
            let c = chunk(vec![ChunkChoice { index: i, delta: Delta { role: Some("assistant"), content: Some(String::new()) }, logprobs: None, finish_reason: None }], None);
            yield sse(serde_json::to_string(&c).unwrap_or_default());
        }
        let tok = target.engine.tokenizer().clone();
        let principal = sub.principal.clone();
        let reserved = sub.reserved;
        let mut merged = futures::stream::select_all(
            sub.receivers.into_iter().enumerate().map(|(i, rx)| ReceiverStream::new(rx).map(move |e| (i, e))),
        );
        let mut completion_tokens = 0;
        while let Some((i, ev)) = merged.next().await {
            match ev {
                Event::Token { text, logprob, .. } => {
                    if text.is_empty() && !(want_logprobs && logprob.is_some()) {
                        continue;
                    }
                    let lp = if want_logprobs { logprob.map(|l| chat_logprobs(&tok, &[l])) } else { None };
                    let c = chunk(vec![ChunkChoice { index: i, delta: Delta { role: None, content: Some(text) }, logprobs: lp, finish_reason: None }], None);
                    yield sse(serde_json::to_string(&c).unwrap_or_default());
                }
                Event::Done(done) => {
                    completion_tokens += done.completion_tokens;
                    let content = (!done.tail.is_empty()).then_some(done.tail);
                    let c = chunk(vec![ChunkChoice { index: i, delta: Delta { role: None, content }, logprobs: None, finish_reason: Some(finish_reason_str(done.reason)) }], None);
                    yield sse(serde_json::to_string(&c).unwrap_or_default());
                }
                Event::Failed(e) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    yield sse(ApiError::Internal(e).body().to_string());
                    break;
                }
            }
        }
        principal.refund_tokens(reserved.saturating_sub(prompt_tokens + completion_tokens) as u64);
        if include_usage {
            let u = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
            yield sse(serde_json::to_string(&chunk(vec![], Some(u))).unwrap_or_default());
        }
        yield sse("[DONE]".to_string());
    };
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn completions(
    State(st): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(rid): Extension<RequestId>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let target = st.router.pick(&req.model)?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let logprobs = u64_to_usize(
        req.logprobs,
        "logprobs",
        crate::engine::sampling::MAX_TOP_LOGPROBS,
    )?;
    let inputs: Vec<Input> = match req.prompt.clone() {
        Prompt::Text(t) => vec![Input::Text(t)],
        Prompt::Texts(ts) => ts.into_iter().map(Input::Text).collect(),
        Prompt::Tokens(ids) => vec![Input::Tokens(ids)],
        Prompt::TokenLists(ls) => ls.into_iter().map(Input::Tokens).collect(),
    };
    if inputs.is_empty() || inputs.len() > validation::MAX_N {
        return Err(ApiError::invalid(
            "prompt",
            format!("between 1 and {} prompts per request", validation::MAX_N),
        ));
    }
    let n = u64_to_usize(req.n, "n", validation::MAX_N)?.unwrap_or(1);
    let span = tracing::info_span!("completion", request_id = %rid.0, model = %req.model, version = %target.version);
    let _e = span.enter();
    // Validate every prompt before submitting any.
    let mut valids = vec![];
    for input in inputs {
        let spec = GenerationSpec {
            input,
            // OpenAI's default for this endpoint.
            max_tokens: u64_to_usize(req.max_tokens, "max_tokens", usize::MAX)?.or(Some(16)),
            sampling: req.sampling().to_params(logprobs)?,
            stop: req
                .stop
                .clone()
                .map(StringOrList::into_vec)
                .unwrap_or_default(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            n,
            deadline: None,
            arrival,
            protocol: Protocol::Http,
        };
        valids.push(validation::validate(spec, &target.engine, &st.limits)?);
    }
    let mut subs = vec![];
    for v in valids {
        subs.push(generate::submit(&target, v, principal.clone())?);
    }
    let id = format!("cmpl-{}", random_id(12));
    let fingerprint = target.version.clone();
    let model = req.model.clone();
    if req.stream {
        let include_usage = req.stream_options.map(|o| o.include_usage).unwrap_or(false);
        return Ok(stream_completion(
            target,
            subs,
            id,
            model,
            fingerprint,
            include_usage,
            logprobs.is_some(),
        )
        .into_response());
    }
    let mut choices = vec![];
    let mut usage = Usage::default();
    for mut sub in subs {
        usage.prompt_tokens += sub.prompt_tokens;
        let receivers = std::mem::take(&mut sub.receivers);
        let collected =
            futures::future::try_join_all(receivers.into_iter().map(generate::collect)).await;
        let collected = match collected {
            Ok(c) => c,
            Err(e) => {
                sub.principal.refund_tokens(sub.reserved as u64);
                return Err(e);
            }
        };
        let tok = target.engine.tokenizer();
        let mut used = 0;
        for o in collected {
            used += o.completion_tokens;
            choices.push(CompletionChoice {
                index: choices.len(),
                logprobs: logprobs.map(|_| completion_logprobs(tok, &o.logprobs, 0)),
                finish_reason: o.finish_reason.map(finish_reason_str),
                text: o.text,
            });
        }
        usage.completion_tokens += used;
        sub.principal
            .refund_tokens(sub.reserved.saturating_sub(sub.prompt_tokens + used) as u64);
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created: unix_now(),
        model,
        system_fingerprint: fingerprint,
        choices,
        usage: Some(usage),
    })
    .into_response())
}

fn stream_completion(
    target: Arc<Target>,
    subs: Vec<generate::Submitted>,
    id: String,
    model: String,
    fingerprint: String,
    include_usage: bool,
    want_logprobs: bool,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let created = unix_now();
    let stream = async_stream::stream! {
        let chunk = |choices: Vec<CompletionChoice>, usage: Option<Usage>| Completion {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            system_fingerprint: fingerprint.clone(),
            choices,
            usage,
        };
        let tok = target.engine.tokenizer().clone();
        let prompt_tokens: usize = subs.iter().map(|s| s.prompt_tokens).sum();
        let mut settle = vec![];
        let mut streams = vec![];
        let mut index = 0;
        for sub in subs {
            settle.push((sub.principal.clone(), sub.reserved, sub.prompt_tokens));
            for rx in sub.receivers {
                let i = index;
                index += 1;
                streams.push(ReceiverStream::new(rx).map(move |e| (i, e)));
            }
        }
        let mut merged = futures::stream::select_all(streams);
        let mut completion_tokens = 0;
        let mut offsets = vec![0usize; index];
        while let Some((i, ev)) = merged.next().await {
            match ev {
                Event::Token { text, logprob, .. } => {
                    if text.is_empty() && !(want_logprobs && logprob.is_some()) {
                        continue;
                    }
                    let lp = if want_logprobs { logprob.map(|l| completion_logprobs(&tok, &[l], offsets[i])) } else { None };
                    offsets[i] += text.len();
                    let c = chunk(vec![CompletionChoice { index: i, text, logprobs: lp, finish_reason: None }], None);
                    yield sse(serde_json::to_string(&c).unwrap_or_default());
                }
                Event::Done(done) => {
                    completion_tokens += done.completion_tokens;
                    let c = chunk(vec![CompletionChoice { index: i, text: done.tail, logprobs: None, finish_reason: Some(finish_reason_str(done.reason)) }], None);
                    yield sse(serde_json::to_string(&c).unwrap_or_default());
                }
                Event::Failed(e) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    yield sse(ApiError::Internal(e).body().to_string());
                    break;
                }
            }
        }
        let reserved_total: usize = settle.iter().map(|s| s.1).sum();
        if let Some((p, _, _)) = settle.first() {
            p.refund_tokens(reserved_total.saturating_sub(prompt_tokens + completion_tokens) as u64);
        }
        if include_usage {
            let u = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
            yield sse(serde_json::to_string(&chunk(vec![], Some(u))).unwrap_or_default());
        }
        yield sse("[DONE]".to_string());
    };
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

async fn list_models(State(st): State<HttpState>) -> Json<serde_json::Value> {
    let table = st.router.snapshot();
    let data: Vec<serde_json::Value> = table
        .models
        .values()
        .map(|d| {
            let info = d.stable.engine.info();
            serde_json::json!({
                "id": d.model,
                "object": "model",
                "created": 0,
                "owned_by": "llmops",
                "version": d.stable.version,
                "architecture": info.arch,
                "format": info.format,
                "parameters": info.parameters,
                "max_model_len": d.stable.engine.context_length(),
            })
        })
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(
    State(st): State<HttpState>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let target = st.router.pick(&req.model)?;
    let engine = &target.engine;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => engine
            .tokenizer()
            .encode(p, req.add_special_tokens)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
        (None, Some(m)) => validation::tokenize_input(engine, &Input::Chat(flatten_messages(m)?))?,
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` or `messages`",
            ));
        }
    };
    let strs: Vec<String> = tokens
        .iter()
        .map(|&t| engine.tokenizer().token_text(t).unwrap_or_default())
        .collect();
    Ok(Json(serde_json::json!({
        "tokens": tokens,
        "token_strs": strs,
        "count": tokens.len(),
        "max_model_len": engine.context_length(),
    })))
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    model: String,
    tokens: Vec<u32>,
}

async fn detokenize(
    State(st): State<HttpState>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let target = st.router.pick(&req.model)?;
    let vocab = target.engine.tokenizer().vocab_size() as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary ({vocab} tokens)"),
        ));
    }
    let text = target
        .engine
        .tokenizer()
        .decode(&req.tokens)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(serde_json::json!({"prompt": text})))
}

async fn ready(State(st): State<HttpState>) -> Response {
    let table = st.router.snapshot();
    let mut not_ready = vec![];
    for name in st.expected_models.iter() {
        match table.models.get(name) {
            Some(d) if d.stable.engine.is_ready() => {}
            _ => not_ready.push(name.clone()),
        }
    }
    if not_ready.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response()
    } else {
        ApiError::Unavailable(format!("not ready: {}", not_ready.join(", "))).into_response()
    }
}

async fn metrics(State(st): State<HttpState>, _headers: HeaderMap) -> Response {
    match &st.metrics {
        Some(h) => (
            [("content-type", "text/plain; version=0.0.4")],
            crate::monitor::exporter::render(h),
        )
            .into_response(),
        None => ApiError::NotFound("metrics are disabled".into()).into_response(),
    }
}

/// Serves `/metrics` alone (the optional separate metrics address).
pub fn metrics_app(handle: metrics_exporter_prometheus::PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let h = handle.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    crate::monitor::exporter::render(&h),
                )
            }
        }),
    )
}
