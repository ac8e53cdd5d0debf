//! The protocol-neutral request path below both front ends: validate a
//! request against its pinned target (off the async workers), reserve the
//! caller's tokens, submit every choice, and hand back one stream of events
//! tagged by choice.
//!
//! HTTP and gRPC both come through here, so whatever must happen to every
//! generation request whatever its protocol (token accounting, mirroring to
//! a shadow, capture for retraining) happens here once.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;

use crate::capture::{Capture, Captured, Prompt};
use crate::config::LimitsConfig;
use crate::engine::TokenLogprob;
use crate::quota::{Quota, QuotaError, Reservation};
use crate::router::{Picked, RouteError, Target};
use crate::scheduler::{Event, FinishReason, SubmitError};
use crate::shadow::Tee;
use crate::validation::{self, GenerationSpec, Input, ValidRequest, ValidationError};

/// Why a generation request failed, from the front ends' point of view.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// No such model.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Refused by validation.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// Over the caller's limits.
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// Refused by the engine's queue.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The server stopped before the request finished.
    #[error("{0}")]
    Aborted(String),
    /// The engine failed; the detail is for logs.
    #[error("{0}")]
    Engine(String),
}

/// Validates `specs` (one per prompt) against the target's engine.
/// Tokenization and chat templates are CPU work proportional to the body, so
/// they run on the blocking pool, never on a tokio worker.
pub async fn validate(
    target: &Target,
    specs: Vec<GenerationSpec>,
    limits: &Arc<LimitsConfig>,
) -> Result<Vec<ValidRequest>, InferError> {
    let engine = target.engine.clone();
    let limits = limits.clone();
    tokio::task::spawn_blocking(move || {
        specs
            .into_iter()
            .map(|s| validation::validate(s, &engine, &limits))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| InferError::Engine(format!("validation task failed: {e}")))?
    .map_err(InferError::from)
}

/// A submitted request: every choice's events and the caller's token
/// reservation, which settles as choices finish and gives back the rest
/// when this (or its event stream) is dropped.
pub struct Generation {
    receivers: Vec<tokio::sync::mpsc::Receiver<Event>>,
    /// Prompt tokens, counted once per prompt.
    pub prompt_tokens: usize,
    reservation: Reservation,
    /// The shadow's view of the first choice, when the request is mirrored.
    tee: Option<Tee>,
    /// The first choice of each prompt, when the model captures.
    capture: Option<CaptureTee>,
}

/// What capture collects while a request streams: per prompt, its first
/// choice's text, handed to the capture's writer when that choice is done.
struct CaptureTee {
    capture: Arc<Capture>,
    version: String,
    /// (choice index, prompt, text so far).
    choices: Vec<(usize, Option<Prompt>, String)>,
}

impl CaptureTee {
    fn token(&mut self, i: usize, text: &str) {
        if let Some(c) = self.choices.iter_mut().find(|c| c.0 == i) {
            c.2.push_str(text);
        }
    }

    fn done(&mut self, i: usize, c: &crate::scheduler::Completion) {
        let Some(choice) = self.choices.iter_mut().find(|x| x.0 == i) else {
            return;
        };
        let Some(prompt) = choice.1.take() else {
            return;
        };
        if c.reason == FinishReason::Aborted {
            return;
        }
        let mut completion = std::mem::take(&mut choice.2);
        completion.push_str(&c.tail);
        self.capture.offer(Captured {
            prompt,
            completion,
            finish_reason: c.reason.as_str(),
            version: self.version.clone(),
        });
    }
}

/// Reserves the worst case (every prompt plus `max_tokens` for every
/// choice) from `quota`, then submits every choice of every request in
/// order to the picked target, labelled with its variant. Nothing stays
/// queued if a later choice is refused.
///
/// When the route mirrors this request to a shadow, the first choice is
/// copied once it is admitted; the copy is not charged to `quota`, and
/// nothing of it reaches the caller.
pub fn submit(
    picked: &Picked,
    valid: Vec<ValidRequest>,
    quota: &Arc<Quota>,
) -> Result<Generation, InferError> {
    if valid.len() > 1 {
        // Each prompt's choices fit the queue (validation); all of them
        // together must too, or the batch would be refused forever.
        let n = valid.iter().map(|v| v.choices.len()).max().unwrap_or(1);
        let tokens = valid
            .iter()
            .map(|v| v.prompt.len().saturating_mul(v.choices.len()))
            .fold(0, usize::saturating_add);
        validation::check_queueable(&picked.target.engine, valid.len(), n, tokens, "prompt")?;
    }
    let prompt_tokens: usize = valid.iter().map(|v| v.prompt.len()).sum();
    let worst: usize = valid
        .iter()
        .map(|v| {
            v.prompt
                .len()
                .saturating_add(v.max_tokens.saturating_mul(v.choices.len()))
        })
        .fold(0, usize::saturating_add);
    let mut reservation = quota.reserve(worst as u64)?;
    let mut ticket = None;
    let mut client_logprobs = None;
    if let (Some(mirror), Some(first)) = (
        &picked.shadow,
        valid.first().and_then(|v| v.choices.first()),
    ) {
        ticket = mirror.ticket(&picked.target.version, first);
        client_logprobs = first.sampling.logprobs;
    }
    let mut receivers = vec![];
    let mut capture = picked.capture.as_ref().map(|c| CaptureTee {
        capture: c.clone(),
        version: picked.target.version.clone(),
        choices: vec![],
    });
    for v in valid {
        if let Some(cap) = capture.as_mut() {
            // Token-id prompts have no text to train on.
            let prompt = match v.input {
                Input::Text(t) => Some(Prompt::Text(t)),
                Input::Chat(m) => Some(Prompt::Chat(m)),
                Input::Tokens(_) => None,
            };
            if let Some(p) = prompt {
                cap.choices.push((receivers.len(), Some(p), String::new()));
            }
        }
        for mut req in v.choices {
            req.variant = picked.variant;
            req.split_key = picked.split_key;
            if receivers.is_empty()
                && let Some(k) = ticket.as_ref().and_then(|t| t.primary_logprobs())
            {
                // Score mode compares distributions: the primary reports
                // its top-k for the shadow (the tee trims them back).
                req.sampling.logprobs = Some(k.max(client_logprobs.unwrap_or(0)));
            }
            // On error, dropping `receivers` cancels the choices already
            // queued and dropping `reservation` refunds all of it.
            receivers.push(picked.target.engine.submit(req)?);
        }
    }
    reservation.use_tokens(prompt_tokens as u64);
    Ok(Generation {
        receivers,
        prompt_tokens,
        reservation,
        tee: ticket.map(|t| t.start(client_logprobs)),
        capture,
    })
}

/// One choice's event, tagged with the choice's index.
pub type ChoiceEvent = (usize, Event);

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

impl Generation {
    /// Choices submitted.
    pub fn choices(&self) -> usize {
        self.receivers.len()
    }

    /// Every choice's events, merged in arrival order. Generated tokens are
    /// counted against the reservation as they pass, so a client that stops
    /// reading mid-stream is charged for what was generated, no more.
    pub fn events(self) -> Pin<Box<dyn Stream<Item = ChoiceEvent> + Send>> {
        let Generation {
            receivers,
            mut reservation,
            mut tee,
            mut capture,
            ..
        } = self;
        let n = receivers.len();
        let mut merged = futures::stream::select_all(
            receivers
                .into_iter()
                .enumerate()
                .map(|(i, rx)| ReceiverStream::new(rx).map(move |e| (i, e))),
        );
        Box::pin(async_stream::stream! {
            let mut seen = vec![0u64; n];
            while let Some((i, mut ev)) = merged.next().await {
                match &mut ev {
                    Event::Token { id, logprob, text } => {
                        seen[i] += 1;
                        reservation.use_tokens(1);
                        if i == 0 && let Some(t) = tee.as_mut() {
                            *logprob = t.token(*id, logprob.take());
                        }
                        if let Some(c) = capture.as_mut() {
                            c.token(i, text);
                        }
                    }
                    Event::Done(c) => {
                        reservation.use_tokens((c.completion_tokens as u64).saturating_sub(seen[i]));
                        if i == 0 && let Some(t) = tee.as_mut() {
                            t.done(c);
                        }
                        if let Some(cap) = capture.as_mut() {
                            cap.done(i, c);
                        }
                    }
                    Event::Failed(_) => {}
                }
                yield (i, ev);
            }
        })
    }

    /// Waits for every choice to finish.
    pub async fn collect(self) -> Result<Vec<ChoiceOutput>, InferError> {
        let mut outs = vec![ChoiceOutput::default(); self.choices()];
        let mut events = self.events();
        while let Some((i, ev)) = events.next().await {
            let out = &mut outs[i];
            match ev {
                Event::Token { id, text, logprob } => {
                    out.token_ids.push(id);
                    out.text.push_str(&text);
                    out.logprobs.extend(logprob);
                }
                Event::Done(c) => {
                    if c.reason == FinishReason::Aborted {
                        return Err(InferError::Aborted(
                            "the server stopped before the request finished".into(),
                        ));
                    }
                    out.text.push_str(&c.tail);
                    out.finish_reason = Some(c.reason);
                    out.completion_tokens = c.completion_tokens;
                }
                Event::Failed(e) => return Err(InferError::Engine(e)),
            }
        }
        if outs.iter().any(|o| o.finish_reason.is_none()) {
            return Err(InferError::Engine("the engine dropped the request".into()));
        }
        Ok(outs)
    }
}
