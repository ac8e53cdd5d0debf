//! The admin API over HTTP (`/admin/v1/…`), admin role only: registry,
//! loading, aliases (hot swap), rollouts, shadows, hooks, capture, what is
//! serving, the audit log.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
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
        // Runs after the role check: what a web page could have sent.
        .route_layer(axum::middleware::from_fn(super::browser::guard))
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

/// The caller of an admin route and the controller it acts on. Taking it
/// never fails: a handler meets "the registry is not enabled" only when it
/// asks for [`Admin::ops`], after its path, query and body were read, so
/// their errors come first.
struct Admin {
    /// The key the authentication layer found.
    principal: Arc<Principal>,
    /// The server's controller; `None` without a registry.
    ops: Option<Arc<Controller>>,
}

impl Admin {
    /// The controller, for an admin key; 503 when the server runs without
    /// a registry.
    fn ops(&self) -> Result<Arc<Controller>, ApiError> {
        self.principal.require_admin()?;
        self.ops.clone().ok_or_else(|| {
            ApiError::Unavailable("the registry is not enabled on this server".into())
        })
    }

    /// For a `PUT` of settings plus an optional `reason`: the controller
    /// (so 503 comes first, as on every route), the actor with the body's
    /// reason, and the settings, parsed naming the offending field.
    fn settings<T: serde::de::DeserializeOwned>(
        &self,
        mut body: Value,
    ) -> Result<(Arc<Controller>, Actor, T), ApiError> {
        let reason = body
            .as_object_mut()
            .and_then(|o| o.remove("reason"))
            .and_then(|r| r.as_str().map(str::to_string));
        let (ops, actor) = self.change(reason)?;
        let settings = serde_path_to_error::deserialize(body)
            .map_err(|e| ApiError::invalid(&e.path().to_string(), e.inner().to_string()))?;
        Ok((ops, actor, settings))
    }

    /// For a change: the controller (503 without a registry) and who makes
    /// the change, and why, for the audit log.
    fn change(&self, reason: Option<String>) -> Result<(Arc<Controller>, Actor), ApiError> {
        let ops = self.ops()?;
        let actor = Actor {
            key_id: self.principal.key_id.clone(),
            reason,
        };
        Ok((ops, actor))
    }
}

impl FromRequestParts<HttpState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &HttpState) -> Result<Self, ApiError> {
        let principal = parts
            .extensions
            .get::<Arc<Principal>>()
            .cloned()
            .ok_or_else(|| {
                ApiError::Internal("an admin route ran without authentication".into())
            })?;
        Ok(Admin {
            principal,
            ops: st.ops.clone(),
        })
    }
}

/// The operator's `?reason=…`; a malformed query is a 400 naming `query`.
struct Reason(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Reason {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, ApiError> {
        let q = query(Query::<ReasonQuery>::from_request_parts(parts, st).await)?;
        Ok(Reason(q.reason))
    }
}

async fn serving(admin: Admin) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.serving().await))
}

async fn list_models(admin: Admin) -> Result<Json<Value>, ApiError> {
    let state = admin.ops()?.state().await;
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|(name, m)| json!({"model": name, "versions": m.order, "aliases": m.aliases}))
        .collect();
    Ok(Json(json!({"models": models})))
}

async fn get_model(admin: Admin, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    let state = admin.ops()?.state().await;
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

async fn list_versions(admin: Admin, model: Path<String>) -> Result<Json<Value>, ApiError> {
    get_model(admin, model).await
}

async fn get_version(
    admin: Admin,
    Path((model, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let state = admin.ops()?.state().await;
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
    admin: Admin,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<WithReason<Register>>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let (ops, actor) = admin.change(body.reason)?;
    let rec = ops.register(&actor, &model, body.body).await?;
    Ok((axum::http::StatusCode::CREATED, Json(json!(rec))))
}

async fn load(
    admin: Admin,
    Path((model, version)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(body.and_then(|b| b.reason))?;
    ops.load(&actor, &model, &version).await?;
    Ok(Json(
        json!({"model": model, "version": version, "loaded": true}),
    ))
}

async fn unload(
    admin: Admin,
    Path((model, version)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(body.and_then(|b| b.reason))?;
    ops.unload(&actor, &model, &version, Duration::from_secs(30))
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
    admin: Admin,
    Path((model, alias)): Path<(String, String)>,
    JsonBody(body): JsonBody<AliasBody>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(body.reason)?;
    ops.set_alias(&actor, &model, &alias, Some(&body.version))
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
    admin: Admin,
    Path((model, alias)): Path<(String, String)>,
    Reason(reason): Reason,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    ops.set_alias(&actor, &model, &alias, None).await?;
    Ok(Json(
        json!({"model": model, "alias": alias, "removed": true}),
    ))
}

#[derive(Deserialize)]
struct AuditQuery {
    /// Entries after this sequence number; absent: the newest `limit`.
    #[serde(default)]
    after: Option<u64>,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

async fn audit(
    admin: Admin,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let entries = admin.ops()?.audit(q.after, q.limit.min(10_000)).await;
    Ok(Json(json!({"entries": entries})))
}

#[derive(Deserialize, Default)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn start_rollout(
    admin: Admin,
    JsonBody(body): JsonBody<WithReason<RolloutSpec>>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(body.reason)?;
    let status = ops.start_rollout(&actor, body.body).await?;
    Ok(Json(json!(status)))
}

async fn list_rollouts(admin: Admin) -> Result<Json<Value>, ApiError> {
    let all = admin.ops()?.rollouts().await;
    Ok(Json(json!({"rollouts": all})))
}

async fn get_rollout(admin: Admin, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(admin.ops()?.rollout(&id).await?)))
}

async fn command_rollout(
    admin: Admin,
    Path((id, action)): Path<(String, String)>,
    Reason(reason): Reason,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    let command: Command = action.parse()?;
    let status = ops.command_rollout(&actor, &id, command).await?;
    Ok(Json(json!(status)))
}

/// `PUT /admin/v1/models/{model}/shadow`: the shadow's settings
/// (`ShadowSpec`) plus an optional `reason`.
async fn set_shadow(
    admin: Admin,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor, spec) = admin.settings(body)?;
    Ok(Json(ops.set_shadow(&actor, &model, spec).await?))
}

async fn get_shadow(admin: Admin, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.shadow(&model)?))
}

async fn clear_shadow(
    admin: Admin,
    Path(model): Path<String>,
    Reason(reason): Reason,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    ops.clear_shadow(&actor, &model).await?;
    Ok(Json(json!({"model": model, "shadow": null})))
}

async fn shadow_samples(admin: Admin, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    let samples = admin.ops()?.shadow_samples(&model)?;
    Ok(Json(json!({"model": model, "samples": samples})))
}

/// `PUT /admin/v1/models/{model}/capture`: turn capture on or change its
/// settings (`CaptureSpec`) plus an optional `reason`.
async fn set_capture(
    admin: Admin,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor, spec) = admin.settings(body)?;
    Ok(Json(ops.set_capture(&actor, &model, spec).await?))
}

async fn get_capture(admin: Admin, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.capture(&model)?))
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
    admin: Admin,
    Path(model): Path<String>,
    q: Result<Query<ClearCaptureQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let (ops, actor) = admin.change(q.reason)?;
    let out = ops.clear_capture(&actor, &model, q.purge).await?;
    Ok(Json(out))
}

/// `GET /admin/v1/models/{model}/capture/export`: every captured record,
/// oldest first, as the JSONL `llmops train` reads, streamed a segment at
/// a time.
async fn export_capture(
    admin: Admin,
    Path(model): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    let dir = admin.ops()?.capture_export(&model)?;
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

async fn list_hooks(admin: Admin) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.list_hooks()))
}

async fn get_hook(admin: Admin, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.hook(&name)?))
}

/// `PUT /admin/v1/hooks/{name}`: a hook's settings (`HookSpec`) plus an
/// optional `reason`. The answer never holds the secret.
async fn set_hook(
    admin: Admin,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor, spec) = admin.settings(body)?;
    Ok(Json(ops.set_hook(&actor, &name, spec).await?))
}

async fn delete_hook(
    admin: Admin,
    Path(name): Path<String>,
    Reason(reason): Reason,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    ops.delete_hook(&actor, &name).await?;
    Ok(Json(json!({"hook": name, "removed": true})))
}

/// `POST /admin/v1/models/{model}/retrain`: fine-tune the stable version
/// (`RetrainSpec` plus an optional `reason`); 202 with the job's status,
/// 409 while another retrain of the model runs.
async fn start_retrain(
    admin: Admin,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let (ops, actor, spec) = admin.settings(body)?;
    let h = crate::control::retrain::start(&ops, &actor, &model, spec).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(h.status())))
}

/// `GET /admin/v1/models/{model}/retrain`: the latest retrain's progress
/// and, once it ended, its outcome.
async fn get_retrain(admin: Admin, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.retrain(&model)?.status()))
}

/// `DELETE /admin/v1/models/{model}/retrain`: cancels the running retrain.
async fn cancel_retrain(
    admin: Admin,
    Path(model): Path<String>,
    Reason(reason): Reason,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    let h = ops.cancel_retrain(&actor, &model)?;
    Ok(Json(h.status()))
}

async fn get_drift(admin: Admin, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.drift_status(&model).await?))
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
    admin: Admin,
    Path(model): Path<String>,
    JsonBody(body): JsonBody<DriftBody>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(body.reason)?;
    Ok(Json(
        ops.set_drift_config(&model, body.settings, &actor).await?,
    ))
}

/// `DELETE …/drift`: drops the overrides set here; the file's apply.
async fn clear_drift(
    admin: Admin,
    Path(model): Path<String>,
    Reason(reason): Reason,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    Ok(Json(ops.clear_drift_config(&model, &actor).await?))
}

async fn reset_drift(
    admin: Admin,
    Path((model, version)): Path<(String, String)>,
    OptionalJsonBody(body): OptionalJsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(body.and_then(|b| b.reason))?;
    Ok(Json(
        ops.reset_drift_reference(&model, &version, &actor).await?,
    ))
}

/// `GET /admin/v1/autopilot`: the loop's settings and what each model's
/// running loop is doing.
async fn get_autopilot(admin: Admin) -> Result<Json<Value>, ApiError> {
    Ok(Json(admin.ops()?.autopilot_status()))
}

/// `PUT /admin/v1/autopilot`: replaces the loop's settings (the keys of
/// `[autopilot]`) plus an optional `reason`; audited, kept across restarts
/// until cleared.
async fn set_autopilot(
    admin: Admin,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let (ops, actor, settings) = admin.settings(body)?;
    Ok(Json(ops.set_autopilot(&actor, settings).await?))
}

/// `DELETE /admin/v1/autopilot`: `[autopilot]` from the file applies again.
async fn clear_autopilot(admin: Admin, Reason(reason): Reason) -> Result<Json<Value>, ApiError> {
    let (ops, actor) = admin.change(reason)?;
    Ok(Json(ops.clear_autopilot(&actor).await?))
}
