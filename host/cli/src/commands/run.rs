//! `keel run "PROMPT"`: run an agent job (model → tools → policy → approvals → ledger) and follow it.
//!
//! The job is durable (SQLite, `$KEEL_HOME/keel.db`): this process holds a lease on it while it runs
//! here. If the process dies (or `--detach` is used), the job is picked up by the next `keel` process
//! running a worker: `keel jobs watch ID` (which also follows it) or `keel worker`.
//!
//! Also home of what `keel jobs watch`, `keel worker` and `keel demo` share: [`AgentHost`] (kernel +
//! models + sandboxed tools + policy over one Keel home) and [`follow`] (render events, answer approvals).

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use keel_app::Caller;
use keel_app::actions::{Decision, decide};
use keel_app::events::{JobStreamItem, StreamOptions, job_events};
use keel_app::jobs::RunRequest;
use keel_app::kernel::DEFAULT_SCOPE;
use keel_kernel::ExecutionResult;
use keel_kernel::action::Action;
use keel_kernel::context::CancellationToken;
use keel_kernel::event::{EventType, RuntimeEvent};
use keel_kernel::job::JobState;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::output::{CliError, CliResult, json_text, sanitize, sanitize_line};
pub use keel_app::runtime::{AgentHost, PolicyChoice, agent_error, tool_patterns};

/// `keel run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// What to ask the agent.
    pub prompt: String,
    /// Tools the model may use, comma-separated: a plugin name (all its tools), `plugin/tool`, or a
    /// glob (`fs/*`, `*`).
    #[arg(long, value_delimiter = ',', value_name = "TOOLS")]
    pub tools: Vec<String>,
    /// Model as `provider:model` (providers come from `[models]` in `$KEEL_HOME/config.toml`).
    #[arg(long, default_value = "openai:gpt-4o-mini")]
    pub model: String,
    /// Maximum model turns.
    #[arg(long)]
    pub max_turns: Option<u32>,
    /// Wall-clock limit of the whole job (`90s`, `5m`, `1h`, `500ms`; a bare number is seconds).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Maximum model cost of the job, in the ledger currency (USD), e.g. `0.05`.
    #[arg(long)]
    pub max_cost: Option<Decimal>,
    /// Maximum tool calls of the job.
    #[arg(long)]
    pub max_tool_calls: Option<u64>,
    /// Model to switch to when a budget with the `degrade` strategy is exceeded (`provider:model`).
    #[arg(long)]
    pub degrade_model: Option<String>,
    /// Running again with the same key in the scope attaches to the first job instead of starting another.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Session id ("approve for this session" is remembered per session); default: a new one.
    #[arg(long)]
    pub session: Option<String>,
    /// Principal (user or service) the job runs for.
    #[arg(long)]
    pub principal: Option<String>,
    /// Queue the job, print its id and exit; `keel jobs watch ID` or `keel worker` runs it.
    #[arg(long, conflicts_with = "auto_approve")]
    pub detach: bool,
    #[command(flatten)]
    pub common: AgentArgs,
}

/// Flags shared by `keel run`, `keel jobs watch` and `keel worker`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// Scope (tenant).
    #[arg(long, default_value = DEFAULT_SCOPE)]
    pub scope: String,
    /// Policy file [default: `$KEEL_HOME/policy.toml` if present, else allow everything].
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Approve every approval request at once, with a visible note (for demos and tests).
    #[arg(long)]
    pub auto_approve: bool,
    /// Print events as JSON lines (the last line is `{"type":"result",...}`).
    #[arg(long)]
    pub json: bool,
}

/// Parse `90s`, `5m`, `1h`, `250ms`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n = f64::from_str(num).map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 500ms)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// Run `keel run`.
pub async fn run(home: &Path, args: RunArgs) -> CliResult {
    let patterns = tool_patterns(&args.tools);
    let choice = PolicyChoice::resolve(home, args.common.policy.as_deref())?;
    if let Some(note) = &choice.note {
        eprintln!("note: {}", sanitize_line(note));
    }
    let host = AgentHost::open(home, Some(&patterns), choice).await?;
    let caller = Caller {
        principal: args.principal.clone(),
        ..Caller::local_admin(&args.common.scope)
    };
    let run = RunRequest {
        prompt: args.prompt.clone(),
        tools: args.tools.clone(),
        model: args.model.clone(),
        max_turns: args.max_turns,
        timeout: args.timeout,
        max_cost: args.max_cost,
        max_tool_calls: args.max_tool_calls,
        degrade_model: args.degrade_model.clone(),
        idempotency_key: Some(
            args.idempotency_key
                .clone()
                .unwrap_or_else(|| format!("cli-{}", Uuid::now_v7().simple())),
        ),
        session: Some(
            args.session
                .clone()
                .unwrap_or_else(|| format!("cli-{}", Uuid::now_v7().simple())),
        ),
    };
    // Refuses a model no provider serves (or cannot call) before a job exists.
    let request = host.run_request(&caller, &run)?;
    if args.detach {
        let queued = host.enqueue(&request).await?;
        let id = queued.job_id;
        if args.common.json {
            println!("{}", json!({ "job_id": id, "created": queued.created }));
        } else {
            if !queued.created {
                eprintln!("note: a job with this idempotency key already exists");
            }
            println!("{id}");
            eprintln!("queued; run it and follow it with `keel jobs watch {id}` (or let `keel worker` run it)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let stop = CancellationToken::new();
    let _sweeper = host.kernel.spawn_sweeper(host.poll, stop.clone());
    // Subscribe before starting: the first approval can be created before `follow` runs.
    let tokens = host.rt.issued_tokens();
    let handle = host.start(request).await?;
    let job_id = handle.job_id();
    // If this process's loop stops on a store error (e.g. the database stayed locked), the job is
    // left RUNNING for recovery; nobody else may be running a worker, so resume it here.
    let _keeper = host.keep_running(&args.common.scope, job_id, stop.clone());
    let opts = FollowOptions::from_args(&args.common, 0);
    if !opts.json {
        eprintln!("job {job_id}");
    }
    let code = tokio::select! {
        r = follow(&host, &args.common.scope, job_id, &opts, tokens) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: job {job_id} was left as it is; `keel jobs watch {job_id}` resumes it");
            ExitCode::from(130)
        }
    };
    stop.cancel();
    if code != ExitCode::from(130) {
        // The job ended (maybe by another process): let this process's loop release its holds
        // before exiting, or they would stay held until they expire (it notices within a third
        // of its lease).
        host.wait_released(job_id, Duration::from_secs(10)).await;
    }
    Ok(code)
}

/// How [`follow`] renders and answers.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// JSON lines instead of text.
    pub json: bool,
    /// Approve every approval (with a note).
    pub auto_approve: bool,
    /// Ask on the terminal (stdin and stdout are terminals).
    pub interactive: bool,
    /// Draw a status line on stderr (stderr is a terminal, not JSON).
    pub status_line: bool,
    /// Start after this event sequence number.
    pub from_seq: u64,
    /// Render no events and no result (`keel call` prints its own); approvals are still asked.
    pub quiet: bool,
}

impl FollowOptions {
    /// From the shared flags, detecting terminals.
    pub fn from_args(args: &AgentArgs, from_seq: u64) -> Self {
        let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
        Self {
            json: args.json,
            auto_approve: args.auto_approve,
            interactive: tty && !args.json,
            status_line: !args.json && std::io::stderr().is_terminal(),
            from_seq,
            quiet: false,
        }
    }
}

/// What each line of model text starts with on the terminal. Keel's own lines (`· tool …`, `✓`,
/// `✗`, `? approval required`, `result:`, `usage:`) start in the first column, so text a model
/// writes (or a prompt-injected page makes it write) cannot pass for one of them.
const MODEL_GUTTER: &str = "│ ";

/// `text` (model text, already sanitized) with [`MODEL_GUTTER`] before each of its lines, the
/// cursor being at the start of a line when `at_line_start`. Also returns whether the text leaves
/// the cursor mid-line (a text ending in a newline does not: the next line is Keel's or gets its
/// gutter when more text comes).
fn in_gutter(text: &str, mut at_line_start: bool) -> (String, bool) {
    let mut out = String::with_capacity(text.len() + 2 * MODEL_GUTTER.len());
    for c in text.chars() {
        if at_line_start {
            out.push_str(MODEL_GUTTER);
        }
        out.push(c);
        at_line_start = c == '\n';
    }
    (out, !at_line_start)
}

/// The terminal renderer: event lines on stdout, a status line on stderr.
struct Screen {
    opts: FollowOptions,
    mid_line: bool,
    status_shown: bool,
    turn: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost: Decimal,
    state: String,
}

impl Screen {
    fn clear_status(&mut self) {
        if self.status_shown {
            eprint!("\r\x1b[2K");
            self.status_shown = false;
        }
    }

    fn line(&mut self, text: &str) {
        self.clear_status();
        if self.mid_line {
            println!();
            self.mid_line = false;
        }
        // Event lines carry tool names, tool errors, progress and model text: one line each.
        println!("{}", sanitize_line(text));
    }

    fn note(&mut self, text: &str) {
        self.clear_status();
        if self.mid_line {
            println!();
            self.mid_line = false;
        }
        eprintln!("{}", sanitize(text));
    }

    fn draw_status(&mut self, job_id: Uuid) {
        if !self.opts.status_line || self.mid_line {
            return;
        }
        eprint!(
            "\r\x1b[2K[{}] {} · turn {} · {} in / {} out tokens · ${}",
            &job_id.simple().to_string()[..8],
            self.state,
            self.turn,
            self.input_tokens,
            self.output_tokens,
            self.cost.normalize()
        );
        let _ = std::io::stderr().flush();
        self.status_shown = true;
    }

    fn render(&mut self, e: &RuntimeEvent) {
        let d = &e.data.value();
        let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        match e.event_type {
            EventType::JobStatusChanged | EventType::JobStarted => {
                if let Some(to) = d.get("to").and_then(Value::as_str) {
                    self.state = to.to_ascii_lowercase();
                    if to == JobState::WaitingAction.as_str() {
                        self.line("… waiting for approval");
                    }
                }
            }
            EventType::ModelToken => {
                self.clear_status();
                let (shown, mid_line) = in_gutter(&sanitize(&s("text")), !self.mid_line);
                print!("{shown}");
                let _ = std::io::stdout().flush();
                self.mid_line = mid_line;
            }
            EventType::ModelReasoning => {}
            EventType::ModelDone => {
                self.turn = d["turn"].as_u64().unwrap_or(self.turn);
                let tokens = |k: &str| d["usage"][k].as_u64().unwrap_or(0);
                self.input_tokens = self.input_tokens.saturating_add(tokens("input_tokens"));
                self.output_tokens = self.output_tokens.saturating_add(tokens("output_tokens"));
                if let Ok(c) = serde_json::from_value::<Decimal>(d["usage"]["cost"].clone()) {
                    self.cost += c;
                }
                let calls: Vec<&str> = d["tool_calls"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if !calls.is_empty() {
                    self.line(&format!("· turn {}: the model calls {}", self.turn, calls.join(", ")));
                } else if self.mid_line {
                    println!();
                    self.mid_line = false;
                }
            }
            EventType::ToolStart => self.line(&format!("· {} …", s("tool"))),
            EventType::ToolEnd => self.line(&format!(
                "✓ {} ({} ms)",
                s("tool"),
                d["duration_ms"].as_u64().unwrap_or(0)
            )),
            EventType::ToolError => self.line(&format!("✗ {}: {}", s("tool"), s("message"))),
            EventType::ActionRequired => {
                let req = &d["request"];
                self.line(&format!(
                    "? approval required: {} {} ({})",
                    s("title"),
                    req["arguments"],
                    req["reason"].as_str().unwrap_or("")
                ));
            }
            EventType::ActionResolved => {
                let approved = d["resolution"]["approved"].as_bool();
                let by = d["resolution"]["resolved_by"].as_str().unwrap_or("someone");
                let verdict = match approved {
                    Some(true) => "approved",
                    Some(false) => "denied",
                    None => "answered",
                };
                self.line(&format!("· action {verdict} by {by}"));
            }
            EventType::ActionExpired => self.line("✗ the approval request expired"),
            EventType::ActionCancelled => self.line("· the approval request was withdrawn"),
            EventType::Progress => {
                if let Some(m) = d.get("message").and_then(Value::as_str) {
                    self.line(&format!("· {m}"));
                }
            }
            _ => {}
        }
    }
}

/// Follow job `job_id` of `scope` until it ends: print its events (or JSON lines), answer its
/// approvals as `opts` says, then print the result and usage. Reads the store, so events written by
/// any process are seen. The exit code is 0 when the job succeeded, 1 otherwise.
/// `tokens` delivers the resume tokens of approvals this process's loops create, so a human can
/// resolve them from anywhere (`keel actions resolve TOKEN`); approvals created elsewhere are
/// answered by id.
pub async fn follow(
    host: &AgentHost,
    scope: &str,
    job_id: Uuid,
    opts: &FollowOptions,
    tokens: tokio::sync::broadcast::Receiver<keel_kernel::IssuedToken>,
) -> CliResult {
    let result = follow_to_end(host, scope, job_id, opts, tokens).await?;
    print_result(&result, opts.json);
    Ok(if result.status == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Follow a job to its end (rendering its events unless `opts.quiet`, answering approvals as
/// `opts` says) and return its result. The events come from keel-app's job stream
/// ([`job_events`]: stored, then live, no gap, no duplicate); this renders them.
pub async fn follow_to_end(
    host: &AgentHost,
    scope: &str,
    job_id: Uuid,
    opts: &FollowOptions,
    tokens: tokio::sync::broadcast::Receiver<keel_kernel::IssuedToken>,
) -> Result<ExecutionResult, CliError> {
    let options = StreamOptions {
        tokens: Some(tokens),
        ..StreamOptions::after(opts.from_seq, host.poll)
    };
    let mut stream = job_events(&host.kernel, &Caller::local_admin(scope), job_id, options).await?;
    let mut screen = Screen {
        opts: opts.clone(),
        mid_line: false,
        status_shown: false,
        turn: 0,
        input_tokens: 0,
        output_tokens: 0,
        cost: Decimal::ZERO,
        state: "queued".into(),
    };
    loop {
        // The status line is drawn whenever the stream has nothing ready.
        let item = match stream.next().now_or_never() {
            Some(item) => item,
            None => {
                if !opts.quiet {
                    screen.draw_status(job_id);
                }
                stream.next().await
            }
        };
        match item {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(JobStreamItem::Event { event })) => {
                if opts.quiet {
                } else if opts.json {
                    println!("{}", json_text(&json!({ "type": "event", "event": event }), false));
                } else {
                    screen.render(&event);
                }
            }
            Some(Ok(JobStreamItem::Waiting { action, token })) => {
                answer(host, scope, &action, token.as_deref(), opts, &mut screen).await;
            }
        }
    }
    screen.clear_status();
    if screen.mid_line {
        println!();
    }
    let result = host
        .rt
        .attach(scope, job_id)
        .await
        .map_err(agent_error)?
        .snapshot()
        .await
        .map_err(agent_error)?;
    Ok(result)
}

/// Print a job's outcome (text, or one JSON line).
pub fn print_result(result: &ExecutionResult, json_lines: bool) {
    if json_lines {
        println!("{}", json_text(&json!({ "type": "result", "result": result }), false));
        return;
    }
    let u = &result.usage;
    match (&result.status, &result.content, &result.error) {
        (JobState::Succeeded, content, _) => {
            // The first line follows `result: `; the others are marked like streamed model text.
            let (shown, _) = in_gutter(&sanitize(content.as_deref().unwrap_or("")), false);
            println!("\nresult: {shown}");
        }
        (status, _, Some(e)) => println!("\n{status}: {} ({})", sanitize_line(&e.message), sanitize_line(&e.code)),
        (status, _, None) => println!("\n{status}"),
    }
    println!(
        "usage: {} turns, {} model calls, {} input + {} output tokens, ${} cost, {} tool calls",
        result.turns,
        u.model_calls,
        u.input_tokens,
        u.output_tokens,
        u.cost.normalize(),
        u.tool_calls
    );
}

/// Answer (or explain how to answer) `action`, which the job waits for. `token` is its resume
/// token when this process issued it.
async fn answer(
    host: &AgentHost,
    scope: &str,
    action: &Action,
    token: Option<&str>,
    opts: &FollowOptions,
    screen: &mut Screen,
) {
    let id = action.id;
    let tool = action.request["tool"].as_str().unwrap_or("?").to_string();
    let resolution = if opts.auto_approve {
        let say = if opts.json { Screen::note } else { Screen::line };
        say(
            screen,
            &format!(
                "note: auto-approving `{tool}` {} (--auto-approve)",
                action.request["arguments"]
            ),
        );
        Some(Decision {
            approved: true,
            for_session: false,
            value: Value::Null,
            by: Some("keel --auto-approve".into()),
        })
    } else if opts.interactive {
        screen.clear_status();
        prompt(&tool, &action.request).await
    } else {
        let by_token = match token.filter(|_| !stderr_is_a_file()) {
            Some(token) => {
                format!("\n  or with its one-time resume token: keel actions resolve {token} --approve|--deny")
            }
            None => String::new(),
        };
        screen.note(&format!(
            "approval required for `{tool}` (action {id}, expires {}).\n  approve from another shell: keel actions approve {id}{s}\n  deny:                       keel actions deny {id}{s}{by_token}\n  this process keeps waiting.",
            action.expires_at.format("%Y-%m-%d %H:%M:%S UTC"),
            s = if scope == DEFAULT_SCOPE { String::new() } else { format!(" --scope {scope}") },
        ));
        None
    };
    if let Some(decision) = resolution {
        match decide(&host.kernel, &Caller::local_admin(scope), id, decision).await {
            Ok(_) => {}
            // Someone else answered first (another shell, or it expired): the events tell which.
            Err(e) => screen.note(&format!("note: could not answer action {id}: {}", e.message)),
        }
    }
}

/// Whether stderr is a regular file (a log): a resume token is a secret and is never written to a
/// file, so it is shown only on a terminal or a pipe.
fn stderr_is_a_file() -> bool {
    use std::os::fd::AsFd;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| std::fs::File::from(fd).metadata())
        .is_ok_and(|m| m.file_type().is_file())
}

/// Longest argument text an approval prompt shows (a terminal screen or so); past it the prompt
/// says the arguments were cut and where to read them whole.
const MAX_PROMPTED_ARGUMENTS: usize = 2_000;

/// Ask on the terminal: approve / deny / approve for the session.
async fn prompt(tool: &str, request: &Value) -> Option<Decision> {
    let arguments = crate::output::arguments_line(
        &request["arguments"],
        MAX_PROMPTED_ARGUMENTS,
        "`keel actions list --json` shows them all",
    );
    let question =
        format!("Allow `{tool}` with {arguments}? [y]es / [n]o / [s]ession (approve this call for the session): ");
    tokio::task::spawn_blocking(move || {
        loop {
            eprint!("{}", sanitize_line(&question));
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).ok()? == 0 {
                return None;
            }
            let (approved, for_session) = match line.trim().to_ascii_lowercase().as_str() {
                "y" | "yes" => (true, false),
                "n" | "no" => (false, false),
                "s" | "session" => (true, true),
                _ => continue,
            };
            return Some(Decision {
                approved,
                for_session,
                value: Value::Null,
                by: Some("terminal".to_string()),
            });
        }
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::in_gutter;

    #[test]
    fn every_line_of_model_text_is_marked() {
        let (shown, mid_line) = in_gutter("done.\n✓ fs/write (1 ms)\nusage: 0 turns", true);
        assert_eq!(shown, "│ done.\n│ ✓ fs/write (1 ms)\n│ usage: 0 turns");
        assert!(mid_line);
        // Text streamed in pieces: a piece that continues a line gets no second gutter, a line
        // end leaves the cursor at the start of a line, where the next piece puts its gutter.
        assert_eq!(in_gutter("wor", false), ("wor".to_string(), true));
        assert_eq!(in_gutter("ld\n", false), ("ld\n".to_string(), false));
        assert_eq!(in_gutter("\n", true), ("│ \n".to_string(), false));
        assert_eq!(in_gutter("", false), (String::new(), true));
        assert_eq!(in_gutter("", true), (String::new(), false));
    }
}
