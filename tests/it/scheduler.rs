//! The scheduler with the real tiny engine on its own thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llmops::engine::SamplingParams;
use llmops::engine::synth::SynthSpec;
use llmops::scheduler::{
    Clock, Completion, EngineHandle, EngineLabels, Event, FinishReason, Request, SchedulerConfig,
    SubmitError,
};

use crate::support;

async fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>) -> (Vec<u32>, String, Completion) {
    let (mut ids, mut text) = (vec![], String::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done(c) => {
                text.push_str(&c.tail);
                return (ids, text, c);
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("event stream ended without a Done");
}

fn spawn(spec: &SynthSpec, cfg: SchedulerConfig) -> (tempfile::TempDir, EngineHandle) {
    let (tmp, path) = support::write_model(spec);
    let m = support::load(&path);
    let engine = EngineHandle::spawn(
        m,
        cfg,
        EngineLabels {
            model: "tiny".into(),
            version: "v1".into(),
        },
    )
    .unwrap();
    (tmp, engine)
}

fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|s| {
            let len = 2 + (s * 7) % 45;
            let mut p = vec![256];
            p.extend((0..len).map(|i| ((i * 11 + s * 23 + 5) % 256) as u32));
            p
        })
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        ignore_eos: true,
        ..Request::greedy(prompt, max_tokens)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_requests_each_match_their_solo_run() {
    let (_tmp, engine) = spawn(
        &SynthSpec {
            seed: 21,
            ..SynthSpec::tiny_llama()
        },
        SchedulerConfig {
            max_batched_tokens: 64,
            ..Default::default()
        },
    );
    let ps = prompts(32);
    let mut solo = vec![];
    for p in &ps {
        let rx = engine.submit(greedy(p.clone(), 8 + p.len() % 13)).unwrap();
        solo.push(collect(rx).await);
    }
    let rxs: Vec<_> = ps
        .iter()
        .map(|p| engine.submit(greedy(p.clone(), 8 + p.len() % 13)).unwrap())
        .collect();
    let together = futures::future::join_all(rxs.into_iter().map(collect)).await;
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a.0, b.0, "request {i}: tokens alone vs among 32");
        assert_eq!(a.1, b.1, "request {i}: text");
        assert_eq!(b.2.reason, FinishReason::Length);
        assert_eq!(b.2.completion_tokens, a.0.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_a_small_kv_pool_keeps_greedy_output_identical() {
    let spec = SynthSpec {
        seed: 3,
        ..SynthSpec::tiny_llama()
    };
    // A block of 16 positions in the default f16 cache.
    let shape_bytes = 2 * spec.layers * spec.kv_heads * 16 * spec.head_dim * 2;
    let small = SchedulerConfig {
        kv_cache_bytes: 24 * shape_bytes,
        max_batched_tokens: 64,
        ..Default::default()
    };
    let (_t1, roomy) = spawn(&spec, SchedulerConfig::default());
    let (_t2, tight) = spawn(&spec, small);
    let ps = prompts(12);
    let a = futures::future::join_all(
        ps.iter()
            .map(|p| collect(roomy.submit(greedy(p.clone(), 40)).unwrap())),
    )
    .await;
    let b = futures::future::join_all(
        ps.iter()
            .map(|p| collect(tight.submit(greedy(p.clone(), 40)).unwrap())),
    )
    .await;
    let preemptions: u32 = b.iter().map(|r| r.2.preemptions).sum();
    assert!(preemptions > 0, "the small pool must preempt");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.0, y.0, "request {i}");
    }
    wait_idle(&tight).await;
}

/// Waits until the engine reports no running sequence and no used block (the
/// gauges are published right after the step that sent the last event).
async fn wait_idle(engine: &EngineHandle) {
    let stats = engine.stats();
    for _ in 0..300 {
        if stats.running.load(std::sync::atomic::Ordering::Relaxed) == 0
            && stats
                .kv_blocks_used
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine still holds sequences or blocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_receiver_cancels_and_frees_its_blocks() {
    let (_tmp, engine) = spawn(&SynthSpec::tiny_llama(), SchedulerConfig::default());
    let rxs: Vec<_> = prompts(6)
        .into_iter()
        .map(|p| engine.submit(greedy(p, 400)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(rxs);
    wait_idle(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_with_a_retry_after() {
    let (_tmp, engine) = spawn(
        &SynthSpec::tiny_llama(),
        SchedulerConfig {
            max_waiting: 3,
            max_running: 1,
            max_batched_tokens: 8,
            ..Default::default()
        },
    );
    let mut accepted = vec![];
    let mut refused = 0;
    for p in prompts(20) {
        let started = std::time::Instant::now();
        match engine.submit(greedy(p, 50)) {
            Ok(rx) => accepted.push(rx),
            Err(SubmitError::Overloaded { retry_after, .. }) => {
                assert!(started.elapsed() < Duration::from_millis(50));
                assert!(retry_after >= Duration::from_secs(1));
                refused += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused > 0);
    for rx in accepted {
        let (_, _, c) = collect(rx).await;
        assert_eq!(c.reason, FinishReason::Length);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_context_fail_before_queueing() {
    let (_tmp, engine) = spawn(&SynthSpec::tiny_llama(), SchedulerConfig::default());
    let err = engine.submit(greedy(vec![1; 500], 100)).unwrap_err();
    assert!(matches!(err, SubmitError::ContextLength { .. }), "{err}");
    assert!(err.to_string().contains("512"));
    let err = engine.submit(greedy(vec![1; 600], 1)).unwrap_err();
    assert!(matches!(err, SubmitError::ContextLength { .. }));
}

/// An engine on a manual clock over a model with a long context, so that a
/// request asked for 16,000 tokens runs for many seconds of wall time: time
/// moves only when the test moves it.
fn spawn_on_manual_clock() -> (tempfile::TempDir, EngineHandle, Clock) {
    let spec = SynthSpec {
        max_position_embeddings: 16384,
        ..SynthSpec::tiny_llama()
    };
    let (tmp, path) = support::write_model(&spec);
    let clock = Clock::manual();
    let engine = EngineHandle::spawn_with_clock(
        support::load(&path),
        SchedulerConfig::default(),
        EngineLabels {
            model: "tiny".into(),
            version: "v1".into(),
        },
        clock.clone(),
    )
    .unwrap();
    (tmp, engine, clock)
}

/// Reads a request's events as they come (a client that keeps up, so the
/// engine never cancels it for unread events), counting its tokens.
struct Reader {
    streamed: Arc<AtomicUsize>,
    done: tokio::task::JoinHandle<(FinishReason, usize)>,
}

impl Reader {
    fn new(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Self {
        let streamed = Arc::new(AtomicUsize::new(0));
        let count = streamed.clone();
        let done = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { .. } => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Done(c) => return (c.reason, count.load(Ordering::Relaxed)),
                    Event::Failed(e) => panic!("request failed: {e}"),
                }
            }
            panic!("event stream ended without a Done");
        });
        Self { streamed, done }
    }

    /// Waits until `more` tokens beyond those seen so far have streamed:
    /// the request is still running.
    async fn running_for(&self, more: usize) {
        let target = self.streamed.load(Ordering::Relaxed) + more;
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            while self.streamed.load(Ordering::Relaxed) < target {
                assert!(!self.done.is_finished(), "the request ended early");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "no progress");
    }

    async fn finish(self) -> (FinishReason, usize) {
        self.done.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_the_request_with_timeout_when_the_engine_clock_passes_it() {
    let (_tmp, engine, clock) = spawn_on_manual_clock();
    // A deadline of 30 s on a clock that stands still: wall time does not end it.
    let mut req = greedy(vec![256, 1, 2], 16000);
    req.deadline = Some(clock.now() + Duration::from_secs(30));
    let long = Reader::new(engine.submit(req).unwrap());
    long.running_for(20).await;
    // A short request beside it finishes on its own, deadline or not.
    let mut short = greedy(vec![256, 3], 5);
    short.deadline = Some(clock.now() + Duration::from_secs(30));
    let (_, _, c) = collect(engine.submit(short).unwrap()).await;
    assert_eq!((c.reason, c.completion_tokens), (FinishReason::Length, 5));
    // One second short of the deadline: still running.
    clock.advance(Duration::from_secs(29));
    long.running_for(20).await;
    clock.advance(Duration::from_secs(1));
    let (reason, streamed) = long.finish().await;
    assert_eq!(reason, FinishReason::Timeout);
    assert!(streamed < 16000, "it ran to the end: {streamed} tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_aborts_what_still_runs_at_its_deadline_and_not_before() {
    let (_tmp, engine, clock) = spawn_on_manual_clock();
    let long = Reader::new(engine.submit(greedy(vec![256, 1, 2], 16000)).unwrap());
    long.running_for(10).await;
    engine.drain(Duration::from_secs(10));
    assert!(matches!(
        engine.submit(greedy(vec![256, 2], 5)),
        Err(SubmitError::Unavailable)
    ));
    // Draining, not stopped: the running request goes on.
    long.running_for(30).await;
    clock.advance(Duration::from_millis(9_999));
    long.running_for(30).await;
    assert!(!engine.is_stopped());
    clock.advance(Duration::from_millis(1));
    let (reason, streamed) = long.finish().await;
    assert_eq!(reason, FinishReason::Aborted);
    assert!(streamed < 16000, "it ran to the end: {streamed} tokens");
    tokio::time::timeout(
        Duration::from_secs(5),
        engine.stopped(Duration::from_millis(5)),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_sample_whatever_shares_the_batch() {
    let (_tmp, engine) = spawn(&SynthSpec::tiny_llama(), SchedulerConfig::default());
    let sampled = |seed| Request {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(seed),
            ..Default::default()
        },
        ..greedy(vec![256, 5, 6, 7], 20)
    };
    let (alone, _, _) = collect(engine.submit(sampled(42)).unwrap()).await;
    let mut rxs: Vec<_> = prompts(8)
        .into_iter()
        .map(|p| engine.submit(greedy(p, 30)).unwrap())
        .collect();
    rxs.push(engine.submit(sampled(42)).unwrap());
    let outs = futures::future::join_all(rxs.into_iter().map(collect)).await;
    assert_eq!(outs.last().unwrap().0, alone);
    let (other, _, _) = collect(engine.submit(sampled(43)).unwrap()).await;
    assert_ne!(other, alone, "a different seed should differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_engine_after_running_work() {
    let (_tmp, engine) = spawn(&SynthSpec::tiny_llama(), SchedulerConfig::default());
    let rx = engine.submit(greedy(vec![256, 1], 20)).unwrap();
    let probe = engine.clone();
    drop(engine);
    let (ids, _, c) = collect(rx).await;
    assert_eq!(ids.len(), 20, "running work finishes");
    assert_eq!(c.reason, FinishReason::Length);
    drop(probe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_running_work_then_stops() {
    let (_tmp, engine) = spawn(&SynthSpec::tiny_llama(), SchedulerConfig::default());
    let rx = engine.submit(greedy(vec![256, 1], 30)).unwrap();
    engine.drain(Duration::from_secs(10));
    assert!(matches!(
        engine.submit(greedy(vec![256, 2], 5)),
        Err(SubmitError::Unavailable)
    ));
    let (ids, _, c) = collect(rx).await;
    assert_eq!((ids.len(), c.reason), (30, FinishReason::Length));
    tokio::time::timeout(
        Duration::from_secs(5),
        engine.stopped(Duration::from_millis(5)),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_that_fails_the_forward_pass_fails_alone_and_the_others_go_on() {
    let (_tmp, engine) = spawn(
        &SynthSpec {
            seed: 31,
            ..SynthSpec::tiny_llama()
        },
        SchedulerConfig::default(),
    );
    let ps = prompts(3);
    let max_tokens = 48;
    let mut solo = vec![];
    for p in &ps {
        solo.push(
            collect(engine.submit(greedy(p.clone(), max_tokens)).unwrap())
                .await
                .0,
        );
    }
    // The good requests are decoding (each has streamed a token) when the
    // bad one arrives, so its prefill shares a step with their decodes.
    let mut good = vec![];
    for p in &ps {
        let mut rx = engine.submit(greedy(p.clone(), max_tokens)).unwrap();
        let first = match rx.recv().await {
            Some(Event::Token { id, .. }) => id,
            other => panic!("expected a first token, got {other:?}"),
        };
        good.push((first, rx));
    }
    // A token id past the embedding: the front ends refuse it, so it stands
    // for any input that makes one sequence's forward fail.
    let mut bad_prompt = ps[1].clone();
    bad_prompt.push(engine.embedding_rows() as u32 + 7);
    let mut bad = engine.submit(greedy(bad_prompt, max_tokens)).unwrap();
    let failure = loop {
        match bad.recv().await {
            Some(Event::Failed(e)) => break e,
            Some(Event::Token { .. }) => continue,
            other => panic!("the bad request did not fail: {other:?}"),
        }
    };
    assert!(failure.contains("outside the embedding"), "{failure}");
    for (i, (first, rx)) in good.into_iter().enumerate() {
        let (rest, _, done) = collect(rx).await;
        let mut ids = vec![first];
        ids.extend(rest);
        assert_eq!(ids, solo[i], "request {i} went on as if alone");
        assert_eq!(done.reason, FinishReason::Length);
    }
    // The engine stays up and serves the next request.
    assert!(engine.is_ready() && !engine.has_failed());
    let (again, _, _) = collect(engine.submit(greedy(ps[2].clone(), max_tokens)).unwrap()).await;
    assert_eq!(again, solo[2]);
}

/// A request's prompt: a shared "system prompt" of `system` tokens (BOS
/// first), then a suffix of its own.
fn with_system_prompt(system: usize, suffix: &[u32]) -> Vec<u32> {
    let mut p = vec![256];
    p.extend((1..system).map(|i| ((i * 37 + 11) % 256) as u32));
    p.extend_from_slice(suffix);
    p
}

fn counter(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_caching_leaves_greedy_tokens_unchanged_alone_in_a_batch_and_under_preemption() {
    let spec = SynthSpec {
        seed: 5,
        ..SynthSpec::tiny_llama()
    };
    // A block of 16 positions in the default f16 cache.
    let block_bytes = 2 * spec.layers * spec.kv_heads * 16 * spec.head_dim * 2;
    let off = SchedulerConfig {
        prefix_caching: false,
        max_batched_tokens: 64,
        ..Default::default()
    };
    let on = SchedulerConfig {
        prefix_caching: true,
        ..off.clone()
    };
    let (_t1, plain) = spawn(&spec, off);
    let (_t2, cached) = spawn(&spec, on.clone());
    let (_t3, tight) = spawn(
        &spec,
        SchedulerConfig {
            kv_cache_bytes: 24 * block_bytes,
            ..on
        },
    );
    // Twelve prompts on one 40-token system prompt, and the suffixes of
    // `prompts` (some of them identical to each other's starts).
    let ps: Vec<Vec<u32>> = prompts(12)
        .iter()
        .map(|p| with_system_prompt(40, &p[1..]))
        .collect();
    let mut reference = vec![];
    for p in &ps {
        reference.push(
            collect(plain.submit(greedy(p.clone(), 30)).unwrap())
                .await
                .0,
        );
    }
    // One at a time: each after the first finds the system prompt cached.
    for (i, p) in ps.iter().enumerate() {
        let (ids, _, _) = collect(cached.submit(greedy(p.clone(), 30)).unwrap()).await;
        assert_eq!(ids, reference[i], "request {i} alone");
    }
    let solo_hits = counter(&cached.stats().prefix_cache_hits);
    assert!(solo_hits >= 11 * 32, "{solo_hits} tokens hit");
    // All at once, in a busy batch.
    let together = futures::future::join_all(
        ps.iter()
            .map(|p| collect(cached.submit(greedy(p.clone(), 30)).unwrap())),
    )
    .await;
    for (i, r) in together.iter().enumerate() {
        assert_eq!(r.0, reference[i], "request {i} in a batch");
    }
    // On a pool of 24 blocks, which forces preemption.
    let squeezed = futures::future::join_all(
        ps.iter()
            .map(|p| collect(tight.submit(greedy(p.clone(), 30)).unwrap())),
    )
    .await;
    let preemptions: u32 = squeezed.iter().map(|r| r.2.preemptions).sum();
    assert!(preemptions > 0, "the small pool must preempt");
    for (i, r) in squeezed.iter().enumerate() {
        assert_eq!(r.0, reference[i], "request {i} under preemption");
    }
    assert!(counter(&tight.stats().prefix_cache_hits) > 0);
    // Idle: no block held, the cache's blocks free to evict.
    for e in [&cached, &tight] {
        wait_idle(e).await;
        let cached_blocks = e
            .stats()
            .kv_blocks_cached
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(cached_blocks > 0, "full blocks stay cached when idle");
    }
    assert_eq!(counter(&plain.stats().prefix_cache_hits), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_system_prompt_hits_the_prefix_cache_and_skips_its_prefill() {
    let spec = SynthSpec {
        seed: 9,
        ..SynthSpec::tiny_llama()
    };
    let (_t1, plain) = spawn(
        &spec,
        SchedulerConfig {
            prefix_caching: false,
            ..Default::default()
        },
    );
    let (_t2, cached) = spawn(&spec, SchedulerConfig::default());
    // Eight requests on one 64-token system prompt (four blocks of 16)
    // with 5-token questions of their own, arriving together.
    let ps: Vec<Vec<u32>> = (0..8u32)
        .map(|q| with_system_prompt(64, &[q + 1, q + 2, q + 3, q + 4, q + 5]))
        .collect();
    let run = |engine: &EngineHandle| {
        let rxs: Vec<_> = ps
            .iter()
            .map(|p| engine.submit(greedy(p.clone(), 10)).unwrap())
            .collect();
        futures::future::join_all(rxs.into_iter().map(collect))
    };
    let a = run(&plain).await;
    let b = run(&cached).await;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.0, y.0, "request {i}");
    }
    let s = cached.stats();
    // The first computes the system prompt; the seven others wait for its
    // blocks instead of computing them too, and take all four.
    assert_eq!(counter(&s.prefix_cache_queries), 8 * 69);
    assert_eq!(counter(&s.prefix_cache_hits), 7 * 64);
    assert_eq!(counter(&s.prefill_tokens), 69 + 7 * 5);
    assert_eq!(counter(&plain.stats().prefill_tokens), 8 * 69);
    wait_idle(&cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_share_their_prompt_prefill_and_match_single_requests_with_the_same_seeds() {
    let spec = SynthSpec {
        seed: 13,
        ..SynthSpec::tiny_llama()
    };
    let (_t1, plain) = spawn(
        &spec,
        SchedulerConfig {
            prefix_caching: false,
            ..Default::default()
        },
    );
    let (_t2, cached) = spawn(&spec, SchedulerConfig::default());
    // A 50-token prompt: three full blocks of 16 and two tokens in a
    // fourth, which the other choices copy (copy-on-write) before computing
    // their last token.
    let prompt = with_system_prompt(50, &[]);
    let choice = |i: u64| Request {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(7 + i),
            ..Default::default()
        },
        ..greedy(prompt.clone(), 24)
    };
    let mut single = vec![];
    for i in 0..4 {
        single.push(collect(plain.submit(choice(i)).unwrap()).await.0);
    }
    assert!(
        single.iter().any(|s| s != &single[0]),
        "the seeds must make the choices diverge"
    );
    // The tensor path copies blocks on the device tensors.
    let (_t3, path) = support::write_model(&spec);
    let tensor = EngineHandle::spawn(
        llmops::engine::load(
            &path,
            &llmops::engine::LoadOptions {
                engine_path: Some(llmops::engine::EnginePath::Tensor),
                ..Default::default()
            },
        )
        .unwrap(),
        SchedulerConfig::default(),
        EngineLabels::default(),
    )
    .unwrap();
    for engine in [&cached, &tensor] {
        // As `infer::submit` submits the n choices of one request: back to
        // back, seeds offset by the choice index.
        let rxs: Vec<_> = (0..4).map(|i| engine.submit(choice(i)).unwrap()).collect();
        let n = futures::future::join_all(rxs.into_iter().map(collect)).await;
        for (i, r) in n.iter().enumerate() {
            assert_eq!(r.0, single[i], "choice {i}");
        }
        let s = engine.stats();
        assert_eq!(counter(&s.prefix_cache_hits), 3 * 49);
        assert_eq!(
            counter(&s.prefill_tokens),
            50 + 3,
            "the prompt prefilled once, and each other choice's last token"
        );
        wait_idle(engine).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tensor_path_reads_cached_blocks_as_the_host_path_does() {
    // Gemma 3 (sliding windows, GQA) on the tensor path, whose device KV
    // is addressed through the same block tables.
    let spec = SynthSpec {
        seed: 17,
        ..SynthSpec::tiny_gemma3()
    };
    let (_tmp, path) = support::write_model(&spec);
    let load = |engine_path| {
        llmops::engine::load(
            &path,
            &llmops::engine::LoadOptions {
                engine_path: Some(engine_path),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let start = |engine_path, prefix_caching| {
        EngineHandle::spawn(
            load(engine_path),
            SchedulerConfig {
                prefix_caching,
                max_batched_tokens: 32,
                ..Default::default()
            },
            EngineLabels::default(),
        )
        .unwrap()
    };
    let host = start(llmops::engine::EnginePath::Host, false);
    let tensor = start(llmops::engine::EnginePath::Tensor, true);
    let ps: Vec<Vec<u32>> = prompts(6)
        .iter()
        .map(|p| with_system_prompt(40, &p[1..]))
        .collect();
    for engine in [&host, &tensor] {
        // Warm the cache with the first prompt.
        collect(engine.submit(greedy(ps[0].clone(), 4)).unwrap()).await;
    }
    let run = |engine: &EngineHandle| {
        let rxs: Vec<_> = ps
            .iter()
            .map(|p| engine.submit(greedy(p.clone(), 20)).unwrap())
            .collect();
        futures::future::join_all(rxs.into_iter().map(collect))
    };
    let (want, got) = (run(&host).await, run(&tensor).await);
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(
            a.0, b.0,
            "request {i}: host without the cache, tensor with it"
        );
    }
    assert!(counter(&tensor.stats().prefix_cache_hits) >= 6 * 32);
    wait_idle(&tensor).await;
}

/// On the tensor path a step whose rows need only their best logits
/// (greedy, top-k, log-probs) picks them on the device; a step with a
/// penalised request copies whole rows to the host. A seeded top-k request
/// gets the same tokens either way, and the same log-probs up to the last
/// bits of the normaliser (log Σ exp on the device or on the host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_picked_on_the_device_gives_what_whole_rows_give() {
    use llmops::engine::{EnginePath, LoadOptions};
    let (_tmp, path) = support::write_model(&SynthSpec {
        seed: 5,
        ..SynthSpec::tiny_llama()
    });
    let engine = EngineHandle::spawn(
        llmops::engine::load(
            &path,
            &LoadOptions {
                engine_path: Some(EnginePath::Tensor),
                ..Default::default()
            },
        )
        .unwrap(),
        SchedulerConfig::default(),
        EngineLabels::default(),
    )
    .unwrap();
    let prompt = vec![256, 17, 3, 99, 41];
    let top_k = Request {
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 20,
            seed: Some(11),
            logprobs: Some(3),
            ..Default::default()
        },
        ..greedy(prompt.clone(), 24)
    };
    // Every token with its log-probs: the chosen one's, then the best 3.
    type Logprobs = Vec<(u32, f32)>;
    async fn events(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Vec<Logprobs> {
        let mut out = vec![];
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, logprob, .. } => {
                    let l = logprob.expect("log-probs were asked");
                    assert_eq!(l.token, id);
                    out.push([(id, l.logprob)].into_iter().chain(l.top).collect());
                }
                Event::Done(_) => return out,
                Event::Failed(e) => panic!("request failed: {e}"),
            }
        }
        panic!("event stream ended without a Done");
    }
    let picked = || counter(&engine.stats().device_picked_tokens);
    let alone = events(engine.submit(top_k.clone()).unwrap()).await;
    assert_eq!(alone.len(), 24);
    assert_eq!(
        picked(),
        24,
        "every step of the request alone picks on the device"
    );
    // Beside a longer penalised request from the first step on, every step
    // copies whole rows.
    let penalised = Request {
        sampling: SamplingParams {
            temperature: 0.8,
            repetition_penalty: 1.3,
            seed: Some(1),
            ..Default::default()
        },
        ..greedy(prompt.clone(), 40)
    };
    let (before, rx_p) = (picked(), engine.submit(penalised).unwrap());
    let rx = engine.submit(top_k.clone()).unwrap();
    let (beside, _) = tokio::join!(events(rx), collect(rx_p));
    assert!(picked() - before < 24, "whole rows were copied");
    assert_eq!(beside.len(), alone.len());
    for (i, (b, a)) in beside.iter().zip(&alone).enumerate() {
        assert_eq!(b.len(), a.len());
        for (x, y) in b.iter().zip(a) {
            assert_eq!(x.0, y.0, "token {i}: {b:?} against {a:?}");
            assert!((x.1 - y.1).abs() < 1e-5, "token {i}: {b:?} against {a:?}");
        }
    }
    // A different seed draws differently (the draw is not the argmax).
    let other = Request {
        sampling: SamplingParams {
            seed: Some(12),
            ..top_k.sampling.clone()
        },
        ..top_k.clone()
    };
    let ids = |e: &[Logprobs]| e.iter().map(|t| t[0].0).collect::<Vec<_>>();
    assert_ne!(
        ids(&events(engine.submit(other).unwrap()).await),
        ids(&alone)
    );
    wait_idle(&engine).await;
}

/// Sliding-window layers keep only their window: on a Gemma 3 whose two
/// local layers see 5 positions, 60-token generations (12 windows) on the
/// real engine, host and tensor paths, with the window groups giving their
/// blocks back (blocks of 4 positions), equal the tokens of a cache that
/// keeps every position of every layer; the pool is whole again when idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_layers_give_blocks_back_and_generate_what_a_full_cache_does() {
    use llmops::engine::{EnginePath, KvDtype, LoadOptions};
    let spec = SynthSpec {
        seed: 12,
        ..SynthSpec::tiny_gemma3()
    };
    let (_tmp, path) = support::write_model(&spec);
    let load = |engine_path| {
        llmops::engine::load(
            &path,
            &LoadOptions {
                engine_path: Some(engine_path),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let host = load(EnginePath::Host);
    assert_eq!(
        host.model.kv_groups().windows(),
        &[Some(5), Some(5), None],
        "two window groups and a full one, a layer each"
    );
    let ps = prompts(6);
    let plans: Vec<support::GenPlan> = ps
        .iter()
        .map(|p| support::GenPlan {
            prompt: p.clone(),
            join_step: 0,
            max_tokens: 60,
        })
        .collect();
    // Every position of every layer kept (one group), f32.
    let want = support::generate_greedy(&host, &plans, 4, 64);
    for engine_path in [EnginePath::Host, EnginePath::Tensor] {
        let engine = EngineHandle::spawn(
            load(engine_path),
            SchedulerConfig {
                block_size: 4,
                kv_cache_dtype: KvDtype::F32,
                max_batched_tokens: 64,
                ..Default::default()
            },
            EngineLabels::default(),
        )
        .unwrap();
        let got = futures::future::join_all(
            ps.iter()
                .map(|p| collect(engine.submit(greedy(p.clone(), 60)).unwrap())),
        )
        .await;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w, &g.0, "{engine_path:?}, request {i}");
        }
        wait_idle(&engine).await;
        assert_eq!(
            engine
                .stats()
                .kv_blocks_used
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
