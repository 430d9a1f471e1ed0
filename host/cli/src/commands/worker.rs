//! `keel worker`: run detached and orphaned agent jobs of this Keel home.
//!
//! Runs the kernel's recovery sweep (deadlines, expired approvals, stale budget holds) and claims
//! every agent job that no live host holds — queued by `keel run --detach`, left behind by a `keel`
//! process that died, or waiting for an approval that was just answered — and resumes it from its
//! journal. Approvals are not answered here: use `keel actions approve|deny`.

use std::path::Path;
use std::process::ExitCode;

use keel_kernel::context::CancellationToken;
use keel_kernel::job::{JobFilter, JobState};

use crate::commands::run::{AgentArgs, AgentHost, PolicyChoice, agent_error};
use crate::output::CliResult;

/// `keel worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Exit once no job of `--scope` is queued, running or waiting for an approval.
    #[arg(long)]
    until_idle: bool,
    #[command(flatten)]
    common: AgentArgs,
}

/// Run `keel worker`.
pub async fn worker(home: &Path, args: WorkerArgs) -> CliResult {
    let choice = PolicyChoice::resolve(home, args.common.policy.as_deref())?;
    if let Some(note) = &choice.note {
        eprintln!("note: {note}");
    }
    let host = AgentHost::open(home, None, choice).await?;
    let stop = CancellationToken::new();
    let worker = host.rt.spawn_worker(stop.clone());
    eprintln!("worker {} running (Ctrl-C to stop)", host.rt.owner());
    let idle = async {
        if !args.until_idle {
            return std::future::pending().await;
        }
        let filter = JobFilter {
            states: vec![JobState::Queued, JobState::Running, JobState::WaitingAction],
            ..JobFilter::tenant(args.common.scope.clone())
        };
        loop {
            tokio::time::sleep(host.poll).await;
            if matches!(host.kernel.jobs().count(&filter).await, Ok(0)) && host.rt.running_jobs().is_empty() {
                return;
            }
        }
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
