//! The typed events hooks receive. On the wire each is one JSON object:
//! `{"id", "type", "at", "model", "version", …payload}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every event type, by its wire name.
pub const TYPES: &[&str] = &[
    "drift_detected",
    "drift_resolved",
    "version_registered",
    "rollout_started",
    "rollout_step",
    "rollout_promoted",
    "rollout_rolled_back",
    "rollout_aborted",
    "shadow_report",
    "training_started",
    "training_finished",
    "training_failed",
    "engine_failed",
];

/// One event: who it concerns, when, and what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id (`ev-` and 16 hex digits); the webhook's `Idempotency-Key`.
    pub id: String,
    /// When it happened (RFC 3339, UTC).
    pub at: String,
    /// The model it concerns.
    pub model: String,
    /// The version it concerns, when one does.
    pub version: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: Kind,
}

/// What happened, with its payload. The variant's name is the event's
/// `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    /// Live traffic moved away from the version's reference.
    DriftDetected {
        /// The signals, their scores and thresholds (the drift monitor's).
        details: Value,
    },
    /// Drift that had been detected cleared.
    DriftResolved {
        /// The signals, their scores and thresholds.
        details: Value,
    },
    /// A new version was registered.
    VersionRegistered {
        /// Hex SHA-256 of its weights.
        sha256: String,
        /// Where its weights are.
        source: String,
        /// Its format.
        format: String,
        /// Its parameters.
        parameters: u64,
    },
    /// A canary rollout began.
    RolloutStarted {
        /// The rollout's status.
        rollout: Value,
    },
    /// A rollout's analysis ran or its weight changed.
    RolloutStep {
        /// The rollout's status.
        rollout: Value,
    },
    /// A rollout's candidate became stable.
    RolloutPromoted {
        /// The rollout's status.
        rollout: Value,
    },
    /// A rollout's canary was removed after failed analysis (or a restart).
    RolloutRolledBack {
        /// The rollout's status.
        rollout: Value,
    },
    /// An operator aborted a rollout: its canary was removed.
    RolloutAborted {
        /// The rollout's status.
        rollout: Value,
    },
    /// A shadow's comparisons so far: every few minutes while it runs, and
    /// a last one (`final: true`) when it is cleared.
    ShadowReport {
        /// The shadow's status (settings and per primary version totals).
        report: Value,
        /// The shadow was cleared; no more reports follow.
        #[serde(rename = "final")]
        last: bool,
    },
    /// A training job started.
    TrainingStarted {
        /// The job (its data window, parent version, settings).
        job: Value,
    },
    /// A training job finished.
    TrainingFinished {
        /// The job and its results (losses, the version registered).
        job: Value,
    },
    /// A training job failed.
    TrainingFailed {
        /// The job.
        job: Value,
        /// Why.
        error: String,
    },
    /// A version's engine thread panicked: it serves nothing more.
    EngineFailed {
        /// Why.
        reason: String,
    },
}

impl Kind {
    /// The wire name of the type.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::DriftDetected { .. } => "drift_detected",
            Kind::DriftResolved { .. } => "drift_resolved",
            Kind::VersionRegistered { .. } => "version_registered",
            Kind::RolloutStarted { .. } => "rollout_started",
            Kind::RolloutStep { .. } => "rollout_step",
            Kind::RolloutPromoted { .. } => "rollout_promoted",
            Kind::RolloutRolledBack { .. } => "rollout_rolled_back",
            Kind::RolloutAborted { .. } => "rollout_aborted",
            Kind::ShadowReport { .. } => "shadow_report",
            Kind::TrainingStarted { .. } => "training_started",
            Kind::TrainingFinished { .. } => "training_finished",
            Kind::TrainingFailed { .. } => "training_failed",
            Kind::EngineFailed { .. } => "engine_failed",
        }
    }
}

/// A fresh event id.
pub fn new_id() -> String {
    format!("ev-{:016x}", rand::random::<u64>())
}

impl Event {
    /// An event about `model` (and `version`), happening now.
    pub fn new(model: &str, version: Option<&str>, kind: Kind) -> Self {
        Self {
            id: new_id(),
            at: crate::registry::now_rfc3339(),
            model: model.to_string(),
            version: version.map(str::to_string),
            kind,
        }
    }

    /// The wire name of its type.
    pub fn kind_name(&self) -> &'static str {
        self.kind.name()
    }

    /// Drift was detected on `version` of `model`.
    pub fn drift_detected(model: &str, version: &str, details: Value) -> Self {
        Self::new(model, Some(version), Kind::DriftDetected { details })
    }

    /// Drift on `version` of `model` cleared.
    pub fn drift_resolved(model: &str, version: &str, details: Value) -> Self {
        Self::new(model, Some(version), Kind::DriftResolved { details })
    }

    /// A training job for `model` (from `parent`, its parent version) began.
    pub fn training_started(model: &str, parent: Option<&str>, job: Value) -> Self {
        Self::new(model, parent, Kind::TrainingStarted { job })
    }

    /// A training job finished; `version` is what it registered, if any.
    pub fn training_finished(model: &str, version: Option<&str>, job: Value) -> Self {
        Self::new(model, version, Kind::TrainingFinished { job })
    }

    /// A training job failed.
    pub fn training_failed(model: &str, parent: Option<&str>, job: Value, error: &str) -> Self {
        Self::new(
            model,
            parent,
            Kind::TrainingFailed {
                job,
                error: error.to_string(),
            },
        )
    }

    /// A version's engine failed.
    pub fn engine_failed(model: &str, version: &str, reason: &str) -> Self {
        Self::new(
            model,
            Some(version),
            Kind::EngineFailed {
                reason: reason.to_string(),
            },
        )
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // An enum of strings and JSON values always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_serializes_flat_with_its_wire_name() {
        let e = Event::engine_failed("m", "v2", "the engine thread panicked");
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["type"], "engine_failed");
        assert_eq!(v["model"], "m");
        assert_eq!(v["version"], "v2");
        assert_eq!(v["reason"], "the engine thread panicked");
        assert!(v["id"].as_str().unwrap().starts_with("ev-"));
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let kinds = [
            Kind::DriftDetected {
                details: Value::Null,
            },
            Kind::DriftResolved {
                details: Value::Null,
            },
            Kind::VersionRegistered {
                sha256: String::new(),
                source: String::new(),
                format: String::new(),
                parameters: 0,
            },
            Kind::RolloutStarted {
                rollout: Value::Null,
            },
            Kind::RolloutStep {
                rollout: Value::Null,
            },
            Kind::RolloutPromoted {
                rollout: Value::Null,
            },
            Kind::RolloutRolledBack {
                rollout: Value::Null,
            },
            Kind::RolloutAborted {
                rollout: Value::Null,
            },
            Kind::ShadowReport {
                report: Value::Null,
                last: true,
            },
            Kind::TrainingStarted { job: Value::Null },
            Kind::TrainingFinished { job: Value::Null },
            Kind::TrainingFailed {
                job: Value::Null,
                error: String::new(),
            },
            Kind::EngineFailed {
                reason: String::new(),
            },
        ];
        assert_eq!(kinds.len(), TYPES.len());
        for (k, name) in kinds.into_iter().zip(TYPES) {
            assert_eq!(k.name(), *name);
            let v = serde_json::to_value(Event::new("m", None, k)).unwrap();
            assert_eq!(v["type"], *name);
        }
    }
}
