//! The retrain action: fine-tune a model's stable version on captured
//! traffic plus a replay share of its original data, in this process and
//! under a CPU budget ([`crate::train::job::TrainJob`]), gate the result
//! offline, and register it with its model card. Every step is audited:
//! `training_started`, then `register_version` and `training_finished`
//! (with the card's digest and whether the gate passed), or
//! `training_failed` (failed or cancelled; nothing is left on disk).
//!
//! The offline gate: the held-out perplexity of the candidate on (a) the
//! reference set and (b) the held-out split of the captured window must not
//! exceed the parent's by more than `max_regression` (relative). The
//! parent's figures are the starting weights' losses on the same examples,
//! computed by the job before its first step.
//!
//! The window check alone is circular (the captured completions are the
//! parent's own outputs), so the gate requires a reference set of at least
//! `min_reference_tokens` target tokens, taken from what the parent did not
//! write: held out of the replay data (with a replay share), else held out
//! of the parent's own data (the files its card names, read for the
//! reference only: the parent's own held-out split when the card gives its
//! split and seed), else the prompts of the window's held-out records. The
//! card's `gate` says which source was used and why the others were not.
//! A candidate that fails is registered all the same, marked
//! `gate.passed = false` in its metadata, and must not be shadowed or
//! canaried; nothing held out at all is a failure, never a pass.
//!
//! One job per model at a time. [`start`] is the entry point for the admin
//! API, `llmops retrain`, and the drift loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Actor, ControlError, Controller, EMBEDDED, Register};
use crate::registry::{self, Action};
use crate::train::job::{CpuBudget, JobError, JobHandle, ProgressSnapshot, TrainJob};
use crate::train::{CARD_FILE, TrainArgs, TrainReport};

/// What a retrain does. Absent fields take the defaults shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrainSpec {
    /// Captured traffic: JSONL (`text`, `prompt`/`completion` or
    /// `messages`) or text files, as `llmops train --data` reads.
    pub data: Vec<PathBuf>,
    /// The parent's original data, replayed; default: the files the
    /// parent's `model_card.json` names.
    pub replay_data: Option<Vec<PathBuf>>,
    /// Share of the training examples drawn from the replay data, [0, 1).
    pub replay_share: f64,
    /// Optimizer steps (default 50).
    pub steps: u64,
    /// Peak learning rate (default 3e-4: a fine-tune, not a fresh start).
    pub lr: f64,
    /// Warm-up steps (default: a tenth of the steps).
    pub warmup: Option<u64>,
    /// Sequences per step (default 8).
    pub batch_size: usize,
    /// Tokens per sequence (default: the parent's, else 128).
    pub seq_len: Option<usize>,
    /// Share of the window held out for the gate (default 0.1).
    pub eval_fraction: f64,
    /// Seed (default: the parent's, else 0).
    pub seed: Option<u64>,
    /// The gate's limit: the candidate's held-out perplexity may exceed
    /// the parent's by at most this fraction (default 0.05).
    pub max_regression: f64,
    /// The smallest reference set the gate accepts as evidence, in target
    /// tokens (default 256).
    pub min_reference_tokens: usize,
    /// How much CPU the job may take from serving.
    pub budget: CpuBudget,
    /// The new version's id (default: the next `vN`).
    pub version: Option<String>,
    /// What the data is (capture time range, counts), as the caller knows
    /// it; recorded in the card beside what is read from the files.
    pub window: Option<Value>,
}

impl Default for RetrainSpec {
    fn default() -> Self {
        Self {
            data: vec![],
            replay_data: None,
            replay_share: 0.2,
            steps: 50,
            lr: 3e-4,
            warmup: None,
            batch_size: 8,
            seq_len: None,
            eval_fraction: 0.1,
            seed: None,
            max_regression: 0.05,
            min_reference_tokens: 256,
            budget: CpuBudget::default(),
            version: None,
            window: None,
        }
    }
}

impl RetrainSpec {
    fn validate(&self) -> Result<(), ControlError> {
        if self.data.is_empty() {
            return Err(ControlError::invalid(
                "data",
                "no training data: name the captured traffic's files",
            ));
        }
        if !(0.0..1.0).contains(&self.replay_share) {
            return Err(ControlError::invalid(
                "replay_share",
                format!("must be in [0, 1), got {}", self.replay_share),
            ));
        }
        if self.steps == 0 || self.steps > 1_000_000 {
            return Err(ControlError::invalid("steps", "must be in 1..=1000000"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(ControlError::invalid("lr", "must be a positive number"));
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return Err(ControlError::invalid("batch_size", "must be in 1..=4096"));
        }
        if self.seq_len.is_some_and(|s| !(2..=1 << 16).contains(&s)) {
            return Err(ControlError::invalid("seq_len", "must be in 2..=65536"));
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return Err(ControlError::invalid(
                "eval_fraction",
                "must be in (0, 1): the gate needs a held-out window",
            ));
        }
        if !(self.max_regression >= 0.0 && self.max_regression.is_finite()) {
            return Err(ControlError::invalid(
                "max_regression",
                "must be a non-negative number",
            ));
        }
        self.budget
            .validate()
            .map_err(|e| ControlError::invalid("budget", e))?;
        if let Some(v) = &self.version {
            super::valid_name("version", v)?;
        }
        Ok(())
    }
}

/// One held-out set's comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateCheck {
    /// `reference` or `window`.
    pub set: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Target tokens evaluated.
    #[serde(default)]
    pub tokens: usize,
    /// The parent's perplexity.
    pub parent_perplexity: f64,
    /// The candidate's perplexity.
    pub candidate_perplexity: f64,
    /// candidate / parent − 1.
    pub change: f64,
    /// Within the limit.
    pub passed: bool,
}

/// Where the gate's reference set came from, and why the sources before
/// it were not used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReferenceSource {
    /// `replay`, `parent_data` or `captured_prompts`; absent when there
    /// was no reference set at all.
    pub source: Option<String>,
    /// The smallest reference set accepted, in target tokens.
    pub min_tokens: usize,
    /// Sources passed over, each with its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed_over: Vec<String>,
}

/// The offline gate's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    /// Every check passed, the reference check among them.
    pub passed: bool,
    /// The limit on the relative change of perplexity.
    pub max_regression: f64,
    /// One per held-out set that was evaluated.
    pub checks: Vec<GateCheck>,
    /// The reference set's origin.
    #[serde(default)]
    pub reference: ReferenceSource,
    /// Why it failed, in words.
    pub reason: Option<String>,
}

impl GateReport {
    /// Judges a finished job's held-out losses: every check within
    /// `max_regression`, and a reference check of at least
    /// `reference.min_tokens` target tokens among them.
    pub fn judge(
        report: &TrainReport,
        max_regression: f64,
        mut reference: ReferenceSource,
    ) -> Self {
        reference.source = report.reference_source.clone();
        let checks: Vec<GateCheck> = report
            .held_out
            .iter()
            .map(|h| {
                let (p, c) = (h.base_perplexity(), h.perplexity());
                let change = c / p - 1.0;
                GateCheck {
                    set: h.name.clone(),
                    examples: h.examples,
                    tokens: h.tokens,
                    parent_perplexity: p,
                    candidate_perplexity: c,
                    change,
                    // NaN (a diverged candidate) fails.
                    passed: change <= max_regression,
                }
            })
            .collect();
        let mut failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| {
                format!(
                    "{} perplexity {:.3} vs the parent's {:.3} ({:+.1}%, limit +{:.1}%)",
                    c.set,
                    c.candidate_perplexity,
                    c.parent_perplexity,
                    c.change * 100.0,
                    max_regression * 100.0
                )
            })
            .collect();
        match checks.iter().find(|c| c.set == "reference") {
            None => failed.push(
                "no reference set: the window's completions are the parent's own outputs, \
                 not evidence alone (give replay data, a parent card naming its data, or \
                 captured prompts)"
                    .into(),
            ),
            Some(c) if c.tokens < reference.min_tokens => failed.push(format!(
                "the reference set ({}) has {} target tokens, fewer than min_reference_tokens {}",
                reference.source.as_deref().unwrap_or("unknown"),
                c.tokens,
                reference.min_tokens
            )),
            Some(_) => {}
        }
        let reason = match (checks.is_empty(), failed.is_empty()) {
            (true, _) => Some("nothing was held out: the gate cannot pass without evidence".into()),
            (false, true) => None,
            (false, false) => Some(failed.join("; ")),
        };
        Self {
            passed: reason.is_none(),
            max_regression,
            checks,
            reference,
            reason,
        }
    }
}

/// How a retrain ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RetrainOutcome {
    /// Registered and the gate passed: ready to shadow and canary.
    Registered {
        /// The new version.
        version: String,
        /// SHA-256 of its `model_card.json`.
        card_sha256: String,
        /// The gate's report.
        gate: GateReport,
    },
    /// Registered for inspection, but the gate failed: not to be shadowed
    /// or canaried.
    GateFailed {
        /// The new version.
        version: String,
        /// SHA-256 of its `model_card.json`.
        card_sha256: String,
        /// The gate's report.
        gate: GateReport,
    },
    /// Cancelled; nothing was registered or left on disk.
    Cancelled,
    /// Failed; nothing was registered or left on disk.
    Failed {
        /// Why.
        error: String,
    },
}

/// A retrain job: its progress, its cancellation and, once it ends, its
/// outcome. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RetrainHandle {
    /// Job id (`rt-…`).
    pub id: String,
    /// Model name.
    pub model: String,
    /// The version being fine-tuned.
    pub parent: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The settings.
    pub spec: RetrainSpec,
    job: JobHandle,
    outcome: tokio::sync::watch::Receiver<Option<RetrainOutcome>>,
    /// Who cancelled it, for the audit entry.
    cancelled_by: Arc<std::sync::Mutex<Option<Actor>>>,
}

impl RetrainHandle {
    /// Training progress now.
    pub fn progress(&self) -> ProgressSnapshot {
        self.job.progress()
    }

    /// The outcome, once the job has ended (trained, gated, registered).
    pub fn outcome(&self) -> Option<RetrainOutcome> {
        self.outcome.borrow().clone()
    }

    /// Still running (training, or registering its result).
    pub fn is_running(&self) -> bool {
        self.outcome.borrow().is_none()
    }

    /// Asks the job to stop (before its next step, or before its result
    /// is registered); `actor` is named in the `training_failed` entry.
    pub fn cancel(&self, actor: &Actor) {
        let mut by = self.cancelled_by.lock().unwrap_or_else(|p| p.into_inner());
        by.get_or_insert_with(|| actor.clone());
        self.job.cancel();
    }

    /// Waits for the outcome.
    pub async fn wait(&self) -> RetrainOutcome {
        let mut rx = self.outcome.clone();
        loop {
            if let Some(o) = rx.borrow_and_update().clone() {
                return o;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone().unwrap_or(RetrainOutcome::Failed {
                    error: "the retrain task ended without an outcome".into(),
                });
            }
        }
    }

    /// The status as the admin API shows it.
    pub fn status(&self) -> Value {
        json!({
            "id": self.id,
            "model": self.model,
            "parent": self.parent,
            "started_at": self.started_at,
            "running": self.is_running(),
            "progress": self.progress(),
            "outcome": self.outcome(),
            "spec": self.spec,
        })
    }
}

/// What the parent's `model_card.json` says about how it was trained.
#[derive(Debug, Default)]
struct ParentCard {
    files: Vec<PathBuf>,
    eval_fraction: Option<f64>,
    seq_len: Option<usize>,
    seed: Option<u64>,
    sha256: Option<String>,
}

fn parent_card(source: &str) -> ParentCard {
    let path = Path::new(source).join(CARD_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return ParentCard::default();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return ParentCard::default();
    };
    use sha2::Digest;
    let d = &v["data"];
    ParentCard {
        files: d["files"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(PathBuf::from))
                    .collect()
            })
            .unwrap_or_default(),
        eval_fraction: d["eval_fraction"].as_f64(),
        seq_len: d["seq_len"].as_u64().map(|s| s as usize),
        seed: d["seed"].as_u64(),
        sha256: Some(hex::encode(sha2::Sha256::digest(&bytes))),
    }
}

/// Records and the time range of JSONL records that carry a `time`,
/// `created` or `timestamp` (what a capture writes), per the files.
fn window_of(files: &[PathBuf]) -> Value {
    let (mut records, mut first, mut last) = (0u64, None::<String>, None::<String>);
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            records += 1;
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let t = ["time", "created", "timestamp"]
                .iter()
                .find_map(|k| match &v[*k] {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
            if let Some(t) = t {
                if first.as_ref().is_none_or(|f| &t < f) {
                    first = Some(t.clone());
                }
                if last.as_ref().is_none_or(|l| &t > l) {
                    last = Some(t);
                }
            }
        }
    }
    json!({"records": records, "first": first, "last": last})
}

fn now_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("rt-{ms}")
}

/// Starts fine-tuning `model`'s stable version under `spec`; returns at
/// once with the job's handle (see the module's comment for what follows).
/// Refused with `Conflict` while another retrain of the model runs.
pub async fn start(
    ctl: &Arc<Controller>,
    actor: &Actor,
    model: &str,
    spec: RetrainSpec,
) -> Result<RetrainHandle, ControlError> {
    spec.validate()?;
    let state = ctl.state().await;
    let parent_version = state
        .alias(model, "stable")
        .ok_or_else(|| ControlError::NotFound(format!("model `{model}` has no stable version")))?
        .to_string();
    let parent = state
        .version(model, &parent_version)
        .cloned()
        .ok_or_else(|| ControlError::NotFound(format!("no version `{parent_version}`")))?;
    let base = if parent.source == EMBEDDED {
        PathBuf::from(EMBEDDED)
    } else if parent.format == "gguf" || Path::new(&parent.source).is_file() {
        return Err(ControlError::invalid(
            "model",
            format!(
                "version `{parent_version}` is a GGUF file; fine-tuning starts from a safetensors folder or the embedded model"
            ),
        ));
    } else {
        PathBuf::from(&parent.source)
    };
    let card = if parent.source == EMBEDDED {
        ParentCard::default()
    } else {
        parent_card(&parent.source)
    };
    let replay = spec
        .replay_data
        .clone()
        .unwrap_or_else(|| card.files.clone());
    let trained = match (&ctl.trained_dir, &ctl.fleet) {
        (Some(dir), _) => dir.clone(),
        (None, None) => ctl.data_dir.join("trained"),
        (None, Some(_)) => {
            return Err(ControlError::Conflict(
                "a fleet retrains into a folder every replica reads: set --trained-dir \
                 (LLMOPS_TRAINED_DIR, [server] trained_dir) to a volume mounted at the \
                 same path on every replica (read-write where the leader runs)"
                    .into(),
            ));
        }
    };
    // Every path is held to the data roots before anything is read: an
    // admin key (or a parent's card) does not make the server's own files
    // training text. Replay data is read only with a replay share.
    let roots = ctl.data_roots();
    for f in &spec.data {
        registry::paths::data_files(f, &roots).map_err(|e| ControlError::invalid("data", e))?;
    }
    let mut reference = ReferenceSource {
        min_tokens: spec.min_reference_tokens,
        ..Default::default()
    };
    if spec.replay_share > 0.0 {
        let field = if spec.replay_data.is_some() {
            "replay_data"
        } else {
            "model_card.data.files"
        };
        for f in &replay {
            registry::paths::data_files(f, &roots).map_err(|e| ControlError::invalid(field, e))?;
        }
    } else {
        reference
            .passed_over
            .push("replay: replay_share is 0".into());
    }
    // Without replay, the parent's own data (as its card names it) gives
    // the reference set, read for that only; a file outside the data roots
    // is passed over, with the reason in the card.
    let parent_data = match (spec.replay_share > 0.0, card.files.is_empty()) {
        (true, _) => vec![],
        (false, true) => {
            reference
                .passed_over
                .push("parent_data: the parent's card names no data files".into());
            vec![]
        }
        (false, false) => match card
            .files
            .iter()
            .try_for_each(|f| registry::paths::data_files(f, &roots).map(drop))
        {
            Ok(()) => card.files.clone(),
            Err(e) => {
                reference.passed_over.push(format!("parent_data: {e}"));
                vec![]
            }
        },
    };
    let id = now_id();
    let out = trained.join(model).join(&id);
    let mut args = TrainArgs::new(spec.data.clone(), out.clone())
        .map_err(|e| ControlError::Internal(e.to_string()))?;
    args.base = Some(base);
    args.replay = if spec.replay_share > 0.0 {
        replay.clone()
    } else {
        vec![]
    };
    args.replay_share = spec.replay_share;
    args.replay_eval_fraction = card.eval_fraction;
    args.reference = parent_data;
    args.steps = spec.steps;
    args.lr = spec.lr;
    args.warmup = spec.warmup.unwrap_or(spec.steps / 10);
    args.batch_size = spec.batch_size;
    args.seq_len = spec.seq_len.or(card.seq_len).unwrap_or(128);
    args.eval_fraction = spec.eval_fraction;
    args.eval_every = 0;
    args.seed = spec.seed.or(card.seed).unwrap_or(0);
    args.quiet = true;

    // The slot is taken before anything is audited or started, so two
    // calls cannot both start.
    let (tx, rx) = tokio::sync::watch::channel(None);
    let handle = {
        let mut jobs = ctl.retrains.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.get(model)
            && j.is_running()
        {
            return Err(ControlError::Conflict(format!(
                "a retrain of `{model}` is running ({}); cancel it first",
                j.id
            )));
        }
        let job = TrainJob::start(args.clone(), spec.budget)
            .map_err(|e| ControlError::Internal(format!("cannot start training: {e:#}")))?;
        let handle = RetrainHandle {
            id: id.clone(),
            model: model.to_string(),
            parent: parent_version.clone(),
            started_at: registry::now_rfc3339(),
            spec: spec.clone(),
            job: job.handle(),
            outcome: rx,
            cancelled_by: Arc::new(std::sync::Mutex::new(None)),
        };
        jobs.insert(model.to_string(), handle.clone());
        (handle, job)
    };
    let (handle, job) = handle;
    let started = ctl
        .record(
            actor,
            Action::TrainingStarted {
                model: model.to_string(),
                job: id.clone(),
                parent: parent_version.clone(),
            },
            Value::Null,
            json!({"spec": spec, "parent_sha256": parent.sha256, "replay_data": args.replay}),
            Ok(()),
        )
        .await;
    if let Err(e) = started {
        handle.cancel(actor);
        let _ = tx.send(Some(RetrainOutcome::Failed {
            error: e.to_string(),
        }));
        return Err(e);
    }
    tracing::info!(model, job = %id, parent = %parent_version, "retrain started");
    ctl.hooks().emit(crate::hooks::Event::training_started(
        model,
        Some(&parent_version),
        json!({"id": id, "spec": spec}),
    ));
    let ctx = Finish {
        ctl: ctl.clone(),
        actor: actor.clone(),
        model: model.to_string(),
        id,
        parent,
        parent_card_sha256: card.sha256,
        reference,
        spec,
        out,
        handle: handle.clone(),
    };
    tokio::spawn(async move {
        let outcome = ctx.finish(job).await;
        let _ = tx.send(Some(outcome));
    });
    Ok(handle)
}

/// What the task that waits for the job needs.
struct Finish {
    ctl: Arc<Controller>,
    actor: Actor,
    model: String,
    id: String,
    parent: registry::VersionRecord,
    parent_card_sha256: Option<String>,
    /// The reference set's settings and the sources passed over.
    reference: ReferenceSource,
    spec: RetrainSpec,
    out: PathBuf,
    handle: RetrainHandle,
}

impl Finish {
    async fn finish(self, job: TrainJob) -> RetrainOutcome {
        let joined = tokio::task::spawn_blocking(move || job.join()).await;
        let result = match joined {
            Ok(r) => r,
            Err(e) => Err(JobError::Failed(anyhow::anyhow!("{e}"))),
        };
        let report = match result {
            Ok(_) if self.handle.job.is_cancelled() => Err(JobError::Cancelled),
            other => other,
        };
        let outcome = match report {
            Ok(report) => self.register(&report).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(o) => o,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&self.out).await;
                let cancelled = matches!(e, JobError::Cancelled);
                let by = self
                    .handle
                    .cancelled_by
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let actor = match (cancelled, by) {
                    (true, Some(a)) => a,
                    _ => self.actor.clone(),
                };
                let _ = self
                    .ctl
                    .record(
                        &actor,
                        Action::TrainingFailed {
                            model: self.model.clone(),
                            job: self.id.clone(),
                            cancelled,
                        },
                        Value::Null,
                        Value::Null,
                        match cancelled {
                            true => Ok(()),
                            false => Err(e.to_string()),
                        },
                    )
                    .await;
                tracing::warn!(model = %self.model, job = %self.id, error = %e, "retrain ended without a version");
                self.ctl.hooks().emit(crate::hooks::Event::training_failed(
                    &self.model,
                    Some(&self.parent.version),
                    json!({"id": self.id, "cancelled": cancelled}),
                    &e.to_string(),
                ));
                match cancelled {
                    true => RetrainOutcome::Cancelled,
                    false => RetrainOutcome::Failed {
                        error: e.to_string(),
                    },
                }
            }
        }
    }

    /// Gates the result, completes its card and registers it.
    async fn register(&self, report: &TrainReport) -> Result<RetrainOutcome, JobError> {
        let failed = |e: String| JobError::Failed(anyhow::anyhow!(e));
        let gate = GateReport::judge(report, self.spec.max_regression, self.reference.clone());
        let card_path = self.out.join(CARD_FILE);
        let mut card: Value = tokio::fs::read(&card_path)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| json!({}));
        let files = self.spec.data.clone();
        let window = tokio::task::spawn_blocking(move || window_of(&files))
            .await
            .unwrap_or(Value::Null);
        card["model"] = json!(self.model);
        card["job"] = json!(self.id);
        card["parent"] = json!({
            "version": self.parent.version,
            "sha256": self.parent.sha256,
            "source": self.parent.source,
            "card_sha256": self.parent_card_sha256,
        });
        card["window"] = json!({"from_files": window, "given": self.spec.window});
        card["replay_share"] = json!(self.spec.replay_share);
        card["gate"] = json!(gate);
        let bytes = serde_json::to_vec_pretty(&card).map_err(|e| failed(e.to_string()))?;
        use sha2::Digest;
        let card_sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        tokio::fs::write(&card_path, &bytes)
            .await
            .map_err(|e| failed(format!("writing the card: {e}")))?;
        if self.handle.job.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        let readme = tokio::fs::read_to_string(self.out.join("README.md"))
            .await
            .unwrap_or_default();
        let record = self
            .ctl
            .register(
                &self.actor,
                &self.model,
                Register {
                    path: self.out.display().to_string(),
                    version: self.spec.version.clone(),
                    metadata: json!({
                        "retrain": {
                            "job": self.id,
                            "parent": self.parent.version,
                            "card_sha256": card_sha256,
                            "gate": gate,
                        },
                        "model_card": card,
                    }),
                    model_card: Some(readme),
                },
            )
            .await
            .map_err(|e| failed(format!("registering the result: {e}")))?;
        // The version is registered: from here on nothing may fail the job,
        // or its files (which the registered version now names) would be
        // deleted under it. A lost `training_finished` entry is logged.
        if let Err(e) = self
            .ctl
            .record(
                &self.actor,
                Action::TrainingFinished {
                    model: self.model.clone(),
                    job: self.id.clone(),
                    version: record.version.clone(),
                    card_sha256: card_sha256.clone(),
                    gate_passed: gate.passed,
                },
                Value::Null,
                json!({"gate": gate, "held_out": report.held_out, "steps": report.steps}),
                Ok(()),
            )
            .await
        {
            tracing::error!(model = %self.model, job = %self.id, version = %record.version, error = %e, "the training_finished entry could not be written; the version stays registered");
        }
        tracing::info!(model = %self.model, job = %self.id, version = %record.version, gate = gate.passed, "retrain registered");
        self.ctl.hooks().emit(crate::hooks::Event::training_finished(
            &self.model,
            Some(&record.version),
            json!({"id": self.id, "parent": self.parent.version, "gate": gate, "card_sha256": card_sha256}),
        ));
        Ok(match gate.passed {
            true => RetrainOutcome::Registered {
                version: record.version,
                card_sha256,
                gate,
            },
            false => RetrainOutcome::GateFailed {
                version: record.version,
                card_sha256,
                gate,
            },
        })
    }
}

impl Controller {
    /// The latest retrain of `model` (running or finished).
    pub fn retrain(&self, model: &str) -> Result<RetrainHandle, ControlError> {
        self.retrains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no retrain of `{model}` has run")))
    }

    /// Cancels the running retrain of `model`; the `training_failed` entry
    /// names `actor`.
    pub fn cancel_retrain(
        &self,
        actor: &Actor,
        model: &str,
    ) -> Result<RetrainHandle, ControlError> {
        let h = self.retrain(model)?;
        if !h.is_running() {
            return Err(ControlError::Conflict(format!(
                "the retrain of `{model}` ({}) has already ended",
                h.id
            )));
        }
        h.cancel(actor);
        Ok(h)
    }
}
