//! Wiring only: load models, start their engines, build the deployment table,
//! serve HTTP and gRPC, and shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::auth::Authenticator;
use crate::api::grpc::AdminService;
use crate::api::grpc::{self, InferenceService};
use crate::api::http::{self, HttpState};
use crate::config::Config;
use crate::control::Controller;
use crate::router::Router;

/// Listeners bound by the caller (tests bind port 0).
pub struct Listeners {
    /// HTTP.
    pub http: TcpListener,
    /// gRPC.
    pub grpc: TcpListener,
    /// Optional metrics-only listener.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Self> {
        let bind = |a: SocketAddr| async move {
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a}"))
        };
        Ok(Self {
            http: bind(cfg.server.http_addr).await?,
            grpc: bind(cfg.server.grpc_addr).await?,
            metrics: match cfg.server.metrics_addr {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }
}

/// Loads every model and serves until `shutdown` resolves, then drains.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = crate::monitor::exporter::install()?;
    let auth = Authenticator::new(&cfg.keys)
        .with_anonymous_role(crate::config::anonymous_role(&cfg.server));
    if auth.is_open() && cfg.server.insecure_no_auth {
        tracing::warn!(
            http = %cfg.server.http_addr,
            grpc = %cfg.server.grpc_addr,
            "--insecure-no-auth: NO API KEYS CONFIGURED and the server may listen beyond loopback: anyone who can reach it may run inference; the admin API is closed to all (set LLMOPS_API_KEYS or [auth] keys)"
        );
    } else if auth.is_open() {
        tracing::warn!(
            "no API keys configured: every caller on this loopback-only server is an admin (set LLMOPS_API_KEYS or [auth] keys before listening beyond loopback)"
        );
    }
    let router = Arc::new(Router::default().with_pinning(cfg.server.allow_version_pinning));
    let (health, health_service) = tonic_health::server::health_reporter();
    let device = cfg
        .models
        .first()
        .map(|m| m.device.clone())
        .unwrap_or_else(|| "cpu".into());
    let (registry, replica_id) = match &cfg.server.registry {
        Some(opts) => (open_shared_registry(opts).await?, opts.replica_id.clone()),
        None => (
            crate::registry::Registry::open(&cfg.server.data_dir)?,
            String::new(),
        ),
    };
    tracing::info!(registry = %registry.location(), "registry opened");
    let ops = Arc::new(
        Controller::open(
            registry,
            &cfg.server.data_dir,
            router.clone(),
            cfg.scheduler.clone(),
            device,
            cfg.server.gguf_weights,
            Some(health.clone()),
        )?
        .with_replica_id(replica_id)
        .with_model_roots(cfg.server.model_roots.clone())
        .with_trained_dir(cfg.server.trained_dir.clone())
        .with_secrets_key(cfg.server.secrets_key_file.as_deref())?
        .with_hooks(&cfg.hooks)?
        .with_drift(cfg.drift.clone())
        .with_engine_path(cfg.server.engine_path),
    );
    // What was serving before a restart is restored before traffic is accepted.
    let served = ops.restore(&cfg.models).await?;
    ops.watch_engines();
    ops.follow();
    ops.start_autopilot(
        crate::control::autopilot::AutopilotSpec::from_config(cfg.autopilot.as_ref())
            .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?,
    );
    let limits = Arc::new(cfg.limits.clone());
    health
        .set_serving::<crate::proto::inference_server::InferenceServer<InferenceService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let http_state = HttpState {
        router: router.clone(),
        auth: auth.clone(),
        limits: limits.clone(),
        expected_models: Arc::new(served.clone()),
        metrics: Some(metrics.clone()),
        ops: Some(ops.clone()),
    };
    // Web pages must not drive the admin API (foreign Origin, rebound Host,
    // text/plain writes).
    let admin = crate::api::browser::AdminGuard::new(&cfg.server.listener, auth.is_open())
        .provide(crate::api::admin::routes());
    let http_app = http::app(http_state, Some(admin));
    let grpc_app = grpc::routes(
        InferenceService {
            router: router.clone(),
            auth: auth.clone(),
            limits,
        },
        AdminService {
            ops: ops.clone(),
            auth: auth.clone(),
        },
        health_service,
    )?
    .prepare()
    .into_axum_router()
    // Every gRPC request gets an id, as every HTTP one does: without one,
    // every request without a session would be one key to the split.
    .layer(axum::middleware::from_fn(http::request_id));
    let grpc_app = grpc::conventional_codes(grpc_app);

    tracing::info!(http = %listeners.http.local_addr()?, grpc = %listeners.grpc.local_addr()?, models = served.len(), "listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let tls = cfg
        .server
        .tls
        .as_ref()
        .map(crate::api::tls::Tls::load)
        .transpose()?;
    if let Some(t) = &tls {
        tracing::info!(?t, "serving HTTP, gRPC and metrics over TLS");
        // SIGHUP and changed files swap the certificate in place.
        tokio::spawn(t.clone().watch(wait(stop_rx.clone())));
    }
    // Every listener gets its share of the file limit (raised to the hard
    // limit first), past which connections are refused rather than starve
    // `accept` of descriptors.
    let max_connections = crate::api::listen::fit_cap(
        cfg.server.listener.max_connections,
        crate::api::listen::raise_file_limit(),
        2 + usize::from(listeners.metrics.is_some()),
    );
    let listener = |name| crate::api::listen::Listener {
        name,
        max_connections,
        config: cfg.server.listener.clone(),
        tls: tls.clone(),
    };
    let serve = crate::api::listen::serve;
    let http_server = tokio::spawn(serve(
        listeners.http,
        listener("http"),
        http_app,
        wait(stop_rx.clone()),
    ));
    let grpc_server = tokio::spawn(serve(
        listeners.grpc,
        listener("grpc"),
        grpc_app,
        wait(stop_rx.clone()),
    ));
    // The metrics listener is TLS too when TLS is on: it is often the one
    // port opened beyond the host, and a scrape is as readable as any reply.
    let metrics_server = listeners.metrics.map(|l| {
        tokio::spawn(serve(
            l,
            listener("metrics"),
            http::metrics_app(metrics.clone()),
            wait(stop_rx.clone()),
        ))
    });

    shutdown.await;
    let timeout = cfg.server.shutdown_timeout;
    tracing::info!(
        timeout_secs = timeout.as_secs(),
        "shutting down: draining in-flight requests"
    );
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(true);
    for d in router.snapshot().models.values() {
        d.stable.engine.drain(timeout);
        if let Some(c) = &d.canary {
            c.target.engine.drain(timeout);
        }
        if let Some(s) = &d.shadow {
            s.target.engine.drain(timeout);
        }
    }
    let servers = async {
        let _ = http_server.await;
        let _ = grpc_server.await;
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
    };
    if tokio::time::timeout(timeout + Duration::from_secs(1), servers)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
    drop(ops);
    drop(router);
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Connects to the fleet's registry in etcd and reads its log, trying for
/// up to 30 s (etcd may start after the replicas, as in a fresh cluster).
async fn open_shared_registry(
    opts: &crate::registry::etcd::EtcdOptions,
) -> anyhow::Result<crate::registry::Registry> {
    let store = crate::registry::etcd::Etcd::connect(opts)?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || crate::registry::Registry::open_shared(s)).await?
        {
            Ok(r) => {
                tracing::info!(replica = %opts.replica_id, entries = r.entries().len(), "shared registry read");
                return Ok(r);
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "shared registry not reachable yet; retrying"
                );
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(e.context(format!("the shared registry at {}", opts.url)));
            }
        }
    }
}
