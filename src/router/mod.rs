//! The deployment table: for each model name, the stable version, an
//! optional canary with its weight and an optional shadow with its sample
//! rate, held in an `ArcSwap` snapshot that each request loads once.
//!
//! Invariant: no lock on the request path. Writers (the controller) go
//! through the typed updates below, one at a time, each building a new table
//! and swapping it in whole; a request keeps the target it picked, so it
//! finishes on that version whatever the table becomes.

pub mod split;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub use crate::monitor::Variant;
use crate::scheduler::EngineHandle;

/// Why a request cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No deployment has this name.
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    /// `model@version` names a version that takes no traffic.
    #[error("model `{model}` serves no version `{version}` (stable, canary or shadow)")]
    VersionNotServed {
        /// The model.
        model: String,
        /// The version asked for.
        version: String,
    },
    /// `model@version` while pinning is off.
    #[error("pinning a version (`model@version`) is disabled on this server")]
    PinningDisabled,
}

/// Which of a request's identities keeps it on one variant of a canary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyKey {
    /// The session the client names (`x-llmops-route-key`), else the user,
    /// else nothing (each request on its own).
    #[default]
    Session,
    /// The end user (OpenAI `user`), else the session, else nothing.
    User,
    /// The API key: every request of an application on one side.
    ApiKey,
    /// Nothing: each request is split on its own.
    Request,
}

/// The identities a request carries, for the split.
#[derive(Debug, Clone, Default)]
pub struct RouteKey {
    /// A session id the client chose.
    pub session: Option<String>,
    /// The end user.
    pub user: Option<String>,
    /// The API key's id (not the secret).
    pub api_key: Option<String>,
    /// The request id: the fallback, sticky to nothing.
    pub request: String,
}

impl RouteKey {
    /// A key that is only a session (tests, benchmarks, the CLI).
    pub fn session(s: &str) -> Self {
        Self {
            session: Some(s.to_string()),
            ..Self::default()
        }
    }

    /// The string the split hashes under `sticky`, namespaced so that a user
    /// id and a session id that happen to be equal are different keys.
    fn for_split(&self, sticky: StickyKey) -> String {
        let (s, u, k) = (
            self.session.as_deref().map(|v| ("session", v)),
            self.user.as_deref().map(|v| ("user", v)),
            self.api_key.as_deref().map(|v| ("key", v)),
        );
        // Without a session or a user, the split is per request: an
        // application with one API key would otherwise be one bucket, all
        // canary or none. Stickiness is for clients that send a key.
        let pick = match sticky {
            StickyKey::Session => s.or(u),
            StickyKey::User => u.or(s),
            StickyKey::ApiKey => k,
            StickyKey::Request => None,
        };
        match pick {
            Some((kind, v)) => format!("{kind}:{v}"),
            None => format!("request:{}", self.request),
        }
    }
}

/// One loaded model version that can take requests.
#[derive(Clone)]
pub struct Target {
    /// Version id (named in responses as the system fingerprint).
    pub version: String,
    /// Its engine.
    pub engine: EngineHandle,
}

/// A canary: a candidate taking `weight_bp` basis points of the traffic.
#[derive(Clone)]
pub struct Canary {
    /// The candidate.
    pub target: Arc<Target>,
    /// Share of route keys sent to it, in basis points (0–10,000).
    pub weight_bp: u32,
    /// Which identity keeps a request on one side.
    pub sticky: StickyKey,
    /// Salts the buckets, per rollout, so the same clients are not the
    /// canary of every rollout.
    pub salt: u64,
}

/// A shadow: a candidate receiving copies of a sample of the traffic.
#[derive(Clone)]
pub struct Shadow {
    /// The candidate.
    pub target: Arc<Target>,
    /// Share of requests mirrored, in basis points (0–10,000).
    pub rate_bp: u32,
    /// The copies' settings, in-flight count and comparisons.
    pub mirror: Arc<crate::shadow::Mirror>,
}

/// What serves one model name.
#[derive(Clone)]
pub struct Deployment {
    /// The name clients use.
    pub model: String,
    /// The version taking the traffic the canary does not.
    pub stable: Arc<Target>,
    /// A candidate taking a weighted, sticky share.
    pub canary: Option<Canary>,
    /// A candidate receiving mirrored copies.
    pub shadow: Option<Shadow>,
    /// Where finished requests are captured, when capture is on.
    pub capture: Option<Arc<crate::capture::Capture>>,
}

impl Deployment {
    /// Serves `stable` alone.
    pub fn new(model: &str, stable: Arc<Target>) -> Self {
        Self {
            model: model.to_string(),
            stable,
            canary: None,
            shadow: None,
            capture: None,
        }
    }

    /// The target of `version`, whichever role it has here.
    pub fn version(&self, version: &str) -> Option<(Arc<Target>, Variant)> {
        if self.stable.version == version {
            return Some((self.stable.clone(), Variant::Stable));
        }
        if let Some(c) = &self.canary
            && c.target.version == version
        {
            return Some((c.target.clone(), Variant::Canary));
        }
        if let Some(s) = &self.shadow
            && s.target.version == version
        {
            return Some((s.target.clone(), Variant::Shadow));
        }
        None
    }
}

/// A snapshot of every deployment.
#[derive(Clone, Default)]
pub struct DeploymentTable {
    /// By model name.
    pub models: BTreeMap<String, Arc<Deployment>>,
}

/// Where one request goes.
#[derive(Clone)]
pub struct Picked {
    /// The version that serves it.
    pub target: Arc<Target>,
    /// Its role, the `variant` label of the request's metrics.
    pub variant: Variant,
    /// The split's key hash (0 without a canary): how the rollout counts
    /// the distinct clients each side saw.
    pub split_key: u64,
    /// The shadow to mirror it to, when the request falls in its sample.
    pub shadow: Option<Arc<crate::shadow::Mirror>>,
    /// Where to capture it, when the model captures.
    pub capture: Option<Arc<crate::capture::Capture>>,
}

/// Routes requests to engines.
pub struct Router {
    table: ArcSwap<DeploymentTable>,
    /// Serialises writers (never taken on the request path).
    writer: Mutex<()>,
    /// Whether clients may name a version (`model@version`).
    pinning: bool,
}

impl Default for Router {
    fn default() -> Self {
        Self::new(DeploymentTable::default())
    }
}

impl Router {
    /// A router over `table`, pinning off.
    pub fn new(table: DeploymentTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(()),
            pinning: false,
        }
    }

    /// Lets clients pin a version with `model@version` (for debugging and
    /// evaluation; operators enable it).
    pub fn with_pinning(mut self, on: bool) -> Self {
        self.pinning = on;
        self
    }

    /// The current table.
    pub fn snapshot(&self) -> Arc<DeploymentTable> {
        self.table.load_full()
    }

    /// The deployment of `model`, if any.
    pub fn deployment(&self, model: &str) -> Option<Arc<Deployment>> {
        self.table.load().models.get(model).cloned()
    }

    /// Where a request to `model` with these identities goes; the request
    /// keeps the answer to the end. The canary's sticky key picks which
    /// identity decides the split, so one session (or user, or API key) sees
    /// one variant at a given weight; the shadow samples requests, not keys
    /// (a rerun of the same request id samples alike). `model@version` pins
    /// a version when pinning is on.
    pub fn pick(&self, model: &str, key: &RouteKey) -> Result<Picked, RouteError> {
        let table = self.table.load();
        if let Some((name, version)) = model.split_once('@') {
            if !self.pinning {
                return Err(RouteError::PinningDisabled);
            }
            let d = table
                .models
                .get(name)
                .ok_or_else(|| RouteError::ModelNotFound(name.to_string()))?;
            let (target, variant) =
                d.version(version)
                    .ok_or_else(|| RouteError::VersionNotServed {
                        model: name.to_string(),
                        version: version.to_string(),
                    })?;
            return Ok(Picked {
                target,
                variant,
                split_key: 0,
                shadow: None,
                capture: d.capture.clone(),
            });
        }
        let d = table
            .models
            .get(model)
            .ok_or_else(|| RouteError::ModelNotFound(model.to_string()))?;
        let (target, variant, split_key) = match &d.canary {
            Some(c) => {
                let k = key.for_split(c.sticky);
                let hash = split::key_hash(c.salt, &k);
                if split::to_canary(hash, c.weight_bp) {
                    (c.target.clone(), Variant::Canary, hash)
                } else {
                    (d.stable.clone(), Variant::Stable, hash)
                }
            }
            None => (d.stable.clone(), Variant::Stable, 0),
        };
        let shadow = d
            .shadow
            .as_ref()
            .filter(|s| split::to_shadow(&key.for_split(StickyKey::Request), s.rate_bp))
            .map(|s| s.mirror.clone());
        Ok(Picked {
            target,
            variant,
            split_key,
            shadow,
            capture: d.capture.clone(),
        })
    }

    /// Applies `f` to a copy of `model`'s deployment (or creates it) and
    /// stores the new table.
    fn write<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Arc<Deployment>>) -> R) -> R {
        let _one_writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = DeploymentTable::clone(&self.table.load());
        let r = f(&mut next.models);
        self.table.store(Arc::new(next));
        r
    }

    fn edit<R>(&self, model: &str, f: impl FnOnce(&mut Deployment) -> R) -> Option<R> {
        self.write(|models| {
            let d = models.get_mut(model)?;
            let mut copy = Deployment::clone(d);
            let r = f(&mut copy);
            *d = Arc::new(copy);
            Some(r)
        })
    }

    /// Makes `target` the stable version of `model` (the hot swap). A canary
    /// or shadow of the same version is cleared: it is stable now.
    pub fn set_stable(&self, model: &str, target: Arc<Target>) {
        self.write(|models| {
            let mut d = match models.get(model) {
                Some(d) => Deployment::clone(d),
                None => Deployment::new(model, target.clone()),
            };
            if d.canary
                .as_ref()
                .is_some_and(|c| c.target.version == target.version)
            {
                d.canary = None;
            }
            if d.shadow
                .as_ref()
                .is_some_and(|s| s.target.version == target.version)
            {
                d.shadow = None;
            }
            d.stable = target;
            models.insert(model.to_string(), Arc::new(d));
        });
    }

    /// Sends `weight_bp` of `model`'s route keys (by `sticky`) to `target`.
    /// False when the model has no deployment.
    pub fn set_canary(
        &self,
        model: &str,
        target: Arc<Target>,
        weight_bp: u32,
        sticky: StickyKey,
        salt: u64,
    ) -> bool {
        self.edit(model, |d| {
            d.canary = Some(Canary {
                target,
                weight_bp: weight_bp.min(split::BUCKETS),
                sticky,
                salt,
            })
        })
        .is_some()
    }

    /// Changes the canary's weight; false when there is no canary.
    pub fn set_canary_weight(&self, model: &str, weight_bp: u32) -> bool {
        self.edit(model, |d| match &mut d.canary {
            Some(c) => {
                c.weight_bp = weight_bp.min(split::BUCKETS);
                true
            }
            None => false,
        })
        .unwrap_or(false)
    }

    /// Removes the canary (rollback or abort); returns it.
    pub fn clear_canary(&self, model: &str) -> Option<Canary> {
        self.edit(model, |d| d.canary.take()).flatten()
    }

    /// Makes the canary the stable version; returns the old stable target.
    pub fn promote(&self, model: &str) -> Option<Arc<Target>> {
        self.edit(model, |d| {
            let c = d.canary.take()?;
            Some(std::mem::replace(&mut d.stable, c.target))
        })
        .flatten()
    }

    /// Mirrors `rate_bp` of `model`'s requests to `target` through `mirror`.
    pub fn set_shadow(
        &self,
        model: &str,
        target: Arc<Target>,
        rate_bp: u32,
        mirror: Arc<crate::shadow::Mirror>,
    ) -> bool {
        self.edit(model, |d| {
            d.shadow = Some(Shadow {
                target,
                rate_bp: rate_bp.min(split::BUCKETS),
                mirror,
            })
        })
        .is_some()
    }

    /// Stops mirroring; returns the shadow.
    pub fn clear_shadow(&self, model: &str) -> Option<Shadow> {
        self.edit(model, |d| d.shadow.take()).flatten()
    }

    /// Captures `model`'s finished requests there (`None`: stops); returns
    /// the capture it had (none, too, when the model is not served).
    pub fn set_capture(
        &self,
        model: &str,
        capture: Option<Arc<crate::capture::Capture>>,
    ) -> Option<Arc<crate::capture::Capture>> {
        self.edit(model, |d| std::mem::replace(&mut d.capture, capture))
            .flatten()
    }

    /// Stops serving `model`.
    pub fn remove(&self, model: &str) -> Option<Arc<Deployment>> {
        self.write(|models| models.remove(model))
    }
}
