//! The admin API (`/admin/v1/…`), admin role only.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json};

use super::auth::Principal;
use super::error::ApiError;
use super::http::HttpState;

/// Admin routes, mounted behind authentication.
pub fn routes() -> axum::Router<HttpState> {
    axum::Router::new().route("/admin/v1/serving", get(serving))
}

/// What serves each model name now.
async fn serving(State(st): State<HttpState>, Extension(p): Extension<Arc<Principal>>) -> Result<Json<serde_json::Value>, ApiError> {
    p.require_admin()?;
    let table = st.router.snapshot();
    let models: Vec<serde_json::Value> = table
        .models
        .values()
        .map(|d| {
            serde_json::json!({
                "model": d.model,
                "stable": {"version": d.stable.version, "ready": d.stable.engine.is_ready(), "source": d.stable.engine.info().source},
            })
        })
        .collect();
    Ok(Json(serde_json::json!({"models": models})))
}
