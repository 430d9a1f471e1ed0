//! `keel jobs watch ID`: re-attach to an agent job, follow its events, and resume it in this process
//! when no live host holds its lease (the host that ran it died, or it was started with `--detach`).
//!
//! Resuming goes through the job's idempotency key (`keel run` always sets one), so this process
//! claims exactly that job and no other orphan. The job's recorded policy file is reloaded.

use std::path::Path;
use std::process::ExitCode;

use keel_app::Caller;
use keel_app::jobs::{ResumeNote, get_job, recorded_request};
use keel_app::kernel::parse_id;
use keel_kernel::context::CancellationToken;

use crate::commands::run::{AgentArgs, AgentHost, FollowOptions, PolicyChoice, follow};
use crate::output::{CliError, CliResult, sanitize_line};

/// `keel jobs watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Job id.
    id: String,
    /// Print events after this sequence number only (default: from the first).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    from: u64,
    /// Only follow: never resume the job in this process.
    #[arg(long)]
    no_resume: bool,
    #[command(flatten)]
    common: AgentArgs,
}

/// Run `keel jobs watch`.
pub async fn watch(home: &Path, args: WatchArgs) -> CliResult {
    let id = parse_id("job", &args.id)?;
    let scope = args.common.scope.clone();
    let kernel = keel_app::kernel::open_kernel(home).await?;
    let job = get_job(&kernel, &Caller::local_admin(&scope), id).await?;
    let request = recorded_request(&kernel, &job).await?;
    drop(kernel);
    let resume = !args.no_resume && !job.state.is_terminal() && request.is_some();
    let choice = match &request {
        Some(r) if resume => PolicyChoice::of_job(home, &r.policy, args.common.policy.as_deref())?,
        _ => PolicyChoice::resolve(home, args.common.policy.as_deref())?,
    };
    if resume && let Some(note) = &choice.note {
        eprintln!("note: {}", sanitize_line(note));
    }
    // Only the plugins the job may call are loaded (all of them for a non-agent job).
    let patterns = request.as_ref().map(|r| r.tools.clone());
    let host = AgentHost::open(home, if resume { patterns.as_deref() } else { Some(&[]) }, choice).await?;
    // `--policy` replaces the job's recorded policy (otherwise the kernel applies the recorded one).
    host.rt.override_job_policies(args.common.policy.is_some());
    let tokens = host.rt.issued_tokens();
    let stop = CancellationToken::new();
    if resume {
        let _sweeper = host.kernel.spawn_sweeper(host.poll, stop.clone());
        let request = request.clone().expect("resume implies a request");
        // Keep trying to claim the job: its lease frees up when the dead host's lapses, and a job
        // waiting for approval becomes claimable once someone answers.
        host.resume_when_free(id, request, stop.clone(), move |note| match note {
            ResumeNote::NotYet(why) => eprintln!("note: cannot resume job {id} yet: {}", sanitize_line(&why)),
            ResumeNote::Resumed => eprintln!("note: resumed job {id} in this process"),
        });
    }
    let opts = FollowOptions::from_args(&args.common, args.from);
    if !opts.json {
        eprintln!("job {id} ({})", job.state);
    }
    let code = tokio::select! {
        r = follow(&host, &scope, id, &opts, tokens) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nstopped watching job {id}");
            Ok(ExitCode::from(130))
        }
    };
    stop.cancel();
    code.map_err(|e: CliError| e)
}
