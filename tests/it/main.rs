//! The one integration-test binary (one link instead of many).

mod engine;
mod scheduler;
mod server;
mod train;
mod support;
