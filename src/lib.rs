//! llmops: one binary that serves large language models and runs their
//! operations.
//!
//! # Layout
//!
//! The modules, in the order a request flows through them:
//!
//! - [`cli`]: the command line (`main.rs` only calls it).
//! - [`config`]: flags, `llmops.toml` and `LLMOPS_*` → a validated config.
//! - [`app`]: wiring: controller, engines, router, servers, graceful shutdown.
//! - [`api`]: HTTP (OpenAI) and gRPC front ends, keys, the one error table.
//! - [`quota`]: per-key limits and token reservations.
//! - [`router`]: the deployment table (stable, canary, shadow), one snapshot
//!   and one sticky pick per request.
//! - [`infer`]: below both front ends: validate, reserve, submit, stream.
//! - [`tools`]: tool calls, wire-neutral: the functions offered, the
//!   constraint `required` and a named choice compile to, the fallback
//!   prompt for templates without tool syntax, the per-family parsers.
//! - [`validation`]: wire-neutral request → valid request (tokenize, limits,
//!   the output constraint compiled).
//! - [`scheduler`]: continuous batching on an engine thread per version.
//! - [`engine`]: candle models (Llama family, Gemma 3), weights from
//!   safetensors or GGUF, the paged KV cache, CPU kernels, sampling,
//!   detokenization, and the model-file tools (synthetic checkpoints, GGUF
//!   export, the embedded model).
//! - [`monitor`]: metric names and handles, windows of finished requests,
//!   canary analysis, the exporter.
//!
//! Side paths: [`control`] (the controller: load, swap, rollouts),
//! [`registry`] (the catalog and its audit log), [`hooks`] (events to
//! webhooks and commands), [`capture`] (finished requests, redacted, for
//! retraining), [`redact`] (the personal-data patterns), [`proto`]
//! (generated gRPC code), [`train`] (`llmops train`).

pub mod api;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod embed;
pub mod engine;
pub mod hooks;
pub mod infer;
pub mod monitor;
pub mod proto;
pub mod quota;
pub mod redact;
pub mod registry;
pub mod router;
pub mod scheduler;
pub mod shadow;
pub mod tools;
pub mod train;
pub mod validation;

/// Process-wide setup that must happen before any thread starts.
///
/// candle asks for its thread count on every matmul and, unless
/// `RAYON_NUM_THREADS` is set, recomputes it by parsing `/proc/cpuinfo`
/// (measured: half the time of a batch-1 decode step of a 26M model). Setting
/// the variable once makes that a cheap lookup.
pub fn init_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // SAFETY: called at the top of `main` (and test setup) before other
        // threads exist or read the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
