//! Canary rollouts: a candidate version takes a growing, sticky share of a
//! model's traffic in steps; every interval the server compares it with
//! stable over the same window (`monitor::canary`) and moves on, holds,
//! promotes it through the zero-drop swap, or rolls it back, by itself.
//! Every verdict and transition is audited with its numbers.
//!
//! As Argo Rollouts: four verdicts (Successful, Failed, Inconclusive,
//! Error); too few samples is Inconclusive and never a pass; a failure
//! limit; consecutive successes before a step. Unlike Flagger and Argo, the
//! analysis runs in-process on the serving data, canary against stable.
//!
//! After a restart, a rollout that was in flight is rolled back (its canary
//! weight is not restored: the table starts from the stable aliases), and
//! that is audited. An operator restarts it if they want to go on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Actor, ControlError, Controller};
use crate::hooks::EventKind;
use crate::monitor::Variant;
use crate::monitor::canary::{self, Analysis, Report, Verdict};
use crate::monitor::names;
use crate::monitor::window;
use crate::registry::Action;
use crate::router::StickyKey;

tokio::task_local! {
    /// Set while a rollout's driver runs: its records are the leader's, and
    /// a fleet's log takes them only under the leader lease.
    pub(super) static DRIVING: ();
}

/// What to do when a window has too few samples to judge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInconclusive {
    /// Wait for more traffic at the same weight (never a pass).
    #[default]
    Hold,
    /// Count it as a failure.
    Rollback,
}

fn default_steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}
fn default_interval() -> f64 {
    30.0
}
fn default_failure_limit() -> u32 {
    2
}
fn one() -> u32 {
    1
}

/// A rollout as an operator asks for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// The model.
    pub model: String,
    /// The candidate version (registered).
    pub candidate: String,
    /// Canary weights in percent, ascending. Each step below 100 is
    /// analysed; once the last one passes, or the next one is 100 (stable
    /// would have no traffic left to compare with), the candidate is
    /// promoted through the hot swap.
    #[serde(default = "default_steps")]
    pub steps: Vec<u32>,
    /// Seconds between analyses.
    #[serde(default = "default_interval")]
    pub interval_secs: f64,
    /// Seconds at the start of the rollout whose canary requests are not
    /// judged: the candidate starts with a cold prefix cache against a
    /// warm stable, and its first requests pay for that. Default: half the
    /// interval, at most 30 s; 0 judges from the first request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_secs: Option<f64>,
    /// Gates, minimum samples, statistical test.
    #[serde(default)]
    pub analysis: Analysis,
    /// Failed windows (in a row or not, within the rollout) before rollback.
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
    /// Consecutive successful windows before the next step.
    #[serde(default = "one")]
    pub successes_per_step: u32,
    /// What an inconclusive window does.
    #[serde(default)]
    pub on_inconclusive: OnInconclusive,
    /// Analyse and report only: failures are recorded, never acted on.
    #[serde(default)]
    pub dry_run: bool,
    /// Which identity keeps a client on one side within a step.
    #[serde(default)]
    pub sticky_key: StickyKey,
    /// Conditions on the model's shadow comparisons of this candidate
    /// against the stable version (at least `min_samples` of them), checked
    /// before the canary takes any traffic: shadow first, then canary.
    #[serde(default)]
    pub shadow_gates: Vec<crate::shadow::ShadowGate>,
}

impl RolloutSpec {
    /// The warm-up: [`RolloutSpec::warmup_secs`] or its default.
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(
            self.warmup_secs
                .unwrap_or((self.interval_secs / 2.0).min(30.0))
                .max(0.0),
        )
    }

    fn validate(&self) -> Result<(), ControlError> {
        if self.steps.is_empty() || self.steps.iter().any(|&s| s == 0 || s > 100) {
            return Err(ControlError::invalid(
                "steps",
                "steps are canary weights in percent, each in 1..=100",
            ));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ControlError::invalid("steps", "steps must increase"));
        }
        if !(self.interval_secs.is_finite() && self.interval_secs >= 0.05) {
            return Err(ControlError::invalid(
                "interval_secs",
                "interval_secs must be at least 0.05",
            ));
        }
        if let Some(w) = self.warmup_secs
            && !(w.is_finite() && w >= 0.0 && w < self.interval_secs)
        {
            return Err(ControlError::invalid(
                "warmup_secs",
                "warmup_secs must be at least 0 and less than interval_secs",
            ));
        }
        if self.failure_limit == 0 || self.successes_per_step == 0 {
            return Err(ControlError::invalid(
                "failure_limit",
                "failure_limit and successes_per_step must be at least 1",
            ));
        }
        if self.analysis.min_samples == 0 {
            return Err(ControlError::invalid(
                "min_samples",
                "min_samples must be at least 1: no data is never a pass",
            ));
        }
        Ok(())
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Analysing and stepping.
    Progressing,
    /// Held by an operator at its current weight.
    Paused,
    /// The candidate became stable.
    Promoted,
    /// The canary was removed after failed analysis (or a restart).
    RolledBack,
    /// An operator removed the canary.
    Aborted,
}

impl Phase {
    /// Whether the rollout still holds a canary.
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }

    fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }
}

/// One analysis, kept in the rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysed {
    /// When (RFC 3339).
    pub at: String,
    /// Step index and its weight in percent.
    pub step: usize,
    /// The canary's weight during the window.
    pub weight: u32,
    /// Window length in seconds.
    pub window_secs: f64,
    /// The verdict, with every gate's value, threshold and sample counts.
    pub report: Report,
}

/// A rollout's status: durable (each change is a catalog entry) and served
/// by the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// `ro-…`.
    pub id: String,
    /// What was asked.
    pub spec: RolloutSpec,
    /// Where it is.
    pub phase: Phase,
    /// Index into `spec.steps`.
    pub step: usize,
    /// The canary's current weight in percent (0 once finished).
    pub weight: u32,
    /// Successful windows in a row at this step.
    pub successes: u32,
    /// Failed windows so far.
    pub failures: u32,
    /// Inconclusive windows so far.
    pub inconclusive: u32,
    /// Whether the rollout loaded the candidate (and unloads it on rollback).
    pub loaded_candidate: bool,
    /// The stable version when it started.
    pub baseline: String,
    /// Started (RFC 3339).
    pub started: String,
    /// Last change (RFC 3339).
    pub updated: String,
    /// Why it is where it is (the last verdict's reason, or the operator's).
    pub reason: String,
    /// The last analyses, newest last (at most [`HISTORY`]).
    pub history: Vec<Analysed>,
    /// Bumped by every recorded change. The log applies a change only on
    /// top of the revision it was made from, so of two replicas writing
    /// from the same revision (a command on one, the leader's analysis on
    /// another) the first in the log wins and the other is not applied;
    /// an ended rollout is final (see [`crate::registry`]). 0 in entries
    /// written before revisions existed.
    #[serde(default)]
    pub revision: u64,
}

/// Analyses kept per rollout.
pub const HISTORY: usize = 32;

/// An operator's command to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Hold the weight; analyses continue to be skipped.
    Pause,
    /// Go on from where it was paused.
    Resume,
    /// Remove the canary now.
    Abort,
    /// Promote the candidate now, whatever the analysis says.
    Promote,
}

impl std::str::FromStr for Command {
    type Err = ControlError;
    fn from_str(s: &str) -> Result<Self, ControlError> {
        Ok(match s {
            "pause" => Command::Pause,
            "resume" => Command::Resume,
            "abort" => Command::Abort,
            "promote" => Command::Promote,
            other => {
                return Err(ControlError::invalid(
                    "action",
                    format!("unknown rollout action `{other}` (pause, resume, abort, promote)"),
                ));
            }
        })
    }
}

/// A running rollout's mailbox and who sent what.
pub(super) struct Running {
    /// The rollout's id: a driver that ends removes its own entry only.
    id: String,
    tx: mpsc::Sender<(Command, Actor)>,
}

/// What the controller announces in process (the hooks get the same
/// transitions as `rollout_*` events).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RolloutEvent {
    /// A rollout began.
    RolloutStarted {
        /// Its status.
        status: Box<RolloutStatus>,
    },
    /// An analysis ran or the weight changed.
    RolloutStep {
        /// Its status.
        status: Box<RolloutStatus>,
    },
    /// The candidate became stable.
    RolloutPromoted {
        /// Its status.
        status: Box<RolloutStatus>,
    },
    /// The canary was removed (failed analysis, abort or restart).
    RolloutRolledBack {
        /// Its status.
        status: Box<RolloutStatus>,
    },
}

fn new_id() -> String {
    format!("ro-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Controller {
    /// Every rollout the catalog knows, newest first.
    pub async fn rollouts(&self) -> Vec<RolloutStatus> {
        let state = self.state().await;
        let mut all: Vec<RolloutStatus> = state
            .rollouts
            .values()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect();
        all.sort_by(|a, b| b.started.cmp(&a.started));
        all
    }

    /// One rollout.
    pub async fn rollout(&self, id: &str) -> Result<RolloutStatus, ControlError> {
        let state = self.state().await;
        state
            .rollouts
            .get(id)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| ControlError::NotFound(format!("no rollout `{id}`")))
    }

    /// Records a rollout's new status in the catalog (the audit log), its
    /// metrics, and announces it.
    async fn record_rollout(
        &self,
        actor: &Actor,
        status: &mut RolloutStatus,
        event: &str,
    ) -> Result<(), ControlError> {
        status.updated = crate::registry::now_rfc3339();
        status.revision += 1;
        // An end frees the model before it is written: a client that reads
        // the end may start the next rollout at once (its canary is gone
        // already; the record below is this rollout's last).
        if !status.phase.is_active() {
            self.forget_driver(&status.spec.model, &status.id);
        }
        let value = serde_json::to_value(&*status)
            .map_err(|e| ControlError::Internal(format!("rollout status: {e}")))?;
        self.record(
            actor,
            Action::Rollout {
                model: status.spec.model.clone(),
                id: status.id.clone(),
                event: event.to_string(),
                status: value.clone(),
            },
            serde_json::Value::Null,
            serde_json::json!({"phase": status.phase, "weight": status.weight, "reason": status.reason}),
            Ok(()),
        )
        .await?;
        let model = status.spec.model.clone();
        metrics::gauge!(names::ROLLOUT_WEIGHT, "model" => model.clone())
            .set(f64::from(status.weight));
        metrics::counter!(names::ROLLOUT_TRANSITIONS, "model" => model, "event" => event.to_string())
            .increment(1);
        let boxed = Box::new(status.clone());
        let (ev, hook) = match status.phase {
            Phase::Promoted => (
                RolloutEvent::RolloutPromoted { status: boxed },
                EventKind::RolloutPromoted { rollout: value },
            ),
            Phase::RolledBack => (
                RolloutEvent::RolloutRolledBack { status: boxed },
                EventKind::RolloutRolledBack { rollout: value },
            ),
            Phase::Aborted => (
                RolloutEvent::RolloutRolledBack { status: boxed },
                EventKind::RolloutAborted { rollout: value },
            ),
            _ if event == "started" => (
                RolloutEvent::RolloutStarted { status: boxed },
                EventKind::RolloutStarted { rollout: value },
            ),
            _ => (
                RolloutEvent::RolloutStep { status: boxed },
                EventKind::RolloutStep { rollout: value },
            ),
        };
        let _ = self.rollout_events.send(ev);
        self.hooks.emit(crate::hooks::Event::new(
            &status.spec.model,
            Some(&status.spec.candidate),
            hook,
        ));
        Ok(())
    }

    /// Starts a rollout: loads the candidate if needed, sends it the first
    /// step's share, and analyses every interval until it is promoted or
    /// rolled back.
    pub async fn start_rollout(
        self: &Arc<Self>,
        actor: &Actor,
        spec: RolloutSpec,
    ) -> Result<RolloutStatus, ControlError> {
        spec.validate()?;
        let _write = self.write_turn().await;
        let state = self.state().await;
        let model = spec.model.clone();
        let Some(deployment) = self.router.deployment(&model) else {
            return Err(ControlError::NotFound(format!(
                "model `{model}` is not served"
            )));
        };
        let record = state
            .version(&model, &spec.candidate)
            .cloned()
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "model `{model}` has no version `{}`",
                    spec.candidate
                ))
            })?;
        if deployment.stable.version == spec.candidate {
            return Err(ControlError::Conflict(format!(
                "version `{}` is already stable",
                spec.candidate
            )));
        }
        if deployment.canary.is_some()
            || self
                .rollouts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&model)
        {
            return Err(ControlError::Conflict(format!(
                "model `{model}` already has a canary; abort it first"
            )));
        }
        self.check_shadow_gates(&spec, &deployment)?;
        let was_loaded = self
            .engines()
            .contains_key(&(model.clone(), spec.candidate.clone()));
        let engine = self.ensure_loaded(&model, &record, true).await?;
        // A canary's latencies and outputs are compared with stable's on the
        // same prompts, tokenized once by the front end for the version
        // picked; another tokenizer is another model, not a candidate.
        if let Err(e) = super::same_tokenizer(
            &deployment.stable,
            &spec.candidate,
            &engine,
            "a canary is compared with stable on the same requests",
        ) {
            if !was_loaded {
                self.unpin(&model, &spec.candidate);
            }
            return Err(e);
        }
        let target = Arc::new(crate::router::Target {
            version: spec.candidate.clone(),
            engine,
        });
        let now = crate::registry::now_rfc3339();
        let mut status = RolloutStatus {
            id: new_id(),
            phase: Phase::Progressing,
            step: 0,
            weight: spec.steps[0],
            successes: 0,
            failures: 0,
            inconclusive: 0,
            loaded_candidate: !was_loaded,
            baseline: deployment.stable.version.clone(),
            started: now.clone(),
            updated: now,
            reason: format!("started at {}%", spec.steps[0]),
            history: vec![],
            spec,
            revision: 0,
        };
        // Recorded first: a canary whose rollout could not be written would
        // take traffic that nothing analyses and nothing can abort.
        if let Err(e) = self.record_rollout(actor, &mut status, "started").await {
            if !was_loaded {
                self.unpin(&model, &status.spec.candidate);
            }
            return Err(e);
        }
        self.router.set_canary(
            &model,
            target,
            status.weight * 100,
            status.spec.sticky_key,
            crate::router::split::salt_of(&status.id),
        );
        tracing::info!(model, id = %status.id, candidate = %status.spec.candidate, weight = status.weight, key = %actor.key_id, "rollout started");
        // In a fleet the leader drives it (this replica, or the one that
        // adopts it when the entry reaches it).
        if self.leads() {
            self.drive_here(status.clone());
        }
        Ok(status)
    }

    /// Starts the task that analyses `status` every interval, unless one
    /// here drives the model's rollout already; `true` when it started.
    pub(super) fn drive_here(self: &Arc<Self>, status: RolloutStatus) -> bool {
        let mut running = self.rollouts.lock().unwrap_or_else(|p| p.into_inner());
        if running.contains_key(&status.spec.model) {
            return false;
        }
        let (tx, rx) = mpsc::channel(8);
        running.insert(
            status.spec.model.clone(),
            Running {
                id: status.id.clone(),
                tx,
            },
        );
        let me = self.clone();
        tokio::spawn(DRIVING.scope((), async move { me.drive(status, rx).await }));
        true
    }

    /// A rollout with shadow gates starts only when the model's shadow of
    /// this candidate has compared it with the stable version enough times
    /// and every gate holds.
    fn check_shadow_gates(
        &self,
        spec: &RolloutSpec,
        deployment: &crate::router::Deployment,
    ) -> Result<(), ControlError> {
        if spec.shadow_gates.is_empty() {
            return Ok(());
        }
        let Some(shadow) = deployment
            .shadow
            .as_ref()
            .filter(|s| s.target.version == spec.candidate)
        else {
            return Err(ControlError::Conflict(format!(
                "the rollout has shadow gates but `{}` is not shadowing `{}`: set a shadow first",
                spec.candidate, spec.model
            )));
        };
        let totals = shadow
            .mirror
            .aggregate(&deployment.stable.version)
            .unwrap_or_default();
        let min = spec.analysis.min_samples as u64;
        let failed: Vec<String> = spec
            .shadow_gates
            .iter()
            .filter_map(|g| g.check(&totals, min).err())
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Conflict(format!(
                "shadow gates not met: {}",
                failed.join("; ")
            )))
        }
    }

    /// Sends an operator's command to the model's running rollout.
    pub async fn command_rollout(
        &self,
        actor: &Actor,
        id: &str,
        command: Command,
    ) -> Result<RolloutStatus, ControlError> {
        if self.is_fleet() {
            // Judge the command against the newest status, not the one the
            // follow loop last read.
            let _ = self.catalog().catch_up();
        }
        let status = self.rollout(id).await?;
        if !status.phase.is_active() {
            return Err(ControlError::Conflict(format!(
                "rollout `{id}` has ended ({})",
                status.phase.as_str()
            )));
        }
        let tx = self
            .rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&status.spec.model)
            .map(|r| r.tx.clone());
        let Some(tx) = tx else {
            if self.is_fleet() {
                // The leader drives it elsewhere: the command is recorded
                // here, and the leader's driver reads it from the log. The
                // log applies it only over the revision it was made from:
                // if the leader wrote first, it is made again on top.
                let mut status = status;
                for _ in 0..10 {
                    let mut mine = status.clone();
                    let applied = self.apply_command(&mut mine, command, actor).await;
                    let now = self.rollout(id).await?;
                    if let Err(e) = applied {
                        // Refused as stale when the log moved since `status`.
                        if now.revision == status.revision {
                            return Err(e);
                        }
                    } else if now.revision == mine.revision && now.updated == mine.updated {
                        return Ok(now);
                    }
                    if !now.phase.is_active() {
                        return Err(ControlError::Conflict(format!(
                            "rollout `{id}` has ended ({})",
                            now.phase.as_str()
                        )));
                    }
                    status = now;
                }
                return Err(ControlError::Conflict(format!(
                    "rollout `{id}` kept changing under the command; try again"
                )));
            }
            return Err(ControlError::Conflict(format!(
                "rollout `{id}` is not running"
            )));
        };
        tx.send((command, actor.clone()))
            .await
            .map_err(|_| ControlError::Conflict(format!("rollout `{id}` has ended")))?;
        // The driver acknowledges by recording; give it a moment so the
        // answer shows the command's effect.
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = self.rollout(id).await?;
            if now.updated != status.updated {
                return Ok(now);
            }
        }
        self.rollout(id).await
    }

    /// The rollout's loop: wait an interval (or a command), analyse, act.
    async fn drive(
        self: Arc<Self>,
        mut status: RolloutStatus,
        mut commands: mpsc::Receiver<(Command, Actor)>,
    ) {
        let model = status.spec.model.clone();
        let system = Actor {
            key_id: "rollout".into(),
            reason: Some(format!("rollout {}", status.id)),
        };
        let interval = Duration::from_secs_f64(status.spec.interval_secs);
        let mut window_start = Instant::now();
        // A fresh rollout's first requests meet the candidate's cold prefix
        // cache: they are not judged (a resumed one is warm by now).
        let mut judged_from = if status.history.is_empty() {
            window_start + status.spec.warmup()
        } else {
            window_start
        };
        loop {
            if self.is_fleet() {
                // Another replica may have paused, resumed, promoted or
                // aborted it, and only the leader drives.
                if !self.leads() {
                    tracing::info!(model, id = %status.id, "no longer the leader; another replica drives the rollout");
                    break;
                }
                if let Ok(now) = self.rollout(&status.id).await
                    && (now.updated != status.updated || now.revision != status.revision)
                {
                    status = now;
                }
                if !status.phase.is_active() {
                    break;
                }
            }
            let command = tokio::select! {
                c = commands.recv() => c,
                _ = tokio::time::sleep_until((window_start + interval).into()) => None,
            };
            // In a fleet a command may have reached another replica while
            // this one slept: the log's status wins over this copy, and the
            // window it slept through is not judged against it. Leadership
            // is checked again right before the write.
            if command.is_none() && self.is_fleet() {
                if !self.leads() {
                    tracing::info!(model, id = %status.id, "no longer the leader; another replica drives the rollout");
                    break;
                }
                if let Ok(now) = self.rollout(&status.id).await
                    && now.revision != status.revision
                {
                    status = now;
                    window_start = Instant::now();
                    judged_from = window_start;
                    if !status.phase.is_active() {
                        break;
                    }
                    continue;
                }
            }
            let base = status.revision;
            let outcome = match command {
                Some((c, actor)) => self.apply_command(&mut status, c, &actor).await,
                None if status.phase == Phase::Paused => {
                    window_start = Instant::now();
                    continue;
                }
                None => {
                    let end = Instant::now();
                    let from = window_start.max(judged_from).min(end);
                    let r = self.analyse_window(&mut status, from, end, &system).await;
                    window_start = end;
                    judged_from = end;
                    r
                }
            };
            if let Err(e) = outcome {
                // In a fleet, a write refused because another replica wrote
                // first, or because this replica's leader lease ended (the
                // write is fenced), leaves this copy (and perhaps the
                // router) ahead of the log: hand the rollout back to the
                // log's state, which adopts it again from there if this
                // replica still leads.
                if self.is_fleet()
                    && let Ok(now) = self.rollout(&status.id).await
                    && (now.revision != base || !self.leads())
                {
                    tracing::info!(model, id = %status.id, reason = %e, "another replica changed the rollout first; following the log");
                    self.forget_driver(&model, &status.id);
                    self.reconcile().await;
                    return;
                }
                tracing::error!(model, id = %status.id, error = %e, "rollout step failed");
            }
            if !status.phase.is_active() {
                break;
            }
        }
        self.forget_driver(&model, &status.id);
    }

    /// Drops the model's driver entry if it is rollout `id`'s. Called as
    /// soon as the end is recorded, so that a client who reads "promoted"
    /// can start the next rollout at once.
    fn forget_driver(&self, model: &str, id: &str) {
        let mut running = self.rollouts.lock().unwrap_or_else(|p| p.into_inner());
        if running.get(model).is_some_and(|r| r.id == id) {
            running.remove(model);
        }
    }

    async fn apply_command(
        &self,
        status: &mut RolloutStatus,
        command: Command,
        actor: &Actor,
    ) -> Result<(), ControlError> {
        let why = |what: &str| match &actor.reason {
            Some(r) => format!("{what} by {}: {r}", actor.key_id),
            None => format!("{what} by {}", actor.key_id),
        };
        match command {
            Command::Pause if status.phase == Phase::Progressing => {
                status.phase = Phase::Paused;
                status.reason = why("paused");
                self.record_rollout(actor, status, "paused").await
            }
            Command::Resume if status.phase == Phase::Paused => {
                status.phase = Phase::Progressing;
                status.reason = why("resumed");
                self.record_rollout(actor, status, "resumed").await
            }
            Command::Abort => {
                self.roll_back(status, Phase::Aborted, why("aborted"), actor)
                    .await
            }
            Command::Promote => self.promote(status, why("promoted"), actor).await,
            // Pause while paused, resume while progressing: nothing to do,
            // but the caller waits for an answer.
            _ => self.record_rollout(actor, status, "noop").await,
        }
    }

    /// Analyses one window and acts on the verdict.
    async fn analyse_window(
        &self,
        status: &mut RolloutStatus,
        from: Instant,
        to: Instant,
        system: &Actor,
    ) -> Result<(), ControlError> {
        let model = status.spec.model.clone();
        let Some(d) = self.router.deployment(&model) else {
            return self
                .roll_back(
                    status,
                    Phase::RolledBack,
                    "the model is no longer served".into(),
                    system,
                )
                .await;
        };
        let Some(canary_target) = d.canary.as_ref().map(|c| c.target.clone()) else {
            return self
                .roll_back(
                    status,
                    Phase::RolledBack,
                    "the canary was removed from the table".into(),
                    system,
                )
                .await;
        };
        let mut stable = d.stable.engine.window().between(Variant::Stable, from, to);
        let mut canary = canary_target
            .engine
            .window()
            .between(Variant::Canary, from, to);
        // A fleet's leader judges every replica's traffic.
        let others = self.fleet_samples(&model, window::wall_ms(from), window::wall_ms(to));
        stable.extend(others.stable);
        canary.extend(others.canary);
        let mut report = canary::analyse(&status.spec.analysis, &stable, &canary);
        // A split that did not hold (a few sticky clients, one key for
        // everyone) never passes a window.
        if report.verdict == Verdict::Successful
            && let Some(why) =
                canary::split_check(&status.spec.analysis, status.weight, &stable, &canary)
        {
            report.verdict = Verdict::Inconclusive;
            report.reason = why;
        }
        // A window that lacks a replica's traffic is not judged on the
        // rest (the missing share could be where the canary fails).
        if !others.missing.is_empty()
            && matches!(report.verdict, Verdict::Successful | Verdict::Failed)
        {
            report.verdict = Verdict::Inconclusive;
            report.reason = format!(
                "the window lacks samples from {}",
                others.missing.join(", ")
            );
        }
        // A dead engine is a failed check whatever its last samples said,
        // on this replica or any other.
        let canary_failed_elsewhere: Vec<&String> = others
            .failed
            .iter()
            .filter(|f| f.ends_with(": canary"))
            .collect();
        if canary_target.engine.has_failed() {
            report.verdict = Verdict::Failed;
            report.reason = "the canary's engine thread panicked".into();
        } else if !canary_failed_elsewhere.is_empty() {
            report.verdict = Verdict::Failed;
            report.reason = format!(
                "the canary's engine failed on another replica ({})",
                canary_failed_elsewhere
                    .iter()
                    .map(|s| s.trim_end_matches(": canary"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        } else if d.stable.engine.has_failed() {
            report.verdict = Verdict::Error;
            report.reason = "the stable engine failed; nothing to compare with".into();
        }
        self.record_report_metrics(&model, &report);
        status.history.push(Analysed {
            at: crate::registry::now_rfc3339(),
            step: status.step,
            weight: status.weight,
            window_secs: (to - from).as_secs_f64(),
            report: report.clone(),
        });
        if status.history.len() > HISTORY {
            status.history.remove(0);
        }
        status.reason = report.reason.clone();
        let dry = status.spec.dry_run;
        match report.verdict {
            Verdict::Successful => {
                status.successes += 1;
                if status.successes >= status.spec.successes_per_step {
                    status.successes = 0;
                    let next = status.spec.steps.get(status.step + 1).copied();
                    match next {
                        // A step below 100%: more traffic, analysed again.
                        Some(w) if w < 100 => {
                            status.step += 1;
                            status.weight = w;
                            self.router.set_canary_weight(&model, w * 100);
                            status.reason = format!("step {} passed; weight now {w}%", status.step);
                        }
                        // The next step sends everything to the candidate,
                        // or there is none: nothing is left to compare with,
                        // so the candidate becomes stable through the swap.
                        _ if !dry => {
                            if next.is_some() {
                                status.step += 1;
                            }
                            let why = format!("every step passed (last: {})", report.reason);
                            return self.promote(status, why, system).await;
                        }
                        _ => {
                            status.reason = format!(
                                "dry run: every step passed, the candidate would be promoted ({})",
                                report.reason
                            );
                        }
                    }
                }
            }
            Verdict::Failed | Verdict::Error => {
                status.successes = 0;
                status.failures += 1;
                if status.failures >= status.spec.failure_limit && !dry {
                    let why = format!(
                        "{} failed windows (limit {}): {}",
                        status.failures, status.spec.failure_limit, report.reason
                    );
                    return self.roll_back(status, Phase::RolledBack, why, system).await;
                }
            }
            Verdict::Inconclusive => {
                status.successes = 0;
                status.inconclusive += 1;
                if status.spec.on_inconclusive == OnInconclusive::Rollback {
                    status.failures += 1;
                    if status.failures >= status.spec.failure_limit && !dry {
                        let why = format!(
                            "{} windows without enough data count as failures: {}",
                            status.failures, report.reason
                        );
                        return self.roll_back(status, Phase::RolledBack, why, system).await;
                    }
                }
            }
        }
        self.record_rollout(system, status, "analysis").await
    }

    fn record_report_metrics(&self, model: &str, report: &Report) {
        metrics::counter!(names::ROLLOUT_VERDICTS, "model" => model.to_string(), "verdict" => report.verdict.as_str())
            .increment(1);
        for g in &report.gates {
            let gate = g.metric.as_str();
            if let Some(v) = g.canary {
                metrics::gauge!(names::ROLLOUT_GATE_VALUE, "model" => model.to_string(), "gate" => gate, "variant" => "canary").set(v);
            }
            if let Some(v) = g.stable {
                metrics::gauge!(names::ROLLOUT_GATE_VALUE, "model" => model.to_string(), "gate" => gate, "variant" => "stable").set(v);
            }
        }
    }

    /// Makes the candidate stable through the hot swap.
    async fn promote(
        &self,
        status: &mut RolloutStatus,
        why: String,
        actor: &Actor,
    ) -> Result<(), ControlError> {
        let model = status.spec.model.clone();
        let swap_actor = Actor {
            key_id: actor.key_id.clone(),
            reason: Some(format!("rollout {}: {why}", status.id)),
        };
        self.set_alias(&swap_actor, &model, "stable", Some(&status.spec.candidate))
            .await?;
        self.unpin(&model, &status.spec.candidate);
        status.phase = Phase::Promoted;
        status.weight = 0;
        status.reason = why;
        tracing::info!(model, id = %status.id, version = %status.spec.candidate, "rollout promoted");
        self.record_rollout(actor, status, "promoted").await
    }

    /// Removes the canary; unloads the candidate if the rollout loaded it.
    async fn roll_back(
        &self,
        status: &mut RolloutStatus,
        phase: Phase,
        why: String,
        actor: &Actor,
    ) -> Result<(), ControlError> {
        let model = status.spec.model.clone();
        self.router.clear_canary(&model);
        if status.loaded_candidate {
            self.unpin(&model, &status.spec.candidate);
        }
        status.phase = phase;
        status.weight = 0;
        status.reason = why;
        tracing::warn!(model, id = %status.id, reason = %status.reason, "rollout rolled back");
        self.record_rollout(actor, status, phase.as_str()).await
    }

    /// Lets the alias bookkeeping decide whether a version stays loaded.
    pub(super) fn unpin(&self, model: &str, version: &str) {
        if let Some(l) = self
            .engines()
            .get_mut(&(model.to_string(), version.to_string()))
        {
            l.pinned = false;
        }
        let state = self.catalog().state().clone();
        self.release_unreferenced(&state);
    }

    /// At start: rollouts the catalog has in flight are rolled back, since
    /// the table is rebuilt from the stable aliases alone.
    pub(super) async fn settle_interrupted_rollouts(&self) -> Result<(), ControlError> {
        let actor = Actor::startup();
        for mut status in self.rollouts().await {
            if status.phase.is_active() {
                status.phase = Phase::RolledBack;
                status.weight = 0;
                status.reason =
                    "the server restarted during the rollout; rolled back (start it again to continue)"
                        .into();
                self.record_rollout(&actor, &mut status, "rolled_back")
                    .await?;
            }
        }
        Ok(())
    }
}
