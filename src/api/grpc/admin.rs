//! `llmops.v1.Admin` over gRPC: the same operations as `/admin/v1`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::api::auth::{Authenticator, Principal};
use crate::api::error::ApiError;
use crate::control::rollout::{Command, OnInconclusive, RolloutSpec, RolloutStatus};
use crate::control::{Actor, Controller, Register};
use crate::monitor::canary::{Analysis, Gate};
use crate::proto as pb;
use crate::registry::VersionRecord;
use crate::router::StickyKey;
use crate::shadow::{Mode, SampleSpec, ShadowSpec};

/// State of the admin service.
#[derive(Clone)]
pub struct AdminService {
    /// Operations.
    pub ops: Arc<Controller>,
    /// Keys.
    pub auth: Authenticator,
}

fn reason(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn version_pb(v: &VersionRecord) -> pb::VersionInfo {
    pb::VersionInfo {
        version: v.version.clone(),
        sha256: v.sha256.clone(),
        source: v.source.clone(),
        format: v.format.clone(),
        architecture: v.architecture.clone(),
        parameters: v.parameters,
        created: v.created.clone(),
        metadata_json: v.metadata.to_string(),
        model_card: v.model_card.clone(),
    }
}

impl AdminService {
    fn admin<T>(&self, req: &Request<T>) -> Result<Arc<Principal>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let p = self.auth.authenticate(header)?;
        p.require_admin()?;
        Ok(p)
    }

    fn actor(p: &Principal, reason: &str) -> Actor {
        Actor {
            key_id: p.key_id.clone(),
            reason: self::reason(reason),
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn register_version(
        &self,
        req: Request<pb::RegisterVersionRequest>,
    ) -> Result<Response<pb::VersionInfo>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        let metadata = if r.metadata_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&r.metadata_json)
                .map_err(|e| ApiError::invalid("metadata_json", e.to_string()))?
        };
        let rec = self
            .ops
            .register(
                &Self::actor(&p, &r.reason),
                &r.model,
                Register {
                    path: r.path,
                    version: (!r.version.is_empty()).then_some(r.version),
                    metadata,
                    model_card: (!r.model_card.is_empty()).then_some(r.model_card),
                },
            )
            .await?;
        Ok(Response::new(version_pb(&rec)))
    }

    async fn list_models(
        &self,
        req: Request<pb::AdminListModelsRequest>,
    ) -> Result<Response<pb::AdminListModelsResponse>, Status> {
        self.admin(&req)?;
        let state = self.ops.state().await;
        let models = state
            .models
            .iter()
            .map(|(name, m)| pb::ModelInfo {
                model: name.clone(),
                versions: m
                    .order
                    .iter()
                    .filter_map(|v| m.versions.get(v))
                    .map(version_pb)
                    .collect(),
                aliases: m.aliases.clone().into_iter().collect(),
            })
            .collect();
        Ok(Response::new(pb::AdminListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        req: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        self.admin(&req)?;
        let name = req.into_inner().model;
        let state = self.ops.state().await;
        let m = state
            .models
            .get(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no model `{name}` is registered")))?;
        Ok(Response::new(pb::ModelInfo {
            model: name.clone(),
            versions: m
                .order
                .iter()
                .filter_map(|v| m.versions.get(v))
                .map(version_pb)
                .collect(),
            aliases: m.aliases.clone().into_iter().collect(),
        }))
    }

    async fn load_version(
        &self,
        req: Request<pb::VersionRef>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        self.ops
            .load(&Self::actor(&p, &r.reason), &r.model, &r.version)
            .await?;
        Ok(Response::new(pb::AdminResponse {
            message: format!("{} {} loaded", r.model, r.version),
        }))
    }

    async fn unload_version(
        &self,
        req: Request<pb::VersionRef>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        self.ops
            .unload(
                &Self::actor(&p, &r.reason),
                &r.model,
                &r.version,
                Duration::from_secs(30),
            )
            .await?;
        Ok(Response::new(pb::AdminResponse {
            message: format!("{} {} unloaded", r.model, r.version),
        }))
    }

    async fn set_alias(
        &self,
        req: Request<pb::SetAliasRequest>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        let version = (!r.version.is_empty()).then_some(r.version.as_str());
        self.ops
            .set_alias(&Self::actor(&p, &r.reason), &r.model, &r.alias, version)
            .await?;
        Ok(Response::new(pb::AdminResponse {
            message: match version {
                Some(v) => format!("{} {} → {v}", r.model, r.alias),
                None => format!("{} {} removed", r.model, r.alias),
            },
        }))
    }

    async fn serving(
        &self,
        req: Request<pb::ServingRequest>,
    ) -> Result<Response<pb::ServingResponse>, Status> {
        self.admin(&req)?;
        Ok(Response::new(pb::ServingResponse {
            json: self.ops.serving().await.to_string(),
        }))
    }

    async fn read_audit(
        &self,
        req: Request<pb::ReadAuditRequest>,
    ) -> Result<Response<pb::ReadAuditResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
        let entries = self.ops.audit(r.after, limit.min(10_000)).await;
        Ok(Response::new(pb::ReadAuditResponse {
            entries_json: entries
                .iter()
                .filter_map(|e| serde_json::to_string(e).ok())
                .collect(),
        }))
    }

    async fn start_rollout(
        &self,
        req: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        let mut analysis = Analysis::default();
        if !r.gates.is_empty() {
            analysis.gates = r
                .gates
                .iter()
                .map(|g| g.parse::<Gate>())
                .collect::<Result<_, _>>()
                .map_err(|e| ApiError::invalid("gates", e.to_string()))?;
        }
        if let Some(m) = r.min_samples {
            analysis.min_samples = m as usize;
        }
        let on_inconclusive = match r.on_inconclusive.as_str() {
            "" | "hold" => OnInconclusive::Hold,
            "rollback" => OnInconclusive::Rollback,
            other => {
                return Err(ApiError::invalid(
                    "on_inconclusive",
                    format!("`{other}` is not hold or rollback"),
                )
                .into());
            }
        };
        let spec = RolloutSpec {
            model: r.model,
            candidate: r.candidate,
            steps: if r.steps.is_empty() {
                vec![5, 25, 50, 100]
            } else {
                r.steps
            },
            interval_secs: r.interval_seconds.unwrap_or(30.0),
            warmup_secs: r.warmup_seconds,
            analysis,
            failure_limit: r.failure_limit.unwrap_or(2),
            successes_per_step: r.successes_per_step.unwrap_or(1),
            on_inconclusive,
            dry_run: r.dry_run,
            sticky_key: match r.sticky_key.as_str() {
                "" | "session" => StickyKey::Session,
                "user" => StickyKey::User,
                "api_key" => StickyKey::ApiKey,
                "request" => StickyKey::Request,
                other => {
                    return Err(ApiError::invalid(
                        "sticky_key",
                        format!("`{other}` is not session, user, api_key or request"),
                    )
                    .into());
                }
            },
            shadow_gates: r
                .shadow_gates
                .iter()
                .map(|g| g.parse())
                .collect::<Result<_, String>>()
                .map_err(|e| ApiError::invalid("shadow_gates", e))?,
        };
        let status = self
            .ops
            .start_rollout(&Self::actor(&p, &r.reason), spec)
            .await?;
        Ok(Response::new(rollout_pb(&status)))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.admin(&req)?;
        let all = self.ops.rollouts().await;
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: all.iter().map(rollout_pb).collect(),
        }))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.admin(&req)?;
        let status = self.ops.rollout(&req.get_ref().id).await?;
        Ok(Response::new(rollout_pb(&status)))
    }

    async fn command_rollout(
        &self,
        req: Request<pb::CommandRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        let command: Command = r.action.parse()?;
        let status = self
            .ops
            .command_rollout(&Self::actor(&p, &r.reason), &r.id, command)
            .await?;
        Ok(Response::new(rollout_pb(&status)))
    }

    async fn set_shadow(
        &self,
        req: Request<pb::SetShadowRequest>,
    ) -> Result<Response<pb::ShadowStatus>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        let spec = shadow_spec(&r)?;
        let status = self
            .ops
            .set_shadow(&Self::actor(&p, &r.reason), &r.model, spec)
            .await?;
        Ok(Response::new(shadow_pb(&r.model, status)))
    }

    async fn get_shadow(
        &self,
        req: Request<pb::ShadowRef>,
    ) -> Result<Response<pb::ShadowStatus>, Status> {
        self.admin(&req)?;
        let model = &req.get_ref().model;
        let status = self.ops.shadow(model)?;
        Ok(Response::new(shadow_pb(model, status)))
    }

    async fn get_drift(
        &self,
        req: Request<pb::DriftRef>,
    ) -> Result<Response<pb::DriftStatus>, Status> {
        self.admin(&req)?;
        let status = self.ops.drift_status(&req.get_ref().model).await?;
        Ok(Response::new(pb::DriftStatus {
            json: status.to_string(),
        }))
    }

    async fn clear_shadow(
        &self,
        req: Request<pb::ShadowRef>,
    ) -> Result<Response<pb::AdminResponse>, Status> {
        let p = self.admin(&req)?;
        let r = req.into_inner();
        self.ops
            .clear_shadow(&Self::actor(&p, &r.reason), &r.model)
            .await?;
        Ok(Response::new(pb::AdminResponse {
            message: format!("{} shadow cleared", r.model),
        }))
    }

    async fn start_retrain(
        &self,
        req: Request<pb::StartRetrainRequest>,
    ) -> Result<Response<pb::RetrainStatus>, Status> {
        use crate::control::retrain::RetrainSpec;
        let p = self.admin(&req)?;
        let r = req.into_inner();
        let d = RetrainSpec::default();
        let spec = RetrainSpec {
            data: r.data.iter().map(std::path::PathBuf::from).collect(),
            replay_data: (!r.replay_data.is_empty())
                .then(|| r.replay_data.iter().map(std::path::PathBuf::from).collect()),
            replay_share: r.replay_share.unwrap_or(d.replay_share),
            steps: r.steps.unwrap_or(d.steps),
            lr: r.lr.unwrap_or(d.lr),
            batch_size: r.batch_size.map_or(d.batch_size, |b| b as usize),
            max_regression: r.max_regression.unwrap_or(d.max_regression),
            min_reference_tokens: r
                .min_reference_tokens
                .map_or(d.min_reference_tokens, |t| t as usize),
            budget: crate::train::job::CpuBudget {
                threads: r.threads.map_or(d.budget.threads, |t| t as usize),
                duty: r.duty.unwrap_or(d.budget.duty),
                ..d.budget
            },
            version: reason(&r.version),
            ..d
        };
        let h =
            crate::control::retrain::start(&self.ops, &Self::actor(&p, &r.reason), &r.model, spec)
                .await?;
        Ok(Response::new(retrain_pb(&h)))
    }

    async fn get_retrain(
        &self,
        req: Request<pb::RetrainRef>,
    ) -> Result<Response<pb::RetrainStatus>, Status> {
        self.admin(&req)?;
        let h = self.ops.retrain(&req.get_ref().model)?;
        Ok(Response::new(retrain_pb(&h)))
    }

    async fn cancel_retrain(
        &self,
        req: Request<pb::RetrainRef>,
    ) -> Result<Response<pb::RetrainStatus>, Status> {
        let p = self.admin(&req)?;
        let r = req.get_ref();
        let h = self
            .ops
            .cancel_retrain(&Self::actor(&p, &r.reason), &r.model)?;
        Ok(Response::new(retrain_pb(&h)))
    }

    async fn list_shadow_samples(
        &self,
        req: Request<pb::ShadowRef>,
    ) -> Result<Response<pb::ShadowSamples>, Status> {
        self.admin(&req)?;
        let samples = self.ops.shadow_samples(&req.get_ref().model)?;
        Ok(Response::new(pb::ShadowSamples {
            samples_json: samples
                .iter()
                .filter_map(|s| serde_json::to_string(s).ok())
                .collect(),
        }))
    }
}

fn retrain_pb(h: &crate::control::retrain::RetrainHandle) -> pb::RetrainStatus {
    pb::RetrainStatus {
        model: h.model.clone(),
        id: h.id.clone(),
        running: h.is_running(),
        status_json: h.status().to_string(),
    }
}

fn shadow_pb(model: &str, status: serde_json::Value) -> pb::ShadowStatus {
    let spec = &status["spec"];
    pb::ShadowStatus {
        model: model.to_string(),
        candidate: spec["version"].as_str().unwrap_or_default().to_string(),
        mode: spec["mode"].as_str().unwrap_or_default().to_string(),
        rate: spec["rate"].as_f64().unwrap_or_default(),
        inflight: status["inflight"].as_u64().unwrap_or_default() as u32,
        status_json: status.to_string(),
    }
}

/// The settings a `SetShadowRequest` asks for, defaults where it is silent.
fn shadow_spec(r: &pb::SetShadowRequest) -> Result<ShadowSpec, ApiError> {
    let mode = match r.mode.as_str() {
        "" | "generate" => Mode::Generate,
        "score" => Mode::Score,
        other => {
            return Err(ApiError::invalid(
                "mode",
                format!("`{other}` is not generate or score"),
            ));
        }
    };
    let d: ShadowSpec = serde_json::from_value(serde_json::json!({"version": r.version}))
        .map_err(|e| ApiError::invalid("version", e.to_string()))?;
    let samples = SampleSpec {
        enabled: r.samples,
        capacity: r
            .samples_capacity
            .map_or(d.samples.capacity, |c| c as usize),
        retention_secs: r
            .samples_retention_seconds
            .unwrap_or(d.samples.retention_secs),
        redact: r.redact.clone(),
    };
    Ok(ShadowSpec {
        rate: r.rate.unwrap_or(d.rate),
        mode,
        max_concurrent: r.max_concurrent.map_or(d.max_concurrent, |c| c as usize),
        tokens_per_second: r.tokens_per_second,
        timeout_secs: r.timeout_seconds.unwrap_or(d.timeout_secs),
        top_k: r.top_k.map_or(d.top_k, |k| k as usize),
        samples,
        ..d
    })
}

fn rollout_pb(s: &RolloutStatus) -> pb::Rollout {
    pb::Rollout {
        id: s.id.clone(),
        model: s.spec.model.clone(),
        candidate: s.spec.candidate.clone(),
        baseline: s.baseline.clone(),
        phase: serde_json::to_value(s.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        step: s.step as u32,
        weight_percent: s.weight,
        failures: s.failures,
        reason: s.reason.clone(),
        status_json: serde_json::to_string(s).unwrap_or_default(),
    }
}
