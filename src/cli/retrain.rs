//! `llmops retrain MODEL`: fine-tune a model's stable version on a running
//! server (captured traffic plus a replay share of its original data), gate
//! it offline and register it, through `llmops.v1.Admin`. Prints JSON.

use std::time::Duration;

use crate::proto as pb;

/// `llmops retrain` and its options.
#[derive(clap::Args, Debug)]
pub struct RetrainArgs {
    /// The server.
    #[command(flatten)]
    pub admin: super::models::AdminArgs,
    /// Model name.
    pub model: String,
    /// Captured traffic on the server (JSONL `llmops train` reads); repeat
    /// for more files.
    #[arg(long, num_args = 1.., required_unless_present_any = ["status", "cancel"])]
    pub data: Vec<String>,
    /// Optimizer steps (server default 50).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Share of training examples replayed from the parent's data.
    #[arg(long)]
    pub replay: Option<f64>,
    /// The parent's original data (default: what its model card names).
    #[arg(long, num_args = 1..)]
    pub replay_data: Vec<String>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Sequences per step.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// The gate's limit on relative held-out perplexity growth.
    #[arg(long)]
    pub max_regression: Option<f64>,
    /// The smallest reference set the gate accepts, in target tokens.
    #[arg(long)]
    pub min_reference_tokens: Option<u64>,
    /// How much CPU the job may take from serving.
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// The new version's id.
    #[arg(long)]
    pub version: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    /// Wait for the outcome, printing progress to stderr.
    #[arg(long)]
    pub wait: bool,
    /// Show the latest retrain's status instead of starting one.
    #[arg(long, conflicts_with = "cancel")]
    pub status: bool,
    /// Cancel the running retrain.
    #[arg(long)]
    pub cancel: bool,
}

/// The job's CPU budget (the server's `CpuBudget`); what is not given is
/// the server's default: one thread, half of its time.
#[derive(clap::Args, Debug)]
pub struct BudgetArgs {
    /// Threads of the training job.
    #[arg(long)]
    pub threads: Option<u32>,
    /// Share of time the job computes, (0, 1].
    #[arg(long)]
    pub duty: Option<f64>,
}

/// Runs the command and prints the job's status as JSON.
pub async fn run(args: RetrainArgs) -> anyhow::Result<()> {
    let mut client = args.admin.connect().await?;
    let status = super::models::rpc_error;
    let reason = args.reason.clone().unwrap_or_default();
    let r = if args.status {
        client
            .get_retrain(pb::RetrainRef {
                model: args.model.clone(),
                reason,
            })
            .await
    } else if args.cancel {
        client
            .cancel_retrain(pb::RetrainRef {
                model: args.model.clone(),
                reason,
            })
            .await
    } else {
        client
            .start_retrain(pb::StartRetrainRequest {
                model: args.model.clone(),
                data: args.data.clone(),
                replay_data: args.replay_data.clone(),
                replay_share: args.replay,
                steps: args.steps,
                lr: args.lr,
                batch_size: args.batch_size,
                max_regression: args.max_regression,
                min_reference_tokens: args.min_reference_tokens,
                threads: args.budget.threads,
                duty: args.budget.duty,
                version: args.version.clone().unwrap_or_default(),
                reason,
            })
            .await
    }
    .map_err(status)?;
    let mut s = r.into_inner();
    while args.wait && s.running {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s = client
            .get_retrain(pb::RetrainRef {
                model: args.model.clone(),
                reason: String::new(),
            })
            .await
            .map_err(status)?
            .into_inner();
        let v: serde_json::Value = serde_json::from_str(&s.status_json).unwrap_or_default();
        let p = &v["progress"];
        eprintln!(
            "{} step {}/{} loss {} {:.0} tok/s eta {}s",
            p["phase"].as_str().unwrap_or("?"),
            p["step"],
            p["steps"],
            p["loss"],
            p["tokens_per_second"].as_f64().unwrap_or(0.0),
            p["eta_seconds"]
                .as_f64()
                .map_or("-".into(), |e| format!("{e:.0}")),
        );
    }
    let v: serde_json::Value = serde_json::from_str(&s.status_json)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
