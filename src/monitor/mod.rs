//! Metric names, bucket boundaries and the per-engine metric handles.
//!
//! Names follow vLLM's with an `llmops_` prefix. Handles are registered once
//! per engine (labels: model, version; request series also protocol and
//! variant, which each request carries), so recording on the hot path is an
//! atomic update: no lock, no label formatting, no allocation per token.

pub mod canary;
pub mod drift;
pub mod exporter;
pub mod pod;
pub mod shadow;
pub mod window;

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Label};

/// Metric names.
pub mod names {
    /// Arrival at the front end → first token.
    pub const TTFT: &str = "llmops_time_to_first_token_seconds";
    /// Submission to the engine → first token.
    pub const ENGINE_TTFT: &str = "llmops_engine_time_to_first_token_seconds";
    /// Between consecutive tokens of a request.
    pub const ITL: &str = "llmops_inter_token_latency_seconds";
    /// Arrival → last token.
    pub const E2E: &str = "llmops_e2e_request_latency_seconds";
    /// Submission → admission.
    pub const QUEUE: &str = "llmops_request_queue_time_seconds";
    /// Admission → first token.
    pub const PREFILL: &str = "llmops_request_prefill_time_seconds";
    /// First token → last token.
    pub const DECODE: &str = "llmops_request_decode_time_seconds";
    /// Prompt length per request.
    pub const PROMPT_TOKENS_HIST: &str = "llmops_request_prompt_tokens";
    /// Generated length per request.
    pub const GENERATION_TOKENS_HIST: &str = "llmops_request_generation_tokens";
    /// Sequences running.
    pub const RUNNING: &str = "llmops_num_requests_running";
    /// Client requests waiting (background work is not counted).
    pub const WAITING: &str = "llmops_num_requests_waiting";
    /// Background work waiting: shadow copies and drift probes.
    pub const BACKGROUND_WAITING: &str = "llmops_num_background_requests_waiting";
    /// KV pool in use, 0–1.
    pub const KV_USAGE: &str = "llmops_kv_cache_usage_perc";
    /// Tokens the KV pool holds for sequences that keep every position.
    pub const KV_CAPACITY: &str = "llmops_kv_cache_capacity_tokens";
    /// KV blocks sliding-window layers gave back as their windows moved.
    pub const KV_WINDOW_FREED: &str = "llmops_kv_cache_window_freed_blocks_total";
    /// Requests waiting on every engine of the process (no labels).
    pub const POD_WAITING: &str = "llmops_pod_num_requests_waiting";
    /// Sequences running on every engine of the process (no labels).
    pub const POD_RUNNING: &str = "llmops_pod_num_requests_running";
    /// KV blocks in use over blocks in all, every engine (no labels).
    pub const POD_KV_USAGE: &str = "llmops_pod_kv_cache_usage_perc";
    /// Prompt tokens processed.
    pub const PROMPT_TOKENS: &str = "llmops_prompt_tokens_total";
    /// Tokens generated.
    pub const GENERATION_TOKENS: &str = "llmops_generation_tokens_total";
    /// Requests finished, by reason.
    pub const SUCCESS: &str = "llmops_request_success_total";
    /// Requests failed, by error type.
    pub const FAILURE: &str = "llmops_request_failure_total";
    /// Counter: requests an engine refused at submit, by model, version,
    /// variant and reason (`overloaded`, `unavailable`).
    pub const REFUSED: &str = "llmops_request_refused_total";
    /// Sequences preempted.
    pub const PREEMPTIONS: &str = "llmops_num_preemptions_total";
    /// Prompt tokens looked up in the prefix cache (vLLM's
    /// `prefix_cache_queries`).
    pub const PREFIX_CACHE_QUERIES: &str = "llmops_prefix_cache_queries_total";
    /// Of those, tokens found (vLLM's `prefix_cache_hits`).
    pub const PREFIX_CACHE_HITS: &str = "llmops_prefix_cache_hits_total";
    /// Sequences per engine step.
    pub const STEP_BATCH: &str = "llmops_engine_step_batch_size";
    /// Tokens per engine step, by kind (prefill/decode).
    pub const STEP_TOKENS: &str = "llmops_engine_step_tokens";
    /// Duration of one engine step.
    pub const STEP_TIME: &str = "llmops_engine_step_duration_seconds";
    /// HTTP/gRPC requests by route and status.
    pub const API_REQUESTS: &str = "llmops_api_requests_total";
    /// HTTP/gRPC request durations by route.
    pub const API_DURATION: &str = "llmops_api_request_duration_seconds";
    /// Version loads that failed (files gone or changed, bad weights), by
    /// model and version.
    pub const MODEL_LOAD_FAILURES: &str = "llmops_model_load_failures_total";
    /// Per model: 1 while a version of it serves, 0 when its stable version
    /// failed to load at start.
    pub const MODEL_SERVING: &str = "llmops_model_serving";
    /// Gauge: a rollout's canary weight in percent (0 when none).
    pub const ROLLOUT_WEIGHT: &str = "llmops_rollout_canary_weight_percent";
    /// Counter: rollout analyses by verdict.
    pub const ROLLOUT_VERDICTS: &str = "llmops_rollout_verdicts_total";
    /// Counter: rollout transitions by event (started, analysis, promoted, …).
    pub const ROLLOUT_TRANSITIONS: &str = "llmops_rollout_transitions_total";
    /// Gauge: the last analysed value of a gate's metric, per variant.
    pub const ROLLOUT_GATE_VALUE: &str = "llmops_rollout_gate_value";
    /// Counter: hook deliveries by hook, event type and outcome (delivered,
    /// failed, suppressed, dropped).
    pub const HOOK_DELIVERIES: &str = "llmops_hook_deliveries_total";
    /// Histogram: a hook delivery's time, every attempt and pause included.
    pub const HOOK_LATENCY: &str = "llmops_hook_delivery_duration_seconds";
    /// Counter: captured requests by model and outcome (written, dropped,
    /// skipped).
    pub const CAPTURE_RECORDS: &str = "llmops_capture_records_total";
    /// Gauge: bytes of a model's capture on disk.
    pub const CAPTURE_BYTES: &str = "llmops_capture_bytes";
    /// Counter: TLS certificate reloads by result (ok, error).
    pub const TLS_RELOADS: &str = "llmops_tls_reloads_total";
    /// Gauge: connections open, by listener (http, grpc, metrics).
    pub const CONNECTIONS_OPEN: &str = "llmops_connections_open";
    /// Counter: connections closed on arrival at the listener's cap.
    pub const CONNECTIONS_REFUSED: &str = "llmops_connections_refused_total";
    /// Counter: connections closed by a timeout, by listener and phase
    /// (handshake, header, idle, body).
    pub const CONNECTIONS_TIMED_OUT: &str = "llmops_connections_timed_out_total";
    /// Counter: requests with an output constraint, by model and kind
    /// (json_object, json_schema, regex, choice, grammar).
    pub const STRUCTURED_REQUESTS: &str = "llmops_structured_requests_total";
    /// Counter: output constraints refused at compilation (invalid, too
    /// large, too slow), by model and kind.
    pub const STRUCTURED_COMPILE_FAILURES: &str = "llmops_structured_compile_failures_total";
    /// Histogram: time to compute one token mask of a constrained sequence.
    pub const STRUCTURED_MASK_TIME: &str = "llmops_structured_mask_seconds";
    /// Counter: this replica's publications to a fleet's shared store that
    /// failed, by what (samples, drift).
    pub const FLEET_PUBLISH_FAILURES: &str = "llmops_fleet_publish_failures_total";
}

/// vLLM's TTFT buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (e2e, queue, prefill, decode).
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Token-count buckets (1-2-5 series), as vLLM builds up to the model length.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0, 200000.0,
];
/// Engine step buckets (seconds).
pub const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Token-mask time buckets (seconds): llguidance's ~50 µs on a 128k
/// vocabulary sits in the middle.
pub const MASK_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];
/// Batch-size buckets.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// API latency buckets (seconds).
pub const API_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// The protocol a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// OpenAI-compatible HTTP.
    Http,
    /// llmops gRPC.
    Grpc,
    /// Not from a client (CLI, shadow copies).
    #[default]
    Internal,
}

impl Protocol {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Internal => "internal",
        }
    }

    const ALL: [Protocol; 3] = [Protocol::Http, Protocol::Grpc, Protocol::Internal];

    fn index(self) -> usize {
        match self {
            Protocol::Http => 0,
            Protocol::Grpc => 1,
            Protocol::Internal => 2,
        }
    }
}

/// The role of the version a request ran on: a per-request label, so a
/// promoted canary's series continue under `stable` from the first request
/// after the promotion.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The version taking the traffic.
    #[default]
    Stable,
    /// A candidate taking a weighted share.
    Canary,
    /// A candidate receiving mirrored copies.
    Shadow,
}

impl Variant {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Stable => "stable",
            Variant::Canary => "canary",
            Variant::Shadow => "shadow",
        }
    }

    /// Every variant, in index order.
    pub const ALL: [Variant; 3] = [Variant::Stable, Variant::Canary, Variant::Shadow];

    fn index(self) -> usize {
        self as usize
    }
}

/// Request-level handles for one protocol and variant.
pub struct RequestMetrics {
    /// See [`names::TTFT`].
    pub ttft: Histogram,
    /// See [`names::ENGINE_TTFT`].
    pub engine_ttft: Histogram,
    /// See [`names::ITL`].
    pub itl: Histogram,
    /// See [`names::E2E`].
    pub e2e: Histogram,
    /// See [`names::QUEUE`].
    pub queue: Histogram,
    /// See [`names::PREFILL`].
    pub prefill: Histogram,
    /// See [`names::DECODE`].
    pub decode: Histogram,
    /// See [`names::PROMPT_TOKENS_HIST`].
    pub prompt_tokens_hist: Histogram,
    /// See [`names::GENERATION_TOKENS_HIST`].
    pub generation_tokens_hist: Histogram,
    /// See [`names::PROMPT_TOKENS`].
    pub prompt_tokens: Counter,
    /// See [`names::GENERATION_TOKENS`].
    pub generation_tokens: Counter,
    /// See [`names::SUCCESS`], one per finish reason: stop, length, timeout, abort.
    pub success: [Counter; 4],
    /// See [`names::FAILURE`] (engine errors).
    pub failure: Counter,
}

/// Every handle an engine records into.
pub struct EngineMetrics {
    /// Per protocol, then per variant.
    requests: [[RequestMetrics; 3]; 3],
    /// See [`names::RUNNING`].
    pub running: Gauge,
    /// See [`names::WAITING`].
    pub waiting: Gauge,
    /// See [`names::BACKGROUND_WAITING`].
    pub background_waiting: Gauge,
    /// See [`names::KV_USAGE`].
    pub kv_usage: Gauge,
    /// See [`names::KV_CAPACITY`].
    pub kv_capacity: Gauge,
    /// See [`names::KV_WINDOW_FREED`].
    pub kv_window_freed: Counter,
    /// See [`names::PREEMPTIONS`].
    pub preemptions: Counter,
    /// See [`names::PREFIX_CACHE_QUERIES`].
    pub prefix_cache_queries: Counter,
    /// See [`names::PREFIX_CACHE_HITS`].
    pub prefix_cache_hits: Counter,
    /// See [`names::STEP_BATCH`].
    pub step_batch: Histogram,
    /// See [`names::STEP_TOKENS`] with kind=prefill.
    pub step_prefill_tokens: Histogram,
    /// See [`names::STEP_TOKENS`] with kind=decode.
    pub step_decode_tokens: Histogram,
    /// See [`names::STEP_TIME`].
    pub step_time: Histogram,
    /// See [`names::STRUCTURED_MASK_TIME`].
    pub mask_time: Histogram,
}

impl EngineMetrics {
    /// Registers the handles of one engine. `finish_reasons` are the labels
    /// of `success`, in the order the caller indexes it.
    pub fn new(model: &str, version: &str, finish_reasons: [&'static str; 4]) -> Arc<Self> {
        describe();
        let base = vec![
            Label::new("model", model.to_string()),
            Label::new("version", version.to_string()),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut l = base.clone();
            l.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            l
        };
        let requests = Protocol::ALL.map(|p| {
            Variant::ALL.map(|v| {
                let l = with(&[("protocol", p.as_str()), ("variant", v.as_str())]);
                let h = |n: &'static str| metrics::histogram!(n, l.clone());
                let c = |n: &'static str| metrics::counter!(n, l.clone());
                let reason = |r: &'static str| {
                    let mut l = l.clone();
                    l.push(Label::new("finished_reason", r));
                    metrics::counter!(names::SUCCESS, l)
                };
                let mut fl = l.clone();
                fl.push(Label::new("error_type", "engine"));
                RequestMetrics {
                    ttft: h(names::TTFT),
                    engine_ttft: h(names::ENGINE_TTFT),
                    itl: h(names::ITL),
                    e2e: h(names::E2E),
                    queue: h(names::QUEUE),
                    prefill: h(names::PREFILL),
                    decode: h(names::DECODE),
                    prompt_tokens_hist: h(names::PROMPT_TOKENS_HIST),
                    generation_tokens_hist: h(names::GENERATION_TOKENS_HIST),
                    prompt_tokens: c(names::PROMPT_TOKENS),
                    generation_tokens: c(names::GENERATION_TOKENS),
                    success: finish_reasons.map(reason),
                    failure: metrics::counter!(names::FAILURE, fl),
                }
            })
        });
        Arc::new(Self {
            requests,
            running: metrics::gauge!(names::RUNNING, base.clone()),
            waiting: metrics::gauge!(names::WAITING, base.clone()),
            background_waiting: metrics::gauge!(names::BACKGROUND_WAITING, base.clone()),
            kv_usage: metrics::gauge!(names::KV_USAGE, base.clone()),
            kv_capacity: metrics::gauge!(names::KV_CAPACITY, base.clone()),
            kv_window_freed: metrics::counter!(names::KV_WINDOW_FREED, base.clone()),
            preemptions: metrics::counter!(names::PREEMPTIONS, base.clone()),
            prefix_cache_queries: metrics::counter!(names::PREFIX_CACHE_QUERIES, base.clone()),
            prefix_cache_hits: metrics::counter!(names::PREFIX_CACHE_HITS, base.clone()),
            step_batch: metrics::histogram!(names::STEP_BATCH, base.clone()),
            step_prefill_tokens: metrics::histogram!(
                names::STEP_TOKENS,
                with(&[("kind", "prefill")])
            ),
            step_decode_tokens: metrics::histogram!(
                names::STEP_TOKENS,
                with(&[("kind", "decode")])
            ),
            step_time: metrics::histogram!(names::STEP_TIME, base.clone()),
            mask_time: metrics::histogram!(names::STRUCTURED_MASK_TIME, base),
        })
    }

    /// The request handles of a protocol.
    pub fn requests(&self, p: Protocol, v: Variant) -> &RequestMetrics {
        &self.requests[p.index()][v.index()]
    }
}

/// HELP lines for every metric (idempotent).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    // Not once per process: an engine started before the recorder was
    // installed (tests, the CLI) described to no recorder, and the exporter
    // describes again when it installs.
    {
        describe_histogram!(
            names::TTFT,
            Unit::Seconds,
            "Time from a request's arrival at the front end to its first generated token."
        );
        describe_histogram!(
            names::ENGINE_TTFT,
            Unit::Seconds,
            "Time from a request's submission to the engine to its first generated token."
        );
        describe_histogram!(
            names::ITL,
            Unit::Seconds,
            "Time between consecutive generated tokens of a request."
        );
        describe_histogram!(
            names::E2E,
            Unit::Seconds,
            "Time from a request's arrival at the front end to its last token."
        );
        describe_histogram!(
            names::QUEUE,
            Unit::Seconds,
            "Time a request waited before the scheduler admitted it."
        );
        describe_histogram!(
            names::PREFILL,
            Unit::Seconds,
            "Time from admission to the first generated token."
        );
        describe_histogram!(
            names::DECODE,
            Unit::Seconds,
            "Time from the first to the last generated token."
        );
        describe_histogram!(
            names::PROMPT_TOKENS_HIST,
            Unit::Count,
            "Prompt length of finished requests."
        );
        describe_histogram!(
            names::GENERATION_TOKENS_HIST,
            Unit::Count,
            "Generated length of finished requests."
        );
        describe_gauge!(
            names::RUNNING,
            Unit::Count,
            "Sequences the scheduler is running."
        );
        describe_gauge!(
            names::WAITING,
            Unit::Count,
            "Client requests waiting for admission (including preempted ones); at most max_waiting, except briefly after preemptions. Background work is not counted here."
        );
        describe_gauge!(
            names::BACKGROUND_WAITING,
            Unit::Count,
            "Background work waiting for admission: low-priority shadow copies and drift probes (including preempted ones); its own queue of max_waiting, which preempted ones can exceed by the running ones."
        );
        describe_gauge!(
            names::KV_USAGE,
            Unit::Percent,
            "Fraction of KV-cache blocks held by running sequences (0 to 1); cached blocks no sequence holds are reusable and count as free."
        );
        describe_gauge!(
            names::KV_CAPACITY,
            Unit::Count,
            "Tokens the KV pool holds, in its storage type, for sequences that keep every position (the most a prompt may have; sliding-window layers hold only their window of longer sequences). max_model_len in /v1/models is the smaller of this and the model's context."
        );
        describe_counter!(
            names::KV_WINDOW_FREED,
            Unit::Count,
            "KV blocks sliding-window layers gave back as their windows moved past them."
        );
        describe_gauge!(
            names::POD_WAITING,
            "Client requests waiting on every engine of this process (the endpoint picker's queue); background work is not counted."
        );
        describe_gauge!(
            names::POD_RUNNING,
            "Sequences running on every engine of this process."
        );
        describe_gauge!(
            names::POD_KV_USAGE,
            Unit::Percent,
            "KV-cache blocks in use over blocks in all, every engine of this process (0 to 1)."
        );
        describe_counter!(
            names::PROMPT_TOKENS,
            Unit::Count,
            "Prompt tokens of finished requests."
        );
        describe_counter!(names::GENERATION_TOKENS, Unit::Count, "Tokens generated.");
        describe_counter!(
            names::FLEET_PUBLISH_FAILURES,
            Unit::Count,
            "Publications of this replica's rollout samples or drift state to the fleet's shared store that failed, by what (samples, drift); while they fail the leader judges rollout windows inconclusive."
        );
        describe_counter!(
            names::SUCCESS,
            Unit::Count,
            "Requests that finished, by finish reason."
        );
        describe_counter!(
            names::FAILURE,
            Unit::Count,
            "Requests that failed, by error type."
        );
        describe_counter!(
            names::REFUSED,
            Unit::Count,
            "Requests an engine refused at submit (queue full, engine unavailable), by variant and reason."
        );
        describe_counter!(
            names::PREEMPTIONS,
            Unit::Count,
            "Sequences preempted (KV blocks freed, recomputed later)."
        );
        describe_counter!(
            names::PREFIX_CACHE_QUERIES,
            Unit::Count,
            "Tokens of admitted sequences (prompts, and generated tokens of resumed ones) looked up in the prefix cache; drift probes, which score every position, are not looked up."
        );
        describe_counter!(
            names::PREFIX_CACHE_HITS,
            Unit::Count,
            "Tokens of admitted sequences served by the prefix cache instead of prefilled."
        );
        describe_histogram!(
            names::STEP_BATCH,
            Unit::Count,
            "Sequences in one engine step."
        );
        describe_histogram!(
            names::STEP_TOKENS,
            Unit::Count,
            "Tokens in one engine step, by kind (prefill, decode)."
        );
        describe_histogram!(
            names::STEP_TIME,
            Unit::Seconds,
            "Duration of one engine step (forward pass and sampling)."
        );
        describe_counter!(
            names::API_REQUESTS,
            Unit::Count,
            "API requests by protocol, route and status."
        );
        describe_histogram!(
            names::API_DURATION,
            Unit::Seconds,
            "API request duration by protocol and route."
        );
        describe_counter!(
            names::MODEL_LOAD_FAILURES,
            Unit::Count,
            "Model version loads that failed (files missing or changed since registration, unloadable weights), by model and version."
        );
        describe_gauge!(
            names::MODEL_SERVING,
            Unit::Count,
            "1 while a version of the model serves; 0 when its stable version failed to load at start (see `llmops models serving`)."
        );
        describe_gauge!(
            names::ROLLOUT_WEIGHT,
            Unit::Percent,
            "Share of route keys a rollout's canary takes, by model (0 when there is no canary)."
        );
        describe_counter!(
            names::ROLLOUT_VERDICTS,
            Unit::Count,
            "Rollout analyses by model and verdict (successful, failed, inconclusive, error)."
        );
        describe_counter!(
            names::ROLLOUT_TRANSITIONS,
            Unit::Count,
            "Rollout status changes by model and event (started, analysis, paused, resumed, promoted, rolled_back, aborted)."
        );
        describe_gauge!(
            names::ROLLOUT_GATE_VALUE,
            Unit::Count,
            "The last analysed value of each rollout gate's metric, by model, gate and variant (seconds for latencies)."
        );
        describe_counter!(
            names::HOOK_DELIVERIES,
            Unit::Count,
            "Hook deliveries by hook, event type and outcome (delivered, failed, suppressed, dropped)."
        );
        describe_histogram!(
            names::HOOK_LATENCY,
            Unit::Seconds,
            "Time to deliver an event to a hook, every attempt and backoff included."
        );
        describe_counter!(
            names::CAPTURE_RECORDS,
            Unit::Count,
            "Captured requests by model and outcome (written, dropped when the writer is behind, skipped)."
        );
        describe_gauge!(
            names::CAPTURE_BYTES,
            Unit::Bytes,
            "Bytes of a model's captured traffic on disk."
        );
        describe_counter!(
            names::STRUCTURED_REQUESTS,
            Unit::Count,
            "Requests with an output constraint (structured outputs), by model and kind: json_object, json_schema, regex, choice, grammar."
        );
        describe_counter!(
            names::STRUCTURED_COMPILE_FAILURES,
            Unit::Count,
            "Output constraints refused when compiled (invalid, over the size limit, over the time limit), by model and kind."
        );
        describe_histogram!(
            names::STRUCTURED_MASK_TIME,
            Unit::Seconds,
            "Time to compute one token mask of a constrained sequence (on the sampling pass, in parallel across sequences)."
        );
        describe_counter!(
            names::TLS_RELOADS,
            Unit::Count,
            "TLS certificate reloads (SIGHUP or changed files) by result: ok, or error (the previous certificate stays)."
        );
        describe_gauge!(
            names::CONNECTIONS_OPEN,
            Unit::Count,
            "Connections open, by listener (http, grpc, metrics)."
        );
        describe_counter!(
            names::CONNECTIONS_REFUSED,
            Unit::Count,
            "Connections closed on arrival because the listener had max_connections open, by listener."
        );
        describe_counter!(
            names::CONNECTIONS_TIMED_OUT,
            Unit::Count,
            "Connections closed by a timeout, by listener and phase (handshake, header, idle, body)."
        );
    }
    shadow::describe();
    drift::describe();
}
