//! `keel jobs list|show|cancel`: inspect and cancel durable jobs.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use keel_app::Caller;
use keel_app::jobs::{JobQuery, cancel_job, list_jobs, show_job};
use keel_app::kernel::{DEFAULT_SCOPE, open_kernel, parse_id, when};
use keel_kernel::event::RuntimeEvent;
use keel_kernel::job::{Job, JobState};

use crate::output::{CliResult, print_json, sanitize_line};

/// `keel jobs ...`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Only jobs in this state (queued, running, waiting_action, succeeded, failed,
        /// cancelled, timed_out). Repeatable.
        #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
        states: Vec<JobState>,
        /// Only jobs of this principal.
        #[arg(long)]
        principal: Option<String>,
        /// At most this many (0 = all).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a job and its events.
    Show {
        /// Job id.
        id: String,
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow an agent job's events (from the start or `--from SEQ`), resuming it in this process
    /// when no live host runs it.
    Watch(crate::commands::watch::WatchArgs),
    /// Cancel a job, its unfinished child jobs and their pending actions.
    Cancel {
        /// Job id.
        id: String,
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Why (recorded on the job and in its events).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
        /// Print the cancelled job as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parse a job state, case-insensitively (`running`, `WAITING_ACTION`, `waiting-action`).
pub fn parse_state(s: &str) -> Result<JobState, String> {
    let upper = s.trim().to_ascii_uppercase().replace('-', "_");
    upper.parse::<JobState>().map_err(|_| {
        let all: Vec<String> = JobState::ALL
            .iter()
            .map(|st| st.as_str().to_ascii_lowercase())
            .collect();
        format!("unknown job state {s:?} (one of {})", all.join(", "))
    })
}

/// Run a `keel jobs` command.
pub async fn run(home: &Path, cmd: JobsCommand) -> CliResult {
    let kernel = open_kernel(home).await?;
    match cmd {
        JobsCommand::Watch(args) => return crate::commands::watch::watch(home, args).await,
        JobsCommand::List {
            scope,
            states,
            principal,
            limit,
            json,
        } => {
            let query = JobQuery {
                states,
                principal,
                limit: (limit > 0).then_some(limit),
                ..JobQuery::default()
            };
            let jobs = list_jobs(&kernel, &Caller::local_admin(&scope), &query).await?.jobs;
            if json {
                print_json(&jobs);
            } else if jobs.is_empty() {
                println!("no jobs in scope {scope}");
            } else {
                println!("{:<36}  {:<14}  {:<16}  {:>5}  CREATED", "ID", "STATE", "KIND", "PROG");
                for job in &jobs {
                    println!(
                        "{:<36}  {:<14}  {:<16}  {:>4.0}%  {}",
                        job.id,
                        job.state,
                        sanitize_line(&truncate(&job.kind, 16)),
                        job.progress * 100.0,
                        when(Some(job.created_at))
                    );
                }
            }
        }
        JobsCommand::Show { id, scope, json } => {
            let id = parse_id("job", &id)?;
            let view = show_job(&kernel, &Caller::local_admin(scope), id).await?;
            if json {
                print_json(&serde_json::to_value(&view).expect("job view serializes"));
            } else {
                print_job(&view.job);
                println!("events ({}):", view.events.len());
                for event in &view.events {
                    print_event(event);
                }
            }
        }
        JobsCommand::Cancel {
            id,
            scope,
            reason,
            json,
        } => {
            let id = parse_id("job", &id)?;
            let job = cancel_job(&kernel, &Caller::local_admin(scope), id, &reason).await?;
            if json {
                print_json(&job);
            } else {
                println!("cancelled job {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

fn print_job(job: &Job) {
    println!("job {}", job.id);
    // Scope, principal, session and key are a client's words (an API body, an MCP client's name).
    println!("  scope      {}", sanitize_line(&job.tenant));
    println!("  kind       {}", job.kind);
    println!("  state      {}", job.state);
    if let Some(p) = &job.principal {
        println!("  principal  {}", sanitize_line(p));
    }
    if let Some(s) = &job.session {
        println!("  session    {}", sanitize_line(s));
    }
    if let Some(parent) = job.parent_id {
        println!("  parent     {parent}");
    }
    if let Some(key) = &job.idempotency_key {
        println!("  key        {}", sanitize_line(key));
    }
    let message = job
        .progress_message
        .as_deref()
        .map(|m| format!(" ({})", sanitize_line(m)))
        .unwrap_or_default();
    println!("  progress   {:.0}%{message}", job.progress * 100.0);
    println!("  turns      {} ({} tool calls)", job.turns, job.tool_calls);
    println!("  created    {}", when(Some(job.created_at)));
    println!("  started    {}", when(job.started_at));
    println!("  finished   {}", when(job.finished_at));
    if let Some(deadline) = job.deadline {
        println!("  deadline   {}", when(Some(deadline)));
    }
    if let Some(error) = &job.error {
        println!(
            "  error      {}: {}",
            sanitize_line(&error.code),
            sanitize_line(&error.message)
        );
    }
    if let Some(result) = &job.result_ref {
        println!("  result     {}", sanitize_line(result));
    }
}

fn print_event(event: &RuntimeEvent) {
    let data = match &event.data.value() {
        serde_json::Value::Null => String::new(),
        data => {
            let mut s = data.to_string();
            if s.len() > 120 {
                s.truncate(s.floor_char_boundary(119));
                s.push('…');
            }
            s
        }
    };
    println!(
        "  {:>4}  {}  {:<20}  {}",
        event.seq,
        when(Some(event.at)),
        event.event_type,
        sanitize_line(&data)
    );
}
