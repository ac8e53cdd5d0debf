//! The one table from errors to HTTP status, gRPC code, OpenAI error type and
//! metric label. Internal details are logged, never sent.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::control::ControlError;
use crate::infer::InferError;
use crate::quota::QuotaError;
use crate::router::RouteError;
use crate::scheduler::SubmitError;
use crate::validation::ValidationError;

/// Every error a client can see.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Malformed or out-of-range input.
    #[error("{message}")]
    BadRequest {
        /// Human-readable reason.
        message: String,
        /// The offending parameter.
        param: Option<String>,
    },
    /// Prompt + completion beyond the model's context.
    #[error("{message}")]
    ContextLength {
        /// Human-readable reason.
        message: String,
        /// `messages` or `prompt`.
        param: Option<String>,
    },
    /// No or bad key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The key's role is not enough.
    #[error("{0}")]
    Forbidden(String),
    /// No such model.
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    /// No such resource (version, alias, route).
    #[error("{0}")]
    NotFound(String),
    /// The resource exists already.
    #[error("{0}")]
    Conflict(String),
    /// Body over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The route exists; the method does not (the `Allow` header lists
    /// those that do).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A body in a media type the route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The client stopped sending its request body.
    #[error("{0}")]
    RequestTimeout(String),
    /// A per-key limit.
    #[error("{message}")]
    RateLimited {
        /// Which limit.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The queue is full.
    #[error("{message}")]
    Overloaded {
        /// Which limit.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// Not ready, draining, or the model is not loaded.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client went away.
    #[error("request cancelled")]
    Cancelled,
    /// A write the server needed failed (a full disk, a file size
    /// limit): the message names what could not be written.
    #[error("{0}")]
    InsufficientStorage(String),
    /// A bug or an engine failure; the detail is only logged.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming a parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } | ApiError::ContextLength { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } | ApiError::Overloaded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
            // nginx's "client closed request"; the client never sees it.
            ApiError::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// gRPC status code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::ContextLength { .. }
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_) => tonic::Code::InvalidArgument,
            ApiError::MethodNotAllowed(_) => tonic::Code::Unimplemented,
            ApiError::RequestTimeout(_) => tonic::Code::DeadlineExceeded,
            ApiError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            ApiError::Forbidden(_) => tonic::Code::PermissionDenied,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => tonic::Code::NotFound,
            ApiError::Conflict(_) => tonic::Code::AlreadyExists,
            ApiError::RateLimited { .. }
            | ApiError::Overloaded { .. }
            | ApiError::InsufficientStorage(_) => tonic::Code::ResourceExhausted,
            ApiError::Unavailable(_) => tonic::Code::Unavailable,
            ApiError::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            ApiError::Cancelled => tonic::Code::Cancelled,
            ApiError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// Stable label for `llmops_request_failure_total{error_type}` and logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. } => "invalid_request",
            ApiError::ContextLength { .. } => "context_length_exceeded",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "permission_denied",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::Cancelled => "cancelled",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::Internal(_) => "internal",
        }
    }

    /// OpenAI's `error.type`.
    fn openai_type(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::ModelNotFound(_)
            | ApiError::NotFound(_)
            | ApiError::BadRequest { .. }
            | ApiError::ContextLength { .. }
            | ApiError::PayloadTooLarge(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::RequestTimeout(_)
            | ApiError::Conflict(_) => "invalid_request_error",
            ApiError::RateLimited { .. } | ApiError::Overloaded { .. } => "rate_limit_error",
            ApiError::Unavailable(_)
            | ApiError::DeadlineExceeded(_)
            | ApiError::Cancelled
            | ApiError::InsufficientStorage(_)
            | ApiError::Internal(_) => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::ContextLength { .. } => Some("context_length_exceeded"),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::Unauthenticated(_) => Some("invalid_api_key"),
            ApiError::RateLimited { .. } => Some("rate_limit_exceeded"),
            ApiError::Overloaded { .. } => Some("server_overloaded"),
            ApiError::InsufficientStorage(_) => Some("insufficient_storage"),
            _ => None,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } | ApiError::ContextLength { param, .. } => {
                param.as_deref()
            }
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after, .. }
            | ApiError::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The OpenAI error envelope.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.openai_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(detail = %detail, "internal error");
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(wait) = self.retry_after() {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp.extensions_mut().insert(ErrorType(self.error_type()));
        resp
    }
}

/// The error label a response carries, for the metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorType(pub &'static str);

/// Longest `grpc-message` sent, in bytes before percent-encoding.
pub const GRPC_MESSAGE_MAX: usize = 1024;

/// An error message cut to [`GRPC_MESSAGE_MAX`] bytes (at a character
/// boundary). Messages echo what the client sent (a model name, a role), and
/// `grpc-message` travels percent-encoded in a trailer: a 20 KB model name
/// made a trailer larger than clients accept, so they saw INTERNAL instead of
/// NOT_FOUND (found by `tests/it/fuzz.rs`).
pub fn grpc_message(mut message: String) -> String {
    if message.len() > GRPC_MESSAGE_MAX {
        let mut end = GRPC_MESSAGE_MAX - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        if let ApiError::Internal(detail) = &e {
            tracing::error!(detail = %detail, "internal error");
        }
        let mut status = tonic::Status::new(e.grpc_code(), grpc_message(e.to_string()));
        if let Some(wait) = e.retry_after() {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", v);
            }
        }
        status
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Overloaded {
                reason,
                retry_after,
            } => ApiError::Overloaded {
                message: format!("the server is overloaded ({reason}); retry later"),
                retry_after,
            },
            SubmitError::ContextLength { message } => ApiError::ContextLength {
                message,
                param: None,
            },
            SubmitError::Invalid { param, message } => ApiError::BadRequest {
                message,
                param: Some(param),
            },
            SubmitError::Unavailable => {
                ApiError::Unavailable("the model is not accepting requests".into())
            }
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Invalid { param, message } => ApiError::BadRequest {
                message,
                param: Some(param),
            },
            ValidationError::ContextLength { param, message } => ApiError::ContextLength {
                message,
                param: Some(param),
            },
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::ModelNotFound(m) => ApiError::ModelNotFound(m),
            e @ RouteError::VersionNotServed { .. } => ApiError::NotFound(e.to_string()),
            e @ RouteError::PinningDisabled => ApiError::BadRequest {
                message: e.to_string(),
                param: Some("model".into()),
            },
        }
    }
}

impl From<QuotaError> for ApiError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::RateLimited {
                message,
                retry_after,
            } => ApiError::RateLimited {
                message,
                retry_after,
            },
            QuotaError::NeverFits { message } => ApiError::BadRequest {
                message,
                param: Some("max_tokens".into()),
            },
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Route(e) => e.into(),
            InferError::Validation(e) => e.into(),
            InferError::Quota(e) => e.into(),
            InferError::Submit(e) => e.into(),
            InferError::Aborted(m) => ApiError::Unavailable(m),
            InferError::Engine(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::embed::EmbedError> for ApiError {
    fn from(e: crate::embed::EmbedError) -> Self {
        match e {
            crate::embed::EmbedError::Infer(e) => e.into(),
            crate::embed::EmbedError::DeadlinePassed => ApiError::DeadlineExceeded(
                "the request's deadline passed before it finished (see x-request-timeout)".into(),
            ),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid { param, message } => ApiError::BadRequest {
                message,
                param: Some(param),
            },
            ControlError::NotFound(m) => ApiError::NotFound(m),
            ControlError::Conflict(m) => ApiError::Conflict(m),
            ControlError::Forbidden(m) => ApiError::Forbidden(m),
            ControlError::Unavailable(m) => ApiError::Unavailable(m),
            ControlError::Storage(m) => ApiError::InsufficientStorage(m),
            ControlError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        ApiError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// What a client sees of one error: HTTP status, OpenAI `type`, `code`
    /// and `param`, gRPC code, metric label, Retry-After seconds.
    type Seen = (
        u16,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        Code,
        &'static str,
        Option<&'static str>,
    );

    /// A case's name, how to make its error, and what the client sees.
    type Case = (&'static str, fn() -> ApiError, Seen);

    /// Every layer's errors through `From`, and the ones only the front ends
    /// raise, with what the client must see.
    #[rustfmt::skip] // one row a case
    const CASES: &[Case] = &[
        ("validation: invalid", || ValidationError::invalid("top_p", "top_p: must be in (0, 1]").into(),
            (400, "invalid_request_error", None, Some("top_p"), Code::InvalidArgument, "invalid_request", None)),
        ("validation: context", || ValidationError::ContextLength { param: "messages".into(), message: "too long".into() }.into(),
            (400, "invalid_request_error", Some("context_length_exceeded"), Some("messages"), Code::InvalidArgument, "context_length_exceeded", None)),
        ("submit: overloaded", || SubmitError::Overloaded { reason: "queue full".into(), retry_after: Duration::from_millis(1500) }.into(),
            (429, "rate_limit_error", Some("server_overloaded"), None, Code::ResourceExhausted, "overloaded", Some("2"))),
        ("submit: context", || SubmitError::ContextLength { message: "too long".into() }.into(),
            (400, "invalid_request_error", Some("context_length_exceeded"), None, Code::InvalidArgument, "context_length_exceeded", None)),
        ("submit: invalid", || SubmitError::Invalid { param: "max_tokens".into(), message: "max_tokens must be at least 1".into() }.into(),
            (400, "invalid_request_error", None, Some("max_tokens"), Code::InvalidArgument, "invalid_request", None)),
        ("submit: unavailable", || SubmitError::Unavailable.into(),
            (503, "server_error", None, None, Code::Unavailable, "unavailable", None)),
        ("route: no model", || RouteError::ModelNotFound("nope".into()).into(),
            (404, "invalid_request_error", Some("model_not_found"), Some("model"), Code::NotFound, "model_not_found", None)),
        ("route: version not served", || RouteError::VersionNotServed { model: "m".into(), version: "v9".into() }.into(),
            (404, "invalid_request_error", None, None, Code::NotFound, "not_found", None)),
        ("route: pinning disabled", || RouteError::PinningDisabled.into(),
            (400, "invalid_request_error", None, Some("model"), Code::InvalidArgument, "invalid_request", None)),
        ("quota: rate limited", || QuotaError::RateLimited { message: "slow down".into(), retry_after: Duration::from_millis(10) }.into(),
            (429, "rate_limit_error", Some("rate_limit_exceeded"), None, Code::ResourceExhausted, "rate_limited", Some("1"))),
        ("quota: never fits", || QuotaError::NeverFits { message: "over a minute of tokens".into() }.into(),
            (400, "invalid_request_error", None, Some("max_tokens"), Code::InvalidArgument, "invalid_request", None)),
        ("infer: aborted", || InferError::Aborted("shutting down".into()).into(),
            (503, "server_error", None, None, Code::Unavailable, "unavailable", None)),
        ("infer: engine failure", || InferError::Engine("secret detail".into()).into(),
            (500, "server_error", None, None, Code::Internal, "internal", None)),
        ("infer: wraps validation", || InferError::Validation(ValidationError::invalid("n", "n must be between 1 and 16, got 0")).into(),
            (400, "invalid_request_error", None, Some("n"), Code::InvalidArgument, "invalid_request", None)),
        ("control: invalid", || ControlError::Invalid { param: "weight".into(), message: "weight is 2".into() }.into(),
            (400, "invalid_request_error", None, Some("weight"), Code::InvalidArgument, "invalid_request", None)),
        ("control: not found", || ControlError::NotFound("no version v9".into()).into(),
            (404, "invalid_request_error", None, None, Code::NotFound, "not_found", None)),
        ("control: conflict", || ControlError::Conflict("exists".into()).into(),
            (409, "invalid_request_error", None, None, Code::AlreadyExists, "conflict", None)),
        ("control: forbidden", || ControlError::Forbidden("command hooks come from llmops.toml only".into()).into(),
            (403, "permission_error", None, None, Code::PermissionDenied, "permission_denied", None)),
        ("control: unavailable", || ControlError::Unavailable("load failed".into()).into(),
            (503, "server_error", None, None, Code::Unavailable, "unavailable", None)),
        ("control: storage", || ControlError::Storage("the registry log could not be written: File too large".into()).into(),
            (507, "server_error", Some("insufficient_storage"), None, Code::ResourceExhausted, "insufficient_storage", None)),
        ("control: internal", || ControlError::Internal("secret detail".into()).into(),
            (500, "server_error", None, None, Code::Internal, "internal", None)),
        ("no key", || ApiError::Unauthenticated("missing API key".into()),
            (401, "authentication_error", Some("invalid_api_key"), None, Code::Unauthenticated, "unauthenticated", None)),
        ("role too low", || ApiError::Forbidden("admin role required".into()),
            (403, "permission_error", None, None, Code::PermissionDenied, "permission_denied", None)),
        ("body too large", || ApiError::PayloadTooLarge("over 4 MiB".into()),
            (413, "invalid_request_error", None, None, Code::InvalidArgument, "payload_too_large", None)),
        ("method not allowed", || ApiError::MethodNotAllowed("POST only".into()),
            (405, "invalid_request_error", None, None, Code::Unimplemented, "method_not_allowed", None)),
        ("not JSON", || ApiError::UnsupportedMediaType("send application/json".into()),
            (415, "invalid_request_error", None, None, Code::InvalidArgument, "unsupported_media_type", None)),
        ("body stalled", || ApiError::RequestTimeout("no body for 30 s".into()),
            (408, "invalid_request_error", None, None, Code::DeadlineExceeded, "request_timeout", None)),
        ("deadline", || ApiError::DeadlineExceeded("the request timed out".into()),
            (504, "server_error", None, None, Code::DeadlineExceeded, "deadline_exceeded", None)),
        ("client left", || ApiError::Cancelled,
            (499, "server_error", None, None, Code::Cancelled, "cancelled", None)),
    ];

    #[test]
    fn every_error_maps_to_its_status_type_code_and_label() {
        for (case, make, want) in CASES {
            let (status, kind, code, param, grpc, label, retry) = *want;
            let e = make();
            let body = e.body();
            let err = &body["error"];
            assert_eq!(e.status().as_u16(), status, "{case}: status");
            assert_eq!(err["type"], kind, "{case}: type");
            assert_eq!(err["code"].as_str(), code, "{case}: code");
            assert_eq!(err["param"].as_str(), param, "{case}: param");
            assert_eq!(e.grpc_code(), grpc, "{case}: gRPC code");
            assert_eq!(e.error_type(), label, "{case}: label");
            let message = err["message"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "{case}: message");
            assert!(!message.contains("secret"), "{case}: `{message}` leaks");

            let resp = e.clone().into_response();
            assert_eq!(resp.status().as_u16(), status, "{case}: response status");
            let header = |r: &Response| {
                r.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            assert_eq!(header(&resp).as_deref(), retry, "{case}: Retry-After");
            let tagged = resp.extensions().get::<ErrorType>().map(|t| t.0);
            assert_eq!(tagged, Some(label), "{case}: response label");

            let s = tonic::Status::from(e);
            assert_eq!(s.code(), grpc, "{case}: status code");
            assert!(!s.message().contains("secret"), "{case}: gRPC leaks");
            let meta = s
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok());
            assert_eq!(meta, retry, "{case}: gRPC retry-after");
        }
    }

    #[test]
    fn a_length_error_keeps_its_message_through_both_layers() {
        let e = crate::scheduler::LengthError::ZeroMaxTokens;
        let via_validation = ApiError::from(ValidationError::from(e.clone()));
        let via_submit = ApiError::from(SubmitError::from(e.clone()));
        assert_eq!(via_validation.to_string(), e.to_string());
        assert_eq!(via_submit.to_string(), e.to_string());
        assert_eq!(via_validation.body(), via_submit.body());
    }
}
