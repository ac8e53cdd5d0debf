//! `llmops rollout …`: start and steer canary rollouts on a running server
//! through `llmops.v1.Admin`. Every command prints the rollout as JSON.

use crate::proto as pb;

/// `llmops rollout` and its operation.
#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// The server.
    #[command(flatten)]
    pub admin: super::models::AdminArgs,
    /// Why (recorded in the audit log).
    #[arg(long, global = true)]
    pub reason: Option<String>,
    /// The operation.
    #[command(subcommand)]
    pub command: RolloutCommand,
}

/// Rollout operations.
#[derive(clap::Subcommand, Debug)]
pub enum RolloutCommand {
    /// Start a rollout of a registered version.
    Start {
        /// Model name.
        model: String,
        /// Candidate version.
        candidate: String,
        /// Canary weights in percent.
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<u32>,
        /// Seconds between analyses.
        #[arg(long, default_value_t = 30.0)]
        interval: f64,
        /// Seconds at the start whose canary requests are not judged (its
        /// prefix cache is cold) [default: half the interval, at most 30].
        #[arg(long)]
        warmup: Option<f64>,
        /// A gate, e.g. "error_rate <= 0.01", "ttft_p99 < 500ms",
        /// "e2e_p99 <= 1.2x" (relative to stable); repeat for more. The
        /// defaults when none is given.
        #[arg(long = "gate")]
        gates: Vec<String>,
        /// Fewer samples than this on either side is inconclusive.
        #[arg(long)]
        min_samples: Option<u32>,
        /// Failed windows before rollback.
        #[arg(long)]
        failure_limit: Option<u32>,
        /// Consecutive successful windows per step.
        #[arg(long)]
        successes_per_step: Option<u32>,
        /// What an inconclusive window does: hold or rollback.
        #[arg(long, default_value = "hold")]
        on_inconclusive: String,
        /// Analyse and report without acting on failures.
        #[arg(long)]
        dry_run: bool,
        /// Which identity keeps a client on one side: session, user,
        /// api_key or request.
        #[arg(long, default_value = "session")]
        sticky_key: String,
        /// A condition on the model's shadow comparisons of the candidate,
        /// checked before the canary starts, e.g. "top1_agreement >= 0.95";
        /// repeat for more.
        #[arg(long = "shadow-gate")]
        shadow_gates: Vec<String>,
    },
    /// Show one rollout, or all.
    Status {
        /// Rollout id (all when absent).
        id: Option<String>,
    },
    /// Hold the canary's weight.
    Pause(Id),
    /// Continue a paused rollout.
    Resume(Id),
    /// Remove the canary now.
    Abort(Id),
    /// Promote the candidate now.
    Promote(Id),
}

/// Which rollout.
#[derive(clap::Args, Debug)]
pub struct Id {
    /// Rollout id.
    pub id: String,
}

fn status_json(r: &pb::Rollout) -> serde_json::Value {
    serde_json::from_str(&r.status_json).unwrap_or_else(|_| {
        serde_json::json!({"id": r.id, "model": r.model, "phase": r.phase, "weight": r.weight_percent, "reason": r.reason})
    })
}

/// Runs one rollout command and prints its JSON result.
pub async fn run(args: RolloutArgs) -> anyhow::Result<()> {
    let mut client = args.admin.connect().await?;
    let reason = args.reason.unwrap_or_default();
    let status = super::models::rpc_error;
    let out = match args.command {
        RolloutCommand::Start {
            model,
            candidate,
            steps,
            interval,
            warmup,
            gates,
            min_samples,
            failure_limit,
            successes_per_step,
            on_inconclusive,
            dry_run,
            sticky_key,
            shadow_gates,
        } => {
            let r = client
                .start_rollout(pb::StartRolloutRequest {
                    model,
                    candidate,
                    steps,
                    interval_seconds: Some(interval),
                    warmup_seconds: warmup,
                    gates,
                    min_samples,
                    failure_limit,
                    successes_per_step,
                    on_inconclusive,
                    dry_run,
                    reason: reason.clone(),
                    sticky_key,
                    shadow_gates,
                })
                .await
                .map_err(status)?;
            status_json(r.get_ref())
        }
        RolloutCommand::Status { id: Some(id) } => {
            let r = client
                .get_rollout(pb::GetRolloutRequest { id })
                .await
                .map_err(status)?;
            status_json(r.get_ref())
        }
        RolloutCommand::Status { id: None } => {
            let r = client
                .list_rollouts(pb::ListRolloutsRequest {})
                .await
                .map_err(status)?;
            serde_json::json!({"rollouts": r.get_ref().rollouts.iter().map(status_json).collect::<Vec<_>>()})
        }
        RolloutCommand::Pause(Id { id }) => command(&mut client, id, "pause", reason).await?,
        RolloutCommand::Resume(Id { id }) => command(&mut client, id, "resume", reason).await?,
        RolloutCommand::Abort(Id { id }) => command(&mut client, id, "abort", reason).await?,
        RolloutCommand::Promote(Id { id }) => command(&mut client, id, "promote", reason).await?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn command(
    client: &mut pb::admin_client::AdminClient<
        tonic::codegen::InterceptedService<tonic::transport::Channel, super::models::Auth>,
    >,
    id: String,
    action: &str,
    reason: String,
) -> anyhow::Result<serde_json::Value> {
    let r = client
        .command_rollout(pb::CommandRolloutRequest {
            id,
            action: action.into(),
            reason,
        })
        .await
        .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))?;
    Ok(status_json(r.get_ref()))
}
