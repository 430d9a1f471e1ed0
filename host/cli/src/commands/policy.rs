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
use keel_kernel::policy::{
    Decimal, Policy, PolicyDecision, PolicyError, PolicyRequest, PolicySummary, SessionApprovalStore, SessionApprovals,
};
use serde_json::{Value, json};

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
        /// Principal (user or service).
        #[arg(long, default_value = "cli")]
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
            let policy = load(&file)?;
            let approvals = SessionApprovals::new();
            let decision = match (tool.as_deref(), model.as_deref()) {
                (Some(tool), _) => {
                    let arguments: Value = serde_json::from_str(&args)
                        .map_err(|e| CliError::user(format!("--args is not valid JSON: {e}")))?;
                    if session_approved && let Some(session) = &session {
                        approvals.approve_call(session, tool, &arguments);
                    }
                    policy.evaluate_with(
                        &PolicyRequest::Tool {
                            tool,
                            arguments: &arguments,
                            scope: &scope,
                            principal: &principal,
                            session: session.as_deref(),
                            tool_calls_this_turn,
                            turn,
                        },
                        &approvals,
                    )
                }
                (None, Some(model)) => {
                    let estimated_cost = Decimal::from_str(cost.trim())
                        .map_err(|_| CliError::user(format!("--cost `{cost}` is not a decimal amount")))?;
                    policy.evaluate(&PolicyRequest::Model {
                        model,
                        scope: &scope,
                        principal: &principal,
                        max_tokens,
                        estimated_cost,
                        turn,
                    })
                }
                (None, None) => return Err(CliError::user("pass --tool or --model")),
            };
            let target = tool.or(model).unwrap_or_default();
            if json {
                print_json(&decision_json(&file, &target, &decision));
            } else {
                print!("{}", render_decision(&target, &decision));
            }
            Ok(decision_exit_code(&decision))
        }
    }
}

fn check(file: &Path, json: bool) -> CliResult {
    match Policy::load(file) {
        Ok(policy) => {
            let summary = policy.summary();
            if json {
                let mut value = serde_json::to_value(&summary).expect("summary serializes");
                value["valid"] = json!(true);
                value["file"] = json!(file.display().to_string());
                print_json(&value);
            } else {
                print!("{}", render_summary(file, &summary));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) if json => {
            print_json(&error_json(file, &error));
            Ok(ExitCode::from(2))
        }
        Err(error) => Err(CliError::user(error.to_string())),
    }
}

fn load(file: &Path) -> Result<Policy, CliError> {
    Policy::load(file).map_err(|e| match e {
        PolicyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => CliError::user(format!(
            "no policy file at {}; pass --file or create it (see examples/policies/default.toml)",
            file.display()
        )),
        other => CliError::user(other.to_string()),
    })
}

/// 0 when the call may proceed on its own (ALLOW, WARN), else 1.
fn decision_exit_code(decision: &PolicyDecision) -> ExitCode {
    if decision.outcome.is_permitted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `{"valid": false, "file", "line", "column", "message"}` for `check --json`.
fn error_json(file: &Path, error: &PolicyError) -> Value {
    match error {
        PolicyError::Invalid {
            line, column, message, ..
        } => json!({
            "valid": false,
            "file": file.display().to_string(),
            "line": line,
            "column": column,
            "message": message,
            "error": error.to_string(),
        }),
        PolicyError::Io { .. } => json!({
            "valid": false,
            "file": file.display().to_string(),
            "error": error.to_string(),
        }),
    }
}

fn decision_json(file: &Path, target: &str, decision: &PolicyDecision) -> Value {
    let mut value = serde_json::to_value(decision).expect("decision serializes");
    value["target"] = json!(target);
    value["file"] = json!(file.display().to_string());
    value
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
                principal: "cli".into(),
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
    fn error_json_has_line() {
        let err = Policy::from_toml_str("x = 1\n", "p.toml").unwrap_err();
        let v = error_json(Path::new("p.toml"), &err);
        assert_eq!(v["valid"], false);
        assert_eq!(v["line"], 1);
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
