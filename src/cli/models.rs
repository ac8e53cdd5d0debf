//! `llmops models …`: a command-line client for the admin API over gRPC
//! (`llmops.v1.Admin`). Every command prints JSON on stdout.

use anyhow::Context;
use serde_json::json;
use tonic::codegen::InterceptedService;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::proto as pb;
use pb::admin_client::AdminClient;

/// Where the admin API is and who is asking (every admin command).
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The server's gRPC address.
    #[arg(
        long,
        env = "LLMOPS_ADMIN_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub url: String,
    /// An API key with the admin role (sent as `authorization: Bearer …`).
    #[arg(long, env = "LLMOPS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA certificate (PEM) to verify a TLS server with (`https://` URLs);
    /// the system's roots are not used.
    #[arg(long, env = "LLMOPS_ADMIN_CA")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a server with `admin_client_ca`.
    #[arg(long, env = "LLMOPS_ADMIN_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "LLMOPS_ADMIN_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
}

impl AdminArgs {
    /// A connected client.
    pub async fn connect(&self) -> anyhow::Result<AdminClient<InterceptedService<Channel, Auth>>> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let tls = if self.url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.ca_cert {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            Some(tls)
        } else if self.ca_cert.is_some() || self.client_cert.is_some() {
            anyhow::bail!(
                "--ca-cert and --client-cert need an https:// --url (got {})",
                self.url
            );
        } else {
            None
        };
        connect_with(&self.url, self.api_key.as_deref(), tls).await
    }
}

/// `llmops models` and its operation.
#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    /// The server.
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Why (recorded in the audit log for changes).
    #[arg(long, global = true)]
    pub reason: Option<String>,
    #[command(subcommand)]
    /// The operation.
    pub command: ModelsCommand,
}

/// The admin operations.
#[derive(clap::Subcommand, Debug)]
pub enum ModelsCommand {
    /// List models with their versions and aliases.
    List,
    /// Show one model.
    Get {
        /// Model name.
        model: String,
    },
    /// Register a version from a path on the server (validated by loading it).
    Register {
        /// Model name.
        model: String,
        /// HF folder or GGUF file, as the server sees it.
        path: String,
        /// Version name (default: assigned by the server).
        #[arg(long)]
        version: Option<String>,
        /// Free-form metadata as a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        /// A model card file (Markdown) to store with the version.
        #[arg(long)]
        card: Option<std::path::PathBuf>,
    },
    /// Load a version into memory (it then stays loaded).
    Load {
        /// Model name.
        model: String,
        /// Version name.
        version: String,
    },
    /// Unload a version (refused while an alias points at it).
    Unload {
        /// Model name.
        model: String,
        /// Version name.
        version: String,
    },
    /// Point an alias at a version; for `stable` this is the hot swap.
    Alias {
        /// Model name.
        model: String,
        /// Alias (`stable`, or your own).
        alias: String,
        /// Version name.
        version: String,
    },
    /// What each model name serves right now.
    Serving,
    /// Read the audit log: the newest entries, or those after `--after`.
    Audit {
        /// Entries after this sequence number, oldest first (default: the
        /// newest `--limit` entries).
        #[arg(long)]
        after: Option<u64>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// An admin call's error as the CLI prints it. A JSON answer where gRPC was
/// expected (tonic reads its `{` as a compression flag of 123) means `--url`
/// names the HTTP port: said so, rather than the decoder's complaint.
pub fn rpc_error(e: tonic::Status) -> anyhow::Error {
    let http = e.message().contains("compression flag: 123")
        || e.metadata()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| !t.starts_with("application/grpc"));
    match http {
        true => anyhow::anyhow!(
            "the server at --url answered with JSON, not gRPC: --url must name the gRPC port \
             (`llmops serve --grpc-addr`, 50051 by default), not the HTTP one"
        ),
        false => anyhow::anyhow!("{:?}: {}", e.code(), e.message()),
    }
}

/// Adds the API key to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of `llmops.v1.Admin` at `url`, sending `api_key`.
pub async fn connect(
    url: &str,
    api_key: Option<&str>,
) -> anyhow::Result<AdminClient<InterceptedService<Channel, Auth>>> {
    connect_with(url, api_key, None).await
}

/// [`connect`], over TLS when `tls` is given.
pub async fn connect_with(
    url: &str,
    api_key: Option<&str>,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<AdminClient<InterceptedService<Channel, Auth>>> {
    let mut endpoint =
        Channel::from_shared(url.to_string()).with_context(|| format!("bad --url {url}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .context("TLS settings for the admin client")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let auth = match api_key {
        Some(k) => Some(
            MetadataValue::try_from(format!("Bearer {k}"))
                .context("the API key holds characters a header cannot carry")?,
        ),
        None => None,
    };
    Ok(AdminClient::with_interceptor(channel, Auth(auth)))
}

/// Runs one admin command and prints its JSON result.
pub async fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let mut client = args.admin.connect().await?;
    let reason = args.reason.unwrap_or_default();
    let status = super::models::rpc_error;
    let out = match args.command {
        ModelsCommand::List => {
            let r = client
                .list_models(pb::AdminListModelsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            json!(r.models.iter().map(model_json).collect::<Vec<_>>())
        }
        ModelsCommand::Get { model } => {
            let r = client
                .get_model(pb::GetModelRequest { model })
                .await
                .map_err(status)?
                .into_inner();
            model_json(&r)
        }
        ModelsCommand::Register {
            model,
            path,
            version,
            metadata,
            card,
        } => {
            let model_card = match card {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?,
                None => String::new(),
            };
            let r = client
                .register_version(pb::RegisterVersionRequest {
                    model,
                    path,
                    version: version.unwrap_or_default(),
                    metadata_json: metadata.unwrap_or_default(),
                    model_card,
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            version_json(&r)
        }
        ModelsCommand::Load { model, version } => {
            let r = client
                .load_version(pb::VersionRef {
                    model,
                    version,
                    reason,
                })
                .await
                .map_err(status)?;
            json!({ "message": r.into_inner().message })
        }
        ModelsCommand::Unload { model, version } => {
            let r = client
                .unload_version(pb::VersionRef {
                    model,
                    version,
                    reason,
                })
                .await
                .map_err(status)?;
            json!({ "message": r.into_inner().message })
        }
        ModelsCommand::Alias {
            model,
            alias,
            version,
        } => {
            let r = client
                .set_alias(pb::SetAliasRequest {
                    model,
                    alias,
                    version,
                    reason,
                })
                .await
                .map_err(status)?;
            json!({ "message": r.into_inner().message })
        }
        ModelsCommand::Serving => {
            let r = client
                .serving(pb::ServingRequest {})
                .await
                .map_err(status)?
                .into_inner();
            serde_json::from_str(&r.json).context("the server sent malformed JSON")?
        }
        ModelsCommand::Audit { after, limit } => {
            let r = client
                .read_audit(pb::ReadAuditRequest { after, limit })
                .await
                .map_err(status)?
                .into_inner();
            let entries = r
                .entries_json
                .iter()
                .map(|e| serde_json::from_str(e))
                .collect::<Result<Vec<serde_json::Value>, _>>()
                .context("the server sent malformed JSON")?;
            json!(entries)
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn version_json(v: &pb::VersionInfo) -> serde_json::Value {
    json!({
        "version": v.version,
        "sha256": v.sha256,
        "source": v.source,
        "format": v.format,
        "architecture": v.architecture,
        "parameters": v.parameters,
        "created": v.created,
        "metadata": serde_json::from_str::<serde_json::Value>(&v.metadata_json)
            .unwrap_or(serde_json::Value::Null),
    })
}

fn model_json(m: &pb::ModelInfo) -> serde_json::Value {
    json!({
        "model": m.model,
        "versions": m.versions.iter().map(version_json).collect::<Vec<_>>(),
        "aliases": m.aliases,
    })
}
