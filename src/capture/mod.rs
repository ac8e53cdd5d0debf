//! Capture: an opt-in, per-model store of finished requests and their
//! answers for retraining, as JSONL segments `llmops train` reads
//! (`{"prompt", "completion"}` or `{"messages": [..., assistant]}`, plus
//! `finish_reason`, `model`, `version`, `time`).
//!
//! Invariants:
//! - Personal data is redacted (`redact.rs`, the shadow samples' redactor,
//!   plus the model's own patterns) before a record is serialized, so
//!   nothing unredacted reaches disk, an export or a log line.
//! - The request path only `try_send`s a finished request to a bounded
//!   channel; a writer thread per model redacts and appends. A full channel
//!   drops the record and counts it.
//! - The bytes on disk never exceed `max_bytes`: before a line is written
//!   the oldest segments are deleted until it fits.
//! - No record outlives `max_age_secs`: ages are those of records, not of a
//!   segment's last write. A segment takes records for at most an eighth of
//!   `max_age_secs` from its first (then a new one is started), and is
//!   deleted once that first, oldest record is `max_age_secs` old; the
//!   writer wakes for that deadline even when idle. So a record is kept
//!   between 7/8 of `max_age_secs` and `max_age_secs`.
//! - Only the server's user can read what is captured: segments are created
//!   0600 in folders created 0700, and a folder or segment found with wider
//!   permissions when capture starts is narrowed to those.

use std::collections::VecDeque;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::Message;
use crate::monitor::names;
use crate::redact::Redactor;

/// Finished requests waiting for the writer.
const QUEUE: usize = 1024;
/// How often the writer checks ages while idle (at the latest: it wakes
/// earlier for the next segment's deadline).
const SWEEP: Duration = Duration::from_secs(30);
/// A segment takes records for this fraction of `max_age_secs` from its
/// first one.
const SEGMENT_AGE_FRACTION: u32 = 8;
/// Mode of the capture folders: the server's user only.
const DIR_MODE: u32 = 0o700;
/// Mode of the segment files: the server's user only.
const FILE_MODE: u32 = 0o600;

/// A model's capture settings (`PUT /admin/v1/models/{m}/capture`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    /// Regular expressions redacted (as `[REDACTED]`) besides the built-in
    /// patterns (e-mail, phone, card, IBAN, SSN, IP, keys), which always apply.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Most bytes kept on disk; the oldest segments go first.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Most seconds a record is kept (0: no age limit). A segment takes
    /// records for an eighth of this from its first and is deleted when
    /// that first record is this old, so every record is kept between 7/8
    /// of this and this.
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// A segment is closed and a new one started past this size.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
}

fn default_max_bytes() -> u64 {
    256 << 20
}
fn default_max_age() -> u64 {
    7 * 86_400
}
fn default_segment_bytes() -> u64 {
    16 << 20
}

impl Default for CaptureSpec {
    fn default() -> Self {
        Self {
            redact: vec![],
            max_bytes: default_max_bytes(),
            max_age_secs: default_max_age(),
            segment_bytes: default_segment_bytes(),
        }
    }
}

impl CaptureSpec {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.segment_bytes < 1024 {
            return Err("segment_bytes: at least 1024".into());
        }
        if self.max_bytes < self.segment_bytes {
            return Err("max_bytes: at least segment_bytes".into());
        }
        Redactor::new(&self.redact).map(|_| ())
    }
}

/// What the client sent, as text.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A completion prompt.
    Text(String),
    /// A conversation.
    Chat(Vec<Message>),
}

/// One finished request, as the request path hands it over (unredacted:
/// it only lives in memory until the writer redacts it).
#[derive(Debug)]
pub struct Captured {
    /// What was asked.
    pub prompt: Prompt,
    /// The answer.
    pub completion: String,
    /// Why it ended (`stop`, `length`, …).
    pub finish_reason: &'static str,
    /// The version that answered.
    pub version: String,
}

#[derive(Debug, Default)]
struct Stats {
    written: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    bytes: AtomicU64,
    segments: AtomicU64,
    rotations: AtomicU64,
    deleted: AtomicU64,
}

/// A model's capture: settings and the writer's channel.
pub struct Capture {
    model: String,
    spec: CaptureSpec,
    dir: PathBuf,
    tx: SyncSender<Captured>,
    stats: Arc<Stats>,
}

/// The folder of `model`'s capture under the data dir.
pub fn dir(data_dir: &Path, model: &str) -> PathBuf {
    data_dir.join("capture").join(model)
}

impl Capture {
    /// Starts capturing `model`'s requests into `dir` (created 0700 if
    /// needed, narrowed to 0700 if not; segments already there count toward
    /// the caps and are narrowed to 0600).
    pub fn start(model: &str, spec: CaptureSpec, dir: PathBuf) -> Result<Arc<Self>, String> {
        let stats = Arc::new(Stats::default());
        let mut writer = Writer::open(model, spec.clone(), dir.clone(), stats.clone())?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        writer.enforce(0, SystemTime::now());
        std::thread::Builder::new()
            .name(format!("capture-{model}"))
            .spawn(move || {
                loop {
                    let wait = writer.next_deadline(SystemTime::now()).min(SWEEP);
                    match rx.recv_timeout(wait) {
                        Ok(c) => writer.write(c, SystemTime::now()),
                        Err(RecvTimeoutError::Timeout) => writer.enforce(0, SystemTime::now()),
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .map_err(|e| format!("capture writer: {e}"))?;
        Ok(Arc::new(Self {
            model: model.to_string(),
            spec,
            dir,
            tx,
            stats,
        }))
    }

    /// The settings.
    pub fn spec(&self) -> &CaptureSpec {
        &self.spec
    }

    /// Hands a finished request to the writer. Never waits: when the writer
    /// is behind the record is dropped and counted.
    pub fn offer(&self, c: Captured) {
        match self.tx.try_send(c) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::CAPTURE_RECORDS, "model" => self.model.clone(), "outcome" => "dropped").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Settings and counts.
    pub fn status(&self) -> Value {
        let s = &self.stats;
        json!({
            "model": self.model,
            "enabled": true,
            "spec": self.spec,
            "written": s.written.load(Ordering::Relaxed),
            "dropped": s.dropped.load(Ordering::Relaxed),
            "skipped": s.skipped.load(Ordering::Relaxed),
            "bytes": s.bytes.load(Ordering::Relaxed),
            "segments": s.segments.load(Ordering::Relaxed),
            "rotations": s.rotations.load(Ordering::Relaxed),
            "deleted_segments": s.deleted.load(Ordering::Relaxed),
            "dir": self.dir.display().to_string(),
        })
    }
}

/// The segment files in `dir`, oldest first (names sort by creation).
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "jsonl")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seg-"))
        })
        .collect();
    out.sort();
    out
}

/// The whole lines of a segment (a line being written is left out).
pub fn read_whole_lines(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![];
    File::open(path)?.read_to_end(&mut buf)?;
    let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    buf.truncate(end);
    Ok(buf)
}

/// The capture of `dir` as one JSONL stream, oldest first, read one
/// segment at a time. A segment deleted meanwhile (retention) is skipped.
pub fn export(dir: PathBuf) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> + Send {
    let files = segments(&dir);
    futures::stream::iter(files).filter_map(|p| async move {
        match tokio::task::spawn_blocking(move || read_whole_lines(&p)).await {
            Ok(Ok(b)) if !b.is_empty() => Some(Ok(b)),
            Ok(Ok(_)) => None,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Ok(Err(e)) => Some(Err(e)),
            Err(e) => Some(Err(std::io::Error::other(e.to_string()))),
        }
    })
}

/// When a segment's first record was written: the time in its name
/// (`seg-{unix ms}-{seq}.jsonl`, taken before that record's line), or, for
/// a name that does not say, its creation or last-modification time.
fn first_record(path: &Path) -> SystemTime {
    let named = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("seg-"))
        .and_then(|n| n.split('-').next())
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    named.unwrap_or_else(|| {
        std::fs::metadata(path)
            .and_then(|m| m.created().or_else(|_| m.modified()))
            .unwrap_or_else(|_| SystemTime::now())
    })
}

/// Narrows `path` to `mode` when it allows more (never widens it).
fn narrow(path: &Path, mode: u32) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o777 & !mode != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A segment on disk.
struct Segment {
    path: PathBuf,
    /// Bytes in it.
    len: u64,
    /// When its first (oldest) record was written.
    first: SystemTime,
}

/// The writer thread's state.
struct Writer {
    model: String,
    spec: CaptureSpec,
    dir: PathBuf,
    redactor: Redactor,
    /// Every segment on disk, oldest first; the last one is the one written
    /// when `file` is open.
    segments: VecDeque<Segment>,
    file: Option<File>,
    stats: Arc<Stats>,
}

impl Writer {
    /// The writer of `dir`: creates it 0700 (or narrows it to 0700) and
    /// takes in the segments already there, narrowed to 0600.
    fn open(
        model: &str,
        spec: CaptureSpec,
        dir: PathBuf,
        stats: Arc<Stats>,
    ) -> Result<Self, String> {
        spec.validate()?;
        let redactor = Redactor::new(&spec.redact)?;
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        narrow(&dir, DIR_MODE)?;
        let mut found = VecDeque::new();
        for path in segments(&dir) {
            narrow(&path, FILE_MODE)?;
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let first = first_record(&path);
            found.push_back(Segment { path, len, first });
        }
        let w = Writer {
            model: model.to_string(),
            spec,
            dir,
            redactor,
            segments: found,
            file: None,
            stats,
        };
        w.publish();
        Ok(w)
    }

    fn total(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// The age limit, when there is one.
    fn max_age(&self) -> Option<Duration> {
        (self.spec.max_age_secs > 0).then(|| Duration::from_secs(self.spec.max_age_secs))
    }

    /// How long until the oldest segment must go (`Duration::MAX` with no
    /// age limit or no segment).
    fn next_deadline(&self, now: SystemTime) -> Duration {
        match (self.max_age(), self.segments.front()) {
            (Some(max_age), Some(oldest)) => (oldest.first + max_age)
                .duration_since(now)
                .unwrap_or_default()
                // Past the deadline by a hair, so that the check sees it.
                .saturating_add(Duration::from_millis(1)),
            _ => Duration::MAX,
        }
    }

    fn publish(&self) {
        let total = self.total();
        self.stats.bytes.store(total, Ordering::Relaxed);
        self.stats
            .segments
            .store(self.segments.len() as u64, Ordering::Relaxed);
        metrics::gauge!(names::CAPTURE_BYTES, "model" => self.model.clone()).set(total as f64);
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!(names::CAPTURE_RECORDS, "model" => self.model.clone(), "outcome" => outcome).increment(1);
    }

    /// The record as its JSONL line, every text redacted.
    fn line(&self, c: Captured) -> Vec<u8> {
        let r = &self.redactor;
        let completion = r.redact(&c.completion);
        let mut v = match c.prompt {
            Prompt::Text(t) => json!({"prompt": r.redact(&t), "completion": completion}),
            Prompt::Chat(ms) => {
                let mut ms: Vec<Value> = ms
                    .iter()
                    .map(|m| json!({"role": m.role, "content": r.redact(&m.content)}))
                    .collect();
                ms.push(json!({"role": "assistant", "content": completion}));
                json!({ "messages": ms })
            }
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("finish_reason".into(), json!(c.finish_reason));
            o.insert("model".into(), json!(self.model));
            o.insert("version".into(), json!(c.version));
            o.insert("time".into(), json!(crate::registry::now_rfc3339()));
        }
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Writes `c` at `now` (taken before its line, which records the time
    /// again: a segment's name is never later than its first record).
    fn write(&mut self, c: Captured, now: SystemTime) {
        let line = self.line(c);
        let n = line.len() as u64;
        if n > self.spec.max_bytes {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            self.count("skipped");
            return;
        }
        let full = self
            .segments
            .back()
            .is_some_and(|s| s.len > 0 && s.len + n > self.spec.segment_bytes);
        // A segment takes records for a fraction of the age limit from its
        // first, so that deleting it by that first record's age takes no
        // record much younger.
        let stale = self.max_age().is_some_and(|max_age| {
            self.segments.back().is_some_and(|s| {
                now.duration_since(s.first).unwrap_or_default() >= max_age / SEGMENT_AGE_FRACTION
            })
        });
        if self.file.is_none() || full || stale {
            if self.file.is_some() {
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.open_segment(now) {
                tracing::error!(model = %self.model, error = %e, "capture: cannot open a segment; record dropped");
                self.count("dropped");
                return;
            }
        }
        self.enforce(n, now);
        let Some(f) = self.file.as_mut() else { return };
        if let Err(e) = f.write_all(&line) {
            tracing::error!(model = %self.model, error = %e, "capture: write failed; starting a new segment");
            self.file = None;
            self.count("dropped");
            return;
        }
        if let Some(s) = self.segments.back_mut() {
            s.len += n;
        }
        self.stats.written.fetch_add(1, Ordering::Relaxed);
        self.count("written");
        self.publish();
    }

    /// Starts a segment whose first record is written at `now`.
    fn open_segment(&mut self, now: SystemTime) -> std::io::Result<()> {
        self.file = None;
        let ms = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        // Process-wide: a replaced capture's writer may still be finishing
        // its queue in the same folder.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) % 1_000_000;
        let path = self.dir.join(format!("seg-{ms:015}-{seq:06}.jsonl"));
        let f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(FILE_MODE)
            .open(&path)?;
        // The mode above is masked by the umask, which can only narrow it.
        self.segments.push_back(Segment {
            path,
            len: 0,
            // The name's time, to the millisecond, as a restart reads it.
            first: UNIX_EPOCH + Duration::from_millis(ms as u64),
        });
        self.file = Some(f);
        Ok(())
    }

    /// Deletes the segments whose first record is `max_age_secs` old at
    /// `now`, then the oldest ones until `incoming` more bytes fit under
    /// `max_bytes`. The segment being written is deleted last, and then a
    /// fresh one is opened.
    fn enforce(&mut self, incoming: u64, now: SystemTime) {
        if let Some(max_age) = self.max_age() {
            let mut i = 0;
            while i < self.segments.len() {
                let age = now
                    .duration_since(self.segments[i].first)
                    .unwrap_or_default();
                if age >= max_age {
                    self.delete(i);
                } else {
                    i += 1;
                }
            }
        }
        while !self.segments.is_empty() && self.total() + incoming > self.spec.max_bytes {
            self.delete(0);
        }
        if incoming > 0 && self.file.is_none() && self.open_segment(now).is_err() {
            tracing::error!(model = %self.model, "capture: cannot open a segment");
        }
        self.publish();
    }

    fn delete(&mut self, i: usize) {
        let Some(Segment { path, .. }) = self.segments.remove(i) else {
            return;
        };
        if i == self.segments.len() && self.file.is_some() {
            // It was the one being written.
            self.file = None;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "capture: cannot delete a segment")
            }
        }
        self.stats.deleted.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(cap: &Capture, written: u64) {
        for _ in 0..500 {
            if cap.stats.written.load(Ordering::Relaxed) + cap.stats.skipped.load(Ordering::Relaxed)
                >= written
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("writer did not catch up: {}", cap.status());
    }

    #[test]
    fn segments_rotate_and_the_total_stays_under_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = CaptureSpec {
            redact: vec![],
            max_bytes: 8 * 1024,
            max_age_secs: 0,
            segment_bytes: 2 * 1024,
        };
        let cap = Capture::start("m", spec, tmp.path().join("c")).unwrap();
        for i in 0..200 {
            cap.offer(Captured {
                prompt: Prompt::Text(format!("prompt {i} {}", "x ".repeat(50))),
                completion: "yes ".repeat(12),
                finish_reason: "stop",
                version: "v1".into(),
            });
            // Keep the channel from overflowing: this test is about the
            // writer's caps, not drops.
            if i % 50 == 49 {
                wait_for(&cap, i + 1);
            }
        }
        wait_for(&cap, 200);
        let files = segments(&tmp.path().join("c"));
        let total: u64 = files
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(total <= 8 * 1024, "{total}");
        assert!(files.len() >= 3, "rotated: {files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 2 * 1024);
        }
        // The newest records survive, the oldest are gone.
        let text: String = files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(text.contains("prompt 199 ") && !text.contains("prompt 0 "));
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["completion"], "yes ".repeat(12));
            assert_eq!(v["model"], "m");
        }
    }

    fn record(i: usize) -> Captured {
        Captured {
            prompt: Prompt::Text(format!("record {i} end")),
            completion: "ok".into(),
            finish_reason: "stop",
            version: "v1".into(),
        }
    }

    /// The record ids in the segments of `dir`.
    fn on_disk(dir: &Path) -> Vec<usize> {
        let mut ids = vec![];
        for p in segments(dir) {
            for line in std::fs::read_to_string(p).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                let prompt = v["prompt"].as_str().unwrap();
                ids.push(prompt.split(' ').nth(1).unwrap().parse().unwrap());
            }
        }
        ids
    }

    #[test]
    fn no_record_outlives_max_age_and_none_goes_before_seven_eighths_of_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let spec = CaptureSpec {
            max_age_secs: 800,
            ..CaptureSpec::default()
        };
        let max_age = Duration::from_secs(800);
        let stats = Arc::new(Stats::default());
        let mut w = Writer::open("m", spec.clone(), dir.clone(), stats.clone()).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // Irregular traffic over five max_ages, with a quiet spell longer
        // than a segment's span; the writer is asked at every write and
        // between writes (as its idle wake-ups do).
        let mut written: Vec<SystemTime> = vec![];
        let mut t = t0;
        for i in 0..400usize {
            let gap = if i == 200 { 500 } else { 3 + (i * 7919) % 17 };
            let before = t + Duration::from_secs(gap as u64 / 2);
            w.enforce(0, before);
            t += Duration::from_secs(gap as u64);
            w.write(record(i), t);
            written.push(t);
            let kept = on_disk(&dir);
            for (id, &at) in written.iter().enumerate() {
                let age = t.duration_since(at).unwrap();
                if kept.contains(&id) {
                    assert!(age < max_age, "record {id} kept at age {age:?}");
                } else {
                    assert!(
                        age >= max_age * 7 / 8,
                        "record {id} deleted at age {age:?}, before 7/8 of {max_age:?}"
                    );
                }
            }
        }
        let rotations = stats.rotations.load(Ordering::Relaxed);
        assert!(
            rotations >= 40,
            "a segment spans max_age/8: {rotations} rotations"
        );
        // The idle writer wakes when the oldest segment's first record
        // reaches max_age, and deletes it then.
        let oldest = w.segments.front().unwrap().first;
        let wait = w.next_deadline(t);
        assert!(
            t + wait >= oldest + max_age && t + wait <= oldest + max_age + Duration::from_millis(5),
            "wakes {wait:?} after {t:?} for a segment begun at {oldest:?}"
        );
        // A restart reads each segment's first record from its name.
        drop(w);
        let mut w = Writer::open("m", spec, dir.clone(), stats).unwrap();
        let before = on_disk(&dir);
        w.enforce(0, oldest + max_age - Duration::from_millis(1));
        assert_eq!(on_disk(&dir), before, "nothing is due yet");
        w.enforce(0, oldest + max_age);
        let after = on_disk(&dir);
        assert!(after.len() < before.len(), "the oldest segment went");
        assert_eq!(after, before[before.len() - after.len()..]);
    }

    #[test]
    fn segments_are_readable_by_the_server_user_only_and_wider_modes_are_narrowed() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        // A new folder (and its parents) is created 0700.
        let fresh = tmp.path().join("capture").join("m");
        let cap = Capture::start("m", CaptureSpec::default(), fresh.clone()).unwrap();
        cap.offer(record(1));
        wait_for(&cap, 1);
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&tmp.path().join("capture")), 0o700);
        let files = segments(&fresh);
        assert_eq!(files.len(), 1);
        assert_eq!(mode(&files[0]), 0o600, "{}", files[0].display());
        // A folder and a segment left world-readable (by an older version)
        // are narrowed when capture starts.
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        let seg = old.join("seg-001800000000000-000000.jsonl");
        std::fs::write(&seg, "{\"prompt\": \"record 0 end\"}\n").unwrap();
        std::fs::set_permissions(&seg, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cap = Capture::start(
            "m",
            CaptureSpec {
                max_age_secs: 0,
                ..CaptureSpec::default()
            },
            old.clone(),
        )
        .unwrap();
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&seg), 0o600);
        cap.offer(record(2));
        wait_for(&cap, 1);
        for f in segments(&old) {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    #[test]
    fn planted_personal_data_is_redacted_before_it_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = CaptureSpec {
            redact: vec!["(?i)codename \\w+".into()],
            ..CaptureSpec::default()
        };
        let cap = Capture::start("m", spec, tmp.path().to_path_buf()).unwrap();
        cap.offer(Captured {
            prompt: Prompt::Chat(vec![Message {
                role: "user".into(),
                content: "I am jane@example.com, codename Nightjar".into(),
                ..Default::default()
            }]),
            completion: "call +1 415-555-0132".into(),
            finish_reason: "length",
            version: "v1".into(),
        });
        wait_for(&cap, 1);
        let text = std::fs::read_to_string(&segments(tmp.path())[0]).unwrap();
        for secret in ["jane@example.com", "Nightjar", "555-0132"] {
            assert!(!text.contains(secret), "{text}");
        }
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["messages"][1]["role"], "assistant");
        assert!(
            v["messages"][1]["content"]
                .as_str()
                .unwrap()
                .contains("[PHONE]")
        );
        assert_eq!(v["finish_reason"], "length");
    }
}
