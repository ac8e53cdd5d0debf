//! Hooks: typed events (`event.rs`) delivered to the webhooks and local
//! commands operators configure (`deliver.rs`), each with an event filter,
//! a timeout, retries with backoff, dedup and a cooldown. Every outcome is
//! counted and written to the audit log.
//!
//! Nothing here can slow the caller: [`Hooks::emit`] puts the event in a
//! bounded queue (`try_send`; a full queue drops it, counted and audited),
//! one dispatcher task filters it per hook into that hook's own bounded
//! queue, and each hook's worker delivers on tasks of their own, at most
//! `concurrency` at a time. A hook that hangs fills its own queue and
//! drops its own events; the other hooks, and serving, go on.

pub mod deliver;
pub mod event;
pub mod seal;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

// tokio's clock: the system's unless a test pauses it.
use tokio::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

pub use event::{Event, Kind as EventKind};
pub use seal::SecretsKey;

use crate::monitor::names;
use crate::registry::{Action, Registry};

/// Events waiting for the dispatcher.
const QUEUE: usize = 1024;
/// Events waiting for one hook's deliveries.
const HOOK_QUEUE: usize = 256;
/// Event ids remembered per hook, for dedup.
const REMEMBERED_IDS: usize = 1024;

/// Variables an admin-set hook may name in `secret_env`: only these, so the
/// signature cannot be made an oracle on another secret of the server's
/// (`LLMOPS_API_KEYS`, `LLMOPS_ETCD_PASSWORD`).
pub const ADMIN_SECRET_ENV_PREFIX: &str = "LLMOPS_HOOK_SECRET";

/// A hook's settings, as `[[hooks]]` in `llmops.toml` and the body of
/// `PUT /admin/v1/hooks/{name}`. Exactly one of `url` and `command`;
/// `command` only in the config file (an admin key is not a shell).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// The hook's name (the path's in the admin API).
    #[serde(default)]
    pub name: String,
    /// Event types delivered (see [`event::TYPES`]); empty or `["*"]`: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// A webhook: the URL the event is POSTed to (`http` or `https`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A local command: program and arguments (no shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The webhook's signing secret. Never serialized: not in the audit
    /// log, not in an admin answer.
    #[serde(default, skip_serializing)]
    pub secret: Option<String>,
    /// The environment variable holding the signing secret, read when the
    /// hook is set (through the admin API: a name starting with
    /// [`ADMIN_SECRET_ENV_PREFIX`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The inline secret sealed under the fleet's secrets key
    /// ([`seal::SecretsKey`]): how an inline secret reaches every replica.
    /// Written by the server, never taken from a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_secret: Option<String>,
    /// Deliveries must be signed: set by the server whenever a secret was
    /// given, so a replica that cannot find the secret marks the hook
    /// failed instead of sending its events unsigned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signed: bool,
    /// Each attempt's limit (the request, or the command until it exits).
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Attempts after the first when one fails in a way that may pass.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The first pause between attempts; it doubles each time (capped at
    /// 30 s), with jitter.
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// An event of the same type, model and version within this many
    /// seconds of the last one delivered is not sent again (0: off).
    #[serde(default)]
    pub cooldown_secs: f64,
    /// Deliveries of this hook in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

fn default_timeout() -> f64 {
    10.0
}
fn default_retries() -> u32 {
    3
}
fn default_backoff() -> u64 {
    500
}
fn default_concurrency() -> usize {
    4
}

/// Where a hook's settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `llmops.toml`: read-only through the admin API.
    Config,
    /// The admin API (kept in the registry).
    Admin,
}

/// Where a hook delivers.
#[derive(Debug, Clone)]
pub enum Sink {
    /// POST to a URL, signed when there is a secret.
    Webhook {
        /// The URL.
        url: String,
        /// The signing secret.
        secret: Option<Vec<u8>>,
    },
    /// Run a program.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
    },
}

/// A hook ready to deliver: its settings checked and its secret resolved.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name.
    pub name: String,
    /// Types delivered; empty: all.
    pub events: Vec<String>,
    /// Where.
    pub kind: Sink,
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// First pause between attempts.
    pub backoff: Duration,
    /// Same type, model and version not sent again within this.
    pub cooldown: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
}

impl Target {
    /// Whether the hook takes events of type `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        wants(&self.events, kind)
    }
}

/// Whether a hook filtering on `events` takes events of type `kind`.
fn wants(events: &[String], kind: &str) -> bool {
    events.is_empty() || events.iter().any(|e| e == kind || e == "*")
}

/// Checks a hook or step name: letters, digits, `-`, `_`, `.`.
pub fn valid_name(name: &str) -> Result<(), String> {
    if !crate::registry::paths::is_path_component(name)
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "`{name}` is not a valid hook name (1–64 letters, digits, - _ .)"
        ));
    }
    Ok(())
}

impl HookSpec {
    /// Checks the settings and resolves the secret (`secret`, else the
    /// variable `secret_env` names). The message names the field.
    pub fn resolve(&self) -> Result<Target, String> {
        self.resolve_with(None)
    }

    /// [`HookSpec::resolve`], opening a sealed secret with `key`. A hook
    /// marked `signed` whose secret cannot be found here is an error, never
    /// an unsigned hook.
    pub fn resolve_with(&self, key: Option<&SecretsKey>) -> Result<Target, String> {
        valid_name(&self.name)?;
        for e in &self.events {
            if e != "*" && !event::TYPES.contains(&e.as_str()) {
                return Err(format!(
                    "events: unknown event type `{e}` (one of {}, or *)",
                    event::TYPES.join(", ")
                ));
            }
        }
        if !(self.timeout_secs > 0.0 && self.timeout_secs <= 600.0) {
            return Err("timeout_secs: must be in (0, 600]".into());
        }
        if self.retries > 10 {
            return Err("retries: at most 10".into());
        }
        if !(self.cooldown_secs >= 0.0 && self.cooldown_secs <= 30.0 * 86_400.0) {
            return Err("cooldown_secs: must be in [0, 30 days]".into());
        }
        if self.backoff_ms > 60_000 {
            return Err("backoff_ms: at most 60000".into());
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err("concurrency: must be in 1..=64".into());
        }
        if self.secret.is_some() && self.secret_env.is_some() {
            return Err("secret: give `secret` or `secret_env`, not both".into());
        }
        let secret = match (&self.secret, &self.secret_env, &self.sealed_secret) {
            (Some(s), _, _) if s.is_empty() => return Err("secret: must not be empty".into()),
            (Some(s), _, _) => Some(s.as_bytes().to_vec()),
            (None, Some(var), _) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Some(s.into_bytes()),
                _ => {
                    return Err(format!(
                        "secret_env: the environment variable `{var}` is not set on this replica"
                    ));
                }
            },
            (None, None, Some(sealed)) => match key {
                Some(k) => Some(
                    k.open(&self.name, sealed)
                        .map_err(|e| format!("secret: {e}"))?
                        .into_bytes(),
                ),
                None => {
                    return Err(
                        "secret: the hook's secret is sealed in the fleet's log and \
                                this replica has no --secrets-key-file to open it"
                            .into(),
                    );
                }
            },
            (None, None, None) if self.signed => {
                return Err(
                    "secret: the hook is signed but its secret is not on this replica \
                            (an inline secret kept in another replica's data dir; set it \
                            again with --secrets-key-file on every replica, or use secret_env)"
                        .into(),
                );
            }
            (None, None, None) => None,
        };
        let kind = match (&self.url, &self.command) {
            (Some(url), None) => {
                let u = reqwest::Url::parse(url).map_err(|e| format!("url: {e}"))?;
                if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
                    return Err(format!("url: `{url}` is not an http(s) URL"));
                }
                Sink::Webhook {
                    url: url.clone(),
                    secret,
                }
            }
            (None, Some(argv)) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err("command: give the program and its arguments".into());
                }
                if secret.is_some() || self.signed {
                    return Err(
                        "secret: a command hook is not signed (it runs on this host)".into(),
                    );
                }
                Sink::Command { argv: argv.clone() }
            }
            _ => return Err("url: give exactly one of `url` and `command`".into()),
        };
        Ok(Target {
            name: self.name.clone(),
            events: self.events.clone(),
            kind,
            timeout: Duration::from_secs_f64(self.timeout_secs),
            retries: self.retries,
            backoff: Duration::from_millis(self.backoff_ms),
            cooldown: Duration::from_secs_f64(self.cooldown_secs),
            concurrency: self.concurrency,
        })
    }
}

/// The audit log the outcomes go to (the registry's, shared with the
/// controller).
pub type AuditLog = Arc<Mutex<Registry>>;

/// The hooks of this process. Cheap to clone; [`Hooks::emit`] never waits.
#[derive(Clone)]
pub struct Hooks {
    tx: mpsc::Sender<Event>,
    shared: Arc<Shared>,
}

struct Shared {
    hooks: Mutex<BTreeMap<String, Arc<Running>>>,
    /// Hooks this replica cannot run as set (a signed hook whose secret it
    /// cannot find): listed with why, their events recorded as failed,
    /// never delivered unsigned.
    failed: Mutex<BTreeMap<String, Failed>>,
    /// Opens secrets sealed in a fleet's log.
    secrets_key: OnceLock<SecretsKey>,
    audit: Option<AuditLog>,
    client: reqwest::Client,
    /// Events dropped at `emit` since the dispatcher last audited drops.
    dropped: AtomicU64,
}

/// One configured hook: its settings, its queue, what it sent lately.
struct Running {
    spec: HookSpec,
    source: Source,
    target: Arc<Target>,
    queue: mpsc::Sender<Event>,
    recent: Mutex<Recent>,
}

/// A hook that cannot run here, and why.
struct Failed {
    spec: HookSpec,
    source: Source,
    why: String,
}

#[derive(Default)]
struct Recent {
    ids: VecDeque<String>,
    seen: HashSet<String>,
    last: HashMap<(&'static str, String, Option<String>), Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few map operations; a panic inside one
    // leaves the map usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Running {
    /// Whether `ev` goes out: not if this hook saw its id already, nor if
    /// one of its type, model and version went out within the cooldown.
    fn admit(&self, ev: &Event) -> Result<(), &'static str> {
        let mut r = lock(&self.recent);
        if r.seen.contains(&ev.id) {
            return Err("duplicate");
        }
        if r.ids.len() >= REMEMBERED_IDS
            && let Some(old) = r.ids.pop_front()
        {
            r.seen.remove(&old);
        }
        r.ids.push_back(ev.id.clone());
        r.seen.insert(ev.id.clone());
        let cooldown = self.target.cooldown;
        if cooldown.is_zero() {
            return Ok(());
        }
        let key = (ev.kind_name(), ev.model.clone(), ev.version.clone());
        if r.last.get(&key).is_some_and(|t| t.elapsed() < cooldown) {
            return Err("cooldown");
        }
        if r.last.len() >= 4096 {
            r.last.retain(|_, t| t.elapsed() < cooldown);
        }
        r.last.insert(key, Instant::now());
        Ok(())
    }
}

impl Hooks {
    /// Hooks whose outcomes go to `audit` (none: only counted and logged).
    /// Starts the dispatcher on the current tokio runtime; outside one,
    /// events are accepted and never delivered.
    pub fn new(audit: Option<AuditLog>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = reqwest::Client::builder()
            .user_agent(concat!("llmops-hooks/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            hooks: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            secrets_key: OnceLock::new(),
            audit,
            client,
            dropped: AtomicU64::new(0),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(dispatch(shared.clone(), rx));
        }
        Self { tx, shared }
    }

    /// Queues `event` for every hook that wants it. Never waits: when the
    /// queue is full the event is dropped, counted, and the drop audited.
    pub fn emit(&self, event: Event) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::HOOK_DELIVERIES, "hook" => "*", "event" => ev.kind_name(), "outcome" => "dropped").increment(1);
                tracing::warn!(event = ev.kind_name(), id = %ev.id, model = %ev.model, "hook queue full; event dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The key that opens secrets sealed in a fleet's log (set once, at
    /// start).
    pub fn with_secrets_key(&self, key: SecretsKey) {
        let _ = self.shared.secrets_key.set(key);
    }

    /// The secrets key, if this replica has one.
    pub fn secrets_key(&self) -> Option<&SecretsKey> {
        self.shared.secrets_key.get()
    }

    /// Checks what only the config file may configure: a hook from the
    /// admin API (or replicated from a fleet's log) runs no program and
    /// reads only the variables meant for hook secrets.
    pub fn admit_source(spec: &HookSpec, source: Source) -> Result<(), String> {
        if source == Source::Config {
            return Ok(());
        }
        if spec.command.is_some() {
            return Err(
                "command: command hooks come from llmops.toml only; an admin key \
                        cannot run programs on the host (use a webhook `url`)"
                    .into(),
            );
        }
        if let Some(var) = &spec.secret_env
            && !var.starts_with(ADMIN_SECRET_ENV_PREFIX)
        {
            return Err(format!(
                "secret_env: a hook set through the admin API reads only variables \
                 named {ADMIN_SECRET_ENV_PREFIX}*, not `{var}`"
            ));
        }
        Ok(())
    }

    /// Adds or replaces a hook. A replaced hook's queued events are still
    /// delivered by its old settings.
    pub fn set(&self, spec: HookSpec, source: Source) -> Result<(), String> {
        Self::admit_source(&spec, source)?;
        let target = Arc::new(spec.resolve_with(self.secrets_key())?);
        let (queue, rx) = mpsc::channel(HOOK_QUEUE);
        let running = Arc::new(Running {
            spec,
            source,
            target: target.clone(),
            queue,
            recent: Mutex::new(Recent::default()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(work(self.shared.clone(), target.clone(), rx));
        }
        lock(&self.shared.failed).remove(&target.name);
        lock(&self.shared.hooks).insert(target.name.clone(), running);
        Ok(())
    }

    /// Keeps a hook this replica cannot run (`why`): it is listed as
    /// failed, and each event it wants is recorded as not delivered.
    pub fn set_failed(&self, spec: HookSpec, source: Source, why: String) {
        lock(&self.shared.hooks).remove(&spec.name);
        lock(&self.shared.failed).insert(spec.name.clone(), Failed { spec, source, why });
    }

    /// Removes a hook; false if there was none. Its queued events are
    /// still delivered.
    pub fn remove(&self, name: &str) -> bool {
        let failed = lock(&self.shared.failed).remove(name).is_some();
        lock(&self.shared.hooks).remove(name).is_some() || failed
    }

    /// A hook's settings (secret left out) and where they come from.
    pub fn get(&self, name: &str) -> Option<(HookSpec, Source)> {
        let running = lock(&self.shared.hooks)
            .get(name)
            .map(|r| (r.spec.clone(), r.source));
        running.or_else(|| {
            lock(&self.shared.failed)
                .get(name)
                .map(|f| (f.spec.clone(), f.source))
        })
    }

    /// Every hook, as the admin API shows it: settings without the secret,
    /// whether one is set, the source, and `state` (`ok`, or `failed` with
    /// the `error` that keeps it from running here).
    pub fn list(&self) -> Vec<Value> {
        let mut all: BTreeMap<String, Value> = lock(&self.shared.hooks)
            .iter()
            .map(|(n, r)| {
                let mut v = view(&r.spec, r.source);
                v["state"] = json!("ok");
                (n.clone(), v)
            })
            .collect();
        for (n, f) in lock(&self.shared.failed).iter() {
            let mut v = view(&f.spec, f.source);
            v["state"] = json!("failed");
            v["error"] = json!(f.why);
            all.insert(n.clone(), v);
        }
        all.into_values().collect()
    }
}

/// A hook as the admin API shows it: never the secret itself (sealed or
/// not).
pub fn view(spec: &HookSpec, source: Source) -> Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("sealed_secret");
        o.insert(
            "signed".into(),
            json!(
                spec.signed
                    || spec.secret.is_some()
                    || spec.secret_env.is_some()
                    || spec.sealed_secret.is_some()
            ),
        );
        o.insert("source".into(), json!(source));
    }
    v
}

/// The dispatcher: each event to each hook that wants it and admits it.
async fn dispatch(shared: Arc<Shared>, mut rx: mpsc::Receiver<Event>) {
    while let Some(ev) = rx.recv().await {
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            shared
                .record(
                    "*",
                    None,
                    "dropped",
                    json!({"count": dropped, "why": "the hook queue was full"}),
                    Err(format!("{dropped} events dropped: the hook queue was full")),
                )
                .await;
        }
        let failed: Vec<(String, String)> = lock(&shared.failed)
            .values()
            .filter(|f| wants(&f.spec.events, ev.kind_name()))
            .map(|f| (f.spec.name.clone(), f.why.clone()))
            .collect();
        for (name, why) in failed {
            shared.count(&name, &ev, "failed", None);
            tracing::error!(hook = %name, event = ev.kind_name(), id = %ev.id, why = %why, "hook not delivered: it cannot run on this replica");
            let why = format!("not delivered: {why}");
            shared
                .record(&name, Some(&ev), "failed", json!({"detail": why}), Err(why))
                .await;
        }
        let hooks: Vec<Arc<Running>> = lock(&shared.hooks).values().cloned().collect();
        for h in hooks {
            if !h.target.wants(ev.kind_name()) {
                continue;
            }
            if let Err(why) = h.admit(&ev) {
                shared.count(&h.target.name, &ev, "suppressed", None);
                shared
                    .record(
                        &h.target.name,
                        Some(&ev),
                        "suppressed",
                        json!({"why": why}),
                        Ok(()),
                    )
                    .await;
                continue;
            }
            if h.queue.try_send(ev.clone()).is_err() {
                shared.count(&h.target.name, &ev, "dropped", None);
                tracing::warn!(hook = %h.target.name, event = ev.kind_name(), id = %ev.id, "hook busy (its queue is full); event dropped");
                shared
                    .record(
                        &h.target.name,
                        Some(&ev),
                        "dropped",
                        json!({"why": "the hook's queue was full"}),
                        Err("the hook's queue was full".into()),
                    )
                    .await;
            }
        }
    }
}

/// One hook's worker: each queued event on a task of its own, at most
/// `concurrency` at a time.
async fn work(shared: Arc<Shared>, target: Arc<Target>, mut rx: mpsc::Receiver<Event>) {
    let slots = Arc::new(Semaphore::new(target.concurrency));
    while let Some(ev) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (shared, target) = (shared.clone(), target.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let body = ev.to_json();
            let out = deliver::deliver(&target, &shared.client, &ev, &body).await;
            let outcome = if out.ok { "delivered" } else { "failed" };
            shared.count(&target.name, &ev, outcome, Some(out.elapsed));
            if out.ok {
                tracing::info!(hook = %target.name, event = ev.kind_name(), id = %ev.id, attempts = out.attempts, "hook delivered");
            } else {
                tracing::warn!(hook = %target.name, event = ev.kind_name(), id = %ev.id, attempts = out.attempts, detail = %out.detail, "hook delivery failed");
            }
            let details = json!({
                "attempts": out.attempts,
                "detail": out.detail,
                "latency_ms": out.elapsed.as_millis() as u64,
            });
            let result = if out.ok { Ok(()) } else { Err(out.detail) };
            shared
                .record(&target.name, Some(&ev), outcome, details, result)
                .await;
        });
    }
}

impl Shared {
    fn count(&self, hook: &str, ev: &Event, outcome: &'static str, took: Option<Duration>) {
        let labels = [
            ("hook", hook.to_string()),
            ("event", ev.kind_name().to_string()),
            ("outcome", outcome.to_string()),
        ];
        metrics::counter!(names::HOOK_DELIVERIES, &labels).increment(1);
        if let Some(t) = took {
            metrics::histogram!(names::HOOK_LATENCY, &labels[..1]).record(t.as_secs_f64());
        }
    }

    /// Appends the outcome to the audit log (fsync: on the blocking pool).
    async fn record(
        &self,
        hook: &str,
        ev: Option<&Event>,
        outcome: &str,
        mut details: Value,
        result: Result<(), String>,
    ) {
        let Some(audit) = self.audit.clone() else {
            return;
        };
        if let (Some(o), Some(ev)) = (details.as_object_mut(), ev) {
            o.insert("version".into(), json!(ev.version));
        }
        let field = |f: fn(&Event) -> String| ev.map_or_else(|| "-".to_string(), f);
        let action = Action::HookDelivery {
            hook: hook.to_string(),
            event_id: field(|e| e.id.clone()),
            event: field(|e| e.kind_name().to_string()),
            model: field(|e| e.model.clone()),
            outcome: outcome.to_string(),
        };
        let written = tokio::task::spawn_blocking(move || {
            lock(&audit).append("hooks", action, Value::Null, details, None, result)
        })
        .await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot audit a hook delivery"),
            Err(e) => tracing::error!(error = %e, "cannot audit a hook delivery"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> HookSpec {
        serde_json::from_value(json!({"name": "h", "url": url})).unwrap()
    }

    #[test]
    fn settings_are_checked_by_field() {
        assert!(spec("http://127.0.0.1:9/x").resolve().is_ok());
        let bad = |v: Value| {
            serde_json::from_value::<HookSpec>(v)
                .unwrap()
                .resolve()
                .unwrap_err()
        };
        assert!(bad(json!({"name": "h", "url": "ftp://x"})).starts_with("url"));
        assert!(bad(json!({"name": "h"})).starts_with("url"));
        assert!(
            bad(json!({"name": "h", "url": "http://x", "command": ["true"]})).starts_with("url")
        );
        assert!(
            bad(json!({"name": "h", "url": "http://x", "events": ["drift"]})).starts_with("events")
        );
        assert!(bad(json!({"name": "a b", "url": "http://x"})).contains("hook name"));
        assert!(
            bad(json!({"name": "h", "url": "http://x", "timeout_secs": 0}))
                .starts_with("timeout_secs")
        );
        assert!(
            bad(json!({"name": "h", "url": "http://x", "secret_env": "LLMOPS_TEST_UNSET_VAR"}))
                .starts_with("secret_env")
        );
        assert!(bad(json!({"name": "h", "command": []})).starts_with("command"));
        assert!(
            serde_json::from_value::<HookSpec>(
                json!({"name": "h", "url": "http://x", "sekret": 1})
            )
            .is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn the_secret_is_never_serialized() {
        let mut s = spec("http://x/");
        s.secret = Some("hunter2-secret".into());
        let v = view(&s, Source::Admin);
        assert!(!v.to_string().contains("hunter2"), "{v}");
        assert_eq!(v["signed"], true);
    }

    #[tokio::test(start_paused = true)]
    async fn dedup_and_cooldown_suppress_repeats_until_the_cooldown_ends() {
        let mut s = spec("http://x/");
        s.cooldown_secs = 60.0;
        let target = Arc::new(s.resolve().unwrap());
        let r = Running {
            spec: s,
            source: Source::Config,
            target,
            queue: mpsc::channel(1).0,
            recent: Mutex::new(Recent::default()),
        };
        let a = Event::engine_failed("m", "v1", "x");
        assert_eq!(r.admit(&a), Ok(()));
        assert_eq!(r.admit(&a), Err("duplicate"));
        assert_eq!(
            r.admit(&Event::engine_failed("m", "v1", "y")),
            Err("cooldown")
        );
        assert_eq!(r.admit(&Event::engine_failed("m", "v2", "y")), Ok(()));
        assert_eq!(r.admit(&Event::engine_failed("n", "v1", "y")), Ok(()));
        // The same type, model and version goes out again once the
        // cooldown has passed, and not a moment before.
        tokio::time::advance(Duration::from_secs(59)).await;
        let repeat = || Event::engine_failed("m", "v1", "z");
        assert_eq!(r.admit(&repeat()), Err("cooldown"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.admit(&repeat()), Ok(()));
    }
}
