//! A fleet of replicas on one shared registry (`--registry etcd://…`).
//!
//! The shared log is the desired state; what a replica serves is its
//! actual state. Every replica follows the log ([`Controller::follow`]):
//! when entries come in (its own or another replica's) it reconciles its
//! engines and router to the log's state, whichever replica took the admin
//! call: the stable version (the hot swap), the canary of the active
//! rollout at its weight, the shadow, capture, drift overrides, hooks and
//! the autopilot's settings.
//!
//! The leader (`registry::etcd`'s lease) runs what runs once per fleet: it
//! adopts every active rollout and drives its analysis, on the samples of
//! every replica ([`Controller::publish_samples`]), and it starts the
//! retrain loop once for the fleet when most replicas judge the stable
//! version in drift ([`drift_vote`]: each replica publishes its drift
//! state under `{prefix}/drift/{replica}`). When the leader dies mid
//! rollout, the replica that takes the lease adopts the rollout where its
//! last recorded status left it (same step, weight and counts) and goes on
//! with the next full window.
//!
//! Loading and unloading a version (`/admin/v1/models/…/load`) act on the
//! replica that takes the call: they warm or free one machine's memory and
//! are not desired state; everything an alias, rollout or shadow needs is
//! loaded by the reconciler on each replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Controller;
use super::rollout::RolloutStatus;
use crate::monitor::canary::Sample;
use crate::monitor::drift::Level;
use crate::monitor::window::wall_ms;
use crate::monitor::{Variant, names};
use crate::registry::State;

/// How far back a replica's published samples reach: the longest window a
/// rollout analyses from other replicas.
pub const SAMPLE_HORIZON: Duration = Duration::from_secs(120);

/// How old a live replica's last sample publication (made every second)
/// may be at the end of a window before the window counts as lacking its
/// traffic.
pub const PUBLISH_LATE: Duration = Duration::from_secs(5);

/// How old a replica's last sample publication may be before the replica
/// counts as gone rather than late.
pub const PUBLISH_GONE: Duration = Duration::from_secs(15);

/// How recent a replica's published drift state must be to count in the
/// fleet's verdict: a replica that stopped publishing (dead, cut off from
/// etcd) drops out of the vote.
pub const DRIFT_FRESH: Duration = Duration::from_secs(10);

/// A replica's recent finished requests of the models in a rollout, as
/// published under `{prefix}/samples/{replica}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Published {
    /// When it was written (Unix milliseconds).
    pub at_ms: u64,
    /// By model, then `stable` / `canary`: `(finished at, Unix ms; sample)`.
    pub models: BTreeMap<String, BTreeMap<String, Vec<(u64, Sample)>>>,
    /// By model, the sides (`stable`, `canary`) whose engine failed here: a
    /// dead engine publishes no samples, only refusals, and the leader must
    /// not judge the survivors elsewhere.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed: BTreeMap<String, Vec<String>>,
}

/// What the other replicas published for one model's rollout window.
#[derive(Debug, Default)]
pub struct FleetSamples {
    /// Stable's samples.
    pub stable: Vec<Sample>,
    /// The canary's samples.
    pub canary: Vec<Sample>,
    /// `replica: side` of every engine of the rollout that failed there.
    pub failed: Vec<String>,
    /// Replicas (or the store) whose samples could not be read: the window
    /// lacks their traffic, so it is not judged.
    pub missing: Vec<String>,
}

/// A replica's drift state of every stable version it serves, as published
/// under `{prefix}/drift/{replica}` (apart from the samples, so that the
/// leader's vote each second reads a few bytes per replica).
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishedDrift {
    /// When it was written (Unix milliseconds).
    pub at_ms: u64,
    /// By model.
    pub models: BTreeMap<String, DriftSeen>,
}

/// Whether `drifting` of `reporting` replicas is a majority.
pub fn majority(drifting: usize, reporting: usize) -> bool {
    reporting > 0 && drifting * 2 > reporting
}

/// One replica's drift state of a model's stable version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftSeen {
    /// The stable version it judged.
    pub version: String,
    /// Its state after hysteresis.
    pub state: Level,
    /// Live windows it has judged (0: no verdict yet).
    pub windows: u64,
}

/// The fleet's drift verdict on `version` from every replica's published
/// state: `(in drift, reporting)`, counting the replicas that serve
/// `version` as stable and published within [`DRIFT_FRESH`] of `now_ms`.
/// Each replica judges its own share of the traffic against its reference;
/// behind a Service the shares are samples of the same stream, so a
/// majority in drift is the fleet's drift, and one replica's noisy window is
/// not. A replica that has not judged a window yet counts as not in drift.
pub fn drift_vote<'a>(
    reports: impl IntoIterator<Item = (u64, &'a DriftSeen)>,
    version: &str,
    now_ms: u64,
) -> (usize, usize) {
    let fresh = DRIFT_FRESH.as_millis() as u64;
    reports
        .into_iter()
        .filter(|(at, d)| d.version == version && now_ms.saturating_sub(*at) <= fresh)
        .fold((0, 0), |(drifting, reporting), (_, d)| {
            (
                drifting + usize::from(d.state == Level::Drift),
                reporting + 1,
            )
        })
}

impl Controller {
    /// Whether this replica runs the once-per-fleet controllers (rollout
    /// analysis, the drift loop): always on its own registry; on a shared
    /// one, while it leads.
    pub fn leads(&self) -> bool {
        self.fleet.as_ref().is_none_or(|f| f.health().is_leader())
    }

    /// Whether the registry is shared by a fleet.
    pub fn is_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// The shared registry's status for `/ready` and `/admin/v1/fleet`:
    /// `None` on a local registry.
    pub fn fleet_status(&self) -> Option<Value> {
        let f = self.fleet.as_ref()?;
        let h = f.health();
        Some(json!({
            "registry": f.url(),
            "replica": self.replica_id,
            "connected": h.connected(),
            "leader": h.is_leader(),
            "leader_id": h.leader_id(),
            "last_error": if h.connected() { None } else { h.last_error() },
            "applied_seq": self.catalog().entries().last().map_or(0, |e| e.seq),
        }))
    }

    /// Follows the shared log for as long as the controller lives: applies
    /// new entries when the watch fires (or every second), reconciles after
    /// any change of the log or of leadership, and publishes this
    /// replica's rollout samples every second. Does nothing on a local
    /// registry.
    pub fn follow(self: &Arc<Self>) {
        let Some(store) = self.fleet.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let changed = store.changed().clone();
            let mut reconciled = 0u64;
            let mut was_leader = false;
            loop {
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let Some(me) = weak.upgrade() else { return };
                let caught = me.catalog().catch_up();
                if let Err(e) = caught {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "cannot read the shared registry; serving the last known state"
                    );
                }
                let seq = me.catalog().entries().last().map_or(0, |e| e.seq);
                let leader = me.leads();
                if seq != reconciled || leader != was_leader {
                    me.reconcile().await;
                    reconciled = seq;
                    was_leader = leader;
                }
                me.publish_samples();
                if leader {
                    me.judge_fleet_drift().await;
                }
            }
        });
    }

    /// Brings engines and router to the registry's state (see the module
    /// header), then, on the leader, adopts the active rollouts.
    pub(super) async fn reconcile(self: &Arc<Self>) {
        let write = self.writes.lock().await;
        let state = self.state().await;
        let seen = std::mem::replace(&mut *self.seen(), state.clone());
        for (model, record) in super::stable_versions(&state) {
            let serving = self
                .router
                .deployment(model)
                .map(|d| d.stable.version.clone());
            if serving.as_deref() != Some(record.version.as_str())
                && self.load_and_serve(model, record).await
            {
                tracing::info!(model = %model, from = ?serving, to = %record.version, "fleet: stable version reconciled");
            }
        }
        self.reconcile_canaries(&state).await;
        self.reconcile_shadows(&seen, &state).await;
        self.reconcile_settings(&seen, &state);
        self.release_unreferenced(&state);
        drop(write);
        if self.leads() {
            self.adopt_rollouts(&state);
        }
    }

    /// The active rollout of each model puts its candidate in the table at
    /// its recorded weight; a model without one has no canary.
    async fn reconcile_canaries(&self, state: &State) {
        let active: BTreeMap<String, RolloutStatus> = state
            .rollouts
            .values()
            .filter_map(|v| serde_json::from_value::<RolloutStatus>(v.clone()).ok())
            .filter(|s| s.phase.is_active())
            .map(|s| (s.spec.model.clone(), s))
            .collect();
        for d in self.router.snapshot().models.values() {
            let Some(c) = &d.canary else { continue };
            if active
                .get(&d.model)
                .is_none_or(|s| s.spec.candidate != c.target.version)
            {
                self.router.clear_canary(&d.model);
                self.unpin(&d.model, &c.target.version);
                tracing::info!(model = %d.model, version = %c.target.version, "fleet: canary removed");
            }
        }
        for (model, s) in &active {
            let Some(d) = self.router.deployment(model) else {
                continue;
            };
            match &d.canary {
                Some(c) if c.target.version == s.spec.candidate => {
                    if c.weight_bp != s.weight * 100 {
                        self.router.set_canary_weight(model, s.weight * 100);
                        tracing::info!(model, weight = s.weight, "fleet: canary weight reconciled");
                    }
                }
                _ => {
                    let Some(record) = state.version(model, &s.spec.candidate).cloned() else {
                        continue;
                    };
                    match self.ensure_loaded(model, &record, true).await {
                        Ok(engine) => {
                            let target = Arc::new(crate::router::Target {
                                version: s.spec.candidate.clone(),
                                engine,
                            });
                            self.router.set_canary(
                                model,
                                target,
                                s.weight * 100,
                                s.spec.sticky_key,
                                crate::router::split::salt_of(&s.id),
                            );
                            tracing::info!(model, version = %s.spec.candidate, weight = s.weight, "fleet: canary reconciled");
                        }
                        Err(e) => {
                            tracing::error!(model, version = %s.spec.candidate, error = %e, "fleet: the canary cannot load here; this replica serves stable only")
                        }
                    }
                }
            }
        }
    }

    /// Shadows set, changed or cleared on another replica.
    async fn reconcile_shadows(&self, seen: &State, state: &State) {
        for model in seen.shadows.keys() {
            if !state.shadows.contains_key(model) && self.router.clear_shadow(model).is_some() {
                tracing::info!(model, "fleet: shadow cleared");
            }
        }
        for (model, spec) in &state.shadows {
            let running = self
                .router
                .deployment(model)
                .is_some_and(|d| d.shadow.is_some());
            if running && seen.shadows.get(model) == Some(spec) {
                continue;
            }
            let Ok(spec) = serde_json::from_value::<crate::shadow::ShadowSpec>(spec.clone()) else {
                continue;
            };
            match self.start_shadow(model, &spec).await {
                Ok((target, mirror)) => {
                    self.router
                        .set_shadow(model, target, spec.rate_bp(), mirror);
                    tracing::info!(model, candidate = %spec.version, "fleet: shadow reconciled");
                }
                Err(e) => {
                    tracing::error!(model, error = %e, "fleet: shadow not set here")
                }
            }
        }
    }

    /// Capture, drift overrides, hooks and autopilot settings changed on
    /// another replica.
    fn reconcile_settings(&self, seen: &State, state: &State) {
        for model in seen.captures.keys() {
            if !state.captures.contains_key(model) {
                self.router.set_capture(model, None);
            }
        }
        if state.captures != seen.captures {
            self.restore_captures_where(|m| seen.captures.get(m) != state.captures.get(m));
        }
        if state.drift != seen.drift {
            let mut s = self.drift_settings();
            for model in seen.drift.keys() {
                if !state.drift.contains_key(model) {
                    s.models.remove(model);
                }
            }
            drop(s);
            self.restore_drift_settings();
        }
        if state.hooks != seen.hooks {
            for name in seen.hooks.keys() {
                if !state.hooks.contains_key(name) {
                    self.hooks.remove(name);
                }
            }
            self.restore_hooks();
        }
        if state.autopilot != seen.autopilot {
            self.restore_autopilot_settings();
        }
    }

    /// On the leader: drives every active rollout that no task here drives.
    fn adopt_rollouts(self: &Arc<Self>, state: &State) {
        for v in state.rollouts.values() {
            let Ok(status) = serde_json::from_value::<RolloutStatus>(v.clone()) else {
                continue;
            };
            if !status.phase.is_active() {
                continue;
            }
            let (model, id) = (status.spec.model.clone(), status.id.clone());
            if self.drive_here(status) {
                tracing::info!(model, id, "fleet: this replica now drives the rollout");
            }
        }
    }

    /// Publishes this replica's samples of every model in a rollout (the
    /// last [`SAMPLE_HORIZON`]) for the leader's analysis.
    fn publish_samples(&self) {
        let Some(store) = &self.fleet else { return };
        let mut out = Published {
            at_ms: wall_ms(std::time::Instant::now()),
            ..Default::default()
        };
        let now = std::time::Instant::now();
        let from = now.checked_sub(SAMPLE_HORIZON).unwrap_or(now);
        for d in self.router.snapshot().models.values() {
            let Some(c) = &d.canary else { continue };
            let mut sides = BTreeMap::new();
            for (name, engine, variant) in [
                ("stable", &d.stable.engine, Variant::Stable),
                ("canary", &c.target.engine, Variant::Canary),
            ] {
                if engine.has_failed() {
                    out.failed
                        .entry(d.model.clone())
                        .or_default()
                        .push(name.to_string());
                }
                sides.insert(
                    name.to_string(),
                    engine
                        .window()
                        .between_at(variant, from, now)
                        .into_iter()
                        .map(|(at, s)| (wall_ms(at), s))
                        .collect(),
                );
            }
            out.models.insert(d.model.clone(), sides);
        }
        self.publish_drift(store, out.at_ms);
        if out.models.is_empty() && !self.published_any() {
            return;
        }
        let key = format!("samples/{}", self.replica_id);
        match serde_json::to_vec(&out) {
            Ok(bytes) => {
                if let Err(e) = store.put(&key, bytes) {
                    metrics::counter!(names::FLEET_PUBLISH_FAILURES, "what" => "samples")
                        .increment(1);
                    tracing::warn!(error = %e, "samples not published: the leader cannot judge rollout windows until they are");
                }
            }
            Err(e) => {
                metrics::counter!(names::FLEET_PUBLISH_FAILURES, "what" => "samples").increment(1);
                tracing::warn!(error = %e, "samples not serialised");
            }
        }
        self.set_published(!out.models.is_empty());
    }

    /// Publishes this replica's drift state of each stable version it
    /// serves, for the leader's vote.
    fn publish_drift(&self, store: &crate::registry::etcd::Etcd, at_ms: u64) {
        let mut out = PublishedDrift {
            at_ms,
            ..Default::default()
        };
        for d in self.router.snapshot().models.values() {
            let rec = d.stable.engine.drift();
            let seen = DriftSeen {
                version: d.stable.version.clone(),
                state: rec.state(),
                windows: rec.windows(),
            };
            out.models.insert(d.model.clone(), seen);
        }
        if out.models.is_empty() {
            return;
        }
        let key = format!("drift/{}", self.replica_id);
        match serde_json::to_vec(&out) {
            Ok(bytes) => {
                if let Err(e) = store.put(&key, bytes) {
                    metrics::counter!(names::FLEET_PUBLISH_FAILURES, "what" => "drift")
                        .increment(1);
                    tracing::debug!(error = %e, "drift state not published");
                }
            }
            Err(e) => tracing::debug!(error = %e, "drift state not serialised"),
        }
    }

    /// On the leader: the fleet's drift verdict on each stable version
    /// ([`drift_vote`]); when a majority of the replicas serving it turn to
    /// drift, the autopilot's loop starts once for the fleet.
    async fn judge_fleet_drift(self: &Arc<Self>) {
        let Some(store) = &self.fleet else { return };
        let listed = match store.list("drift") {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "drift states unreadable");
                return;
            }
        };
        let published: Vec<PublishedDrift> = listed
            .iter()
            .filter_map(|(_, bytes)| serde_json::from_slice(bytes).ok())
            .collect();
        let now = wall_ms(std::time::Instant::now());
        let mut verdicts = vec![];
        for d in self.router.snapshot().models.values() {
            let reports = published
                .iter()
                .filter_map(|p| p.models.get(&d.model).map(|s| (p.at_ms, s)));
            let (drifting, reporting) = drift_vote(reports, &d.stable.version, now);
            let in_drift = majority(drifting, reporting);
            let mut seen = self.fleet_drift.lock().unwrap_or_else(|p| p.into_inner());
            let was = seen.get(&d.model) == Some(&d.stable.version);
            if in_drift && !was {
                seen.insert(d.model.clone(), d.stable.version.clone());
                verdicts.push((
                    d.model.clone(),
                    d.stable.version.clone(),
                    drifting,
                    reporting,
                ));
            } else if !in_drift && was && drifting == 0 {
                seen.remove(&d.model);
            }
        }
        for (model, version, drifting, judging) in verdicts {
            tracing::info!(
                model,
                version,
                drifting,
                judging,
                "fleet: drift on a majority of replicas"
            );
            let reason = format!(
                "drift on `{model}` version `{version}`: {drifting} of {judging} replicas in drift"
            );
            self.begin_loop(&model, reason).await;
        }
    }

    /// Other replicas' samples of `model` finished within `[from, to]`
    /// (Unix ms): `(stable, canary)`. Empty on a local registry.
    pub(super) fn fleet_samples(&self, model: &str, from: u64, to: u64) -> FleetSamples {
        let mut got = FleetSamples::default();
        let Some(store) = &self.fleet else {
            return got;
        };
        let listed = match store.list("samples") {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "other replicas' samples unreadable; the window is not judged");
                got.missing.push(format!("the shared store ({e})"));
                return got;
            }
        };
        for (replica, bytes) in listed {
            if replica == self.replica_id {
                continue;
            }
            let p = match serde_json::from_slice::<Published>(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(replica, error = %e, "a replica's samples are unreadable; the window is not judged");
                    got.missing.push(format!("{replica} (unreadable: {e})"));
                    continue;
                }
            };
            // A replica that stopped publishing a while ago is gone (dead,
            // or not in this rollout: it publishes only while it serves a
            // canary); one whose last publication is older than a few of
            // its 1-s publications is failing to publish, and its traffic
            // of the window is unknown.
            let age = to.saturating_sub(p.at_ms);
            if age > PUBLISH_GONE.as_millis() as u64 {
                continue;
            }
            if age > PUBLISH_LATE.as_millis() as u64 {
                got.missing.push(format!(
                    "{replica} (last published {:.1} s before the window ended)",
                    age as f64 / 1000.0
                ));
                continue;
            }
            for side in p.failed.get(model).into_iter().flatten() {
                got.failed.push(format!("{replica}: {side}"));
            }
            let Some(sides) = p.models.get(model) else {
                continue;
            };
            let (stable, canary) = (&mut got.stable, &mut got.canary);
            for (side, out) in [("stable", stable), ("canary", canary)] {
                out.extend(
                    sides
                        .get(side)
                        .into_iter()
                        .flatten()
                        .filter(|(at, _)| (from..=to).contains(at))
                        .map(|(_, s)| *s),
                );
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(version: &str, state: Level, windows: u64) -> DriftSeen {
        DriftSeen {
            version: version.into(),
            state,
            windows,
        }
    }

    #[test]
    fn the_fleet_is_in_drift_when_most_fresh_reporting_replicas_are() {
        let now = 1_000_000;
        let (a, b, c) = (
            seen("v1", Level::Drift, 3),
            seen("v1", Level::Ok, 3),
            seen("v1", Level::Drift, 1),
        );
        let vote = drift_vote([(now, &a), (now - 1_000, &b), (now, &c)], "v1", now);
        assert_eq!(vote, (2, 3));
        assert!(majority(vote.0, vote.1));
        // A replica that stopped publishing drops out: 1 of 2 is no majority.
        let stale = now - DRIFT_FRESH.as_millis() as u64 - 1;
        let vote = drift_vote([(now, &a), (stale, &c), (now, &b)], "v1", now);
        assert_eq!(vote, (1, 2));
        assert!(!majority(vote.0, vote.1));
        // A replica yet to judge a window counts, as not in drift; another
        // version's state does not count at all.
        let (fresh, old) = (seen("v1", Level::Ok, 0), seen("v0", Level::Drift, 9));
        let vote = drift_vote([(now, &a), (now, &fresh), (now, &old)], "v1", now);
        assert_eq!(vote, (1, 2));
        assert!(!majority(vote.0, vote.1));
        assert!(!majority(0, 0));
        assert!(majority(1, 1), "a fleet of one judges alone");
    }

    #[test]
    fn a_published_drift_state_reads_back_as_written() {
        let mut p = PublishedDrift {
            at_ms: 5,
            ..Default::default()
        };
        p.models.insert("chat".into(), seen("v2", Level::Warn, 4));
        let back: PublishedDrift =
            serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
