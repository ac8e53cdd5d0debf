//! `POST /v1/embeddings`: mean-pooled, L2-normalised final hidden states of
//! any served model, in OpenAI's shape (`encoding_format` float or base64,
//! `dimensions` by truncation). The work is [`crate::embed`]'s.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::{HttpState, JsonBody, RequestId, deadline};
use crate::api::auth::Principal;
use crate::api::error::ApiError;
use crate::api::openai::Prompt;
use crate::embed::{self, EmbedSpec};
use crate::monitor::Protocol;
use crate::validation::Input;

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// Model name.
    pub model: String,
    /// A string, strings, a token array or token arrays.
    pub input: Prompt,
    /// `float` (default) or `base64`.
    pub encoding_format: Option<String>,
    /// Keep this many leading dimensions (re-normalised).
    pub dimensions: Option<u64>,
    /// End-user id (a canary route key, as for completions).
    pub user: Option<String>,
}

/// One embedding: a list of floats or their base64 bytes.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Vector {
    /// `encoding_format: "float"`.
    Float(Vec<f32>),
    /// `encoding_format: "base64"`: little-endian f32 bytes.
    Base64(String),
}

/// One row of the answer.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingRow {
    /// Always `embedding`.
    pub object: &'static str,
    /// The input's position.
    pub index: usize,
    /// The vector.
    pub embedding: Vector,
}

/// Usage of an embeddings request.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingUsage {
    /// Tokens of every input.
    pub prompt_tokens: usize,
    /// The same (nothing is generated).
    pub total_tokens: usize,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingList {
    /// Always `list`.
    pub object: &'static str,
    /// One row per input, in input order.
    pub data: Vec<EmbeddingRow>,
    /// The model as asked.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingUsage,
}

/// The inputs of a wire `input`.
pub fn inputs(input: Prompt) -> Vec<Input> {
    match input {
        Prompt::Text(t) => vec![Input::Text(t)],
        Prompt::Texts(ts) => ts.into_iter().map(Input::Text).collect(),
        Prompt::Tokens(ids) => vec![Input::Tokens(ids)],
        Prompt::TokenLists(ls) => ls.into_iter().map(Input::Tokens).collect(),
    }
}

/// Handles `POST /v1/embeddings`.
pub async fn create(
    State(st): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format is `{other}`; use `float` or `base64`"),
            ));
        }
    };
    let dimensions = req
        .dimensions
        .map(|d| usize::try_from(d).unwrap_or(usize::MAX));
    let key = super::route_key(&headers, req.user.as_deref(), &principal, &rid);
    let picked = st.router.pick(&req.model, &key)?;
    let spec = EmbedSpec {
        inputs: inputs(req.input),
        dimensions,
        deadline: Some(deadline(&headers, &st.limits, arrival)?),
        arrival,
        protocol: Protocol::Http,
    };
    let out = embed::embed(&picked, spec, &st.limits, &principal.quota).await?;
    tracing::info!(
        request_id = %rid.0,
        model = %req.model,
        version = %picked.target.version,
        inputs = out.vectors.len(),
        prompt_tokens = out.prompt_tokens,
        elapsed_ms = arrival.elapsed().as_millis() as u64,
        "embeddings answered"
    );
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingRow {
            object: "embedding",
            index,
            embedding: if base64 {
                Vector::Base64(embed::to_base64(&v))
            } else {
                Vector::Float(v)
            },
        })
        .collect();
    Ok(Json(EmbeddingList {
        object: "list",
        data,
        model: req.model,
        usage: EmbeddingUsage {
            prompt_tokens: out.prompt_tokens,
            total_tokens: out.prompt_tokens,
        },
    })
    .into_response())
}
