//! The gRPC front end: `llmops.v1.Inference`, `llmops.v1.Admin`, standard
//! health (overall and per model) and server reflection.
//!
//! Served as tonic routes on axum/hyper (HTTP/2) rather than tonic's own
//! transport, so `grpc-timeout` becomes the request's deadline and expires
//! as DEADLINE_EXCEEDED (tonic's transport would answer CANCELLED).

pub mod admin;
pub mod inference;

pub use admin::AdminService;
pub use inference::InferenceService;

use crate::proto as pb;
use pb::inference_server::InferenceServer;

/// The gRPC routes: inference, health, reflection (v1 and v1alpha).
pub fn routes(
    svc: InferenceService,
    admin: AdminService,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<tonic::service::Routes> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(tonic::service::Routes::new(InferenceServer::new(svc))
        .add_service(pb::admin_server::AdminServer::new(admin))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha))
}
