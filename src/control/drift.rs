//! Drift per loaded version: each engine's recorder gets its model's
//! settings and the transition channel when it starts, its reference from
//! disk (frozen earlier, kept beside the registry as
//! `drift/MODEL/VERSION.json`) or from the file of prompts named by the
//! version's `drift_reference` metadata, and a ticker that closes live
//! windows by time and writes a newly frozen reference.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Actor, ControlError, Controller, internal};
use crate::monitor::drift::{self, DriftTransition, Recorder, Reference, TextProfile};
use crate::registry::Action;
use crate::registry::VersionRecord;
use crate::scheduler::EngineHandle;

/// How often live windows are checked against their time limit.
const TICK: Duration = Duration::from_secs(1);

/// The metadata key naming a version's reference prompts (JSONL).
pub const REFERENCE_KEY: &str = "drift_reference";

impl Controller {
    /// Drift state changes of every version, as they happen (hooks, the
    /// retrain controller, tests).
    pub fn drift_events(&self) -> tokio::sync::broadcast::Receiver<DriftTransition> {
        self.drift_events.subscribe()
    }

    pub(super) fn drift_settings(&self) -> std::sync::MutexGuard<'_, drift::DriftSettings> {
        // Whole-value writes: a poisoned lock still holds valid settings.
        self.drift.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reference_path(&self, model: &str, version: &str) -> PathBuf {
        self.drift_dir.join(model).join(format!("{version}.json"))
    }

    /// Configures a freshly started engine's recorder, gives it its
    /// reference, and starts its ticker.
    pub(super) async fn attach_drift(
        &self,
        model: &str,
        record: &VersionRecord,
        engine: &EngineHandle,
    ) {
        let rec = engine.drift().clone();
        let cfg = self.drift_settings().for_model(model).unwrap_or_else(|e| {
            tracing::warn!(model, error = %e, "drift settings refused; defaults apply");
            drift::DriftConfig::default()
        });
        rec.configure(cfg, Some(self.drift_events.clone()));
        let path = self.reference_path(model, &record.version);
        let file = record
            .metadata
            .get(REFERENCE_KEY)
            .and_then(Value::as_str)
            .map(PathBuf::from);
        let e = engine.clone();
        let p = path.clone();
        let roots = self.data_roots();
        // Reading and tokenizing is CPU and disk work: the blocking pool.
        let found =
            tokio::task::spawn_blocking(move || -> anyhow::Result<Option<(Reference, bool)>> {
                if p.exists() {
                    let r: Reference = serde_json::from_slice(&std::fs::read(&p)?)?;
                    return Ok(Some((r, false)));
                }
                match file {
                    Some(f) => {
                        // The record may come from an older server or
                        // another replica: held to this one's roots.
                        crate::registry::paths::data_files(&f, &roots)
                            .map_err(|e| anyhow::anyhow!("drift_reference: {e}"))?;
                        Ok(Some((reference_from_file(&e, &f)?, true)))
                    }
                    None => Ok(None),
                }
            })
            .await;
        match found {
            Ok(Ok(Some((r, unsaved)))) => {
                tracing::info!(model, version = %record.version, source = %r.source, requests = r.requests, "drift reference loaded");
                rec.set_reference(r, unsaved);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(model, version = %record.version, error = %e, "drift reference unusable; the first stable requests will be the reference")
            }
            Err(e) => tracing::warn!(error = %e, "drift reference task failed"),
        }
        spawn_ticker(rec, engine.watch(), path);
    }

    /// Drift of every loaded version of `model`: state, per-signal scores,
    /// reference, windows.
    pub async fn drift_status(&self, model: &str) -> Result<Value, ControlError> {
        let state = self.state().await;
        let m = state
            .models
            .get(model)
            .ok_or_else(|| ControlError::NotFound(format!("no model `{model}` is registered")))?;
        let stable = m.aliases.get("stable").cloned();
        let mut versions: Vec<Value> = self
            .engines()
            .iter()
            .filter(|((name, _), _)| name == model)
            .map(|((_, v), l)| {
                let mut s = l.engine.drift().status();
                s["stable"] = json!(stable.as_deref() == Some(v.as_str()));
                s
            })
            .collect();
        versions.sort_by(|a, b| a["version"].as_str().cmp(&b["version"].as_str()));
        let settings = self.drift_settings().for_model(model).map_err(internal)?;
        Ok(json!({"model": model, "stable": stable, "settings": settings, "versions": versions}))
    }

    /// Replaces `model`'s drift overrides (keys over `[drift]`) and applies
    /// them to its loaded versions. Validated before anything changes;
    /// audited, and restored at start (until cleared).
    pub async fn set_drift_config(
        &self,
        model: &str,
        overrides: serde_json::Map<String, Value>,
        actor: &Actor,
    ) -> Result<Value, ControlError> {
        self.change_drift_config(model, Some(overrides), actor)
            .await
    }

    /// Drops `model`'s overrides set through the admin API: the file's
    /// settings apply again.
    pub async fn clear_drift_config(
        &self,
        model: &str,
        actor: &Actor,
    ) -> Result<Value, ControlError> {
        self.change_drift_config(model, None, actor).await
    }

    async fn change_drift_config(
        &self,
        model: &str,
        overrides: Option<serde_json::Map<String, Value>>,
        actor: &Actor,
    ) -> Result<Value, ControlError> {
        let _write = self.write_turn().await;
        if !self.state().await.models.contains_key(model) {
            return Err(ControlError::NotFound(format!(
                "no model `{model}` is registered"
            )));
        }
        let action = Action::DriftSettings {
            model: model.to_string(),
            settings: overrides.clone().map(Value::Object),
        };
        let previous = json!(self.drift_settings().models.get(model));
        // What applies once this lands: the admin API's keys, or the file's.
        let effective = match overrides {
            Some(o) => o,
            None => self
                .drift_file
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .models
                .get(model)
                .cloned()
                .unwrap_or_default(),
        };
        let merged = drift::merge(&self.drift_settings().global, &effective);
        let cfg = match merged {
            Ok(cfg) => cfg,
            Err(e) => {
                let e = ControlError::invalid("drift", e);
                self.record(actor, action, previous, Value::Null, Err(e.to_string()))
                    .await?;
                return Err(e);
            }
        };
        self.record(
            actor,
            action,
            previous,
            Value::Object(effective.clone()),
            Ok(()),
        )
        .await?;
        self.drift_settings()
            .models
            .insert(model.to_string(), effective.clone());
        for ((name, _), l) in self.engines().iter() {
            if name == model {
                l.engine.drift().configure(cfg.clone(), None);
            }
        }
        let overrides = Value::Object(effective);
        tracing::info!(model, actor = %actor.key_id, reason = ?actor.reason, %overrides, "drift settings changed");
        Ok(json!({"model": model, "settings": cfg}))
    }

    /// At start, before any engine: the overrides set through the admin API
    /// replace the file's for their models.
    pub(super) fn restore_drift_settings(&self) {
        let stored = self.catalog().state().drift.clone();
        for (model, v) in stored {
            let Value::Object(o) = v else { continue };
            let mut s = self.drift_settings();
            match drift::merge(&s.global, &o) {
                Ok(_) => {
                    s.models.insert(model.clone(), o);
                    tracing::info!(model, "drift overrides restored");
                }
                Err(e) => {
                    tracing::error!(model, error = %e, "stored drift overrides refused; the file's apply")
                }
            }
        }
    }

    /// Drops a loaded version's reference (and its saved copy): its next
    /// stable requests become the new one.
    pub async fn reset_drift_reference(
        &self,
        model: &str,
        version: &str,
        actor: &Actor,
    ) -> Result<Value, ControlError> {
        let engine = self
            .engines()
            .get(&(model.to_string(), version.to_string()))
            .map(|l| l.engine.clone())
            .ok_or_else(|| {
                ControlError::NotFound(format!("version `{version}` of `{model}` is not loaded"))
            })?;
        engine.drift().reset_reference();
        let path = self.reference_path(model, version);
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        tracing::info!(model, version, actor = %actor.key_id, reason = ?actor.reason, "drift reference reset");
        Ok(engine.drift().status())
    }
}

/// Closes live windows by time and saves a newly frozen reference, until
/// the engine stops. Holds the recorder, never the engine.
fn spawn_ticker(rec: Arc<Recorder>, watch: crate::scheduler::EngineWatch, path: PathBuf) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if watch.is_stopped() {
                break;
            }
            rec.tick(Instant::now());
            if let Some(r) = rec.take_unsaved_reference() {
                let p = path.clone();
                match tokio::task::spawn_blocking(move || save(&p, &r)).await {
                    Ok(Ok(())) => tracing::info!(path = %path.display(), "drift reference saved"),
                    Ok(Err(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "drift reference not saved")
                    }
                    Err(e) => tracing::warn!(error = %e, "drift reference task failed"),
                }
            }
        }
    });
}

/// Writes `r` atomically (a temporary file, synced, renamed).
fn save(path: &Path, r: &Reference) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(r)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The prompt text of one JSONL line: a string, or an object with
/// `prompt`, `text` or chat `messages` (their contents joined).
fn prompt_of(line: &str) -> anyhow::Result<String> {
    let v: Value = serde_json::from_str(line)?;
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    for k in ["prompt", "text"] {
        if let Some(s) = v.get(k).and_then(Value::as_str) {
            return Ok(s.to_string());
        }
    }
    if let Some(ms) = v.get("messages").and_then(Value::as_array) {
        let parts: Vec<&str> = ms
            .iter()
            .filter_map(|m| m.get("content").and_then(Value::as_str))
            .collect();
        return Ok(parts.join("\n"));
    }
    anyhow::bail!("expected a string or an object with `prompt`, `text` or `messages`")
}

/// A prompt-side reference from a JSONL file of prompts, tokenized with the
/// version's own tokenizer.
pub fn reference_from_file(engine: &EngineHandle, path: &Path) -> anyhow::Result<Reference> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut prompts: Vec<(Vec<u32>, TextProfile)> = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p =
            prompt_of(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        let ids = engine
            .tokenizer()
            .encode(&p, true)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        let mut profile = TextProfile::default();
        drift::stats::add_text(&mut profile, &p);
        prompts.push((ids, profile));
    }
    if prompts.len() < 20 {
        anyhow::bail!(
            "{}: {} prompts; a reference needs at least 20",
            path.display(),
            prompts.len()
        );
    }
    Ok(Reference::from_prompts(
        prompts.iter().map(|(p, t)| (p.as_slice(), *t)),
        &format!("file:{}", path.display()),
    ))
}
