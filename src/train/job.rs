//! Training as a library call: a [`TrainJob`] runs [`super::run_with`] on its
//! own OS thread, inside a rayon pool of its own, so that a server can train
//! in the same process while it keeps serving.
//!
//! - Progress (step, loss, tokens/s, ETA) is a handful of atomics behind a
//!   cheap [`JobHandle`]; reading it never waits for the trainer.
//! - Cancellation is a flag checked between steps (and while the job sleeps
//!   out its duty cycle); a cancelled or failed job removes its staging
//!   folder, so nothing half-written is left where the result would go.
//! - The CPU budget ([`CpuBudget`]) bounds what the job takes from serving:
//!   its own rayon pool of `threads` threads (candle's CPU kernels and gemm
//!   run on the pool they are called from), a duty cycle (after a step that
//!   took `t`, the job sleeps `t·(1 − duty)/duty`), and a raised nice value
//!   for its threads on Linux, where nice is per thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{TrainArgs, TrainReport};

/// How much of the machine a job may take.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpuBudget {
    /// Threads of the job's rayon pool (candle's kernels run on it).
    pub threads: usize,
    /// Share of wall time the job computes, in (0, 1]: after each step it
    /// sleeps so that computing is at most this share.
    pub duty: f64,
    /// Nice value added to the job's threads (Linux; 0 leaves it alone).
    pub nice: i32,
}

impl Default for CpuBudget {
    /// One thread, half of its time, niced: a background job on a small
    /// machine that serves.
    fn default() -> Self {
        Self {
            threads: 1,
            duty: 0.5,
            nice: 10,
        }
    }
}

impl CpuBudget {
    /// No limit beyond the process's pool: what `llmops train` uses.
    pub fn unlimited() -> Self {
        Self {
            threads: 0,
            duty: 1.0,
            nice: 0,
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.duty > 0.0 && self.duty <= 1.0) {
            return Err(format!("duty must be in (0, 1], got {}", self.duty));
        }
        if self.threads > 1024 {
            return Err(format!(
                "threads must be at most 1024, got {}",
                self.threads
            ));
        }
        if !(0..=19).contains(&self.nice) {
            return Err(format!("nice must be in 0..=19, got {}", self.nice));
        }
        Ok(())
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading data, tokenizing, loading the base weights.
    Preparing,
    /// Optimizer steps.
    Training,
    /// Held-out losses (before the first step and after the last).
    Evaluating,
    /// Writing the weights and the card.
    Writing,
    /// Finished; the result is in place.
    Done,
    /// Stopped by [`JobHandle::cancel`]; nothing was left behind.
    Cancelled,
    /// Failed; nothing was left behind.
    Failed,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Preparing,
            1 => Phase::Training,
            2 => Phase::Evaluating,
            3 => Phase::Writing,
            4 => Phase::Done,
            5 => Phase::Cancelled,
            _ => Phase::Failed,
        }
    }

    /// Finished one way or another.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Cancelled | Phase::Failed)
    }
}

/// A job's progress at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// Where the job is.
    pub phase: Phase,
    /// Optimizer steps done.
    pub step: u64,
    /// Optimizer steps planned.
    pub steps: u64,
    /// Training loss of the last step (absent before the first).
    pub loss: Option<f32>,
    /// Target tokens per second of training so far (sleeps included).
    pub tokens_per_second: f64,
    /// Seconds since the job started.
    pub elapsed_seconds: f64,
    /// Seconds left at the pace so far (absent before the first step).
    pub eta_seconds: Option<f64>,
}

/// The state a job shares with its handles and its training loop.
#[derive(Debug)]
pub struct Shared {
    cancel: AtomicBool,
    phase: AtomicU8,
    step: AtomicU64,
    steps: AtomicU64,
    /// Step the loop started from (a resumed run starts later).
    first_step: AtomicU64,
    /// f32 bits; NaN before the first step.
    loss: AtomicU32,
    /// f64 bits.
    tokens_per_second: AtomicU64,
    started: Instant,
    /// Milliseconds after `started` when the first step began.
    training_from_ms: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            cancel: AtomicBool::new(false),
            phase: AtomicU8::new(Phase::Preparing as u8),
            step: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            first_step: AtomicU64::new(0),
            loss: AtomicU32::new(f32::NAN.to_bits()),
            tokens_per_second: AtomicU64::new(0f64.to_bits()),
            started: Instant::now(),
            training_from_ms: AtomicU64::new(0),
        }
    }
}

impl Shared {
    pub(super) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub(super) fn begin(&self, first_step: u64, steps: u64) {
        self.first_step.store(first_step, Ordering::Relaxed);
        self.step.store(first_step, Ordering::Relaxed);
        self.steps.store(steps, Ordering::Relaxed);
        self.training_from_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.set_phase(Phase::Training);
    }

    pub(super) fn stepped(&self, step: u64, loss: f32, tokens_per_second: f64) {
        self.loss.store(loss.to_bits(), Ordering::Relaxed);
        self.tokens_per_second
            .store(tokens_per_second.to_bits(), Ordering::Relaxed);
        self.step.store(step, Ordering::Release);
    }

    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> ProgressSnapshot {
        let phase = Phase::from_u8(self.phase.load(Ordering::Acquire));
        let step = self.step.load(Ordering::Acquire);
        let steps = self.steps.load(Ordering::Relaxed);
        let first = self.first_step.load(Ordering::Relaxed);
        let loss = f32::from_bits(self.loss.load(Ordering::Relaxed));
        let elapsed = self.started.elapsed().as_secs_f64();
        let training = elapsed - self.training_from_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let done = step.saturating_sub(first);
        let eta = (done > 0 && !phase.is_final())
            .then(|| training / done as f64 * steps.saturating_sub(step) as f64);
        ProgressSnapshot {
            phase,
            step,
            steps,
            loss: (!loss.is_nan()).then_some(loss),
            tokens_per_second: f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed)),
            elapsed_seconds: elapsed,
            eta_seconds: eta,
        }
    }
}

/// What the training loop is given besides its arguments: the shared
/// progress and cancellation, and the duty cycle.
#[derive(Debug, Clone)]
pub struct Control {
    pub(super) shared: Arc<Shared>,
    pub(super) duty: f64,
}

impl Control {
    /// No job around it: progress goes nowhere, nothing cancels, no sleeps.
    pub fn unlimited() -> Self {
        Self {
            shared: Arc::new(Shared::default()),
            duty: 1.0,
        }
    }

    /// Sleeps out the duty cycle after a step that took `busy`, waking early
    /// when cancelled.
    pub(super) fn rest(&self, busy: Duration) {
        if self.duty >= 1.0 {
            return;
        }
        let until = Instant::now() + busy.mul_f64((1.0 - self.duty) / self.duty);
        while !self.shared.cancelled() {
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(20)));
        }
    }
}

/// The training loop's error when [`JobHandle::cancel`] stopped it.
#[derive(Debug, thiserror::Error)]
#[error("training was cancelled")]
pub struct Cancelled;

/// How a job ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Cancelled; the staging folder is gone.
    #[error("training was cancelled")]
    Cancelled,
    /// Failed; the staging folder is gone.
    #[error("training failed: {0:#}")]
    Failed(anyhow::Error),
}

/// A cheap, cloneable view of a running job: progress and cancellation.
#[derive(Debug, Clone)]
pub struct JobHandle {
    shared: Arc<Shared>,
}

impl JobHandle {
    /// The progress now (a few atomic loads).
    pub fn progress(&self) -> ProgressSnapshot {
        self.shared.snapshot()
    }

    /// Asks the job to stop; it does so before its next step.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::Release);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancelled()
    }
}

/// A training run on its own thread. The result appears at `args.out` only
/// when the run succeeds: it trains into `<out>.partial` and renames that
/// at the end.
pub struct TrainJob {
    handle: JobHandle,
    thread: std::thread::JoinHandle<Result<TrainReport, JobError>>,
}

/// The staging folder of a job writing to `out`.
pub fn staging_dir(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

impl TrainJob {
    /// Starts training `args` under `budget`. Refuses an `out` that exists
    /// (a job never overwrites a result) or a resumed run.
    pub fn start(args: TrainArgs, budget: CpuBudget) -> anyhow::Result<Self> {
        budget.validate().map_err(|e| anyhow::anyhow!(e))?;
        if args.out.exists() {
            anyhow::bail!("{} exists; a job writes a new folder", args.out.display());
        }
        if args.resume.is_some() {
            anyhow::bail!("a job cannot resume a checkpoint; use `llmops train --resume`");
        }
        let shared = Arc::new(Shared::default());
        let ctl = Control {
            shared: shared.clone(),
            duty: budget.duty,
        };
        let thread = std::thread::Builder::new()
            .name("llmops-train".into())
            .spawn(move || run_job(args, budget, ctl))?;
        Ok(Self {
            handle: JobHandle { shared },
            thread,
        })
    }

    /// The job's handle.
    pub fn handle(&self) -> JobHandle {
        self.handle.clone()
    }

    /// Waits for the end (blocking).
    pub fn join(self) -> Result<TrainReport, JobError> {
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => Err(JobError::Failed(anyhow::anyhow!(
                "the training thread panicked"
            ))),
        }
    }
}

/// Lowers the calling thread's priority (Linux: nice is per thread).
fn renice(nice: i32) {
    #[cfg(target_os = "linux")]
    if nice > 0 {
        // SAFETY: gettid has no preconditions; setpriority only reads its
        // arguments and changes this thread's own scheduling priority.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

fn run_job(mut args: TrainArgs, budget: CpuBudget, ctl: Control) -> Result<TrainReport, JobError> {
    renice(budget.nice);
    let out = args.out.clone();
    let staging = staging_dir(&out);
    let _ = std::fs::remove_dir_all(&staging);
    args.out = staging.clone();
    args.quiet = true;
    let shared = ctl.shared.clone();
    let result = if budget.threads > 0 {
        let nice = budget.nice;
        rayon::ThreadPoolBuilder::new()
            .num_threads(budget.threads)
            .thread_name(|i| format!("llmops-train-{i}"))
            .start_handler(move |_| renice(nice))
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|pool| pool.install(|| super::run_with(&args, &ctl)))
    } else {
        super::run_with(&args, &ctl)
    };
    let result = result.and_then(|report| {
        if shared.cancelled() {
            return Err(Cancelled.into());
        }
        std::fs::rename(&staging, &out)
            .map_err(|e| anyhow::anyhow!("moving {} into place: {e}", out.display()))?;
        Ok(report)
    });
    match result {
        Ok(report) => {
            shared.set_phase(Phase::Done);
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            if e.downcast_ref::<Cancelled>().is_some() {
                shared.set_phase(Phase::Cancelled);
                Err(JobError::Cancelled)
            } else {
                shared.set_phase(Phase::Failed);
                Err(JobError::Failed(e))
            }
        }
    }
}
