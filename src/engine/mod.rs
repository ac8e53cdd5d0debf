//! The candle engine: model families, weights (safetensors / GGUF), the paged
//! KV cache, sampling and detokenization.
//!
//! Invariant: only this module (and `train/`) knows candle. The scheduler sees
//! [`LoadedModel::forward`] on a [`Batch`] and gets logits back.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod embedded;
pub mod export_gguf;
mod forward;
pub mod grammar;
mod host;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod synth;
mod tensor;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

pub use batch::{Batch, Logits, SeqView};
pub use chat::{ChatTemplate, Message};
pub use config::{Arch, ModelConfig};
pub use forward::TopRows;
pub use host::Scratch;
pub use kv::{BlockAllocator, BlockHash, KvCache, KvDtype, KvGroups, KvShape, NIL};
pub use model::Model;
pub use sampling::{PositionScore, Sampler, SamplingParams, TokenLogprob, row_entropy, score_row};
pub use tokenizer::{StopMatcher, StopOutcome, TextStream, Tokenizer};

/// Errors of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A config value is missing or wrong.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field or metadata key.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The architecture is not one the engine runs.
    #[error(
        "{path}: field `{field}`: unsupported architecture `{found}` (supported: Llama family, Gemma 3)"
    )]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The field that named it.
        field: String,
        /// What it said.
        found: String,
    },
    /// Weights are missing, malformed or mis-shaped.
    #[error("{path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile.
    #[error("chat template: {0}")]
    Template(String),
    /// A request parameter is out of range; `param` names it.
    #[error("{param}: {message}")]
    InvalidParam {
        /// The parameter.
        param: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A broken internal invariant.
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Result of the engine layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// On-disk format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A Hugging Face folder with safetensors.
    Safetensors,
    /// A GGUF file.
    Gguf,
    /// Compiled into the binary.
    Embedded,
}

/// What was loaded, for logs, `/v1/models` and the registry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// Where it came from.
    pub source: String,
    /// Its format.
    pub format: Format,
    /// Its family.
    pub arch: Arch,
    /// Parameters implied by its shapes.
    pub parameters: usize,
    /// Longest context.
    pub context_length: usize,
    /// Which implementation runs its steps.
    pub engine_path: EnginePath,
}

/// A model with everything needed to serve it.
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template.
    pub chat_template: ChatTemplate,
    /// Description.
    pub info: ModelInfo,
}

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let bad = |m: String| Error::InvalidParam {
        param: "device".into(),
        message: m,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "metal" => Device::new_metal(0).map_err(|e| bad(format!("metal unavailable: {e}"))),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| bad(format!("bad CUDA ordinal in `{s}`")))?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(|e| bad(format!("CUDA unavailable: {e}")))
        }
        other => Err(bad(format!(
            "unknown device `{other}` (cpu, cuda[:N], metal)"
        ))),
    }
}

/// How GGUF block-quantized matrices (Q4_K, Q6_K, Q8_0, ...) are held on the
/// CPU. F32/F16/BF16 tensors in a GGUF file are always exact f32 panels.
/// On the tensor path ([`EnginePath::Tensor`]) the blocks are kept and run
/// through candle's quantized matmul, except with `f32`, which dequantizes
/// them into dense tensors of the compute dtype (the exact reference).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GgufWeights {
    /// Dequantized once at load into f16 GEMM panels (2 bytes per
    /// parameter): one pass over each weight serves the whole batch.
    #[default]
    F16,
    /// Dequantized into f32 panels (4 bytes per parameter): exactly the
    /// file's values, for reference runs.
    F32,
    /// Requantized to int8 panels with one scale per row (1 byte per
    /// parameter): less memory and faster single streams, but the rounding
    /// moves logits more than f16 (it follows llama.cpp's Q4_K_M run up to
    /// near ties, not the f32 reference's top-2 gaps as the default does).
    Int8,
    /// Kept as the file's blocks (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K; the
    /// least memory): on the host path our int8 block kernel
    /// (`cpu::quant`), activations quantized per block to int8 as llama.cpp
    /// does, one pass over each weight for the whole batch; other block
    /// types, and the tensor path, run candle's quantized matmul.
    Blocks,
}

impl GgufWeights {
    /// The panel format, or `None` for blocks kept quantized.
    pub fn panels(self) -> Option<cpu::gemm::PanelFormat> {
        use cpu::gemm::PanelFormat;
        match self {
            Self::F16 => Some(PanelFormat::F16),
            Self::F32 => Some(PanelFormat::F32),
            Self::Int8 => Some(PanelFormat::I8),
            Self::Blocks => None,
        }
    }
}

impl std::fmt::Display for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
            Self::Int8 => "int8",
            Self::Blocks => "blocks",
        })
    }
}

/// Which implementation runs a step.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EnginePath {
    /// Our own kernels over host memory (`host.rs`, `cpu/`): the CPU's
    /// fastest path. Only on the CPU device.
    Host,
    /// candle tensor ops on the model's device, the KV cache and attention
    /// included (`tensor.rs`): the GPU path, which also runs on candle's
    /// CPU device (how CI proves it).
    Tensor,
}

impl EnginePath {
    /// The path asked for, or the device's default (host on the CPU,
    /// tensor on CUDA and Metal); the host path on a GPU is an error.
    pub fn resolve(asked: Option<EnginePath>, device: &Device) -> Result<EnginePath> {
        match asked {
            Some(EnginePath::Host) if !device.is_cpu() => Err(Error::InvalidParam {
                param: "engine_path".into(),
                message: "the host path runs only on the cpu device".into(),
            }),
            Some(p) => Ok(p),
            None if device.is_cpu() => Ok(EnginePath::Host),
            None => Ok(EnginePath::Tensor),
        }
    }
}

impl std::fmt::Display for EnginePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::Tensor => "tensor",
        })
    }
}

/// Options for loading.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where to run.
    pub device: Device,
    /// Template used when the model has none.
    pub fallback_template: String,
    /// How GGUF block-quantized matrices are held on the CPU.
    pub gguf_weights: GgufWeights,
    /// Which path runs steps; `None`: the device's default
    /// ([`EnginePath::resolve`]).
    pub engine_path: Option<EnginePath>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            fallback_template: chat::FALLBACK_TEMPLATE.to_string(),
            gguf_weights: GgufWeights::default(),
            engine_path: None,
        }
    }
}

impl LoadOptions {
    /// Whether weights go to host memory for the host path.
    fn host(&self) -> Result<bool> {
        Ok(EnginePath::resolve(self.engine_path, &self.device)? == EnginePath::Host)
    }
}

/// The dtype weights are computed in: f32 on the CPU (candle's CPU matmul has
/// no bf16 kernel and f16 is slower than f32 there).
fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Loads a Hugging Face folder or a GGUF file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_dir(path, opts)
    } else if path.extension().and_then(|e| e.to_str()) == Some("gguf") || is_gguf(path) {
        load_gguf(path, opts)
    } else if path.exists() {
        Err(Error::Load {
            path: path.to_path_buf(),
            message: "neither a model folder (config.json) nor a GGUF file".into(),
        })
    } else {
        Err(Error::Load {
            path: path.to_path_buf(),
            message: "no such file or directory".into(),
        })
    }
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: "(json)".into(),
        message: e.to_string(),
    })
}

/// The safetensors files of a folder: the shards named by the index, or the
/// single `model.safetensors`, or else every `*.safetensors` in name order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Config {
                path: index.clone(),
                field: "weight_map".into(),
                message: "missing or not an object".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::Load {
            path: dir.to_path_buf(),
            message: "no *.safetensors files".into(),
        });
    }
    Ok(found)
}

/// Special-token strings and flags from `tokenizer_config.json`.
struct TokenizerConfig {
    template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        obj => obj.get("content")?.as_str().map(str::to_string),
    }
}

fn read_tokenizer_config(dir: &Path) -> Result<TokenizerConfig> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(TokenizerConfig {
            template: None,
            bos: None,
            eos: None,
        });
    }
    let v = read_json(&path)?;
    let mut template = chat::template_from_tokenizer_config(&v);
    let jinja = dir.join("chat_template.jinja");
    if template.is_none() && jinja.exists() {
        template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    Ok(TokenizerConfig {
        template,
        bos: token_string(v.get("bos_token")),
        eos: token_string(v.get("eos_token")),
    })
}

/// Finishes loading from parts common to every format.
fn assemble(
    model: Model,
    mut tokenizer: Tokenizer,
    template: Option<String>,
    tk_cfg_eos: Option<String>,
    opts: &LoadOptions,
    info: ModelInfo,
) -> Result<LoadedModel> {
    let cfg = model.config();
    if let Some(id) = tk_cfg_eos.as_deref().and_then(|e| tokenizer.token_id(e)) {
        tokenizer.add_eos(id);
    }
    // Chat models end a turn with their own marker; treat it as EOS.
    for marker in ["<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>"] {
        if let Some(id) = tokenizer.token_id(marker) {
            tokenizer.add_eos(id);
        }
    }
    let text_of = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
    let bos = text_of(tokenizer.bos().or(cfg.bos_token_id));
    let eos = text_of(tokenizer.eos().first().copied());
    let chat_template = match template {
        Some(t) => ChatTemplate::new(&t, &bos, &eos)?,
        None => ChatTemplate::new(&opts.fallback_template, &bos, &eos)?,
    };
    if tokenizer.vocab_size() > cfg.vocab_size + 1024 {
        return Err(Error::Load {
            path: PathBuf::from(&info.source),
            message: format!(
                "tokenizer has {} tokens but the model only {} embeddings",
                tokenizer.vocab_size(),
                cfg.vocab_size
            ),
        });
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        info,
    })
}

fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(Error::Load {
            path: dir.to_path_buf(),
            message: "no config.json in the model folder".into(),
        });
    }
    let cfg = ModelConfig::from_hf_file(&cfg_path)?;
    let files = safetensors_files(dir)?;
    let src = weights::WeightSource::safetensors(
        files,
        cfg.arch,
        &opts.device,
        compute_dtype(&opts.device),
    )?
    .host(opts.host()?);
    let tk_cfg = read_tokenizer_config(dir)?;
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::Load {
            path: dir.to_path_buf(),
            message: "no tokenizer.json in the model folder".into(),
        });
    }
    let model = Model::load(cfg.clone(), &src, &opts.device)?;
    let probe = Tokenizer::from_file(&tok_path, None, vec![])?;
    let bos = cfg
        .bos_token_id
        .or_else(|| tk_cfg.bos.as_deref().and_then(|b| probe.token_id(b)));
    let tokenizer = Tokenizer::new(probe.inner().clone(), bos, cfg.eos_token_ids.clone());
    let info = ModelInfo {
        source: dir.display().to_string(),
        format: Format::Safetensors,
        arch: cfg.arch,
        parameters: cfg.parameter_count(),
        context_length: cfg.max_position_embeddings,
        engine_path: model.engine_path(),
    };
    assemble(model, tokenizer, tk_cfg.template, tk_cfg.eos, opts, info)
}

/// Loads a model from memory: safetensors bytes, `config.json`,
/// `tokenizer.json` and `tokenizer_config.json` texts.
pub fn load_from_memory(
    name: &str,
    weights: &[u8],
    config_json: &str,
    tokenizer_json: &[u8],
    tokenizer_config_json: &str,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let cfg = ModelConfig::from_hf_json(config_json, Path::new(name))?;
    let src = weights::WeightSource::safetensors_buffer(
        weights,
        name,
        cfg.arch,
        &opts.device,
        compute_dtype(&opts.device),
    )?
    .host(opts.host()?);
    let model = Model::load(cfg.clone(), &src, &opts.device)?;
    let tk: serde_json::Value =
        serde_json::from_str(tokenizer_config_json).map_err(|e| Error::Config {
            path: name.into(),
            field: "tokenizer_config".into(),
            message: e.to_string(),
        })?;
    let tokenizer = Tokenizer::from_bytes(
        tokenizer_json,
        name,
        cfg.bos_token_id,
        cfg.eos_token_ids.clone(),
    )?;
    let info = ModelInfo {
        source: name.to_string(),
        format: Format::Embedded,
        arch: cfg.arch,
        parameters: cfg.parameter_count(),
        context_length: cfg.max_position_embeddings,
        engine_path: model.engine_path(),
    };
    assemble(
        model,
        tokenizer,
        chat::template_from_tokenizer_config(&tk),
        token_string(tk.get("eos_token")),
        opts,
        info,
    )
}

fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // candle's header reader panics on some hostile headers (a
    // `general.alignment` of 0 divides by zero; found by `tests/it/fuzz.rs`):
    // a file's bytes must give an error, never take the caller down.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut file)
    }));
    let content = match read {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the GGUF header is malformed (the reader panicked)".to_string()),
    }
    .map_err(|e| Error::Load {
        path: path.to_path_buf(),
        message: format!("not a readable GGUF file: {e}"),
    })?;
    let cfg = ModelConfig::from_gguf(&content, path)?;
    // A tokenizer.json beside the file wins over the embedded vocabulary.
    let beside = path.with_file_name("tokenizer.json");
    let tokenizer = if beside.exists() {
        Tokenizer::from_file(&beside, cfg.bos_token_id, cfg.eos_token_ids.clone())?
    } else {
        Tokenizer::from_gguf(&content, path)?
    };
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let src = weights::WeightSource::gguf(content, path, cfg.arch, &opts.device)?
        .gguf_weights(opts.gguf_weights)
        .host(opts.host()?);
    let model = Model::load(cfg.clone(), &src, &opts.device)?;
    let info = ModelInfo {
        source: path.display().to_string(),
        format: Format::Gguf,
        arch: cfg.arch,
        parameters: cfg.parameter_count(),
        context_length: cfg.max_position_embeddings,
        engine_path: model.engine_path(),
    };
    assemble(model, tokenizer, template, None, opts, info)
}
