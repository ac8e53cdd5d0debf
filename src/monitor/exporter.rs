//! The Prometheus recorder: installed once per process, rendered at scrape
//! time, with vLLM's bucket boundaries and process memory/CPU.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::names;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Held while installing: a second server starting in the same process (the
/// tests run several at once) waits for the first's handle instead of
/// rendering a recorder of its own that nothing records into.
static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Installs the global recorder (first call) and returns the render handle.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let _installing = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    use super::shadow::names as shadow;
    let mut b = PrometheusBuilder::new();
    for (name, buckets) in [
        (names::TTFT, super::TTFT_BUCKETS),
        (names::ENGINE_TTFT, super::TTFT_BUCKETS),
        (names::ITL, super::ITL_BUCKETS),
        (names::E2E, super::REQUEST_LATENCY_BUCKETS),
        (names::QUEUE, super::REQUEST_LATENCY_BUCKETS),
        (names::PREFILL, super::REQUEST_LATENCY_BUCKETS),
        (names::DECODE, super::REQUEST_LATENCY_BUCKETS),
        (names::PROMPT_TOKENS_HIST, super::TOKEN_BUCKETS),
        (names::GENERATION_TOKENS_HIST, super::TOKEN_BUCKETS),
        (names::STEP_BATCH, super::BATCH_BUCKETS),
        (names::STEP_TOKENS, super::TOKEN_BUCKETS),
        (names::STEP_TIME, super::STEP_BUCKETS),
        (names::STRUCTURED_MASK_TIME, super::MASK_BUCKETS),
        (names::API_DURATION, super::API_BUCKETS),
        (names::HOOK_LATENCY, super::API_BUCKETS),
        (shadow::AGREEMENT, super::shadow::SHARE_BUCKETS),
        (shadow::TOP1_AGREEMENT, super::shadow::SHARE_BUCKETS),
        (shadow::LENGTH_RATIO, super::shadow::RATIO_BUCKETS),
        (shadow::TTFT_DELTA, super::shadow::DELTA_BUCKETS),
        (shadow::E2E_DELTA, super::shadow::DELTA_BUCKETS),
        (shadow::LOGPROB_GAP, super::shadow::NATS_BUCKETS),
        (shadow::KL, super::shadow::NATS_BUCKETS),
    ] {
        b = b.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
    }
    let recorder = b.build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            super::describe();
            metrics::describe_gauge!(
                "process_resident_memory_bytes",
                metrics::Unit::Bytes,
                "Resident memory of the llmops process."
            );
            metrics::describe_counter!(
                "process_cpu_seconds_total",
                metrics::Unit::Seconds,
                "User and system CPU time of the llmops process."
            );
            let _ = HANDLE.set(handle.clone());
            spawn_upkeep(handle.clone());
            Ok(handle)
        }
        // Another recorder (a test harness) won the race: render what we can.
        Err(_) => Ok(HANDLE.get().cloned().unwrap_or(handle)),
    }
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds.
/// A recorder from `build_recorder` keeps every sample until something
/// drains it; without this thread that happens only when `/metrics` is
/// scraped, so a server nobody scrapes grows by every token's latency.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no metrics upkeep thread: histograms drain only when scraped");
    }
}

/// Renders the exposition text, refreshing process metrics first.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Some(p) = process_stats() {
        metrics::gauge!("process_resident_memory_bytes").set(p.rss_bytes as f64);
        metrics::counter!("process_cpu_seconds_total").absolute(p.cpu_seconds as u64);
    }
    handle.render()
}

/// Resident memory and CPU time of this process.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
}

/// Reads `/proc/self` (Linux); `None` elsewhere.
pub fn process_stats() -> Option<ProcessStats> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Linux reports clock ticks of 1/100 s on every mainstream configuration.
    let ticks = 100.0;
    Some(ProcessStats {
        rss_bytes: rss_pages * 4096,
        cpu_seconds: (utime + stime) / ticks,
    })
}
