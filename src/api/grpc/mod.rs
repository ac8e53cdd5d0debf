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

/// `router` answering with gRPC's conventional codes where tonic does not:
/// a request message that does not decode (tonic: INTERNAL) is the
/// client's INVALID_ARGUMENT, and one over the size limit (tonic:
/// OUT_OF_RANGE) is RESOURCE_EXHAUSTED. The status is rewritten where it
/// travels: in the headers of a trailers-only answer (a unary call, or a
/// stream that failed before its first message) or in the trailers.
pub fn conventional_codes(router: axum::Router) -> axum::Router {
    router.layer(axum::middleware::map_response(conventional_response))
}

async fn conventional_response(resp: axum::response::Response) -> axum::response::Response {
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    recode(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            recode(&mut trailers);
            hyper::body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    axum::response::Response::from_parts(parts, axum::body::Body::new(body))
}

/// The code gRPC's convention gives a status tonic raised decoding a
/// request, if it differs from tonic's.
fn conventional_code(code: tonic::Code, message: &str) -> Option<tonic::Code> {
    match code {
        tonic::Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message.starts_with("Unexpected EOF decoding stream") =>
        {
            Some(tonic::Code::InvalidArgument)
        }
        tonic::Code::OutOfRange
            if message.starts_with("Error, decoded message length too large") =>
        {
            Some(tonic::Code::ResourceExhausted)
        }
        _ => None,
    }
}

/// Rewrites `grpc-status` in `headers` (the message stays).
fn recode(headers: &mut axum::http::HeaderMap) {
    if !headers.contains_key("grpc-status") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    if let Some(code) = conventional_code(status.code(), status.message()) {
        headers.insert("grpc-status", axum::http::HeaderValue::from(code as i32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_are_invalid_argument_and_oversize_messages_resource_exhausted() {
        use tonic::Code;
        let cases = [
            (
                Code::Internal,
                "failed to decode Protobuf message: GenerateRequest.prompt: invalid wire type",
                Some(Code::InvalidArgument),
            ),
            (
                Code::Internal,
                "Unexpected EOF decoding stream.",
                Some(Code::InvalidArgument),
            ),
            (
                Code::OutOfRange,
                "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
                Some(Code::ResourceExhausted),
            ),
            (Code::Internal, "internal error", None),
            (
                Code::InvalidArgument,
                "failed to decode Protobuf message",
                None,
            ),
        ];
        for (code, message, want) in cases {
            assert_eq!(conventional_code(code, message), want, "{code:?} {message}");
            let mut headers = axum::http::HeaderMap::new();
            tonic::Status::new(code, message)
                .add_header(&mut headers)
                .unwrap();
            recode(&mut headers);
            let seen = tonic::Status::from_header_map(&headers).unwrap();
            assert_eq!(seen.code(), want.unwrap_or(code));
            assert_eq!(seen.message(), message);
        }
    }
}
