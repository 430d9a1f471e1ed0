//! Running code: a WASI command component (`keel exec FILE.wasm`), or a code step in Python or
//! JavaScript (`keel exec --lang python|js`) through the installed `python-exec` / `js-exec`
//! plugin.
//!
//! A code step is a tool call like any other and goes through the kernel's one governed path
//! ([`AgentHost::start_call`]): schema check, policy, approval, budget hold, sandbox, ledger entry
//! with its receipt, events. What it adds is streaming: the plugin is asked to echo what the code
//! prints to its own stdout/stderr, and the sandbox streams those to the caller's writers as they
//! are written (bounded in flight, see `keel_sandbox::STREAM_BUDGET`), so output appears while the
//! code runs.

/// Wait (blocking) until the scratch directories this process made are removed, for at most
/// `within`; `false` if some remain. Call before a one-call process exits.
pub use keel_sandbox::wait_for_scratch_removal;

use std::path::Path;
use std::sync::{Arc, Mutex};

use keel_kernel::registry::PluginRegistry as _;
use keel_sandbox::{ExecReport, Grants, Limits, OutputWriter};
use serde_json::{Value, json};

use crate::call::{CallOutcome, CallRequest};
use crate::error::AppError;
use crate::home::App;
use crate::runtime::{AgentHost, LimitOverride, PolicyChoice};
use crate::tools::StdioSinks;

impl App {
    /// Run a WASI command component (`wasi:cli/run`) with `argv` under `grants` and `limits`,
    /// its stdout and stderr streamed to the writers as it writes them.
    pub async fn exec_command(
        &self,
        wasm: &[u8],
        grants: &Grants,
        limits: &Limits,
        argv: &[String],
        stdout: OutputWriter,
        stderr: OutputWriter,
    ) -> Result<ExecReport, AppError> {
        Ok(self
            .sandbox
            .exec_streaming(wasm, grants, limits, argv, stdout, stderr)
            .await?)
    }
}

/// A language whose code steps run in an exec plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeLang {
    /// CPython, in `python-exec`.
    Python,
    /// JavaScript (SpiderMonkey), in `js-exec`.
    Js,
}

impl CodeLang {
    /// The plugin that runs it.
    pub fn plugin(self) -> &'static str {
        match self {
            CodeLang::Python => "python-exec",
            CodeLang::Js => "js-exec",
        }
    }

    /// The tool called: `plugin/run`.
    pub fn tool(self) -> String {
        format!("{}/run", self.plugin())
    }

    /// Whether the plugin can echo the code's output to its own stdout/stderr (the `echo`
    /// argument), which is what makes the output stream. Both first-party plugins can.
    pub fn streams(self) -> bool {
        matches!(self, CodeLang::Python | CodeLang::Js)
    }

    /// The exact commands that build and install the plugin from a Keel checkout.
    pub fn install_hint(self) -> String {
        let plugin = self.plugin();
        format!(
            "`{plugin}` is not installed; from a Keel checkout: `keel build plugins/{plugin} -o {plugin}.wasm && keel install {plugin}.wasm --allow-write SCRATCH_DIR::/scratch`"
        )
    }
}

/// One code step.
pub struct CodeRequest {
    /// The language.
    pub lang: CodeLang,
    /// The source.
    pub code: String,
    /// What the code reads from standard input.
    pub stdin: Option<String>,
    /// Scope (tenant) charged and checked.
    pub scope: String,
    /// On whose behalf.
    pub principal: Option<String>,
    /// Policy the call runs under.
    pub policy: PolicyChoice,
    /// Limit changes for this call (e.g. `--timeout-ms`).
    pub limits: Option<LimitOverride>,
    /// Cancelling it stops the code (e.g. Ctrl-C): its job ends CANCELLED, the attempt charged.
    pub cancel: keel_kernel::context::CancellationToken,
}

/// What a code step came to.
pub struct CodeOutcome {
    /// The governed call's outcome (job, receipt, output or error).
    pub call: CallOutcome,
    /// Whether the output was streamed to the writers (else it is only in the tool's output).
    pub streamed: bool,
    /// The code's exit status when it ran: 0, `sys.exit(n)`'s n, 1 for an uncaught error.
    pub exit_code: Option<i32>,
}

/// The code's exit status from the exec plugin's output.
fn exit_code(output: &Value) -> i32 {
    match output.get("exit_code").and_then(Value::as_i64) {
        Some(code) => i32::try_from(code).unwrap_or(1),
        None if output.get("error").is_some_and(|e| !e.is_null()) => 1,
        None => 0,
    }
}

/// Run `request` through the installed exec plugin, streaming what the code prints to `stdout`
/// and `stderr`. A plugin that is not installed is a user error naming the install commands.
pub async fn run_code(
    home: &Path,
    request: CodeRequest,
    stdout: OutputWriter,
    stderr: OutputWriter,
) -> Result<CodeOutcome, AppError> {
    let lang = request.lang;
    let tool = lang.tool();
    let app = Arc::new(App::open_for_one_call(home).await?);
    // Limit flags against this home's ceiling, before the step's job exists.
    if let Some(change) = &request.limits {
        app.settable_limits(change(&app.config.limits).map_err(AppError::user)?)?;
    }
    if app.db.get_plugin(lang.plugin()).await?.is_none() {
        return Err(AppError::user(lang.install_hint()));
    }
    // The writers go to the first call of this host: the one call it makes.
    let writers = Arc::new(Mutex::new(Some((stdout, stderr))));
    let sinks: StdioSinks = {
        let tool = tool.clone();
        Arc::new(move |_ctx, called| {
            if called != tool {
                return None;
            }
            writers.lock().expect("writers lock").take()
        })
    };
    let streams = lang.streams();
    let patterns = [tool.clone()];
    let host = AgentHost::open_app_with_stdio(
        app,
        Some(&patterns),
        request.policy,
        request.limits,
        false,
        streams.then_some(sinks),
    )
    .await?;
    host.check_tool(&tool).await?;
    let mut arguments = json!({ "code": request.code });
    if let Some(stdin) = request.stdin {
        arguments["stdin"] = json!(stdin);
    }
    if streams {
        arguments["echo"] = json!(true);
    }
    let mut call = CallRequest::new(request.scope, tool, arguments);
    call.principal = request.principal;
    call.session = Some(format!("exec-{}", uuid::Uuid::now_v7().simple()));
    call.cancel = request.cancel;
    let outcome = host.call(&call).await?;
    let exit_code = outcome
        .tool_result
        .as_ref()
        .and_then(|r| r.output.as_ref())
        .map(exit_code);
    Ok(CodeOutcome {
        call: outcome,
        streamed: streams,
        exit_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_comes_from_the_plugin_output() {
        assert_eq!(exit_code(&json!({"exit_code": 3, "error": "SystemExit: 3"})), 3);
        assert_eq!(exit_code(&json!({"exit_code": 0})), 0);
        // A plugin without `exit_code` (an older js-exec): an uncaught error is 1.
        assert_eq!(exit_code(&json!({"error": "TypeError: x"})), 1);
        assert_eq!(exit_code(&json!({"error": null, "stdout": ""})), 0);
    }
}
