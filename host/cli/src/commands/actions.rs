//! `keel actions list|approve|deny|resolve`: the human side of human-in-the-loop actions.
//!
//! `approve`/`deny` act as a trusted operator by action id (the kernel's tenant-checked
//! `ActionManager::resolve`); `resolve` presents a resume token, exactly as a remote approver would.

use std::path::Path;
use std::process::ExitCode;

use clap::{ArgGroup, Subcommand};
use keel_app::Caller;
use keel_app::actions::{ActionQuery, Decision, TokenAnswer, decide as decide_action, list_actions, resolve_by_token};
use keel_app::kernel::{DEFAULT_SCOPE, open_kernel, parse_id, when};
use keel_kernel::action::{Action, ActionState};
use serde_json::Value;

use crate::output::{CliError, CliResult, print_json, sanitize_line};

/// The most `keel actions resolve -` reads from stdin: a resume token is a few dozen bytes.
const MAX_TOKEN_BYTES: u64 = 4 << 10;

/// `keel actions ...`.
#[derive(Debug, Subcommand)]
pub enum ActionsCommand {
    /// List actions (pending ones unless --all or --state).
    List {
        /// Only the actions of this job.
        #[arg(long)]
        job: Option<String>,
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Only actions in this state (pending, resolved, expired, cancelled). Repeatable.
        #[arg(long = "state", value_name = "STATE", value_parser = parse_action_state, conflicts_with = "all")]
        states: Vec<ActionState>,
        /// Every action, whatever its state.
        #[arg(long)]
        all: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending action by id, as the operator.
    Approve(DecideArgs),
    /// Deny a pending action by id, as the operator.
    Deny(DecideArgs),
    /// Resolve the action a resume token belongs to (`-` reads the token from stdin).
    #[command(group(ArgGroup::new("verdict").args(["approve", "deny"])))]
    Resolve {
        /// The resume token, or `-` to read it from stdin (keeps it out of `ps`).
        token: String,
        /// The answer as JSON (the chosen option, the input, ...).
        #[arg(long)]
        value: Option<String>,
        /// Approve (confirmations and approvals need --approve or --deny).
        #[arg(long)]
        approve: bool,
        /// Deny.
        #[arg(long)]
        deny: bool,
        /// Who is answering (recorded with the resolution).
        #[arg(long)]
        by: Option<String>,
        /// Print the resolved action as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `keel actions approve|deny`.
#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// Action id.
    id: String,
    /// Scope (tenant).
    #[arg(long, default_value = DEFAULT_SCOPE)]
    scope: String,
    /// An answer to record with the decision, as JSON.
    #[arg(long)]
    value: Option<String>,
    /// Who decides (recorded with the resolution).
    #[arg(long, default_value = "operator")]
    by: String,
    /// Also approve the same call for the rest of the job's session (approve only).
    #[arg(long)]
    for_session: bool,
    /// Print the resolved action as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_action_state(s: &str) -> Result<ActionState, String> {
    s.trim().to_ascii_uppercase().parse::<ActionState>().map_err(|_| {
        let all: Vec<String> = ActionState::ALL
            .iter()
            .map(|st| st.as_str().to_ascii_lowercase())
            .collect();
        format!("unknown action state {s:?} (one of {})", all.join(", "))
    })
}

fn parse_value(value: Option<&str>) -> Result<Value, CliError> {
    match value {
        None => Ok(Value::Null),
        Some(text) => serde_json::from_str(text).map_err(|e| CliError::user(format!("--value is not valid JSON: {e}"))),
    }
}

/// Run a `keel actions` command.
pub async fn run(home: &Path, cmd: ActionsCommand) -> CliResult {
    match cmd {
        ActionsCommand::List {
            job,
            scope,
            states,
            all,
            json,
        } => {
            let job_id = job.as_deref().map(|j| parse_id("job", j)).transpose()?;
            let kernel = open_kernel(home).await?;
            let query = ActionQuery {
                job_id,
                states: match (all, states.is_empty()) {
                    (true, _) => vec![],
                    (false, true) => vec![ActionState::Pending],
                    (false, false) => states,
                },
                limit: None,
            };
            let actions = list_actions(&kernel, &Caller::local_admin(&scope), &query).await?;
            if json {
                print_json(&actions);
            } else if actions.is_empty() {
                println!("no matching actions in scope {scope}");
            } else {
                println!(
                    "{:<36}  {:<9}  {:<13}  {:<36}  {:<19}  TITLE",
                    "ID", "STATE", "TYPE", "JOB", "EXPIRES"
                );
                for a in &actions {
                    println!(
                        "{:<36}  {:<9}  {:<13}  {:<36}  {:<19}  {}",
                        a.id,
                        a.state,
                        a.action_type,
                        a.job_id,
                        when(Some(a.expires_at)),
                        sanitize_line(&a.title)
                    );
                    // Two approvals of one tool differ only by their arguments: show them.
                    if let Some(arguments) = call_arguments(a) {
                        println!("    arguments: {arguments}");
                    }
                }
            }
        }
        ActionsCommand::Approve(args) => return decide(home, args, true).await,
        ActionsCommand::Deny(args) => return decide(home, args, false).await,
        ActionsCommand::Resolve {
            token,
            value,
            approve,
            deny,
            by,
            json,
        } => {
            let token = if token == "-" {
                let bytes = keel_app::files::read_bounded(std::io::stdin().lock(), MAX_TOKEN_BYTES).map_err(|e| {
                    CliError::user(format!("cannot read the token from stdin: {e}: not a resume token"))
                })?;
                String::from_utf8(bytes).map_err(|_| CliError::user("the token on stdin is not UTF-8 text"))?
            } else {
                token
            };
            if token.trim().is_empty() {
                return Err(CliError::user("the resume token is empty"));
            }
            let answer = TokenAnswer {
                approved: (approve || deny).then_some(approve),
                value: parse_value(value.as_deref())?,
                by,
            };
            let kernel = open_kernel(home).await?;
            // Whoever holds the token may answer, in any scope of this home.
            let action = resolve_by_token(&kernel, None, &token, answer).await?;
            report(&action, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn decide(home: &Path, args: DecideArgs, approved: bool) -> CliResult {
    let id = parse_id("action", &args.id)?;
    let decision = Decision {
        approved,
        for_session: args.for_session,
        value: parse_value(args.value.as_deref())?,
        by: Some(args.by),
    };
    let kernel = open_kernel(home).await?;
    let action = decide_action(&kernel, &Caller::local_admin(args.scope), id, decision).await?;
    report(&action, args.json);
    Ok(ExitCode::SUCCESS)
}

fn report(action: &Action, json: bool) {
    if json {
        print_json(action);
        return;
    }
    let verdict = match action.resolution.as_ref().and_then(|r| r.approved) {
        Some(true) => "approved",
        Some(false) => "denied",
        None => "resolved",
    };
    println!(
        "{verdict} action {} ({}: {}) of job {}",
        action.id,
        action.action_type,
        sanitize_line(&action.title),
        action.job_id
    );
    if let Some(arguments) = call_arguments(action) {
        println!("  arguments: {arguments}");
    }
}

/// Longest argument text shown on one line; `--json` has all of it.
const MAX_SHOWN_ARGUMENTS: usize = 300;

/// The tool call's arguments as one escaped line, cut (and saying so) past
/// [`MAX_SHOWN_ARGUMENTS`] characters.
fn call_arguments(action: &Action) -> Option<String> {
    let arguments = action.request.get("arguments")?;
    Some(crate::output::arguments_line(
        arguments,
        MAX_SHOWN_ARGUMENTS,
        "--json shows them",
    ))
}
