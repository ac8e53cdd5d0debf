//! The front ends: HTTP (OpenAI API) and gRPC, with keys, limits and the one
//! error table.

pub mod admin;
pub mod auth;
pub mod error;
pub mod grpc;
pub mod http;
pub mod openai;
pub mod tls;
