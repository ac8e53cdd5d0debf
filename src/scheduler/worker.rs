//! The engine thread: intake, plan, forward, sample, stream, repeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::state::{Limits, Seq, State};
use super::{Completion, Event, FinishReason, Job, Msg, Shared, Timings};
use crate::engine::{
    Batch, BlockAllocator, KvCache, LoadedModel, Logits, Sampler, Scratch, StopMatcher,
    StopOutcome, TextStream, Tokenizer,
};
use crate::monitor::canary::Sample;
use crate::monitor::{EngineMetrics, Protocol, RequestMetrics, Variant};

/// Per-sequence state the scheduler carries for the engine thread.
struct Io {
    events: mpsc::Sender<Event>,
    sampler: Sampler,
    text: TextStream,
    stop: StopMatcher,
    /// Ids that end generation (EOS unless ignored, plus the request's own).
    stop_ids: Vec<u32>,
    deadline: Option<Instant>,
    protocol: Protocol,
    variant: Variant,
    arrival: Instant,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    finished: Option<FinishReason>,
    failed: Option<String>,
    /// A stop string ended the text: nothing after it may be emitted.
    text_closed: bool,
    /// Counted in the submit-side waiting gauges until first admitted.
    counted_waiting: bool,
}

struct Worker {
    shared: Arc<Shared>,
    metrics: Arc<EngineMetrics>,
    tokenizer: Tokenizer,
    context_length: usize,
    next_id: u64,
    /// Exponentially weighted tokens per second, for retry-after estimates.
    throughput: f64,
    /// The step's logits, reused from step to step.
    logits: Vec<f32>,
    /// The forward pass's activation buffers, reused likewise.
    scratch: Scratch,
}

/// Events a client may leave unread before its sequence is cancelled: a
/// client that keeps the connection open but stops reading fills the socket,
/// then this many events, and then costs nothing more (no generation for
/// nobody, no unbounded buffering).
const UNREAD_LIMIT: usize = 1024;

fn unread(events: &tokio::sync::mpsc::Sender<Event>) -> usize {
    events.max_capacity() - events.capacity()
}

pub(super) fn run(model: LoadedModel, blocks: usize, rx: Receiver<Msg>, shared: Arc<Shared>) {
    let labels = shared.labels.clone();
    let metrics = EngineMetrics::new(
        &labels.model,
        &labels.version,
        FinishReason::ALL.map(FinishReason::as_str),
    );
    let LoadedModel {
        model, tokenizer, ..
    } = model;
    let cfg = shared.config.clone();
    let mut kv = KvCache::new(model.kv_shape(cfg.block_size), blocks);
    let limits = Limits {
        max_batched_tokens: cfg.max_batched_tokens.max(1),
        max_running: cfg.max_running.clamp(1, cfg.max_batched_tokens.max(1)),
    };
    let mut state: State<Io> = State::new(limits, BlockAllocator::new(blocks, cfg.block_size));
    let mut w = Worker {
        context_length: model.config().max_position_embeddings,
        shared: shared.clone(),
        metrics,
        tokenizer,
        next_id: 0,
        throughput: 0.0,
        logits: vec![],
        scratch: Scratch::default(),
    };
    let mut drain_deadline: Option<Instant> = None;
    let mut disconnected = false;
    tracing::info!(model = %labels.model, version = %labels.version, blocks, "engine started");
    loop {
        // Intake: block while idle, otherwise take whatever has arrived.
        if state.is_idle() {
            if disconnected || drain_deadline.is_some() {
                break;
            }
            match rx.recv() {
                Ok(msg) => w.intake(msg, &mut state, &mut drain_deadline),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(msg) => w.intake(msg, &mut state, &mut drain_deadline),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if drain_deadline.is_some_and(|d| Instant::now() >= d) {
            w.abort_all(
                &mut state,
                "the server shut down before the request finished",
            );
            break;
        }
        w.reap(&mut state);
        if !state.is_idle() {
            w.step(&model, &mut kv, &mut state);
        }
        w.publish(&state);
        if state.running.is_empty() && state.waiting_len() > 0 {
            // Nothing admissible (should not happen: requests are checked
            // against the pool); avoid spinning while we wait for a change.
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(msg) => w.intake(msg, &mut state, &mut drain_deadline),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => disconnected = true,
            }
        }
    }
    w.abort_all(&mut state, "the engine stopped");
    drop(kv);
    drop(model);
    shared.stats.running.store(0, Ordering::Relaxed);
    w.metrics.running.set(0.0);
    w.metrics.waiting.set(0.0);
    w.metrics.kv_usage.set(0.0);
    shared.stopped.store(true, Ordering::Release);
    tracing::info!(model = %labels.model, version = %labels.version, "engine stopped");
}

impl Worker {
    fn intake(&mut self, msg: Msg, state: &mut State<Io>, drain: &mut Option<Instant>) {
        match msg {
            Msg::Drain(deadline) => *drain = Some(deadline),
            // Deliberate: the test of a dying engine needs a real panic.
            #[allow(clippy::panic)]
            Msg::Panic => panic!("panic injected by a test"),
            Msg::Job(job) => {
                let Job {
                    request,
                    events,
                    submitted,
                } = *job;
                let mut stop_ids = request.stop_token_ids.clone();
                if !request.ignore_eos {
                    stop_ids.extend_from_slice(self.tokenizer.eos());
                }
                let io = Io {
                    sampler: Sampler::new(request.sampling.clone(), &request.prompt),
                    text: TextStream::new(&request.prompt),
                    stop: StopMatcher::new(request.stop.clone()),
                    stop_ids,
                    deadline: request.deadline,
                    protocol: request.protocol,
                    variant: request.variant,
                    arrival: request.arrival,
                    submitted,
                    admitted: None,
                    first_token: None,
                    last_token: None,
                    finished: None,
                    failed: None,
                    text_closed: false,
                    counted_waiting: true,
                    events,
                };
                self.next_id += 1;
                state.enqueue(Seq::new(
                    self.next_id,
                    request.priority,
                    request.prompt,
                    request.max_tokens,
                    io,
                ));
            }
        }
    }

    fn uncount_waiting(&self, s: &mut Seq<Io>) {
        if s.payload.counted_waiting {
            s.payload.counted_waiting = false;
            let st = &self.shared.stats;
            st.waiting.fetch_sub(1, Ordering::Relaxed);
            st.waiting_tokens.fetch_sub(s.prompt_len, Ordering::Relaxed);
        }
    }

    /// Publishes the gauges (running, waiting, KV usage).
    fn publish(&self, state: &State<Io>) {
        let st = &self.shared.stats;
        let alloc = state.allocator();
        let preempted_waiting = state
            .waiting()
            .filter(|s| !s.payload.counted_waiting)
            .count();
        st.running.store(state.running.len(), Ordering::Relaxed);
        st.kv_blocks_used
            .store(alloc.total() - alloc.free(), Ordering::Relaxed);
        self.metrics.running.set(state.running.len() as f64);
        self.metrics
            .waiting
            .set((st.waiting.load(Ordering::Relaxed) + preempted_waiting) as f64);
        self.metrics.kv_usage.set(alloc.usage());
    }

    /// Drops sequences whose client left and ends those past their deadline.
    fn reap(&mut self, state: &mut State<Io>) {
        let now = Instant::now();
        let gone = state.remove_where(|s| {
            s.payload.events.is_closed()
                || s.payload.deadline.is_some_and(|d| now >= d)
                || unread(&s.payload.events) > UNREAD_LIMIT
        });
        for mut s in gone {
            self.uncount_waiting(&mut s);
            if unread(&s.payload.events) > UNREAD_LIMIT {
                tracing::info!(seq = s.id, "client stopped reading; sequence cancelled");
            } else if !s.payload.events.is_closed() {
                s.payload.finished = Some(FinishReason::Timeout);
                self.finish(&mut s);
            } else {
                tracing::debug!(seq = s.id, "client left; sequence cancelled");
            }
        }
    }

    fn abort_all(&mut self, state: &mut State<Io>, why: &str) {
        for mut s in state.remove_where(|_| true) {
            self.uncount_waiting(&mut s);
            s.payload.finished = Some(FinishReason::Aborted);
            tracing::warn!(seq = s.id, "{why}");
            self.finish(&mut s);
        }
    }

    /// Sends the final event and records the request's metrics.
    fn finish(&self, s: &mut Seq<Io>) {
        let generated = s.generated();
        let prompt_len = s.prompt_len;
        let preemptions = s.preemptions;
        let io = &mut s.payload;
        let m = self.metrics.requests(io.protocol, io.variant);
        if let Some(err) = io.failed.take() {
            m.failure.increment(1);
            self.shared.window.record(
                io.variant,
                Sample {
                    ok: false,
                    ttft_s: f64::NAN,
                    itl_s: f64::NAN,
                    e2e_s: io.arrival.elapsed().as_secs_f64(),
                    output_tokens: generated as u32,
                    stopped: false,
                },
            );
            let _ = io.events.try_send(Event::Failed(err));
            return;
        }
        let reason = io.finished.unwrap_or(FinishReason::Aborted);
        let mut tail = String::new();
        if !io.text_closed {
            // Text still held by the detokenizer or the stop matcher.
            if let Ok(rest) = io.text.flush(&self.tokenizer) {
                match io.stop.push(&rest) {
                    StopOutcome::Continue(t) => tail.push_str(&t),
                    StopOutcome::Stopped(t) => {
                        tail.push_str(&t);
                        io.finished = Some(FinishReason::Stop);
                    }
                }
            }
            tail.push_str(&io.stop.flush());
        }
        let reason = io.finished.unwrap_or(reason);
        let now = Instant::now();
        let first = io.first_token;
        let timings = Timings {
            queue: io.admitted.map(|a| a - io.submitted).unwrap_or_default(),
            ttft: first.map(|f| f - io.arrival).unwrap_or_default(),
            prefill: match (io.admitted, first) {
                (Some(a), Some(f)) => f - a,
                _ => Duration::ZERO,
            },
            decode: match (first, io.last_token) {
                (Some(f), Some(l)) => l - f,
                _ => Duration::ZERO,
            },
        };
        m.success[reason.index()].increment(1);
        m.prompt_tokens.increment(prompt_len as u64);
        m.prompt_tokens_hist.record(prompt_len as f64);
        m.generation_tokens_hist.record(generated as f64);
        m.e2e.record((now - io.arrival).as_secs_f64());
        if io.admitted.is_some() {
            m.queue.record(timings.queue.as_secs_f64());
        }
        if first.is_some() {
            m.prefill.record(timings.prefill.as_secs_f64());
            m.decode.record(timings.decode.as_secs_f64());
        }
        self.shared.window.record(
            io.variant,
            Sample {
                ok: !matches!(reason, FinishReason::Aborted | FinishReason::Timeout),
                ttft_s: first.map_or(f64::NAN, |_| timings.ttft.as_secs_f64()),
                itl_s: if generated > 1 {
                    timings.decode.as_secs_f64() / (generated - 1) as f64
                } else {
                    f64::NAN
                },
                e2e_s: (now - io.arrival).as_secs_f64(),
                output_tokens: generated as u32,
                stopped: reason == FinishReason::Stop,
            },
        );
        let _ = io.events.try_send(Event::Done(Completion {
            reason,
            prompt_tokens: prompt_len,
            completion_tokens: generated,
            tail,
            preemptions,
            timings,
        }));
    }

    fn step(&mut self, model: &crate::engine::Model, kv: &mut KvCache, state: &mut State<Io>) {
        let started = Instant::now();
        let plan = state.plan();
        if plan.entries.is_empty() {
            return;
        }
        if plan.preempted > 0 {
            self.metrics.preemptions.increment(plan.preempted as u64);
            self.shared
                .stats
                .preemptions
                .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        }
        // First admissions leave the submit-side waiting count.
        for e in &plan.entries {
            let s = &mut state.running[e.index];
            if s.payload.admitted.is_none() {
                s.payload.admitted = Some(started);
                self.uncount_waiting(s);
            }
        }
        let mut batch = Batch::new();
        let mut row_of = vec![None; state.running.len()];
        let mut rows = 0;
        for e in &plan.entries {
            let s = &state.running[e.index];
            let logits = if e.sample { Logits::Last } else { Logits::None };
            batch.push(
                &s.tokens[e.start..e.start + e.len],
                e.start,
                &s.blocks,
                logits,
            );
            if e.sample {
                row_of[e.index] = Some(rows);
                rows += 1;
            }
        }
        let mut flat = std::mem::take(&mut self.logits);
        let result = model.forward_into(&batch, kv, &mut self.scratch, &mut flat);
        drop(batch);
        state.advance(&plan);
        if let Err(e) = result {
            tracing::error!(error = %e, sequences = plan.entries.len(), "forward pass failed; running its sequences one by one");
            self.logits = flat;
            flat = self.isolate_failures(model, kv, state, &plan, &mut row_of, rows);
        }
        let vocab = flat.len().checked_div(rows).unwrap_or(0);
        let mut slots: Vec<Option<&mut [f32]>> = vec![];
        slots.resize_with(state.running.len(), || None);
        if vocab > 0 {
            let mut chunks: Vec<Option<&mut [f32]>> = flat.chunks_mut(vocab).map(Some).collect();
            for (i, r) in row_of.iter().enumerate() {
                if let Some(r) = r {
                    slots[i] = chunks[*r].take();
                }
            }
        }
        let tokenizer = &self.tokenizer;
        let ctx = self.context_length;
        let metrics = &self.metrics;
        let now = Instant::now();
        state
            .running
            .par_iter_mut()
            .zip(slots.par_iter_mut())
            .with_min_len(4)
            .for_each(|(s, slot)| {
                if let Some(row) = slot.as_deref_mut() {
                    emit_token(
                        s,
                        row,
                        tokenizer,
                        ctx,
                        metrics.requests(s.payload.protocol, s.payload.variant),
                        now,
                    );
                }
            });
        drop(slots);
        self.logits = flat;
        let done =
            state.remove_where(|s| s.payload.finished.is_some() || s.payload.failed.is_some());
        for mut s in done {
            self.finish(&mut s);
        }
        // Step statistics.
        let elapsed = started.elapsed();
        let st = &self.shared.stats;
        st.steps.fetch_add(1, Ordering::Relaxed);
        st.generated_tokens
            .fetch_add(rows as u64, Ordering::Relaxed);
        let tps = plan.tokens() as f64 / elapsed.as_secs_f64().max(1e-6);
        self.throughput = if self.throughput == 0.0 {
            tps
        } else {
            0.9 * self.throughput + 0.1 * tps
        };
        st.tokens_per_second
            .store(self.throughput.to_bits(), Ordering::Relaxed);
        self.metrics.step_batch.record(plan.entries.len() as f64);
        self.metrics
            .step_prefill_tokens
            .record(plan.prefill_tokens as f64);
        self.metrics
            .step_decode_tokens
            .record(plan.decode_tokens as f64);
        self.metrics.step_time.record(elapsed.as_secs_f64());
    }
}

impl Worker {
    /// After a batched forward failed: runs each sequence of the step alone,
    /// fails only those that fail alone (their error is theirs), and returns
    /// the others' logits in the step's rows (zeros for the failed). Running
    /// a sequence again is safe: its forward rewrites the KV of its own
    /// positions only, with the same values whatever else was in the batch.
    fn isolate_failures(
        &mut self,
        model: &crate::engine::Model,
        kv: &mut KvCache,
        state: &mut State<Io>,
        plan: &super::state::Plan,
        row_of: &mut [Option<usize>],
        rows: usize,
    ) -> Vec<f32> {
        let (mut out, mut one) = (Vec::new(), Vec::new());
        for e in &plan.entries {
            let s = &state.running[e.index];
            let mut batch = Batch::new();
            let logits = if e.sample { Logits::Last } else { Logits::None };
            batch.push(
                &s.tokens[e.start..e.start + e.len],
                e.start,
                &s.blocks,
                logits,
            );
            match model.forward_into(&batch, kv, &mut self.scratch, &mut one) {
                Ok(()) => {
                    if let Some(r) = row_of[e.index] {
                        let vocab = one.len();
                        if out.is_empty() {
                            out = vec![0.0; rows * vocab];
                        }
                        if let Some(dst) = out.get_mut(r * vocab..(r + 1) * vocab) {
                            dst.copy_from_slice(&one);
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "a sequence fails the forward pass alone; failing it only");
                    state.running[e.index].payload.failed =
                        Some(format!("the engine failed on this request: {err}"));
                    row_of[e.index] = None;
                }
            }
        }
        out
    }
}

/// Samples one sequence's next token, streams its text and decides whether
/// it is finished. Runs in parallel across sequences.
fn emit_token(
    s: &mut Seq<Io>,
    row: &mut [f32],
    tokenizer: &Tokenizer,
    ctx: usize,
    m: &RequestMetrics,
    now: Instant,
) {
    let (token, logprob) = match s.payload.sampler.sample(row) {
        Ok(t) => t,
        Err(e) => {
            s.payload.failed = Some(format!("sampling failed: {e}"));
            return;
        }
    };
    s.tokens.push(token);
    let io = &mut s.payload;
    match io.last_token {
        None => {
            io.first_token = Some(now);
            m.ttft.record((now - io.arrival).as_secs_f64());
            m.engine_ttft.record((now - io.submitted).as_secs_f64());
        }
        Some(prev) => m.itl.record((now - prev).as_secs_f64()),
    }
    io.last_token = Some(now);
    m.generation_tokens.increment(1);
    let mut text = String::new();
    if io.stop_ids.contains(&token) {
        io.finished = Some(FinishReason::Stop);
    } else {
        match io.text.push(tokenizer, token) {
            Ok(Some(delta)) => match io.stop.push(&delta) {
                StopOutcome::Continue(t) => text = t,
                StopOutcome::Stopped(t) => {
                    text = t;
                    io.finished = Some(FinishReason::Stop);
                    io.text_closed = true;
                }
            },
            Ok(None) => {}
            Err(e) => {
                io.failed = Some(format!("detokenization failed: {e}"));
                return;
            }
        }
    }
    let generated = s.tokens.len() - s.prompt_len;
    if io.finished.is_none() && (generated >= s.max_new_tokens || s.tokens.len() >= ctx) {
        io.finished = Some(FinishReason::Length);
    }
    // The channel has room for every token, so this only fails when the client left.
    let _ = io.events.try_send(Event::Token {
        id: token,
        text,
        logprob,
    });
}
