//! Embeddings, below both front ends: tokenize the inputs (off the async
//! workers), reserve the caller's tokens, run each input as an embedding job
//! on the picked target's engine (a prefill-only job that returns the mean of
//! the prompt's final-normed hidden states, batched with other work by the
//! scheduler), then truncate to the asked dimensions and L2-normalise.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::config::LimitsConfig;
use crate::infer::InferError;
use crate::monitor::Protocol;
use crate::quota::Quota;
use crate::router::Picked;
use crate::scheduler::length::{self, LengthCaps};
use crate::scheduler::{EngineHandle, Event, FinishReason, Request, SubmitError};
use crate::validation::{self, Input, ValidationError};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// Most inputs of one request queued at once: the rest wait for these, so a
/// large batch neither floods the engine's queue nor starves other callers.
pub const MAX_IN_FLIGHT: usize = 64;

/// An embeddings request in protocol-neutral form.
#[derive(Debug, Clone)]
pub struct EmbedSpec {
    /// One entry per input: [`Input::Text`] or [`Input::Tokens`].
    pub inputs: Vec<Input>,
    /// Keep this many leading dimensions (then re-normalise); all when
    /// absent.
    pub dimensions: Option<usize>,
    /// When the request must be finished.
    pub deadline: Option<Instant>,
    /// Arrival at the front end.
    pub arrival: Instant,
    /// Which front end.
    pub protocol: Protocol,
}

/// The result: one unit-length vector per input, in input order.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// The vectors.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens of every input together.
    pub prompt_tokens: usize,
}

/// Why an embedding request failed beyond [`InferError`]: its deadline
/// passed (the front ends answer 504 / DEADLINE_EXCEEDED).
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    /// As for generation.
    #[error(transparent)]
    Infer(#[from] InferError),
    /// The deadline passed before every input was embedded.
    #[error("the request's deadline passed before it finished")]
    DeadlinePassed,
}

impl From<ValidationError> for EmbedError {
    fn from(e: ValidationError) -> Self {
        EmbedError::Infer(e.into())
    }
}

impl From<SubmitError> for EmbedError {
    fn from(e: SubmitError) -> Self {
        EmbedError::Infer(e.into())
    }
}

/// Tokenizes and checks every input against the engine and the limits; the
/// error names the input (`input[3]`) where there are several.
pub fn tokenize(
    engine: &EngineHandle,
    spec: &EmbedSpec,
    limits: &LimitsConfig,
) -> Result<Vec<Vec<u32>>, ValidationError> {
    if spec.inputs.is_empty() {
        return Err(ValidationError::invalid(
            "input",
            "input must not be empty: give a string, an array of strings or token arrays",
        ));
    }
    if spec.inputs.len() > MAX_INPUTS {
        return Err(ValidationError::invalid(
            "input",
            format!(
                "input has {} entries; at most {MAX_INPUTS} are allowed per request",
                spec.inputs.len()
            ),
        ));
    }
    let hidden = engine.hidden_size();
    if let Some(d) = spec.dimensions
        && (d == 0 || d > hidden)
    {
        return Err(ValidationError::invalid(
            "dimensions",
            format!("dimensions is {d}; this model's embeddings have between 1 and {hidden}"),
        ));
    }
    let many = spec.inputs.len() > 1;
    let name = |i: usize| {
        if many {
            format!("input[{i}]")
        } else {
            "input".to_string()
        }
    };
    let context = engine.context_length();
    let caps = LengthCaps {
        prompt_tokens: limits.max_prompt_tokens,
        max_tokens: None,
    };
    let rows = engine.embedding_rows().min(engine.tokenizer().vocab_size()) as u32;
    spec.inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let empty = match input {
                Input::Text(t) => t.is_empty(),
                Input::Tokens(t) => t.is_empty(),
                Input::Chat(m) => m.is_empty(),
            };
            if empty {
                return Err(ValidationError::invalid(
                    "input",
                    format!("{} is empty; every input needs at least one token", name(i)),
                ));
            }
            if let Input::Text(t) = input {
                let at_least = engine.tokenizer().min_tokens_for(t.len());
                length::check_prompt_bytes(context, "input", t.len(), at_least)?;
            }
            let ids = validation::tokenize_input(engine, input)
                .map_err(|e| ValidationError::invalid("input", format!("{}: {e}", name(i))))?;
            if let Some(bad) = ids.iter().find(|&&t| t >= rows.max(1)) {
                return Err(ValidationError::invalid(
                    "input",
                    format!(
                        "{}: token id {bad} is outside the model's vocabulary ({rows} tokens)",
                        name(i)
                    ),
                ));
            }
            // The prompt must fit with room for the one position the
            // engine's length rule keeps for a next token.
            length::max_new_tokens(context, caps, "input", ids.len(), Some(1))?;
            Ok(ids)
        })
        .collect()
}

/// Embeds every input of `spec` on the picked target, charging `quota` for
/// their tokens. At most [`MAX_IN_FLIGHT`] inputs are queued at once; when
/// the engine's queue is full, the next input waits for one of this
/// request's own to finish (an error only when none of them is queued).
pub async fn embed(
    picked: &Picked,
    spec: EmbedSpec,
    limits: &Arc<LimitsConfig>,
    quota: &Arc<Quota>,
) -> Result<Embeddings, EmbedError> {
    let engine = picked.target.engine.clone();
    let (prompts, spec) = {
        let engine = engine.clone();
        let limits = limits.clone();
        tokio::task::spawn_blocking(move || tokenize(&engine, &spec, &limits).map(|p| (p, spec)))
            .await
            .map_err(|e| InferError::Engine(format!("tokenization task failed: {e}")))??
    };
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut reservation = quota
        .reserve(prompt_tokens as u64)
        .map_err(InferError::from)?;
    let n = prompts.len();
    let mut prompts = prompts.into_iter().enumerate();
    let mut pending: VecDeque<(usize, tokio::sync::mpsc::Receiver<Event>)> = VecDeque::new();
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    let mut held: Option<(usize, Vec<u32>)> = None;
    loop {
        // Queue what the window and the engine's queue allow.
        while pending.len() < MAX_IN_FLIGHT {
            let Some((i, prompt)) = held.take().or_else(|| prompts.next()) else {
                break;
            };
            let mut req = Request::greedy(prompt, 1);
            req.deadline = spec.deadline;
            req.arrival = spec.arrival;
            req.protocol = spec.protocol;
            req.variant = picked.variant;
            let prompt = req.prompt.clone();
            match engine.submit_embedding(req) {
                Ok(rx) => pending.push_back((i, rx)),
                Err(SubmitError::Overloaded { .. }) if !pending.is_empty() => {
                    held = Some((i, prompt));
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some((i, mut rx)) = pending.pop_front() else {
            break;
        };
        out[i] = Some(wait(&mut rx).await?);
    }
    reservation.use_tokens(prompt_tokens as u64);
    let vectors = out
        .into_iter()
        .map(|v| {
            let v = v.ok_or_else(|| InferError::Engine("an input was not embedded".into()))?;
            Ok(finish_vector(v, spec.dimensions))
        })
        .collect::<Result<Vec<_>, EmbedError>>()?;
    Ok(Embeddings {
        vectors,
        prompt_tokens,
    })
}

/// Waits for one embedding job's result.
async fn wait(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> Result<Vec<f32>, EmbedError> {
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Done(c) => {
                return match c.reason {
                    FinishReason::Timeout => Err(EmbedError::DeadlinePassed),
                    FinishReason::Aborted => Err(InferError::Aborted(
                        "the server stopped before the request finished".into(),
                    )
                    .into()),
                    _ => c.embedding.ok_or_else(|| {
                        InferError::Engine("the engine returned no embedding".into()).into()
                    }),
                };
            }
            Event::Failed(e) => return Err(InferError::Engine(e).into()),
            Event::Token { .. } => {}
        }
    }
    Err(InferError::Engine("the engine stopped before the request finished".into()).into())
}

/// Truncates `v` to `dimensions` and scales it to unit L2 length (a zero
/// vector stays zero), as OpenAI does for its `text-embedding-3` models.
pub fn finish_vector(mut v: Vec<f32>, dimensions: Option<usize>) -> Vec<f32> {
    if let Some(d) = dimensions {
        v.truncate(d);
    }
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 && norm.is_finite() {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
    v
}

/// An embedding as OpenAI's `encoding_format: "base64"` sends it: the
/// little-endian bytes of its f32 values, base64 (standard alphabet,
/// padded).
pub fn to_base64(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_vector_has_unit_length_and_the_asked_dimensions() {
        let v = finish_vector(vec![3.0, 4.0, 12.0], Some(2));
        assert_eq!(v.len(), 2);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(finish_vector(vec![0.0, 0.0], None), vec![0.0, 0.0]);
    }

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        // Python: base64.b64encode(struct.pack("<2f", 1.0, -2.5)).
        assert_eq!(to_base64(&[1.0, -2.5]), "AACAPwAAIMA=");
        assert_eq!(to_base64(&[1.0]), "AACAPw==");
        assert_eq!(to_base64(&[]), "");
    }
}
