//! Configuration: defaults < `llmops.toml` < `LLMOPS_*` environment < flags,
//! parsed once into a validated [`Config`] made of per-layer structs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{EnginePath, GgufWeights};
use crate::scheduler::SchedulerConfig;

/// Flags of `llmops serve`. Each may also come from its `LLMOPS_*` variable;
/// a flag given on the command line wins over the variable, and both win
/// over the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "LLMOPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP (OpenAI API) listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "LLMOPS_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "LLMOPS_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Separate address for /metrics (it is always on the HTTP port too).
    #[arg(long, env = "LLMOPS_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Model folder or GGUF file to serve; repeat to serve several. The
    /// embedded model when none is given anywhere.
    #[arg(long = "model", env = "LLMOPS_MODEL", value_delimiter = ',')]
    pub models: Vec<PathBuf>,
    /// Names of the --model entries, in order [default: the file or folder name].
    #[arg(long = "model-name", env = "LLMOPS_MODEL_NAME", value_delimiter = ',')]
    pub model_names: Vec<String>,
    /// Device: cpu, cuda[:N] or metal [default: cpu].
    #[arg(long, env = "LLMOPS_DEVICE")]
    pub device: Option<String>,
    /// How GGUF block-quantized weights are held on the CPU: f16 panels
    /// (fastest batches), int8 panels (half the memory, faster single
    /// streams), f32 panels (exact), or blocks (least memory) [default: f16].
    #[arg(long, env = "LLMOPS_GGUF_WEIGHTS", value_enum)]
    pub gguf_weights: Option<GgufWeights>,
    /// Which implementation runs the engine: `host` (our CPU kernels over
    /// host memory; CPU only) or `tensor` (candle ops on the device, KV
    /// cache and attention included: the GPU path, which also runs on the
    /// CPU) [default: host on cpu, tensor on cuda and metal].
    #[arg(long, env = "LLMOPS_ENGINE_PATH", value_enum)]
    pub engine_path: Option<EnginePath>,
    /// API keys as `id:role:secret` (role: inference or admin), comma-separated.
    /// Secrets are hashed at start and never kept.
    #[arg(
        long,
        env = "LLMOPS_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// `[scheduler]` keys that have flags.
    #[command(flatten)]
    pub scheduler: SchedulerSettings,
    /// `[limits]` keys, all of which have flags.
    #[command(flatten)]
    pub limits: LimitSettings,
    /// `[server]` keys of every listener: timeouts, the connection cap,
    /// the admin API's allowed origins and hosts.
    #[command(flatten)]
    pub listener: ListenerSettings,
    /// Seconds to drain in-flight requests on shutdown [default: 30].
    #[arg(long, env = "LLMOPS_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// Registry folder [default: the user's data directory, llmops/].
    #[arg(long, env = "LLMOPS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where retrained versions are written [default: DATA_DIR/trained]. In
    /// a fleet (`--registry etcd://…`) a volume every replica mounts at
    /// this path (read-write for the leader, which trains); without it a
    /// fleet refuses to retrain.
    #[arg(long, env = "LLMOPS_TRAINED_DIR")]
    pub trained_dir: Option<PathBuf>,
    /// Folders that model paths registered through the admin API must lie
    /// under (after following links); repeat for several. Unset: any path,
    /// but only regular files and folders (never devices, FIFOs, sockets).
    #[arg(long = "model-root", env = "LLMOPS_MODEL_ROOTS", value_delimiter = ',')]
    pub model_roots: Vec<PathBuf>,
    /// Let clients pin a version by asking for `model@version` (debugging,
    /// evaluation); off by default, so clients cannot bypass a rollout.
    #[arg(long, env = "LLMOPS_ALLOW_VERSION_PINNING")]
    pub allow_version_pinning: bool,
    /// Serve without API keys on an address beyond loopback: anyone who
    /// reaches the port may run inference, and nobody may use the admin
    /// API. Without keys and without this flag the server refuses to
    /// listen anywhere but loopback. Logged at every start.
    #[arg(long, env = "LLMOPS_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// A file (mode 0600 or stricter, at least 16 bytes) holding the key
    /// that seals inline webhook secrets in a fleet's shared log; every
    /// replica mounts the same file (e.g. from a Kubernetes Secret).
    /// Without it a fleet refuses inline secrets (use `secret_env`).
    #[arg(long, env = "LLMOPS_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// Serve HTTP and gRPC over TLS with this certificate chain (PEM);
    /// needs --tls-key.
    #[arg(long, env = "LLMOPS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "LLMOPS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that admin clients' certificates must chain
    /// to: with it, the admin API (HTTP /admin/, gRPC llmops.v1.Admin) is
    /// refused on connections without such a certificate; inference clients
    /// need none. Needs TLS.
    #[arg(long, env = "LLMOPS_ADMIN_CLIENT_CA")]
    pub admin_client_ca: Option<PathBuf>,
    /// How often (seconds) the TLS files' modification times are checked;
    /// changed files are reloaded without a restart (so is SIGHUP). 0 turns
    /// the check off (SIGHUP still reloads). Default 5.
    #[arg(long, env = "LLMOPS_TLS_RELOAD_SECS")]
    pub tls_reload_secs: Option<f64>,
    /// Share the registry with the other replicas of a fleet through etcd:
    /// `etcd://[user@]host:2379[,host:2379…]/prefix[?ca=CA.pem&cert=C.pem&key=K.pem]`
    /// (TLS with `ca`, a client certificate with `cert` and `key`; the
    /// user's password from LLMOPS_ETCD_PASSWORD). Unset: this replica's
    /// own log in --data-dir.
    #[arg(long, env = "LLMOPS_REGISTRY")]
    pub registry: Option<String>,
    /// This replica's name in the fleet [default: host name and process id].
    #[arg(long, env = "LLMOPS_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds a dead leader keeps the role before another replica takes it
    /// [default: 5].
    #[arg(long, env = "LLMOPS_LEADER_TTL_SECS")]
    pub leader_ttl_secs: Option<u64>,
}

/// Listener and process settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// gRPC address.
    pub grpc_addr: SocketAddr,
    /// Optional separate metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Drain time on shutdown.
    pub shutdown_timeout: Duration,
    /// Where the registry lives.
    pub data_dir: PathBuf,
    /// Where retrained versions go; `None`: `data_dir/trained` (one
    /// machine only).
    pub trained_dir: Option<PathBuf>,
    /// How every model's GGUF block-quantized weights are held.
    pub gguf_weights: GgufWeights,
    /// Which implementation runs every model's steps; `None`: the device's
    /// default ([`EnginePath::resolve`]).
    pub engine_path: Option<EnginePath>,
    /// Canonical folders registered model paths must lie under; empty: any.
    /// Canonical so a registered path, canonicalized too, is compared
    /// against where the links really lead.
    pub model_roots: Vec<PathBuf>,
    /// Whether clients may ask for `model@version`.
    pub allow_version_pinning: bool,
    /// Run without keys beyond loopback: the anonymous caller gets the
    /// inference role, never admin.
    pub insecure_no_auth: bool,
    /// The key sealing inline webhook secrets in a fleet's log.
    pub secrets_key_file: Option<PathBuf>,
    /// TLS for the HTTP and gRPC listeners; plain TCP when absent.
    pub tls: Option<TlsConfig>,
    /// The fleet's shared registry; `None`: the local log in `data_dir`.
    pub registry: Option<crate::registry::etcd::EtcdOptions>,
    /// What every listener enforces on its connections.
    pub listener: ListenerConfig,
}

/// TLS files, read when the server starts and again on SIGHUP or when
/// their modification times change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that admin clients' certificates must chain to; when set,
    /// admin routes need such a certificate on the connection.
    pub admin_client_ca: Option<PathBuf>,
    /// How often the files' modification times are checked; `None`: never
    /// (SIGHUP still reloads them).
    pub reload_interval: Option<Duration>,
}

/// Request limits enforced by the front ends.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Largest body.
    pub max_body_bytes: usize,
    /// Longest prompt (tokens); the model's context when absent.
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens; the model's context when absent.
    pub max_tokens: Option<usize>,
    /// Longest an HTTP generation request runs (gRPC has `grpc-timeout`).
    pub request_timeout: Duration,
}

/// One model to serve at start.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name clients use.
    pub name: String,
    /// Folder or GGUF; `None` is the embedded model.
    pub path: Option<PathBuf>,
    /// Device spec.
    pub device: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners.
    pub server: ServerConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// API keys (hashed).
    pub keys: Vec<KeyConfig>,
    /// Scheduler settings shared by every model.
    pub scheduler: SchedulerConfig,
    /// Models to serve.
    pub models: Vec<ModelSpec>,
    /// Hooks from `[[hooks]]` (checked, secrets resolved, at load).
    pub hooks: Vec<crate::hooks::HookSpec>,
    /// `[drift]`: drift detection, with per-model overrides.
    pub drift: crate::monitor::drift::DriftSettings,
    /// `[autopilot]` as written (what drift of a stable version sets off):
    /// the controller parses and checks it at start, so `config` does not
    /// depend on `control`.
    pub autopilot: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    limits: LimitSettings,
    #[serde(default)]
    scheduler: SchedulerSettings,
    #[serde(default)]
    models: Vec<FileModel>,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    hooks: Vec<crate::hooks::HookSpec>,
    /// Checked by [`crate::monitor::drift::DriftSettings::from_value`].
    drift: Option<toml::Value>,
    /// Checked by [`crate::control::autopilot::AutopilotSpec::validate`].
    autopilot: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    http_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown_timeout_secs: Option<u64>,
    data_dir: Option<PathBuf>,
    trained_dir: Option<PathBuf>,
    device: Option<String>,
    gguf_weights: Option<GgufWeights>,
    engine_path: Option<EnginePath>,
    model_roots: Option<Vec<PathBuf>>,
    allow_version_pinning: Option<bool>,
    insecure_no_auth: Option<bool>,
    secrets_key_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    admin_client_ca: Option<PathBuf>,
    tls_reload_secs: Option<f64>,
    registry: Option<String>,
    replica_id: Option<String>,
    leader_ttl_secs: Option<u64>,
    // Listeners ([`ListenerSettings`] has their flags).
    header_read_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    body_read_timeout_secs: Option<f64>,
    max_connections: Option<usize>,
    http2_keepalive_secs: Option<f64>,
    allowed_origins: Option<Vec<String>>,
    allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    name: Option<String>,
    path: Option<PathBuf>,
    device: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    #[serde(default)]
    keys: Vec<KeyConfig>,
}

/// The name a model gets from its path.
pub fn default_model_name(path: &std::path::Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Name of the embedded model.
pub const EMBEDDED_MODEL_NAME: &str = "default";

impl Config {
    /// Merges defaults, the config file, the environment and the flags.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        let server = server_config(args, &file.server)?;
        let keys = keys(args, &file.auth)?;
        check_open_listeners(&server, &keys)?;
        Ok(Config {
            server,
            limits: limits_config(&args.limits, &file.limits)?,
            scheduler: scheduler_config(&args.scheduler, &file.scheduler)?,
            models: models(args, &file)?,
            keys,
            hooks: hooks(&file.hooks)?,
            drift: match &file.drift {
                None => Default::default(),
                Some(t) => {
                    crate::monitor::drift::DriftSettings::from_value(serde_json::to_value(t)?)
                        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?
                }
            },
            autopilot: file
                .autopilot
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?,
        })
    }
}

/// Without API keys every caller is anonymous: that is for a developer's
/// own machine, so such a server listens on loopback only unless the
/// operator says `--insecure-no-auth` (and then nobody is an admin).
fn check_open_listeners(server: &ServerConfig, keys: &[KeyConfig]) -> anyhow::Result<()> {
    if !keys.is_empty() || server.insecure_no_auth {
        return Ok(());
    }
    for (name, addr) in [
        ("http_addr", server.http_addr),
        ("grpc_addr", server.grpc_addr),
    ] {
        if !addr.ip().is_loopback() {
            bail!(
                "no API keys are configured and {name} {addr} is not a loopback address: \
                 anyone who can reach it would be an admin. Configure keys \
                 (LLMOPS_API_KEYS or [auth] keys), listen on 127.0.0.1, or pass \
                 --insecure-no-auth (LLMOPS_INSECURE_NO_AUTH=1) to serve inference to \
                 anyone with the admin API closed"
            );
        }
    }
    Ok(())
}

/// The role of a caller without a key when the server has none: admin on
/// a loopback-only server, inference once `--insecure-no-auth` opens it.
pub fn anonymous_role(server: &ServerConfig) -> Role {
    if server.insecure_no_auth {
        Role::Inference
    } else {
        Role::Admin
    }
}

/// `[[hooks]]`: each checked (and its `secret_env` read) now, so a bad hook
/// stops the server at start rather than failing its first delivery.
fn hooks(file: &[crate::hooks::HookSpec]) -> anyhow::Result<Vec<crate::hooks::HookSpec>> {
    let mut seen = std::collections::HashSet::new();
    for h in file {
        h.resolve()
            .map_err(|e| anyhow::anyhow!("[[hooks]] `{}`: {e}", h.name))?;
        if !seen.insert(h.name.as_str()) {
            bail!("[[hooks]]: two hooks are named `{}`", h.name);
        }
    }
    Ok(file.to_vec())
}

impl FileConfig {
    fn read(p: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", p.display()))
    }
}

/// `[server]` under the flags.
fn server_config(args: &ServeArgs, file: &FileServer) -> anyhow::Result<ServerConfig> {
    let model_roots = if args.model_roots.is_empty() {
        file.model_roots.clone().unwrap_or_default()
    } else {
        args.model_roots.clone()
    };
    Ok(ServerConfig {
        http_addr: args
            .http_addr
            .or(file.http_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
        grpc_addr: args
            .grpc_addr
            .or(file.grpc_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
        metrics_addr: args.metrics_addr.or(file.metrics_addr),
        shutdown_timeout: Duration::from_secs(
            args.shutdown_timeout
                .or(file.shutdown_timeout_secs)
                .unwrap_or(30),
        ),
        data_dir: args
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .unwrap_or_else(default_data_dir),
        trained_dir: args.trained_dir.clone().or(file.trained_dir.clone()),
        gguf_weights: args.gguf_weights.or(file.gguf_weights).unwrap_or_default(),
        engine_path: args.engine_path.or(file.engine_path),
        model_roots: model_roots
            .iter()
            .map(|r| match std::fs::canonicalize(r) {
                Ok(c) if c.is_dir() => Ok(c),
                Ok(_) => bail!("model root {} is not a folder", r.display()),
                Err(e) => bail!("model root {}: {e}", r.display()),
            })
            .collect::<anyhow::Result<_>>()?,
        allow_version_pinning: args.allow_version_pinning
            || file.allow_version_pinning.unwrap_or(false),
        insecure_no_auth: args.insecure_no_auth || file.insecure_no_auth.unwrap_or(false),
        secrets_key_file: args
            .secrets_key_file
            .clone()
            .or(file.secrets_key_file.clone()),
        tls: tls_config(args, file)?,
        registry: registry_config(args, file)?,
        listener: listener_config(&args.listener, file)?,
    })
}

/// `--registry etcd://…` and its options, when the registry is shared.
fn registry_config(
    args: &ServeArgs,
    file: &FileServer,
) -> anyhow::Result<Option<crate::registry::etcd::EtcdOptions>> {
    let Some(url) = args.registry.clone().or(file.registry.clone()) else {
        return Ok(None);
    };
    crate::registry::etcd::parse_url(&url)?;
    let ttl = args.leader_ttl_secs.or(file.leader_ttl_secs).unwrap_or(5);
    if !(2..=600).contains(&ttl) {
        bail!("leader_ttl_secs must be 2 to 600 seconds, got {ttl}");
    }
    let replica_id = args
        .replica_id
        .clone()
        .or(file.replica_id.clone())
        .unwrap_or_else(default_replica_id);
    if replica_id.is_empty() || replica_id.contains('/') {
        bail!("replica id `{replica_id}` must be a non-empty name without `/`");
    }
    Ok(Some(crate::registry::etcd::EtcdOptions {
        url,
        password: std::env::var("LLMOPS_ETCD_PASSWORD").ok(),
        replica_id,
        leader_ttl: Duration::from_secs(ttl),
        timeout: Duration::from_secs(2),
    }))
}

/// The host name and the process id: unique per replica on one machine,
/// and in a pod (whose host name is the pod's).
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().replace('/', "-"))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "llmops".into());
    format!("{host}-{}", std::process::id())
}

/// `[limits]` as the file and the flags both give it, declared once: the
/// flags' values win over the file's key by key.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest request body in bytes [default: 4 MiB].
    #[arg(long, env = "LLMOPS_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Longest an HTTP generation request may run, in seconds, unless it
    /// asks for less with `x-request-timeout` [default: 900].
    #[arg(long, env = "LLMOPS_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<f64>,
    /// Longest prompt in tokens [default: the model's context].
    #[arg(long, env = "LLMOPS_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for [default: the model's context].
    #[arg(long, env = "LLMOPS_MAX_TOKENS_LIMIT")]
    #[serde(rename = "max_tokens")]
    pub max_tokens_limit: Option<usize>,
}

/// `[limits]` under the flags.
fn limits_config(args: &LimitSettings, file: &LimitSettings) -> anyhow::Result<LimitsConfig> {
    let secs = args
        .request_timeout_secs
        .or(file.request_timeout_secs)
        .unwrap_or(900.0);
    if !(secs.is_finite() && secs > 0.0) {
        bail!("request_timeout_secs must be a positive number of seconds, got {secs}");
    }
    Ok(LimitsConfig {
        max_body_bytes: args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(4 << 20),
        max_prompt_tokens: args.max_prompt_tokens.or(file.max_prompt_tokens),
        max_tokens: args.max_tokens_limit.or(file.max_tokens_limit),
        request_timeout: Duration::from_secs_f64(secs),
    })
}

/// `[scheduler]` as the file and the flags both give it, declared once:
/// the flags' values win over the file's key by key; keys without a flag
/// come from the file only.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    /// Tokens per engine step [default: 512].
    #[arg(long, env = "LLMOPS_MAX_BATCHED_TOKENS")]
    pub max_batched_tokens: Option<usize>,
    /// Sequences running at once per model [default: 64].
    #[arg(long, env = "LLMOPS_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Requests allowed to wait per model before 429 [default: 256].
    #[arg(long, env = "LLMOPS_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Prompt tokens allowed to wait per model before 429 (file only).
    #[arg(skip)]
    pub max_waiting_tokens: Option<usize>,
    /// KV cache per model in MiB [default: 512].
    #[arg(long, env = "LLMOPS_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// Tokens per KV block (file only).
    #[arg(skip)]
    pub block_size: Option<usize>,
    /// Automatic prefix caching: reuse the KV blocks of prompts' shared
    /// prefixes [default: true].
    #[arg(long, env = "LLMOPS_PREFIX_CACHING", value_name = "BOOL")]
    pub prefix_caching: Option<bool>,
    /// How the KV cache stores keys and values: f16 (twice the tokens per
    /// MiB) or f32 (exact, for reference runs) [default: f16].
    #[arg(long, env = "LLMOPS_KV_CACHE_DTYPE", value_name = "DTYPE")]
    pub kv_cache_dtype: Option<crate::engine::KvDtype>,
}

/// `[scheduler]` under the flags, checked for limits no engine can run with.
fn scheduler_config(
    args: &SchedulerSettings,
    fs: &SchedulerSettings,
) -> anyhow::Result<SchedulerConfig> {
    let d = SchedulerConfig::default();
    let scheduler = SchedulerConfig {
        max_batched_tokens: args
            .max_batched_tokens
            .or(fs.max_batched_tokens)
            .unwrap_or(d.max_batched_tokens),
        max_running: args.max_running.or(fs.max_running).unwrap_or(d.max_running),
        max_waiting: args.max_waiting.or(fs.max_waiting).unwrap_or(d.max_waiting),
        max_waiting_tokens: args
            .max_waiting_tokens
            .or(fs.max_waiting_tokens)
            .unwrap_or(d.max_waiting_tokens),
        kv_cache_bytes: args
            .kv_cache_mb
            .or(fs.kv_cache_mb)
            .map(|mb| mb << 20)
            .unwrap_or(d.kv_cache_bytes),
        block_size: args.block_size.or(fs.block_size).unwrap_or(d.block_size),
        prefix_caching: args
            .prefix_caching
            .or(fs.prefix_caching)
            .unwrap_or(d.prefix_caching),
        kv_cache_dtype: args
            .kv_cache_dtype
            .or(fs.kv_cache_dtype)
            .unwrap_or(d.kv_cache_dtype),
    };
    if scheduler.max_batched_tokens == 0 || scheduler.max_running == 0 || scheduler.block_size == 0
    {
        bail!("scheduler limits must be positive");
    }
    if scheduler.max_running > scheduler.max_batched_tokens {
        bail!(
            "max_running ({}) cannot exceed max_batched_tokens ({}): every running sequence needs a token per step",
            scheduler.max_running,
            scheduler.max_batched_tokens
        );
    }
    Ok(scheduler)
}

/// The models to serve: the flags' (or environment's) list replaces the
/// file's; neither gives the embedded model. The device is server-wide: a
/// model in the file may repeat it, and one that names another is refused
/// (every engine runs on the server's device).
fn models(args: &ServeArgs, file: &FileConfig) -> anyhow::Result<Vec<ModelSpec>> {
    let device = args
        .device
        .clone()
        .or(file.server.device.clone())
        .unwrap_or_else(|| "cpu".into());
    let models: Vec<ModelSpec> = if !args.models.is_empty() {
        if args.model_names.len() > args.models.len() {
            bail!("more --model-name values than --model values");
        }
        args.models
            .iter()
            .enumerate()
            .map(|(i, p)| ModelSpec {
                name: args
                    .model_names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| default_model_name(p)),
                path: Some(p.clone()),
                device: device.clone(),
            })
            .collect()
    } else if !file.models.is_empty() {
        for m in &file.models {
            if let Some(own) = m.device.as_deref().filter(|d| *d != device) {
                bail!(
                    "[[models]] `{}` names device `{own}`, but every model runs on the server's device (`{device}`, from --device or [server] device): remove its `device` or set the server's",
                    m.name
                        .as_deref()
                        .or(m.path.as_deref().and_then(|p| p.to_str()))
                        .unwrap_or(EMBEDDED_MODEL_NAME)
                );
            }
        }
        file.models
            .iter()
            .map(|m| ModelSpec {
                name: m.name.clone().unwrap_or_else(|| match &m.path {
                    Some(p) => default_model_name(p),
                    None => EMBEDDED_MODEL_NAME.into(),
                }),
                path: m.path.clone(),
                device: m.device.clone().unwrap_or_else(|| device.clone()),
            })
            .collect()
    } else {
        vec![ModelSpec {
            name: args
                .model_names
                .first()
                .cloned()
                .unwrap_or_else(|| EMBEDDED_MODEL_NAME.into()),
            path: None,
            device: device.clone(),
        }]
    };
    let mut seen = std::collections::HashSet::new();
    for m in &models {
        if !seen.insert(m.name.clone()) {
            bail!("model name `{}` is used twice", m.name);
        }
    }
    Ok(models)
}

/// Keys from the file, then from `--api-keys` (`id:role:secret`), each
/// checked.
fn keys(args: &ServeArgs, file: &FileAuth) -> anyhow::Result<Vec<KeyConfig>> {
    let mut keys = file.keys.clone();
    for spec in &args.api_keys {
        let mut parts = spec.splitn(3, ':');
        let (Some(id), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("LLMOPS_API_KEYS entries are id:role:secret");
        };
        let role: Role = role.parse()?;
        keys.push(KeyConfig::from_secret(id, role, secret));
    }
    for k in &keys {
        k.validate()?;
    }
    Ok(keys)
}

/// How often the TLS files are checked for changes unless configured.
const DEFAULT_TLS_RELOAD_SECS: f64 = 5.0;

/// The TLS files: flags (or `LLMOPS_*`) over the file, checked for pairs.
fn tls_config(args: &ServeArgs, file: &FileServer) -> anyhow::Result<Option<TlsConfig>> {
    // A flag pair replaces the file's pair whole: never a flag's key with
    // the file's certificate.
    let (cert, key) = if args.tls_cert.is_some() || args.tls_key.is_some() {
        (args.tls_cert.clone(), args.tls_key.clone())
    } else {
        (file.tls_cert.clone(), file.tls_key.clone())
    };
    let ca = args
        .admin_client_ca
        .clone()
        .or_else(|| file.admin_client_ca.clone());
    let secs = args
        .tls_reload_secs
        .or(file.tls_reload_secs)
        .unwrap_or(DEFAULT_TLS_RELOAD_SECS);
    if !secs.is_finite() || secs < 0.0 {
        bail!("tls_reload_secs must be 0 (off) or a positive number of seconds, not {secs}");
    }
    let reload_interval = (secs > 0.0).then(|| Duration::from_secs_f64(secs.max(0.05)));
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsConfig {
            cert,
            key,
            admin_client_ca: ca,
            reload_interval,
        })),
        (None, None) => match ca {
            Some(_) => bail!(
                "admin_client_ca needs TLS: set tls_cert and tls_key (--tls-cert, --tls-key) too"
            ),
            None => Ok(None),
        },
        (Some(_), None) => bail!("tls_cert is set but tls_key is not (--tls-key, LLMOPS_TLS_KEY)"),
        (None, Some(_)) => {
            bail!("tls_key is set but tls_cert is not (--tls-cert, LLMOPS_TLS_CERT)")
        }
    }
}

/// `[server]` keys of the listeners, as flags: each wins over the file's key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListenerSettings {
    /// Seconds a client has to send a request's head once its first byte
    /// arrived (a slowloris client is closed after this); also the TLS
    /// handshake's limit [default: 10].
    #[arg(long, env = "LLMOPS_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<f64>,
    /// Seconds a connection may stay open with no request in progress
    /// (HTTP/1 keep-alive, HTTP/2 without streams) before it is closed
    /// [default: 60].
    #[arg(long, env = "LLMOPS_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<f64>,
    /// Seconds the server waits for the next part of a request body before
    /// answering 408 and closing the connection [default: 30].
    #[arg(long, env = "LLMOPS_BODY_READ_TIMEOUT_SECS")]
    pub body_read_timeout_secs: Option<f64>,
    /// Connections open at once per listener; more are closed as they
    /// arrive, counted in `llmops_connections_refused_total` [default: 4096,
    /// lowered to what the file limit allows].
    #[arg(long, env = "LLMOPS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds between HTTP/2 keep-alive pings (a peer that does not answer
    /// within 20 s is closed); 0 turns them off [default: 30].
    #[arg(long, env = "LLMOPS_HTTP2_KEEPALIVE_SECS")]
    pub http2_keepalive_secs: Option<f64>,
    /// Origins (`scheme://host[:port]`) whose pages may call the admin API,
    /// besides the server's own; comma-separated [default: none].
    #[arg(long, env = "LLMOPS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Host names (`name`, or `*.domain` for its subdomains) the admin API
    /// answers to besides loopback ones. Without API keys only loopback and
    /// these are served (DNS rebinding); with keys, any host unless this is
    /// set [default: none].
    #[arg(long, env = "LLMOPS_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
}

/// What every listener enforces (see [`ListenerSettings`] for each).
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// First byte of a request's head to its end; also the TLS handshake.
    pub header_read_timeout: Duration,
    /// No request in progress.
    pub idle_timeout: Duration,
    /// Between two parts of a request body.
    pub body_read_timeout: Duration,
    /// Connections per listener, before the file limit is applied.
    pub max_connections: usize,
    /// HTTP/2 keep-alive ping interval; `None`: no pings.
    pub http2_keepalive: Option<Duration>,
    /// Extra origins allowed on the admin API, normalized
    /// (`scheme://host:port`, lower case).
    pub allowed_origins: Vec<String>,
    /// Extra host names allowed on the admin API, lower case.
    pub allowed_hosts: Vec<String>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            http2_keepalive: Some(Duration::from_secs(30)),
            allowed_origins: vec![],
            allowed_hosts: vec![],
        }
    }
}

/// The listeners' `[server]` keys under their flags, checked.
fn listener_config(args: &ListenerSettings, file: &FileServer) -> anyhow::Result<ListenerConfig> {
    let d = ListenerConfig::default();
    let secs = |name: &str, flag: Option<f64>, key: Option<f64>, default: Duration| match flag
        .or(key)
    {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        Some(s) => bail!("{name} must be a number of seconds above 0 and at most a day, not {s}"),
    };
    let keepalive = args
        .http2_keepalive_secs
        .or(file.http2_keepalive_secs)
        .unwrap_or(30.0);
    if !keepalive.is_finite() || !(0.0..=86_400.0).contains(&keepalive) {
        bail!(
            "http2_keepalive_secs must be 0 (off) or a number of seconds up to a day, not {keepalive}"
        );
    }
    let max_connections = args
        .max_connections
        .or(file.max_connections)
        .unwrap_or(d.max_connections);
    if max_connections == 0 {
        bail!("max_connections must be at least 1");
    }
    let list = |flag: &[String], key: &Option<Vec<String>>| {
        if flag.is_empty() {
            key.clone().unwrap_or_default()
        } else {
            flag.to_vec()
        }
    };
    Ok(ListenerConfig {
        header_read_timeout: secs(
            "header_read_timeout_secs",
            args.header_read_timeout_secs,
            file.header_read_timeout_secs,
            d.header_read_timeout,
        )?,
        idle_timeout: secs(
            "idle_timeout_secs",
            args.idle_timeout_secs,
            file.idle_timeout_secs,
            d.idle_timeout,
        )?,
        body_read_timeout: secs(
            "body_read_timeout_secs",
            args.body_read_timeout_secs,
            file.body_read_timeout_secs,
            d.body_read_timeout,
        )?,
        max_connections,
        http2_keepalive: (keepalive > 0.0).then(|| Duration::from_secs_f64(keepalive)),
        allowed_origins: list(&args.allowed_origins, &file.allowed_origins)
            .iter()
            .map(|o| normalize_origin(o).with_context(|| format!("allowed_origins: `{o}`")))
            .collect::<anyhow::Result<_>>()?,
        allowed_hosts: list(&args.allowed_hosts, &file.allowed_hosts)
            .iter()
            .map(|h| {
                let h = h.trim().to_ascii_lowercase();
                let name = h.strip_prefix("*.").unwrap_or(&h);
                if name.is_empty() || name.contains(['/', ':', '*', ' ']) {
                    bail!("allowed_hosts: `{h}` is not a host name (`name` or `*.domain`, no scheme or port)");
                }
                Ok(h)
            })
            .collect::<anyhow::Result<_>>()?,
    })
}

/// An origin as browsers send it, `scheme://host[:port]`, as
/// `scheme://host:port` in lower case (the scheme's default port made
/// explicit), so equal origins compare equal; `None` for anything else
/// (`null`, a path, an unknown scheme).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, rest) = origin.split_once("://")?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let (host, port) = split_host_port(rest)?;
    Some(format!(
        "{scheme}://{host}:{}",
        port.unwrap_or(default_port)
    ))
}

/// `host[:port]` (IPv6 in brackets) into the host (brackets kept) and the
/// port; `None` when it is not that shape.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        match rest {
            "" => (host, None),
            r => (host, Some(r.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || (!host.starts_with('[') && host.contains(':')) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    Some((host, port))
}

/// `$XDG_DATA_HOME/llmops` or `~/.local/share/llmops`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("llmops");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/llmops"),
        None => PathBuf::from(".llmops"),
    }
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Generation, tokenization, model listing.
    Inference,
    /// Everything, including the admin API.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "inference" => Ok(Role::Inference),
            "admin" => Ok(Role::Admin),
            other => anyhow::bail!("unknown role `{other}` (inference, admin)"),
        }
    }
}

/// One key as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name of the key (logged and audited; never the secret).
    pub id: String,
    /// Its role.
    pub role: Role,
    /// Hex SHA-256 of the secret (`llmops hash-key` prints it).
    pub sha256: String,
    /// Requests per minute (absent: unlimited).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute (absent: unlimited).
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

/// Hex SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl KeyConfig {
    /// A key from a plaintext secret, hashed at once.
    pub fn from_secret(id: &str, role: Role, secret: &str) -> Self {
        Self {
            id: id.to_string(),
            role,
            sha256: hash_secret(secret),
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }

    /// Checks the hash looks like one.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            anyhow::bail!("key `{}`: sha256 must be 64 hex digits", self.id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn the_shipped_example_config_parses_and_flags_override_it() {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/llmops.toml"));
        let args = Cli::try_parse_from([
            "serve",
            "--config",
            &path.display().to_string(),
            "--http-addr",
            "127.0.0.1:18080",
        ])
        .unwrap()
        .serve;
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.server.http_addr.port(), 18080, "flag beats file");
        assert_eq!(cfg.server.grpc_addr.port(), 50051, "file value kept");
        assert_eq!(cfg.scheduler.max_running, 64);
        assert_eq!(cfg.server.gguf_weights, GgufWeights::F16);
        assert!(cfg.keys.is_empty());
    }

    #[test]
    fn a_model_that_names_another_device_than_the_servers_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmops.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let config = path.display().to_string();
            let args = Cli::try_parse_from(["serve", "--config", &config])
                .unwrap()
                .serve;
            Config::load(&args)
        };
        let err =
            load("[server]\ndevice = \"cpu\"\n[[models]]\nname = \"a\"\ndevice = \"cuda:1\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("`a` names device `cuda:1`"), "{err}");
        let cfg = load("[server]\ndevice = \"cpu\"\n[[models]]\nname = \"a\"\ndevice = \"cpu\"\n")
            .unwrap();
        assert_eq!(cfg.models[0].device, "cpu");
    }

    #[test]
    fn scheduler_and_limit_flags_win_over_the_file_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmops.toml");
        std::fs::write(
            &path,
            "[limits]\nmax_tokens = 7\nmax_prompt_tokens = 9\n\
             [scheduler]\nmax_running = 4\nmax_waiting = 5\nblock_size = 32\n",
        )
        .unwrap();
        let config = path.display().to_string();
        let argv = [
            "serve",
            "--config",
            &config,
            "--max-tokens-limit",
            "5",
            "--max-waiting",
            "6",
        ];
        let cfg = Config::load(&Cli::try_parse_from(argv).unwrap().serve).unwrap();
        assert_eq!(cfg.limits.max_tokens, Some(5), "flag beats file");
        assert_eq!(cfg.limits.max_prompt_tokens, Some(9), "file value kept");
        assert_eq!(cfg.scheduler.max_waiting, 6, "flag beats file");
        assert_eq!(cfg.scheduler.max_running, 4, "file value kept");
        assert_eq!(cfg.scheduler.block_size, 32, "a key without a flag");
        assert!(cfg.scheduler.prefix_caching, "on by default");
        std::fs::write(&path, "[scheduler]\nprefix_caching = false\n").unwrap();
        let load = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", &config];
            argv.extend_from_slice(extra);
            Config::load(&Cli::try_parse_from(argv).unwrap().serve).unwrap()
        };
        assert!(!load(&[]).scheduler.prefix_caching, "the file turns it off");
        assert!(
            load(&["--prefix-caching", "true"]).scheduler.prefix_caching,
            "the flag wins"
        );
        use crate::engine::KvDtype;
        assert_eq!(
            load(&[]).scheduler.kv_cache_dtype,
            KvDtype::F16,
            "f16 by default"
        );
        assert_eq!(
            load(&["--kv-cache-dtype", "f32"]).scheduler.kv_cache_dtype,
            KvDtype::F32
        );
        std::fs::write(
            &path,
            "[limits]\nmax_tokens = 7\nmax_prompt_tokens = 9\n\
             [scheduler]\nmax_running = 4\nmax_waiting = 5\nblock_size = 32\n",
        )
        .unwrap();
        // The file-only keys have no flag, and the file knows only its keys.
        assert!(Cli::try_parse_from(["serve", "--block-size", "8"]).is_err());
        std::fs::write(&path, "[limits]\nmax_tokens_limit = 7\n").unwrap();
        assert!(
            Config::load(
                &Cli::try_parse_from(["serve", "--config", &config])
                    .unwrap()
                    .serve
            )
            .is_err()
        );
    }

    #[test]
    fn the_engine_path_comes_from_the_file_unless_a_flag_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmops.toml");
        let config = path.display().to_string();
        let load = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", &config];
            argv.extend_from_slice(extra);
            Config::load(&Cli::try_parse_from(argv).unwrap().serve)
        };
        std::fs::write(&path, "[server]\n").unwrap();
        assert_eq!(
            load(&[]).unwrap().server.engine_path,
            None,
            "the device decides"
        );
        std::fs::write(&path, "[server]\nengine_path = \"tensor\"\n").unwrap();
        assert_eq!(
            load(&[]).unwrap().server.engine_path,
            Some(EnginePath::Tensor)
        );
        let flag = load(&["--engine-path", "host"]).unwrap();
        assert_eq!(flag.server.engine_path, Some(EnginePath::Host));
        assert!(Cli::try_parse_from(["serve", "--engine-path", "gpu"]).is_err());
        std::fs::write(&path, "[server]\nengine_path = \"gpu\"\n").unwrap();
        let err = format!("{:#}", load(&[]).unwrap_err());
        assert!(err.contains("engine_path") || err.contains("gpu"), "{err}");
        // The host path is the CPU's default and runs only there.
        let cpu = crate::engine::parse_device("cpu").unwrap();
        assert_eq!(EnginePath::resolve(None, &cpu).unwrap(), EnginePath::Host);
        let tensor = EnginePath::resolve(Some(EnginePath::Tensor), &cpu).unwrap();
        assert_eq!(tensor, EnginePath::Tensor);
    }

    #[test]
    fn gguf_weights_come_from_the_file_unless_a_flag_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmops.toml");
        std::fs::write(&path, "[server]\ngguf_weights = \"int8\"\n").unwrap();
        let config = path.display().to_string();
        let load = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", &config];
            argv.extend_from_slice(extra);
            Config::load(&Cli::try_parse_from(argv).unwrap().serve)
        };
        assert_eq!(load(&[]).unwrap().server.gguf_weights, GgufWeights::Int8);
        let flag = load(&["--gguf-weights", "blocks"]).unwrap();
        assert_eq!(flag.server.gguf_weights, GgufWeights::Blocks);
        assert!(Cli::try_parse_from(["serve", "--gguf-weights", "q4"]).is_err());
        std::fs::write(&path, "[server]\ngguf_weights = \"q4\"\n").unwrap();
        let err = format!("{:#}", load(&[]).unwrap_err());
        assert!(err.contains("gguf_weights") || err.contains("q4"), "{err}");
    }

    #[test]
    fn tls_files_come_in_pairs_and_flags_replace_the_files_pair() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmops.toml");
        let config = path.display().to_string();
        let load = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", &config];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| Config::load(&c.serve))
        };
        std::fs::write(&path, "").unwrap();
        assert_eq!(load(&[]).unwrap().unwrap().server.tls, None);
        assert!(load(&["--tls-cert", "c.pem"]).is_err(), "a flag alone");
        let err = load(&["--admin-client-ca", "ca.pem"]).unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("needs TLS"), "{err:#}");
        std::fs::write(
            &path,
            "[server]\ntls_cert = \"f.crt\"\ntls_key = \"f.key\"\nadmin_client_ca = \"ca.pem\"\n",
        )
        .unwrap();
        let tls = load(&[]).unwrap().unwrap().server.tls.unwrap();
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("f.crt"), Some("f.key"))
        );
        assert_eq!(
            tls.admin_client_ca.as_deref().and_then(|p| p.to_str()),
            Some("ca.pem")
        );
        let tls = load(&["--tls-cert", "a.crt", "--tls-key", "a.key"])
            .unwrap()
            .unwrap()
            .server
            .tls
            .unwrap();
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("a.crt"), Some("a.key"))
        );
        std::fs::write(&path, "[server]\ntls_key = \"f.key\"\n").unwrap();
        assert!(load(&[]).unwrap().is_err(), "a key without a certificate");
    }

    #[test]
    fn model_roots_come_canonical_from_the_file_unless_flags_replace_them() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let path = dir.path().join("llmops.toml");
        // A root given through a `..` still compares as the real folder.
        let via_b = b.join("../a");
        std::fs::write(
            &path,
            format!(
                "[server]\nmodel_roots = [{:?}]\n",
                via_b.display().to_string()
            ),
        )
        .unwrap();
        let config = path.display().to_string();
        let load = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", &config];
            argv.extend_from_slice(extra);
            Config::load(&Cli::try_parse_from(argv).unwrap().serve)
        };
        let canon = |p: &std::path::Path| p.canonicalize().unwrap();
        assert_eq!(load(&[]).unwrap().server.model_roots, vec![canon(&a)]);
        let b_flag = b.display().to_string();
        let flags = load(&["--model-root", &b_flag]).unwrap();
        assert_eq!(flags.server.model_roots, vec![canon(&b)]);
        let missing = dir.path().join("missing").display().to_string();
        let err = format!("{:#}", load(&["--model-root", &missing]).unwrap_err());
        assert!(err.contains("model root"), "{err}");
        assert!(
            Config::load(&ServeArgs::default())
                .unwrap()
                .server
                .model_roots
                .is_empty()
        );
    }

    #[test]
    fn listener_timeouts_caps_and_allowlists_come_from_the_file_unless_flags_say_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmops.toml");
        let config = path.display().to_string();
        let load = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", &config];
            argv.extend_from_slice(extra);
            Config::load(&Cli::try_parse_from(argv).unwrap().serve)
        };
        std::fs::write(&path, "").unwrap();
        assert_eq!(
            load(&[]).unwrap().server.listener,
            ListenerConfig::default()
        );
        std::fs::write(
            &path,
            "[server]\nheader_read_timeout_secs = 2.5\nidle_timeout_secs = 20\n\
             body_read_timeout_secs = 7\nmax_connections = 100\nhttp2_keepalive_secs = 0\n\
             allowed_origins = [\"HTTPS://Console.Example\"]\nallowed_hosts = [\"LLM.prod\", \"*.corp.example\"]\n",
        )
        .unwrap();
        let l = load(&[]).unwrap().server.listener;
        assert_eq!(l.header_read_timeout, Duration::from_millis(2500));
        assert_eq!(l.idle_timeout, Duration::from_secs(20));
        assert_eq!(l.body_read_timeout, Duration::from_secs(7));
        assert_eq!(l.max_connections, 100);
        assert_eq!(l.http2_keepalive, None, "0 turns pings off");
        assert_eq!(l.allowed_origins, vec!["https://console.example:443"]);
        assert_eq!(l.allowed_hosts, vec!["llm.prod", "*.corp.example"]);
        let l = load(&[
            "--idle-timeout-secs",
            "5",
            "--max-connections",
            "7",
            "--allowed-hosts",
            "a.lan,b.lan",
        ])
        .unwrap()
        .server
        .listener;
        assert_eq!(l.idle_timeout, Duration::from_secs(5), "flag beats file");
        assert_eq!(
            l.header_read_timeout,
            Duration::from_millis(2500),
            "file kept"
        );
        assert_eq!((l.max_connections, l.allowed_hosts.len()), (7, 2));
        for (bad, names) in [
            (&["--idle-timeout-secs", "0"][..], "idle_timeout_secs"),
            (
                &["--body-read-timeout-secs=-1"][..],
                "body_read_timeout_secs",
            ),
            (&["--max-connections", "0"][..], "max_connections"),
            (
                &["--allowed-origins", "evil.example"][..],
                "allowed_origins",
            ),
            (&["--allowed-hosts", "http://x"][..], "allowed_hosts"),
        ] {
            let err = format!("{:#}", load(bad).unwrap_err());
            assert!(err.contains(names), "{bad:?}: {err}");
        }
    }

    #[test]
    fn origins_normalize_to_scheme_host_and_port() {
        assert_eq!(
            normalize_origin("http://LocalHost").as_deref(),
            Some("http://localhost:80")
        );
        assert_eq!(
            normalize_origin("https://[::1]:8443").as_deref(),
            Some("https://[::1]:8443")
        );
        for bad in [
            "null",
            "file://",
            "ftp://x",
            "http://a/b",
            "http://a:99999",
            "http://",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
    }
}
