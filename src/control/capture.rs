//! Capture of a model's traffic: turn it on (or change its redaction and
//! retention), read it, turn it off, export it, restore it at start. Every
//! change is audited; the writing itself is `capture/`'s.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::{Actor, ControlError, Controller};
use crate::capture::{self, Capture, CaptureSpec};
use crate::registry::Action;

/// A model name that is safe as a folder name under the data dir.
fn folder_name(model: &str) -> Result<(), ControlError> {
    if model.is_empty() || model.chars().all(|c| c == '.') || model.contains('/') {
        return Err(ControlError::invalid(
            "model",
            format!("`{model}` cannot name a capture folder"),
        ));
    }
    Ok(())
}

/// The audit log's record of a capture change: the new settings, or `None`
/// for off.
fn capture_action(model: &str, spec: Option<&CaptureSpec>) -> Result<Action, ControlError> {
    Ok(Action::Capture {
        model: model.to_string(),
        spec: spec
            .map(serde_json::to_value)
            .transpose()
            .map_err(super::internal)?,
    })
}

impl Controller {
    fn capture_dir(&self, model: &str) -> PathBuf {
        capture::dir(&self.data_dir, model)
    }

    /// Turns capture of `model`'s finished requests on, or changes its
    /// settings (a new writer takes over; what is on disk stays).
    pub async fn set_capture(
        &self,
        actor: &Actor,
        model: &str,
        spec: CaptureSpec,
    ) -> Result<Value, ControlError> {
        folder_name(model)?;
        let _write = self.write_turn().await;
        let action = capture_action(model, Some(&spec))?;
        let previous = json!(self.catalog().state().captures.get(model));
        let started = if self.router.deployment(model).is_none() {
            Err(ControlError::NotFound(format!(
                "model `{model}` is not served"
            )))
        } else {
            Capture::start(model, spec.clone(), self.capture_dir(model))
                .map_err(|e| ControlError::invalid("capture", e))
        };
        match started {
            Err(e) => {
                self.record(actor, action, previous, Value::Null, Err(e.to_string()))
                    .await?;
                Err(e)
            }
            Ok(cap) => {
                self.record(actor, action, previous, json!(spec), Ok(()))
                    .await?;
                let status = cap.status();
                self.router.set_capture(model, Some(cap));
                tracing::info!(model, key = %actor.key_id, "capture on");
                Ok(status)
            }
        }
    }

    /// The model's capture: settings and counts when on; what is on disk
    /// either way.
    pub fn capture(&self, model: &str) -> Result<Value, ControlError> {
        folder_name(model)?;
        if let Some(c) = self
            .router
            .deployment(model)
            .and_then(|d| d.capture.clone())
        {
            return Ok(c.status());
        }
        if !self.catalog().state().models.contains_key(model) {
            return Err(ControlError::NotFound(format!(
                "no model `{model}` is registered"
            )));
        }
        let files = capture::segments(&self.capture_dir(model));
        let bytes: u64 = files
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        Ok(json!({"model": model, "enabled": false, "bytes": bytes, "segments": files.len()}))
    }

    /// Turns capture off; with `purge`, deletes what was captured too.
    pub async fn clear_capture(
        &self,
        actor: &Actor,
        model: &str,
        purge: bool,
    ) -> Result<Value, ControlError> {
        folder_name(model)?;
        let _write = self.write_turn().await;
        let action = capture_action(model, None)?;
        let previous = self.catalog().state().captures.get(model).cloned();
        if previous.is_none() && !purge {
            let e = ControlError::NotFound(format!("model `{model}` does not capture"));
            self.record(actor, action, Value::Null, Value::Null, Err(e.to_string()))
                .await?;
            return Err(e);
        }
        let dir = self.capture_dir(model);
        let new = json!({"enabled": false, "purged": purge});
        self.record(actor, action, json!(previous), new.clone(), Ok(()))
            .await?;
        self.router.set_capture(model, None);
        if purge {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ControlError::Internal(format!(
                        "cannot delete {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        tracing::info!(model, purge, key = %actor.key_id, "capture off");
        Ok(new)
    }

    /// The folder to export `model`'s capture from.
    pub fn capture_export(&self, model: &str) -> Result<PathBuf, ControlError> {
        folder_name(model)?;
        if !self.catalog().state().models.contains_key(model) {
            return Err(ControlError::NotFound(format!(
                "no model `{model}` is registered"
            )));
        }
        Ok(self.capture_dir(model))
    }

    /// At start, after the models serve: the captures the catalog has are
    /// turned on again. One that cannot be is logged and left off.
    pub(super) fn restore_captures(&self) {
        self.restore_captures_where(|_| true);
    }

    /// As [`Controller::restore_captures`], for the models `pick` names.
    pub(super) fn restore_captures_where(&self, pick: impl Fn(&str) -> bool) {
        let stored = self.catalog().state().captures.clone();
        for (model, v) in stored.into_iter().filter(|(m, _)| pick(m)) {
            let spec: CaptureSpec = match serde_json::from_value(v) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(model, error = %e, "stored capture settings unreadable; not capturing");
                    continue;
                }
            };
            if self.router.deployment(&model).is_none() {
                continue;
            }
            match Capture::start(&model, spec, self.capture_dir(&model)) {
                Ok(c) => {
                    self.router.set_capture(&model, Some(c));
                    tracing::info!(model, "capture restored");
                }
                Err(e) => tracing::error!(model, error = %e, "capture not restored"),
            }
        }
    }
}
