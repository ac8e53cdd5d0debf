//! The front ends: HTTP (OpenAI API) and gRPC, with keys, limits and the one
//! error table.

pub mod admin;
pub mod auth;
pub mod browser;
pub mod error;
pub mod grpc;
pub mod http;
pub mod listen;
pub mod openai;
pub mod structured;
pub mod tls;

/// The kernel send buffer of an accepted connection, fixed. Left to
/// autotuning, a connection whose client stops reading grows it to
/// `tcp_wmem`'s maximum (4 MiB on most systems, reached at once on
/// loopback): tens of thousands of streamed tokens generated for nobody
/// before the scheduler's unread limit can see a full socket. 256 KiB
/// (the kernel doubles it for bookkeeping) still moves megabytes a second
/// at 100 ms round trips, far more than a token stream needs.
pub const SEND_BUFFER_BYTES: usize = 256 << 10;

/// Settings for every accepted socket: `TCP_NODELAY` (streams send one
/// small frame per token; Nagle's algorithm must not hold one back) and
/// the fixed [`SEND_BUFFER_BYTES`].
pub fn tune_socket(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(SEND_BUFFER_BYTES) {
        tracing::debug!(error = %e, "SO_SNDBUF not set");
    }
}
