//! `llmops.v1.Inference`: Generate, GenerateStream, Tokenize, ListModels,
//! Embed.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::api::auth::{Authenticator, Principal};
use crate::api::error::ApiError;
use crate::config::LimitsConfig;
use crate::engine::{Message, SamplingParams, TokenLogprob, Tokenizer};
use crate::infer::{self, Generation};
use crate::monitor::{Protocol, names};
use crate::router::{RouteKey, Router, Target};
use crate::scheduler::{Event, FinishReason};
use crate::tools::{Family, Tools};
use crate::validation::{GenerationSpec, Input};

use crate::proto as pb;
use pb::inference_server::Inference;

/// State of the inference service.
#[derive(Clone)]
pub struct InferenceService {
    /// The deployment table.
    pub router: Arc<Router>,
    /// Keys.
    pub auth: Authenticator,
    /// Limits.
    pub limits: Arc<LimitsConfig>,
}

/// How much earlier than the caller's timeout we end a request: a tenth of
/// it, at least 5 ms (scheduling jitter) and at most 50 ms, never more than
/// half of it.
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 10)
        .clamp(Duration::from_millis(5), Duration::from_millis(50))
        .min(timeout / 2)
}

/// Parses a `grpc-timeout` value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn metadata_str<'a, T>(req: &'a Request<T>, key: &str) -> Option<&'a str> {
    req.metadata().get(key).and_then(|v| v.to_str().ok())
}

fn record(route: &'static str, started: Instant, code: tonic::Code) {
    let status = format!("{code:?}");
    metrics::counter!(names::API_REQUESTS, "protocol" => "grpc", "route" => route, "status" => status).increment(1);
    metrics::histogram!(names::API_DURATION, "protocol" => "grpc", "route" => route)
        .record(started.elapsed().as_secs_f64());
}

fn fail(route: &'static str, started: Instant, e: impl Into<ApiError>) -> Status {
    let e = e.into();
    record(route, started, e.grpc_code());
    metrics::counter!(names::FAILURE, "protocol" => "grpc", "error_type" => e.error_type())
        .increment(1);
    e.into()
}

fn finish_reason(r: FinishReason) -> i32 {
    (match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Timeout => pb::FinishReason::Timeout,
        FinishReason::Aborted => pb::FinishReason::Aborted,
    }) as i32
}

fn logprobs_pb(tok: &Tokenizer, lps: &[TokenLogprob]) -> Vec<pb::TokenLogprob> {
    lps.iter()
        .map(|l| pb::TokenLogprob {
            token_id: l.token,
            token: tok.decode(&[l.token]).unwrap_or_default(),
            logprob: l.logprob,
            top: l
                .top
                .iter()
                .map(|(id, lp)| pb::TopLogprob {
                    token_id: *id,
                    token: tok.decode(&[*id]).unwrap_or_default(),
                    logprob: *lp,
                })
                .collect(),
        })
        .collect()
}

impl InferenceService {
    /// Authenticates, picks the target, validates and submits.
    async fn start(
        &self,
        req: &Request<pb::GenerateRequest>,
        started: Instant,
    ) -> Result<(Arc<Target>, Generation, Option<ToolsOf>), ApiError> {
        let principal = self.principal(req)?;
        let key = RouteKey {
            session: metadata_str(req, "x-llmops-route-key")
                .filter(|k| !k.is_empty())
                .map(str::to_string),
            user: Some(req.get_ref().user.clone()).filter(|u| !u.is_empty()),
            api_key: (principal.key_id != "anonymous").then(|| principal.key_id.clone()),
            request: metadata_str(req, "x-request-id")
                .unwrap_or_default()
                .to_string(),
        };
        let picked = self.router.pick(&req.get_ref().model, &key)?;
        let mut spec = self.spec(req, started)?;
        let tools = tools_of(req.get_ref())?;
        if tools.active() && !matches!(spec.input, Input::Chat(_)) {
            return Err(ApiError::invalid("tools", "tools need a chat input"));
        }
        crate::api::structured::with_tools(&mut spec, &tools)?;
        let valid = infer::validate(&picked.target, vec![spec], &self.limits).await?;
        let generation = infer::submit(&picked, valid, &principal.quota)?;
        let family = Family::of_template(picked.target.engine.chat_template().source());
        let tools = tools.active().then(|| Arc::new((tools, family)));
        Ok((picked.target, generation, tools))
    }

    fn principal<T>(&self, req: &Request<T>) -> Result<Arc<Principal>, ApiError> {
        self.auth.authenticate(metadata_str(req, "authorization"))
    }

    fn spec(
        &self,
        req: &Request<pb::GenerateRequest>,
        arrival: Instant,
    ) -> Result<GenerationSpec, ApiError> {
        // End a little before the caller's own timer fires, so it receives our
        // DEADLINE_EXCEEDED (with the sequence already freed) rather than
        // racing its local cancellation.
        let deadline = metadata_str(req, "grpc-timeout")
            .and_then(parse_grpc_timeout)
            .map(|d| arrival + d - deadline_margin(d))
            .or(Some(arrival + self.limits.request_timeout));
        let r = req.get_ref();
        let input = match &r.input {
            Some(pb::generate_request::Input::Prompt(p)) => Input::Text(p.clone()),
            Some(pb::generate_request::Input::Chat(c)) => Input::Chat(
                c.messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let tool_calls = m
                            .tool_calls
                            .iter()
                            .map(|c| {
                                crate::tools::history_call(&serde_json::json!({
                                    "id": c.id,
                                    "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments},
                                }))
                                .map_err(|e| {
                                    ApiError::invalid("chat", format!("chat.messages[{i}]: {e}"))
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(Message {
                            role: m.role.clone(),
                            content: m.content.clone(),
                            tool_calls,
                            tool_call_id: Some(m.tool_call_id.clone()).filter(|t| !t.is_empty()),
                        })
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?,
            ),
            Some(pb::generate_request::Input::PromptTokens(t)) => Input::Tokens(t.ids.clone()),
            None => {
                return Err(ApiError::invalid(
                    "input",
                    "one of prompt, chat or prompt_tokens is required",
                ));
            }
        };
        let s = r.sampling.unwrap_or_default();
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(0.0),
            top_p: s.top_p.unwrap_or(1.0),
            top_k: s.top_k.unwrap_or(0) as usize,
            min_p: s.min_p.unwrap_or(0.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            presence_penalty: s.presence_penalty.unwrap_or(0.0),
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
            seed: s.seed,
            logprobs: r.logprobs.map(|n| n as usize),
        };
        Ok(GenerationSpec {
            input,
            max_tokens: (r.max_tokens > 0).then_some(r.max_tokens as usize),
            sampling,
            stop: r.stop.clone(),
            stop_token_ids: r.stop_token_ids.clone(),
            ignore_eos: r.ignore_eos,
            n: 1,
            deadline,
            arrival,
            protocol: Protocol::Grpc,
            constraint: crate::api::structured::from_proto(r.constraint.as_ref())?,
            tools: vec![],
        })
    }
}

/// A request's tools and how its model writes calls.
type ToolsOf = Arc<(Tools, Family)>;

/// The tools of a `GenerateRequest`, checked as the chat API's are.
fn tools_of(r: &pb::GenerateRequest) -> Result<Tools, ApiError> {
    let tools = r
        .tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut f = serde_json::json!({"name": t.name});
            if !t.description.is_empty() {
                f["description"] = serde_json::json!(t.description);
            }
            if !t.parameters.is_empty() {
                f["parameters"] = serde_json::from_str(&t.parameters).map_err(|e| {
                    ApiError::invalid("tools", format!("tools[{i}].parameters is not JSON: {e}"))
                })?;
            }
            Ok(serde_json::json!({"type": "function", "function": f}))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    use pb::tool_choice::Choice;
    let choice = match r.tool_choice.as_ref().and_then(|c| c.choice.as_ref()) {
        None => None,
        Some(Choice::Mode(m)) => Some(serde_json::json!(m)),
        Some(Choice::Function(f)) => {
            Some(serde_json::json!({"type": "function", "function": {"name": f}}))
        }
    };
    Tools::from_wire(Some(&tools), choice.as_ref(), r.parallel_tool_calls)
        .map_err(crate::api::structured::tool_error)
}

/// The calls read from a finished output, and its finish reason (tool
/// calls when a stopped output made some).
fn calls_pb(tools: Option<&ToolsOf>, text: &str, reason: i32) -> (Vec<pb::ToolCall>, i32) {
    let Some(t) = tools else {
        return (vec![], reason);
    };
    let calls: Vec<pb::ToolCall> = crate::tools::parse(&t.0, t.1, text)
        .calls
        .into_iter()
        .map(|c| pb::ToolCall {
            id: format!("call_{}", crate::api::http::random_id(12)),
            name: c.name,
            arguments: c.arguments,
        })
        .collect();
    let reason = if !calls.is_empty() && reason == pb::FinishReason::Stop as i32 {
        pb::FinishReason::ToolCalls as i32
    } else {
        reason
    };
    (calls, reason)
}

type GenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let started = Instant::now();
        let route = "Generate";
        let (target, generation, tools) = self
            .start(&req, started)
            .await
            .map_err(|e| fail(route, started, e))?;
        let prompt_tokens = generation.prompt_tokens;
        let out = match generation.collect().await {
            Ok(mut outs) => outs.remove(0),
            Err(e) => return Err(fail(route, started, e)),
        };
        if out.finish_reason == Some(FinishReason::Timeout) {
            return Err(fail(
                route,
                started,
                ApiError::DeadlineExceeded(
                    "the request's deadline passed before it finished".into(),
                ),
            ));
        }
        let tok = target.engine.tokenizer();
        record(route, started, tonic::Code::Ok);
        let (tool_calls, reason) = calls_pb(
            tools.as_ref(),
            &out.text,
            out.finish_reason.map(finish_reason).unwrap_or(0),
        );
        Ok(Response::new(pb::GenerateResponse {
            text: out.text,
            token_ids: out.token_ids,
            finish_reason: reason,
            tool_calls,
            usage: Some(pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: out.completion_tokens as u32,
                total_tokens: (prompt_tokens + out.completion_tokens) as u32,
            }),
            model: req.get_ref().model.clone(),
            version: target.version.clone(),
            request_id: metadata_str(&req, "x-request-id")
                .map(str::to_string)
                .unwrap_or_default(),
            logprobs: logprobs_pb(tok, &out.logprobs),
        }))
    }

    type GenerateStreamStream = GenStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let started = Instant::now();
        let route = "GenerateStream";
        let (target, generation, tools) = self
            .start(&req, started)
            .await
            .map_err(|e| fail(route, started, e))?;
        let model = req.get_ref().model.clone();
        let request_id = metadata_str(&req, "x-request-id")
            .map(str::to_string)
            .unwrap_or_default();
        record(route, started, tonic::Code::Ok);
        let stream = async_stream::stream! {
            let tok = target.engine.tokenizer().clone();
            let mut events = generation.events();
            // The whole output, for the calls the last message carries.
            let mut whole = String::new();
            while let Some((_, ev)) = events.next().await {
                match ev {
                    Event::Token { id, text, logprob } => {
                        if tools.is_some() {
                            whole.push_str(&text);
                        }
                        yield Ok(pb::GenerateStreamResponse {
                            text,
                            token_ids: vec![id],
                            finish_reason: 0,
                            usage: None,
                            model: model.clone(),
                            version: target.version.clone(),
                            request_id: request_id.clone(),
                            logprobs: logprob.map(|l| logprobs_pb(&tok, &[l])).unwrap_or_default(),
                            tool_calls: vec![],
                        });
                    }
                    Event::Done(c) => {
                        if c.reason == FinishReason::Timeout {
                            yield Err(Status::deadline_exceeded("the request's deadline passed before it finished"));
                            return;
                        }
                        if c.reason == FinishReason::Aborted {
                            yield Err(Status::unavailable("the server stopped before the request finished"));
                            return;
                        }
                        whole.push_str(&c.tail);
                        let (tool_calls, reason) =
                            calls_pb(tools.as_ref(), &whole, finish_reason(c.reason));
                        yield Ok(pb::GenerateStreamResponse {
                            text: c.tail,
                            token_ids: vec![],
                            finish_reason: reason,
                            tool_calls,
                            usage: Some(pb::Usage {
                                prompt_tokens: c.prompt_tokens as u32,
                                completion_tokens: c.completion_tokens as u32,
                                total_tokens: (c.prompt_tokens + c.completion_tokens) as u32,
                            }),
                            model: model.clone(),
                            version: target.version.clone(),
                            request_id: request_id.clone(),
                            logprobs: vec![],
                        });
                        return;
                    }
                    Event::Failed(e) => {
                        yield Err(Status::from(ApiError::Internal(e)));
                        return;
                    }
                }
            }
            // The engine went away without finishing the request.
            yield Err(Status::from(ApiError::Internal("the engine stopped before the request finished".into())));
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let started = Instant::now();
        let route = "Tokenize";
        let principal = self.principal(&req).map_err(|e| fail(route, started, e))?;
        principal
            .quota
            .charge_request()
            .map_err(|e| fail(route, started, e))?;
        let r = req.into_inner();
        let target = self
            .router
            .pick(&r.model, &RouteKey::default())
            .map_err(|e| fail(route, started, e))?
            .target;
        // CPU work proportional to the text: on the blocking pool.
        let (ids, tokens) = tokio::task::spawn_blocking(move || {
            let tok = target.engine.tokenizer();
            let ids = tok
                .encode(&r.text, r.add_special_tokens)
                .map_err(|e| ApiError::invalid("text", e.to_string()))?;
            let tokens: Vec<String> = ids
                .iter()
                .map(|&t| tok.token_text(t).unwrap_or_default())
                .collect();
            Ok::<_, ApiError>((ids, tokens))
        })
        .await
        .map_err(|e| {
            fail(
                route,
                started,
                ApiError::Internal(format!("tokenize task failed: {e}")),
            )
        })?
        .map_err(|e| fail(route, started, e))?;
        record(route, started, tonic::Code::Ok);
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: ids,
            tokens,
        }))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let started = Instant::now();
        self.principal(&req)
            .map_err(|e| fail("ListModels", started, e))?;
        let table = self.router.snapshot();
        let models = table
            .models
            .values()
            .map(|d| {
                let info = d.stable.engine.info();
                pb::ModelCard {
                    name: d.model.clone(),
                    version: d.stable.version.clone(),
                    architecture: info.arch.as_str().into(),
                    parameters: info.parameters as u64,
                    context_length: d.stable.engine.context_length() as u32,
                    ready: d.stable.engine.is_ready(),
                    format: serde_json::to_value(info.format)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                }
            })
            .collect();
        record("ListModels", started, tonic::Code::Ok);
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn embed(
        &self,
        req: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let started = Instant::now();
        let route = "Embed";
        let (version, out) = self
            .embed_inputs(&req, started)
            .await
            .map_err(|e| fail(route, started, e))?;
        record(route, started, tonic::Code::Ok);
        let tokens = out.prompt_tokens as u32;
        Ok(Response::new(pb::EmbedResponse {
            embeddings: out
                .vectors
                .into_iter()
                .map(|values| pb::Embedding { values })
                .collect(),
            usage: Some(pb::Usage {
                prompt_tokens: tokens,
                completion_tokens: 0,
                total_tokens: tokens,
            }),
            model: req.get_ref().model.clone(),
            version,
            request_id: metadata_str(&req, "x-request-id")
                .map(str::to_string)
                .unwrap_or_default(),
        }))
    }
}

impl InferenceService {
    /// Authenticates, picks the target and embeds every input.
    async fn embed_inputs(
        &self,
        req: &Request<pb::EmbedRequest>,
        started: Instant,
    ) -> Result<(String, crate::embed::Embeddings), ApiError> {
        let principal = self.principal(req)?;
        let r = req.get_ref();
        let key = RouteKey {
            session: metadata_str(req, "x-llmops-route-key")
                .filter(|k| !k.is_empty())
                .map(str::to_string),
            user: (!r.user.is_empty()).then(|| r.user.clone()),
            api_key: (principal.key_id != "anonymous").then(|| principal.key_id.clone()),
            request: metadata_str(req, "x-request-id")
                .unwrap_or_default()
                .to_string(),
        };
        let picked = self.router.pick(&r.model, &key)?;
        let inputs = r
            .inputs
            .iter()
            .enumerate()
            .map(|(i, e)| match &e.input {
                Some(pb::embed_input::Input::Text(t)) => Ok(Input::Text(t.clone())),
                Some(pb::embed_input::Input::Tokens(t)) => Ok(Input::Tokens(t.ids.clone())),
                None => Err(ApiError::invalid(
                    "inputs",
                    format!("inputs[{i}]: one of text or tokens is required"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let deadline = metadata_str(req, "grpc-timeout")
            .and_then(parse_grpc_timeout)
            .map(|d| started + d - deadline_margin(d))
            .or(Some(started + self.limits.request_timeout));
        let spec = crate::embed::EmbedSpec {
            inputs,
            dimensions: (r.dimensions > 0).then_some(r.dimensions as usize),
            deadline,
            arrival: started,
            protocol: Protocol::Grpc,
        };
        let out = crate::embed::embed(&picked, spec, &self.limits, &principal.quota).await?;
        Ok((picked.target.version.clone(), out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12Q"), None);
    }
}
