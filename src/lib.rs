//! llmops: one binary that serves large language models and runs their
//! operations.
//!
//! # Layout
//!
//! The modules, in the order a request flows through them:
//!
//! - [`engine`]: candle models (Llama family, Gemma 3), weights from
//!   safetensors or GGUF, the paged KV cache, sampling, detokenization.

pub mod engine;
pub mod synth;
pub mod export;
pub mod monitor;
pub mod scheduler;
pub mod train;
