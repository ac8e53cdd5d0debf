//! TLS for the HTTP and gRPC listeners (rustls with ring): the certificate
//! and key from PEM files, ALPN `h2` and `http/1.1`, and optional client
//! certificates for the admin API.
//!
//! With an admin client CA, every connection may present a client
//! certificate; one that does not chain to the CA fails the handshake, and a
//! connection without one is served as usual except for the admin API
//! (`/admin/…` over HTTP, `llmops.v1.Admin` over gRPC), which it is refused
//! (403 in the OpenAI shape, PERMISSION_DENIED). The admin API key is still
//! required on top: the certificate says which machine, the key which role.
//!
//! A client that speaks plain HTTP to a TLS port gets a `400` saying so
//! (as nginx answers) and the connection is closed; the server carries on.
//!
//! The files are read again on SIGHUP and when their modification times
//! change (checked every `tls_reload_secs`): the new config is swapped in
//! for new connections, open ones keep theirs, and files that do not make a
//! valid config (unparsable, a key that is not the certificate's) leave the
//! previous one serving, logged and counted in `llmops_tls_reloads_total`.
//!
//! Connections are accepted and served by [`crate::api::listen`], plain or
//! TLS alike; this module gives it the handshake and the admin refusal.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use axum::response::IntoResponse;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::api::error::ApiError;
use crate::config::TlsConfig;
use crate::monitor::names;

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

/// The loaded TLS settings, shared by every listener: the current rustls
/// config behind an `ArcSwap`, so a reload changes what new connections get
/// while connections already open keep theirs.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsConfig,
    current: ArcSwap<rustls::ServerConfig>,
    admin_needs_client_cert: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.inner.files.cert)
            .field(
                "admin_needs_client_cert",
                &self.inner.admin_needs_client_cert,
            )
            .field("reload_interval", &self.inner.files.reload_interval)
            .finish_non_exhaustive()
    }
}

/// What identifies a file's version: modification time, length, inode
/// (a replaced Kubernetes secret is a new file behind the same link).
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl Tls {
    /// Reads and checks the PEM files; an error names the file.
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(server_config(cfg)?),
                admin_needs_client_cert: cfg.admin_client_ca.is_some(),
                files: cfg.clone(),
            }),
        })
    }

    /// Reads the files again and, when they make a valid config, serves it
    /// to new connections; otherwise the current one stays. Either way the
    /// outcome is logged and counted (`llmops_tls_reloads_total`).
    pub fn reload(&self, why: &str) -> anyhow::Result<()> {
        let files = &self.inner.files;
        match server_config(files) {
            Ok(c) => {
                self.inner.current.store(Arc::new(c));
                metrics::counter!(names::TLS_RELOADS, "result" => "ok").increment(1);
                tracing::info!(cert = %files.cert.display(), why, "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                metrics::counter!(names::TLS_RELOADS, "result" => "error").increment(1);
                tracing::error!(cert = %files.cert.display(), why, error = format!("{e:#}"), "TLS reload failed; still serving the previous certificate");
                Err(e)
            }
        }
    }

    /// Whether the admin API is refused on `stream`: an admin client CA is
    /// configured and the client presented no certificate.
    pub(crate) fn refuses_admin(
        &self,
        stream: &tokio_rustls::server::TlsStream<TcpStream>,
    ) -> bool {
        let has_client_cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        self.inner.admin_needs_client_cert && !has_client_cert
    }

    /// The current config, for a new connection.
    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.inner.current.load_full())
    }

    fn stamps(&self) -> [Stamp; 3] {
        let f = &self.inner.files;
        [
            stamp(&f.cert),
            stamp(&f.key),
            f.admin_client_ca.as_deref().and_then(stamp),
        ]
    }

    /// Reloads on SIGHUP, and when the files' stamps changed and then held
    /// still for one more interval (so a certificate written before its key
    /// is not tried half-replaced), until `shutdown` resolves.
    pub async fn watch(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: TLS reloads only when the files change");
                None
            }
        };
        let period = self.inner.files.reload_interval;
        let mut ticks = period.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut seen = self.stamps();
        let mut pending: Option<[Stamp; 3]> = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = hup_received(&mut hup) => {
                    // Stamps first: a change while reading is seen next tick.
                    seen = self.stamps();
                    pending = None;
                    let _ = self.reload("SIGHUP");
                }
                _ = tick(&mut ticks) => {
                    let now = self.stamps();
                    if now == seen {
                        pending = None;
                    } else if pending.as_ref() == Some(&now) {
                        seen = now;
                        pending = None;
                        let _ = self.reload("files changed");
                    } else {
                        pending = Some(now);
                    }
                }
            }
        }
    }
}

/// The next SIGHUP; never without a handler.
async fn hup_received(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(h) => {
            h.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The next tick; never without an interval.
async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The rustls config from the files; an error names the file.
fn server_config(cfg: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("tls_cert {}", cfg.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("tls_cert {}", cfg.cert.display()))?;
    if certs.is_empty() {
        bail!("tls_cert {} holds no certificate", cfg.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("tls_key {}: no private key", cfg.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &cfg.admin_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("admin_client_ca {}", ca.display()))?
            {
                let c = c.with_context(|| format!("admin_client_ca {}", ca.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("admin_client_ca {}", ca.display()))?;
            }
            if roots.is_empty() {
                bail!("admin_client_ca {} holds no certificate", ca.display());
            }
            // Optional: inference clients connect without one; a
            // certificate that is presented must chain to the CA.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .with_context(|| format!("admin_client_ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "tls_cert {} and tls_key {} do not make a pair",
            cfg.cert.display(),
            cfg.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Whether a request path belongs to the admin API, on either protocol.
pub(crate) fn is_admin_path(path: &str) -> bool {
    path.starts_with("/admin/") || path.starts_with("/llmops.v1.Admin/")
}

/// The refusal of an admin request on a connection without a client
/// certificate: gRPC's status for gRPC paths, the OpenAI shape otherwise.
pub(crate) fn refuse_admin(path: &str) -> axum::response::Response {
    let e = ApiError::Forbidden(
        "the admin API needs a client certificate signed by the admin client CA".into(),
    );
    if path.starts_with("/llmops.v1.Admin/") {
        tonic::Status::from(e)
            .into_http::<axum::body::Body>()
            .into_response()
    } else {
        e.into_response()
    }
}

/// The TLS handshake, or `None` when the client spoke plain HTTP (answered
/// with a 400 that says so) or went away first.
pub(crate) async fn handshake(
    mut tcp: TcpStream,
    tls: &Tls,
) -> std::io::Result<Option<tokio_rustls::server::TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] != TLS_HANDSHAKE {
        let body = "This port speaks TLS: use https:// (or a TLS gRPC channel).\n";
        let reply = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(reply.as_bytes()).await;
        let _ = tcp.shutdown().await;
        // Lingering close: read what the client already sent (briefly, a
        // bounded amount) so closing does not reset the connection before
        // the client has read the answer.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut left = 64usize << 10;
            while left > 0 {
                match tcp.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        return Ok(None);
    }
    tls.acceptor().accept(tcp).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_paths_are_recognised_on_both_protocols() {
        assert!(is_admin_path("/admin/v1/models"));
        assert!(is_admin_path("/llmops.v1.Admin/Load"));
        assert!(!is_admin_path("/v1/chat/completions"));
        assert!(!is_admin_path("/llmops.v1.Inference/Generate"));
        assert!(!is_admin_path("/administrator"));
    }
}
