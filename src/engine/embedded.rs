//! The default model compiled into the binary: a small Llama trained by
//! `llmops train` on public-domain text (see `models/default/README.md`).
//! `llmops serve` and `llmops generate` use it when no model is named.

use sha2::{Digest, Sha256};

use crate::engine::{self, LoadOptions, LoadedModel};

#[cfg(llmops_embedded)]
mod files {
    pub const WEIGHTS: &[u8] = include_bytes!("../../models/default/model.safetensors");
    pub const CONFIG: &str = include_str!("../../models/default/config.json");
    pub const TOKENIZER: &[u8] = include_bytes!("../../models/default/tokenizer.json");
    pub const TOKENIZER_CONFIG: &str = include_str!("../../models/default/tokenizer_config.json");
}

/// Whether this build carries the model (`build.rs` checks `models/default/`).
pub const AVAILABLE: bool = cfg!(llmops_embedded);

/// Loads the embedded model.
pub fn load(opts: &LoadOptions) -> Result<LoadedModel, engine::Error> {
    #[cfg(llmops_embedded)]
    {
        engine::load_from_memory(
            "embedded:default",
            files::WEIGHTS,
            files::CONFIG,
            files::TOKENIZER,
            files::TOKENIZER_CONFIG,
            opts,
        )
    }
    #[cfg(not(llmops_embedded))]
    {
        let _ = opts;
        Err(engine::Error::Load {
            path: "models/default".into(),
            message: "this build has no embedded model; pass --model PATH".into(),
        })
    }
}

/// The embedded model's files, for fine-tuning it (`llmops train --base
/// embedded`); `None` in a build without it.
pub struct Files {
    /// `model.safetensors`.
    pub weights: &'static [u8],
    /// `config.json`.
    pub config: &'static str,
    /// `tokenizer.json`.
    pub tokenizer: &'static [u8],
    /// `tokenizer_config.json`.
    pub tokenizer_config: &'static str,
}

/// The embedded files, when this build has them.
pub fn files() -> Option<Files> {
    #[cfg(llmops_embedded)]
    {
        Some(Files {
            weights: files::WEIGHTS,
            config: files::CONFIG,
            tokenizer: files::TOKENIZER,
            tokenizer_config: files::TOKENIZER_CONFIG,
        })
    }
    #[cfg(not(llmops_embedded))]
    {
        None
    }
}

/// Hex SHA-256 of the embedded weights.
pub fn digest() -> String {
    #[cfg(llmops_embedded)]
    let bytes = files::WEIGHTS;
    #[cfg(not(llmops_embedded))]
    let bytes: &[u8] = &[];
    hex::encode(Sha256::digest(bytes))
}
