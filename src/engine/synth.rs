//! Random-weight checkpoints in Hugging Face layout, for tests, benchmarks
//! and the peer comparisons (`llmops synth`).
//!
//! They are real checkpoints: a `config.json`, safetensors (optionally sharded,
//! f32/f16/bf16) and a byte-level BPE `tokenizer.json` (or a trained one), so
//! they go through exactly the loader a downloaded model goes through.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::engine::Arch;
use crate::engine::chat::DEFAULT_CHAT_TEMPLATE;

/// The shape and options of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Family.
    pub arch: Arch,
    /// Rows of the embedding (at least 258 for the byte-level tokenizer).
    pub vocab: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// q/k/v projections carry biases (Qwen2 style).
    pub qkv_bias: bool,
    /// Output head shares the embedding.
    pub tie_embeddings: bool,
    /// Gemma 3: sliding window of local layers.
    pub sliding_window: usize,
    /// Gemma 3: every n-th layer is global.
    pub sliding_window_pattern: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Storage dtype of the safetensors.
    pub dtype: DType,
    /// Number of safetensors shards (1 = a single `model.safetensors`).
    pub shards: usize,
    /// Seed of the weights.
    pub seed: u64,
    /// Standard deviation of the weights.
    pub std: f32,
    /// Standard deviation of the embedding.
    pub embed_std: f32,
    /// Standard deviation of norm weights around their neutral value.
    pub norm_std: f32,
    /// Beginning-of-sequence id.
    pub bos_token_id: u32,
    /// End-of-sequence id.
    pub eos_token_id: u32,
}

impl SynthSpec {
    /// A tiny Llama with GQA, for tests.
    pub fn tiny_llama() -> Self {
        Self {
            arch: Arch::Llama,
            vocab: 320,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            qkv_bias: false,
            tie_embeddings: false,
            sliding_window: 0,
            sliding_window_pattern: 0,
            max_position_embeddings: 512,
            rope_theta: 10_000.0,
            dtype: DType::F32,
            shards: 1,
            seed: 1,
            std: 0.08,
            embed_std: 0.8,
            norm_std: 0.1,
            bos_token_id: 256,
            eos_token_id: 257,
        }
    }

    /// A tiny Gemma 3 with two local layers (window 5) and one global layer.
    pub fn tiny_gemma3() -> Self {
        Self {
            arch: Arch::Gemma3,
            vocab: 320,
            hidden: 64,
            intermediate: 128,
            layers: 3,
            heads: 4,
            kv_heads: 1,
            head_dim: 32,
            qkv_bias: false,
            tie_embeddings: true,
            sliding_window: 5,
            sliding_window_pattern: 3,
            max_position_embeddings: 512,
            rope_theta: 1_000_000.0,
            dtype: DType::F32,
            shards: 1,
            seed: 2,
            std: 0.08,
            embed_std: 0.04,
            norm_std: 0.1,
            bos_token_id: 256,
            eos_token_id: 257,
        }
    }

    /// Named presets for benchmarks: `micro` (one layer, width 16: the
    /// engine's cost is negligible, for gateway overhead), `tiny`, `26m`, `116m`.
    pub fn preset(name: &str) -> Option<Self> {
        let llama = |vocab, hidden, inter, layers, heads, kv| Self {
            vocab,
            hidden,
            intermediate: inter,
            layers,
            heads,
            kv_heads: kv,
            head_dim: hidden / heads,
            max_position_embeddings: 2048,
            std: 0.02,
            embed_std: 0.2,
            ..Self::tiny_llama()
        };
        match name {
            "micro" => Some(Self {
                hidden: 16,
                intermediate: 32,
                layers: 1,
                heads: 2,
                kv_heads: 1,
                head_dim: 8,
                ..Self::tiny_llama()
            }),
            "tiny" => Some(Self::tiny_llama()),
            // 32000·256·2 + 12·(4·256² + 3·256·768 − 2·256·128) ≈ 26.4M.
            "26m" => Some(llama(32000, 256, 768, 12, 8, 4)),
            // 32000·512·2 + 16·(4·512² + 3·512·1536) ≈ 117M.
            "116m" => Some(llama(32000, 512, 1536, 16, 8, 8)),
            _ => None,
        }
    }

    /// The Hugging Face `config.json` of this shape.
    pub fn config_json(&self) -> serde_json::Value {
        match self.arch {
            Arch::Llama => serde_json::json!({
                "architectures": [if self.qkv_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
                "model_type": if self.qkv_bias { "qwen2" } else { "llama" },
                "vocab_size": self.vocab,
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim,
                "rms_norm_eps": 1e-5,
                "rope_theta": self.rope_theta,
                "max_position_embeddings": self.max_position_embeddings,
                "tie_word_embeddings": self.tie_embeddings,
                "hidden_act": "silu",
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "torch_dtype": dtype_name(self.dtype),
            }),
            Arch::Gemma3 => serde_json::json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "vocab_size": self.vocab,
                "hidden_size": self.hidden,
                "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim,
                "rms_norm_eps": 1e-6,
                "rope_theta": self.rope_theta,
                "rope_local_base_freq": 10_000.0,
                "max_position_embeddings": self.max_position_embeddings,
                "sliding_window": self.sliding_window,
                "sliding_window_pattern": self.sliding_window_pattern,
                "query_pre_attn_scalar": self.head_dim,
                "hidden_activation": "gelu_pytorch_tanh",
                "attention_bias": false,
                "final_logit_softcapping": null,
                "attn_logit_softcapping": null,
                "tie_word_embeddings": true,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "torch_dtype": dtype_name(self.dtype),
            }),
        }
    }

    /// The tensors, by Hugging Face name, in f32.
    pub fn tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut out = vec![];
        let mut add =
            |name: String, shape: &[usize], std: f32, offset: f32| -> candle_core::Result<()> {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| offset + std * normal(&mut rng)).collect();
                out.push((name, Tensor::from_vec(v, shape, &Device::Cpu)?));
                Ok(())
            };
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let s = self.std;
        let gemma = self.arch == Arch::Gemma3;
        // Llama norms multiply by w (≈1); Gemma's by 1 + w (w ≈ 0).
        let norm_offset = if gemma { 0.0 } else { 1.0 };
        let ns = self.norm_std;
        add(
            "model.embed_tokens.weight".into(),
            &[self.vocab, h],
            self.embed_std,
            0.0,
        )?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), &[h], ns, norm_offset)?;
            add(
                format!("{p}.post_attention_layernorm.weight"),
                &[h],
                ns,
                norm_offset,
            )?;
            add(format!("{p}.self_attn.q_proj.weight"), &[q, h], s, 0.0)?;
            add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], s, 0.0)?;
            add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], s, 0.0)?;
            add(format!("{p}.self_attn.o_proj.weight"), &[h, q], s, 0.0)?;
            if self.qkv_bias {
                add(format!("{p}.self_attn.q_proj.bias"), &[q], s, 0.0)?;
                add(format!("{p}.self_attn.k_proj.bias"), &[kv], s, 0.0)?;
                add(format!("{p}.self_attn.v_proj.bias"), &[kv], s, 0.0)?;
            }
            if gemma {
                add(
                    format!("{p}.self_attn.q_norm.weight"),
                    &[self.head_dim],
                    ns,
                    0.0,
                )?;
                add(
                    format!("{p}.self_attn.k_norm.weight"),
                    &[self.head_dim],
                    ns,
                    0.0,
                )?;
                add(
                    format!("{p}.pre_feedforward_layernorm.weight"),
                    &[h],
                    ns,
                    0.0,
                )?;
                add(
                    format!("{p}.post_feedforward_layernorm.weight"),
                    &[h],
                    ns,
                    0.0,
                )?;
            }
            add(format!("{p}.mlp.gate_proj.weight"), &[i, h], s, 0.0)?;
            add(format!("{p}.mlp.up_proj.weight"), &[i, h], s, 0.0)?;
            add(format!("{p}.mlp.down_proj.weight"), &[h, i], s, 0.0)?;
        }
        add("model.norm.weight".into(), &[h], ns, norm_offset)?;
        if !self.tie_embeddings && !gemma {
            add("lm_head.weight".into(), &[self.vocab, h], s, 0.0)?;
        }
        Ok(out)
    }

    /// Writes the checkpoint into `dir` (created if needed). `tokenizer_json`
    /// replaces the byte-level tokenizer when given.
    pub fn write(&self, dir: &Path, tokenizer_json: Option<&str>) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tensors = self.tensors()?;
        let tensors: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(self.dtype)?)))
            .collect::<candle_core::Result<_>>()?;
        let shards = self.shards.max(1);
        if shards == 1 {
            let map: HashMap<String, Tensor> = tensors.into_iter().collect();
            candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        } else {
            let per = tensors.len().div_ceil(shards);
            let mut weight_map = serde_json::Map::new();
            for (k, chunk) in tensors.chunks(per).enumerate() {
                let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
                let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
                // In name order: serde_json keeps insertion order (llguidance
                // turns on `preserve_order`), and a HashMap's would change the
                // index's bytes from one run to the next.
                let mut names: Vec<&String> = map.keys().collect();
                names.sort();
                for name in names {
                    weight_map.insert(name.clone(), file.clone().into());
                }
                candle_core::safetensors::save(&map, dir.join(&file))?;
            }
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                serde_json::to_string_pretty(&index)?,
            )?;
        }
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json())?,
        )?;
        let tok = match tokenizer_json {
            Some(t) => t.to_string(),
            None => byte_level_tokenizer_json(),
        };
        std::fs::write(dir.join("tokenizer.json"), tok)?;
        let tk_cfg = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": DEFAULT_CHAT_TEMPLATE,
        });
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tk_cfg)?,
        )?;
        Ok(())
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    use rand::RngExt;
    // Box–Muller; deterministic for a seed, unlike candle's randn.
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// A byte-level BPE tokenizer with no merges: ids 0–255 are the bytes,
/// 256 is `<s>` (BOS), 257 is `</s>` (EOS).
pub fn byte_level_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = (0u8..=255)
        .map(|b| (byte_char(b).to_string(), u32::from(b).into()))
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// GPT-2's printable stand-in for a byte.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return b as char;
    }
    let mut n = 0u32;
    for x in 0u8..b {
        if !printable(x) {
            n += 1;
        }
    }
    char::from_u32(256 + n).unwrap_or('?')
}
