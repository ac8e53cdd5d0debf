//! `llmops drift …`: a running server's drift per model version, through
//! `llmops.v1.Admin`. Prints JSON.

use crate::proto as pb;

/// `llmops drift` and its operation.
#[derive(clap::Args, Debug)]
pub struct DriftArgs {
    /// The server.
    #[command(flatten)]
    pub admin: super::models::AdminArgs,
    /// The operation.
    #[command(subcommand)]
    pub command: DriftCommand,
}

/// Drift operations.
#[derive(clap::Subcommand, Debug)]
pub enum DriftCommand {
    /// State, reference, windows and per-signal scores of each loaded
    /// version of a model.
    Status {
        /// Model name.
        model: String,
    },
}

/// Runs one drift command and prints its JSON result.
pub async fn run(args: DriftArgs) -> anyhow::Result<()> {
    let mut client = args.admin.connect().await?;
    let out = match args.command {
        DriftCommand::Status { model } => {
            let r = client
                .get_drift(pb::DriftRef { model })
                .await
                .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))?;
            serde_json::from_str::<serde_json::Value>(&r.get_ref().json)?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
