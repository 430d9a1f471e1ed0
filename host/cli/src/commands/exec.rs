//! `keel exec`: run a WASI command component, or (`--lang python|js`) a code step through the
//! installed `python-exec` / `js-exec` plugin as a governed tool call. Output is streamed as it is
//! written; the exit status is the program's (the code's).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use keel_app::exec::{CodeLang, CodeRequest};
use keel_app::home::App;
use keel_app::kernel::DEFAULT_SCOPE;
use keel_app::plugin_types::{Grants, Limits};
use keel_app::runtime::{LimitOverride, PolicyChoice};
use keel_kernel::job::JobState;
use serde_json::Value;

use crate::commands::plugins::{GrantArgs, LimitArgs, read_input};
use crate::output::{CliError, CliResult, sanitize, sanitize_line};

/// `keel exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The WASI command component to run; with `--lang`, the source file of the code.
    file: Option<String>,
    /// Run Python or JavaScript code through the installed `python-exec` / `js-exec` plugin
    /// (a governed tool call: policy, budgets and the ledger apply).
    #[arg(long, value_parser = parse_code_lang)]
    lang: Option<CodeLang>,
    /// With `--lang`: the code to run, instead of a file.
    #[arg(short = 'c', value_name = "CODE", requires = "lang")]
    code: Option<String>,
    /// With `--lang`: pass this process's standard input to the code.
    #[arg(long, short = 'i', requires = "lang")]
    stdin: bool,
    /// With `--lang`: scope (tenant) the call is charged to.
    #[arg(long, default_value = DEFAULT_SCOPE, requires = "lang")]
    scope: String,
    /// With `--lang`: policy file [default: `$KEEL_HOME/policy.toml` if present, else allow everything].
    #[arg(long, value_name = "FILE", requires = "lang")]
    policy: Option<PathBuf>,
    #[command(flatten)]
    grants: GrantArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Arguments passed to the program (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

fn parse_code_lang(s: &str) -> Result<CodeLang, String> {
    match s {
        "python" | "py" => Ok(CodeLang::Python),
        "js" | "javascript" => Ok(CodeLang::Js),
        other => Err(format!("unknown language {other:?} (python, js)")),
    }
}

/// Run `keel exec`.
pub async fn exec(home: &Path, args: ExecArgs) -> CliResult {
    match args.lang {
        Some(lang) => exec_code(home, lang, args).await,
        None => exec_command(home, args).await,
    }
}

/// `keel exec FILE.wasm [-- ARGS]`.
async fn exec_command(home: &Path, args: ExecArgs) -> CliResult {
    let Some(file) = args.file else {
        return Err(CliError::user(
            "nothing to run: pass a WASI command component, or --lang python|js with a FILE or -c CODE",
        ));
    };
    let bytes = read_input(&file)?;
    let app = App::open_for_one_call(home).await?;
    let mut grants = Grants::default();
    args.grants.apply(&app, &mut grants)?;
    let limits = app.limits_over(&Value::Object(args.limits.overrides()))?;
    let program = Path::new(&file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let argv: Vec<String> = std::iter::once(program).chain(args.args).collect();
    // A command's output is its product: streamed as it is written, all of it, never capped.
    let report = app
        .exec_command(
            &bytes,
            &grants,
            &limits,
            &argv,
            shown(tokio::io::stdout(), std::io::stdout().is_terminal()),
            shown(tokio::io::stderr(), std::io::stderr().is_terminal()),
        )
        .await?;
    match report.status {
        Ok(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        Err(error) => Err(CliError::plugin(error.to_string())),
    }
}

/// `keel exec --lang L (FILE | -c CODE)`.
async fn exec_code(home: &Path, lang: CodeLang, args: ExecArgs) -> CliResult {
    let plugin = lang.plugin();
    let code = match (&args.code, &args.file) {
        (Some(code), None) => code.clone(),
        (None, Some(file)) => {
            String::from_utf8(read_input(file)?).map_err(|_| CliError::user(format!("{file} is not UTF-8 text")))?
        }
        (Some(_), Some(_)) => return Err(CliError::user("pass either a FILE or -c CODE, not both")),
        (None, None) => return Err(CliError::user("nothing to run: pass a FILE or -c CODE")),
    };
    if !args.grants.is_empty() {
        return Err(CliError::user(format!(
            "--allow-* flags do not apply to --lang: a code step has the grants of `{plugin}` (`keel plugins grant {plugin} ...`)"
        )));
    }
    if !args.args.is_empty() {
        return Err(CliError::user("arguments after `--` are not passed to --lang code"));
    }
    let stdin = if args.stdin {
        let bytes = read_input("-")?;
        Some(String::from_utf8(bytes).map_err(|_| CliError::user("stdin is not UTF-8 text"))?)
    } else {
        None
    };
    // Flags are checked before anything is opened.
    args.limits.apply(&Limits::default())?;
    let overrides = Value::Object(args.limits.overrides());
    let limits: LimitOverride = Arc::new(move |limits: &Limits| {
        limits
            .overridden_by(&overrides)
            .map_err(|e| format!("invalid limit: {e}"))
    });
    let policy = PolicyChoice::resolve(home, args.policy.as_deref())?;
    if let Some(note) = &policy.note
        && std::io::stderr().is_terminal()
    {
        eprintln!("note: {}", sanitize_line(note));
    }
    let interrupt = crate::output::cancel_on_interrupt()?;
    let request = CodeRequest {
        lang,
        code,
        stdin,
        scope: args.scope,
        principal: None,
        policy,
        limits: Some(limits),
        cancel: interrupt.clone(),
    };
    let outcome = keel_app::exec::run_code(
        home,
        request,
        shown(tokio::io::stdout(), std::io::stdout().is_terminal()),
        shown(tokio::io::stderr(), std::io::stderr().is_terminal()),
    )
    .await?;
    let result = outcome.call.tool_result.as_ref();
    if let (Some(output), Some(status)) = (result.and_then(|r| r.output.as_ref()), outcome.exit_code) {
        if !outcome.streamed {
            // The plugin cannot stream: what the code printed, at the end.
            use std::io::Write;
            let text = |key: &str| output[key].as_str().unwrap_or_default().to_string();
            let on_terminal = |text: String, terminal: bool| {
                if terminal { sanitize(&text).into_owned() } else { text }
            };
            let _ =
                std::io::stdout().write_all(on_terminal(text("stdout"), std::io::stdout().is_terminal()).as_bytes());
            let _ =
                std::io::stderr().write_all(on_terminal(text("stderr"), std::io::stderr().is_terminal()).as_bytes());
            if status != 0
                && let Some(error) = output["error"].as_str()
                && !text("stderr").contains(error)
            {
                eprintln!("{}", sanitize_line(error));
            }
        }
        return Ok(ExitCode::from(status.clamp(0, 255) as u8));
    }
    if interrupt.is_cancelled() && outcome.call.status == JobState::Cancelled {
        eprintln!("\ninterrupted: the code was stopped (job {})", outcome.call.job_id);
        return Ok(ExitCode::from(crate::output::INTERRUPTED));
    }
    // The code did not run to an end: refused (policy, budget, schema) or stopped (deadline, memory).
    let message = match (result.and_then(|r| r.error.as_ref()), &outcome.call.error) {
        (Some(error), _) => error.to_string(),
        (None, Some(e)) => format!("{} ({})", e.message, e.code),
        (None, None) => format!("the call ended {}", outcome.call.status),
    };
    Err(CliError::plugin(format!("{plugin}: {message}")))
}

/// Where sandboxed code's output goes: to a terminal with control characters escaped, to
/// anything else byte for byte.
fn shown<W: tokio::io::AsyncWrite + Send + Sync + Unpin + 'static>(
    writer: W,
    terminal: bool,
) -> Box<dyn tokio::io::AsyncWrite + Send + Sync + Unpin> {
    if terminal {
        Box::new(crate::output::TerminalSafe::new(writer))
    } else {
        Box::new(writer)
    }
}
