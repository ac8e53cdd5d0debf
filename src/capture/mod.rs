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
//!   the oldest segments are deleted until it fits. Segments older than
//!   `max_age_secs` (by their last write) are deleted too.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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
/// How often the writer checks ages while idle.
const SWEEP: Duration = Duration::from_secs(30);

/// A model's capture settings (`PUT /admin/v1/models/{m}/capture`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    /// Regular expressions redacted (as `[REDACTED]`) besides the built-in
    /// patterns (e-mail, phone, card, IP, keys), which always apply.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Most bytes kept on disk; the oldest segments go first.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Segments whose last write is older than this are deleted (0: no
    /// age limit).
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
    /// Starts capturing `model`'s requests into `dir` (created if needed;
    /// segments already there count toward the caps).
    pub fn start(model: &str, spec: CaptureSpec, dir: PathBuf) -> Result<Arc<Self>, String> {
        spec.validate()?;
        let redactor = Redactor::new(&spec.redact)?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let mut writer = Writer {
            model: model.to_string(),
            spec: spec.clone(),
            dir: dir.clone(),
            redactor,
            segments: segments(&dir)
                .into_iter()
                .map(|p| {
                    let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    (p, len)
                })
                .collect(),
            file: None,
            stats: stats.clone(),
        };
        writer.enforce(0);
        writer.publish();
        std::thread::Builder::new()
            .name(format!("capture-{model}"))
            .spawn(move || {
                loop {
                    match rx.recv_timeout(SWEEP) {
                        Ok(c) => writer.write(c),
                        Err(RecvTimeoutError::Timeout) => writer.enforce(0),
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

/// The writer thread's state.
struct Writer {
    model: String,
    spec: CaptureSpec,
    dir: PathBuf,
    redactor: Redactor,
    /// Every segment on disk with its size, oldest first; the last one is
    /// the one written when `file` is open.
    segments: VecDeque<(PathBuf, u64)>,
    file: Option<File>,
    stats: Arc<Stats>,
}

impl Writer {
    fn total(&self) -> u64 {
        self.segments.iter().map(|(_, n)| n).sum()
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

    fn write(&mut self, c: Captured) {
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
            .is_some_and(|(_, len)| *len > 0 && len + n > self.spec.segment_bytes);
        if self.file.is_none() || full {
            if self.file.is_some() {
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.open_segment() {
                tracing::error!(model = %self.model, error = %e, "capture: cannot open a segment; record dropped");
                self.count("dropped");
                return;
            }
        }
        self.enforce(n);
        let Some(f) = self.file.as_mut() else { return };
        if let Err(e) = f.write_all(&line) {
            tracing::error!(model = %self.model, error = %e, "capture: write failed; starting a new segment");
            self.file = None;
            self.count("dropped");
            return;
        }
        if let Some((_, len)) = self.segments.back_mut() {
            *len += n;
        }
        self.stats.written.fetch_add(1, Ordering::Relaxed);
        self.count("written");
        self.publish();
    }

    fn open_segment(&mut self) -> std::io::Result<()> {
        self.file = None;
        let ms = SystemTime::now()
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
            .open(&path)?;
        self.segments.push_back((path, 0));
        self.file = Some(f);
        Ok(())
    }

    /// Deletes segments past the age limit, then the oldest ones until
    /// `incoming` more bytes fit under `max_bytes`. The segment being
    /// written is deleted last, and then a fresh one is opened.
    fn enforce(&mut self, incoming: u64) {
        let max_age = Duration::from_secs(self.spec.max_age_secs);
        let now = SystemTime::now();
        let mut i = 0;
        while self.spec.max_age_secs > 0 && i < self.segments.len() {
            let old = std::fs::metadata(&self.segments[i].0)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > max_age);
            if old {
                self.delete(i);
            } else {
                i += 1;
            }
        }
        while !self.segments.is_empty() && self.total() + incoming > self.spec.max_bytes {
            self.delete(0);
        }
        if incoming > 0 && self.file.is_none() && self.open_segment().is_err() {
            tracing::error!(model = %self.model, "capture: cannot open a segment");
        }
        self.publish();
    }

    fn delete(&mut self, i: usize) {
        let Some((path, _)) = self.segments.remove(i) else {
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
