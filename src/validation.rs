//! Wire request → valid request: the protocol-neutral checks both front ends
//! share (tokenization, limits, sampling ranges, `n`, stops).

use std::time::Instant;

use crate::config::LimitsConfig;
use crate::engine::grammar::{Compiled, Constraint};
use crate::engine::{Message, SamplingParams};
use crate::monitor::Protocol;
use crate::scheduler::length::{self, LengthCaps, LengthError};
use crate::scheduler::{EngineHandle, Priority, QueueLimit, Request};

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
    /// What the output must match (structured outputs, or the tool calls
    /// `tool_choice` requires), if anything.
    pub constraint: Option<OutputConstraint>,
    /// The tools the chat template shows the model (OpenAI's chat `tools`
    /// entries; empty for none): rendered by the template when it has tool
    /// syntax, else described in a system prompt (`crate::tools`).
    pub tools: Vec<serde_json::Value>,
}

/// A request's output constraint and the parameter that asked for it (named
/// in errors).
#[derive(Debug, Clone, PartialEq)]
pub struct OutputConstraint {
    /// The parameter, e.g. `response_format` or `guided_regex`.
    pub param: String,
    /// The constraint.
    pub constraint: Constraint,
}

/// Compiles a request's constraint against the engine's vocabulary (built
/// once per engine), within the size and time limits; counts it by kind, or
/// counts the failure.
fn compile(engine: &EngineHandle, oc: &OutputConstraint) -> Result<Compiled, ValidationError> {
    use crate::monitor::names;
    let kind = oc.constraint.kind();
    let model = engine.labels().model.clone();
    let env = engine
        .tokenizer()
        .grammar_env(engine.embedding_rows())
        .map_err(|e| ValidationError::invalid(&oc.param, format!("{}: {e}", oc.param)))?;
    match env.compile(&oc.constraint) {
        Ok(c) => {
            metrics::counter!(names::STRUCTURED_REQUESTS, "model" => model, "kind" => kind)
                .increment(1);
            Ok(c)
        }
        Err(e) => {
            metrics::counter!(names::STRUCTURED_COMPILE_FAILURES, "model" => model, "kind" => kind)
                .increment(1);
            Err(ValidationError::invalid(
                &oc.param,
                format!("{}: cannot compile the {kind} constraint: {e}", oc.param),
            ))
        }
    }
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

impl From<LengthError> for ValidationError {
    fn from(e: LengthError) -> Self {
        let param = e.param().to_string();
        let message = e.to_string();
        if e.is_context() {
            ValidationError::ContextLength { param, message }
        } else {
            ValidationError::Invalid { param, message }
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
    /// What the caller sent, moved here from the spec (no copy), for
    /// capture.
    pub input: Input,
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
    tokenize_with_tools(engine, input, &[])
}

/// [`tokenize_input`], with the tools a chat's template shows the model.
/// A template without tool syntax gets the fallback rendering (the tools in
/// a system prompt, tool turns as text: `crate::tools::fallback_messages`).
/// Tool definitions and past calls are template text where the template
/// writes them: a control token in them is refused, as it cannot be kept
/// plain text there.
pub fn tokenize_with_tools(
    engine: &EngineHandle,
    input: &Input,
    tools: &[serde_json::Value],
) -> Result<Vec<u32>, ValidationError> {
    let tok = engine.tokenizer();
    let rewritten;
    let (input, tools) = match input {
        Input::Chat(messages)
            if !engine.chat_template().takes_tools()
                && (!tools.is_empty()
                    || messages
                        .iter()
                        .any(|m| m.role == "tool" || !m.tool_calls.is_empty())) =>
        {
            rewritten = Input::Chat(crate::tools::fallback_messages(messages, tools));
            (&rewritten, &[][..])
        }
        _ => (input, tools),
    };
    if let Input::Chat(messages) = input {
        let tool_text = tools.iter().map(|t| ("tools", t)).chain(
            messages
                .iter()
                .flat_map(|m| m.tool_calls.iter().map(|c| ("messages", c))),
        );
        for (param, v) in tool_text {
            if let Some(special) = tok.special_in(&v.to_string()) {
                return Err(ValidationError::invalid(
                    param,
                    format!(
                        "{param} holds the control token `{special}`, which this model's chat template would read as one"
                    ),
                ));
            }
        }
    }
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
                    "system" | "user" | "assistant" | "developer" | "tool"
                ) {
                    return Err(ValidationError::invalid(
                        "messages",
                        format!(
                            "messages[{i}].role: unknown role `{}` (system, user, assistant, tool)",
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
                let text = engine
                    .chat_template()
                    .render_with_tools(messages, tools, true)
                    .map_err(bad)?;
                return tok.encode(&text, false).map_err(bad);
            };
            // A message holds a control token's text (`<start_of_turn>`, …):
            // tokenized whole, it would forge a turn. Its content is read as
            // the plain text it is; only the template's own text is parsed.
            let Some(pieces) = engine
                .chat_template()
                .render_pieces(messages, tools, true)
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

/// Refuses `prompts` prompts with `n` choices each, `prompt_tokens` prompt
/// tokens over all the choices, when the choices could never wait together
/// in `engine`'s queue, however idle: more of them than `max_waiting`, or
/// more prompt tokens than `max_waiting_tokens`. The message names `n` (or,
/// for one choice, the prompt) and the limit.
pub fn check_queueable(
    engine: &EngineHandle,
    prompts: usize,
    n: usize,
    prompt_tokens: usize,
    param: &'static str,
) -> Result<(), ValidationError> {
    let requests = prompts.saturating_mul(n);
    let tokens = prompt_tokens;
    let what = if prompts > 1 {
        format!("{prompts} prompts with n = {n} are {requests} requests")
    } else {
        format!("n is {n}")
    };
    match engine.fits_queue(requests, tokens) {
        Ok(()) => Ok(()),
        Err(QueueLimit::Requests { limit, .. }) => Err(ValidationError::invalid(
            "n",
            format!(
                "{what}, and this server lets at most {limit} requests wait per model (max_waiting): the choices could never be queued together; ask for at most {limit}"
            ),
        )),
        Err(QueueLimit::PromptTokens { asked, limit }) => Err(ValidationError::invalid(
            if requests > 1 { "n" } else { param },
            format!(
                "{what}, {asked} prompt tokens in all, and this server lets at most {limit} prompt tokens wait per model (max_waiting_tokens): the request could never be queued; lower n or shorten the {param}"
            ),
        )),
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
    let context = engine.context_length();
    let bytes = match &spec.input {
        Input::Text(t) => t.len(),
        Input::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
        Input::Tokens(_) => 0,
    };
    let at_least = engine.tokenizer().min_tokens_for(bytes);
    length::check_prompt_bytes(context, param, bytes, at_least)?;
    let prompt = tokenize_with_tools(engine, &spec.input, &spec.tools)?;
    // Ids the model cannot embed would fail the whole batch's forward pass:
    // given ones, and ones a tokenizer larger than the embedding produced.
    let rows = engine.embedding_rows().min(engine.tokenizer().vocab_size()) as u32;
    if let Some(bad) = prompt.iter().find(|&&t| t >= rows.max(1)) {
        return Err(ValidationError::invalid(
            param,
            format!("token id {bad} is outside the model's vocabulary ({rows} tokens)"),
        ));
    }
    let caps = LengthCaps {
        prompt_tokens: limits.max_prompt_tokens,
        max_tokens: limits.max_tokens,
    };
    let max_tokens = length::max_new_tokens(context, caps, param, prompt.len(), spec.max_tokens)?;
    // Choices that could never wait together would get 429 forever, even
    // from an idle server: refused here, naming what to change.
    check_queueable(
        engine,
        1,
        spec.n,
        prompt.len().saturating_mul(spec.n),
        param,
    )?;
    // Last of the checks: compiling is the most expensive.
    let grammar = spec
        .constraint
        .as_ref()
        .map(|oc| compile(engine, oc))
        .transpose()?;
    // Drift's script mix: the text a caller wrote, one pass, no allocation.
    let mut text_profile = crate::monitor::drift::TextProfile::default();
    match &spec.input {
        Input::Text(t) => crate::monitor::drift::stats::add_text(&mut text_profile, t),
        Input::Chat(m) => m
            .iter()
            .for_each(|m| crate::monitor::drift::stats::add_text(&mut text_profile, &m.content)),
        Input::Tokens(_) => {}
    }
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
                split_key: 0,
                text_profile,
                grammar: grammar.clone(),
            }
        })
        .collect();
    Ok(ValidRequest {
        prompt,
        choices,
        max_tokens,
        input: spec.input,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synth::SynthSpec;
    use crate::scheduler::{EngineLabels, SchedulerConfig};

    /// A real engine over the tiny synthetic Llama (context 512, 320 ids).
    fn engine() -> (tempfile::TempDir, EngineHandle) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        SynthSpec::tiny_llama().write(&path, None).unwrap();
        let model = crate::engine::load(&path, &Default::default()).unwrap();
        let labels = EngineLabels {
            model: "tiny".into(),
            version: "v1".into(),
        };
        let engine = EngineHandle::spawn(model, SchedulerConfig::default(), labels).unwrap();
        (dir, engine)
    }

    /// Twelve tokens asking for four, one choice, no server caps.
    fn base() -> (GenerationSpec, LimitsConfig) {
        let spec = GenerationSpec {
            input: Input::Tokens(vec![5; 12]),
            max_tokens: Some(4),
            sampling: SamplingParams::default(),
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            n: 1,
            deadline: None,
            arrival: Instant::now(),
            protocol: Protocol::Internal,
            constraint: None,
            tools: vec![],
        };
        let limits = LimitsConfig {
            max_body_bytes: 1 << 20,
            max_prompt_tokens: None,
            max_tokens: None,
            request_timeout: std::time::Duration::from_secs(60),
        };
        (spec, limits)
    }

    fn user(content: String) -> Message {
        Message::new("user", content)
    }

    /// What a case expects: the completion length granted, or the error's
    /// kind, parameter and a piece of its message.
    #[derive(Debug)]
    enum Want {
        MaxTokens(usize),
        Invalid(&'static str, &'static str),
        Context(&'static str, &'static str),
    }

    type Case = (
        &'static str,
        fn(&mut GenerationSpec, &mut LimitsConfig),
        Want,
    );

    const CASES: &[Case] = &[
        ("the base request", |_, _| {}, Want::MaxTokens(4)),
        (
            "absent max_tokens takes the rest of the context",
            |s, _| s.max_tokens = None,
            Want::MaxTokens(500),
        ),
        (
            "absent max_tokens is capped by the server",
            |s, l| (s.max_tokens, l.max_tokens) = (None, Some(64)),
            Want::MaxTokens(64),
        ),
        (
            "max_tokens filling the context exactly",
            |s, _| s.max_tokens = Some(500),
            Want::MaxTokens(500),
        ),
        (
            "max_tokens one past the context",
            |s, _| s.max_tokens = Some(501),
            Want::Context(
                "prompt",
                "you requested 513 tokens (12 in the prompt, 501 for the completion)",
            ),
        ),
        (
            "max_tokens zero",
            |s, _| s.max_tokens = Some(0),
            Want::Invalid("max_tokens", "max_tokens must be at least 1"),
        ),
        (
            "max_tokens over the server's cap",
            |s, l| (s.max_tokens, l.max_tokens) = (Some(65), Some(64)),
            Want::Invalid("max_tokens", "this server allows at most 64"),
        ),
        (
            "max_tokens as large as the wire allows",
            |s, _| s.max_tokens = Some(usize::MAX),
            Want::Context(
                "max_tokens",
                "you requested 18446744073709551627 tokens (12 in the prompt, 18446744073709551615 for the completion)",
            ),
        ),
        (
            "a prompt filling the context",
            |s, _| s.input = Input::Tokens(vec![5; 512]),
            Want::Context("prompt", "your prompt has 512 tokens"),
        ),
        (
            "a prompt at the server's prompt limit",
            |_, l| l.max_prompt_tokens = Some(12),
            Want::Context("prompt", "(prompt limit 12)"),
        ),
        (
            "an empty prompt",
            |s, _| s.input = Input::Tokens(vec![]),
            Want::Invalid("prompt", "the prompt is empty"),
        ),
        (
            "an id outside the embedding",
            |s, _| s.input = Input::Tokens(vec![5, 320]),
            Want::Invalid("prompt", "token id 320 is outside"),
        ),
        (
            "a text prompt too long by its bytes",
            |s, _| s.input = Input::Text("a".repeat(1 << 16)),
            Want::Context("prompt", "bytes, which is at least"),
        ),
        (
            "a conversation too long by its bytes",
            |s, _| s.input = Input::Chat(vec![user("a".repeat(1 << 16))]),
            Want::Context("messages", "bytes, which is at least"),
        ),
        (
            "a conversation and max_tokens past the context",
            |s, _| (s.input, s.max_tokens) = (Input::Chat(vec![user("a".repeat(300))]), Some(300)),
            Want::Context("messages", "in the messages, 300 for the completion"),
        ),
        (
            "an empty conversation",
            |s, _| s.input = Input::Chat(vec![]),
            Want::Invalid("messages", "messages must not be empty"),
        ),
        (
            "an unknown role",
            |s, _| {
                s.input = Input::Chat(vec![Message {
                    role: "wizard".into(),
                    content: "hi".into(),
                    ..Default::default()
                }])
            },
            Want::Invalid("messages", "messages[0].role: unknown role `wizard`"),
        ),
        (
            "n zero",
            |s, _| s.n = 0,
            Want::Invalid("n", "n must be between 1 and 16, got 0"),
        ),
        (
            "n past the most choices",
            |s, _| s.n = MAX_N + 1,
            Want::Invalid("n", "got 17"),
        ),
        (
            "too many stop strings",
            |s, _| s.stop = vec!["x".into(); MAX_STOPS + 1],
            Want::Invalid("stop", "at most 16 stop strings"),
        ),
        (
            "a negative temperature",
            |s, _| s.sampling.temperature = -0.5,
            Want::Invalid("temperature", "temperature: "),
        ),
        (
            "top_p over one",
            |s, _| s.sampling.top_p = 1.5,
            Want::Invalid("top_p", "top_p: "),
        ),
    ];

    #[test]
    fn every_request_is_judged_as_the_table_says() {
        let (_dir, engine) = engine();
        for (case, edit, want) in CASES {
            let (mut spec, mut limits) = base();
            edit(&mut spec, &mut limits);
            match (validate(spec, &engine, &limits), want) {
                (Ok(v), Want::MaxTokens(m)) => {
                    assert_eq!(v.max_tokens, *m, "{case}");
                    assert!(v.choices.iter().all(|c| c.max_tokens == *m), "{case}");
                }
                (Err(ValidationError::Invalid { param, message }), Want::Invalid(p, text))
                | (
                    Err(ValidationError::ContextLength { param, message }),
                    Want::Context(p, text),
                ) => {
                    assert_eq!(param, *p, "{case}: param of `{message}`");
                    assert!(message.contains(text), "{case}: `{message}` lacks `{text}`");
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn choices_that_could_never_wait_together_are_refused_naming_n_and_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        SynthSpec::tiny_llama().write(&path, None).unwrap();
        let model = crate::engine::load(&path, &Default::default()).unwrap();
        let config = SchedulerConfig {
            max_waiting: 4,
            max_waiting_tokens: 40,
            ..Default::default()
        };
        let engine = EngineHandle::spawn(model, config, EngineLabels::default()).unwrap();
        // (case, n, prompt tokens, Ok or the error's parameter and text).
        type Case = (
            &'static str,
            usize,
            usize,
            Result<(), (&'static str, &'static str)>,
        );
        let cases: &[Case] = &[
            ("as many choices as may wait", 4, 10, Ok(())),
            (
                "one choice more",
                5,
                2,
                Err((
                    "n",
                    "n is 5, and this server lets at most 4 requests wait per model (max_waiting)",
                )),
            ),
            (
                "their prompt tokens past the limit",
                4,
                12,
                Err((
                    "n",
                    "n is 4, 48 prompt tokens in all, and this server lets at most 40 prompt tokens wait per model (max_waiting_tokens)",
                )),
            ),
            (
                "one prompt past the limit",
                1,
                41,
                Err(("prompt", "at most 40 prompt tokens")),
            ),
        ];
        for &(case, n, prompt, ref want) in cases {
            let (mut spec, limits) = base();
            (spec.n, spec.input) = (n, Input::Tokens(vec![5; prompt]));
            match (validate(spec, &engine, &limits), want) {
                (Ok(v), Ok(())) => assert_eq!(v.choices.len(), n, "{case}"),
                (Err(ValidationError::Invalid { param, message }), Err((p, text))) => {
                    assert_eq!(param, *p, "{case}: {message}");
                    assert!(message.contains(text), "{case}: `{message}` lacks `{text}`");
                }
                (got, want) => panic!("{case}: got {got:?}, want {want:?}"),
            }
        }
        // A batch: three prompts of two choices are six requests.
        let e = check_queueable(&engine, 3, 2, 1, "prompt").unwrap_err();
        assert_eq!(
            e,
            ValidationError::invalid(
                "n",
                "3 prompts with n = 2 are 6 requests, and this server lets at most 4 requests wait per model (max_waiting): the choices could never be queued together; ask for at most 4"
            )
        );
        // What fits an idle queue is admitted there, all of it.
        let (mut spec, limits) = base();
        (spec.n, spec.input) = (4, Input::Tokens(vec![5; 10]));
        let v = validate(spec, &engine, &limits).unwrap();
        let rxs: Vec<_> = v
            .choices
            .into_iter()
            .map(|r| engine.submit(r).unwrap())
            .collect();
        assert_eq!(rxs.len(), 4);
    }

    #[test]
    fn each_choice_gets_its_own_seed_and_the_same_prompt() {
        let (_dir, engine) = engine();
        let (mut spec, limits) = base();
        (spec.n, spec.sampling.seed) = (3, Some(u64::MAX));
        let v = validate(spec, &engine, &limits).unwrap();
        let seeds: Vec<_> = v.choices.iter().map(|c| c.sampling.seed).collect();
        assert_eq!(seeds, [Some(u64::MAX), Some(0), Some(1)]);
        assert!(v.choices.iter().all(|c| c.prompt == v.prompt));
        assert_eq!(v.prompt, vec![5; 12]);
    }

    #[test]
    fn the_engine_refuses_an_oversized_request_with_validations_message() {
        let (_dir, engine) = engine();
        let cases: &[(&str, usize, usize)] = &[
            ("prompt and completion past the context", 12, 501),
            ("a prompt filling the context", 512, 1),
            ("max_tokens zero", 12, 0),
            ("an empty prompt", 0, 1),
        ];
        for &(case, prompt, max_tokens) in cases {
            let (mut spec, limits) = base();
            (spec.input, spec.max_tokens) = (Input::Tokens(vec![5; prompt]), Some(max_tokens));
            let validation = validate(spec, &engine, &limits).unwrap_err().to_string();
            let req = Request::greedy(vec![5; prompt], max_tokens);
            let submit = engine.check(&req).unwrap_err().to_string();
            assert_eq!(submit, validation, "{case}");
        }
    }
}
