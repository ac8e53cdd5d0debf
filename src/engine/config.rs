//! The architecture-neutral description of a model, read from a Hugging Face
//! `config.json` or from GGUF metadata.
//!
//! Llama-family models and Gemma 3 share one decoder shape (norm → attention →
//! norm → gated MLP); [`ModelConfig`] records where they differ so that one
//! forward pass serves both.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use super::{Error, Result};

/// The model families the engine can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama: RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// Gemma 3: local/global attention layers, q/k norms, GELU-tanh MLP,
    /// scaled embeddings, norms after attention and MLP.
    Gemma3,
}

impl Arch {
    /// The name used in logs, the registry and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// Gate activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (`silu(gate) * up`).
    Silu,
    /// GeGLU with the tanh approximation of GELU.
    GeluTanh,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `i` pairs with `i + d/2` (Hugging Face "rotate_half", GGUF NEOX).
    Half,
    /// Dimension `2i` pairs with `2i + 1` (GGUF Llama, whose converter permutes q/k).
    Interleaved,
}

/// Frequency scaling applied to a rotary table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's band-wise scaling.
    Llama3 {
        /// Divisor for low frequencies.
        factor: f64,
        /// Wavelength band boundaries, as divisors of the original context.
        low_freq_factor: f64,
        /// See `low_freq_factor`.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor` (Gemma 3's global layers in the larger models).
    Linear {
        /// Position divisor.
        factor: f64,
    },
}

/// One rotary table: a base frequency and optional scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base of the geometric frequency sequence.
    pub theta: f64,
    /// Optional scaling.
    pub scaling: Option<RopeScaling>,
}

impl Rope {
    /// Inverse frequencies for a head of `head_dim` dimensions, `head_dim / 2` values.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / (self.theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        match self.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => {
                base.into_iter().map(|f| f / factor as f32).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high, orig) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let low_wavelen = orig / low;
                let high_wavelen = orig / high;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary table of global (full-attention) layers.
    pub rope: Rope,
    /// Rotary table of sliding-window layers, where it differs (Gemma 3).
    pub rope_local: Option<Rope>,
    /// How rotary pairs dimensions.
    pub rope_style: RopeStyle,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// For each layer, its sliding window (tokens it may see, itself included).
    pub layer_windows: Vec<Option<usize>>,
    /// Multiplier applied to attention scores.
    pub attn_scale: f64,
    /// `tanh` soft cap on attention scores.
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh` soft cap on output logits.
    pub final_logit_softcapping: Option<f64>,
    /// MLP activation.
    pub activation: Activation,
    /// Embeddings are multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Whether this layer has q/k norms and post-attention / post-MLP norms.
    pub fn has_gemma_norms(&self) -> bool {
        self.arch == Arch::Gemma3
    }

    /// The rotary table a layer uses.
    pub fn rope_for_layer(&self, layer: usize) -> &Rope {
        match (
            self.layer_windows.get(layer).copied().flatten(),
            &self.rope_local,
        ) {
            (Some(_), Some(local)) => local,
            _ => &self.rope,
        }
    }

    /// Parameter count implied by the shapes (embedding counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let mlp = 3 * h * i;
        let norms = if self.has_gemma_norms() {
            4 * h + 2 * self.head_dim
        } else {
            2 * h
        };
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * (attn + mlp + norms) + h + head
    }

    fn validate(self, source: &Path) -> Result<Self> {
        let bad = |field: &str, why: String| Error::Config {
            path: source.to_path_buf(),
            field: field.to_string(),
            message: why,
        };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} query heads cannot be grouped over {} key/value heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                "rotary embeddings need an even head_dim".into(),
            ));
        }
        if self.layer_windows.contains(&Some(0)) {
            return Err(bad("sliding_window", "must be positive".into()));
        }
        Ok(self)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of a Hugging Face `config.json`; `source` names it in errors.
    pub fn from_hf_json(text: &str, source: &Path) -> Result<Self> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config {
                path: source.to_path_buf(),
                field: "(json)".into(),
                message: e.to_string(),
            })?;
        // Multimodal Gemma 3 checkpoints nest the language model's settings.
        if let Some(text_config) = value.get("text_config").cloned()
            && let (Some(obj), Some(outer)) = (value.as_object(), text_config.as_object())
        {
            let mut merged = outer.clone();
            for key in ["bos_token_id", "eos_token_id", "tie_word_embeddings"] {
                if let (false, Some(v)) = (merged.contains_key(key), obj.get(key)) {
                    merged.insert(key.into(), v.clone());
                }
            }
            merged
                .entry("model_type")
                .or_insert_with(|| "gemma3_text".into());
            value = serde_json::Value::Object(merged);
        }
        let raw: HfConfig = serde_json::from_value(value).map_err(|e| {
            // serde_json names the missing or mistyped field in its message.
            Error::Config {
                path: source.to_path_buf(),
                field: field_from_serde(&e.to_string()),
                message: e.to_string(),
            }
        })?;
        raw.into_config(source)?.validate(source)
    }

    /// Reads the metadata of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content, source: &Path) -> Result<Self> {
        let md = GgufMeta {
            metadata: &content.metadata,
            source,
        };
        let arch_name = md.string("general.architecture")?;
        let arch = match arch_name.as_str() {
            "llama" | "mistral" | "qwen2" | "smollm" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: source.to_path_buf(),
                    field: "general.architecture".into(),
                    found: other.to_string(),
                });
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = md.usize(&key("embedding_length"))?;
        let num_heads = md.usize(&key("attention.head_count"))?;
        let num_kv_heads = md
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        let head_dim = md
            .opt_usize(&key("attention.key_length"))?
            .unwrap_or(hidden_size / num_heads.max(1));
        let num_layers = md.usize(&key("block_count"))?;
        let vocab_size = match md.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => content
                .metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| md.missing("tokenizer.ggml.tokens"))?,
        };
        let rope_theta = md
            .opt_f64(&key("rope.freq_base"))?
            .unwrap_or(if arch == Arch::Gemma3 {
                1_000_000.0
            } else {
                10_000.0
            });
        let scaling = match (
            md.opt_string(&key("rope.scaling.type"))?.as_deref(),
            md.opt_f64(&key("rope.scaling.factor"))?,
        ) {
            (Some("linear"), Some(f)) if f != 1.0 => Some(RopeScaling::Linear { factor: f }),
            _ => None,
        };
        let context = md.usize(&key("context_length"))?;
        let eps = md
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-6);
        let tie = !content.tensor_infos.contains_key("output.weight");
        let bos = md
            .opt_usize("tokenizer.ggml.bos_token_id")?
            .map(|v| v as u32);
        let mut eos: Vec<u32> = md
            .opt_usize("tokenizer.ggml.eos_token_id")?
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        if let Some(eot) = md.opt_usize("tokenizer.ggml.eot_token_id")? {
            eos.push(eot as u32);
        }
        // The Llama family's settings; Gemma 3 overrides its own below.
        let llama = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: md.usize(&key("feed_forward_length"))?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope: Rope {
                theta: rope_theta,
                scaling,
            },
            rope_local: None,
            // llama.cpp's converter permutes q/k of Llama checkpoints into
            // interleaved pairs; Qwen2 keeps the NEOX layout.
            rope_style: if arch_name == "qwen2" {
                RopeStyle::Half
            } else {
                RopeStyle::Interleaved
            },
            max_position_embeddings: context,
            tie_word_embeddings: tie,
            layer_windows: vec![md.opt_usize(&key("attention.sliding_window"))?; num_layers],
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            activation: Activation::Silu,
            scale_embeddings: false,
            bos_token_id: bos,
            eos_token_ids: eos,
        };
        let cfg = match arch {
            Arch::Llama => llama,
            Arch::Gemma3 => {
                let window = md.usize(&key("attention.sliding_window"))?;
                let pattern = md
                    .opt_usize(&key("attention.sliding_window_pattern"))?
                    .unwrap_or(6);
                let local_theta = md
                    .opt_f64(&key("rope.local_freq_base"))?
                    .unwrap_or(10_000.0);
                let scalar = md
                    .opt_f64(&key("attention.query_pre_attn_scalar"))?
                    .unwrap_or(head_dim as f64);
                ModelConfig {
                    rope_local: Some(Rope {
                        theta: local_theta,
                        scaling: None,
                    }),
                    rope_style: RopeStyle::Half,
                    layer_windows: gemma_windows(num_layers, window, pattern),
                    attn_scale: 1.0 / scalar.sqrt(),
                    attn_logit_softcapping: md.opt_f64(&key("attn_logit_softcapping"))?,
                    final_logit_softcapping: md.opt_f64(&key("final_logit_softcapping"))?,
                    activation: Activation::GeluTanh,
                    scale_embeddings: true,
                    ..llama
                }
            }
        };
        cfg.validate(source)
    }
}

/// Gemma 3 alternates `pattern - 1` sliding-window layers with one global layer.
fn gemma_windows(layers: usize, window: usize, pattern: usize) -> Vec<Option<usize>> {
    (0..layers)
        .map(|i| {
            if pattern == 0 || (i + 1) % pattern != 0 {
                Some(window)
            } else {
                None
            }
        })
        .collect()
}

fn field_from_serde(message: &str) -> String {
    // "missing field `hidden_size` at line 3 column 1"
    message
        .split('`')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "(json)".to_string())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

impl HfConfig {
    fn into_config(self, source: &Path) -> Result<ModelConfig> {
        let model_type = self
            .model_type
            .clone()
            .or_else(|| self.architectures.first().cloned())
            .ok_or_else(|| Error::Config {
                path: source.to_path_buf(),
                field: "model_type".into(),
                message: "missing; cannot tell the architecture".into(),
            })?;
        let arch = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "LlamaForCausalLM" | "MistralForCausalLM"
            | "Qwen2ForCausalLM" => Arch::Llama,
            "gemma3_text" | "gemma3" | "Gemma3ForCausalLM" => Arch::Gemma3,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: source.to_path_buf(),
                    field: "model_type".into(),
                    found: other.to_string(),
                });
            }
        };
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        let scaling = match &self.rope_scaling {
            None => None,
            Some(s) => match s.rope_type.as_deref() {
                Some("llama3") => Some(RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(1.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192.0),
                }),
                Some("linear") => Some(RopeScaling::Linear {
                    factor: s.factor.unwrap_or(1.0),
                }),
                Some("default") | None => None,
                Some(other) => {
                    return Err(Error::Config {
                        path: source.to_path_buf(),
                        field: "rope_scaling.rope_type".into(),
                        message: format!("unsupported rope scaling `{other}`"),
                    });
                }
            },
        };
        let eos_token_ids = match self.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(t)) => vec![t],
            Some(OneOrMany::Many(v)) => v,
        };
        let act_name = self
            .hidden_activation
            .clone()
            .or(self.hidden_act.clone())
            .unwrap_or_else(|| match arch {
                Arch::Llama => "silu".into(),
                Arch::Gemma3 => "gelu_pytorch_tanh".into(),
            });
        let activation = match act_name.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu" => Activation::GeluTanh,
            other => {
                return Err(Error::Config {
                    path: source.to_path_buf(),
                    field: "hidden_act".into(),
                    message: format!("unsupported activation `{other}`"),
                });
            }
        };
        let max_pos = self.max_position_embeddings.unwrap_or(4096);
        let eps = self.rms_norm_eps.unwrap_or(1e-6);
        // The Llama family's settings; Gemma 3 overrides its own below.
        let window = match (model_type.as_str(), self.use_sliding_window) {
            // Qwen2 ships a sliding_window value but disables it unless asked.
            ("qwen2" | "Qwen2ForCausalLM", Some(true)) => self.sliding_window,
            ("qwen2" | "Qwen2ForCausalLM", _) => None,
            _ => self.sliding_window,
        };
        let llama = ModelConfig {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope: Rope {
                theta: self.rope_theta.unwrap_or(10_000.0),
                scaling,
            },
            rope_local: None,
            rope_style: RopeStyle::Half,
            max_position_embeddings: max_pos,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            layer_windows: vec![window; self.num_hidden_layers],
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            activation,
            scale_embeddings: false,
            bos_token_id: self.bos_token_id,
            eos_token_ids,
        };
        let cfg = match arch {
            Arch::Llama => llama,
            Arch::Gemma3 => {
                let window = self.sliding_window.unwrap_or(4096);
                let layer_windows = match &self.layer_types {
                    Some(types) => {
                        if types.len() != self.num_hidden_layers {
                            return Err(Error::Config {
                                path: source.to_path_buf(),
                                field: "layer_types".into(),
                                message: format!(
                                    "{} entries for {} layers",
                                    types.len(),
                                    self.num_hidden_layers
                                ),
                            });
                        }
                        types
                            .iter()
                            .map(|t| (t == "sliding_attention").then_some(window))
                            .collect()
                    }
                    None => gemma_windows(
                        self.num_hidden_layers,
                        window,
                        self.sliding_window_pattern.unwrap_or(6),
                    ),
                };
                ModelConfig {
                    rope: Rope {
                        theta: self.rope_theta.unwrap_or(1_000_000.0),
                        scaling,
                    },
                    rope_local: Some(Rope {
                        theta: self.rope_local_base_freq.unwrap_or(10_000.0),
                        scaling: None,
                    }),
                    tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
                    layer_windows,
                    attn_scale: 1.0 / self.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt(),
                    attn_logit_softcapping: self.attn_logit_softcapping,
                    final_logit_softcapping: self.final_logit_softcapping,
                    scale_embeddings: true,
                    ..llama
                }
            }
        };
        Ok(cfg)
    }
}

/// Typed access to GGUF metadata with errors that name the file and key.
pub(crate) struct GgufMeta<'a> {
    pub metadata: &'a HashMap<String, gguf_file::Value>,
    pub source: &'a Path,
}

impl GgufMeta<'_> {
    pub fn missing(&self, key: &str) -> Error {
        Error::Config {
            path: self.source.to_path_buf(),
            field: key.to_string(),
            message: "missing from the GGUF metadata".into(),
        }
    }

    fn wrong(&self, key: &str, e: candle_core::Error) -> Error {
        Error::Config {
            path: self.source.to_path_buf(),
            field: key.to_string(),
            message: format!("unexpected value type: {e}"),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = match v {
                    gguf_file::Value::U64(x) => Ok(*x),
                    gguf_file::Value::I64(x) => u64::try_from(*x)
                        .map_err(|_| candle_core::Error::Msg(format!("negative value {x}"))),
                    gguf_file::Value::I32(x) => u64::try_from(*x)
                        .map_err(|_| candle_core::Error::Msg(format!("negative value {x}"))),
                    other => other.to_u32().map(u64::from),
                }
                .map_err(|e| self.wrong(key, e))?;
                Ok(Some(n as usize))
            }
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(gguf_file::Value::F64(x)) => Ok(Some(*x)),
            Some(v) => v
                .to_f32()
                .map(|x| Some(x as f64))
                .map_err(|e| self.wrong(key, e)),
        }
    }

    pub fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|e| self.wrong(key, e)),
        }
    }

    pub fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.to_bool().map(Some).map_err(|e| self.wrong(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_field_is_named_in_the_error() {
        let err = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":10}"#,
            Path::new("m/config.json"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("m/config.json"), "{text}");
        assert!(text.contains("hidden_size"), "{text}");
    }

    #[test]
    fn an_unknown_architecture_is_refused_by_name() {
        let err = ModelConfig::from_hf_json(
            r#"{"model_type":"mamba","vocab_size":10,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":2}"#,
            Path::new("config.json"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("mamba"), "{err}");
    }

    #[test]
    fn gemma_layers_alternate_five_local_with_one_global() {
        let w = gemma_windows(12, 512, 6);
        assert_eq!(w.iter().filter(|w| w.is_none()).count(), 2);
        assert_eq!(w[5], None);
        assert_eq!(w[11], None);
        assert_eq!(w[0], Some(512));
    }

    #[test]
    fn llama3_scaling_leaves_high_frequencies_alone() {
        let plain = Rope {
            theta: 500_000.0,
            scaling: None,
        }
        .inv_freq(128);
        let scaled = Rope {
            theta: 500_000.0,
            scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
        }
        .inv_freq(128);
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[63] / scaled[63] - 8.0).abs() < 1e-4);
    }
}
