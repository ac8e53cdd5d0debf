//! `llmops shadow …`: mirror a sample of a model's live requests to a
//! candidate version on a running server and read the comparison, through
//! `llmops.v1.Admin`. Every command prints JSON.

use crate::proto as pb;

/// `llmops shadow` and its operation.
#[derive(clap::Args, Debug)]
pub struct ShadowArgs {
    /// The server.
    #[command(flatten)]
    pub admin: super::models::AdminArgs,
    /// Why (recorded in the audit log).
    #[arg(long, global = true)]
    pub reason: Option<String>,
    /// The operation.
    #[command(subcommand)]
    pub command: ShadowCommand,
}

/// Shadow operations.
#[derive(clap::Subcommand, Debug)]
pub enum ShadowCommand {
    /// Mirror a sample of a model's requests to a registered version.
    Set {
        /// Model name.
        model: String,
        /// Candidate version.
        version: String,
        /// Share of requests copied, 0–1.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// generate (the candidate answers too) or score (it scores the
        /// primary's answer in one prefill; cheaper).
        #[arg(long, default_value = "generate")]
        mode: String,
        /// Copies in flight at once.
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Token budget of the copies per second.
        #[arg(long)]
        tokens_per_second: Option<u32>,
        /// Seconds before a copy is dropped.
        #[arg(long)]
        timeout: Option<f64>,
        /// Alternatives per position compared in score mode.
        #[arg(long)]
        top_k: Option<u32>,
        /// Keep redacted disagreements (read with `llmops shadow samples`).
        #[arg(long)]
        samples: bool,
        /// Most samples kept.
        #[arg(long)]
        samples_capacity: Option<u32>,
        /// Extra regular expression to redact from samples; repeat for more.
        #[arg(long = "redact")]
        redact: Vec<String>,
    },
    /// The shadow's settings and comparisons so far.
    Status {
        /// Model name.
        model: String,
    },
    /// Stop mirroring.
    Clear {
        /// Model name.
        model: String,
    },
    /// Stored disagreements (redacted).
    Samples {
        /// Model name.
        model: String,
    },
}

/// Runs one shadow command and prints its JSON result.
pub async fn run(args: ShadowArgs) -> anyhow::Result<()> {
    let mut client = args.admin.connect().await?;
    let reason = args.reason.unwrap_or_default();
    let status = super::models::rpc_error;
    let json = |s: &pb::ShadowStatus| {
        serde_json::from_str::<serde_json::Value>(&s.status_json).unwrap_or_default()
    };
    let out = match args.command {
        ShadowCommand::Set {
            model,
            version,
            rate,
            mode,
            max_concurrent,
            tokens_per_second,
            timeout,
            top_k,
            samples,
            samples_capacity,
            redact,
        } => {
            let r = client
                .set_shadow(pb::SetShadowRequest {
                    model,
                    version,
                    rate: Some(rate),
                    mode,
                    max_concurrent,
                    tokens_per_second,
                    timeout_seconds: timeout,
                    top_k,
                    samples,
                    samples_capacity,
                    samples_retention_seconds: None,
                    redact,
                    reason,
                })
                .await
                .map_err(status)?;
            json(r.get_ref())
        }
        ShadowCommand::Status { model } => {
            let r = client
                .get_shadow(pb::ShadowRef { model, reason })
                .await
                .map_err(status)?;
            json(r.get_ref())
        }
        ShadowCommand::Clear { model } => {
            let r = client
                .clear_shadow(pb::ShadowRef { model, reason })
                .await
                .map_err(status)?;
            serde_json::json!({"message": r.get_ref().message})
        }
        ShadowCommand::Samples { model } => {
            let r = client
                .list_shadow_samples(pb::ShadowRef { model, reason })
                .await
                .map_err(status)?;
            let samples: Vec<serde_json::Value> = r
                .get_ref()
                .samples_json
                .iter()
                .filter_map(|s| serde_json::from_str(s).ok())
                .collect();
            serde_json::json!({"samples": samples})
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
