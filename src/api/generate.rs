//! Running a validated request on a pinned target, shared by both front
//! ends: submission of every choice, rate-limit accounting, collection.

use std::sync::Arc;

use tokio::sync::mpsc::Receiver;

use super::auth::Principal;
use super::error::ApiError;
use crate::engine::TokenLogprob;
use crate::router::Target;
use crate::scheduler::{Event, FinishReason};
use crate::validation::ValidRequest;

/// The receivers of a submitted request, one per choice, with what was
/// charged to the caller's token budget.
pub struct Submitted {
    /// One per choice.
    pub receivers: Vec<Receiver<Event>>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens reserved from the caller's budget (refund what is not generated).
    pub reserved: usize,
    /// Whom to refund.
    pub principal: Arc<Principal>,
}

/// Charges the caller and submits every choice; nothing stays queued if a
/// later choice is refused.
pub fn submit(
    target: &Target,
    valid: ValidRequest,
    principal: Arc<Principal>,
) -> Result<Submitted, ApiError> {
    let prompt_tokens = valid.prompt.len();
    let reserved = prompt_tokens + valid.max_tokens * valid.choices.len();
    principal.charge(reserved as u64)?;
    let mut receivers = Vec::with_capacity(valid.choices.len());
    for req in valid.choices {
        match target.engine.submit(req) {
            Ok(rx) => receivers.push(rx),
            Err(e) => {
                principal.refund_tokens(reserved as u64);
                // Dropping the receivers cancels the choices already queued.
                return Err(e.into());
            }
        }
    }
    Ok(Submitted {
        receivers,
        prompt_tokens,
        reserved,
        principal,
    })
}

/// One finished choice.
#[derive(Debug, Default, Clone)]
pub struct ChoiceOutput {
    /// Generated text.
    pub text: String,
    /// Generated ids.
    pub token_ids: Vec<u32>,
    /// Log-probabilities when asked.
    pub logprobs: Vec<TokenLogprob>,
    /// Why it ended.
    pub finish_reason: Option<FinishReason>,
    /// Generated token count.
    pub completion_tokens: usize,
}

/// Waits for one choice to finish.
pub async fn collect(mut rx: Receiver<Event>) -> Result<ChoiceOutput, ApiError> {
    let mut out = ChoiceOutput::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, text, logprob } => {
                out.token_ids.push(id);
                out.text.push_str(&text);
                if let Some(l) = logprob {
                    out.logprobs.push(l);
                }
            }
            Event::Done(c) => {
                out.text.push_str(&c.tail);
                out.finish_reason = Some(c.reason);
                out.completion_tokens = c.completion_tokens;
                if c.reason == FinishReason::Aborted {
                    return Err(ApiError::Unavailable(
                        "the server stopped before the request finished".into(),
                    ));
                }
                return Ok(out);
            }
            Event::Failed(e) => return Err(ApiError::Internal(e)),
        }
    }
    Err(ApiError::Internal("the engine dropped the request".into()))
}

impl Submitted {
    /// Returns the unused part of the reservation.
    pub fn settle(&self, used_completion_tokens: usize) {
        let used = self.prompt_tokens + used_completion_tokens;
        self.principal
            .refund_tokens(self.reserved.saturating_sub(used) as u64);
    }
}

/// The OpenAI name of a finish reason.
pub fn finish_reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Timeout => "timeout",
        FinishReason::Aborted => "abort",
    }
}
