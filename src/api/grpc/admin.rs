//! `llmops.v1.Admin` over gRPC: the same operations as `/admin/v1`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::api::auth::{Authenticator, Principal};
use crate::api::error::ApiError;
use crate::proto as pb;
use crate::registry::VersionRecord;
use crate::control::{Actor, Controller, Register};

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
}
