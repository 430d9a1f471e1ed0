//! `keel worker`: run detached and orphaned agent jobs of this Keel home.
//!
//! Runs the kernel's recovery sweep (deadlines, expired approvals, stale budget holds) and claims
//! every agent job that no live host holds — queued by `keel run --detach`, left behind by a `keel`
//! process that died, or waiting for an approval that was just answered — and resumes it from its
//! journal. Approvals are not answered here: use `keel actions approve|deny`.
//!
//! Each job runs under the policy recorded with it (its text, pinned by sha256), not the worker's:
//! `--policy` / `$KEEL_HOME/policy.toml` only applies to jobs that recorded none, unless
//! `--override-policy` says to run every job under it.

use std::path::Path;
use std::process::ExitCode;

use keel_kernel::context::CancellationToken;

use crate::commands::run::{AgentArgs, AgentHost, PolicyChoice, agent_error};
use crate::output::CliResult;

/// `keel worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Exit once no job of `--scope` is queued, running or waiting for an approval.
    #[arg(long)]
    until_idle: bool,
    /// Run every job under this worker's policy (`--policy`, else `$KEEL_HOME/policy.toml`, else
    /// allow-all) instead of the policy recorded with the job; each such job gets an event saying so.
    #[arg(long)]
    override_policy: bool,
    /// Run at most this many jobs at once here (default: `[agent] max_concurrent_jobs`, 0 = no
    /// limit); other jobs wait for the next free slot or another worker.
    #[arg(long, value_name = "N")]
    max_jobs: Option<u32>,
    #[command(flatten)]
    common: AgentArgs,
}

/// Run `keel worker`.
pub async fn worker(home: &Path, args: WorkerArgs) -> CliResult {
    if args.common.auto_approve {
        // Said, not ignored: a worker answers no approvals (it runs jobs other people watch).
        return Err(crate::output::CliError::user(
            "keel worker does not answer approvals: --auto-approve applies to `keel run` and `keel jobs watch`; answer with `keel actions approve ID`",
        ));
    }
    let choice = PolicyChoice::resolve(home, args.common.policy.as_deref())?;
    if let Some(note) = &choice.note {
        eprintln!("note: {note}");
    }
    let host = AgentHost::open(home, None, choice).await?;
    if let Some(n) = args.max_jobs {
        host.rt.set_max_concurrent_jobs(n);
    }
    if args.override_policy {
        eprintln!("note: --override-policy: every job runs under this worker's policy, not its own");
        host.rt.override_job_policies(true);
    }
    let stop = CancellationToken::new();
    let worker = host.rt.spawn_worker(stop.clone());
    eprintln!("worker {} running (Ctrl-C to stop)", host.rt.owner());
    let idle = async {
        if !args.until_idle {
            return std::future::pending().await;
        }
        host.wait_idle(&args.common.scope).await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("\nstopping; jobs still running here are resumed by the next worker"),
        _ = idle => {}
    }
    stop.cancel();
    match worker.await {
        Ok(r) => r.map_err(agent_error)?,
        Err(e) => {
            return Err(crate::output::CliError::internal(format!(
                "the worker task failed: {e}"
            )));
        }
    }
    Ok(ExitCode::SUCCESS)
}
