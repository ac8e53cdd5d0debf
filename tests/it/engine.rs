//! The batched engine against candle-transformers' single-stream models on the
//! same weights, batch invariance, and GGUF Q8_0 agreement.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{gemma3, llama, qwen2};
use llmops::engine::GgufWeights;
use llmops::engine::synth::SynthSpec;

use crate::support::{self, GenPlan, Plan, max_abs_diff};

/// Tolerance on logits in f32.
const TOL: f32 = 1e-4;

/// Token streams for `n` sequences of different lengths (the vocabulary's
/// first 300 ids).
fn token_streams(n: usize, base_len: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|s| {
            (0..base_len + 7 * s)
                .map(|i| ((i * 31 + s * 17 + 3) % 300) as u32)
                .collect()
        })
        .collect()
}

/// Four or more sequences of different lengths, prefill split into chunks of
/// different sizes, joining at different steps.
fn plans(streams: &[Vec<u32>]) -> Vec<Plan> {
    streams
        .iter()
        .enumerate()
        .map(|(i, t)| Plan {
            tokens: t.clone(),
            join_step: i * 2,
            chunk: 3 + i * 2,
            prompt_len: t.len() / 2 + i,
        })
        .collect()
}

fn vb(path: &std::path::Path) -> VarBuilder<'static> {
    // SAFETY: the test wrote the file and nothing changes it while mapped.
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[path.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }
}

fn one(tok: u32) -> Tensor {
    Tensor::new(&[tok], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn assert_close(ours: &[Vec<Vec<f32>>], reference: &[Vec<Vec<f32>>]) {
    let mut worst = 0f32;
    for (s, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert_eq!(a.len(), b.len(), "sequence {s}: positions");
        for (p, (x, y)) in a.iter().zip(b).enumerate() {
            let d = max_abs_diff(x, y);
            assert!(d <= TOL, "sequence {s} position {p}: max |Δlogit| = {d}");
            worst = worst.max(d);
        }
    }
    eprintln!("max |Δlogit| over all positions: {worst:e}");
}

#[test]
fn batched_llama_logits_match_candle_transformers_llama_at_every_position() {
    let spec = SynthSpec::tiny_llama();
    let (_tmp, path) = support::write_model(&spec);
    let ours = support::load(&path);
    let streams = token_streams(5, 21);
    let got = support::run_teacher_forced(&ours, &plans(&streams), 4);

    let cfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let reference = llama::Llama::load(vb(&path), &cfg).unwrap();
    let want: Vec<Vec<Vec<f32>>> = streams
        .iter()
        .map(|toks| {
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
            toks.iter()
                .enumerate()
                .map(|(pos, &t)| {
                    let l = reference.forward(&one(t), pos, &mut cache).unwrap();
                    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect()
        })
        .collect();
    assert_close(&got, &want);
}

#[test]
fn batched_llama_with_qkv_bias_matches_candle_transformers_qwen2() {
    let spec = SynthSpec {
        qkv_bias: true,
        tie_embeddings: true,
        seed: 7,
        ..SynthSpec::tiny_llama()
    };
    let (_tmp, path) = support::write_model(&spec);
    let ours = support::load(&path);
    let streams = token_streams(4, 18);
    let got = support::run_teacher_forced(&ours, &plans(&streams), 4);

    let mut raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    raw["sliding_window"] = 4096.into();
    raw["max_window_layers"] = 0.into();
    raw["use_sliding_window"] = false.into();
    let cfg: qwen2::Config = serde_json::from_value(raw).unwrap();
    let want: Vec<Vec<Vec<f32>>> = streams
        .iter()
        .map(|toks| {
            let mut reference = qwen2::ModelForCausalLM::new(&cfg, vb(&path)).unwrap();
            toks.iter()
                .enumerate()
                .map(|(pos, &t)| {
                    let l = reference.forward(&one(t), pos).unwrap();
                    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect()
        })
        .collect();
    assert_close(&got, &want);
}

#[test]
fn batched_gemma3_logits_match_candle_transformers_gemma3_with_sliding_windows() {
    let spec = SynthSpec::tiny_gemma3();
    let (_tmp, path) = support::write_model(&spec);
    let ours = support::load(&path);
    // Sequences longer than the window (5) so local layers really slide.
    let streams = token_streams(4, 17);
    let got = support::run_teacher_forced(&ours, &plans(&streams), 4);

    let cfg: gemma3::Config =
        serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
    let want: Vec<Vec<Vec<f32>>> = streams
        .iter()
        .map(|toks| {
            // One token at a time: the reference's rotating cache then keeps
            // exactly `sliding_window` positions, the Gemma 3 semantics.
            let mut reference = gemma3::Model::new(false, &cfg, vb(&path)).unwrap();
            toks.iter()
                .enumerate()
                .map(|(pos, &t)| {
                    let l = reference.forward(&one(t), pos).unwrap();
                    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect()
        })
        .collect();
    assert_close(&got, &want);
}

#[test]
fn sharded_half_precision_checkpoints_load_and_agree_with_f32() {
    let f32_spec = SynthSpec::tiny_llama();
    let (_t1, p32) = support::write_model(&f32_spec);
    let (_t2, p16) = support::write_model(&SynthSpec {
        dtype: DType::BF16,
        shards: 3,
        ..SynthSpec::tiny_llama()
    });
    assert!(p16.join("model.safetensors.index.json").exists());
    let a = support::load(&p32);
    let b = support::load(&p16);
    let streams = token_streams(1, 12);
    let la = support::run_teacher_forced(&a, &plans(&streams), 4);
    let lb = support::run_teacher_forced(&b, &plans(&streams), 4);
    for (x, y) in la[0].iter().zip(&lb[0]) {
        // bf16 keeps ~3 significant digits of each weight.
        assert!(max_abs_diff(x, y) < 0.05, "{}", max_abs_diff(x, y));
    }
}

#[test]
fn greedy_tokens_are_the_same_alone_and_inside_a_busy_batch() {
    let spec = SynthSpec {
        layers: 3,
        seed: 11,
        ..SynthSpec::tiny_llama()
    };
    let (_tmp, path) = support::write_model(&spec);
    let m = support::load(&path);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|s| {
            // One long prompt whose KV spans many blocks.
            let len = if s == 5 { 70 } else { 3 + 5 * s };
            (0..len)
                .map(|i| ((i * 13 + s * 29 + 1) % 256) as u32)
                .collect()
        })
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let plan = GenPlan {
                prompt: p.clone(),
                join_step: 0,
                max_tokens: 24,
            };
            support::generate_greedy(&m, &[plan], 4, 8).remove(0)
        })
        .collect();
    // Together: staggered joins, so sequences join while others decode.
    let plans: Vec<GenPlan> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenPlan {
            prompt: p.clone(),
            join_step: [0, 0, 3, 5, 9, 2, 14, 20][i],
            max_tokens: 24,
        })
        .collect();
    let together = support::generate_greedy(&m, &plans, 4, 8);
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "prompt {i}: alone vs batched");
    }
}

#[test]
fn gguf_q8_0_export_agrees_with_f32_on_the_top_token() {
    let spec = SynthSpec {
        seed: 5,
        ..SynthSpec::tiny_llama()
    };
    let (tmp, path) = support::write_model(&spec);
    let gguf = tmp.path().join("tiny-q8_0.gguf");
    llmops::engine::export_gguf::export_gguf(
        &path,
        &gguf,
        llmops::engine::export_gguf::GgufType::Q8_0,
    )
    .unwrap();
    let f32_model = support::load(&path);
    let streams = token_streams(4, 30);
    let a = support::run_teacher_forced(&f32_model, &plans(&streams), 4);
    // Every CPU path: f16 panels dequantized at load (the default), f32 and
    // int8 panels, and the int8 block kernel (`cpu::quant`) on the file's blocks.
    for gguf_weights in [
        GgufWeights::F16,
        GgufWeights::F32,
        GgufWeights::Int8,
        GgufWeights::Blocks,
    ] {
        let opts = llmops::engine::LoadOptions {
            gguf_weights,
            ..Default::default()
        };
        let q8 = llmops::engine::load(&gguf, &opts).unwrap();
        // The GGUF carries its own tokenizer (no tokenizer.json beside it).
        assert_eq!(
            q8.tokenizer.encode("hello world", true).unwrap(),
            f32_model.tokenizer.encode("hello world", true).unwrap()
        );
        let b = support::run_teacher_forced(&q8, &plans(&streams), 4);
        let (mut same, mut total) = (0, 0);
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            total += 1;
            same += usize::from(
                llmops::engine::sampling::argmax(x) == llmops::engine::sampling::argmax(y),
            );
        }
        let rate = same as f64 / total as f64;
        eprintln!("Q8_0 ({gguf_weights}) vs f32 top-1 agreement: {same}/{total} = {rate:.3}");
        assert!(rate >= 0.95, "top-1 agreement {rate} ({gguf_weights})");
    }
}

#[test]
fn malformed_checkpoints_fail_with_the_file_and_field_named() {
    let (_tmp, path) = support::write_model(&SynthSpec::tiny_llama());
    // A config that contradicts the weights.
    let cfg = path.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    let err = llmops::engine::load(&path, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("mlp.gate_proj"),
        "{err}"
    );

    // A truncated weight file.
    let (_tmp2, path2) = support::write_model(&SynthSpec::tiny_llama());
    let st = path2.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = llmops::engine::load(&path2, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // An unknown architecture.
    let (_tmp3, path3) = support::write_model(&SynthSpec::tiny_llama());
    let cfg3 = path3.join("config.json");
    let text = std::fs::read_to_string(&cfg3)
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"rwkv\"");
    std::fs::write(&cfg3, text).unwrap();
    let err = llmops::engine::load(&path3, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("rwkv"),
        "{err}"
    );
}
