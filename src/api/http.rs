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
use tracing::Instrument;

use super::auth::{Authenticator, Principal};
use super::error::{ApiError, ErrorType};
use super::openai::*;
use crate::config::LimitsConfig;
use crate::engine::{TokenLogprob, Tokenizer};
use crate::infer::{self, Generation};
use crate::monitor::{Protocol, names};
use crate::router::{Picked, RouteKey, Router, Target};
use crate::scheduler::{Event, FinishReason};
use crate::validation::{self, GenerationSpec, Input};

pub mod embeddings;
pub mod responses;

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
    pub ops: Option<Arc<crate::control::Controller>>,
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
        .route("/detokenize", post(detokenize))
        .route("/v1/embeddings", post(embeddings::create))
        .merge(responses::routes());
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
        // axum adds the route's `Allow` header to this answer.
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::MethodNotAllowed(format!(
                "{} is not allowed on this route (see the Allow header)",
                req.method()
            ))
        })
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn(request_id))
        // `JsonBody` reads under this limit itself (draining the rest for a
        // clean 413); every other extractor that reads a body obeys it.
        .layer(axum::extract::DefaultBodyLimit::max(
            state.limits.max_body_bytes,
        ))
        // A bug that panics in a handler answers 500 in the OpenAI shape
        // and is logged, rather than closing the client's connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

fn panicked(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    ApiError::Internal(format!("handler panicked: {what}")).into_response()
}

/// Accepts or generates `x-request-id` and echoes it; a generated one is
/// also set on the request, so gRPC handlers (which read metadata) see it
/// as HTTP handlers do.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string);
    let id = match given {
        Some(id) => id,
        None => {
            let id = random_id(16);
            if let Ok(v) = HeaderValue::from_str(&id) {
                req.headers_mut().insert("x-request-id", v);
            }
            id
        }
    };
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
        let buf = read_body(req, st.limits.max_body_bytes).await?;
        parse_json(&buf).map(JsonBody)
    }
}

/// Like [`JsonBody`], for routes whose body is optional: an empty (or
/// all-whitespace) body is `None`.
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<T: DeserializeOwned> FromRequest<HttpState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &HttpState) -> Result<Self, ApiError> {
        let buf = read_body(req, st.limits.max_body_bytes).await?;
        if buf.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        parse_json(&buf).map(|v| OptionalJsonBody(Some(v)))
    }
}

/// Reads a body under `limit`. An oversized body is read to the end (up to
/// a hard cap) before the 413, so the client sees the answer rather than a
/// reset connection.
async fn read_body(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = req.into_body();
    let mut buf: Vec<u8> = vec![];
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match crate::api::listen::body_timeout(&e) {
            Some(t) => ApiError::RequestTimeout(t.to_string()),
            None => ApiError::invalid("body", format!("could not read the body: {e}")),
        })?;
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
    Ok(buf)
}

/// Parses a request body, naming the offending field in errors. Fields
/// flattened into a request (the generation parameters both endpoints share)
/// are invisible to `serde_path_to_error`, so when an error has no path the
/// culprit is found by leaving out one top-level key at a time (the first 64
/// only: this is the error path, and it must stay cheap for hostile bodies).
pub fn parse_json<T: DeserializeOwned>(buf: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(buf).map_err(|e| ApiError::BadRequest {
            message: format!("the body is not valid JSON: {e}"),
            param: None,
        })?;
    let err = match serde_path_to_error::deserialize::<_, T>(&value) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let mut path = err.path().to_string();
    let inner = err.into_inner();
    if (path.is_empty() || path == ".")
        && let Some(obj) = value.as_object()
        && !inner.to_string().starts_with("missing field")
    {
        let culprit = obj.keys().take(64).find(|k| {
            let mut rest = obj.clone();
            rest.remove(*k);
            // The culprit is the key whose removal makes this error go away
            // (not one whose removal only makes a required field missing).
            match T::deserialize(&serde_json::Value::Object(rest)) {
                Ok(_) => true,
                Err(e) => {
                    let e = e.to_string();
                    e != inner.to_string() && !e.starts_with(&format!("missing field `{k}`"))
                }
            }
        });
        if let Some(k) = culprit {
            path = k.clone();
        }
    }
    let param = (!path.is_empty() && path != ".").then(|| path.clone());
    let message = match &param {
        Some(p) => format!("invalid value for `{p}`: {inner}"),
        None => format!("invalid request: {inner}"),
    };
    Err(ApiError::BadRequest { message, param })
}

/// A count from the wire as a `usize`: ranges are validation's to decide
/// (one rule, one message for both protocols), so a value past `usize`
/// saturates rather than failing here.
fn count(v: Option<u64>) -> Option<usize> {
    v.map(|x| usize::try_from(x).unwrap_or(usize::MAX))
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

/// When the request must end: the server's request timeout, or less when
/// the client asks for less with `x-request-timeout` (seconds).
fn deadline(
    headers: &HeaderMap,
    limits: &LimitsConfig,
    arrival: Instant,
) -> Result<Instant, ApiError> {
    let asked = match headers.get("x-request-timeout") {
        None => None,
        Some(v) => {
            let secs = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "x-request-timeout",
                        "x-request-timeout must be a positive number of seconds",
                    )
                })?;
            Some(Duration::from_secs_f64(secs.min(1e6)))
        }
    };
    let timeout = asked.map_or(limits.request_timeout, |a| a.min(limits.request_timeout));
    Ok(arrival + timeout)
}

/// The request's generation settings in protocol-neutral form, for `input`.
fn spec(
    common: &GenerationFields,
    input: Input,
    max_tokens: Option<usize>,
    logprobs: Option<usize>,
    arrival: Instant,
    deadline: Instant,
) -> Result<GenerationSpec, ApiError> {
    Ok(GenerationSpec {
        input,
        max_tokens,
        sampling: common.sampling.to_params(logprobs)?,
        stop: common
            .stop
            .clone()
            .map(StringOrList::into_vec)
            .unwrap_or_default(),
        stop_token_ids: common.stop_token_ids.clone(),
        ignore_eos: common.ignore_eos,
        n: count(common.n).unwrap_or(1),
        deadline: Some(deadline),
        arrival,
        protocol: Protocol::Http,
        constraint: common.structured.constraint()?,
        tools: vec![],
    })
}

/// The request's identities for the canary split: the `x-llmops-route-key`
/// header (a session id the client chooses), the OpenAI `user` field, the
/// API key, the request id.
fn route_key(
    headers: &HeaderMap,
    user: Option<&str>,
    principal: &Principal,
    rid: &RequestId,
) -> RouteKey {
    RouteKey {
        session: headers
            .get("x-llmops-route-key")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string),
        user: user.filter(|u| !u.is_empty()).map(str::to_string),
        api_key: (principal.key_id != "anonymous").then(|| principal.key_id.clone()),
        request: rid.0.clone(),
    }
}

/// Refuses unsupported parameters, then picks the request's target by its
/// route key.
fn pick(
    st: &HttpState,
    model: &str,
    headers: &HeaderMap,
    common: &GenerationFields,
    principal: &Principal,
    rid: &RequestId,
) -> Result<Picked, ApiError> {
    common.refuse_unsupported()?;
    Ok(st.router.pick(
        model,
        &route_key(headers, common.user.as_deref(), principal, rid),
    )?)
}

/// A count of log-prob alternatives, within the engine's limit (checked
/// here because the completions API calls it `logprobs`, and the engine's
/// check would name `top_logprobs`).
fn alternatives(v: Option<u64>, name: &str) -> Result<Option<usize>, ApiError> {
    let max = crate::engine::sampling::MAX_TOP_LOGPROBS;
    match count(v) {
        Some(x) if x > max => Err(ApiError::invalid(
            name,
            format!("{name} is {x}; at most {max} is allowed"),
        )),
        v => Ok(v),
    }
}

/// What every response and chunk of one request repeats: a new id with
/// `prefix`, the `object` kind, now, the model as asked, the serving version.
fn response_head(prefix: &str, object: &'static str, model: &str, target: &Target) -> ResponseHead {
    ResponseHead {
        id: format!("{prefix}-{}", random_id(12)),
        object,
        created: unix_now(),
        model: model.to_string(),
        system_fingerprint: target.version.clone(),
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

async fn chat_completions(
    State(st): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let picked = pick(&st, &req.model, &headers, &req.common, &principal, &rid)?;
    let target = picked.target.clone();
    let top = alternatives(req.top_logprobs, "top_logprobs")?;
    let logprobs = match (req.logprobs, top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ));
        }
        (false, None) => None,
    };
    let max_tokens = count(req.max_completion_tokens.or(req.common.max_tokens));
    let input = Input::Chat(flatten_messages(&req.messages)?);
    let until = deadline(&headers, &st.limits, arrival)?;
    let tools = crate::tools::Tools::from_wire(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )
    .map_err(super::structured::tool_error)?;
    let mut spec = spec(&req.common, input, max_tokens, logprobs, arrival, until)?;
    super::structured::with_tools(&mut spec, &tools)?;
    let span = tracing::info_span!("chat", request_id = %rid.0, model = %req.model, version = %target.version);
    // The span is entered only where no await follows: a guard held across
    // an await leaves it current on a worker thread that runs other tasks,
    // whose spans then name a parent that may be closed (tracing panics).
    let valid = infer::validate(&target, vec![spec], &st.limits)
        .instrument(span.clone())
        .await?;
    let generation = span.in_scope(|| infer::submit(&picked, valid, &principal.quota))?;
    let object = if req.common.stream {
        "chat.completion.chunk"
    } else {
        "chat.completion"
    };
    let head = response_head("chatcmpl", object, &req.model, &target);
    let tok = target.engine.tokenizer().clone();
    let family = crate::tools::Family::of_template(target.engine.chat_template().source());
    let tools = tools.active().then(|| Arc::new((tools, family)));
    if req.common.stream {
        let writer = ChatWriter {
            head,
            tok,
            logprobs: req.logprobs,
            tools: tools.map(|t| ToolStream {
                tools: t,
                choices: vec![Mode::Undecided(String::new()); generation.choices()],
            }),
        };
        return Ok(sse_stream(generation, writer, req.common.include_usage()).into_response());
    }
    whole(generation, span, arrival, head, |i, o| {
        let reason = o.finish_reason.map_or("stop", FinishReason::as_str);
        let (content, calls) = match &tools {
            Some(t) => {
                let p = crate::tools::parse(&t.0, t.1, &o.text);
                (p.content, p.calls)
            }
            None => (Some(o.text), vec![]),
        };
        ChatChoice {
            index: i,
            logprobs: req.logprobs.then(|| chat_logprobs(&tok, &o.logprobs)),
            finish_reason: tool_finish(reason, !calls.is_empty()),
            message: AssistantMessage {
                role: "assistant",
                content,
                tool_calls: calls.into_iter().map(WireToolCall::new).collect(),
            },
        }
    })
    .await
}

async fn completions(
    State(st): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let picked = pick(&st, &req.model, &headers, &req.common, &principal, &rid)?;
    let target = picked.target.clone();
    let logprobs = alternatives(req.logprobs, "logprobs")?;
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
    // OpenAI's default for this endpoint.
    let max_tokens = count(req.common.max_tokens).or(Some(16));
    let until = deadline(&headers, &st.limits, arrival)?;
    let specs = inputs
        .into_iter()
        .map(|input| spec(&req.common, input, max_tokens, logprobs, arrival, until))
        .collect::<Result<Vec<_>, _>>()?;
    let span = tracing::info_span!("completion", request_id = %rid.0, model = %req.model, version = %target.version);
    // Every prompt is validated before any is submitted. (The span is never
    // entered across an await: see `chat_completions`.)
    let valid = infer::validate(&target, specs, &st.limits)
        .instrument(span.clone())
        .await?;
    let generation = span.in_scope(|| infer::submit(&picked, valid, &principal.quota))?;
    let head = response_head("cmpl", "text_completion", &req.model, &target);
    let tok = target.engine.tokenizer().clone();
    if req.common.stream {
        let writer = CompletionWriter {
            head,
            tok,
            logprobs: logprobs.is_some(),
            offsets: vec![0; generation.choices()],
        };
        return Ok(sse_stream(generation, writer, req.common.include_usage()).into_response());
    }
    whole(generation, span, arrival, head, |i, o| CompletionChoice {
        index: i,
        logprobs: logprobs.map(|_| completion_logprobs(&tok, &o.logprobs, 0)),
        finish_reason: o.finish_reason.map(FinishReason::as_str),
        text: o.text,
    })
    .await
}

/// A non-streaming answer: waits for every choice inside the request's
/// span (never entered across the await), makes each one a `C`, and
/// answers the whole reply with its usage.
async fn whole<C: serde::Serialize>(
    generation: Generation,
    span: tracing::Span,
    arrival: Instant,
    head: ResponseHead,
    choice: impl Fn(usize, infer::ChoiceOutput) -> C,
) -> Result<Response, ApiError> {
    let prompt_tokens = generation.prompt_tokens;
    let outs = within_deadline(generation.collect().instrument(span.clone()).await?)?;
    let _e = span.enter();
    let completion_tokens = outs.iter().map(|o| o.completion_tokens).sum();
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| choice(i, o))
        .collect();
    tracing::info!(
        prompt_tokens,
        completion_tokens,
        elapsed_ms = arrival.elapsed().as_millis() as u64,
        "{} answered",
        head.object
    );
    Ok(Json(Reply {
        head,
        choices,
        usage: Some(usage(prompt_tokens, completion_tokens)),
    })
    .into_response())
}

/// A generation whose deadline passed is an error (504), not a short answer.
fn within_deadline(outs: Vec<infer::ChoiceOutput>) -> Result<Vec<infer::ChoiceOutput>, ApiError> {
    if outs
        .iter()
        .any(|o| o.finish_reason == Some(FinishReason::Timeout))
    {
        return Err(deadline_passed());
    }
    Ok(outs)
}

fn deadline_passed() -> ApiError {
    ApiError::DeadlineExceeded(
        "the request's deadline passed before it finished (see x-request-timeout)".into(),
    )
}

fn sse(data: String) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(data))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// How one endpoint writes its stream chunks; [`sse_stream`] does the rest.
trait ChunkWriter: Send + 'static {
    /// Chunks sent before any token.
    fn opening(&self, _choices: usize) -> Vec<String> {
        vec![]
    }
    /// A token's chunk, or `None` when there is nothing to send.
    fn token(
        &mut self,
        choice: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    ) -> Option<String>;
    /// A choice's last chunk.
    fn done(&mut self, choice: usize, tail: String, reason: FinishReason) -> String;
    /// The final usage chunk.
    fn usage(&self, usage: Usage) -> String;
}

/// Streams a generation as server-sent events: the writer's chunks, the
/// usage chunk when asked, then `[DONE]`. An engine failure, or an engine
/// that stops without finishing a choice, ends the stream with an error
/// event and no `[DONE]`, so a client never mistakes it for a complete
/// answer.
fn sse_stream(
    generation: Generation,
    mut w: impl ChunkWriter,
    include_usage: bool,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let n = generation.choices();
    let prompt_tokens = generation.prompt_tokens;
    let stream = async_stream::stream! {
        for c in w.opening(n) {
            yield sse(c);
        }
        let mut events = generation.events();
        let mut completion_tokens = 0;
        let mut open = n;
        while let Some((i, ev)) = events.next().await {
            match ev {
                Event::Token { text, logprob, .. } => {
                    if let Some(c) = w.token(i, text, logprob) {
                        yield sse(c);
                    }
                }
                Event::Done(done) if done.reason == FinishReason::Timeout => {
                    yield sse(deadline_passed().body().to_string());
                    return;
                }
                Event::Done(done) => {
                    open -= 1;
                    completion_tokens += done.completion_tokens;
                    yield sse(w.done(i, done.tail, done.reason));
                }
                Event::Failed(e) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    yield sse(ApiError::Internal(e).body().to_string());
                    return;
                }
            }
        }
        if open > 0 {
            let e = ApiError::Internal("the engine stopped before the request finished".into());
            tracing::error!("an engine stopped mid-stream");
            yield sse(e.body().to_string());
            return;
        }
        if include_usage {
            yield sse(w.usage(usage(prompt_tokens, completion_tokens)));
        }
        yield sse("[DONE]".to_string());
    };
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `tool_calls` when a choice that stopped made calls (OpenAI's reason);
/// `length` stays `length`.
fn tool_finish(reason: &'static str, calls: bool) -> &'static str {
    if calls && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// `chat.completion.chunk`s.
struct ChatWriter {
    /// Every chunk's head (`chat.completion.chunk`).
    head: ResponseHead,
    tok: Tokenizer,
    logprobs: bool,
    /// Set when the model may call tools.
    tools: Option<ToolStream>,
}

/// A tool-calling stream: what each choice has written that may be calls.
/// Text that cannot be a call streams as content; a call (a named or
/// required choice's whole output; in `auto`, output that opens like JSON
/// or from a family's call marker on) is held and sent whole, as
/// `tool_calls` deltas, in the choice's last chunk, parsed exactly as the
/// non-streamed answer is.
struct ToolStream {
    tools: Arc<(crate::tools::Tools, crate::tools::Family)>,
    choices: Vec<Mode>,
}

/// What a choice of a tool-calling stream is writing.
#[derive(Debug, Clone)]
enum Mode {
    /// Nothing but blanks yet (held).
    Undecided(String),
    /// Content, streamed; the held tail may be the start of a call marker.
    Text(String),
    /// Possibly calls, held whole: the content already sent, the rest.
    Calls(String, String),
}

/// Call markers that switch `auto` content to held text.
const CALL_MARKERS: [&str; 2] = ["<tool_call>", "[TOOL_CALLS]"];

/// How much of `s` can be sent as content: all but a tail that is the
/// start of a call marker.
fn sendable(s: &str) -> usize {
    for (i, _) in s.char_indices().rev().take(12) {
        let tail = &s[i..];
        if CALL_MARKERS.iter().any(|m| m.starts_with(tail)) {
            return i;
        }
    }
    s.len()
}

impl ToolStream {
    /// The content to send now for choice `i` after `text`.
    fn push(&mut self, i: usize, text: &str) -> Option<String> {
        use crate::tools::ToolChoice;
        let auto = self.tools.0.choice == ToolChoice::Auto;
        let mode = self.choices.get_mut(i)?;
        match mode {
            Mode::Undecided(held) => {
                held.push_str(text);
                let start = held.trim_start();
                if start.is_empty() {
                    return None;
                }
                let call_like = !auto
                    || start.starts_with(['{', '[', '`'])
                    || CALL_MARKERS
                        .iter()
                        .any(|m| m.starts_with(start) || start.starts_with(m))
                    || start.starts_with("<|python_tag|>");
                let held = std::mem::take(held);
                *mode = if call_like {
                    Mode::Calls(String::new(), held)
                } else {
                    Mode::Text(held)
                };
                self.push(i, "")
            }
            Mode::Text(held) => {
                held.push_str(text);
                if let Some(at) = CALL_MARKERS.iter().filter_map(|m| held.find(m)).min() {
                    let send = held[..at].to_string();
                    let rest = held[at..].to_string();
                    *mode = Mode::Calls(send.clone(), rest);
                    return (!send.is_empty()).then_some(send);
                }
                let n = sendable(held);
                let send: String = held.drain(..n).collect();
                (!send.is_empty()).then_some(send)
            }
            Mode::Calls(_, held) => {
                held.push_str(text);
                None
            }
        }
    }

    /// Choice `i`'s last content and its calls.
    fn finish(&mut self, i: usize, tail: &str) -> (Option<String>, Vec<crate::tools::ToolCall>) {
        let _ = self.push(i, tail);
        let Some(mode) = self.choices.get_mut(i) else {
            return (None, vec![]);
        };
        match std::mem::replace(mode, Mode::Undecided(String::new())) {
            Mode::Undecided(held) | Mode::Text(held) => {
                ((!held.is_empty()).then_some(held), vec![])
            }
            Mode::Calls(sent, held) => {
                let whole = format!("{sent}{held}");
                let p = crate::tools::parse(&self.tools.0, self.tools.1, &whole);
                if p.calls.is_empty() {
                    return ((!held.is_empty()).then_some(held), vec![]);
                }
                // The content the non-streamed answer has, less what was
                // already sent.
                let content = p
                    .content
                    .and_then(|c| c.strip_prefix(sent.trim()).map(str::to_string))
                    .filter(|c| !c.is_empty());
                (content, p.calls)
            }
        }
    }
}

impl ChatWriter {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> String {
        json(&ChatChunk {
            head: self.head.clone(),
            choices,
            usage,
        })
    }

    fn choice(&self, index: usize, content: Option<String>) -> ChunkChoice {
        ChunkChoice {
            index,
            delta: Delta {
                role: None,
                content,
                tool_calls: vec![],
            },
            logprobs: None,
            finish_reason: None,
        }
    }
}

impl ChunkWriter for ChatWriter {
    fn opening(&self, choices: usize) -> Vec<String> {
        (0..choices)
            .map(|i| {
                let mut c = self.choice(i, Some(String::new()));
                c.delta.role = Some("assistant");
                self.chunk(vec![c], None)
            })
            .collect()
    }

    fn token(&mut self, i: usize, text: String, logprob: Option<TokenLogprob>) -> Option<String> {
        if let Some(t) = self.tools.as_mut() {
            // Tool calls are sent whole; log-probabilities are not streamed
            // with them.
            let send = t.push(i, &text)?;
            return Some(self.chunk(vec![self.choice(i, Some(send))], None));
        }
        let logprob = logprob.filter(|_| self.logprobs);
        if text.is_empty() && logprob.is_none() {
            return None;
        }
        let mut c = self.choice(i, Some(text));
        c.logprobs = logprob.map(|l| chat_logprobs(&self.tok, &[l]));
        Some(self.chunk(vec![c], None))
    }

    fn done(&mut self, i: usize, tail: String, reason: FinishReason) -> String {
        let (content, calls) = match self.tools.as_mut() {
            Some(t) => t.finish(i, &tail),
            None => ((!tail.is_empty()).then_some(tail), vec![]),
        };
        let mut c = self.choice(i, content);
        c.finish_reason = Some(tool_finish(reason.as_str(), !calls.is_empty()));
        c.delta.tool_calls = calls
            .into_iter()
            .enumerate()
            .map(|(index, call)| ToolCallDelta {
                index,
                call: WireToolCall::new(call),
            })
            .collect();
        self.chunk(vec![c], None)
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(vec![], Some(usage))
    }
}

/// `text_completion` chunks.
struct CompletionWriter {
    /// Every chunk's head (`text_completion`).
    head: ResponseHead,
    tok: Tokenizer,
    logprobs: bool,
    /// Characters streamed so far per choice (logprobs' `text_offset`).
    offsets: Vec<usize>,
}

impl CompletionWriter {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        json(&Completion {
            head: self.head.clone(),
            choices,
            usage,
        })
    }
}

impl ChunkWriter for CompletionWriter {
    fn token(&mut self, i: usize, text: String, logprob: Option<TokenLogprob>) -> Option<String> {
        let logprob = logprob.filter(|_| self.logprobs);
        if text.is_empty() && logprob.is_none() {
            return None;
        }
        let offset = self.offsets.get(i).copied().unwrap_or(0);
        let logprobs = logprob.map(|l| completion_logprobs(&self.tok, &[l], offset));
        if let Some(o) = self.offsets.get_mut(i) {
            *o += text.len();
        }
        Some(self.chunk(
            vec![CompletionChoice {
                index: i,
                text,
                logprobs,
                finish_reason: None,
            }],
            None,
        ))
    }

    fn done(&mut self, i: usize, tail: String, reason: FinishReason) -> String {
        self.chunk(
            vec![CompletionChoice {
                index: i,
                text: tail,
                logprobs: None,
                finish_reason: Some(reason.as_str()),
            }],
            None,
        )
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(vec![], Some(usage))
    }
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
                "engine_path": info.engine_path,
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
    Extension(principal): Extension<Arc<Principal>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.quota.charge_request()?;
    let target = st.router.pick(&req.model, &RouteKey::default())?.target;
    // Tokenizing and templating are CPU work proportional to the body: on
    // the blocking pool, never on a tokio worker.
    tokio::task::spawn_blocking(move || {
        let engine = &target.engine;
        let tokens = match (&req.prompt, &req.messages) {
            (Some(p), None) => engine
                .tokenizer()
                .encode(p, req.add_special_tokens)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
            (None, Some(m)) => {
                validation::tokenize_input(engine, &Input::Chat(flatten_messages(m)?))?
            }
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
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenize task failed: {e}")))?
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
    let target = st.router.pick(&req.model, &RouteKey::default())?.target;
    let vocab = target.engine.tokenizer().vocab_size() as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary ({vocab} tokens)"),
        ));
    }
    let text = tokio::task::spawn_blocking(move || target.engine.tokenizer().decode(&req.tokens))
        .await
        .map_err(|e| ApiError::Internal(format!("detokenize task failed: {e}")))?
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
    // A fleet replica whose shared registry is unreachable still serves
    // its last known state: ready, with the registry's state in the body.
    let fleet = st.ops.as_ref().and_then(|o| o.fleet_status());
    if not_ready.is_empty() {
        let mut body = serde_json::json!({"status": "ready"});
        if let Some(f) = fleet {
            body["fleet"] = f;
        }
        (StatusCode::OK, Json(body)).into_response()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_openai_shape() {
        let app = axum::Router::new()
            .route(
                "/boom",
                get(|| async {
                    if std::hint::black_box(true) {
                        panic!("boom");
                    }
                }),
            )
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked));
        let r = tower::ServiceExt::oneshot(
            app,
            axum::http::Request::get("/boom")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "server_error", "{v}");
    }

    #[test]
    fn replies_open_with_the_head_and_show_usage_only_when_there_is_one() {
        let head = ResponseHead {
            id: "chatcmpl-x".into(),
            object: "chat.completion.chunk",
            created: 7,
            model: "m".into(),
            system_fingerprint: "v1".into(),
        };
        let chunk = ChatChunk {
            head: head.clone(),
            choices: vec![],
            usage: None,
        };
        assert_eq!(
            json(&chunk),
            r#"{"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"m","system_fingerprint":"v1","choices":[]}"#
        );
        let whole = Completion {
            head: ResponseHead {
                object: "text_completion",
                ..head
            },
            choices: vec![],
            usage: Some(usage(2, 3)),
        };
        assert_eq!(
            json(&whole),
            r#"{"id":"chatcmpl-x","object":"text_completion","created":7,"model":"m","system_fingerprint":"v1","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}"#
        );
    }

    /// The server's limit in these cases: 900 s.
    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_body_bytes: 1 << 20,
            max_prompt_tokens: None,
            max_tokens: None,
            request_timeout: Duration::from_secs(900),
        }
    }

    /// (case, `x-request-timeout`, the deadline after arrival in ms, or the
    /// request refused).
    #[rustfmt::skip] // one row a case
    const DEADLINES: &[(&str, Option<&str>, Option<u64>)] = &[
        ("no header: the server's limit", None, Some(900_000)),
        ("less than the limit", Some("2.5"), Some(2_500)),
        ("white space around it", Some(" 30 "), Some(30_000)),
        ("more than the limit is capped", Some("3600"), Some(900_000)),
        ("absurdly large is capped", Some("1e300"), Some(900_000)),
        ("zero", Some("0"), None),
        ("negative", Some("-1"), None),
        ("not a number", Some("soon"), None),
        ("not finite", Some("inf"), None),
        ("NaN", Some("NaN"), None),
    ];

    #[test]
    fn a_request_deadline_is_the_servers_limit_or_less_when_the_client_asks() {
        let arrival = Instant::now();
        for &(case, header, want) in DEADLINES {
            let mut headers = HeaderMap::new();
            if let Some(h) = header {
                headers.insert("x-request-timeout", h.parse().unwrap());
            }
            match (deadline(&headers, &limits(), arrival), want) {
                (Ok(at), Some(ms)) => {
                    assert_eq!(at - arrival, Duration::from_millis(ms), "{case}")
                }
                (Err(e), None) => {
                    assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{case}");
                    assert_eq!(e.body()["error"]["param"], "x-request-timeout", "{case}");
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn counts_past_usize_saturate_for_validation_to_refuse() {
        assert_eq!(count(None), None);
        assert_eq!(count(Some(7)), Some(7));
        assert_eq!(
            count(Some(u64::MAX)),
            Some(usize::try_from(u64::MAX).unwrap_or(usize::MAX))
        );
    }
}
