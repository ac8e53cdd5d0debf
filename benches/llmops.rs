//! Micro-benchmarks (criterion): the engine step at batch 1/8/32, the packed
//! GEMM on the 26M model's shapes, sampling
//! over a 262k vocabulary, scheduler planning with 1k waiting and 256
//! running, routing lookups, metric recording, drift signals per request
//! and per token.
//!
//! `cargo bench --bench llmops` (results in BENCHMARKS.md).

#![allow(clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use llmops::engine::{
    Batch, BlockAllocator, KvCache, LoadOptions, Logits, Sampler, SamplingParams, Scratch,
};
use llmops::monitor::{EngineMetrics, Protocol, Variant};
use llmops::router::{RouteKey, Router, StickyKey, Target};
use llmops::scheduler::state::{Limits, Seq, State};
use llmops::scheduler::{EngineHandle, EngineLabels, Priority, SchedulerConfig};

/// One decode step of `batch` sequences at position 64 of the 26M random
/// Llama (the step re-feeds the same position, so every iteration does the
/// same work).
fn engine_step(c: &mut Criterion) {
    llmops::init_process();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m26");
    llmops::engine::synth::SynthSpec::preset("26m")
        .expect("preset")
        .write(&path, None)
        .expect("write model");
    let m = llmops::engine::load(&path, &LoadOptions::default()).expect("load");
    let mut g = c.benchmark_group("engine_step_26m");
    for batch in [1usize, 8, 32] {
        let block = 16;
        let mut alloc = BlockAllocator::new(batch * 8, block);
        let mut kv = KvCache::new(m.model.kv_shape(block), batch * 8);
        let mut scratch = Scratch::default();
        let mut tables = vec![vec![]; batch];
        for t in &mut tables {
            assert!(alloc.grow(t, 65));
        }
        // Fill positions 0..64.
        let prompt: Vec<u32> = (0..64).map(|i| (i * 7 + 3) % 256).collect();
        let mut b = Batch::new();
        for t in &tables {
            b.push(&prompt, 0, t, Logits::None);
        }
        m.model.forward(&b, &mut kv, &mut scratch).expect("prefill");
        drop(b);
        let tok = [42u32];
        g.throughput(criterion::Throughput::Elements(batch as u64));
        g.bench_function(format!("batch_{batch}"), |bench| {
            bench.iter(|| {
                let mut b = Batch::new();
                for t in &tables {
                    b.push(&tok, 64, t, Logits::Last);
                }
                black_box(m.model.forward(&b, &mut kv, &mut scratch).expect("step"));
            })
        });
    }
    g.finish();
}

/// The packed GEMM alone, on the 26M model's shapes (f32 panels) and Gemma 3
/// 270M's (f16 panels, the CPU default for GGUF), at 32 rows (a batch-32
/// decode step) and 512 rows (a prefill chunk); throughput is in FLOPs.
///
/// Before criterion's figures it prints each shape's GFLOP/s as a fraction
/// of the FMA peak measured in the same minute (`cpu::limits`), the figure
/// BENCHMARKS.md reports.
fn gemm(c: &mut Criterion) {
    llmops::init_process();
    use llmops::engine::cpu::gemm::{PackedWeight, PanelFormat, matmul_xwt};
    let shapes = [
        ("26m_qkv", 512usize, 256usize, PanelFormat::F32),
        ("26m_gate_up", 1536, 256, PanelFormat::F32),
        ("26m_down", 256, 768, PanelFormat::F32),
        ("26m_head", 32000, 256, PanelFormat::F32),
        ("gemma_qkv", 1536, 640, PanelFormat::F16),
        ("gemma_o", 640, 1024, PanelFormat::F16),
        ("gemma_gate_up", 4096, 640, PanelFormat::F16),
        ("gemma_down", 640, 2048, PanelFormat::F16),
    ];
    use llmops::engine::cpu::limits::fma_throughput;
    let peak = fma_throughput(3).map(|(p, isa)| {
        eprintln!("gemm: FMA peak {:.1} GFLOP/s ({isa})", p / 1e9);
        p
    });
    // Criterion's name filter (`cargo bench -- gemm/gemma`) selects the
    // shapes timed here too.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let mut g = c.benchmark_group("gemm");
    for (name, n, k, format) in shapes {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let w = PackedWeight::pack_as(&w, n, k, format);
        for m in [32usize, 512] {
            if name.ends_with("head") && m == 512 {
                continue; // prefill chunks need logits for one row each
            }
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 31) as f32 - 15.0) / 31.0)
                .collect();
            let mut out = vec![0f32; m * n];
            let flops = (2 * m * n * k) as f64;
            let id = format!("{name}_{m}x{k}x{n}");
            // Timed inside the compute pool, as the engine's forward pass
            // calls it (a call from outside would add a cross-thread
            // hand-off per product). A shared VM's speed drifts by tens of
            // percent from second to second, so each sample of the product
            // (~20 ms) is paired with a measurement of the FMA peak just
            // before it; the figure is the median of 15 ratios.
            if let Some(p) = peak.filter(|_| format!("gemm/{id}").contains(&filter)) {
                matmul_xwt(&x, m, &w, None, &mut out);
                let t = std::time::Instant::now();
                matmul_xwt(&x, m, &w, None, &mut out);
                let reps = ((0.02 / t.elapsed().as_secs_f64()) as usize).max(1);
                let mut samples: Vec<(f64, f64)> = rayon::scope(|_| {
                    (0..15)
                        .map(|_| {
                            let (peak, _) = fma_throughput(1).unwrap_or((p, ""));
                            let t = std::time::Instant::now();
                            for _ in 0..reps {
                                matmul_xwt(black_box(&x), m, &w, None, &mut out);
                            }
                            let rate = flops * reps as f64 / t.elapsed().as_secs_f64();
                            (rate / peak, rate)
                        })
                        .collect()
                });
                samples.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (fraction, rate) = samples[samples.len() / 2];
                eprintln!(
                    "gemm: {id:<28} {format:?} {:>6.1} GFLOP/s  {:>3.0}% of the FMA peak",
                    rate / 1e9,
                    100.0 * fraction
                );
            }
            g.throughput(criterion::Throughput::Elements(flops as u64));
            g.bench_function(id, |b| {
                rayon::scope(|_| b.iter(|| matmul_xwt(black_box(&x), m, &w, None, &mut out)))
            });
        }
    }
    g.finish();
}

/// Gemma 3 270M's tied output head (262,144 × 640) on Q8_0 blocks
/// (`cpu::quant`, int8 activations) vs f16 panels, at batch 1 and 32.
fn quant_head(c: &mut Criterion) {
    llmops::init_process();
    use llmops::engine::cpu::gemm::{PackedWeight, matmul_xwt};
    use llmops::engine::cpu::quant::{self, QuantType, QuantWeight};
    let (n, k) = (262_144usize, 640usize);
    let mut g = c.benchmark_group("quant_head");
    g.sample_size(10);
    let blocks = n * k / 32;
    let mut data = Vec::with_capacity(blocks * 34);
    for b in 0..blocks {
        data.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        data.extend((0..32).map(|i| ((b * 7 + i * 13) % 255) as u8));
    }
    let q = QuantWeight::new(QuantType::Q8_0, data, n, k).expect("whole blocks");
    let mut row = vec![];
    let mut rows = Vec::with_capacity(n * k);
    for j in 0..n {
        row.clear();
        q.row_into(j, &mut row);
        rows.extend_from_slice(&row);
    }
    let f16 = PackedWeight::pack_f16(&rows, n, k);
    drop(rows);
    for m in [1usize, 32] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i % 31) as f32 - 15.0) / 31.0)
            .collect();
        let mut out = vec![0f32; m * n];
        g.throughput(criterion::Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(format!("q8_0_{m}x{k}x{n}"), |b| {
            b.iter(|| quant::matmul_xwt(black_box(&x), m, &q, None, &mut out))
        });
        g.bench_function(format!("f16_{m}x{k}x{n}"), |b| {
            b.iter(|| matmul_xwt(black_box(&x), m, &f16, None, &mut out))
        });
    }
    g.finish();
}

/// Sampling from 262,144 logits (Gemma 3's vocabulary) on a Zipf-shaped row
/// (rank r has logit -1.2·ln r, like a language model's long tail), for
/// each parameter combination at batch 1 and batch 32. A batch samples as
/// the engine thread does: rayon over the rows, each sequence with its own
/// sampler (seed, 512-token prompt, 256 tokens already generated).
/// Throughput is in tokens drawn. `t0.8_top_p0.95_flat_row` is the worst
/// case for top-p: a flat row whose nucleus spans most of the vocabulary.
fn sampling(c: &mut Criterion) {
    use rayon::prelude::*;
    llmops::init_process();
    let vocab = 262_144usize;
    // A fixed permutation of ranks over token ids.
    let rank = |i: u64| (i * 2_654_435_761) % vocab as u64 + 1;
    let zipf: Vec<f32> = (0..vocab as u64)
        .map(|i| -1.2 * (rank(i) as f32).ln())
        .collect();
    let flat: Vec<f32> = (0..vocab as u64)
        .map(|i| (rank(i) % 10_007) as f32 / 1000.0 - 5.0)
        .collect();
    let prompt: Vec<u32> = (0..512u64).map(|i| (rank(i * 977) - 1) as u32).collect();
    let t = SamplingParams {
        temperature: 0.8,
        ..Default::default()
    };
    let cases = [
        ("greedy", SamplingParams::default(), &zipf),
        ("t0.8", t.clone(), &zipf),
        (
            "t0.8_top_k40",
            SamplingParams {
                top_k: 40,
                ..t.clone()
            },
            &zipf,
        ),
        (
            "t0.8_top_p0.95",
            SamplingParams {
                top_p: 0.95,
                ..t.clone()
            },
            &zipf,
        ),
        (
            "t0.8_min_p0.05",
            SamplingParams {
                min_p: 0.05,
                ..t.clone()
            },
            &zipf,
        ),
        (
            "t0.8_penalties",
            SamplingParams {
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                frequency_penalty: 0.5,
                ..t.clone()
            },
            &zipf,
        ),
        (
            "t0.8_top_p0.95_flat_row",
            SamplingParams {
                top_p: 0.95,
                ..t.clone()
            },
            &flat,
        ),
    ];
    let mut g = c.benchmark_group("sampling_262k");
    for (name, params, row) in cases {
        for batch in [1usize, 32] {
            let mut samplers: Vec<Sampler> = (0..batch as u64)
                .map(|seed| {
                    let p = SamplingParams {
                        seed: Some(seed),
                        ..params.clone()
                    };
                    let mut s = Sampler::new(p, &prompt);
                    for i in 0..256u64 {
                        s.observe((rank(i * 31 + seed) - 1) as u32);
                    }
                    s
                })
                .collect();
            let rows: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
            g.throughput(criterion::Throughput::Elements(batch as u64));
            g.bench_function(format!("{name}/batch_{batch}"), |b| {
                b.iter_batched_ref(
                    || rows.clone(),
                    |rows| {
                        samplers
                            .par_iter_mut()
                            .zip(rows.par_chunks_mut(vocab))
                            .with_min_len(4)
                            .for_each(|(s, r)| {
                                black_box(s.sample(r).expect("sample"));
                            })
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

/// Planning one step with 256 running (decoding) and 1,000 waiting.
fn scheduler_plan(c: &mut Criterion) {
    let limits = Limits {
        max_batched_tokens: 2048,
        max_running: 256,
    };
    let mut st: State<()> = State::new(limits, BlockAllocator::new(256 * 40, 16));
    for id in 0..256u64 {
        st.enqueue(Seq::new(id, Priority::Normal, vec![1; 100], 500, ()));
    }
    // Prefill everyone, then take one decode step so all are decoding.
    for _ in 0..64 {
        let plan = st.plan();
        st.advance(&plan);
        for e in &plan.entries {
            if e.sample {
                st.running[e.index].tokens.push(7);
            }
        }
    }
    for id in 256..1256u64 {
        st.enqueue(Seq::new(id, Priority::Normal, vec![1; 100], 500, ()));
    }
    assert_eq!(st.running.len(), 256);
    c.bench_function("scheduler_plan_256_running_1k_waiting", |b| {
        b.iter(|| black_box(st.plan()))
    });
}

/// Routing: the per-request table lookup with 16 models deployed.
fn routing(c: &mut Criterion) {
    let m = llmops::engine::embedded::load(&LoadOptions::default()).expect("embedded model");
    let engine = EngineHandle::spawn(
        m,
        SchedulerConfig {
            kv_cache_bytes: 8 << 20,
            ..Default::default()
        },
        EngineLabels {
            model: "bench".into(),
            version: "v1".into(),
        },
    )
    .expect("engine");
    let router = Router::default();
    let target = |v: &str| {
        Arc::new(Target {
            version: v.into(),
            engine: engine.clone(),
        })
    };
    for i in 0..16 {
        router.set_stable(&format!("model-{i}"), target("v1"));
    }
    let key = RouteKey::session("key-42");
    c.bench_function("router_pick_16_models", |b| {
        b.iter(|| black_box(router.pick(black_box("model-11"), black_box(&key)).is_ok()))
    });
    router.set_canary("model-11", target("v2"), 2500, StickyKey::Session, 11);
    let spec = llmops::shadow::ShadowSpec {
        version: "v3".into(),
        rate: 0.1,
        mode: Default::default(),
        max_concurrent: 8,
        tokens_per_second: None,
        timeout_secs: 60.0,
        top_k: 8,
        samples: Default::default(),
    };
    let mirror = llmops::shadow::Mirror::new("model-11", spec, engine.clone()).expect("mirror");
    router.set_shadow("model-11", target("v3"), 1000, Arc::new(mirror));
    c.bench_function("router_pick_with_canary_and_shadow", |b| {
        b.iter(|| black_box(router.pick(black_box("model-11"), black_box(&key)).is_ok()))
    });
}

/// Recording per token (the hot path) and per request, into the installed
/// Prometheus recorder.
fn metric_recording(c: &mut Criterion) {
    let _handle = llmops::monitor::exporter::install().expect("recorder");
    let m = EngineMetrics::new("bench", "v1", ["stop", "length", "timeout", "abort"]);
    let r = m.requests(Protocol::Http, Variant::Stable);
    let mut g = c.benchmark_group("metrics");
    g.bench_function("per_token_itl_and_counter", |b| {
        b.iter(|| {
            r.itl.record(black_box(0.012));
            r.generation_tokens.increment(1);
        })
    });
    g.bench_function("per_request_all_histograms", |b| {
        b.iter(|| {
            r.ttft.record(0.05);
            r.engine_ttft.record(0.04);
            r.e2e.record(0.9);
            r.queue.record(0.001);
            r.prefill.record(0.03);
            r.decode.record(0.8);
            r.prompt_tokens_hist.record(100.0);
            r.generation_tokens_hist.record(64.0);
            r.prompt_tokens.increment(100);
            r.success[1].increment(1);
        })
    });
    g.finish();
}

/// One rollout analysis (the controller runs one per model per interval):
/// default gates and the Mann–Whitney test over `n` samples a side.
fn rollout_analysis(c: &mut Criterion) {
    use llmops::monitor::canary::{Analysis, Sample, analyse};
    let sample = |i: usize, slow: f64| Sample {
        ok: !i.is_multiple_of(97),
        ttft_s: 0.05 * slow * (1.0 + (i % 13) as f64 / 13.0),
        itl_s: 0.01 * slow * (1.0 + (i % 7) as f64 / 7.0),
        e2e_s: 0.5 * slow * (1.0 + (i % 17) as f64 / 17.0),
        output_tokens: 32 + (i % 64) as u32,
        stopped: i.is_multiple_of(3),
        outcome: Default::default(),
        key: i as u64 + 1,
    };
    let analysis = Analysis::default();
    let mut g = c.benchmark_group("rollout_analysis");
    for n in [100, 1_000, 10_000] {
        let stable: Vec<Sample> = (0..n).map(|i| sample(i, 1.0)).collect();
        let canary: Vec<Sample> = (0..n).map(|i| sample(i * 7 + 3, 1.05)).collect();
        g.bench_function(format!("{n}_samples_a_side"), |b| {
            b.iter(|| black_box(analyse(&analysis, black_box(&stable), black_box(&canary))))
        });
    }
    g.finish();
}

/// Drift: what one finished request costs the engine thread (the recorder's
/// update, windows closing and being evaluated every 200 requests
/// included), what each generated token costs (the entropy of its row, at
/// the tiny model's and Gemma's vocabularies), and the script mix of a
/// prompt's text (validation, on the blocking pool).
fn drift(c: &mut Criterion) {
    use llmops::monitor::drift::{DriftConfig, Observation, Recorder, TextProfile, stats};
    let mut g = c.benchmark_group("drift");
    for tokens in [16usize, 256] {
        let r = Recorder::new("bench", "v1");
        r.configure(DriftConfig::default(), None);
        let prompt: Vec<u32> = (0..tokens as u32).map(|i| i * 7919 % 262_144).collect();
        let profile: TextProfile = [300, 4, 12, 60, 0, 0, 2];
        let mut i = 0u32;
        let mut obs = move || {
            i = i.wrapping_add(1);
            Observation {
                prompt_len: tokens as u32,
                output_len: 16 + i % 48,
                finish: Some(usize::from(i.is_multiple_of(5))),
                error: false,
                ttft_s: 0.05 + f64::from(i % 17) * 1e-3,
                e2e_s: 0.5 + f64::from(i % 13) * 1e-2,
                entropy: Some(2.0 + f64::from(i % 11) * 0.1),
            }
        };
        // Freeze the reference first: the bench measures live windows.
        for _ in 0..500 {
            r.record(&obs(), &prompt, &profile);
        }
        g.throughput(criterion::Throughput::Elements(tokens as u64));
        g.bench_function(format!("record_request_{tokens}_prompt_tokens"), |b| {
            b.iter(|| r.record(black_box(&obs()), black_box(&prompt), &profile))
        });
    }
    g.throughput(criterion::Throughput::Elements(1));
    for vocab in [320usize, 262_144] {
        let row: Vec<f32> = (0..vocab)
            .map(|i| ((i * 37) % 1000) as f32 * 0.01)
            .collect();
        g.bench_function(format!("entropy_per_token_vocab_{vocab}"), |b| {
            b.iter(|| black_box(llmops::engine::row_entropy(black_box(&row))))
        });
    }
    // The embedding signal: a probe's projection (Gemma 3 270M's width),
    // and a window's MMD test at the default settings (128 reference and
    // 40 live embeddings, 100 permutations), which runs once per window.
    use llmops::monitor::drift::embed;
    let pooled: Vec<f32> = (0..640).map(|i| (i as f32 * 0.37).sin()).collect();
    g.bench_function("embedding_project_640", |b| {
        b.iter(|| black_box(embed::project(black_box(&pooled))))
    });
    let cloud = |n: usize, phase: f32| -> Vec<embed::Embedding> {
        (0..n)
            .filter_map(|k| {
                let h: Vec<f32> = (0..640)
                    .map(|i| (i as f32 * 0.37 + k as f32 * 0.05 + phase).sin())
                    .collect();
                embed::project(&h)
            })
            .collect()
    };
    let (reference, live) = (cloud(128, 0.0), cloud(40, 0.3));
    g.bench_function("mmd_window_128_ref_40_live", |b| {
        b.iter(|| black_box(embed::mmd_test(&reference, &live, 100, 0.05, 0.01, 1)))
    });
    let text = "The ship sailed across a quiet sea while old sailors sang of home. ".repeat(15);
    g.throughput(criterion::Throughput::Bytes(text.len() as u64));
    g.bench_function("script_mix_1kb_prompt", |b| {
        b.iter(|| {
            let mut p = TextProfile::default();
            stats::add_text(&mut p, black_box(&text));
            black_box(p)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = engine_step, gemm, quant_head, sampling, scheduler_plan, routing, metric_recording, rollout_analysis, drift
}
criterion_main!(benches);
