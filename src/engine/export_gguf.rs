//! Writes a Hugging Face Llama-family folder as a GGUF file (`llmops
//! export-gguf`), in f32, f16 or Q8_0, with the tokenizer in the metadata.
//!
//! The output follows llama.cpp's converter (q/k rows permuted to interleaved
//! rotary pairs for the `llama` architecture, GPT-2-style BPE vocabulary), so
//! the same weights can be served by llmops and by llama.cpp side by side.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::engine::{Arch, ModelConfig};

/// Element type of the exported matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// 8-bit blocks of 32 with one scale.
    Q8_0,
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }
}

/// Exports `dir` (config.json, safetensors, tokenizer.json) to `out`.
pub fn export_gguf(dir: &Path, out: &Path, ty: GgufType) -> anyhow::Result<()> {
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    if cfg.arch != Arch::Llama {
        bail!(
            "GGUF export supports the Llama family only (got {})",
            cfg.arch.as_str()
        );
    }
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).context("config.json")?,
    )?;
    let qwen = raw.get("model_type").and_then(|v| v.as_str()) == Some("qwen2");
    let arch = if qwen { "qwen2" } else { "llama" };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in crate::engine::safetensors_files(dir)? {
        tensors.extend(candle_core::safetensors::load(&f, &Device::Cpu)?);
    }
    let out_tensors = gguf_tensors(&cfg, &tensors, qwen, ty)?;
    let md = metadata(dir, &cfg, arch, ty)?;
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = out_tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?,
    );
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

/// How a tensor is written.
#[derive(Clone, Copy)]
enum Kind {
    /// A norm weight: always f32.
    Norm,
    /// A matrix in the export's type.
    Matrix,
    /// A matrix whose rows llama.cpp expects in interleaved rotary pairs
    /// (q and k of the `llama` architecture), over this many heads.
    Rotary(fn(&ModelConfig) -> usize),
    /// A q/k/v bias, present only in Qwen2 checkpoints: f32.
    Bias,
}

/// A layer's tensors: GGUF name, Hugging Face name (under `model.layers.N`),
/// kind; in the order llama.cpp's converter writes them.
const LAYER_TENSORS: &[(&str, &str, Kind)] = &[
    ("attn_norm.weight", "input_layernorm.weight", Kind::Norm),
    (
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
        Kind::Norm,
    ),
    (
        "attn_q.weight",
        "self_attn.q_proj.weight",
        Kind::Rotary(|c| c.num_heads),
    ),
    (
        "attn_k.weight",
        "self_attn.k_proj.weight",
        Kind::Rotary(|c| c.num_kv_heads),
    ),
    ("attn_v.weight", "self_attn.v_proj.weight", Kind::Matrix),
    (
        "attn_output.weight",
        "self_attn.o_proj.weight",
        Kind::Matrix,
    ),
    ("attn_q.bias", "self_attn.q_proj.bias", Kind::Bias),
    ("attn_k.bias", "self_attn.k_proj.bias", Kind::Bias),
    ("attn_v.bias", "self_attn.v_proj.bias", Kind::Bias),
    ("ffn_gate.weight", "mlp.gate_proj.weight", Kind::Matrix),
    ("ffn_up.weight", "mlp.up_proj.weight", Kind::Matrix),
    ("ffn_down.weight", "mlp.down_proj.weight", Kind::Matrix),
];

/// The checkpoint's tensors under their GGUF names, matrices in `ty`.
fn gguf_tensors(
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    qwen: bool,
    ty: GgufType,
) -> anyhow::Result<Vec<(String, QTensor)>> {
    let get = |name: &str| -> anyhow::Result<Tensor> {
        Ok(tensors
            .get(name)
            .with_context(|| format!("tensor {name} missing"))?
            .to_dtype(DType::F32)?)
    };
    let mut out: Vec<(String, QTensor)> = vec![];
    let mut push = |name: String, t: Tensor, kind: Kind| -> anyhow::Result<()> {
        let t = match kind {
            Kind::Rotary(heads) if !qwen => permute_rows(&t, heads(cfg))?,
            _ => t,
        };
        let dtype = match kind {
            Kind::Norm | Kind::Bias => GgmlDType::F32,
            Kind::Matrix | Kind::Rotary(_) => ty.ggml(),
        };
        out.push((name, QTensor::quantize(&t, dtype)?));
        Ok(())
    };
    push(
        "token_embd.weight".into(),
        get("model.embed_tokens.weight")?,
        Kind::Matrix,
    )?;
    push(
        "output_norm.weight".into(),
        get("model.norm.weight")?,
        Kind::Norm,
    )?;
    if tensors.contains_key("lm_head.weight") && !cfg.tie_word_embeddings {
        push("output.weight".into(), get("lm_head.weight")?, Kind::Matrix)?;
    }
    for l in 0..cfg.num_layers {
        for &(gguf, hf, kind) in LAYER_TENSORS {
            let name = format!("model.layers.{l}.{hf}");
            if matches!(kind, Kind::Bias) {
                if !tensors.contains_key(&name) {
                    continue;
                }
                if !qwen {
                    bail!("q/k/v biases are only exported for qwen2 models");
                }
            }
            push(format!("blk.{l}.{gguf}"), get(&name)?, kind)?;
        }
    }
    Ok(out)
}

/// The GGUF metadata: architecture, shape, rotary settings, vocabulary,
/// special tokens and the chat template.
fn metadata(
    dir: &Path,
    cfg: &ModelConfig,
    arch: &str,
    ty: GgufType,
) -> anyhow::Result<Vec<(String, Value)>> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(ty.file_type())),
    ];
    let shape = [
        ("context_length", cfg.max_position_embeddings),
        ("embedding_length", cfg.hidden_size),
        ("block_count", cfg.num_layers),
        ("feed_forward_length", cfg.intermediate_size),
        ("rope.dimension_count", cfg.head_dim),
        ("attention.head_count", cfg.num_heads),
        ("attention.head_count_kv", cfg.num_kv_heads),
        ("attention.key_length", cfg.head_dim),
        ("attention.value_length", cfg.head_dim),
    ];
    for (k, v) in shape {
        md.push((format!("{arch}.{k}"), Value::U32(v as u32)));
    }
    let vocab = read_vocab(&dir.join("tokenizer.json"), cfg.vocab_size)?;
    md.extend([
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope.theta as f32),
        ),
        (
            format!("{arch}.vocab_size"),
            Value::U32(cfg.vocab_size as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges_or_placeholder(vocab.merges)),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(cfg.bos_token_id.is_some()),
        ),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ]);
    if let Some(b) = cfg.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = cfg.eos_token_ids.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*e)));
    }
    let tk_cfg = dir.join("tokenizer_config.json");
    if tk_cfg.exists() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tk_cfg)?)?;
        if let Some(t) = crate::engine::chat::template_from_tokenizer_config(&v) {
            md.push(("tokenizer.chat_template".into(), Value::String(t)));
        }
    }
    Ok(md)
}

/// llama.cpp's permutation of q/k rows from "rotate half" pairs to interleaved pairs.
fn permute_rows(t: &Tensor, heads: usize) -> anyhow::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let per = rows / heads;
    Ok(t.reshape((heads, 2, per / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
}

/// Reads a byte-level BPE `tokenizer.json`, padded with unused tokens to the
/// model's vocabulary size (llama.cpp requires them to agree).
fn read_vocab(path: &Path, model_vocab: usize) -> anyhow::Result<Vocab> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
    )?;
    let model = v.get("model").context("tokenizer.json has no model")?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        bail!("GGUF export needs a BPE tokenizer");
    }
    let mut tokens: Vec<Option<String>> = vec![None; model_vocab];
    let mut types = vec![1i32; model_vocab];
    let entries = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .context("tokenizer.json model.vocab")?;
    for (tok, id) in entries {
        let id = id.as_u64().context("vocab id")? as usize;
        if id >= model_vocab {
            bail!("token id {id} exceeds the model's vocabulary of {model_vocab}");
        }
        tokens[id] = Some(tok.clone());
    }
    if let Some(added) = v.get("added_tokens").and_then(|a| a.as_array()) {
        for a in added {
            let id = a
                .get("id")
                .and_then(|i| i.as_u64())
                .context("added token id")? as usize;
            let content = a
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or_default();
            if id < model_vocab {
                tokens[id] = Some(content.to_string());
                types[id] = if a.get("special").and_then(|s| s.as_bool()) == Some(true) {
                    3
                } else {
                    4
                };
            }
        }
    }
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some(t) => t,
            None => {
                types[i] = 5;
                format!("[PAD{i}]")
            }
        })
        .collect();
    let merges = match model.get("merges").and_then(|m| m.as_array()) {
        None => vec![],
        Some(ms) => ms
            .iter()
            .filter_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(pair) => Some(format!(
                    "{} {}",
                    pair.first()?.as_str()?,
                    pair.get(1)?.as_str()?
                )),
                _ => None,
            })
            .collect(),
    };
    Ok(Vocab {
        tokens,
        types,
        merges,
    })
}

/// llama.cpp refuses a GPT-2 style vocabulary without merges (and an empty
/// GGUF array has no element type), so a byte-level tokenizer with none gets
/// one merge of two spaces, whose result is not a token: it never fires, and
/// both llama.cpp and our loader skip it.
fn merges_or_placeholder(merges: Vec<String>) -> Vec<Value> {
    if merges.is_empty() {
        return vec![Value::String("\u{120} \u{120}".into())];
    }
    merges.into_iter().map(Value::String).collect()
}
