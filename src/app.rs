//! Wiring only: load models, start their engines, build the deployment table,
//! serve HTTP and gRPC, and shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::auth::Authenticator;
use crate::api::grpc::{self, InferenceService};
use crate::api::http::{self, HttpState};
use crate::config::{Config, ModelSpec};
use crate::engine::{self, LoadOptions, LoadedModel};
use crate::router::{Deployment, DeploymentTable, Router, Target};
use crate::scheduler::{Engine, EngineLabels};

/// Loads one configured model (blocking: run it off the async workers).
pub fn load_model(spec: &ModelSpec) -> anyhow::Result<LoadedModel> {
    let opts = LoadOptions {
        device: engine::parse_device(&spec.device)?,
        ..Default::default()
    };
    Ok(match &spec.path {
        Some(p) => engine::load(p, &opts)?,
        None => crate::embedded::load(&opts)?,
    })
}

/// A short content id for a model: the first 12 hex digits of the SHA-256 of
/// its weights (the registry keeps the full digest).
pub fn version_id(spec: &ModelSpec) -> anyhow::Result<String> {
    let digest = match &spec.path {
        Some(p) => crate::registry::digest_path(p)?,
        None => crate::embedded::digest(),
    };
    Ok(digest[..12].to_string())
}

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
pub async fn run(cfg: Config, listeners: Listeners, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let metrics = crate::monitor::exporter::install()?;
    let auth = Authenticator::new(&cfg.keys);
    if auth.is_open() {
        tracing::warn!("NO API KEYS CONFIGURED: the server is open to anyone who can reach it (set LLMOPS_API_KEYS or [auth] in the config)");
    }
    let mut table = DeploymentTable::default();
    let mut engines = vec![];
    for spec in &cfg.models {
        let s = spec.clone();
        let (loaded, version) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok((load_model(&s)?, version_id(&s)?))
        })
        .await??;
        tracing::info!(model = %spec.name, version = %version, arch = loaded.info.arch.as_str(), parameters = loaded.info.parameters, source = %loaded.info.source, "model loaded");
        let engine = Engine::spawn(
            loaded,
            cfg.scheduler.clone(),
            EngineLabels {
                model: spec.name.clone(),
                version: version.clone(),
                variant: "stable".into(),
            },
        )?;
        engines.push(engine.clone());
        table.models.insert(
            spec.name.clone(),
            Arc::new(Deployment {
                model: spec.name.clone(),
                stable: Arc::new(Target { version, engine }),
            }),
        );
    }
    let router = Arc::new(Router::new(table));
    let limits = Arc::new(cfg.limits.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<grpc::pb::inference_server::InferenceServer<InferenceService>>()
        .await;
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    for spec in &cfg.models {
        health
            .set_service_status(&spec.name, tonic_health::ServingStatus::Serving)
            .await;
    }

    let http_state = HttpState {
        router: router.clone(),
        auth: auth.clone(),
        limits: limits.clone(),
        expected_models: Arc::new(cfg.models.iter().map(|m| m.name.clone()).collect()),
        metrics: Some(metrics.clone()),
    };
    let admin = crate::api::admin::routes();
    let http_app = http::app(http_state, Some(admin));
    let grpc_app = grpc::routes(
        InferenceService {
            router: router.clone(),
            auth: auth.clone(),
            limits,
        },
        health_service,
    )?
    .prepare()
    .into_axum_router();

    tracing::info!(http = %listeners.http.local_addr()?, grpc = %listeners.grpc.local_addr()?, models = cfg.models.len(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let http_server = tokio::spawn(
        axum::serve(listeners.http, http_app.into_make_service())
            .with_graceful_shutdown(wait(stop_rx.clone()))
            .into_future(),
    );
    let grpc_server = tokio::spawn(
        axum::serve(listeners.grpc, grpc_app.into_make_service())
            .with_graceful_shutdown(wait(stop_rx.clone()))
            .into_future(),
    );
    let metrics_server = listeners.metrics.map(|l| {
        tokio::spawn(
            axum::serve(l, http::metrics_app(metrics.clone()).into_make_service())
                .with_graceful_shutdown(wait(stop_rx.clone()))
                .into_future(),
        )
    });

    shutdown.await;
    let timeout = cfg.server.shutdown_timeout;
    tracing::info!(timeout_secs = timeout.as_secs(), "shutting down: draining in-flight requests");
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    for e in &engines {
        e.drain(timeout);
    }
    let servers = async {
        let _ = http_server.await;
        let _ = grpc_server.await;
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
    };
    if tokio::time::timeout(timeout + Duration::from_secs(1), servers).await.is_err() {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
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
