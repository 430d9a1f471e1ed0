//! `keel budgets set|show`: budgets per scope, principal or session over a window.

use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;

use clap::Subcommand;
use keel_kernel::ledger::{Budget, BudgetLimits, BudgetStatus, BudgetWindow, ExceedStrategy};
use rust_decimal::Decimal;

use crate::output::{CliError, CliResult, print_json};
use keel_app::kernel::{DEFAULT_SCOPE, open_kernel, parse_id};

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

fn window_name(w: BudgetWindow) -> &'static str {
    match w {
        BudgetWindow::PerRequest => "request",
        other => other.as_str(),
    }
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
            let limits = BudgetLimits {
                max_tokens,
                max_cost,
                max_requests,
                max_tool_calls,
            };
            if limits == BudgetLimits::default() {
                return Err(CliError::user(
                    "a budget needs at least one of --max-tokens, --max-cost, --max-requests, --max-tool-calls",
                ));
            }
            if warn_at.is_zero() || warn_at > Decimal::ONE {
                return Err(CliError::user(format!("--warn-at {warn_at} must be in (0, 1]")));
            }
            if scope.trim().is_empty() {
                return Err(CliError::user("--scope must not be empty"));
            }
            let kernel = open_kernel(home).await?;
            // "set" is idempotent per subject and window: replace rather than stack budgets.
            let existing = kernel
                .ledger()
                .budgets(&scope)
                .await?
                .into_iter()
                .find(|b| b.principal == principal && b.session == session && b.window == window);
            let mut budget = existing.unwrap_or_else(|| Budget::new(scope.clone(), String::new(), window));
            budget.name = name.unwrap_or_else(|| {
                let subject = match (&principal, &session) {
                    (Some(p), Some(s)) => format!("{p}@{s}"),
                    (Some(p), None) => p.clone(),
                    (None, Some(s)) => format!("session {s}"),
                    (None, None) => scope.clone(),
                };
                format!("{subject} {}", window_name(window))
            });
            budget.principal = principal;
            budget.session = session;
            budget.limits = limits;
            budget.warn_ratio = warn_at;
            budget.strategy = on_exceed;
            kernel.ledger().put_budget(budget.clone()).await?;
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
            // The store deletes by bare id: check the scope first so scopes stay isolated.
            let budget = kernel
                .ledger()
                .budgets(&scope)
                .await?
                .into_iter()
                .find(|b| b.id == id)
                .ok_or_else(|| CliError::user(format!("budget {id} not found in scope {scope}")))?;
            kernel.ledger().delete_budget(id).await?;
            if json {
                print_json(&budget);
            } else {
                println!("removed budget {} [{id}]", budget.name);
            }
        }
        BudgetsCommand::Show { scope, json } => {
            let kernel = open_kernel(home).await?;
            let report = kernel.ledger().budget_report(&scope).await?;
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
    let mut subject = format!("scope {}", b.tenant);
    if let Some(p) = &b.principal {
        subject.push_str(&format!(", principal {p}"));
    }
    if let Some(s) = &b.session {
        subject.push_str(&format!(", session {s}"));
    }
    println!(
        "{} [{}] {} window, on exceed {}, warn at {}% ({})",
        b.name,
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
