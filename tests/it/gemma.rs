//! Gemma 3 270M Q4_K_M (fetched by `scripts/fetch-gemma`) against golden
//! greedy tokens from llama.cpp (`tests/golden/gemma3-270m-q4_k_m.json`,
//! produced by `scripts/gemma-goldens`).

use llmops::engine::LoadOptions;
use std::path::PathBuf;

use crate::support::{self, GenPlan};

/// The model path: `LLMOPS_GEMMA` or the fetch script's cache location.
fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LLMOPS_GEMMA") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("LLMOPS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/llmops")
        });
    cache.join("gemma3-270m/gemma-3-270m-q4_k_m.gguf")
}

/// Teacher-forced comparison: our model reads llama.cpp's greedy
/// continuation and predicts every next token. Two Q4_K_M implementations
/// round differently (activation quantization, accumulation order), so an
/// exact free-running match is not the contract; the contract is that our
/// argmax equals llama.cpp's almost everywhere, and that wherever they differ
/// both sides saw a near tie.
#[test]
fn gemma3_270m_predicts_llama_cpp_greedy_tokens() {
    check(LoadOptions::default(), "f16 panels");
}

/// The same through candle's quantized matmul on the Q4_K/Q5_0/Q6_K blocks.
#[test]
fn gemma3_270m_keeping_blocks_quantized_predicts_llama_cpp_greedy_tokens() {
    let opts = LoadOptions {
        keep_quantized: true,
        ..Default::default()
    };
    check(opts, "QMatMul");
}

/// The same with the blocks requantized to int8 panels (one scale per row).
#[test]
fn gemma3_270m_on_int8_panels_predicts_llama_cpp_greedy_tokens() {
    let opts = LoadOptions {
        int8_panels: true,
        ..Default::default()
    };
    check(opts, "int8 panels");
}

fn check(opts: LoadOptions, label: &str) {
    let path = model_path();
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-gemma (the CI script does)",
        path.display()
    );
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/gemma3-270m-q4_k_m.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let m = llmops::engine::load(&path, &opts).unwrap();
    assert_eq!(m.model.config().arch, llmops::engine::Arch::Gemma3);

    let mut plans = vec![];
    let mut cases = vec![];
    for p in golden["prompts"].as_array().unwrap() {
        let text = p["prompt"].as_str().unwrap().to_string();
        let prompt: Vec<u32> = serde_json::from_value(p["prompt_tokens"].clone()).unwrap();
        let ours = m.tokenizer.encode(&text, true).unwrap();
        assert_eq!(
            ours, prompt,
            "tokenization of {text:?} (GGUF tokenizer vs llama.cpp)"
        );
        let want: Vec<u32> = serde_json::from_value(p["tokens"].clone()).unwrap();
        let margins: Vec<f64> = serde_json::from_value(p["top2_logprob_margin"].clone()).unwrap();
        let mut tokens = prompt.clone();
        tokens.extend_from_slice(&want[..want.len() - 1]);
        plans.push(support::Plan {
            tokens,
            join_step: 0,
            chunk: 32,
            prompt_len: prompt.len(),
        });
        cases.push((text, prompt.len(), want, margins));
    }
    // All three sequences share every step (chunked prefill, then decode).
    let logits = support::run_teacher_forced(&m, &plans, 16);

    const NEAR_TIE: f32 = 0.5;
    let mut first_miss = vec![usize::MAX; cases.len()];
    let (mut total, mut agree) = (0, 0);
    for (c, ((text, prompt_len, want, margins), rows)) in cases.iter().zip(&logits).enumerate() {
        for (k, &want_tok) in want.iter().enumerate() {
            let row = &rows[prompt_len - 1 + k];
            let (ours, best) =
                row.iter()
                    .copied()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |a, (i, v)| if v > a.1 { (i, v) } else { a },
                    );
            total += 1;
            if ours as u32 == want_tok {
                agree += 1;
                continue;
            }
            first_miss[c] = first_miss[c].min(k);
            let gap = best - row[want_tok as usize];
            eprintln!(
                "{text:?} step {k}: ours {ours} vs llama.cpp {want_tok} (our gap {gap:.3}, llama.cpp margin {:.3})",
                margins[k]
            );
            assert!(
                gap < NEAR_TIE && (margins[k] as f32) < NEAR_TIE,
                "{text:?} step {k}: a disagreement that is not a near tie \
                 (our gap {gap:.3}, llama.cpp margin {:.3})",
                margins[k]
            );
        }
    }
    eprintln!("{label}: {agree} of {total} next-token predictions equal llama.cpp's");
    assert!(
        agree * 100 >= total * 95,
        "only {agree} of {total} next-token predictions equal llama.cpp's"
    );

    // Free-running greedy in one batch must agree up to the first near tie
    // (after it the two continuations are different texts).
    let free: Vec<_> = cases
        .iter()
        .zip(&plans)
        .map(|((_, plen, want, _), p)| GenPlan {
            prompt: p.tokens[..*plen].to_vec(),
            join_step: 0,
            max_tokens: want.len(),
        })
        .collect();
    let got = support::generate_greedy(&m, &free, 16, 64);
    for (((text, _, want, _), got), miss) in cases.iter().zip(&got).zip(&first_miss) {
        let n = want.iter().zip(got).take_while(|(a, b)| a == b).count();
        eprintln!(
            "{label}, {text:?}: free-running greedy agrees for {n} of {} tokens",
            want.len()
        );
        assert!(
            n >= (*miss).min(want.len()),
            "{text:?}: free-running greedy diverges at token {n}, before the first near tie ({miss})"
        );
    }
}
