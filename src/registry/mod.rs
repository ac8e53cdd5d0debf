//! The model registry: named models with immutable versions and aliases,
//! durable on local disk, with an audit log of every admin action.
//!
//! Storage is one append-only file, `audit.jsonl`, which is both the audit log
//! and the write-ahead log: each admin action is a single JSON line written
//! and `fsync`ed before the action is acknowledged, and the registry's state
//! is the replay of the successful entries. A crash can only leave a torn
//! last line (never acknowledged), which recovery drops; so the state always
//! equals what the log says, and a version is registered whole or not at all.
//!
//! A fleet of replicas shares one log in etcd instead (`etcd.rs`,
//! `--registry etcd://…`): the same entries, appended with compare-and-set,
//! and read by every replica as they come ([`Registry::catch_up`]).

pub mod etcd;
pub mod paths;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Checks, before anything is opened, that `path` is something the server
/// may read as a model, and returns it resolved (symlinks followed).
///
/// It must be a regular file, or a folder whose entries are regular files or
/// folders: reading a FIFO blocks until a writer comes and `/dev/zero` never
/// ends, and either would hang the admin plane, which holds the registry lock
/// while it reads. When `roots` is not empty (canonical paths, see
/// `--model-root`), the resolved path must also lie under one of them, so the
/// admin API cannot read arbitrary server files; a path that does not exist
/// then gets the same answer as one outside, so the check is no existence
/// oracle. Only `path` itself is held to the roots: links inside a model
/// folder (a Hugging Face cache snapshot points into `blobs/`) were made by
/// whoever owns the folder.
pub fn check_model_path(path: &Path, roots: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let outside = || {
        anyhow::anyhow!(
            "{} is not a file or folder under the model roots",
            path.display()
        )
    };
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) if !roots.is_empty() => return Err(outside()),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    if !roots.is_empty() && !roots.iter().any(|r| real.starts_with(r)) {
        return Err(outside());
    }
    // `metadata` is stat(2): it follows links and opens nothing.
    let meta = std::fs::metadata(&real).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        for e in std::fs::read_dir(&real)? {
            let p = e?.path();
            let m = std::fs::metadata(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            if !m.is_file() && !m.is_dir() {
                anyhow::bail!(
                    "{}: not a regular file (a model folder may hold only files and folders)",
                    p.display()
                );
            }
        }
    } else if !meta.is_file() {
        anyhow::bail!(
            "{} is not a regular file or a folder (devices, FIFOs and sockets are refused)",
            path.display()
        );
    }
    Ok(real)
}

/// Files beside a folder model's weights that change what it computes or
/// how it tokenizes: its digest covers them, so a changed `config.json` or
/// tokenizer is a different version.
pub const DIGESTED_SIDECARS: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
];

/// A model's digests: the one recorded for new versions, and the one
/// versions registered before sidecars were covered carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// Hex SHA-256 over the weights, then each sidecar present (its name,
    /// then its bytes); equal to `legacy` when there is none (and for a
    /// GGUF file, which holds everything).
    pub current: String,
    /// Hex SHA-256 over the weights alone.
    pub legacy: String,
}

impl Digests {
    /// A model with one digest (the embedded model, a GGUF file).
    pub fn one(digest: String) -> Self {
        Self {
            current: digest.clone(),
            legacy: digest,
        }
    }

    /// Whether a recorded digest names these files.
    pub fn matches(&self, recorded: &str) -> bool {
        recorded == self.current || recorded == self.legacy
    }
}

/// Hex SHA-256 over a model: the GGUF file, or the folder's safetensors
/// files in name order followed by its [`DIGESTED_SIDECARS`]. Refuses what
/// [`check_model_path`] refuses before opening anything.
pub fn digest_path(path: &Path) -> anyhow::Result<String> {
    Ok(digests(path)?.current)
}

/// Both digests of a model ([`Digests`]), reading each file once.
pub fn digests(path: &Path) -> anyhow::Result<Digests> {
    check_model_path(path, &[])?;
    let mut files = vec![];
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("safetensors") {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            anyhow::bail!("{}: no safetensors files", path.display());
        }
    } else {
        files.push(path.to_path_buf());
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut feed = |h: &mut Sha256, f: &Path| -> anyhow::Result<()> {
        let mut file = File::open(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            h.update(&buf[..n]);
        }
    };
    for f in &files {
        feed(&mut h, f)?;
    }
    let legacy = hex::encode(h.clone().finalize());
    if path.is_dir() {
        for name in DIGESTED_SIDECARS {
            let f = path.join(name);
            if f.is_file() {
                h.update(b"\0llmops-sidecar\0");
                h.update(name.as_bytes());
                h.update(b"\0");
                feed(&mut h, &f)?;
            }
        }
    }
    Ok(Digests {
        current: hex::encode(h.finalize()),
        legacy,
    })
}

/// An immutable model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Version id, unique within the model (`v1`, `v2`, … unless given).
    pub version: String,
    /// Hex SHA-256 of the weights.
    pub sha256: String,
    /// Where the weights are (`embedded` for the built-in model).
    pub source: String,
    /// `safetensors`, `gguf` or `embedded`.
    pub format: String,
    /// Model family.
    pub architecture: String,
    /// Parameters.
    pub parameters: u64,
    /// Registration time (RFC 3339, UTC).
    pub created: String,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// The model card (Markdown).
    #[serde(default)]
    pub model_card: String,
}

/// What an audit entry did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// A new version.
    RegisterVersion {
        /// Model name.
        model: String,
        /// The record.
        record: Box<VersionRecord>,
    },
    /// An alias points at a version (`None`: the alias is removed).
    SetAlias {
        /// Model name.
        model: String,
        /// Alias.
        alias: String,
        /// Version, or none to remove the alias.
        version: Option<String>,
    },
    /// A version's engine started.
    Load {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// A version's engine stopped.
    Unload {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// A version's engine thread died (panicked); it serves nothing more.
    EngineFailed {
        /// Model name.
        model: String,
        /// Version.
        version: String,
    },
    /// A rollout started or changed: its whole status after the change.
    /// The catalog keeps the latest status per id and knows nothing of its
    /// shape (the controller's `RolloutStatus`), so this layer stays below
    /// the controller.
    Rollout {
        /// Model name.
        model: String,
        /// Rollout id.
        id: String,
        /// What happened (`started`, `step`, `promoted`, …).
        event: String,
        /// The status after it.
        status: serde_json::Value,
    },
    /// A retrain job started fine-tuning a model's stable version; `new`
    /// holds its settings.
    TrainingStarted {
        /// Model name.
        model: String,
        /// Job id.
        job: String,
        /// The version it fine-tunes.
        parent: String,
    },
    /// A retrain job's result was registered as `version`; `new` holds the
    /// offline gate's report. A candidate that failed the gate is
    /// registered all the same (for inspection) with `gate_passed: false`,
    /// and nothing should shadow or canary it.
    TrainingFinished {
        /// Model name.
        model: String,
        /// Job id.
        job: String,
        /// The registered version.
        version: String,
        /// SHA-256 of its `model_card.json`.
        card_sha256: String,
        /// Whether the held-out perplexities stayed within the threshold.
        gate_passed: bool,
    },
    /// A retrain job ended without a version (failed or cancelled); its
    /// files were removed.
    TrainingFailed {
        /// Model name.
        model: String,
        /// Job id.
        job: String,
        /// Stopped by an operator rather than by an error.
        cancelled: bool,
    },
    /// A step of the drift → retrain → shadow → canary loop (the detail
    /// is the entry's `new` value).
    Autopilot {
        /// Model name.
        model: String,
        /// `notified`, `started`, `training`, `trained`, `gate_failed`,
        /// `shadowing`, `shadowed`, `awaiting_operator`, `canary`,
        /// `promoted`, `rolled_back` or `stopped`.
        step: String,
    },
    /// A shadow route was set (its settings) or cleared (`None`). The
    /// settings are the controller's `ShadowSpec`, kept as JSON like a
    /// rollout's status.
    Shadow {
        /// Model name.
        model: String,
        /// The settings, or none when cleared.
        spec: Option<serde_json::Value>,
    },
    /// A hook was set through the admin API (its settings, secret left
    /// out) or removed (`None`). Hooks from `llmops.toml` are not recorded:
    /// the file is their record.
    Hook {
        /// The hook's name.
        name: String,
        /// The settings, or none when removed.
        spec: Option<serde_json::Value>,
    },
    /// One event's delivery to one hook ended: delivered, failed after its
    /// retries, suppressed (duplicate or within the cooldown) or dropped
    /// (the hook's queue was full). Changes no state.
    HookDelivery {
        /// The hook's name (`*` for events dropped before any hook).
        hook: String,
        /// The event's id (the `Idempotency-Key` sent).
        event_id: String,
        /// The event's type.
        event: String,
        /// The event's model.
        model: String,
        /// `delivered`, `failed`, `suppressed` or `dropped`.
        outcome: String,
    },
    /// A model's drift overrides (keys over `[drift]`) were set through
    /// the admin API (`None`: cleared, the file's settings apply again).
    DriftSettings {
        /// Model name.
        model: String,
        /// The overrides, or none when cleared.
        settings: Option<serde_json::Value>,
    },
    /// The autopilot's settings were set through the admin API (`None`:
    /// cleared, `[autopilot]` in the file applies again).
    AutopilotSettings {
        /// The settings, or none when cleared.
        settings: Option<serde_json::Value>,
    },
    /// Capture of a model's traffic was turned on or changed (its settings)
    /// or turned off (`None`).
    Capture {
        /// Model name.
        model: String,
        /// The settings, or none when turned off.
        spec: Option<serde_json::Value>,
    },
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// Which API key acted (`startup` for the server itself).
    pub key_id: String,
    /// What was done.
    #[serde(flatten)]
    pub action: Action,
    /// State before (e.g. the alias's previous version).
    pub previous: serde_json::Value,
    /// State after.
    pub new: serde_json::Value,
    /// Why, as given by the operator.
    #[serde(default)]
    pub reason: Option<String>,
    /// `ok`, or the error.
    pub result: String,
    /// The replica that wrote it, in a fleet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// A named model.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelEntry {
    /// Versions by id, in registration order of ids.
    pub versions: BTreeMap<String, VersionRecord>,
    /// Alias → version.
    pub aliases: BTreeMap<String, String>,
    /// Versions in registration order.
    pub order: Vec<String>,
}

/// The registry's state: the fold of the successful log entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct State {
    /// By model name.
    pub models: BTreeMap<String, ModelEntry>,
    /// Latest status of every rollout, by id.
    pub rollouts: BTreeMap<String, serde_json::Value>,
    /// Shadow settings, by model.
    pub shadows: BTreeMap<String, serde_json::Value>,
    /// Hooks set through the admin API, by name (secrets not included).
    pub hooks: BTreeMap<String, serde_json::Value>,
    /// Capture settings of the models that capture, by model.
    pub captures: BTreeMap<String, serde_json::Value>,
    /// Drift overrides set through the admin API, by model.
    pub drift: BTreeMap<String, serde_json::Value>,
    /// Autopilot settings set through the admin API.
    pub autopilot: Option<serde_json::Value>,
}

impl State {
    /// Applies a successful action.
    pub fn apply(&mut self, action: &Action) {
        match action {
            Action::RegisterVersion { model, record } => {
                let m = self.models.entry(model.clone()).or_default();
                m.order.push(record.version.clone());
                m.versions
                    .insert(record.version.clone(), (**record).clone());
            }
            Action::SetAlias {
                model,
                alias,
                version,
            } => {
                let m = self.models.entry(model.clone()).or_default();
                match version {
                    Some(v) => {
                        m.aliases.insert(alias.clone(), v.clone());
                    }
                    None => {
                        m.aliases.remove(alias);
                    }
                }
            }
            Action::Rollout { id, status, .. } => {
                if rollout_applies(self.rollouts.get(id), status) {
                    self.rollouts.insert(id.clone(), status.clone());
                }
            }
            Action::Shadow { model, spec } => set_or_clear(&mut self.shadows, model, spec),
            Action::Hook { name, spec } => set_or_clear(&mut self.hooks, name, spec),
            Action::Capture { model, spec } => set_or_clear(&mut self.captures, model, spec),
            Action::DriftSettings { model, settings } => {
                set_or_clear(&mut self.drift, model, settings)
            }
            Action::AutopilotSettings { settings } => self.autopilot = settings.clone(),
            Action::Load { .. }
            | Action::Unload { .. }
            | Action::EngineFailed { .. }
            | Action::HookDelivery { .. }
            | Action::TrainingStarted { .. }
            | Action::TrainingFinished { .. }
            | Action::TrainingFailed { .. }
            | Action::Autopilot { .. } => {}
        }
    }

    /// A version record.
    pub fn version(&self, model: &str, version: &str) -> Option<&VersionRecord> {
        self.models.get(model)?.versions.get(version)
    }

    /// The version an alias points at.
    pub fn alias(&self, model: &str, alias: &str) -> Option<&str> {
        self.models
            .get(model)?
            .aliases
            .get(alias)
            .map(String::as_str)
    }

    /// The next automatic version id of a model.
    pub fn next_version_id(&self, model: &str) -> String {
        let n = self.models.get(model).map_or(0, |m| m.versions.len());
        let mut i = n + 1;
        loop {
            let id = format!("v{i}");
            if self.version(model, &id).is_none() {
                return id;
            }
            i += 1;
        }
    }
}

/// Sets `map[key]` to the value, or removes the key when there is none.
fn set_or_clear(
    map: &mut BTreeMap<String, serde_json::Value>,
    key: &str,
    value: &Option<serde_json::Value>,
) {
    match value {
        Some(v) => {
            map.insert(key.to_string(), v.clone());
        }
        None => {
            map.remove(key);
        }
    }
}

/// Where the log is kept.
enum Log {
    /// `audit.jsonl` on this machine.
    File {
        path: PathBuf,
        file: File,
        /// Bytes of whole, acknowledged lines: a failed append cuts the file
        /// back to this, so a partial line never precedes the next one.
        len: u64,
        /// Set when a failed append could not be cut back: the log may end
        /// in a partial line, and appending after it would bury it
        /// mid-file, where open refuses it. Further appends are refused
        /// until a restart repairs the tail.
        broken: Option<String>,
    },
    /// Keys in etcd, shared by a fleet of replicas.
    Etcd(std::sync::Arc<etcd::Etcd>),
}

/// How many times an append to the shared log is tried again after another
/// replica took its sequence number.
const CAS_TRIES: usize = 16;

/// The durable registry: state plus its log. Single writer per process
/// (the admin operations hold it behind a lock; readers take snapshots);
/// with a shared log, replicas order their appends by compare-and-set.
pub struct Registry {
    log: Log,
    state: State,
    entries: Vec<AuditEntry>,
}

/// RFC 3339 UTC time of now, to the millisecond.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl Registry {
    /// Opens (or creates) the registry in `dir`, replaying its log. A torn
    /// last line from a crash (no newline) is cut off with a warning; an
    /// unreadable line before the end is an error, since a crash cannot
    /// cause one.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let path = dir.join("audit.jsonl");
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if created {
            // Make the new file's directory entry durable too.
            File::open(dir).and_then(|d| d.sync_all())?;
        }
        let mut entries = vec![];
        let mut state = State::default();
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&file);
            // Bytes, not a String: a torn tail can end inside a multi-byte
            // UTF-8 character, and `read_line` would fail on it.
            let mut line = Vec::new();
            let mut offset = 0u64;
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                if line.last() != Some(&b'\n') {
                    break; // torn tail: never acknowledged
                }
                match serde_json::from_slice::<AuditEntry>(&line) {
                    Ok(e) => {
                        if e.result == "ok" {
                            state.apply(&e.action);
                        }
                        entries.push(e);
                        good_len = offset;
                    }
                    Err(err) => anyhow::bail!(
                        "{}: line {} (byte {good_len}) is corrupt: {err}. A crash only tears the last line, so this log was damaged otherwise: restore it from a backup, or cut it before that line to keep the earlier entries",
                        path.display(),
                        entries.len() + 1
                    ),
                }
            }
        }
        let len = file.metadata()?.len();
        if len != good_len {
            tracing::warn!(path = %path.display(), dropped_bytes = len - good_len, "registry log ends in a torn record (a crash mid-write); dropping it");
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Self {
            log: Log::File {
                path,
                file,
                len: good_len,
                broken: None,
            },
            state,
            entries,
        })
    }

    /// Opens the fleet's shared log in etcd and replays it.
    pub fn open_shared(store: std::sync::Arc<etcd::Etcd>) -> anyhow::Result<Self> {
        let mut r = Self {
            log: Log::Etcd(store),
            state: State::default(),
            entries: vec![],
        };
        r.catch_up()?;
        Ok(r)
    }

    /// Where the log lives: a file, or the etcd URL.
    pub fn location(&self) -> String {
        match &self.log {
            Log::File { path, .. } => path.display().to_string(),
            Log::Etcd(e) => e.url().to_string(),
        }
    }

    /// The shared store, when the log is one.
    pub fn shared(&self) -> Option<&std::sync::Arc<etcd::Etcd>> {
        match &self.log {
            Log::Etcd(e) => Some(e),
            Log::File { .. } => None,
        }
    }

    /// Applies the entries other replicas appended to the shared log since
    /// the last one here; returns how many. A file log has none.
    pub fn catch_up(&mut self) -> anyhow::Result<usize> {
        let Log::Etcd(store) = &self.log else {
            return Ok(0);
        };
        let next = self.entries.last().map_or(1, |e| e.seq + 1);
        let mut applied = 0;
        for (seq, value) in store.read_from(next)? {
            let expected = self.entries.last().map_or(1, |e| e.seq + 1);
            if seq != expected {
                anyhow::bail!(
                    "the shared registry log skips from {} to {seq}: it was edited by hand",
                    expected - 1
                );
            }
            let entry: AuditEntry = serde_json::from_slice(&value)
                .map_err(|e| anyhow::anyhow!("shared registry entry {seq} is corrupt: {e}"))?;
            if entry.result == "ok" {
                self.state.apply(&entry.action);
            }
            self.entries.push(entry);
            applied += 1;
        }
        Ok(applied)
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The whole audit log.
    pub fn entries(&self) -> &[AuditEntry] {
        &self.entries
    }

    /// Appends an entry durably; a successful action then changes the state.
    pub fn append(
        &mut self,
        key_id: &str,
        action: Action,
        previous: serde_json::Value,
        new: serde_json::Value,
        reason: Option<String>,
        result: Result<(), String>,
    ) -> anyhow::Result<AuditEntry> {
        self.append_entry(key_id, action, (previous, new), reason, result, false)
    }

    /// Appends a fleet leader's entry: as [`Registry::append`], and on a
    /// shared log only while this replica holds the leader lease, checked
    /// in the same transaction (else [`etcd::Fenced`], nothing written).
    pub fn append_as_leader(
        &mut self,
        key_id: &str,
        action: Action,
        previous: serde_json::Value,
        new: serde_json::Value,
        reason: Option<String>,
        result: Result<(), String>,
    ) -> anyhow::Result<AuditEntry> {
        self.append_entry(key_id, action, (previous, new), reason, result, true)
    }

    fn append_entry(
        &mut self,
        key_id: &str,
        action: Action,
        (previous, new): (serde_json::Value, serde_json::Value),
        reason: Option<String>,
        result: Result<(), String>,
        fenced: bool,
    ) -> anyhow::Result<AuditEntry> {
        let mut entry = AuditEntry {
            seq: self.entries.last().map_or(1, |e| e.seq + 1),
            time: now_rfc3339(),
            key_id: key_id.to_string(),
            action,
            previous,
            new,
            reason,
            result: match result {
                Ok(()) => "ok".into(),
                Err(e) => e,
            },
            replica: self.shared().map(|s| s.replica_id().to_string()),
        };
        self.refuse_stale(&entry)?;
        let mut line = serde_json::to_string(&entry)?;
        line.push('\n');
        match &mut self.log {
            Log::File {
                path,
                file,
                len,
                broken,
            } => {
                if let Some(why) = broken {
                    anyhow::bail!("the registry log needs a restart to repair its tail ({why})");
                }
                let written = file
                    .write_all(line.as_bytes())
                    .and_then(|()| file.sync_data());
                if let Err(e) = written {
                    // Part of the line may be on disk (disk full, file size
                    // limit), or all of it without the fsync. The action is
                    // reported as failed, so cut the file back to the last
                    // acknowledged line; otherwise the next append would
                    // complete a corrupt line.
                    if let Err(cut) = file.set_len(*len).and_then(|()| file.sync_data()) {
                        tracing::error!(path = %path.display(), error = %e, truncate_error = %cut, "registry append failed and the partial line could not be cut off; refusing further appends until a restart");
                        *broken = Some(format!("append failed: {e}; truncate failed: {cut}"));
                    }
                    return Err(e.into());
                }
                *len += line.len() as u64;
            }
            Log::Etcd(store) => {
                let store = store.clone();
                let mut tries = 0;
                while !store.create(entry.seq, line.clone().into_bytes(), fenced)? {
                    // Another replica appended first: take its entries, then
                    // try the next number. A version id is the one thing two
                    // replicas may both have picked: that is a conflict.
                    self.catch_up()?;
                    self.refuse_stale(&entry)?;
                    if let Action::RegisterVersion { model, record } = &entry.action
                        && self.state.version(model, &record.version).is_some()
                    {
                        anyhow::bail!(
                            "version `{}` of `{model}` was registered meanwhile by another replica",
                            record.version
                        );
                    }
                    tries += 1;
                    if tries >= CAS_TRIES {
                        anyhow::bail!("the shared registry log kept moving ({tries} tries)");
                    }
                    entry.seq = self.entries.last().map_or(1, |e| e.seq + 1);
                    line = serde_json::to_string(&entry)?;
                    line.push('\n');
                }
            }
        }
        if entry.result == "ok" {
            self.state.apply(&entry.action);
        }
        self.entries.push(entry.clone());
        Ok(entry)
    }
}

/// A rollout status written from a revision the log has moved past (another
/// replica wrote first): it is not appended, so the audit log holds only the
/// transitions that took effect. The writer reads the log's status and
/// decides again.
#[derive(Debug)]
pub struct StaleRollout {
    /// The rollout.
    pub id: String,
    /// The revision the log holds.
    pub revision: u64,
    /// The phase the log holds.
    pub phase: String,
}

impl std::fmt::Display for StaleRollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rollout `{}` changed meanwhile (the log holds revision {}, {})",
            self.id, self.revision, self.phase
        )
    }
}

impl std::error::Error for StaleRollout {}

impl Registry {
    /// Refuses a successful rollout entry whose status would not apply over
    /// the log's (see [`rollout_applies`]).
    fn refuse_stale(&self, entry: &AuditEntry) -> anyhow::Result<()> {
        let Action::Rollout { id, status, .. } = &entry.action else {
            return Ok(());
        };
        let current = self.state.rollouts.get(id);
        if entry.result != "ok" || rollout_applies(current, status) {
            return Ok(());
        }
        let field = |k: &str| current.and_then(|c| c.get(k));
        Err(StaleRollout {
            id: id.clone(),
            revision: field("revision")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            phase: field("phase")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
        }
        .into())
    }
}

/// Whether a rollout's status, as written, replaces `current`: an ended
/// rollout (promoted, rolled back, aborted) is final, and a status written
/// from an older revision than the one now in the log lost a race (two
/// replicas wrote from the same revision; the first in the log won).
/// Entries without revisions (older logs) apply as they always did, except
/// after the end.
fn rollout_applies(current: Option<&serde_json::Value>, new: &serde_json::Value) -> bool {
    use serde_json::Value;
    let Some(current) = current else {
        return true;
    };
    let ended = matches!(
        current.get("phase").and_then(Value::as_str),
        Some("promoted" | "rolled_back" | "aborted")
    );
    let revision = |v: &Value| v.get("revision").and_then(Value::as_u64).unwrap_or(0);
    match (ended, revision(new)) {
        (true, _) => false,
        (false, 0) => true,
        (false, r) => r > revision(current),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_status_applies_over_its_own_revision_only_and_never_after_the_end() {
        let st = |phase: &str, revision: Option<u64>| match revision {
            Some(r) => serde_json::json!({"phase": phase, "revision": r}),
            None => serde_json::json!({"phase": phase}),
        };
        // The first status, and one written on top of it.
        assert!(rollout_applies(None, &st("progressing", Some(1))));
        assert!(rollout_applies(
            Some(&st("progressing", Some(1))),
            &st("paused", Some(2))
        ));
        // The leader's analysis, written from revision 1 after a pause
        // (revision 2) from another replica: the pause stands.
        assert!(!rollout_applies(
            Some(&st("paused", Some(2))),
            &st("progressing", Some(2))
        ));
        // Ended is final, whatever the revision.
        for end in ["promoted", "rolled_back", "aborted"] {
            assert!(!rollout_applies(
                Some(&st(end, Some(3))),
                &st("rolled_back", Some(9))
            ));
        }
        // Entries from before revisions apply in log order, as they did.
        assert!(rollout_applies(
            Some(&st("progressing", None)),
            &st("paused", None)
        ));
    }

    fn record(v: &str) -> Box<VersionRecord> {
        Box::new(VersionRecord {
            version: v.into(),
            sha256: "ab".repeat(32),
            source: "/m".into(),
            format: "safetensors".into(),
            architecture: "llama".into(),
            parameters: 1,
            created: now_rfc3339(),
            metadata: serde_json::Value::Null,
            model_card: String::new(),
        })
    }

    #[test]
    fn state_is_the_replay_of_successful_entries_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Registry::open(dir.path()).unwrap();
            r.append(
                "k",
                Action::RegisterVersion {
                    model: "m".into(),
                    record: record("v1"),
                },
                serde_json::Value::Null,
                serde_json::Value::Null,
                None,
                Ok(()),
            )
            .unwrap();
            r.append(
                "k",
                Action::SetAlias {
                    model: "m".into(),
                    alias: "stable".into(),
                    version: Some("v1".into()),
                },
                serde_json::Value::Null,
                "v1".into(),
                Some("first".into()),
                Ok(()),
            )
            .unwrap();
            r.append(
                "k",
                Action::SetAlias {
                    model: "m".into(),
                    alias: "stable".into(),
                    version: Some("v9".into()),
                },
                "v1".into(),
                "v9".into(),
                None,
                Err("no such version".into()),
            )
            .unwrap();
        }
        // A crash in the middle of the next write.
        let path = dir.path().join("audit.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"time\":\"2026").unwrap();
        drop(f);
        let r = Registry::open(dir.path()).unwrap();
        assert_eq!(r.entries().len(), 3);
        assert_eq!(r.state().alias("m", "stable"), Some("v1"));
        assert!(r.state().version("m", "v1").is_some());
        assert_eq!(r.state().next_version_id("m"), "v2");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n') && !text.contains("\"seq\":4"));
    }

    fn register(r: &mut Registry, v: &str, card: &str) {
        let mut rec = record(v);
        rec.model_card = card.into();
        rec.sha256 = format!("{v:0>64}");
        r.append(
            "k",
            Action::RegisterVersion {
                model: "m".into(),
                record: rec,
            },
            serde_json::Value::Null,
            serde_json::Value::Null,
            None,
            Ok(()),
        )
        .unwrap();
    }

    #[test]
    fn a_torn_tail_cut_inside_a_utf8_character_is_dropped_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        register(&mut Registry::open(dir.path()).unwrap(), "v1", "café");
        let path = dir.path().join("audit.jsonl");
        let good = std::fs::read(&path).unwrap();
        // The same record again, torn after the first byte of `é`.
        let torn = &good[..good.iter().position(|&b| b == 0xC3).unwrap() + 1];
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(torn).unwrap();
        drop(f);
        let mut r = Registry::open(dir.path()).unwrap();
        assert_eq!(r.entries().len(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), good, "the tail is cut off");
        register(&mut r, "v2", "naïve");
        drop(r);
        let r = Registry::open(dir.path()).unwrap();
        assert_eq!(r.state().next_version_id("m"), "v3");
        assert_eq!(r.state().version("m", "v2").unwrap().model_card, "naïve");
    }

    #[test]
    fn a_corrupt_line_before_the_end_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        register(&mut Registry::open(dir.path()).unwrap(), "v1", "");
        let path = dir.path().join("audit.jsonl");
        let line = std::fs::read(&path).unwrap();
        // What a partial append used to leave once the next append completed
        // it: a whole line that is not JSON, with good lines after it.
        let mut text = line.clone();
        text.extend_from_slice(b"{\"seq\":2,\"ti");
        text.extend_from_slice(&line);
        text.extend_from_slice(&line);
        std::fs::write(&path, &text).unwrap();
        let err = Registry::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 2") && err.contains("corrupt"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), text, "nothing is cut");
    }

    #[test]
    fn only_regular_files_and_folders_of_them_under_the_roots_pass_the_path_check() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("models");
        let model = root.join("m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"x").unwrap();
        let roots = [root.clone()];
        assert_eq!(check_model_path(&model, &roots).unwrap(), model);
        assert!(check_model_path(&model.join("model.safetensors"), &roots).is_ok());
        assert!(check_model_path(Path::new("/dev/zero"), &[]).is_err());
        assert!(
            check_model_path(Path::new("/dev"), &[]).is_err(),
            "a folder of devices"
        );
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir_all(&outside).unwrap();
        assert!(
            check_model_path(&outside, &[]).is_ok(),
            "no roots: anywhere"
        );
        let a = check_model_path(&outside, &roots).unwrap_err().to_string();
        let b = check_model_path(&root.join("../nope"), &roots)
            .unwrap_err()
            .to_string();
        assert!(a.contains("under the model roots") && b.contains("under the model roots"));
        assert!(check_model_path(&root.join("../elsewhere"), &roots).is_err());
    }

    #[test]
    fn rfc3339_dates_are_civil_dates() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
