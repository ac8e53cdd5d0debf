//! The deployment table: model name → the version that serves it, held in an
//! `ArcSwap` snapshot that each request loads once and pins.
//!
//! Invariant: no lock on the request path; writers build a new table and
//! swap it in whole.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::scheduler::Engine;

/// Why a request cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No deployment has this name.
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
}

/// One loaded model version that can take requests.
#[derive(Clone)]
pub struct Target {
    /// Version id (named in responses as the system fingerprint).
    pub version: String,
    /// Its engine.
    pub engine: Engine,
}

/// What serves one model name.
#[derive(Clone)]
pub struct Deployment {
    /// The name clients use.
    pub model: String,
    /// The version taking traffic.
    pub stable: Arc<Target>,
}

/// A snapshot of every deployment.
#[derive(Clone, Default)]
pub struct DeploymentTable {
    /// By model name.
    pub models: BTreeMap<String, Arc<Deployment>>,
}

/// Routes requests to engines.
pub struct Router {
    table: ArcSwap<DeploymentTable>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new(DeploymentTable::default())
    }
}

impl Router {
    /// A router over `table`.
    pub fn new(table: DeploymentTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The current table.
    pub fn snapshot(&self) -> Arc<DeploymentTable> {
        self.table.load_full()
    }

    /// The target for a request to `model`; the request keeps it to the end.
    pub fn pick(&self, model: &str) -> Result<Arc<Target>, RouteError> {
        let table = self.table.load();
        match table.models.get(model) {
            Some(d) => Ok(d.stable.clone()),
            None => Err(RouteError::ModelNotFound(model.to_string())),
        }
    }

    /// Replaces the table with `f(current)`, atomically with respect to other writers.
    pub fn update(&self, f: impl Fn(&DeploymentTable) -> DeploymentTable) {
        self.table.rcu(|cur| Arc::new(f(cur)));
    }
}
