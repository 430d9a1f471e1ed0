//! `keel ledger usage`: summed model and tool usage from the append-only ledger.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use keel_app::Caller;
use keel_app::ledger::{UsageRequest, usage};

use crate::output::{CliResult, print_json};
use keel_app::kernel::{DEFAULT_SCOPE, DayEdge, open_kernel, parse_id, parse_time};

/// `keel ledger ...`.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Summed usage (tokens, cost, model requests, tool calls) of settled calls.
    Usage {
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Only this principal.
        #[arg(long)]
        principal: Option<String>,
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// From this instant (RFC 3339) or the start of this UTC day (2026-11-21).
        #[arg(long)]
        since: Option<String>,
        /// Before this instant (RFC 3339), or through the end of this UTC day (2026-11-21).
        #[arg(long)]
        until: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `keel ledger` command.
pub async fn run(home: &Path, cmd: LedgerCommand) -> CliResult {
    match cmd {
        LedgerCommand::Usage {
            scope,
            principal,
            session,
            job,
            since,
            until,
            json,
        } => {
            let from = since
                .as_deref()
                .map(|s| parse_time("--since", s, DayEdge::Start))
                .transpose()?;
            let to = until
                .as_deref()
                .map(|s| parse_time("--until", s, DayEdge::End))
                .transpose()?;
            let job_id = job.as_deref().map(|j| parse_id("job", j)).transpose()?;
            let request = UsageRequest {
                principal,
                session,
                job_id,
                since: from,
                until: to,
                // Every entry in the range, each tool call's with its receipt (`data.receipt`).
                entries: json,
            };
            let kernel = open_kernel(home).await?;
            let report = usage(&kernel, &Caller::local_admin(&scope), &request).await?;
            let (usage, query) = (&report.usage, &report);
            if json {
                print_json(&serde_json::to_value(&report).expect("usage report serializes"));
            } else {
                let mut subject = format!("scope {scope}");
                if let Some(p) = &query.principal {
                    subject.push_str(&format!(", principal {p}"));
                }
                if let Some(s) = &query.session {
                    subject.push_str(&format!(", session {s}"));
                }
                if let Some(j) = &query.job_id {
                    subject.push_str(&format!(", job {j}"));
                }
                let range = match (report.since, report.until) {
                    (None, None) => "all time".to_string(),
                    (Some(f), None) => format!("since {}", f.to_rfc3339()),
                    (None, Some(t)) => format!("before {}", t.to_rfc3339()),
                    (Some(f), Some(t)) => format!("{} to {}", f.to_rfc3339(), t.to_rfc3339()),
                };
                println!("usage of {subject} ({range}):");
                println!("  tokens      {}", usage.tokens);
                println!("  cost        {}", usage.cost);
                println!("  requests    {}", usage.requests);
                println!("  tool calls  {}", usage.tool_calls);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
