//! `keel policy`: validate a policy file, dry-run a decision.
//!
//! The engine lives in `keel_kernel::policy`; this module only parses flags and renders.
//!
//! Exit codes (the CLI's convention): `check` 0 = valid, 2 = unreadable or invalid file.
//! `eval` 0 = ALLOW or WARN, 1 = DENY or REQUIRE_APPROVAL (the call may not proceed on its own;
//! `--json` tells which), 2 = user error (bad file, bad `--args`/`--cost`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use clap::{ArgGroup, Subcommand};
use keel_app::policy::{DryRunRequest, DryRunTarget, PolicyCheck, check_policy, dry_run, load_policy};
use keel_kernel::policy::{Decimal, PolicyDecision, PolicySummary};
use serde_json::Value;

use crate::output::{CliError, CliResult, print_json};

pub use keel_app::runtime::DEFAULT_POLICY_FILE;

/// `keel policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: print a summary of its rules, or the error with its line.
    Check {
        /// The policy TOML file.
        file: PathBuf,
        /// Print JSON (`{"valid": ..., ...}`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Dry-run a decision for one tool or model call and print why.
    #[command(group(ArgGroup::new("target").required(true).args(["tool", "model"])))]
    Eval {
        /// The policy file [default: $KEEL_HOME/policy.toml].
        #[arg(long)]
        file: Option<PathBuf>,
        /// A tool call: `plugin/tool`.
        #[arg(long)]
        tool: Option<String>,
        /// A model call: the model name.
        #[arg(long)]
        model: Option<String>,
        /// Scope (tenant).
        #[arg(long, default_value = "default")]
        scope: String,
        /// Principal (user or service); none by default, as `keel call` and `keel run` without
        /// `--principal`, so the dry run decides what they would.
        #[arg(long, default_value = "")]
        principal: String,
        /// Session id (session approvals are keyed by it).
        #[arg(long)]
        session: Option<String>,
        /// Tool arguments as a JSON object.
        #[arg(long, default_value = "{}", requires = "tool")]
        args: String,
        /// Treat this exact call as already approved for `--session` ("approve for this session").
        #[arg(long, requires_all = ["tool", "session"])]
        session_approved: bool,
        /// Tool calls already made in this turn.
        #[arg(long, default_value_t = 0)]
        tool_calls_this_turn: u32,
        /// 1-based turn number.
        #[arg(long, default_value_t = 1)]
        turn: u32,
        /// A model call's max_tokens.
        #[arg(long, default_value_t = 0, requires = "model")]
        max_tokens: u64,
        /// A model call's estimated cost (decimal, e.g. 0.05).
        #[arg(long, default_value = "0", requires = "model")]
        cost: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `keel policy` command. `home` is the Keel home (for the default policy file).
pub fn run(home: &Path, command: PolicyCommand) -> CliResult {
    match command {
        PolicyCommand::Check { file, json } => check(&file, json),
        PolicyCommand::Eval {
            file,
            tool,
            model,
            scope,
            principal,
            session,
            args,
            session_approved,
            tool_calls_this_turn,
            turn,
            max_tokens,
            cost,
            json,
        } => {
            let file = file.unwrap_or_else(|| home.join(DEFAULT_POLICY_FILE));
            // The file is read first: a missing policy is the first thing to say.
            load_policy(&file)?;
            let target = match (tool, model) {
                (Some(tool), _) => DryRunTarget::Tool {
                    arguments: serde_json::from_str::<Value>(&args)
                        .map_err(|e| CliError::user(format!("--args is not valid JSON: {e}")))?,
                    tool,
                    session_approved,
                },
                (None, Some(model)) => DryRunTarget::Model {
                    model,
                    max_tokens,
                    cost: Decimal::from_str(cost.trim())
                        .map_err(|_| CliError::user(format!("--cost `{cost}` is not a decimal amount")))?,
                },
                (None, None) => return Err(CliError::user("pass --tool or --model")),
            };
            let request = DryRunRequest {
                target,
                scope,
                principal,
                session,
                tool_calls_this_turn,
                turn,
            };
            let outcome = dry_run(&file, &request)?;
            if json {
                print_json(&outcome.to_json());
            } else {
                print!("{}", render_decision(&outcome.target, &outcome.decision));
            }
            Ok(if outcome.permitted() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn check(file: &Path, json: bool) -> CliResult {
    match check_policy(file) {
        PolicyCheck::Valid { summary, .. } if !json => {
            print!("{}", render_summary(file, &summary));
            Ok(ExitCode::SUCCESS)
        }
        PolicyCheck::Invalid { error, .. } if !json => Err(CliError::user(error.to_string())),
        check => {
            print_json(&check.to_json());
            Ok(match check {
                PolicyCheck::Valid { .. } => ExitCode::SUCCESS,
                PolicyCheck::Invalid { .. } => ExitCode::from(2),
            })
        }
    }
}

fn render_summary(file: &Path, summary: &PolicySummary) -> String {
    let count = |kind: &str| summary.rules.iter().filter(|r| r.kind == kind).count();
    let mut out = format!(
        "{}: valid policy (default {}; {} tool rules, {} model rules, {} constraints)\n",
        file.display(),
        serde_json::to_value(summary.default)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        count("tool"),
        count("model"),
        count("constraint"),
    );
    let width = summary.rules.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for rule in &summary.rules {
        let _ = writeln!(
            out,
            "  line {:<4} {:<10} {:<width$}  {}",
            rule.line, rule.kind, rule.name, rule.decision
        );
    }
    out
}

fn render_decision(target: &str, decision: &PolicyDecision) -> String {
    let list = |rules: &[String]| {
        if rules.is_empty() {
            "-".to_owned()
        } else {
            rules.join(", ")
        }
    };
    format!(
        "{} {target}\n  reason:   {}\n  applied:  {}\n  violated: {}\n",
        decision.outcome,
        decision.reason,
        list(&decision.applied_rules),
        list(&decision.violated_rules),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_kernel::policy::{Policy, PolicyRequest};
    use serde_json::json;

    const POLICY: &str = r#"
default = "deny"

[[tool]]
name = "reads"
tools = ["fs/read"]
decision = "allow"

[[model]]
name = "small"
models = ["local/*"]
decision = "allow"
max_tokens = 100
"#;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    fn eval(file: &Path, tool: Option<&str>, model: Option<&str>, max_tokens: u64) -> CliResult {
        run(
            Path::new("/nonexistent"),
            PolicyCommand::Eval {
                file: Some(file.to_owned()),
                tool: tool.map(str::to_owned),
                model: model.map(str::to_owned),
                scope: "default".into(),
                principal: String::new(),
                session: None,
                args: "{}".into(),
                session_approved: false,
                tool_calls_this_turn: 0,
                turn: 1,
                max_tokens,
                cost: "0".into(),
                json: true,
            },
        )
    }

    #[test]
    fn check_valid_and_invalid_files() {
        let good = write(POLICY);
        assert_eq!(check(good.path(), false).unwrap(), ExitCode::SUCCESS);
        let bad = write("[[tool]]\nname = \"a\"\ntoool = 1\n");
        let err = check(bad.path(), false).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.message.contains(":3:1: unknown field `toool`"), "{}", err.message);
        assert_eq!(check(bad.path(), true).unwrap(), ExitCode::from(2));
    }

    #[test]
    fn eval_exit_codes() {
        let good = write(POLICY);
        assert_eq!(eval(good.path(), Some("fs/read"), None, 0).unwrap(), ExitCode::SUCCESS);
        assert_eq!(eval(good.path(), Some("fs/write"), None, 0).unwrap(), ExitCode::from(1));
        assert_eq!(eval(good.path(), None, Some("local/x"), 50).unwrap(), ExitCode::SUCCESS);
        assert_eq!(
            eval(good.path(), None, Some("local/x"), 500).unwrap(),
            ExitCode::from(1)
        );
        let missing = eval(Path::new("/nonexistent/p.toml"), Some("fs/read"), None, 0).unwrap_err();
        assert_eq!(missing.exit_code(), 2);
        assert!(missing.message.contains("no policy file at"), "{}", missing.message);
    }

    #[test]
    fn renders_summary_and_decision() {
        let policy = Policy::from_toml_str(POLICY, "p.toml").unwrap();
        let text = render_summary(Path::new("p.toml"), &policy.summary());
        assert!(
            text.starts_with("p.toml: valid policy (default deny; 1 tool rules, 1 model rules, 0 constraints)"),
            "{text}"
        );
        assert!(text.contains("line 5    tool       reads  ALLOW"), "{text}");
        let args = json!({});
        let decision = policy.evaluate(&PolicyRequest::Tool {
            tool: "fs/write",
            arguments: &args,
            scope: "s",
            principal: "p",
            session: None,
            tool_calls_this_turn: 0,
            turn: 1,
        });
        let text = render_decision("fs/write", &decision);
        assert!(
            text.starts_with("DENY fs/write\n  reason:   no tool rule matches `fs/write`"),
            "{text}"
        );
        assert!(text.contains("violated: default"), "{text}");
    }
}
