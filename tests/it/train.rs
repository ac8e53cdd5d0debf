//! `llmops train`: learning, exact resume, loading the result, fine-tuning.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use llmops::train::{TrainArgs, run};

use crate::support::{self, GenPlan};

const SENTENCES: &str = "The whale swam under the grey sea at dawn.\nAll the ships sailed home before the storm.\nA quiet bell rang over the old town.\n";

fn args(data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        data: vec![data.to_path_buf()],
        out: out.to_path_buf(),
        base: None,
        replay: vec![],
        replay_share: 0.2,
        replay_eval_fraction: None,
        reference: vec![],
        preset: "nano".into(),
        layers: None,
        hidden: None,
        heads: None,
        kv_heads: None,
        intermediate: None,
        context: None,
        vocab_size: Some(300),
        tokenizer: None,
        seq_len: 64,
        batch_size: 4,
        grad_accum: 1,
        steps: 120,
        lr: 1e-2,
        warmup: 5,
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        clip: 1.0,
        eval_every: 0,
        eval_fraction: 0.0,
        eval_batches: 1,
        checkpoint_every: 0,
        resume: None,
        seed: 3,
        stop_after: None,
        quiet: true,
    }
}

#[test]
fn training_learns_and_overfits_a_few_sentences() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, SENTENCES).unwrap();
    let out = tmp.path().join("model");
    let report = run(&args(&data, &out)).unwrap();
    let first = report.losses[0].1;
    let last = report.losses.last().unwrap().1;
    assert!(last < first * 0.1, "loss {first} → {last}");

    // Greedy continuation reproduces the memorised text.
    let m = support::load(&out);
    let prompt = m.tokenizer.encode("The whale swam", true).unwrap();
    let want = m
        .tokenizer
        .encode(" under the grey sea at dawn.\nAll the ships", false)
        .unwrap();
    let got = support::generate_greedy(
        &m,
        &[GenPlan {
            prompt,
            join_step: 0,
            max_tokens: want.len(),
        }],
        16,
        64,
    )
    .remove(0);
    assert_eq!(
        m.tokenizer.decode(&got).unwrap(),
        " under the grey sea at dawn.\nAll the ships"
    );
}

#[test]
fn resuming_from_a_checkpoint_repeats_the_uninterrupted_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, SENTENCES.repeat(4)).unwrap();
    let whole = run(&TrainArgs {
        steps: 12,
        ..args(&data, &tmp.path().join("a"))
    })
    .unwrap();
    let first_half = run(&TrainArgs {
        steps: 12,
        stop_after: Some(5),
        ..args(&data, &tmp.path().join("b"))
    })
    .unwrap();
    assert_eq!(first_half.losses.len(), 5);
    let resumed = run(&TrainArgs {
        steps: 12,
        resume: Some(tmp.path().join("b/checkpoints/step-5")),
        ..args(&data, &tmp.path().join("b"))
    })
    .unwrap();
    assert_eq!(whole.losses, resumed.losses, "same seed, same losses");
    // And a second uninterrupted run is identical too.
    let again = run(&TrainArgs {
        steps: 12,
        ..args(&data, &tmp.path().join("c"))
    })
    .unwrap();
    assert_eq!(whole.losses, again.losses);
}

#[test]
fn a_trained_model_loads_in_the_engine_and_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, SENTENCES).unwrap();
    let out = tmp.path().join("model");
    run(&TrainArgs {
        steps: 20,
        ..args(&data, &out)
    })
    .unwrap();
    assert!(out.join("README.md").exists(), "model card");
    assert!(
        std::fs::read_to_string(out.join("tokenizer_config.json"))
            .unwrap()
            .contains("chat_template")
    );
    let ours = support::load(&out);
    let tokens = ours
        .tokenizer
        .encode("The whale swam under the sea", true)
        .unwrap();
    let got = support::run_teacher_forced(
        &ours,
        &[support::Plan {
            tokens: tokens.clone(),
            join_step: 0,
            chunk: 3,
            prompt_len: 4,
        }],
        4,
    );

    let cfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    // SAFETY: the trainer wrote the file and nothing changes it while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[out.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let reference = llama::Llama::load(vb, &cfg).unwrap();
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    for (pos, &t) in tokens.iter().enumerate() {
        let input = Tensor::new(&[t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference
            .forward(&input, pos, &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = support::max_abs_diff(&got[0][pos], &want);
        assert!(d <= 1e-4, "position {pos}: {d}");
    }
}

#[test]
fn fine_tuning_on_prompt_completion_pairs_lowers_held_out_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let base_data = tmp.path().join("base.txt");
    std::fs::write(&base_data, SENTENCES.repeat(3)).unwrap();
    let base = tmp.path().join("base");
    run(&TrainArgs {
        steps: 30,
        ..args(&base_data, &base)
    })
    .unwrap();
    // Pairs of one kind: a colour word answered by its opposite pattern.
    let words = [
        "red", "blue", "green", "black", "white", "gold", "grey", "pink", "brown", "amber",
        "violet", "silver",
    ];
    let mut jsonl = String::new();
    for (i, w) in words.iter().enumerate() {
        for j in 0..4 {
            let n = i * 4 + j;
            jsonl.push_str(&serde_json::json!({"prompt": format!("Q{n}: the {w} ship?"), "completion": format!(" A: the {w} ship sails.")}).to_string());
            jsonl.push('\n');
        }
    }
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, jsonl).unwrap();
    let tuned = run(&TrainArgs {
        base: Some(base.clone()),
        steps: 40,
        lr: 3e-3,
        eval_every: 40,
        eval_fraction: 0.25,
        eval_batches: 4,
        ..args(&pairs, &tmp.path().join("tuned"))
    })
    .unwrap();
    // Held-out loss of the base model on the same split, before tuning.
    let before = run(&TrainArgs {
        base: Some(base),
        steps: 0,
        eval_fraction: 0.25,
        eval_batches: 4,
        ..args(&pairs, &tmp.path().join("untuned"))
    })
    .unwrap();
    let after = tuned.final_eval_loss().unwrap();
    let before = before.final_eval_loss().unwrap();
    assert!(after < before * 0.7, "held-out loss {before} → {after}");
}
