//! OpenAI wire types: requests as clients send them, responses and stream
//! chunks as the official SDKs parse them.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::engine::{Message, SamplingParams};

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StringOrList {
    /// As a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// `/v1/completions` prompt: text(s) or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts (one choice set each).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A content part of a chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` is the only supported type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// Chat message content: a string, text parts, or null.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts.
    Parts(Vec<ContentPart>),
}

/// A chat message as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// Role.
    pub role: String,
    /// Content.
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant's tool calls (`{"id", "type": "function", "function":
    /// {"name", "arguments"}}`).
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message's call id.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    /// Temperature (OpenAI default 1; greedy when 0).
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Extension: top-k (0 or -1 disables).
    pub top_k: Option<i64>,
    /// Extension: min-p.
    pub min_p: Option<f32>,
    /// Extension: repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Seed.
    pub seed: Option<i64>,
}

impl SamplingFields {
    /// The engine's parameters (OpenAI's default temperature is 1).
    pub fn to_params(&self, logprobs: Option<usize>) -> Result<SamplingParams, ApiError> {
        let top_k = match self.top_k {
            None | Some(0) | Some(-1) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be ≥ 1 (or -1 to disable), got {k}"),
                ));
            }
        };
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
            logprobs,
        })
    }
}

/// Parameters of the OpenAI API this server does not implement. Each one
/// present with a value other than its no-op is refused with a 400 naming
/// it, rather than silently ignored (a client asking for JSON output or
/// tools must not get plain text and believe it got what it asked for).
/// Structured outputs are `api::structured`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Unsupported {
    /// Tool calling.
    pub tools: Option<serde_json::Value>,
    /// Tool choice.
    pub tool_choice: Option<serde_json::Value>,
    /// Parallel tool calls.
    pub parallel_tool_calls: Option<serde_json::Value>,
    /// Legacy function calling.
    pub functions: Option<serde_json::Value>,
    /// Legacy function choice.
    pub function_call: Option<serde_json::Value>,
    /// Logit bias.
    pub logit_bias: Option<serde_json::Value>,
    /// Server-side best-of.
    pub best_of: Option<serde_json::Value>,
    /// Output modalities.
    pub modalities: Option<serde_json::Value>,
    /// Audio output.
    pub audio: Option<serde_json::Value>,
    /// Predicted outputs.
    pub prediction: Option<serde_json::Value>,
    /// Web search.
    pub web_search_options: Option<serde_json::Value>,
    /// Reasoning effort.
    pub reasoning_effort: Option<serde_json::Value>,
}

impl Unsupported {
    /// The first parameter given with an effect this server does not have.
    pub fn refuse(&self) -> Result<(), ApiError> {
        use serde_json::Value;
        let noop = |v: &Option<Value>, ok: &dyn Fn(&Value) -> bool| {
            v.as_ref().is_none_or(|v| v.is_null() || ok(v))
        };
        let never = |_: &Value| false;
        type Check<'a> = (&'a str, &'a Option<Value>, &'a dyn Fn(&Value) -> bool);
        let checks: [Check; 12] = [
            ("tools", &self.tools, &|v| {
                v.as_array().is_some_and(Vec::is_empty)
            }),
            ("tool_choice", &self.tool_choice, &|v| {
                v.as_str() == Some("none")
            }),
            ("parallel_tool_calls", &self.parallel_tool_calls, &|v| {
                v.is_boolean()
            }),
            ("functions", &self.functions, &|v| {
                v.as_array().is_some_and(Vec::is_empty)
            }),
            ("function_call", &self.function_call, &|v| {
                v.as_str() == Some("none")
            }),
            ("logit_bias", &self.logit_bias, &|v| {
                v.as_object().is_some_and(|m| m.is_empty())
            }),
            ("best_of", &self.best_of, &|v| v.as_u64() == Some(1)),
            ("modalities", &self.modalities, &|v| {
                *v == serde_json::json!(["text"])
            }),
            ("audio", &self.audio, &never),
            ("prediction", &self.prediction, &never),
            ("web_search_options", &self.web_search_options, &never),
            ("reasoning_effort", &self.reasoning_effort, &never),
        ];
        for (name, value, ok) in checks {
            if !noop(value, ok) {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not supported by this server"),
                ));
            }
        }
        Ok(())
    }
}

/// Fields both generation endpoints take, declared once and flattened into
/// each request.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationFields {
    /// Completion length (chat: the legacy name of `max_completion_tokens`).
    pub max_tokens: Option<u64>,
    /// Choices (per prompt).
    pub n: Option<u64>,
    /// Stream chunks.
    #[serde(default)]
    pub stream: bool,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<StringOrList>,
    /// End-user id.
    pub user: Option<String>,
    /// Extension: keep going past EOS.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Extension: extra stop ids.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Sampling.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Structured outputs (`response_format`, `guided_*`).
    #[serde(flatten)]
    pub structured: crate::api::structured::StructuredFields,
    /// Parameters refused when they would have an effect.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

impl GenerationFields {
    /// Refuses unsupported parameters (see [`Unsupported`]).
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        self.unsupported.refuse()
    }

    /// Whether the stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Completion length.
    pub max_completion_tokens: Option<u64>,
    /// Return log-probabilities.
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per token (0–20).
    pub top_logprobs: Option<u64>,
    /// Functions the model may call (`{"type": "function", "function":
    /// {…}}`). (Named here, so the flattened `Unsupported` never sees them:
    /// `/v1/completions` still refuses them.)
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto`, `required` or a named function.
    pub tool_choice: Option<serde_json::Value>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// The rest.
    #[serde(flatten)]
    pub common: GenerationFields,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// Prompt(s).
    pub prompt: Prompt,
    /// Alternatives per token (0–20); absent means none.
    pub logprobs: Option<u64>,
    /// Echo the prompt (unsupported).
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion (unsupported).
    pub suffix: Option<String>,
    /// The rest (`max_tokens` defaults to 16 here, as OpenAI's).
    #[serde(flatten)]
    pub common: GenerationFields,
}

/// Flattens chat messages to role + text.
pub fn flatten_messages(messages: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                "messages",
                                format!("messages[{i}].content[{j}]: content type `{}` is not supported (text only)", p.kind),
                            ));
                        }
                        s.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    s
                }
            };
            let tool_calls = m
                .tool_calls
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    crate::tools::history_call(c).map_err(|e| {
                        ApiError::invalid("messages", format!("messages[{i}].tool_calls[{j}]: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Message {
                role: m.role.clone(),
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
            })
        })
        .collect()
}

/// `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Prompt tokens (counted once per prompt).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Vec<u8>,
}

/// One token in chat logprobs.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// Alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `choices[].logprobs` of chat.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    /// Per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// `choices[].logprobs` of completions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Alternatives per position.
    pub top_logprobs: Vec<std::collections::BTreeMap<String, f32>>,
    /// Character offsets in the completion.
    pub text_offset: Vec<usize>,
}

/// The assistant message of a chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text (null when the answer is only tool calls).
    pub content: Option<String>,
    /// The tool calls read from the output.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<WireToolCall>,
}

/// A tool call as OpenAI's chat API writes it.
#[derive(Debug, Clone, Serialize)]
pub struct WireToolCall {
    /// `call_…`, unique within the response.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments (JSON text).
    pub function: WireFunctionCall,
}

/// The function of a [`WireToolCall`].
#[derive(Debug, Clone, Serialize)]
pub struct WireFunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, JSON text.
    pub arguments: String,
}

impl WireToolCall {
    /// A parsed call with a fresh id.
    pub fn new(call: crate::tools::ToolCall) -> Self {
        Self {
            id: format!("call_{}", hex::encode(rand::random::<[u8; 12]>())),
            kind: "function",
            function: WireFunctionCall {
                name: call.name,
                arguments: call.arguments,
            },
        }
    }
}

/// A tool call's delta in a stream chunk (each call sent whole, once).
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    /// The call's position in the message's `tool_calls`.
    pub index: usize,
    /// The call.
    #[serde(flatten)]
    pub call: WireToolCall,
}

/// A chat choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Index.
    pub index: usize,
    /// The message.
    pub message: AssistantMessage,
    /// Log-probabilities when asked.
    pub logprobs: Option<ChatLogprobs>,
    /// Why it ended.
    pub finish_reason: &'static str,
}

/// A response body or stream chunk: the head, the choices, the token counts.
#[derive(Debug, Clone, Serialize)]
pub struct Reply<C> {
    /// Id, kind, time, model, version.
    #[serde(flatten)]
    pub head: ResponseHead,
    /// Choices (empty in a stream's usage chunk).
    pub choices: Vec<C>,
    /// Token counts: always in a whole response; in a stream, only in the
    /// final usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// `chat.completion`.
pub type ChatCompletion = Reply<ChatChoice>;

/// A text completion (`text_completion`), also the shape of its stream
/// chunks.
pub type Completion = Reply<CompletionChoice>;

/// `chat.completion.chunk`.
pub type ChatChunk = Reply<ChunkChoice>;

/// What a response and each of its stream chunks open with, the same
/// fields in the same order for every kind.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseHead {
    /// `chatcmpl-…` or `cmpl-…`; one id for every chunk of a stream.
    pub id: String,
    /// The kind: `chat.completion`, `chat.completion.chunk` or
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Model name.
    pub model: String,
    /// The serving version.
    pub system_fingerprint: String,
}

/// A completion choice.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Index.
    pub index: usize,
    /// The text.
    pub text: String,
    /// Log-probabilities when asked.
    pub logprobs: Option<CompletionLogprobs>,
    /// Why it ended.
    pub finish_reason: Option<&'static str>,
}

/// The delta of a chat stream chunk.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// Set in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls (each whole, in the choice's last chunk).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A chat stream choice.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    /// Index.
    pub index: usize,
    /// What changed.
    pub delta: Delta,
    /// Log-probabilities of this chunk's tokens.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the last chunk of a choice.
    pub finish_reason: Option<&'static str>,
}
