//! The one integration-test binary (one link instead of many).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    clippy::type_complexity
)]

mod autopilot;
mod canary_truth;
mod capture;
mod clients;
mod connections;
mod drift;
mod embeddings;
mod engine;
mod faults;
mod fleet;
mod fuzz;
mod gemma;
mod hardening;
mod hooks;
mod layout;
mod loadtest;
mod metrics;
mod process;
mod registry;
mod retrain;
mod rollout;
mod scheduler;
mod security;
mod server;
mod shadow;
mod soak;
mod structured;
mod support;
mod tensor_path;
mod tls;
mod tools;
mod train;

/// Runs before any test (and any thread they start).
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = {
    extern "C" fn init() {
        llmops::init_process();
    }
    init
};
