//! The one integration-test binary (one link instead of many).

mod clients;
mod engine;
mod scheduler;
mod server;
mod train;
mod support;

/// Runs before any test (and any thread they start).
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = {
    extern "C" fn init() {
        llmops::init_process();
    }
    init
};
