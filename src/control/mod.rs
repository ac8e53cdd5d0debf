//! The controller: register, load, unload, point aliases (hot swap), and
//! restore what was serving at startup, keeping the catalog (`registry/`),
//! the engines and the router's table in agreement. Every action is audited.
//!
//! Hot swap: the new version loads and warms up while the old one serves;
//! then the router's table is replaced in one store. Requests already running
//! hold their own handle on the old engine, which finishes them, and stops
//! and frees its memory when that last handle drops.

pub mod autopilot;
pub mod capture;
pub mod drift;
pub mod fleet;
pub mod hooks;
pub mod retrain;
pub mod rollout;
pub mod shadow;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{self, EnginePath, GgufWeights, LoadOptions, LoadedModel};
use crate::hooks::{Event as HookEvent, EventKind, Hooks};
use crate::monitor::names;
use crate::registry::{self, Action, AuditEntry, Registry, State, VersionRecord};
use crate::router::{Router, Target};
use crate::scheduler::{EngineHandle, EngineLabels, Event, Request, SchedulerConfig};

/// Why an admin operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// A parameter is malformed or names something unusable.
    #[error("{message}")]
    Invalid {
        /// The parameter.
        param: String,
        /// Why.
        message: String,
    },
    /// No such model, version, alias or rollout.
    #[error("{0}")]
    NotFound(String),
    /// The operation contradicts the current state.
    #[error("{0}")]
    Conflict(String),
    /// No admin key may do this through the API (it is the config file's
    /// or the host's to decide), whatever the caller's role.
    #[error("{0}")]
    Forbidden(String),
    /// A version failed to load or warm up, or an engine is gone.
    #[error("{0}")]
    Unavailable(String),
    /// The registry log (or another file the action needs) could not be
    /// written, as on a full disk; the action was not taken.
    #[error("{0}")]
    Storage(String),
    /// A bug or an I/O failure; the detail is for logs.
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// An invalid parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }
}

impl From<crate::scheduler::SubmitError> for ControlError {
    fn from(e: crate::scheduler::SubmitError) -> Self {
        ControlError::Unavailable(e.to_string())
    }
}

/// Who acts and why.
#[derive(Debug, Clone)]
pub struct Actor {
    /// API key id.
    pub key_id: String,
    /// The operator's reason.
    pub reason: Option<String>,
}

impl Actor {
    /// The server itself (startup restoration).
    pub fn startup() -> Self {
        Self {
            key_id: "startup".into(),
            reason: Some("server start".into()),
        }
    }
}

/// A registration request.
#[derive(Debug, Clone, Deserialize)]
pub struct Register {
    /// Folder or GGUF file (`embedded` for the built-in model).
    pub path: String,
    /// Version id; `vN` when absent.
    #[serde(default)]
    pub version: Option<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: Value,
    /// Model card; the folder's README.md when absent.
    #[serde(default)]
    pub model_card: Option<String>,
}

/// The source string of the embedded model.
pub const EMBEDDED: &str = "embedded";

/// The controller: the catalog (registry), the loaded engines and the
/// router's table, kept in agreement.
///
/// Admin writes take turns (`writes`, held across model loads and
/// warm-ups); the catalog's own lock is held only to read or append, never
/// across a load, so admin reads never wait behind one.
pub struct Controller {
    /// Shared with the hooks, which audit their deliveries.
    registry: Arc<std::sync::Mutex<Registry>>,
    writes: tokio::sync::Mutex<()>,
    /// Loaded versions. Only the admin path touches it.
    engines: std::sync::Mutex<HashMap<(String, String), Loaded>>,
    router: Arc<Router>,
    scheduler: SchedulerConfig,
    device: String,
    gguf_weights: GgufWeights,
    /// Which implementation runs steps; `None`: the device's default.
    engine_path: Option<EnginePath>,
    health: Option<tonic_health::server::HealthReporter>,
    /// Canonical folders registered paths must lie under; empty: anywhere.
    model_roots: Vec<PathBuf>,
    /// Where retrained versions go (`--trained-dir`); `None`: under
    /// `data_dir`, which only this replica reads.
    trained_dir: Option<PathBuf>,
    /// Models whose stable version failed to load at start, so that
    /// `serving` shows them broken instead of just absent. Cleared when a
    /// version of the model serves again.
    failed: std::sync::Mutex<BTreeMap<String, LoadFailure>>,
    /// Running rollouts by model (one per model).
    rollouts: std::sync::Mutex<HashMap<String, rollout::Running>>,
    /// Rollout transitions, for whoever listens (tests).
    rollout_events: tokio::sync::broadcast::Sender<rollout::RolloutEvent>,
    /// Events to the configured webhooks and commands.
    hooks: Hooks,
    /// Where the registry, capture and hook secrets live.
    data_dir: PathBuf,
    /// How often a running shadow's comparisons go out as `shadow_report`.
    shadow_report_every: Duration,
    /// The latest retrain job per model, running or finished (one runs
    /// per model at a time).
    retrains: std::sync::Mutex<HashMap<String, retrain::RetrainHandle>>,
    /// What drift of a stable version sets off: the admin API's settings,
    /// or else `[autopilot]`.
    autopilot: std::sync::Mutex<autopilot::AutopilotSpec>,
    /// `[autopilot]` as the file has it (what a cleared setting returns to).
    autopilot_file: std::sync::Mutex<autopilot::AutopilotSpec>,
    /// Each model's last and running loop.
    loops: std::sync::Mutex<autopilot::Loops>,
    /// `[drift]` and the per-model overrides (admin API included).
    drift: std::sync::Mutex<crate::monitor::drift::DriftSettings>,
    /// `[drift]` as the file has it (what a cleared override returns to).
    drift_file: std::sync::Mutex<crate::monitor::drift::DriftSettings>,
    /// Drift state changes of every version.
    drift_events: tokio::sync::broadcast::Sender<crate::monitor::drift::DriftTransition>,
    /// Where frozen drift references are kept (beside the audit log).
    drift_dir: PathBuf,
    /// The shared registry of a fleet (`None`: this replica's own log).
    fleet: Option<Arc<registry::etcd::Etcd>>,
    /// This replica's name in the fleet.
    replica_id: String,
    /// The registry state the engines and router were last reconciled to
    /// (fleet only).
    seen: std::sync::Mutex<State>,
    /// Whether this replica's last published samples were not empty.
    published: std::sync::atomic::AtomicBool,
    /// The leader's last fleet-wide drift verdict per model: the stable
    /// version most replicas judged in drift (fleet only).
    fleet_drift: std::sync::Mutex<HashMap<String, String>>,
}

/// Why a model is not served.
#[derive(Debug, Clone, serde::Serialize)]
struct LoadFailure {
    /// The stable version that failed, if the model got as far as one.
    version: Option<String>,
    /// The error.
    reason: String,
}

struct Loaded {
    engine: EngineHandle,
    /// Loaded explicitly (stays until unloaded) rather than for an alias.
    pinned: bool,
}

fn valid_name(kind: &str, s: &str) -> Result<(), ControlError> {
    if !registry::paths::is_path_component(s) {
        return Err(ControlError::invalid(
            kind,
            format!(
                "`{s}` is not a valid {kind} (a name of dots only, or with a separator, would be a path)"
            ),
        ));
    }
    if s.len() > 128
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(ControlError::invalid(
            kind,
            format!("`{s}` is not a valid {kind} (letters, digits, - _ . :)"),
        ));
    }
    Ok(())
}

/// Refuses a candidate whose tokenizer differs from the stable version's
/// (vocabulary, special tokens, BOS/EOS: [`engine::Tokenizer::fingerprint`]),
/// saying `why` that matters.
fn same_tokenizer(
    stable: &Target,
    candidate: &str,
    engine: &EngineHandle,
    why: &str,
) -> Result<(), ControlError> {
    let (a, b) = (stable.engine.tokenizer(), engine.tokenizer());
    if a.fingerprint() != b.fingerprint() {
        return Err(ControlError::Conflict(format!(
            "version `{candidate}` has another tokenizer ({} tokens) than the stable version `{}` ({} tokens, or the same count with other tokens); {why}",
            b.vocab_size(),
            stable.version,
            a.vocab_size()
        )));
    }
    Ok(())
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

/// Loads a model from a registry source (blocking).
fn load_source(
    source: &str,
    device: &str,
    gguf_weights: GgufWeights,
    engine_path: Option<EnginePath>,
) -> anyhow::Result<LoadedModel> {
    let opts = LoadOptions {
        device: engine::parse_device(device)?,
        gguf_weights,
        engine_path,
        ..Default::default()
    };
    Ok(if source == EMBEDDED {
        crate::engine::embedded::load(&opts)?
    } else {
        engine::load(&PathBuf::from(source), &opts)?
    })
}

impl Controller {
    /// A controller on an opened registry (the local log in `data_dir`, or
    /// a fleet's shared one); `data_dir` keeps this replica's own files
    /// (capture, drift references, hook secrets).
    pub fn open(
        registry: Registry,
        data_dir: &std::path::Path,
        router: Arc<Router>,
        scheduler: SchedulerConfig,
        device: String,
        gguf_weights: GgufWeights,
        health: Option<tonic_health::server::HealthReporter>,
    ) -> anyhow::Result<Self> {
        let fleet = registry.shared().cloned();
        let registry = Arc::new(std::sync::Mutex::new(registry));
        Ok(Self {
            fleet,
            replica_id: String::new(),
            seen: Default::default(),
            published: Default::default(),
            fleet_drift: Default::default(),
            hooks: Hooks::new(Some(registry.clone())),
            registry,
            data_dir: data_dir.to_path_buf(),
            shadow_report_every: Duration::from_secs(300),
            writes: tokio::sync::Mutex::new(()),
            engines: std::sync::Mutex::new(HashMap::new()),
            router,
            scheduler,
            device,
            gguf_weights,
            engine_path: None,
            health,
            model_roots: vec![],
            trained_dir: None,
            failed: std::sync::Mutex::new(BTreeMap::new()),
            rollouts: std::sync::Mutex::new(HashMap::new()),
            rollout_events: tokio::sync::broadcast::channel(256).0,
            retrains: std::sync::Mutex::new(HashMap::new()),
            autopilot: Default::default(),
            autopilot_file: Default::default(),
            loops: Default::default(),
            drift: Default::default(),
            drift_file: Default::default(),
            drift_events: tokio::sync::broadcast::channel(256).0,
            drift_dir: data_dir.join("drift"),
        })
    }

    /// This replica's name in a fleet (the leader key, published samples).
    pub fn with_replica_id(mut self, id: String) -> Self {
        self.replica_id = id;
        self
    }

    /// Drift settings (`[drift]`, per-model overrides).
    pub fn with_drift(self, settings: crate::monitor::drift::DriftSettings) -> Self {
        *self.drift_settings() = settings.clone();
        *self.drift_file.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        self
    }

    /// Runs every model it loads on this engine path (`None`: the
    /// device's default, [`engine::EnginePath::resolve`]).
    pub fn with_engine_path(mut self, path: Option<EnginePath>) -> Self {
        self.engine_path = path;
        self
    }

    /// Accepts registrations only under these folders (canonical paths, as
    /// [`crate::config::ServerConfig::model_roots`] holds them).
    pub fn with_model_roots(mut self, roots: Vec<PathBuf>) -> Self {
        self.model_roots = roots;
        self
    }

    /// Where paths an admin names as data (training, replay, a drift
    /// reference) may lie: the model roots and the capture directory.
    pub fn data_roots(&self) -> Vec<PathBuf> {
        let mut roots = self.model_roots.clone();
        if let Ok(c) = std::fs::canonicalize(self.data_dir.join("capture")) {
            roots.push(c);
        }
        roots
    }

    /// Writes retrained versions under `dir` (`None`: under the data
    /// folder, which a fleet's other replicas cannot read).
    pub fn with_trained_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.trained_dir = dir;
        self
    }

    /// Sends a running shadow's comparisons as a `shadow_report` event this
    /// often (default five minutes).
    pub fn with_shadow_report_every(mut self, every: Duration) -> Self {
        self.shadow_report_every = every;
        self
    }

    /// The hooks events go to (the drift monitor and the retrain loop emit
    /// through it too).
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    fn failed(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LoadFailure>> {
        // Single inserts and removes: a poisoned lock is still consistent.
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engines(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Loaded>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so a poisoned lock is still usable.
        self.engines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, State> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn published_any(&self) -> bool {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_published(&self, any: bool) {
        self.published
            .store(any, std::sync::atomic::Ordering::Relaxed);
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Appends are all-or-nothing (a failed one is cut back), so a
        // poisoned lock still guards a consistent registry.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rollout transitions as they happen.
    pub fn rollout_events(&self) -> tokio::sync::broadcast::Receiver<rollout::RolloutEvent> {
        self.rollout_events.subscribe()
    }

    /// This replica's turn to change the registry: admin changes are made
    /// one at a time, and in a fleet on the newest state of the shared log
    /// (a version registered on another replica a moment ago is known here,
    /// a rollout is judged at its latest revision).
    async fn write_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let turn = self.writes.lock().await;
        if self.fleet.is_some()
            && let Err(e) = self.catalog().catch_up()
        {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot read the shared registry; acting on the last known state"
            );
        }
        turn
    }

    /// A copy of the registry state.
    pub async fn state(&self) -> State {
        self.catalog().state().clone()
    }

    /// Audit entries with `seq > after` (oldest first), at most `limit`;
    /// without `after`, the newest `limit` entries (oldest first).
    pub async fn audit(&self, after: Option<u64>, limit: usize) -> Vec<AuditEntry> {
        let r = self.catalog();
        let entries = r.entries();
        match after {
            Some(after) => entries
                .iter()
                .filter(|e| e.seq > after)
                .take(limit)
                .cloned()
                .collect(),
            None => entries[entries.len().saturating_sub(limit)..].to_vec(),
        }
    }

    async fn record(
        &self,
        actor: &Actor,
        action: Action,
        previous: Value,
        new: Value,
        result: Result<(), String>,
    ) -> Result<AuditEntry, ControlError> {
        // What a rollout's driver writes is the leader's: fenced by its
        // lease in a fleet.
        let leader = rollout::DRIVING.try_with(|_| ()).is_ok();
        let mut catalog = self.catalog();
        let reason = actor.reason.clone();
        let appended = if leader {
            catalog.append_as_leader(&actor.key_id, action, previous, new, reason, result)
        } else {
            catalog.append(&actor.key_id, action, previous, new, reason, result)
        };
        drop(catalog);
        appended.map_err(|e| {
                if let Some(stale) = e.downcast_ref::<registry::StaleRollout>() {
                    return ControlError::Conflict(stale.to_string());
                }
                if let Some(fenced) = e.downcast_ref::<registry::etcd::Fenced>() {
                    return ControlError::Unavailable(fenced.to_string());
                }
                tracing::error!(error = format!("{e:#}"), "registry log append failed");
                match &self.fleet {
                    Some(f) => ControlError::Unavailable(format!(
                        "the action was not taken: the shared registry ({}) could not be written ({e:#}); replicas serve their last known state until it is back",
                        f.url()
                    )),
                    None => ControlError::Storage(format!(
                        "the action was not taken: the registry log (audit.jsonl) could not be written ({e})"
                    )),
                }
            })
    }

    /// Registers a version: checks the path, computes the digest, loads the
    /// model once to prove it works, then appends the record.
    pub async fn register(
        &self,
        actor: &Actor,
        model: &str,
        req: Register,
    ) -> Result<VersionRecord, ControlError> {
        valid_name("model", model)?;
        if let Some(v) = &req.version {
            valid_name("version", v)?;
        }
        let _write = self.write_turn().await;
        let version = req
            .version
            .clone()
            .unwrap_or_else(|| self.catalog().state().next_version_id(model));
        let action = |record: VersionRecord| Action::RegisterVersion {
            model: model.to_string(),
            record: Box::new(record),
        };
        let placeholder = VersionRecord {
            version: version.clone(),
            sha256: String::new(),
            source: req.path.clone(),
            format: String::new(),
            architecture: String::new(),
            parameters: 0,
            created: registry::now_rfc3339(),
            metadata: req.metadata.clone(),
            model_card: String::new(),
        };
        let fail = |e: ControlError| (e.to_string(), e);
        let outcome: Result<VersionRecord, (String, ControlError)> = async {
            if self.catalog().state().version(model, &version).is_some() {
                return Err(fail(ControlError::Conflict(format!(
                    "model `{model}` already has a version `{version}`; versions are immutable"
                ))));
            }
            // File types and roots before anything is opened: a FIFO or
            // `/dev/zero` would hang the digest below while we hold the lock.
            if req.path != EMBEDDED
                && let Err(e) = registry::check_model_path(Path::new(&req.path), &self.model_roots)
            {
                return Err(fail(ControlError::invalid("path", e.to_string())));
            }
            if let Some(reference) = req.metadata.get(drift::REFERENCE_KEY) {
                let file = reference.as_str().ok_or_else(|| {
                    fail(ControlError::invalid(
                        "metadata.drift_reference",
                        "must be a path (a JSON-lines file of prompts)",
                    ))
                })?;
                registry::paths::data_files(Path::new(file), &self.data_roots())
                    .map_err(|e| fail(ControlError::invalid("metadata.drift_reference", e)))?;
            }
            let path = req.path.clone();
            let (device, gguf_weights, engine_path) =
                (self.device.clone(), self.gguf_weights, self.engine_path);
            let (digest, loaded) =
                tokio::task::spawn_blocking(move || -> anyhow::Result<(String, LoadedModel)> {
                    let digest = if path == EMBEDDED {
                        crate::engine::embedded::digest()
                    } else {
                        registry::digest_path(std::path::Path::new(&path))?
                    };
                    Ok((
                        digest,
                        load_source(&path, &device, gguf_weights, engine_path)?,
                    ))
                })
                .await
                .map_err(|e| fail(internal(e)))?
                .map_err(|e| {
                    fail(ControlError::invalid(
                        "path",
                        format!("the model cannot be loaded: {e}"),
                    ))
                })?;
            // The load only proved the files work: keep what the record
            // needs and give the memory back now.
            let info = loaded.info.clone();
            drop(loaded);
            release_freed_memory();
            if let Some(m) = self.catalog().state().models.get(model)
                && let Some(dup) = m.versions.values().find(|v| v.sha256 == digest)
            {
                return Err(fail(ControlError::Conflict(format!(
                    "these weights (sha256 {}) are already registered as `{model}` version `{}`",
                    &digest[..12],
                    dup.version
                ))));
            }
            let card = match &req.model_card {
                Some(c) => c.clone(),
                None => std::fs::read_to_string(PathBuf::from(&req.path).join("README.md"))
                    .unwrap_or_default(),
            };
            Ok(VersionRecord {
                sha256: digest,
                format: serde_json::to_value(info.format)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                architecture: info.arch.as_str().into(),
                parameters: info.parameters as u64,
                model_card: card,
                ..placeholder.clone()
            })
        }
        .await;
        match outcome {
            Ok(record) => {
                self.record(
                    actor,
                    action(record.clone()),
                    Value::Null,
                    json!({"version": record.version, "sha256": record.sha256}),
                    Ok(()),
                )
                .await?;
                tracing::info!(model, version = %record.version, key = %actor.key_id, "version registered");
                self.hooks.emit(HookEvent::new(
                    model,
                    Some(&record.version),
                    EventKind::VersionRegistered {
                        sha256: record.sha256.clone(),
                        source: record.source.clone(),
                        format: record.format.clone(),
                        parameters: record.parameters,
                    },
                ));
                Ok(record)
            }
            Err((msg, e)) => {
                self.record(
                    actor,
                    action(placeholder),
                    Value::Null,
                    Value::Null,
                    Err(msg),
                )
                .await?;
                Err(e)
            }
        }
    }

    /// Starts a version's engine and warms it up (one generated token).
    /// The weights must still have the digest they were registered with.
    async fn start_engine(
        &self,
        model: &str,
        record: &VersionRecord,
    ) -> Result<EngineHandle, ControlError> {
        let (source, registered) = (record.source.clone(), record.sha256.clone());
        let (device, gguf_weights, engine_path) =
            (self.device.clone(), self.gguf_weights, self.engine_path);
        let (model_name, version) = (model.to_string(), record.version.clone());
        let loaded = tokio::task::spawn_blocking(move || -> Result<LoadedModel, ControlError> {
            let failed = |e: anyhow::Error| {
                ControlError::Unavailable(format!("version `{version}` failed to load: {e}"))
            };
            // Versions are immutable: files replaced at the same path must not
            // change what a version (or a rollback to it) serves.
            let found = if source == EMBEDDED {
                registry::Digests::one(crate::engine::embedded::digest())
            } else {
                registry::digests(Path::new(&source)).map_err(failed)?
            };
            if !found.matches(&registered) {
                let found = found.current;
                return Err(ControlError::Unavailable(format!(
                    "version `{version}` of `{model_name}` refused: the weights at {source} changed since it was registered (registered sha256 {registered}, found {found}); register the new weights as a new version"
                )));
            }
            load_source(&source, &device, gguf_weights, engine_path).map_err(failed)
        })
        .await
        .map_err(internal)??;
        tracing::info!(
            model,
            version = %record.version,
            format = ?loaded.info.format,
            gguf_weights = %self.gguf_weights,
            engine_path = %loaded.model.engine_path(),
            "weights loaded"
        );
        let engine = EngineHandle::spawn(
            loaded,
            self.scheduler.clone(),
            EngineLabels {
                model: model.to_string(),
                version: record.version.clone(),
            },
        )
        .map_err(internal)?;
        self.attach_drift(model, record, &engine).await;
        let prompt = engine
            .tokenizer()
            .encode("warm up", true)
            .map_err(internal)?;
        let mut rx = engine
            .submit(Request::greedy(prompt, 1))
            .map_err(ControlError::from)?;
        loop {
            match rx.recv().await {
                Some(Event::Done(_)) => break,
                Some(Event::Failed(e)) => {
                    return Err(ControlError::Unavailable(format!(
                        "version `{}` failed its warm-up: {e}",
                        record.version
                    )));
                }
                Some(Event::Token { .. }) => {}
                None => {
                    return Err(ControlError::Unavailable(
                        "the engine stopped during warm-up".into(),
                    ));
                }
            }
        }
        Ok(engine)
    }

    /// The engine of a version, loading it if needed.
    async fn ensure_loaded(
        &self,
        model: &str,
        record: &VersionRecord,
        pin: bool,
    ) -> Result<EngineHandle, ControlError> {
        let key = (model.to_string(), record.version.clone());
        if let Some(l) = self.engines().get_mut(&key) {
            l.pinned |= pin;
            return Ok(l.engine.clone());
        }
        let engine = match self.start_engine(model, record).await {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!(names::MODEL_LOAD_FAILURES, "model" => model.to_string(), "version" => record.version.clone())
                    .increment(1);
                return Err(e);
            }
        };
        self.engines().insert(
            key,
            Loaded {
                engine: engine.clone(),
                pinned: pin,
            },
        );
        Ok(engine)
    }

    /// Loads a version (and keeps it loaded until unloaded).
    pub async fn load(
        &self,
        actor: &Actor,
        model: &str,
        version: &str,
    ) -> Result<(), ControlError> {
        let _write = self.write_turn().await;
        let action = Action::Load {
            model: model.into(),
            version: version.into(),
        };
        let Some(record) = self.catalog().state().version(model, version).cloned() else {
            let e = ControlError::NotFound(format!("model `{model}` has no version `{version}`"));
            self.record(actor, action, Value::Null, Value::Null, Err(e.to_string()))
                .await?;
            return Err(e);
        };
        let key = (model.to_string(), version.to_string());
        let pinned_before = self.engines().get(&key).map(|l| l.pinned);
        let was = pinned_before.is_some();
        match self.ensure_loaded(model, &record, true).await {
            Ok(_) => {
                let recorded = self
                    .record(
                        actor,
                        action,
                        json!({"loaded": was}),
                        json!({"loaded": true}),
                        Ok(()),
                    )
                    .await;
                if let Err(e) = recorded {
                    // Refused, so undone: a version this call loaded goes
                    // away again, one that was loaded keeps its pin.
                    match pinned_before {
                        None => {
                            let removed = self.engines().remove(&key);
                            if removed.is_some() {
                                drop(removed);
                                release_freed_memory();
                            }
                        }
                        Some(pinned) => {
                            if let Some(l) = self.engines().get_mut(&key) {
                                l.pinned = pinned;
                            }
                        }
                    }
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                self.record(
                    actor,
                    action,
                    json!({"loaded": was}),
                    json!({"loaded": false}),
                    Err(e.to_string()),
                )
                .await?;
                Err(e)
            }
        }
    }

    /// Unloads a version no alias points at; waits (up to `wait`) until its
    /// engine has finished in-flight work and freed its memory.
    pub async fn unload(
        &self,
        actor: &Actor,
        model: &str,
        version: &str,
        wait: Duration,
    ) -> Result<(), ControlError> {
        let _write = self.write_turn().await;
        let action = Action::Unload {
            model: model.into(),
            version: version.into(),
        };
        let refuse = |e: ControlError| e;
        let check = || -> Result<(), ControlError> {
            let state = self.catalog().state().clone();
            if state.version(model, version).is_none() {
                return Err(ControlError::NotFound(format!(
                    "model `{model}` has no version `{version}`"
                )));
            }
            if let Some(m) = state.models.get(model)
                && let Some((alias, _)) = m.aliases.iter().find(|(_, v)| v.as_str() == version)
            {
                return Err(ControlError::Conflict(format!(
                    "version `{version}` serves alias `{alias}`; point the alias elsewhere first"
                )));
            }
            Ok(())
        };
        if let Err(e) = check() {
            self.record(actor, action, Value::Null, Value::Null, Err(e.to_string()))
                .await?;
            return Err(refuse(e));
        }
        self.unload_shadow_candidate(actor, model, version).await?;
        let key = (model.to_string(), version.to_string());
        let was = self.engines().contains_key(&key);
        // Written first: an unload the log cannot record is refused and
        // leaves the version loaded. Nothing after this can fail.
        self.record(
            actor,
            action,
            json!({"loaded": was}),
            json!({"loaded": false}),
            Ok(()),
        )
        .await?;
        let removed = self.engines().remove(&key);
        if let Some(l) = removed {
            let watch = l.engine.watch();
            drop(l);
            if tokio::time::timeout(wait, watch.stopped(Duration::from_millis(10)))
                .await
                .is_err()
            {
                tracing::warn!(
                    model,
                    version,
                    "unloaded engine still finishing in-flight requests"
                );
            }
            release_freed_memory();
        }
        Ok(())
    }

    /// Points `alias` at `version` (or removes it). For `stable` this is the
    /// hot swap: the new version is loaded and warmed up first, and a failed
    /// load changes nothing.
    pub async fn set_alias(
        &self,
        actor: &Actor,
        model: &str,
        alias: &str,
        version: Option<&str>,
    ) -> Result<(), ControlError> {
        valid_name("alias", alias)?;
        let _write = self.write_turn().await;
        let previous = self
            .catalog()
            .state()
            .alias(model, alias)
            .map(str::to_string);
        let action = Action::SetAlias {
            model: model.into(),
            alias: alias.into(),
            version: version.map(str::to_string),
        };
        let result: Result<Option<EngineHandle>, ControlError> = async {
            if !self.catalog().state().models.contains_key(model) {
                return Err(ControlError::NotFound(format!("no model `{model}` is registered")));
            }
            let Some(v) = version else {
                if previous.is_none() {
                    return Err(ControlError::NotFound(format!("model `{model}` has no alias `{alias}`")));
                }
                if alias == "stable" {
                    return Err(ControlError::Conflict("the `stable` alias cannot be removed while the model is served; point it at another version".into()));
                }
                return Ok(None);
            };
            let record = self.catalog()
                .state()
                .version(model, v)
                .cloned()
                .ok_or_else(|| ControlError::NotFound(format!("model `{model}` has no version `{v}`")))?;
            if alias == "stable" {
                Ok(Some(self.ensure_loaded(model, &record, false).await?))
            } else {
                Ok(None)
            }
        }
        .await;
        let new = json!(version);
        match result {
            Err(e) => {
                self.record(actor, action, json!(previous), new, Err(e.to_string()))
                    .await?;
                Err(e)
            }
            Ok(engine) => {
                self.record(actor, action, json!(previous), new, Ok(()))
                    .await?;
                if let (Some(engine), Some(v)) = (engine, version) {
                    self.serve(model, v, engine).await;
                    tracing::info!(model, from = ?previous, to = v, key = %actor.key_id, "stable alias switched");
                }
                self.release_unreferenced(&self.catalog().state().clone());
                Ok(())
            }
        }
    }

    /// Loads `record` (if it is not loaded) and serves it as `model`'s
    /// stable version, or reports why it cannot; `true` when it serves.
    async fn load_and_serve(&self, model: &str, record: &VersionRecord) -> bool {
        match self.ensure_loaded(model, record, false).await {
            Ok(engine) => {
                self.serve(model, &record.version, engine).await;
                true
            }
            Err(e) => {
                self.report_failure(model, Some(&record.version), e.to_string())
                    .await;
                false
            }
        }
    }

    /// Puts `engine` behind `model` in the router (one atomic store).
    async fn serve(&self, model: &str, version: &str, engine: EngineHandle) {
        let target = Arc::new(Target {
            version: version.to_string(),
            engine,
        });
        self.router.set_stable(model, target);
        self.failed().remove(model);
        metrics::gauge!(names::MODEL_SERVING, "model" => model.to_string()).set(1.0);
        if let Some(h) = &self.health {
            h.set_service_status(model, tonic_health::ServingStatus::Serving)
                .await;
        }
    }

    /// A model that cannot be served at start: logged, counted, shown by
    /// `serving`, and marked not serving in gRPC health.
    async fn report_failure(&self, model: &str, version: Option<&str>, reason: String) {
        tracing::error!(
            model,
            version = version.unwrap_or("-"),
            error = %reason,
            "model not served (the other models are)"
        );
        metrics::gauge!(names::MODEL_SERVING, "model" => model.to_string()).set(0.0);
        self.failed().insert(
            model.to_string(),
            LoadFailure {
                version: version.map(str::to_string),
                reason,
            },
        );
        if let Some(h) = &self.health {
            h.set_service_status(model, tonic_health::ServingStatus::NotServing)
                .await;
        }
    }

    /// Checks the served engines every quarter second, for as long as the
    /// controller lives: an engine whose thread panicked is audited once and
    /// sent to the hooks (`engine_failed`), and when it was the stable
    /// version its model turns NOT_SERVING in health and shows as failed in
    /// `serving` (`/ready` already sees it). A rollout notices a failed
    /// canary by itself. Running shadows' reports go out from here too.
    pub fn watch_engines(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut reported = std::collections::HashSet::new();
            let mut last_report = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(me) = weak.upgrade() else { return };
                if last_report.elapsed() >= me.shadow_report_every {
                    last_report = tokio::time::Instant::now();
                    me.report_shadows();
                }
                for d in me.router.snapshot().models.values() {
                    let mut targets = vec![(d.stable.clone(), true)];
                    targets.extend(d.canary.as_ref().map(|c| (c.target.clone(), false)));
                    for (t, stable) in targets {
                        let key = (d.model.clone(), t.version.clone());
                        if !t.engine.has_failed() || !reported.insert(key) {
                            continue;
                        }
                        let actor = Actor {
                            key_id: "engine".into(),
                            reason: Some("the engine thread panicked".into()),
                        };
                        let action = Action::EngineFailed {
                            model: d.model.clone(),
                            version: t.version.clone(),
                        };
                        let _ = me
                            .record(&actor, action, Value::Null, Value::Null, Ok(()))
                            .await;
                        me.hooks.emit(HookEvent::engine_failed(
                            &d.model,
                            &t.version,
                            "the engine thread panicked",
                        ));
                        if stable {
                            me.report_failure(
                                &d.model,
                                Some(&t.version),
                                "the engine thread panicked".into(),
                            )
                            .await;
                        }
                    }
                }
            }
        });
    }

    /// Drops engines of versions that are neither pinned, aliased nor a
    /// shadow's candidate; each stops once its in-flight requests finish.
    fn release_unreferenced(&self, state: &State) {
        let mut engines = self.engines();
        engines.retain(|(m, v), l| {
            let aliased = state
                .models
                .get(m)
                .is_some_and(|e| e.aliases.values().any(|a| a == v));
            let shadowing = state
                .shadows
                .get(m)
                .and_then(|s| s.get("version"))
                .is_some_and(|s| s == v.as_str());
            l.pinned || aliased || shadowing
        });
    }

    /// At startup: registers configured models that are new, points `stable`
    /// at them where the model has none, then loads every stable version.
    /// A model that fails (files gone or changed, a bad configured path) is
    /// reported and skipped so that the others still serve; only when not
    /// one model can be served is that an error. Returns the names served.
    pub async fn restore(
        &self,
        configured: &[crate::config::ModelSpec],
    ) -> anyhow::Result<Vec<String>> {
        let actor = Actor::startup();
        self.restore_drift_settings();
        if self.fleet.is_none() {
            self.settle_interrupted_rollouts()
                .await
                .map_err(|e| anyhow::anyhow!("settling interrupted rollouts: {e}"))?;
        }
        for spec in configured {
            // Replicas of a fleet start together and may race to register
            // the same files: the loser catches up and looks again.
            let mut tries = if self.fleet.is_some() { 3 } else { 0 };
            while let Err(e) = self.restore_configured(&actor, spec).await {
                if tries > 0 {
                    tries -= 1;
                    tracing::info!(model = %spec.name, error = format!("{e:#}"), "another replica changed the registry; looking again");
                    let _ = self.catalog().catch_up();
                    continue;
                }
                // The registry may still hold a stable version that serves.
                self.report_failure(&spec.name, None, format!("{e:#}"))
                    .await;
                break;
            }
        }
        // Serve every model with a stable alias.
        let state = self.state().await;
        let mut served = vec![];
        for (name, record) in stable_versions(&state) {
            if self.load_and_serve(name, record).await {
                tracing::info!(model = %name, version = %record.version, "serving");
                served.push(name.clone());
            }
        }
        self.restore_shadows().await;
        self.restore_hooks();
        self.restore_captures();
        // A fleet's rollouts in flight go on: the follower puts their
        // canaries in the table and the leader adopts them.
        *self.seen() = State {
            rollouts: Default::default(),
            ..self.state().await
        };
        let failed = self.failed().clone();
        if served.is_empty() && !failed.is_empty() {
            let why: Vec<String> = failed
                .iter()
                .map(|(m, f)| format!("{m}: {}", f.reason))
                .collect();
            anyhow::bail!("no model can be served: {}", why.join("; "));
        }
        Ok(served)
    }

    /// Registers a configured model if its weights are new, and points
    /// `stable` at it if the model has no stable version yet.
    async fn restore_configured(
        &self,
        actor: &Actor,
        spec: &crate::config::ModelSpec,
    ) -> anyhow::Result<()> {
        let source = spec
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| EMBEDDED.into());
        let state = self.state().await;
        if state.alias(&spec.name, "stable").is_some() {
            tracing::info!(model = %spec.name, "restoring the registry's stable version (the configured path is registered but not forced)");
        }
        let digests = {
            let s = source.clone();
            tokio::task::spawn_blocking(move || {
                if s == EMBEDDED {
                    Ok(registry::Digests::one(crate::engine::embedded::digest()))
                } else {
                    registry::digests(Path::new(&s))
                }
            })
            .await??
        };
        let existing = state
            .models
            .get(&spec.name)
            .and_then(|m| m.versions.values().find(|v| digests.matches(&v.sha256)))
            .map(|v| v.version.clone());
        let version = match existing {
            Some(v) => v,
            None => {
                let rec = self
                    .register(
                        actor,
                        &spec.name,
                        Register {
                            path: source.clone(),
                            version: None,
                            metadata: Value::Null,
                            model_card: None,
                        },
                    )
                    .await?;
                rec.version
            }
        };
        if self.state().await.alias(&spec.name, "stable").is_none() {
            self.set_alias(actor, &spec.name, "stable", Some(&version))
                .await?;
        }
        Ok(())
    }

    /// What serves each model and which versions are loaded.
    /// A model whose stable version failed to load at start has `failed`
    /// set (`{version, reason}`), here and in `llmops models serving`.
    pub async fn serving(&self) -> Value {
        let state = self.state().await;
        let table = self.router.snapshot();
        let failed = self.failed().clone();
        let engines = self.engines();
        let mut models: Vec<Value> = state
            .models
            .iter()
            .map(|(name, m)| {
                let loaded: Vec<&String> = m.order.iter().filter(|v| engines.contains_key(&(name.clone(), (*v).clone()))).collect();
                json!({
                    "model": name,
                    "aliases": m.aliases,
                    "serving": table.models.get(name).map(|d| json!({
                        "version": d.stable.version,
                        "ready": d.stable.engine.is_ready(),
                        "canary": d.canary.as_ref().map(|c| json!({"version": c.target.version, "weight": c.weight_bp / 100})),
                    })),
                    "loaded": loaded,
                    "failed": failed.get(name),
                })
            })
            .collect();
        // A configured model that never got into the registry.
        for (name, f) in failed
            .iter()
            .filter(|(m, _)| !state.models.contains_key(*m))
        {
            models.push(
                json!({"model": name, "aliases": {}, "serving": null, "loaded": [], "failed": f}),
            );
        }
        json!({"models": models})
    }
}

/// Each model's stable version, by the catalog.
fn stable_versions(state: &State) -> impl Iterator<Item = (&String, &VersionRecord)> {
    state
        .models
        .iter()
        .filter_map(|(name, m)| Some((name, m.versions.get(m.aliases.get("stable")?)?)))
}

/// Returns freed heap pages to the OS after a model is unloaded (glibc keeps
/// them otherwise), so resident memory reflects what is loaded.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
