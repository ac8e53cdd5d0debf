//! The closed loop: drift → hooks → retrain → shadow → canary → promote.
//!
//! The drift monitor announces state changes of every version; this file
//! listens. Every change goes out as a `drift_detected` / `drift_resolved`
//! hook event. When the *stable* version of a model enters drift, the
//! model's policy says how far the server goes by itself:
//!
//! - `notify`: the hook event only (the default);
//! - `train_and_shadow`: fine-tune the stable version on the model's
//!   captured traffic (plus the replay share of its original data), gate
//!   the result offline, register it and shadow it; an operator decides
//!   the canary;
//! - `full`: then, once the shadow has compared enough requests, a canary
//!   rollout with the shadow gates, which promotes or rolls back by itself.
//!
//! One loop per model at a time, and none again within the cooldown after
//! one began. Every step is audited (`autopilot` entries) and every
//! training and rollout step also goes out as its own hook event.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::retrain::{RetrainOutcome, RetrainSpec};
use super::rollout::{Phase, RolloutEvent, RolloutSpec};
use super::{Actor, ControlError, Controller};
use crate::hooks::Event as HookEvent;
use crate::monitor::drift::{DriftTransition, Level};
use crate::registry::Action;
use crate::shadow::{Mode, ShadowGate, ShadowSpec};

/// How far the server goes by itself when a model's stable version drifts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Send the hook events; do nothing else.
    #[default]
    Notify,
    /// Retrain, gate, register and shadow the result.
    TrainAndShadow,
    /// Then canary it, promoting or rolling back by the analysis.
    Full,
}

impl Policy {
    fn as_str(self) -> &'static str {
        match self {
            Policy::Notify => "notify",
            Policy::TrainAndShadow => "train_and_shadow",
            Policy::Full => "full",
        }
    }
}

/// The shadow step of the loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopShadow {
    /// Share of requests mirrored (default 1).
    pub rate: f64,
    /// `generate` or `score` (default `score`: one prefill per copy).
    pub mode: Mode,
    /// Comparisons before the canary may start (default 20).
    pub min_samples: u64,
    /// Longest wait for them, in seconds (default 600); past it the loop
    /// stops with the shadow left on for an operator.
    pub wait_secs: f64,
    /// Conditions the comparisons must meet before the canary (checked by
    /// the rollout itself, as an operator's rollout with shadow gates).
    pub gates: Vec<ShadowGate>,
}

impl Default for LoopShadow {
    fn default() -> Self {
        Self {
            rate: 1.0,
            mode: Mode::Score,
            min_samples: 20,
            wait_secs: 600.0,
            gates: vec![],
        }
    }
}

/// `[autopilot]`: the loop's policy and the settings of each step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutopilotSpec {
    /// How far to go (default `notify`).
    pub policy: Policy,
    /// Models it acts on; empty: every model.
    pub models: Vec<String>,
    /// Seconds after a loop began before another may begin for the same
    /// model (default 3600).
    pub cooldown_secs: f64,
    /// Training data besides the model's captured traffic.
    pub data: Vec<PathBuf>,
    /// The retrain's settings (`data` is the capture plus the above).
    pub retrain: RetrainSpec,
    /// The shadow step.
    pub shadow: LoopShadow,
    /// The canary's settings: a rollout spec without `model` and
    /// `candidate` (and with the shadow step's gates).
    pub rollout: serde_json::Map<String, Value>,
}

impl Default for AutopilotSpec {
    fn default() -> Self {
        Self {
            policy: Policy::Notify,
            models: vec![],
            cooldown_secs: 3600.0,
            data: vec![],
            retrain: RetrainSpec::default(),
            shadow: LoopShadow::default(),
            rollout: serde_json::Map::new(),
        }
    }
}

impl AutopilotSpec {
    /// Parses and checks `[autopilot]` (absent: the defaults, `notify`).
    pub fn from_config(value: Option<&Value>) -> Result<Self, String> {
        let Some(v) = value else {
            return Ok(Self::default());
        };
        let spec: Self = serde_path_to_error::deserialize(v.clone())
            .map_err(|e| format!("autopilot.{}: {}", e.path(), e.inner()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what can be checked before any drift: the rollout template
    /// must make a valid rollout.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.cooldown_secs.is_finite() && self.cooldown_secs >= 0.0) {
            return Err("autopilot.cooldown_secs must be a number of seconds ≥ 0".into());
        }
        if !(self.shadow.wait_secs.is_finite() && self.shadow.wait_secs > 0.0) {
            return Err("autopilot.shadow.wait_secs must be > 0".into());
        }
        self.rollout_spec("model", "candidate").map(|_| ())
    }

    fn applies_to(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    fn rollout_spec(&self, model: &str, candidate: &str) -> Result<RolloutSpec, String> {
        let mut m = self.rollout.clone();
        for key in ["model", "candidate", "shadow_gates"] {
            if m.contains_key(key) {
                return Err(format!(
                    "autopilot.rollout.{key} is set by the loop, not the settings"
                ));
            }
        }
        m.insert("model".into(), json!(model));
        m.insert("candidate".into(), json!(candidate));
        m.insert("shadow_gates".into(), json!(self.shadow.gates));
        serde_path_to_error::deserialize(Value::Object(m))
            .map_err(|e| format!("autopilot.rollout.{}: {}", e.path(), e.inner()))
    }
}

/// The loop's bookkeeping: when each model's last loop began, and what
/// each model's loop is doing now (for the admin API).
#[derive(Default)]
pub(super) struct Loops {
    began: HashMap<String, Instant>,
    running: HashMap<String, Value>,
}

fn actor(reason: String) -> Actor {
    Actor {
        key_id: "autopilot".into(),
        reason: Some(reason),
    }
}

impl Controller {
    /// Starts listening to drift changes: hook events for all, and the
    /// loop for stable versions under the policy. Call once, at start.
    /// `spec` is `[autopilot]` from the file; settings set through the
    /// admin API (audited) take its place until cleared.
    pub fn start_autopilot(self: &Arc<Self>, spec: AutopilotSpec) {
        *self
            .autopilot_file
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = spec;
        self.restore_autopilot_settings();
        let mut rx = self.drift_events();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(t) => me.on_drift(t).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "autopilot missed drift changes");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    fn autopilot_spec(&self) -> std::sync::MutexGuard<'_, AutopilotSpec> {
        self.autopilot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn loops(&self) -> std::sync::MutexGuard<'_, Loops> {
        self.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The policy and each model's running loop.
    pub fn autopilot_status(&self) -> Value {
        let spec = self.autopilot_spec().clone();
        let running = self.loops().running.clone();
        let source = if self.catalog().state().autopilot.is_some() {
            "admin"
        } else {
            "config"
        };
        json!({"settings": spec, "source": source, "running": running})
    }

    /// Replaces the loop's settings (checked like `[autopilot]`; audited,
    /// restored at start, in force until cleared). A loop already running
    /// finishes under the settings it began with.
    pub async fn set_autopilot(
        &self,
        actor: &Actor,
        settings: Value,
    ) -> Result<Value, ControlError> {
        self.change_autopilot(actor, Some(settings)).await
    }

    /// Drops the settings set through the admin API: `[autopilot]` from
    /// the file applies again.
    pub async fn clear_autopilot(&self, actor: &Actor) -> Result<Value, ControlError> {
        self.change_autopilot(actor, None).await
    }

    async fn change_autopilot(
        &self,
        actor: &Actor,
        settings: Option<Value>,
    ) -> Result<Value, ControlError> {
        let _write = self.write_turn().await;
        let previous = json!(self.autopilot_spec().clone());
        let action = Action::AutopilotSettings {
            settings: settings.clone(),
        };
        let spec = match &settings {
            Some(v) => AutopilotSpec::from_config(Some(v)),
            None => Ok(self
                .autopilot_file
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()),
        };
        let spec = match spec {
            Ok(s) => s,
            Err(m) => {
                let e = ControlError::invalid("settings", m);
                self.record(actor, action, previous, Value::Null, Err(e.to_string()))
                    .await?;
                return Err(e);
            }
        };
        self.record(actor, action, previous, json!(spec), Ok(()))
            .await?;
        tracing::info!(policy = spec.policy.as_str(), key = %actor.key_id, reason = ?actor.reason, "autopilot settings changed");
        *self.autopilot_spec() = spec;
        Ok(self.autopilot_status())
    }

    /// The settings in force: the admin API's from the catalog, or else
    /// `[autopilot]` from the file.
    pub(super) fn restore_autopilot_settings(&self) {
        let file = self
            .autopilot_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stored = self.catalog().state().autopilot.clone();
        let spec = match stored.map(|v| AutopilotSpec::from_config(Some(&v))) {
            None => file,
            Some(Ok(s)) => {
                tracing::info!(
                    policy = s.policy.as_str(),
                    "autopilot settings restored from the admin API"
                );
                s
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "stored autopilot settings refused; the file's apply");
                file
            }
        };
        *self.autopilot_spec() = spec;
    }

    async fn on_drift(self: &Arc<Self>, t: DriftTransition) {
        let details = serde_json::to_value(&t).unwrap_or(Value::Null);
        match t.to {
            Level::Drift => {
                self.hooks
                    .emit(HookEvent::drift_detected(&t.model, &t.version, details));
            }
            Level::Ok if t.from == Level::Drift => {
                self.hooks
                    .emit(HookEvent::drift_resolved(&t.model, &t.version, details));
                return;
            }
            _ => return,
        }
        let stable = self
            .router
            .deployment(&t.model)
            .map(|d| d.stable.version.clone());
        if stable.as_deref() != Some(t.version.as_str()) {
            return;
        }
        // In a fleet every replica judges its own traffic and tells the
        // hooks; the loop starts once, on the leader, when most replicas
        // are in drift (`fleet::judge_fleet_drift`).
        if self.is_fleet() {
            return;
        }
        let reason = format!(
            "drift on `{}` version `{}` (window {}): {}",
            t.model,
            t.version,
            t.window_index,
            t.signals
                .iter()
                .map(|s| format!("{:?} {:.3}", s.signal, s.score))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.begin_loop(&t.model, reason).await;
    }

    /// Drift of `model`'s stable version, judged here or by the fleet:
    /// the loop under the policy, unless one runs or the cooldown holds.
    pub(super) async fn begin_loop(self: &Arc<Self>, model: &str, reason: String) {
        let spec = self.autopilot_spec().clone();
        if !spec.applies_to(model) {
            return;
        }
        if spec.policy == Policy::Notify {
            self.step(model, "notified", &reason, json!({"policy": "notify"}))
                .await;
            return;
        }
        {
            let mut loops = self.loops();
            if loops.running.contains_key(model) {
                return;
            }
            if let Some(at) = loops.began.get(model)
                && at.elapsed() < Duration::from_secs_f64(spec.cooldown_secs)
            {
                drop(loops);
                tracing::info!(
                    model,
                    "drift during the autopilot's cooldown: not retraining"
                );
                return;
            }
            loops.began.insert(model.to_string(), Instant::now());
            loops.running.insert(
                model.to_string(),
                json!({"step": "started", "reason": reason}),
            );
        }
        let me = self.clone();
        let model = model.to_string();
        tokio::spawn(async move {
            let end = me.run_loop(&model, &spec, &reason).await;
            let (step, detail) = match end {
                Ok((step, detail)) => (step, detail),
                Err(e) => ("stopped", json!({"error": e.to_string()})),
            };
            me.step(&model, step, &reason, detail).await;
            me.loops().running.remove(&model);
        });
    }

    /// Audits one step of a model's loop and shows it in the status.
    async fn step(&self, model: &str, step: &str, reason: &str, detail: Value) {
        if let Some(r) = self.loops().running.get_mut(model) {
            *r = json!({"step": step, "reason": reason, "detail": detail});
        }
        tracing::info!(model, step, %detail, "autopilot");
        let _ = self
            .record(
                &actor(reason.to_string()),
                Action::Autopilot {
                    model: model.to_string(),
                    step: step.to_string(),
                },
                Value::Null,
                detail,
                Ok(()),
            )
            .await;
    }

    /// Retrain → shadow → (canary). Returns the last step's name and detail.
    async fn run_loop(
        self: &Arc<Self>,
        model: &str,
        spec: &AutopilotSpec,
        reason: &str,
    ) -> Result<(&'static str, Value), ControlError> {
        let who = actor(reason.to_string());
        self.step(
            model,
            "started",
            reason,
            json!({"policy": spec.policy.as_str()}),
        )
        .await;
        // 1. Retrain on what was captured (and any configured data).
        let mut data = self.captured_files(model);
        data.extend(spec.data.iter().cloned());
        if data.is_empty() {
            return Ok((
                "stopped",
                json!({"error": format!("no training data: turn capture on for `{model}` or set autopilot.data")}),
            ));
        }
        let mut retrain = spec.retrain.clone();
        retrain.data = data;
        let job = super::retrain::start(self, &who, model, retrain).await?;
        self.step(model, "training", reason, json!({"job": job.id}))
            .await;
        let candidate = match job.wait().await {
            RetrainOutcome::Registered { version, gate, .. } => {
                self.step(
                    model,
                    "trained",
                    reason,
                    json!({"version": version, "gate": gate}),
                )
                .await;
                version
            }
            RetrainOutcome::GateFailed { version, gate, .. } => {
                return Ok(("gate_failed", json!({"version": version, "gate": gate})));
            }
            RetrainOutcome::Cancelled => return Ok(("stopped", json!({"error": "cancelled"}))),
            RetrainOutcome::Failed { error } => {
                return Ok(("stopped", json!({"error": error})));
            }
        };
        // 2. Shadow it until it has compared enough requests.
        let shadow = ShadowSpec {
            version: candidate.clone(),
            rate: spec.shadow.rate,
            mode: spec.shadow.mode,
            ..serde_json::from_value(json!({"version": candidate}))
                .map_err(|e| ControlError::Internal(e.to_string()))?
        };
        self.set_shadow(&who, model, shadow).await?;
        self.step(model, "shadowing", reason, json!({"version": candidate}))
            .await;
        let compared = self
            .await_comparisons(
                model,
                &candidate,
                spec.shadow.min_samples,
                spec.shadow.wait_secs,
            )
            .await;
        if compared < spec.shadow.min_samples {
            return Ok((
                "stopped",
                json!({"error": format!("the shadow compared {compared} requests in {} s, {} needed; the shadow stays on", spec.shadow.wait_secs, spec.shadow.min_samples)}),
            ));
        }
        self.step(
            model,
            "shadowed",
            reason,
            json!({"version": candidate, "compared": compared}),
        )
        .await;
        if spec.policy == Policy::TrainAndShadow {
            return Ok((
                "awaiting_operator",
                json!({"version": candidate, "compared": compared}),
            ));
        }
        // 3. Canary with the shadow's gates; the rollout promotes or rolls
        // back by itself.
        let rollout = spec
            .rollout_spec(model, &candidate)
            .map_err(|m| ControlError::invalid("autopilot.rollout", m))?;
        let mut events = self.rollout_events();
        let started = self.start_rollout(&who, rollout).await;
        // The canary now sees real traffic; the copies have done their part.
        let _ = self.clear_shadow(&who, model).await;
        let status = started?;
        self.step(
            model,
            "canary",
            reason,
            json!({"version": candidate, "rollout": status.id}),
        )
        .await;
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(ControlError::Internal("rollout events closed".into()));
                }
            };
            let (RolloutEvent::RolloutPromoted { status: s }
            | RolloutEvent::RolloutRolledBack { status: s }) = ev
            else {
                continue;
            };
            if s.id != status.id {
                continue;
            }
            let detail = json!({"version": candidate, "rollout": s.id, "reason": s.reason});
            return Ok(match s.phase {
                Phase::Promoted => ("promoted", detail),
                _ => ("rolled_back", detail),
            });
        }
    }

    /// The model's capture segments (oldest first), if capture is on.
    fn captured_files(&self, model: &str) -> Vec<PathBuf> {
        let Ok(dir) = self.capture_export(model) else {
            return vec![];
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// Waits until the model's shadow of `candidate` has compared `min`
    /// requests (or `wait_secs` pass); returns how many it compared.
    async fn await_comparisons(
        &self,
        model: &str,
        candidate: &str,
        min: u64,
        wait_secs: f64,
    ) -> u64 {
        let deadline = Instant::now() + Duration::from_secs_f64(wait_secs);
        loop {
            let compared = self
                .router
                .deployment(model)
                .and_then(|d| {
                    let shadow = d.shadow.as_ref()?;
                    if shadow.target.version != candidate {
                        return None;
                    }
                    let s = shadow.mirror.aggregate(&d.stable.version)?.summary();
                    Some(
                        s["generate"]["compared"].as_u64().unwrap_or(0)
                            + s["score"]["compared"].as_u64().unwrap_or(0),
                    )
                })
                .unwrap_or(0);
            if compared >= min || Instant::now() >= deadline {
                return compared;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
