//! `keel budgets set|show`: budgets per scope, principal or session over a window.

use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;

use clap::Subcommand;
use keel_app::Caller;
use keel_app::kernel::{DEFAULT_SCOPE, open_kernel, parse_id};
use keel_app::ledger::{BudgetRequest, budget_report, delete_budget, set_budget, window_name};
use keel_kernel::ledger::{BudgetLimits, BudgetStatus, BudgetWindow, ExceedStrategy};
use rust_decimal::Decimal;

use crate::output::{CliResult, print_json, sanitize_line};

/// `keel budgets ...`.
#[derive(Debug, Subcommand)]
pub enum BudgetsCommand {
    /// Create a budget, or replace the one with the same scope, principal, session and window.
    Set {
        /// Scope (tenant).
        #[arg(long)]
        scope: String,
        /// Only usage by this principal counts (and only its calls are checked).
        #[arg(long)]
        principal: Option<String>,
        /// Only usage in this session counts.
        #[arg(long)]
        session: Option<String>,
        /// Window: request (each call on its own), daily, monthly (UTC) or total.
        #[arg(long, value_parser = parse_window)]
        window: BudgetWindow,
        /// Token limit.
        #[arg(long)]
        max_tokens: Option<u64>,
        /// Cost limit (decimal, e.g. 12.50; at most 9 decimal places).
        #[arg(long, value_parser = parse_decimal)]
        max_cost: Option<Decimal>,
        /// Model request limit.
        #[arg(long)]
        max_requests: Option<u64>,
        /// Tool call limit.
        #[arg(long)]
        max_tool_calls: Option<u64>,
        /// Warn once usage reaches this fraction of a limit.
        #[arg(long, default_value = "0.8", value_parser = parse_decimal)]
        warn_at: Decimal,
        /// What happens past a limit: warn, deny or degrade.
        #[arg(long, default_value = "deny", value_parser = parse_strategy)]
        on_exceed: ExceedStrategy,
        /// Name for humans (default: derived from the subject and window).
        #[arg(long)]
        name: Option<String>,
        /// Print the budget as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a budget (by the id `budgets show` prints).
    Remove {
        /// Budget id.
        id: String,
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Print the removed budget as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the budgets of a scope with their usage in the current window.
    Show {
        /// Scope (tenant).
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parse a window: `request` (or `per_request`), `daily`, `monthly`, `total`.
pub fn parse_window(s: &str) -> Result<BudgetWindow, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "request" | "per_request" | "per-request" => Ok(BudgetWindow::PerRequest),
        other => other
            .parse::<BudgetWindow>()
            .map_err(|_| format!("unknown window {s:?} (one of request, daily, monthly, total)")),
    }
}

fn parse_strategy(s: &str) -> Result<ExceedStrategy, String> {
    s.trim()
        .to_ascii_lowercase()
        .parse::<ExceedStrategy>()
        .map_err(|_| format!("unknown strategy {s:?} (one of warn, deny, degrade)"))
}

fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let d = Decimal::from_str(s.trim()).map_err(|_| format!("{s:?} is not a decimal number"))?;
    if d.is_sign_negative() {
        return Err(format!("{s:?} is negative"));
    }
    Ok(d)
}

/// Run a `keel budgets` command.
pub async fn run(home: &Path, cmd: BudgetsCommand) -> CliResult {
    match cmd {
        BudgetsCommand::Set {
            scope,
            principal,
            session,
            window,
            max_tokens,
            max_cost,
            max_requests,
            max_tool_calls,
            warn_at,
            on_exceed,
            name,
            json,
        } => {
            let request = BudgetRequest {
                principal,
                session,
                window,
                limits: BudgetLimits {
                    max_tokens,
                    max_cost,
                    max_requests,
                    max_tool_calls,
                },
                warn_at,
                on_exceed,
                name,
            };
            let kernel = open_kernel(home).await?;
            let budget = set_budget(&kernel, &Caller::local_admin(scope), request).await?;
            if json {
                print_json(&budget);
            } else {
                println!(
                    "budget {} set: {} ({})",
                    budget.name,
                    describe_limits(&budget.limits),
                    budget.strategy
                );
            }
        }
        BudgetsCommand::Remove { id, scope, json } => {
            let id = parse_id("budget", &id)?;
            let kernel = open_kernel(home).await?;
            let budget = delete_budget(&kernel, &Caller::local_admin(scope), id).await?;
            if json {
                print_json(&budget);
            } else {
                println!("removed budget {} [{id}]", budget.name);
            }
        }
        BudgetsCommand::Show { scope, json } => {
            let kernel = open_kernel(home).await?;
            let report = budget_report(&kernel, &Caller::local_admin(&scope)).await?;
            if json {
                print_json(&report);
            } else if report.is_empty() {
                println!("no budgets in scope {scope}");
            } else {
                for status in &report {
                    print_status(status);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_limits(l: &BudgetLimits) -> String {
    let mut parts = Vec::new();
    if let Some(t) = l.max_tokens {
        parts.push(format!("{t} tokens"));
    }
    if let Some(c) = l.max_cost {
        parts.push(format!("cost {c}"));
    }
    if let Some(r) = l.max_requests {
        parts.push(format!("{r} requests"));
    }
    if let Some(t) = l.max_tool_calls {
        parts.push(format!("{t} tool calls"));
    }
    parts.join(", ")
}

fn print_status(status: &BudgetStatus) {
    let b = &status.budget;
    // A budget set through the API names its subject in a tenant's words.
    let mut subject = format!("scope {}", sanitize_line(&b.tenant));
    if let Some(p) = &b.principal {
        subject.push_str(&format!(", principal {}", sanitize_line(p)));
    }
    if let Some(s) = &b.session {
        subject.push_str(&format!(", session {}", sanitize_line(s)));
    }
    println!(
        "{} [{}] {} window, on exceed {}, warn at {}% ({})",
        sanitize_line(&b.name),
        b.id,
        window_name(b.window),
        b.strategy,
        (b.warn_ratio * Decimal::from(100)).normalize(),
        subject
    );
    let u = &status.used;
    let rows: [(&str, Option<Decimal>, Decimal); 4] = [
        (
            "tokens",
            b.limits.max_tokens.map(Decimal::from),
            Decimal::from(u.tokens),
        ),
        ("cost", b.limits.max_cost, u.cost),
        (
            "requests",
            b.limits.max_requests.map(Decimal::from),
            Decimal::from(u.requests),
        ),
        (
            "tool calls",
            b.limits.max_tool_calls.map(Decimal::from),
            Decimal::from(u.tool_calls),
        ),
    ];
    for (metric, limit, used) in rows {
        let Some(limit) = limit else { continue };
        if b.window == BudgetWindow::PerRequest {
            println!("  {metric:<10}  limit {limit} per request");
        } else {
            let pct = if limit.is_zero() {
                Decimal::ZERO
            } else {
                (used / limit * Decimal::from(100)).round_dp(1)
            };
            println!("  {metric:<10}  {used} of {limit} ({pct}%)");
        }
    }
}
