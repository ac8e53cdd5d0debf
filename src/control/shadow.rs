//! Shadow routes: set, clear, read, and restore at start. The copies and
//! the comparison live in `shadow/`; this file keeps the catalog, the
//! engines and the router's table in agreement about which candidate
//! mirrors which model.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Actor, ControlError, Controller};
use crate::hooks::{Event as HookEvent, EventKind};
use crate::registry::Action;
use crate::router::Target;
use crate::shadow::{Mirror, ShadowSpec, StoredSample};

impl Controller {
    /// Mirrors a sample of `model`'s requests to `spec.version`, loading it
    /// if needed. Replaces any shadow the model had (its comparisons start
    /// over). The candidate must share the primary's tokenizer: the copies
    /// carry the primary's token ids and are compared token by token.
    pub async fn set_shadow(
        &self,
        actor: &Actor,
        model: &str,
        spec: ShadowSpec,
    ) -> Result<Value, ControlError> {
        let _write = self.write_turn().await;
        let action = Action::Shadow {
            model: model.into(),
            spec: Some(serde_json::to_value(&spec).map_err(super::internal)?),
        };
        let previous = json!(self.catalog().state().shadows.get(model));
        let result = self.start_shadow(model, &spec).await;
        match result {
            Err(e) => {
                self.record(actor, action, previous, Value::Null, Err(e.to_string()))
                    .await?;
                Err(e)
            }
            Ok((target, mirror)) => {
                let new = json!(spec);
                self.record(actor, action, previous, new, Ok(())).await?;
                self.router
                    .set_shadow(model, target, spec.rate_bp(), mirror.clone());
                self.release_unreferenced(&self.catalog().state().clone());
                tracing::info!(model, candidate = %spec.version, rate = spec.rate, mode = spec.mode.as_str(), key = %actor.key_id, "shadow set");
                Ok(mirror.status())
            }
        }
    }

    /// Checks a shadow's settings and loads its candidate.
    pub(super) async fn start_shadow(
        &self,
        model: &str,
        spec: &ShadowSpec,
    ) -> Result<(Arc<Target>, Arc<Mirror>), ControlError> {
        spec.validate()
            .map_err(|m| ControlError::invalid("shadow", m))?;
        let Some(deployment) = self.router.deployment(model) else {
            return Err(ControlError::NotFound(format!(
                "model `{model}` is not served"
            )));
        };
        if deployment.stable.version == spec.version {
            return Err(ControlError::Conflict(format!(
                "version `{}` is `{model}`'s stable version; a shadow is a different version",
                spec.version
            )));
        }
        let record = self
            .catalog()
            .state()
            .version(model, &spec.version)
            .cloned()
            .ok_or_else(|| {
                ControlError::NotFound(format!("model `{model}` has no version `{}`", spec.version))
            })?;
        let engine = self.ensure_loaded(model, &record, false).await?;
        super::same_tokenizer(
            &deployment.stable,
            &spec.version,
            &engine,
            "a shadow is compared token by token",
        )?;
        let mirror = Mirror::new(model, spec.clone(), engine.clone())
            .map_err(|m| ControlError::invalid("shadow", m))?;
        let target = Arc::new(Target {
            version: spec.version.clone(),
            engine,
        });
        Ok((target, Arc::new(mirror)))
    }

    /// Stops mirroring `model`'s requests. Copies in flight finish (or time
    /// out) on their own; the candidate stays loaded only if pinned.
    pub async fn clear_shadow(&self, actor: &Actor, model: &str) -> Result<(), ControlError> {
        let _write = self.write_turn().await;
        self.clear_shadow_locked(actor, model, None).await
    }

    /// As [`Controller::clear_shadow`], with the write lock already held.
    pub(super) async fn clear_shadow_locked(
        &self,
        actor: &Actor,
        model: &str,
        why: Option<&str>,
    ) -> Result<(), ControlError> {
        let action = Action::Shadow {
            model: model.into(),
            spec: None,
        };
        let previous = self.catalog().state().shadows.get(model).cloned();
        let Some(previous) = previous else {
            let e = ControlError::NotFound(format!("model `{model}` has no shadow"));
            self.record(actor, action, Value::Null, Value::Null, Err(e.to_string()))
                .await?;
            return Err(e);
        };
        let actor = Actor {
            key_id: actor.key_id.clone(),
            reason: actor.reason.clone().or(why.map(str::to_string)),
        };
        self.record(&actor, action, previous, Value::Null, Ok(()))
            .await?;
        if let Some(s) = self.router.clear_shadow(model) {
            self.hooks.emit(HookEvent::new(
                model,
                Some(&s.target.version),
                EventKind::ShadowReport {
                    report: s.mirror.status(),
                    last: true,
                },
            ));
        }
        self.release_unreferenced(&self.catalog().state().clone());
        tracing::info!(model, key = %actor.key_id, "shadow cleared");
        Ok(())
    }

    /// Sends every running shadow's comparisons so far as a
    /// `shadow_report` event (the engine watcher calls this every
    /// `shadow_report_every`).
    pub(super) fn report_shadows(&self) {
        for d in self.router.snapshot().models.values() {
            if let Some(s) = &d.shadow {
                self.hooks.emit(HookEvent::new(
                    &d.model,
                    Some(&s.target.version),
                    EventKind::ShadowReport {
                        report: s.mirror.status(),
                        last: false,
                    },
                ));
            }
        }
    }

    /// The model's shadow: settings, copies in flight, comparisons.
    pub fn shadow(&self, model: &str) -> Result<Value, ControlError> {
        Ok(self.mirror(model)?.status())
    }

    /// The model's stored disagreements (redacted), oldest first.
    pub fn shadow_samples(&self, model: &str) -> Result<Vec<StoredSample>, ControlError> {
        let m = self.mirror(model)?;
        if !m.spec().samples.enabled {
            return Err(ControlError::Conflict(format!(
                "model `{model}`'s shadow keeps no samples (set samples.enabled)"
            )));
        }
        Ok(m.samples())
    }

    fn mirror(&self, model: &str) -> Result<Arc<Mirror>, ControlError> {
        self.router
            .deployment(model)
            .and_then(|d| d.shadow.as_ref().map(|s| s.mirror.clone()))
            .ok_or_else(|| ControlError::NotFound(format!("model `{model}` has no shadow")))
    }

    /// At start, after the stable versions serve: the shadows the catalog
    /// has are set up again. One that cannot be (its candidate fails to
    /// load) is logged and left unset; the model serves without it.
    pub(super) async fn restore_shadows(&self) {
        let shadows = self.catalog().state().shadows.clone();
        for (model, spec) in shadows {
            let spec: ShadowSpec = match serde_json::from_value(spec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(model, error = %e, "stored shadow settings unreadable; not mirroring");
                    continue;
                }
            };
            match self.start_shadow(&model, &spec).await {
                Ok((target, mirror)) => {
                    self.router
                        .set_shadow(&model, target, spec.rate_bp(), mirror);
                    tracing::info!(model, candidate = %spec.version, "shadow restored");
                }
                Err(e) => {
                    tracing::error!(model, candidate = %spec.version, error = %e, "shadow not restored; the model serves without it")
                }
            }
        }
    }

    /// The shadow candidate of `model`, if `version` is it: unloading it
    /// clears the shadow first, and its copies in flight end at once.
    pub(super) async fn unload_shadow_candidate(
        &self,
        actor: &Actor,
        model: &str,
        version: &str,
    ) -> Result<(), ControlError> {
        let Some(d) = self.router.deployment(model) else {
            return Ok(());
        };
        let Some(s) = d.shadow.as_ref().filter(|s| s.target.version == version) else {
            return Ok(());
        };
        let engine = s.target.engine.clone();
        self.clear_shadow_locked(actor, model, Some("its candidate was unloaded"))
            .await?;
        // Copies are background work nobody waits for: end them now.
        engine.drain(Duration::ZERO);
        Ok(())
    }
}
