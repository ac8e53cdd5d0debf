//! The engine thread: intake, plan, forward, sample, stream, repeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::mpsc;

use super::governor;
use super::state::{Limits, Priority, Seq, State};
use super::{Completion, Event, FinishReason, Job, Msg, ScoreJob, Shared, Timings};
use crate::engine::grammar::Grammar;
use crate::engine::{
    Batch, BlockAllocator, EnginePath, KvCache, LoadedModel, Logits, PositionScore, Sampler,
    Scratch, StopMatcher, StopOutcome, TextStream, Tokenizer, TopRows,
};
use crate::monitor::canary::{Outcome, Sample};
use crate::monitor::drift::{Observation, TextProfile};
use crate::monitor::{EngineMetrics, Protocol, RequestMetrics, Variant};

/// Per-sequence state the scheduler carries for the engine thread.
struct Io {
    events: mpsc::Sender<Event>,
    sampler: Sampler,
    /// The output constraint's state (structured outputs): masks the row
    /// before each draw, advances by each token, ends the sequence when
    /// complete. Kept across preemption with the tokens it has seen.
    grammar: Option<Grammar>,
    text: TextStream,
    stop: StopMatcher,
    /// Ids that end generation (EOS unless ignored, plus the request's own).
    stop_ids: Vec<u32>,
    deadline: Option<Instant>,
    protocol: Protocol,
    variant: Variant,
    /// The split's key hash, for the canary sample.
    split_key: u64,
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
    /// Its prompt tokens in those gauges (as submitted).
    counted_tokens: usize,
    /// A scoring job instead of generation.
    score: Option<Scoring>,
    /// What drift detection measures of it; `None` when it is not recorded
    /// (shadow copies, canary traffic, internal requests, scoring jobs).
    drift: Option<DriftIo>,
    /// Set on a drift probe: a scoring job of a client's prompt that this
    /// thread queued itself. Nobody reads its events (the receiver is kept
    /// here so the sequence is not taken for abandoned); its result goes to
    /// the drift recorder.
    probe: Option<mpsc::Receiver<Event>>,
    /// An embedding job: the running sum of its prompt's final-normed
    /// hidden states and the rows summed. It samples nothing.
    embed: Option<(Vec<f32>, usize)>,
}

/// A request's drift measurements, accumulated in place.
struct DriftIo {
    profile: TextProfile,
    /// Measure the entropy of each generated token's distribution.
    entropy: bool,
    entropy_sum: f64,
    entropy_n: u32,
}

/// How long a drift probe may wait for spare capacity before it is given up.
const PROBE_DEADLINE: Duration = Duration::from_secs(120);

/// A scoring job in progress.
struct Scoring {
    job: Arc<ScoreJob>,
    /// Position whose logits score the job's first token (the prompt's last).
    first: usize,
    /// Scores by position of the job's tokens; a preempted job recomputes
    /// and overwrites them.
    out: Vec<Option<PositionScore>>,
    /// A drift probe's running sum of its rows' final hidden states and
    /// the rows summed (the prompt embedding, mean-pooled).
    pooled: Option<(Vec<f32>, usize)>,
}

impl Scoring {
    /// The logits rows a step feeding `start..start + len` must return.
    fn span(&self, start: usize, len: usize) -> Option<(usize, usize)> {
        let lo = start.max(self.first);
        let hi = (start + len).min(self.first + self.job.tokens.len());
        (lo < hi).then(|| (lo - start, hi - start))
    }
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
    /// The model's hidden width.
    hidden: usize,
    /// This engine's part of the process-wide totals.
    pod: crate::monitor::pod::PodShare,
    /// Blocks sliding windows gave back, as last counted in the metrics.
    window_freed: u64,
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
    let groups = model.kv_groups();
    let windows = groups.windows().to_vec();
    let windows_len = windows.len().max(1);
    let mut kv = model.kv_cache_of(
        model
            .kv_shape(cfg.block_size)
            .with_dtype(cfg.kv_cache_dtype),
        groups,
        blocks,
    );
    let limits = Limits {
        max_batched_tokens: cfg.max_batched_tokens.max(1),
        max_running: cfg.max_running.clamp(1, cfg.max_batched_tokens.max(1)),
    };
    let prefix_caching = cfg.prefix_caching;
    let mut state: State<Io> = State::new(
        limits,
        BlockAllocator::new(blocks, cfg.block_size)
            .with_windows(windows)
            .with_prefix_caching(prefix_caching),
    );
    let mut w = Worker {
        context_length: model.config().max_position_embeddings,
        shared: shared.clone(),
        metrics,
        tokenizer,
        next_id: 0,
        throughput: 0.0,
        logits: vec![],
        scratch: Scratch::default(),
        hidden: model.config().hidden_size,
        pod: Default::default(),
        window_freed: 0,
    };
    w.metrics
        .kv_capacity
        .set((blocks / windows_len * cfg.block_size) as f64);
    let mut drain_deadline: Option<Instant> = None;
    let mut disconnected = false;
    // Released when this function returns or unwinds.
    let mut claim = governor::GLOBAL.claim();
    tracing::info!(
        model = %labels.model,
        version = %labels.version,
        blocks,
        block_size = cfg.block_size,
        max_batched_tokens = limits.max_batched_tokens,
        max_running = limits.max_running,
        prefix_caching,
        kv_cache_dtype = %cfg.kv_cache_dtype,
        "engine started"
    );
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
        if drain_deadline.is_some_and(|d| shared.clock.now() >= d) {
            w.abort_all(
                &mut state,
                "the server shut down before the request finished",
            );
            break;
        }
        w.reap(&mut state);
        claim.set(state.has_foreground());
        if !state.is_idle() {
            if !state.has_foreground() && claim.others_busy() {
                // Only background work here, and another engine has
                // foreground work: the cores are its. Wait, taking intake.
                w.publish(&state);
                match rx.recv_timeout(governor::BACKGROUND_POLL) {
                    Ok(msg) => w.intake(msg, &mut state, &mut drain_deadline),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => disconnected = true,
                }
                continue;
            }
            w.step(&model, &mut kv, &mut state);
            claim.set(state.has_foreground());
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
    w.metrics.background_waiting.set(0.0);
    w.metrics.kv_usage.set(0.0);
    w.pod.set(Default::default());
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
                    embed,
                } = *job;
                let score = request.score.clone().map(|job| Scoring {
                    first: request.prompt.len() - 1,
                    out: vec![None; job.tokens.len()],
                    pooled: None,
                    job,
                });
                let mut tokens = request.prompt.clone();
                let mut max_new_tokens = request.max_tokens;
                if let Some(sc) = &score {
                    // Scored in one prefill: the job's tokens follow the
                    // prompt and nothing is generated.
                    tokens.extend_from_slice(&sc.job.tokens);
                    max_new_tokens = 1;
                }
                let mut stop_ids = request.stop_token_ids.clone();
                if !request.ignore_eos {
                    stop_ids.extend_from_slice(self.tokenizer.eos());
                }
                // Drift watches the traffic a version serves as stable.
                let eligible = request.score.is_none()
                    && !embed
                    && request.variant == Variant::Stable
                    && request.protocol != Protocol::Internal;
                let admission = if eligible {
                    self.shared.drift.admit()
                } else {
                    Default::default()
                };
                let drift = admission.record.then_some(DriftIo {
                    profile: request.text_profile,
                    entropy: admission.entropy,
                    entropy_sum: 0.0,
                    entropy_n: 0,
                });
                if admission.prompt_logprob
                    && request.prompt.len() >= 2
                    && self.background_waiting(state) < self.shared.config.max_waiting
                {
                    // A probe is skipped while the background queue is
                    // full: drift then samples fewer prompts, and the
                    // queue stays bounded however busy the engine is.
                    self.enqueue_probe(&request.prompt, state);
                }
                let io = Io {
                    grammar: request
                        .grammar
                        .clone()
                        .map(|c| Grammar::new(c, self.metrics.mask_time.clone())),
                    sampler: Sampler::new(request.sampling.clone(), &request.prompt),
                    text: TextStream::new(&request.prompt),
                    stop: StopMatcher::new(request.stop.clone()),
                    stop_ids,
                    deadline: request.deadline,
                    protocol: request.protocol,
                    variant: request.variant,
                    split_key: request.split_key,
                    arrival: request.arrival,
                    submitted,
                    admitted: None,
                    first_token: None,
                    last_token: None,
                    finished: None,
                    failed: None,
                    text_closed: false,
                    counted_waiting: true,
                    counted_tokens: request.prompt.len(),
                    score,
                    events,
                    drift,
                    probe: None,
                    embed: embed.then(|| (vec![0.0; self.hidden], 0)),
                };
                self.next_id += 1;
                // A scoring job needs the logits of every position it scores:
                // the prefix cache may stand in only for those before. An
                // embedding job needs every position's hidden state.
                let logits_from = if embed {
                    0
                } else {
                    io.score.as_ref().map_or(usize::MAX, |sc| sc.first)
                };
                state.enqueue(
                    Seq::new(self.next_id, request.priority, tokens, max_new_tokens, io)
                        .needs_logits_from(logits_from),
                );
            }
        }
    }

    /// Queues a drift probe: the model's log-prob of each token of `prompt`
    /// after its first, as a low-priority scoring job (spare capacity only,
    /// at most a small prefill chunk a step, preempted first).
    fn enqueue_probe(&mut self, prompt: &[u32], state: &mut State<Io>) {
        let job = Arc::new(ScoreJob {
            tokens: prompt[1..].to_vec(),
            probes: vec![],
        });
        let (events, rx) = mpsc::channel(2);
        let now = self.shared.clock.now();
        let io = Io {
            grammar: None,
            sampler: Sampler::new(Default::default(), &prompt[..1]),
            text: TextStream::new(&prompt[..1]),
            stop: StopMatcher::new(vec![]),
            stop_ids: vec![],
            deadline: Some(now + PROBE_DEADLINE),
            protocol: Protocol::Internal,
            variant: Variant::Shadow,
            split_key: 0,
            arrival: now,
            submitted: now,
            admitted: None,
            first_token: None,
            last_token: None,
            finished: None,
            failed: None,
            text_closed: false,
            counted_waiting: false,
            counted_tokens: 0,
            score: Some(Scoring {
                first: 0,
                out: vec![None; job.tokens.len()],
                pooled: Some((vec![0.0; self.hidden], 0)),
                job,
            }),
            events,
            drift: None,
            probe: Some(rx),
            embed: None,
        };
        self.next_id += 1;
        // Every position is scored (and pooled): nothing comes from the cache.
        state.enqueue(
            Seq::new(self.next_id, Priority::Low, prompt.to_vec(), 1, io).needs_logits_from(0),
        );
    }

    fn uncount_waiting(&self, s: &mut Seq<Io>) {
        if s.payload.counted_waiting {
            s.payload.counted_waiting = false;
            let st = &self.shared.stats;
            let (count, tokens) = match s.priority {
                Priority::Normal => (&st.waiting, &st.waiting_tokens),
                Priority::Low => (&st.background_waiting, &st.background_waiting_tokens),
            };
            count.fetch_sub(1, Ordering::AcqRel);
            tokens.fetch_sub(s.payload.counted_tokens, Ordering::AcqRel);
        }
    }

    /// Sequences of `priority` in line that no submission counts:
    /// preempted ones, and (background) the engine's own drift probes.
    fn requeued(state: &State<Io>, priority: Priority) -> usize {
        state
            .waiting()
            .filter(|s| s.priority == priority && !s.payload.counted_waiting)
            .count()
    }

    /// Background sequences waiting now: submitted ones not yet admitted,
    /// preempted ones and drift probes.
    fn background_waiting(&self, state: &State<Io>) -> usize {
        self.shared.stats.background_waiting.load(Ordering::Acquire)
            + Self::requeued(state, Priority::Low)
    }

    /// Publishes the gauges (running, waiting, KV usage). The client
    /// waiting gauge counts client requests only; background work has its
    /// own.
    fn publish(&mut self, state: &State<Io>) {
        let st = &self.shared.stats;
        let alloc = state.allocator();
        let requeued = Self::requeued(state, Priority::Normal);
        let background_requeued = Self::requeued(state, Priority::Low);
        st.requeued.store(requeued, Ordering::Release);
        st.background_requeued
            .store(background_requeued, Ordering::Release);
        st.running.store(state.running.len(), Ordering::Relaxed);
        st.kv_blocks_used
            .store(alloc.total() - alloc.free(), Ordering::Relaxed);
        st.kv_blocks_cached
            .store(alloc.evictable(), Ordering::Relaxed);
        let waiting = st.waiting.load(Ordering::Acquire) + requeued;
        let background = st.background_waiting.load(Ordering::Acquire) + background_requeued;
        self.metrics.running.set(state.running.len() as f64);
        self.metrics.waiting.set(waiting as f64);
        self.metrics.background_waiting.set(background as f64);
        self.metrics.kv_usage.set(alloc.usage());
        self.metrics
            .kv_window_freed
            .increment(state.window_freed - self.window_freed);
        self.window_freed = state.window_freed;
        self.pod.set(crate::monitor::pod::Share {
            waiting,
            running: state.running.len(),
            kv_used: alloc.total() - alloc.free(),
            kv_total: alloc.total(),
        });
    }

    /// Drops sequences whose client left and ends those past their deadline.
    fn reap(&mut self, state: &mut State<Io>) {
        let now = self.shared.clock.now();
        let gone = state.remove_where(|s| {
            s.payload.events.is_closed()
                || s.payload.deadline.is_some_and(|d| now >= d)
                || unread(&s.payload.events) > UNREAD_LIMIT
        });
        for mut s in gone {
            self.uncount_waiting(&mut s);
            let io = &s.payload;
            // A client that left is a sample of its side too: a slow
            // candidate loses its impatient clients here.
            let left = || {
                Sample::cancelled(
                    io.split_key,
                    (now - io.arrival).as_secs_f64(),
                    s.generated() as u32,
                )
            };
            if unread(&io.events) > UNREAD_LIMIT {
                tracing::info!(seq = s.id, "client stopped reading; sequence cancelled");
                self.shared.window.record(io.variant, left());
            } else if !io.events.is_closed() {
                s.payload.finished = Some(FinishReason::Timeout);
                self.finish(&mut s);
            } else {
                tracing::debug!(seq = s.id, "client left; sequence cancelled");
                self.shared.window.record(io.variant, left());
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

    /// Adds each drift probe's rows of this step's final hidden states
    /// (the host path leaves them in the scratch) to its pooled sum. A row
    /// at position 0 starts the sum over: a preempted probe recomputes its
    /// prompt from the start. On the tensor path there are none, and the
    /// probe records no embedding.
    fn pool_probe_rows(
        &mut self,
        state: &mut State<Io>,
        plan: &crate::scheduler::state::Plan,
        entry_rows: &[usize],
        rows: usize,
    ) {
        let h = self.scratch.head_input();
        let width = self.hidden;
        if width == 0 || h.len() != rows * width {
            return;
        }
        let mut at = 0;
        for (e, &n) in plan.entries.iter().zip(entry_rows) {
            let mine = &h[at * width..(at + n) * width];
            at += n;
            let Some(sc) = state.running[e.index].payload.score.as_mut() else {
                continue;
            };
            let Some((sum, count)) = sc.pooled.as_mut() else {
                continue;
            };
            if n == 0 {
                continue;
            }
            if e.start == 0 {
                sum.iter_mut().for_each(|v| *v = 0.0);
                *count = 0;
            }
            for row in mine.chunks_exact(width) {
                sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
            *count += n;
        }
    }

    /// Adds each embedding job's rows of this step's final hidden states
    /// (left in the scratch, in plan order, by either path) to its pooled
    /// sum. A chunk at position 0 starts the sum over: a preempted job
    /// recomputes its prompt from the start.
    fn pool_embed_rows(&mut self, state: &mut State<Io>, plan: &crate::scheduler::state::Plan) {
        let h = self.scratch.hidden_rows();
        let width = self.hidden;
        let mut at = 0;
        for e in &plan.entries {
            let Some((sum, count)) = state.running[e.index].payload.embed.as_mut() else {
                continue;
            };
            let Some(mine) = h.get(at * width..(at + e.len) * width) else {
                // Fewer rows than asked: the job cannot finish with a full
                // sum, and `finish` fails it.
                return;
            };
            at += e.len;
            if e.start == 0 {
                sum.iter_mut().for_each(|v| *v = 0.0);
                *count = 0;
            }
            for row in mine.chunks_exact(width.max(1)) {
                sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
            *count += e.len;
        }
    }

    /// Ends an embedding job: its mean-pooled hidden state, or why not.
    fn finish_embedding(&self, s: &mut Seq<Io>, sum: Vec<f32>, rows: usize) {
        let prompt_len = s.prompt_len;
        let preemptions = s.preemptions;
        let io = &mut s.payload;
        let m = self.metrics.requests(io.protocol, io.variant);
        if let Some(err) = io.failed.take() {
            m.failure.increment(1);
            let _ = io.events.try_send(Event::Failed(err));
            return;
        }
        let reason = io.finished.unwrap_or(FinishReason::Aborted);
        let embedding = if reason == FinishReason::Stop {
            if rows != prompt_len || rows == 0 {
                m.failure.increment(1);
                let _ = io.events.try_send(Event::Failed(format!(
                    "the engine pooled {rows} of the prompt's {prompt_len} hidden states"
                )));
                return;
            }
            let inv = 1.0 / rows as f32;
            Some(sum.into_iter().map(|v| v * inv).collect())
        } else {
            None
        };
        let now = self.shared.clock.now();
        m.success[reason.index()].increment(1);
        m.prompt_tokens.increment(prompt_len as u64);
        m.prompt_tokens_hist.record(prompt_len as f64);
        m.e2e.record((now - io.arrival).as_secs_f64());
        let queue = io.admitted.map(|a| a - io.submitted).unwrap_or_default();
        if io.admitted.is_some() {
            m.queue.record(queue.as_secs_f64());
        }
        let _ = io.events.try_send(Event::Done(Completion {
            reason,
            prompt_tokens: prompt_len,
            completion_tokens: 0,
            tail: String::new(),
            preemptions,
            timings: Timings {
                queue,
                ..Default::default()
            },
            scores: None,
            embedding,
        }));
    }

    /// Sends the final event and records the request's metrics.
    fn finish(&self, s: &mut Seq<Io>) {
        let generated = s.generated();
        let prompt_len = s.prompt_len;
        let preemptions = s.preemptions;
        if let Some((sum, rows)) = s.payload.embed.take() {
            self.finish_embedding(s, sum, rows);
            return;
        }
        let io = &mut s.payload;
        if io.probe.take().is_some() {
            // A drift probe: only a complete result counts (one preempted
            // past its deadline, or failed, is dropped).
            if io.failed.is_none()
                && let Some(sc) = io.score.take()
            {
                let (sum, n) = sc.out.iter().flatten().fold((0.0f64, 0usize), |(s, n), p| {
                    (s + f64::from(p.logprob), n + 1)
                });
                if n > 0 && n == sc.out.len() {
                    self.shared.drift.record_prompt_logprob(sum / n as f64);
                }
                if let Some((mut pooled, rows)) = sc.pooled
                    && rows == sc.out.len()
                    && rows > 0
                {
                    let inv = 1.0 / rows as f32;
                    pooled.iter_mut().for_each(|v| *v *= inv);
                    self.shared.drift.record_prompt_embedding(&pooled);
                }
            }
            return;
        }
        let m = self.metrics.requests(io.protocol, io.variant);
        if let Some(d) = &io.drift {
            let reason = io.finished;
            let failed = io.failed.is_some();
            let obs = Observation {
                prompt_len: prompt_len as u32,
                output_len: generated as u32,
                finish: if failed {
                    None
                } else {
                    Some(reason.unwrap_or(FinishReason::Aborted).index())
                },
                error: failed
                    || matches!(
                        reason,
                        None | Some(FinishReason::Aborted | FinishReason::Timeout)
                    ),
                ttft_s: io
                    .first_token
                    .map_or(f64::NAN, |f| (f - io.arrival).as_secs_f64()),
                e2e_s: io.arrival.elapsed().as_secs_f64(),
                entropy: (d.entropy_n > 0).then(|| d.entropy_sum / f64::from(d.entropy_n)),
            };
            self.shared.drift.record(
                &obs,
                &s.tokens[..prompt_len.min(s.tokens.len())],
                &d.profile,
            );
        }
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
                    outcome: Outcome::Served,
                    key: io.split_key,
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
        let now = self.shared.clock.now();
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
                outcome: Outcome::Served,
                key: io.split_key,
            },
        );
        let scores = io
            .score
            .take()
            .map(|sc| sc.out.into_iter().flatten().collect());
        let _ = io.events.try_send(Event::Done(Completion {
            reason,
            prompt_tokens: prompt_len,
            completion_tokens: generated,
            tail,
            preemptions,
            timings,
            scores,
            embedding: None,
        }));
    }

    fn step(&mut self, model: &crate::engine::Model, kv: &mut KvCache, state: &mut State<Io>) {
        // Compute time on the system clock; points in a request's life on
        // the engine's.
        let started = Instant::now();
        let at = self.shared.clock.now();
        let plan = state.plan();
        if plan.entries.is_empty() {
            return;
        }
        if plan.cache_queries > 0 {
            self.metrics
                .prefix_cache_queries
                .increment(plan.cache_queries as u64);
            self.metrics
                .prefix_cache_hits
                .increment(plan.cache_hits as u64);
            let st = &self.shared.stats;
            st.prefix_cache_queries
                .fetch_add(plan.cache_queries as u64, Ordering::Relaxed);
            st.prefix_cache_hits
                .fetch_add(plan.cache_hits as u64, Ordering::Relaxed);
        }
        if plan.preempted > 0 {
            self.metrics.preemptions.increment(plan.preempted as u64);
            self.shared
                .stats
                .preemptions
                .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        }
        // Copy-on-write of partial last blocks, before the step reads them.
        for &(index, from, to) in &plan.copies {
            if let Err(e) = kv.copy_block(from, to)
                && let Some(s) = state.running.get_mut(index)
            {
                tracing::error!(error = %e, "copying a KV block failed; failing its sequence");
                s.payload.failed = Some(format!("the engine failed on this request: {e}"));
            }
        }
        // First admissions leave the submit-side waiting count.
        for e in &plan.entries {
            let s = &mut state.running[e.index];
            if s.payload.admitted.is_none() {
                s.payload.admitted = Some(at);
                self.uncount_waiting(s);
            }
        }
        let mut batch = Batch::new();
        // Logits rows of each entry, in plan order (the order they come back).
        let mut entry_rows = Vec::with_capacity(plan.entries.len());
        let mut entry_logits = Vec::with_capacity(plan.entries.len());
        let mut sampled = 0;
        for e in &plan.entries {
            let s = &state.running[e.index];
            if s.payload.embed.is_some() {
                // Prefill only: hidden states, no logits, nothing sampled.
                batch.push_hidden(&s.tokens[e.start..e.start + e.len], e.start, &s.blocks);
                entry_rows.push(0);
                entry_logits.push(Logits::None);
                continue;
            }
            let (logits, n) = match &s.payload.score {
                Some(sc) => match sc.span(e.start, e.len) {
                    Some((from, to)) => (Logits::Span { from, to }, to - from),
                    None => (Logits::None, 0),
                },
                None if e.sample => (Logits::Last, 1),
                None => (Logits::None, 0),
            };
            batch.push(
                &s.tokens[e.start..e.start + e.len],
                e.start,
                &s.blocks,
                logits,
            );
            entry_rows.push(n);
            entry_logits.push(logits);
            if s.payload.score.is_none() {
                sampled += n;
            }
        }
        let rows: usize = entry_rows.iter().sum();
        let mut flat = std::mem::take(&mut self.logits);
        // On the tensor path, a step whose every row needs only its best
        // logits picks them on the device: a plain greedy step copies back
        // only ids, others each row's best few (token, logit) pairs.
        let vocab_size = model.config().vocab_size;
        let mut picked = None;
        if model.engine_path() == EnginePath::Tensor
            && let Some((top_k, lse)) = device_picks(state, &plan, &entry_rows, vocab_size)
        {
            let got = if top_k == 1 && !lse {
                model
                    .forward_greedy(&batch, kv, &mut self.scratch)
                    .map(|ids| TopRows {
                        k: 1,
                        pairs: ids.into_iter().map(|id| (id, 0.0)).collect(),
                        lse: None,
                    })
            } else {
                model.forward_top(&batch, kv, &mut self.scratch, top_k, lse)
            };
            match got {
                Ok(t) if t.pairs.len() == rows * t.k => {
                    self.shared
                        .stats
                        .device_picked_tokens
                        .fetch_add(rows as u64, Ordering::Relaxed);
                    picked = Some(t)
                }
                Ok(_) => tracing::error!("the device step returned the wrong number of picks"),
                Err(e) => {
                    tracing::error!(error = %e, "the device step failed; running the step again")
                }
            }
        }
        // (A failed device step is run again: each sequence rewrites the KV
        // of its own positions with the same values.)
        let result = match picked {
            Some(_) => {
                flat.clear();
                Ok(())
            }
            None => model.forward_into(&batch, kv, &mut self.scratch, &mut flat),
        };
        drop(batch);
        if result.is_ok() {
            self.pool_probe_rows(state, &plan, &entry_rows, rows);
            self.pool_embed_rows(state, &plan);
        }
        if let Err(e) = result {
            tracing::error!(error = %e, sequences = plan.entries.len(), "forward pass failed; running its sequences one by one");
            self.logits = flat;
            flat = self.isolate_failures(model, kv, state, &plan, &entry_logits, &entry_rows);
        }
        // After the failures are known: a failed sequence's blocks stay out
        // of the prefix cache.
        state.advance_where(&plan, |s| s.payload.failed.is_none());
        let vocab = flat.len().checked_div(rows).unwrap_or(0);
        // Each sequence's row of device picks.
        let mut picks: Vec<Option<usize>> = vec![None; state.running.len()];
        if picked.is_some() {
            let mut row = 0;
            for (e, &n) in plan.entries.iter().zip(&entry_rows) {
                if n > 0 && state.running[e.index].payload.failed.is_none() {
                    picks[e.index] = Some(row);
                }
                row += n;
            }
        }
        // Each sequence's rows: one to sample from, or a scoring job's span
        // (with the position of its first row).
        let mut slots: Vec<Option<(&mut [f32], usize)>> = vec![];
        slots.resize_with(state.running.len(), || None);
        if vocab > 0 {
            let mut rest = flat.as_mut_slice();
            for (e, &n) in plan.entries.iter().zip(&entry_rows) {
                let (mine, tail) = rest.split_at_mut(n * vocab);
                rest = tail;
                if n > 0 && state.running[e.index].payload.failed.is_none() {
                    let first_pos = state.running[e.index]
                        .payload
                        .score
                        .as_ref()
                        .map_or(0, |sc| e.start.max(sc.first));
                    slots[e.index] = Some((mine, first_pos));
                }
            }
        }
        // A scoring job that fed its last token is done.
        for e in &plan.entries {
            let s = &mut state.running[e.index];
            if (s.payload.score.is_some() || s.payload.embed.is_some())
                && s.computed == s.tokens.len()
            {
                s.payload.finished = Some(FinishReason::Stop);
            }
        }
        let tokenizer = &self.tokenizer;
        let ctx = self.context_length;
        let metrics = &self.metrics;
        let now = self.shared.clock.now();
        state
            .running
            .par_iter_mut()
            .zip(slots.par_iter_mut())
            .zip(picks.par_iter())
            .with_min_len(4)
            .for_each(|((s, slot), pick)| {
                let m = metrics.requests(s.payload.protocol, s.payload.variant);
                match (slot.as_mut(), s.payload.score.as_mut(), pick) {
                    (Some((rows, first_pos)), Some(sc), _) => {
                        score_rows(sc, rows, vocab, *first_pos)
                    }
                    (Some((row, _)), None, _) => {
                        emit_token(s, Pick::Row(row), tokenizer, ctx, m, now)
                    }
                    (None, None, Some(row)) => {
                        if let Some(t) = &picked {
                            let lse = t.lse.as_ref().and_then(|l| l.get(*row).copied());
                            let pick = Pick::Top(t.row(*row), vocab_size, lse);
                            emit_token(s, pick, tokenizer, ctx, m, now)
                        }
                    }
                    (None, _, _) => {}
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
        st.prefill_tokens
            .fetch_add(plan.prefill_tokens as u64, Ordering::Relaxed);
        st.generated_tokens
            .fetch_add(sampled as u64, Ordering::Relaxed);
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

/// What a step's rows need from the device when every one needs only its
/// best logits (greedy, top-k, log-probabilities; no penalty, no drift
/// entropy probe, no scoring job, no output constraint): the largest number of candidates any row
/// asks, and whether any asks log-probabilities. `None` when a row needs its
/// whole row of logits, or no row is sampled.
fn device_picks(
    state: &State<Io>,
    plan: &super::state::Plan,
    entry_rows: &[usize],
    vocab: usize,
) -> Option<(usize, bool)> {
    let (mut top_k, mut lse, mut rows) = (1, false, 0);
    for (e, &n) in plan.entries.iter().zip(entry_rows) {
        if n == 0 {
            continue;
        }
        let p = &state.running[e.index].payload;
        let probed = p.drift.as_ref().is_some_and(|d| d.entropy);
        // A constrained row masks its whole row before the draw (the
        // device's best k may all be forbidden): the step takes the host path.
        if p.score.is_some() || probed || p.grammar.is_some() {
            return None;
        }
        top_k = top_k.max(p.sampler.params().device_candidates(vocab)?);
        lse |= p.sampler.params().logprobs.is_some();
        rows += n;
    }
    (rows > 0).then_some((top_k, lse))
}

/// Scores a scoring job's rows: `rows` holds consecutive positions from
/// `first_pos`, each predicting the token after it.
fn score_rows(sc: &mut Scoring, rows: &mut [f32], vocab: usize, first_pos: usize) {
    for (i, row) in rows.chunks(vocab).enumerate() {
        let k = first_pos + i - sc.first;
        let (Some(&token), Some(slot)) = (sc.job.tokens.get(k), sc.out.get_mut(k)) else {
            continue;
        };
        let probes = sc.job.probes.get(k).map_or(&[][..], |p| p.as_slice());
        *slot = Some(crate::engine::score_row(row, token, probes));
    }
}

impl Worker {
    /// After a batched forward failed: runs each entry of the step alone,
    /// fails only the sequences that fail alone (their error is theirs), and
    /// returns the others' logits rows where the batch would have put them
    /// (zeros for the failed). Running a sequence again is safe: its forward
    /// rewrites the KV of its own positions only, with the same values
    /// whatever else was in the batch.
    fn isolate_failures(
        &mut self,
        model: &crate::engine::Model,
        kv: &mut KvCache,
        state: &mut State<Io>,
        plan: &super::state::Plan,
        entry_logits: &[Logits],
        entry_rows: &[usize],
    ) -> Vec<f32> {
        let rows: usize = entry_rows.iter().sum();
        let (mut out, mut one) = (Vec::new(), Vec::new());
        let mut offset = 0;
        for ((e, &logits), &n) in plan.entries.iter().zip(entry_logits).zip(entry_rows) {
            let s = &state.running[e.index];
            let mut batch = Batch::new();
            batch.push(
                &s.tokens[e.start..e.start + e.len],
                e.start,
                &s.blocks,
                logits,
            );
            match model.forward_into(&batch, kv, &mut self.scratch, &mut one) {
                Ok(()) if n > 0 => {
                    let vocab = one.len() / n;
                    if out.is_empty() {
                        out = vec![0.0; rows * vocab];
                    }
                    if let Some(dst) = out.get_mut(offset * vocab..(offset + n) * vocab) {
                        dst.copy_from_slice(&one);
                    }
                }
                Ok(()) => {}
                Err(err) => {
                    tracing::error!(error = %err, "a sequence fails the forward pass alone; failing it only");
                    state.running[e.index].payload.failed =
                        Some(format!("the engine failed on this request: {err}"));
                }
            }
            offset += n;
        }
        out
    }
}

/// Where a sequence's next token comes from.
enum Pick<'a> {
    /// Sampled here from its logits row.
    Row(&'a mut [f32]),
    /// The row's best (token, logit) pairs, picked on the device, with the
    /// vocabulary size and, when log-probabilities are asked, the row's
    /// log Σ exp.
    Top(&'a [(u32, f32)], usize, Option<f32>),
}

/// Samples one sequence's next token, streams its text and decides whether
/// it is finished. Runs in parallel across sequences.
fn emit_token(
    s: &mut Seq<Io>,
    pick: Pick<'_>,
    tokenizer: &Tokenizer,
    ctx: usize,
    m: &RequestMetrics,
    now: Instant,
) {
    let (token, logprob) = match pick {
        Pick::Row(row) => {
            // The constraint first: every sampling setting then draws
            // among the tokens it allows (the mask was computed ahead, during
            // the forward pass; see `Grammar`).
            if let Some(g) = s.payload.grammar.as_mut() {
                let masked = g.mask_row(row);
                if let Err(e) = masked {
                    s.payload.failed = Some(e);
                    return;
                }
            }
            // The model's own distribution, before penalties and temperature
            // touch the row: one more pass over it, for requests drift
            // samples. (Such requests never take a device pick.)
            if let Some(d) = s.payload.drift.as_mut()
                && d.entropy
            {
                d.entropy_sum += f64::from(crate::engine::row_entropy(row));
                d.entropy_n += 1;
            }
            match s.payload.sampler.sample(row) {
                Ok(t) => t,
                Err(e) => {
                    s.payload.failed = Some(format!("sampling failed: {e}"));
                    return;
                }
            }
        }
        Pick::Top(cands, vocab, lse) => {
            // Constrained rows take the host path (`device_picks`); should
            // one come here, it draws among its allowed candidates.
            let allowed;
            let cands = match s.payload.grammar.as_mut() {
                Some(g) => {
                    match g.mask_candidates(cands) {
                        Ok(c) if !c.is_empty() => {
                            allowed = c;
                            &allowed[..]
                        }
                        Ok(_) => {
                            s.payload.failed =
                            Some("no candidate picked on the device is allowed by the output constraint".into());
                            return;
                        }
                        Err(e) => {
                            s.payload.failed = Some(e);
                            return;
                        }
                    }
                }
                None => cands,
            };
            match s.payload.sampler.sample_top(cands, vocab, lse) {
                Ok(t) => t,
                Err(e) => {
                    s.payload.failed = Some(format!("sampling failed: {e}"));
                    return;
                }
            }
        }
    };
    if let Some(g) = s.payload.grammar.as_mut()
        && let Err(e) = g.commit(token)
    {
        s.payload.failed = Some(e);
        return;
    }
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
    // A complete constraint ends the sequence (nothing may follow).
    if io.finished.is_none() && io.grammar.as_ref().is_some_and(Grammar::is_finished) {
        io.finished = Some(FinishReason::Stop);
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
