//! The admin API over HTTP (`/admin/v1/…`), admin role only: registry,
//! loading, aliases (hot swap), rollouts, shadows, hooks, capture, what is
//! serving, the audit log.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::{get, post, put};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Principal;
use super::error::ApiError;
use super::http::{HttpState, JsonBody, OptionalJsonBody};
use crate::control::rollout::{Command, RolloutSpec};
use crate::control::{Actor, Controller, Register};

/// Admin routes, mounted behind authentication. The role is checked before
/// any handler runs, so a caller without it never gets a body read.
pub fn routes() -> axum::Router<HttpState> {
    axum::Router::new()
        .route("/admin/v1/serving", get(serving))
        .route("/admin/v1/models", get(list_models))
        .route("/admin/v1/models/{model}", get(get_model))
        .route(
            "/admin/v1/models/{model}/versions",
            post(register).get(list_versions),
        )
        .route(
            "/admin/v1/models/{model}/versions/{version}",
            get(get_version),
        )
        .route(
            "/admin/v1/models/{model}/versions/{version}/load",
            post(load),
        )
        .route(
            "/admin/v1/models/{model}/versions/{version}/unload",
            post(unload),
        )
        .route(
            "/admin/v1/models/{model}/aliases/{alias}",
            put(set_alias).delete(delete_alias),
        )
        .route(
            "/admin/v1/models/{model}/shadow",
            put(set_shadow).get(get_shadow).delete(clear_shadow),
        )
        .route(
            "/admin/v1/models/{model}/shadow/samples",
            get(shadow_samples),
        )
        .route(
            "/admin/v1/models/{model}/capture",
            put(set_capture).get(get_capture).delete(clear_capture),
        )
        .route(
            "/admin/v1/models/{model}/capture/export",
            get(export_capture),
        )
        .route(
            "/admin/v1/models/{model}/retrain",
            post(start_retrain).get(get_retrain).delete(cancel_retrain),
        )
        .route("/admin/v1/hooks", get(list_hooks))
        .route(
            "/admin/v1/hooks/{name}",
            put(set_hook).get(get_hook).delete(delete_hook),
        )
        .route(
            "/admin/v1/models/{model}/drift",
            get(get_drift).put(set_drift).delete(clear_drift),
        )
        .route(
            "/admin/v1/models/{model}/versions/{version}/drift/reset",
            post(reset_drift),
        )
        .route(
            "/admin/v1/autopilot",
            get(get_autopilot)
                .put(set_autopilot)
                .delete(clear_autopilot),
        )
        .route("/admin/v1/audit", get(audit))
        .route("/admin/v1/rollouts", post(start_rollout).get(list_rollouts))
        .route("/admin/v1/rollouts/{id}", get(get_rollout))
        .route("/admin/v1/rollouts/{id}/{action}", post(command_rollout))
        .route_layer(axum::middleware::from_fn(admins_only))
}

/// Refuses every key without the admin role before the body is read.
async fn admins_only(
    Extension(p): Extension<Arc<Principal>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match p.require_admin() {
        Ok(()) => next.run(req).await,
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

fn ops(st: &HttpState, p: &Principal) -> Result<Arc<Controller>, ApiError> {
    p.require_admin()?;
    st.ops
        .clone()
        .ok_or_else(|| ApiError::Unavailable("the registry is not enabled on this server".into()))
}

fn actor(p: &Principal, reason: Option<String>) -> Actor {
    Actor {
        key_id: p.key_id.clone(),
        reason,
    }
}

async fn serving(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.serving().await))
}

async fn list_models(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Result<Json<Value>, ApiError> {
    let state = ops(&st, &p)?.state().await;
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|(name, m)| json!({"model": name, "versions": m.order, "aliases": m.aliases}))
        .collect();
    Ok(Json(json!({"models": models})))
}

async fn get_model(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let state = ops(&st, &p)?.state().await;
    let m = state
        .models
        .get(&model)
        .ok_or_else(|| ApiError::NotFound(format!("no model `{model}` is registered")))?;
    let versions: Vec<&crate::registry::VersionRecord> =
        m.order.iter().filter_map(|v| m.versions.get(v)).collect();
    Ok(Json(
        json!({"model": model, "versions": versions, "aliases": m.aliases}),
    ))
}

async fn list_versions(
    st: State<HttpState>,
    p: Extension<Arc<Principal>>,
    model: Path<String>,
) -> Result<Json<Value>, ApiError> {
    get_model(st, p, model).await
}

async fn get_version(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let state = ops(&st, &p)?.state().await;
    let v = state
        .version(&model, &version)
        .ok_or_else(|| ApiError::NotFound(format!("model `{model}` has no version `{version}`")))?;
    Ok(Json(json!(v)))
}

/// An admin request body with the operator's reason beside it.
#[derive(Deserialize)]
struct WithReason<T> {
    #[serde(flatten)]
    body: T,
    #[serde(default)]
    reason: Option<String>,
}

async fn register(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<WithReason<Register>>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let ops = ops(&st, &p)?;
    let rec = ops
        .register(&actor(&p, body.reason), &model, body.body)
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(json!(rec))))
}

async fn load(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((model, version)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    ops.load(&actor(&p, body.and_then(|b| b.reason)), &model, &version)
        .await?;
    Ok(Json(
        json!({"model": model, "version": version, "loaded": true}),
    ))
}

async fn unload(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((model, version)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    ops.unload(
        &actor(&p, body.and_then(|b| b.reason)),
        &model,
        &version,
        Duration::from_secs(30),
    )
    .await?;
    Ok(Json(
        json!({"model": model, "version": version, "loaded": false}),
    ))
}

#[derive(Deserialize)]
struct AliasBody {
    version: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn set_alias(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((model, alias)): Path<(String, String)>,
    JsonBody(body): JsonBody<AliasBody>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    ops.set_alias(&actor(&p, body.reason), &model, &alias, Some(&body.version))
        .await?;
    Ok(Json(
        json!({"model": model, "alias": alias, "version": body.version}),
    ))
}

#[derive(Deserialize)]
struct ReasonQuery {
    #[serde(default)]
    reason: Option<String>,
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

async fn delete_alias(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((model, alias)): Path<(String, String)>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let ops = ops(&st, &p)?;
    ops.set_alias(&actor(&p, q.reason), &model, &alias, None)
        .await?;
    Ok(Json(
        json!({"model": model, "alias": alias, "removed": true}),
    ))
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

async fn audit(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let entries = ops(&st, &p)?.audit(q.after, q.limit.min(10_000)).await;
    Ok(Json(json!({"entries": entries})))
}

#[derive(Deserialize, Default)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn start_rollout(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    JsonBody(body): JsonBody<WithReason<RolloutSpec>>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    let status = ops
        .start_rollout(&actor(&p, body.reason), body.body)
        .await?;
    Ok(Json(json!(status)))
}

async fn list_rollouts(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Result<Json<Value>, ApiError> {
    let all = ops(&st, &p)?.rollouts().await;
    Ok(Json(json!({"rollouts": all})))
}

async fn get_rollout(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(ops(&st, &p)?.rollout(&id).await?)))
}

async fn command_rollout(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((id, action)): Path<(String, String)>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let ops = ops(&st, &p)?;
    let command: Command = action.parse()?;
    let status = ops
        .command_rollout(&actor(&p, q.reason), &id, command)
        .await?;
    Ok(Json(json!(status)))
}

/// `PUT /admin/v1/models/{model}/shadow`: the shadow's settings
/// (`ShadowSpec`) plus an optional `reason`.
async fn set_shadow(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    JsonBody(mut body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    let reason = body
        .as_object_mut()
        .and_then(|o| o.remove("reason"))
        .and_then(|r| r.as_str().map(str::to_string));
    let spec: crate::shadow::ShadowSpec = serde_path_to_error::deserialize(body)
        .map_err(|e| ApiError::invalid(&e.path().to_string(), e.inner().to_string()))?;
    Ok(Json(
        ops.set_shadow(&actor(&p, reason), &model, spec).await?,
    ))
}

async fn get_shadow(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.shadow(&model)?))
}

async fn clear_shadow(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    ops(&st, &p)?
        .clear_shadow(&actor(&p, q.reason), &model)
        .await?;
    Ok(Json(json!({"model": model, "shadow": null})))
}

async fn shadow_samples(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let samples = ops(&st, &p)?.shadow_samples(&model)?;
    Ok(Json(json!({"model": model, "samples": samples})))
}

/// Takes the operator's `reason` out of a JSON body.
fn take_reason(body: &mut Value) -> Option<String> {
    body.as_object_mut()
        .and_then(|o| o.remove("reason"))
        .and_then(|r| r.as_str().map(str::to_string))
}

/// Parses a settings body, naming the offending field.
fn settings<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body)
        .map_err(|e| ApiError::invalid(&e.path().to_string(), e.inner().to_string()))
}

/// `PUT /admin/v1/models/{model}/capture`: turn capture on or change its
/// settings (`CaptureSpec`) plus an optional `reason`.
async fn set_capture(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    JsonBody(mut body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    let reason = take_reason(&mut body);
    let spec: crate::capture::CaptureSpec = settings(body)?;
    Ok(Json(
        ops.set_capture(&actor(&p, reason), &model, spec).await?,
    ))
}

async fn get_capture(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.capture(&model)?))
}

#[derive(Deserialize)]
struct ClearCaptureQuery {
    #[serde(default)]
    reason: Option<String>,
    /// Delete what was captured too.
    #[serde(default)]
    purge: bool,
}

async fn clear_capture(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    q: Result<Query<ClearCaptureQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let out = ops(&st, &p)?
        .clear_capture(&actor(&p, q.reason), &model, q.purge)
        .await?;
    Ok(Json(out))
}

/// `GET /admin/v1/models/{model}/capture/export`: every captured record,
/// oldest first, as the JSONL `llmops train` reads, streamed a segment at
/// a time.
async fn export_capture(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let dir = ops(&st, &p)?.capture_export(&model)?;
    let body = axum::body::Body::from_stream(crate::capture::export(dir));
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .header(
            axum::http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{model}-capture.jsonl\""),
        )
        .body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn list_hooks(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.list_hooks()))
}

async fn get_hook(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.hook(&name)?))
}

/// `PUT /admin/v1/hooks/{name}`: a hook's settings (`HookSpec`) plus an
/// optional `reason`. The answer never holds the secret.
async fn set_hook(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(name): Path<String>,
    JsonBody(mut body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    let reason = take_reason(&mut body);
    let spec: crate::hooks::HookSpec = settings(body)?;
    Ok(Json(ops.set_hook(&actor(&p, reason), &name, spec).await?))
}

async fn delete_hook(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(name): Path<String>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    ops(&st, &p)?
        .delete_hook(&actor(&p, q.reason), &name)
        .await?;
    Ok(Json(json!({"hook": name, "removed": true})))
}

/// `POST /admin/v1/models/{model}/retrain`: fine-tune the stable version
/// (`RetrainSpec` plus an optional `reason`); 202 with the job's status,
/// 409 while another retrain of the model runs.
async fn start_retrain(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    JsonBody(mut body): JsonBody<Value>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let ops = ops(&st, &p)?;
    let reason = take_reason(&mut body);
    let spec: crate::control::retrain::RetrainSpec = settings(body)?;
    let h = crate::control::retrain::start(&ops, &actor(&p, reason), &model, spec).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(h.status())))
}

/// `GET /admin/v1/models/{model}/retrain`: the latest retrain's progress
/// and, once it ended, its outcome.
async fn get_retrain(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.retrain(&model)?.status()))
}

/// `DELETE /admin/v1/models/{model}/retrain`: cancels the running retrain.
async fn cancel_retrain(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let h = ops(&st, &p)?.cancel_retrain(&actor(&p, q.reason), &model)?;
    Ok(Json(h.status()))
}

async fn get_drift(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.drift_status(&model).await?))
}

/// Body of `PUT …/drift`: the model's overrides of `[drift]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriftBody {
    /// Keys of `[drift]` to override (replacing earlier overrides).
    settings: serde_json::Map<String, Value>,
    #[serde(default)]
    reason: Option<String>,
}

async fn set_drift(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<DriftBody>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    let actor = actor(&p, body.reason);
    Ok(Json(
        ops.set_drift_config(&model, body.settings, &actor).await?,
    ))
}

/// `DELETE …/drift`: drops the overrides set here; the file's apply.
async fn clear_drift(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path(model): Path<String>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let ops = ops(&st, &p)?;
    Ok(Json(
        ops.clear_drift_config(&model, &actor(&p, q.reason)).await?,
    ))
}

async fn reset_drift(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    Path((model, version)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let ops = ops(&st, &p)?;
    let actor = actor(&p, body.and_then(|b| b.reason));
    Ok(Json(
        ops.reset_drift_reference(&model, &version, &actor).await?,
    ))
}

/// `GET /admin/v1/autopilot`: the loop's settings and what each model's
/// running loop is doing.
async fn get_autopilot(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops(&st, &p)?.autopilot_status()))
}

/// `PUT /admin/v1/autopilot`: replaces the loop's settings (the keys of
/// `[autopilot]`) plus an optional `reason`; audited, kept across restarts
/// until cleared.
async fn set_autopilot(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    JsonBody(mut body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let reason = take_reason(&mut body);
    let ops = ops(&st, &p)?;
    Ok(Json(ops.set_autopilot(&actor(&p, reason), body).await?))
}

/// `DELETE /admin/v1/autopilot`: `[autopilot]` from the file applies again.
async fn clear_autopilot(
    State(st): State<HttpState>,
    Extension(p): Extension<Arc<Principal>>,
    q: Result<Query<ReasonQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let ops = ops(&st, &p)?;
    Ok(Json(ops.clear_autopilot(&actor(&p, q.reason)).await?))
}
