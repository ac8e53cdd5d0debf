//! Wire request → valid request: the protocol-neutral checks both front ends
//! share (tokenization, limits, sampling ranges, `n`, stops).

use std::time::Instant;

use crate::config::LimitsConfig;
use crate::engine::{Message, SamplingParams};
use crate::monitor::Protocol;
use crate::scheduler::{EngineHandle, Priority, Request};

/// What the caller wants generated from.
#[derive(Debug, Clone)]
pub enum Input {
    /// Raw text (BOS added as the model expects).
    Text(String),
    /// A conversation for the chat template.
    Chat(Vec<Message>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// A generation request in protocol-neutral form.
#[derive(Debug, Clone)]
pub struct GenerationSpec {
    /// The input.
    pub input: Input,
    /// Requested completion length; the model's remaining context when absent.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stop token ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Choices to generate.
    pub n: usize,
    /// Deadline.
    pub deadline: Option<Instant>,
    /// Arrival at the front end.
    pub arrival: Instant,
    /// Which front end.
    pub protocol: Protocol,
}

/// Why a request is refused before it reaches an engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A parameter is malformed or out of range.
    #[error("{message}")]
    Invalid {
        /// The offending parameter.
        param: String,
        /// Human-readable reason.
        message: String,
    },
    /// Prompt and completion do not fit the model's context.
    #[error("{message}")]
    ContextLength {
        /// `messages` or `prompt`.
        param: String,
        /// Human-readable reason.
        message: String,
    },
}

impl ValidationError {
    /// An invalid parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

/// Most choices per request.
pub const MAX_N: usize = 16;
/// Most stop strings per request.
pub const MAX_STOPS: usize = 16;

/// A request ready for the scheduler: one [`Request`] per choice.
#[derive(Debug)]
pub struct ValidRequest {
    /// The prompt's tokens.
    pub prompt: Vec<u32>,
    /// One per choice (seeds offset by the choice index).
    pub choices: Vec<Request>,
    /// The completion length asked of each choice.
    pub max_tokens: usize,
}

/// Which parameter an input error refers to.
fn input_param(input: &Input) -> &'static str {
    match input {
        Input::Chat(_) => "messages",
        _ => "prompt",
    }
}

/// Tokenizes the input with the engine's tokenizer and chat template.
pub fn tokenize_input(engine: &EngineHandle, input: &Input) -> Result<Vec<u32>, ValidationError> {
    let tok = engine.tokenizer();
    match input {
        Input::Text(t) => tok
            .encode(t, true)
            .map_err(|e| ValidationError::invalid("prompt", e.to_string())),
        Input::Chat(messages) => {
            if messages.is_empty() {
                return Err(ValidationError::invalid(
                    "messages",
                    "messages must not be empty",
                ));
            }
            for (i, m) in messages.iter().enumerate() {
                if !matches!(
                    m.role.as_str(),
                    "system" | "user" | "assistant" | "developer"
                ) {
                    return Err(ValidationError::invalid(
                        "messages",
                        format!(
                            "messages[{i}].role: unknown role `{}` (system, user, assistant)",
                            m.role
                        ),
                    ));
                }
            }
            let bad = |e: crate::engine::Error| ValidationError::invalid("messages", e.to_string());
            let forged = messages
                .iter()
                .enumerate()
                .find_map(|(i, m)| tok.special_in(&m.content).map(|s| (i, s)));
            let Some((i, special)) = forged else {
                // The template writes BOS itself where the model wants it.
                let text = engine.chat_template().render(messages, true).map_err(bad)?;
                return tok.encode(&text, false).map_err(bad);
            };
            // A message holds a control token's text (`<start_of_turn>`, …):
            // tokenized whole, it would forge a turn. Its content is read as
            // the plain text it is; only the template's own text is parsed.
            let Some(pieces) = engine
                .chat_template()
                .render_pieces(messages, true)
                .map_err(bad)?
            else {
                return Err(ValidationError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].content holds the control token `{special}`, and this model's chat template transforms content in a way that cannot keep it plain text"
                    ),
                ));
            };
            let mut ids = vec![];
            for (k, t) in pieces.template.iter().enumerate() {
                ids.extend(tok.encode(t, false).map_err(bad)?);
                if let Some(c) = pieces.content.get(k) {
                    ids.extend(tok.encode_plain(c).map_err(bad)?);
                }
            }
            Ok(ids)
        }
        Input::Tokens(ids) => Ok(ids.clone()),
    }
}

/// Checks a spec against the limits and the model, and builds the requests.
pub fn validate(
    spec: GenerationSpec,
    engine: &EngineHandle,
    limits: &LimitsConfig,
) -> Result<ValidRequest, ValidationError> {
    let param = input_param(&spec.input);
    if spec.n == 0 || spec.n > MAX_N {
        return Err(ValidationError::invalid(
            "n",
            format!("n must be between 1 and {MAX_N}, got {}", spec.n),
        ));
    }
    if spec.stop.len() > MAX_STOPS {
        return Err(ValidationError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    spec.sampling.validate().map_err(|e| match e {
        crate::engine::Error::InvalidParam { param, message } => {
            ValidationError::invalid(&param, format!("{param}: {message}"))
        }
        other => ValidationError::invalid("sampling", other.to_string()),
    })?;
    // A prompt too long by its bytes alone is refused before any of it is
    // tokenized (tokenizing a multi-MiB body is the expensive part).
    let ctx = engine.context_length();
    let bytes = match &spec.input {
        Input::Text(t) => t.len(),
        Input::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
        Input::Tokens(_) => 0,
    };
    let at_least = engine.tokenizer().min_tokens_for(bytes);
    if at_least >= ctx {
        return Err(ValidationError::ContextLength {
            message: format!(
                "This model's maximum context length is {ctx} tokens. However, your {param} has {bytes} bytes, which is at least {at_least} tokens. Please shorten it."
            ),
            param: param.into(),
        });
    }
    let prompt = tokenize_input(engine, &spec.input)?;
    if prompt.is_empty() {
        return Err(ValidationError::invalid(param, "the prompt is empty"));
    }
    // Ids the model cannot embed would fail the whole batch's forward pass:
    // given ones, and ones a tokenizer larger than the embedding produced.
    let rows = engine.embedding_rows().min(engine.tokenizer().vocab_size()) as u32;
    if let Some(bad) = prompt.iter().find(|&&t| t >= rows.max(1)) {
        return Err(ValidationError::invalid(
            param,
            format!("token id {bad} is outside the model's vocabulary ({rows} tokens)"),
        ));
    }
    let max_prompt = limits.max_prompt_tokens.unwrap_or(ctx).min(ctx);
    if prompt.len() >= max_prompt {
        return Err(ValidationError::ContextLength {
            message: format!(
                "This model's maximum context length is {ctx} tokens (prompt limit {max_prompt}). However, your {param} has {} tokens. Please shorten it.",
                prompt.len()
            ),
            param: param.into(),
        });
    }
    let remaining = ctx - prompt.len();
    let max_tokens = match spec.max_tokens {
        Some(0) => {
            return Err(ValidationError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(m) => {
            if let Some(cap) = limits.max_tokens
                && m > cap
            {
                return Err(ValidationError::invalid(
                    "max_tokens",
                    format!("max_tokens is {m}; this server allows at most {cap}"),
                ));
            }
            if m > remaining {
                return Err(ValidationError::ContextLength {
                    message: format!(
                        "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the {param}, {m} for the completion). Please reduce the length of the {param} or the completion.",
                        prompt.len() + m,
                        prompt.len()
                    ),
                    param: param.into(),
                });
            }
            m
        }
        None => remaining.min(limits.max_tokens.unwrap_or(usize::MAX)),
    };
    let choices = (0..spec.n)
        .map(|i| {
            let mut sampling = spec.sampling.clone();
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
            Request {
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                stop: spec.stop.clone(),
                stop_token_ids: spec.stop_token_ids.clone(),
                ignore_eos: spec.ignore_eos,
                priority: Priority::Normal,
                score: None,
                deadline: spec.deadline,
                arrival: spec.arrival,
                protocol: spec.protocol,
                // Set by the router's pick, when the request is submitted.
                variant: Default::default(),
            }
        })
        .collect();
    Ok(ValidRequest {
        prompt,
        choices,
        max_tokens,
    })
}
