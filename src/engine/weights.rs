//! Where weights come from: safetensors (files, sharded, or a buffer) or GGUF.
//!
//! Both sources hand out the same three kinds of parameter: [`Linear`] layers
//! (a `QMatMul`, dense or quantized, plus an optional bias), vectors (norm
//! weights) and the token [`Embedding`]. Every tensor is shape-checked against
//! the config, and errors name the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use super::config::Arch;
use super::cpu::gemm::{PackedWeight, PanelFormat};
use super::cpu::quant::{QuantType, QuantWeight};
use super::{Error, Result};

/// Storage of a linear layer's weight.
#[derive(Debug, Clone)]
pub(crate) enum LinearWeight {
    /// f32 in host memory, packed for the CPU kernel.
    Host(Arc<PackedWeight>),
    /// The GGUF file's blocks in host memory, for the int8 block kernel
    /// (`cpu::quant`).
    Blocks(Arc<QuantWeight>),
    /// A candle matmul (quantized blocks, or dense on a GPU).
    Candle(QMatMul),
}

/// A linear layer `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: LinearWeight,
    bias: Option<Tensor>,
    pub(crate) bias_host: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// Builds a dense layer from a `[out, in]` weight; f32 weights on the CPU
    /// move to host memory for the CPU kernels.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::dense_for(weight, bias, true)
    }

    /// As [`Linear::dense`]; with `host` false the weight stays a candle
    /// tensor even on the CPU (the tensor path).
    fn dense_for(weight: Tensor, bias: Option<Tensor>, host: bool) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let host = host && weight.device().is_cpu() && weight.dtype() == DType::F32;
        let bias_host = match (&bias, host) {
            (Some(b), true) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        let weight = if host {
            let rows = weight.flatten_all()?.to_vec1::<f32>()?;
            LinearWeight::Host(Arc::new(PackedWeight::pack(
                &rows,
                out_features,
                in_features,
            )))
        } else {
            LinearWeight::Candle(QMatMul::Tensor(weight))
        };
        Ok(Self {
            weight,
            bias,
            bias_host,
            out_features,
            in_features,
        })
    }

    /// A host layer with f16 or int8 panels from an f32 `[out, in]` weight on the CPU.
    fn host_packed(weight: &Tensor, bias: Option<Tensor>, format: PanelFormat) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let rows = weight
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let bias_host = match &bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let mut l = Linear::host(
            Arc::new(PackedWeight::pack_as(
                &rows,
                out_features,
                in_features,
                format,
            )),
            out_features,
            in_features,
            bias_host,
        );
        l.bias = bias;
        Ok(l)
    }

    fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let bias_host = match &bias {
            Some(b) if b.device().is_cpu() => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Self {
            weight: LinearWeight::Candle(QMatMul::from_arc(weight)?),
            bias,
            bias_host,
            out_features,
            in_features,
        })
    }

    /// A host layer on the file's blocks.
    fn blocks(weight: Arc<QuantWeight>, bias: Option<Tensor>) -> Result<Self> {
        let bias_host = match &bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            out_features: weight.n,
            in_features: weight.k,
            weight: LinearWeight::Blocks(weight),
            bias,
            bias_host,
        })
    }

    fn host(
        weight: Arc<PackedWeight>,
        out_features: usize,
        in_features: usize,
        bias_host: Option<Vec<f32>>,
    ) -> Self {
        Self {
            weight: LinearWeight::Host(weight),
            bias: None,
            bias_host,
            out_features,
            in_features,
        }
    }

    /// Stacks layers sharing an input into one (`[out₁ + out₂ + …, in]`), so
    /// one matmul serves them; `None` unless all are host panels of one
    /// format or blocks of one type.
    pub(crate) fn stack(parts: &[&Linear]) -> Option<Linear> {
        let in_features = parts.first()?.in_features;
        let mut ws = vec![];
        let mut qs = vec![];
        let mut bias = vec![];
        let any_bias = parts.iter().any(|p| p.bias_host.is_some());
        for p in parts {
            match &p.weight {
                LinearWeight::Host(pw) => ws.push(pw.as_ref()),
                LinearWeight::Blocks(qw) => qs.push(qw.as_ref()),
                LinearWeight::Candle(_) => return None,
            }
            if p.in_features != in_features || (p.bias.is_some() && p.bias_host.is_none()) {
                return None;
            }
            match &p.bias_host {
                Some(b) => bias.extend_from_slice(b),
                None => bias.extend(std::iter::repeat_n(0.0, p.out_features)),
            }
        }
        if !ws.is_empty() && !qs.is_empty() {
            return None;
        }
        let weight = if qs.is_empty() {
            LinearWeight::Host(Arc::new(PackedWeight::stack(&ws)?))
        } else {
            LinearWeight::Blocks(Arc::new(QuantWeight::stack(&qs)?))
        };
        let out_features = parts.iter().map(|p| p.out_features).sum();
        Some(Self {
            weight,
            bias: None,
            bias_host: any_bias.then_some(bias),
            out_features,
            in_features,
        })
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Applies the layer to `[tokens, in]` as tensors (the device path).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Candle(q) => {
                // A dense weight in the compute dtype (bf16 on a GPU) takes
                // its input in that dtype; activations stay f32 between layers.
                let wdt = match q {
                    QMatMul::Tensor(w) | QMatMul::TensorF16(w) => w.dtype(),
                    QMatMul::QTensor(_) => x.dtype(),
                };
                if wdt == x.dtype() {
                    q.forward(x)?
                } else {
                    q.forward(&x.to_dtype(wdt)?)?.to_dtype(x.dtype())?
                }
            }
            LinearWeight::Host(w) => {
                let mut rows = Vec::with_capacity(w.n * w.k);
                for j in 0..w.n {
                    w.row_into(j, &mut rows);
                }
                let wt = Tensor::from_vec(rows, (self.out_features, self.in_features), x.device())?;
                x.matmul(&wt.t()?)?
            }
            LinearWeight::Blocks(w) => {
                let mut rows = Vec::with_capacity(w.n * w.k);
                for j in 0..w.n {
                    w.row_into(j, &mut rows);
                }
                let wt = Tensor::from_vec(rows, (self.out_features, self.in_features), x.device())?;
                x.matmul(&wt.t()?)?
            }
        };
        Ok(match (&self.bias, &self.bias_host) {
            (Some(b), _) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            (None, Some(b)) => y.broadcast_add(&Tensor::from_slice(b, b.len(), x.device())?)?,
            (None, None) => y,
        })
    }

    /// Applies the layer to `m` host rows, writing `[m, out]` into `out`.
    pub(crate) fn forward_host(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> Result<()> {
        out.resize(m * self.out_features, 0.0);
        match &self.weight {
            LinearWeight::Host(w) => {
                super::cpu::gemm::matmul_xwt(x, m, w, self.bias_host.as_deref(), out);
            }
            LinearWeight::Blocks(w) => {
                super::cpu::quant::matmul_xwt(x, m, w, self.bias_host.as_deref(), out);
            }
            LinearWeight::Candle(q) => {
                let t = Tensor::from_slice(
                    &x[..m * self.in_features],
                    (m, self.in_features),
                    &Device::Cpu,
                )?;
                let y = q
                    .forward(&t)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                out.copy_from_slice(&y);
                if let Some(b) = &self.bias_host {
                    for row in out.chunks_mut(self.out_features) {
                        for (o, bv) in row.iter_mut().zip(b) {
                            *o += bv;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes of weight storage (for memory accounting).
    pub fn size_in_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Host(w) => w.size_in_bytes(),
            LinearWeight::Blocks(w) => w.size_in_bytes(),
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// Appends the rows of `ids` (each below `rows`) to `out`, cleared first.
fn gather_rows(
    ids: &[u32],
    rows: usize,
    out: &mut Vec<f32>,
    row_into: impl Fn(usize, &mut Vec<f32>),
) -> Result<()> {
    out.clear();
    for &id in ids {
        if id as usize >= rows {
            return Err(Error::Internal(format!(
                "token id {id} outside the embedding"
            )));
        }
        row_into(id as usize, out);
    }
    Ok(())
}

/// The token embedding table: host f32 (CPU), a device tensor, or still
/// quantized (rows are dequantized on lookup, so a 262k-row vocabulary stays
/// small in memory).
#[derive(Debug, Clone)]
pub enum Embedding {
    /// `[vocab, hidden]` in host memory, packed for the CPU kernel so a tied
    /// output head shares it without a copy.
    Host {
        /// The table.
        table: Arc<PackedWeight>,
        /// Row width.
        hidden: usize,
    },
    /// `[vocab, hidden]` as the GGUF file's blocks in host memory: rows
    /// are dequantized on lookup, and a tied output head runs the int8
    /// block kernel on the same bytes.
    Blocks(Arc<QuantWeight>),
    /// `[vocab, hidden]` in the compute dtype on a device.
    Dense(Tensor),
    /// `[vocab, hidden]` in a GGUF block format.
    Quantized(Arc<QTensor>),
}

impl Embedding {
    fn from_dense(t: Tensor, host: bool) -> Result<Self> {
        if host && t.device().is_cpu() && t.dtype() == DType::F32 {
            let (vocab, hidden) = t.dims2()?;
            let rows = t.flatten_all()?.to_vec1::<f32>()?;
            Ok(Embedding::Host {
                table: Arc::new(PackedWeight::pack(&rows, vocab, hidden)),
                hidden,
            })
        } else {
            Ok(Embedding::Dense(t))
        }
    }

    /// Looks up `ids` (u32, `[tokens]`) → `[tokens, hidden]` tensor.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Host { hidden, .. } => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = vec![];
                self.gather_host(&ids, &mut out)?;
                Tensor::from_vec(out, (ids.len(), *hidden), &Device::Cpu)?
            }
            Embedding::Blocks(table) => {
                let ids = ids.to_vec1::<u32>()?;
                let mut out = vec![];
                self.gather_host(&ids, &mut out)?;
                Tensor::from_vec(out, (ids.len(), table.k), &Device::Cpu)?
            }
            Embedding::Dense(w) => w.embedding(ids)?,
            Embedding::Quantized(q) => q.embedding(ids)?,
        })
    }

    /// Looks up `ids` into host rows.
    pub(crate) fn gather_host(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        match self {
            Embedding::Host { table, .. } => {
                gather_rows(ids, table.n, out, |id, out| table.row_into(id, out))?
            }
            Embedding::Blocks(table) => {
                gather_rows(ids, table.n, out, |id, out| table.row_into(id, out))?
            }
            other => {
                let t = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                let rows = match other {
                    Embedding::Quantized(q) => q.embedding(&t)?,
                    Embedding::Dense(w) => w.embedding(&t.to_device(w.device())?)?,
                    Embedding::Host { .. } | Embedding::Blocks(_) => {
                        unreachable!("handled above")
                    }
                };
                *out = rows.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            }
        }
        Ok(())
    }

    /// The output projection that shares this matrix.
    pub fn tied_head(&self) -> Result<Linear> {
        match self {
            Embedding::Host { table, hidden } => {
                Ok(Linear::host(table.clone(), table.n, *hidden, None))
            }
            Embedding::Blocks(table) => Linear::blocks(table.clone(), None),
            Embedding::Dense(w) => Linear::dense_for(w.clone(), None, false),
            Embedding::Quantized(q) => Linear::quantized(q.clone(), None),
        }
    }
}

/// Per-layer parameter roles, named by [`Naming`] in each source's scheme.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    /// Norm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Per-head query norm (Gemma 3).
    QNorm,
    /// Per-head key norm (Gemma 3).
    KNorm,
    /// Norm on the attention output before the residual (Gemma 3).
    PostAttnNorm,
    /// Norm before the MLP.
    FfnNorm,
    /// Norm on the MLP output before the residual (Gemma 3).
    PostFfnNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

/// Maps roles to tensor names of a checkpoint format.
#[derive(Debug, Clone)]
pub struct Naming {
    gguf: bool,
    arch: Arch,
    prefix: String,
}

impl Naming {
    /// Tensor name of the embedding.
    pub fn embed(&self) -> String {
        if self.gguf {
            "token_embd.weight".into()
        } else {
            format!("{}model.embed_tokens.weight", self.prefix)
        }
    }

    /// Tensor name of the final norm.
    pub fn final_norm(&self) -> String {
        if self.gguf {
            "output_norm.weight".into()
        } else {
            format!("{}model.norm.weight", self.prefix)
        }
    }

    /// Tensor name of the output projection.
    pub fn lm_head(&self) -> String {
        if self.gguf {
            "output.weight".into()
        } else {
            format!("{}lm_head.weight", self.prefix)
        }
    }

    /// Tensor name (without `.weight`/`.bias`) of a layer's parameter.
    pub fn layer(&self, i: usize, role: Role) -> String {
        if self.gguf {
            let r = match role {
                Role::AttnNorm => "attn_norm",
                Role::Q => "attn_q",
                Role::K => "attn_k",
                Role::V => "attn_v",
                Role::O => "attn_output",
                Role::QNorm => "attn_q_norm",
                Role::KNorm => "attn_k_norm",
                Role::PostAttnNorm => "post_attention_norm",
                Role::FfnNorm => "ffn_norm",
                Role::PostFfnNorm => "post_ffw_norm",
                Role::Gate => "ffn_gate",
                Role::Up => "ffn_up",
                Role::Down => "ffn_down",
            };
            format!("blk.{i}.{r}")
        } else {
            let gemma = self.arch == Arch::Gemma3;
            let r = match role {
                Role::AttnNorm => "input_layernorm",
                Role::Q => "self_attn.q_proj",
                Role::K => "self_attn.k_proj",
                Role::V => "self_attn.v_proj",
                Role::O => "self_attn.o_proj",
                Role::QNorm => "self_attn.q_norm",
                Role::KNorm => "self_attn.k_norm",
                Role::PostAttnNorm => "post_attention_layernorm",
                Role::FfnNorm if gemma => "pre_feedforward_layernorm",
                Role::FfnNorm => "post_attention_layernorm",
                Role::PostFfnNorm => "post_feedforward_layernorm",
                Role::Gate => "mlp.gate_proj",
                Role::Up => "mlp.up_proj",
                Role::Down => "mlp.down_proj",
            };
            format!("{}model.layers.{i}.{r}", self.prefix)
        }
    }
}

enum Store {
    Mmaped(candle_core::safetensors::MmapedSafetensors),
    Buffer(HashMap<String, Tensor>),
    Gguf {
        content: gguf_file::Content,
        file: std::sync::Mutex<File>,
    },
}

/// An opened checkpoint, ready to hand out parameters.
pub struct WeightSource {
    store: Store,
    /// Where each tensor lives, for error messages.
    files: Vec<PathBuf>,
    routing: HashMap<String, usize>,
    device: Device,
    dtype: DType,
    /// Gemma's Hugging Face checkpoints store `w` for norms computed as `1 + w`;
    /// GGUF conversion already added the one.
    norm_offset: f64,
    naming: Naming,
    /// Host panels for GGUF block-quantized matrices, or `None` to keep the
    /// blocks (see `host_panels`).
    panel_format: Option<PanelFormat>,
    /// Whether f32 weights on the CPU go to host memory for the host path
    /// (else they stay candle tensors and quantized blocks stay blocks).
    host: bool,
}

impl WeightSource {
    /// Opens safetensors files (one, or the shards of an index) lazily via mmap.
    pub fn safetensors(
        files: Vec<PathBuf>,
        arch: Arch,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut routing = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            let names = safetensors_names(f)?;
            for n in names {
                routing.insert(n, i);
            }
        }
        // SAFETY: the files are opened read-only; like every mmap user we rely on
        // nobody truncating them while the model loads.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                Error::Load {
                    path: files.first().cloned().unwrap_or_default(),
                    message: e.to_string(),
                }
            })?;
        let naming = hf_naming(arch, &routing);
        Ok(Self {
            store: Store::Mmaped(st),
            files,
            routing,
            device: device.clone(),
            dtype,
            norm_offset: if arch == Arch::Gemma3 { 1.0 } else { 0.0 },
            naming,
            panel_format: Some(PanelFormat::F16),
            host: device.is_cpu(),
        })
    }

    /// Reads safetensors from memory (the embedded default model).
    pub fn safetensors_buffer(
        bytes: &[u8],
        name: &str,
        arch: Arch,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let path = PathBuf::from(name);
        let tensors =
            candle_core::safetensors::load_buffer(bytes, device).map_err(|e| Error::Load {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let routing = tensors.keys().map(|k| (k.clone(), 0)).collect();
        let naming = hf_naming(arch, &routing);
        Ok(Self {
            store: Store::Buffer(tensors),
            files: vec![path],
            routing,
            device: device.clone(),
            dtype,
            norm_offset: if arch == Arch::Gemma3 { 1.0 } else { 0.0 },
            naming,
            panel_format: Some(PanelFormat::F16),
            host: device.is_cpu(),
        })
    }

    /// Opens a GGUF file whose header has already been read.
    pub fn gguf(
        content: gguf_file::Content,
        path: &Path,
        arch: Arch,
        device: &Device,
    ) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let routing = content
            .tensor_infos
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        Ok(Self {
            store: Store::Gguf {
                content,
                file: std::sync::Mutex::new(file),
            },
            files: vec![path.to_path_buf()],
            routing,
            device: device.clone(),
            dtype: DType::F32,
            norm_offset: 0.0,
            naming: Naming {
                gguf: true,
                arch,
                prefix: String::new(),
            },
            panel_format: Some(PanelFormat::F16),
            host: device.is_cpu(),
        })
    }

    /// How GGUF block-quantized matrices are held on the CPU.
    pub fn gguf_weights(mut self, w: super::GgufWeights) -> Self {
        self.panel_format = w.panels();
        self
    }

    /// Whether weights are laid out for the host path (the default on the
    /// CPU) or kept as candle tensors for the tensor path.
    pub fn host(mut self, host: bool) -> Self {
        self.host = host && self.device.is_cpu();
        self
    }

    /// Whether weights go to host memory (the host path).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// The naming scheme of this checkpoint.
    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn file_of(&self, name: &str) -> PathBuf {
        let i = self.routing.get(name).copied().unwrap_or(0);
        self.files.get(i).cloned().unwrap_or_default()
    }

    fn missing(&self, name: &str) -> Error {
        Error::Load {
            path: self.files.first().cloned().unwrap_or_default(),
            message: format!("tensor `{name}` is missing"),
        }
    }

    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(Error::Load {
                path: self.file_of(name),
                message: format!("tensor `{name}` has shape {got:?}, the config implies {want:?}"),
            });
        }
        Ok(())
    }

    fn wrap(&self, name: &str, e: candle_core::Error) -> Error {
        Error::Load {
            path: self.file_of(name),
            message: format!("tensor `{name}`: {e}"),
        }
    }

    fn dense(&self, name: &str) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(self.missing(name));
        }
        let t = match &self.store {
            Store::Mmaped(st) => st.load(name, &self.device),
            Store::Buffer(map) => map
                .get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("missing".into())),
            Store::Gguf { .. } => self
                .quantized(name)
                .and_then(|q| q.dequantize(&self.device)),
        }
        .map_err(|e| self.wrap(name, e))?;
        t.to_dtype(self.dtype).map_err(|e| self.wrap(name, e))
    }

    fn quantized(&self, name: &str) -> candle_core::Result<QTensor> {
        match &self.store {
            Store::Gguf { content, file } => {
                // A header can declare dimensions whose product overflows:
                // candle's reader then sizes the data by the wrapped count
                // and its dequantization asks for an impossible allocation
                // (a panic; found by `tests/it/fuzz.rs`). Refuse those here.
                if let Some(info) = content.tensor_infos.get(name) {
                    let elems = info
                        .shape
                        .dims()
                        .iter()
                        .try_fold(1usize, |a, &d| a.checked_mul(d));
                    let dequantized = elems.and_then(|n| n.checked_mul(4));
                    if dequantized.is_none_or(|b| b > isize::MAX as usize) {
                        candle_core::bail!(
                            "the header declares shape {:?}, too large to exist",
                            info.shape.dims()
                        );
                    }
                }
                let mut f = file
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("weight file lock poisoned".into()))?;
                content.tensor(&mut *f, name, &self.device)
            }
            _ => candle_core::bail!("not a GGUF source"),
        }
    }

    /// The host panel format block-quantized GGUF matrices are dequantized
    /// into on the host path, or `None` with [`super::GgufWeights::Blocks`]
    /// (then `host_blocks` keeps the file's blocks). Either way one pass
    /// over each weight serves the whole batch.
    fn host_panels(&self) -> Option<PanelFormat> {
        self.panel_format
            .filter(|_| self.host && self.dtype == DType::F32)
    }

    /// The file's blocks for the host block kernel: on the host path with
    /// [`super::GgufWeights::Blocks`], for the block types it reads (others
    /// stay candle `QMatMul`s).
    fn host_blocks(&self, q: &QTensor) -> candle_core::Result<Option<QuantWeight>> {
        if self.panel_format.is_some() || !self.host || self.dtype != DType::F32 {
            return Ok(None);
        }
        let Some(ty) = QuantType::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let Ok((n, k)) = q.shape().dims2() else {
            return Ok(None);
        };
        let data = q.data()?.into_owned();
        Ok(QuantWeight::new(ty, data, n, k))
    }

    /// Whether GGUF block-quantized matrices are dequantized into dense
    /// tensors for the tensor path: with [`super::GgufWeights::F32`] (the
    /// exact reference); otherwise the tensor path keeps the blocks and runs
    /// them through candle's quantized matmul.
    fn dense_on_device(&self) -> bool {
        !self.host && self.panel_format == Some(PanelFormat::F32)
    }

    /// A linear layer `[out, in]` with an optional `<base>.bias`.
    pub fn linear(&self, base: &str, out_features: usize, in_features: usize) -> Result<Linear> {
        let wname = format!("{base}.weight");
        let bname = format!("{base}.bias");
        if !self.contains(&wname) {
            return Err(self.missing(&wname));
        }
        let bias = if self.contains(&bname) {
            let b = self.dense(&bname)?;
            self.check_shape(&bname, b.dims(), &[out_features])?;
            Some(b)
        } else {
            None
        };
        match &self.store {
            Store::Gguf { .. } => {
                let q = self.quantized(&wname).map_err(|e| self.wrap(&wname, e))?;
                self.check_shape(&wname, q.shape().dims(), &[out_features, in_features])?;
                match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        let t = q
                            .dequantize(&self.device)
                            .map_err(|e| self.wrap(&wname, e))?;
                        Linear::dense_for(t.to_dtype(self.dtype)?, bias, self.host)
                    }
                    _ if let Some(format) = self.host_panels() => {
                        let t = q
                            .dequantize(&self.device)
                            .map_err(|e| self.wrap(&wname, e))?;
                        Linear::host_packed(&t, bias, format)
                    }
                    _ if let Some(w) =
                        self.host_blocks(&q).map_err(|e| self.wrap(&wname, e))? =>
                    {
                        Linear::blocks(Arc::new(w), bias)
                    }
                    _ if self.dense_on_device() => {
                        let t = q
                            .dequantize(&self.device)
                            .map_err(|e| self.wrap(&wname, e))?;
                        Linear::dense_for(t.to_dtype(self.dtype)?, bias, false)
                    }
                    _ => Linear::quantized(Arc::new(q), bias),
                }
            }
            _ => {
                let w = self.dense(&wname)?;
                self.check_shape(&wname, w.dims(), &[out_features, in_features])?;
                Linear::dense_for(w, bias, self.host)
            }
        }
    }

    /// A norm weight of `len` values, with the Gemma `1 + w` folded in.
    pub fn norm(&self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.dense(name)?;
        self.check_shape(name, t.dims(), &[len])?;
        let t = t.to_dtype(DType::F32)?;
        Ok(if self.norm_offset != 0.0 {
            (t + self.norm_offset)?
        } else {
            t
        })
    }

    /// The embedding `[vocab, hidden]`.
    pub fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        if !self.contains(name) {
            return Err(self.missing(name));
        }
        match &self.store {
            Store::Gguf { .. } => {
                let q = self.quantized(name).map_err(|e| self.wrap(name, e))?;
                self.check_shape(name, q.shape().dims(), &[vocab, hidden])?;
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    let t = q.dequantize(&self.device).map_err(|e| self.wrap(name, e))?;
                    Embedding::from_dense(t.to_dtype(self.dtype)?, self.host)
                } else if let Some(format) = self.host_panels() {
                    let t = q.dequantize(&self.device).map_err(|e| self.wrap(name, e))?;
                    let rows = t.flatten_all()?.to_vec1::<f32>()?;
                    Ok(Embedding::Host {
                        table: Arc::new(PackedWeight::pack_as(&rows, vocab, hidden, format)),
                        hidden,
                    })
                } else if let Some(w) = self.host_blocks(&q).map_err(|e| self.wrap(name, e))? {
                    Ok(Embedding::Blocks(Arc::new(w)))
                } else if self.dense_on_device() {
                    let t = q.dequantize(&self.device).map_err(|e| self.wrap(name, e))?;
                    Ok(Embedding::Dense(t.to_dtype(self.dtype)?))
                } else {
                    Ok(Embedding::Quantized(Arc::new(q)))
                }
            }
            _ => {
                let w = self.dense(name)?;
                self.check_shape(name, w.dims(), &[vocab, hidden])?;
                Embedding::from_dense(w, self.host)
            }
        }
    }
}

fn hf_naming(arch: Arch, routing: &HashMap<String, usize>) -> Naming {
    // Multimodal Gemma 3 checkpoints keep the text model under `language_model.`.
    let prefix = if !routing.contains_key("model.embed_tokens.weight")
        && routing.contains_key("language_model.model.embed_tokens.weight")
    {
        "language_model.".to_string()
    } else {
        String::new()
    };
    Naming {
        gguf: false,
        arch,
        prefix,
    }
}

fn safetensors_names(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::Load {
        path: path.to_path_buf(),
        message: format!("not a safetensors file (no header): {e}"),
    })?;
    let len = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > file_len.saturating_sub(8) || len > 100 << 20 {
        return Err(Error::Load {
            path: path.to_path_buf(),
            message: format!("safetensors header length {len} exceeds the file ({file_len} bytes)"),
        });
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| Error::Load {
            path: path.to_path_buf(),
            message: format!("safetensors header is not valid JSON: {e}"),
        })?;
    Ok(header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect())
}
