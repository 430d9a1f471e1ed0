//! `keel-debug churn|recover|check`: drive the durable kernel hard, recover it, and check its
//! invariants. The crash-safety test (`tests/crash.rs`) SIGKILLs `churn` at random points and then
//! runs `recover` and `check` on the same SQLite file; the soak test checks with it too.
//!
//! Test machinery, not part of Keel: this binary is built only with the `testing` feature, which
//! the package's own tests enable (a dev-dependency of `keel` on itself) and release builds do not.
//! The shipped `keel` has no such command.
//!
//! `churn` reports what it committed on stdout, strictly after the commit returned, one flushed
//! line each:
//! - `created KEY JOB_ID` per new job;
//! - `token ACTION_ID TOKEN` per new action. Resume tokens are secrets: they go to the test
//!   reading the pipe, never to a file. `check --tokens` reads `ACTION_ID TOKEN` lines back on
//!   stdin and verifies that each still names its action.
//!
//! A line that was printed names state that must survive; a commit whose line was never printed
//! may or may not be there.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use chrono::Duration;
use clap::{Parser, Subcommand};
use keel_kernel::action::{ActionFilter, ActionState, ActionType, NewAction, Resolution, ToolCallRef, hash_token};
use keel_kernel::event::{EventFilter, EventQuery, EventType};
use keel_kernel::job::{JobError, JobFilter, JobState, NewJob};
use keel_kernel::ledger::{
    Budget, BudgetLimits, BudgetWindow, ExceedStrategy, LedgerKind, LedgerQuery, ReservationState, Usage, UsageQuery,
};
use keel_kernel::services::{HoldRequest, SettleDetails};
use keel_kernel::{Kernel, KernelError};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

/// A failed command: one sentence on stderr, exit 3.
#[derive(Debug)]
struct CliError {
    message: String,
}

impl CliError {
    fn internal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl From<KernelError> for CliError {
    fn from(error: KernelError) -> Self {
        Self::internal(error.to_string())
    }
}

type CliResult = Result<ExitCode, CliError>;

fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

/// `keel-debug`: kernel stress and invariant tools for Keel's tests.
#[derive(Debug, Parser)]
#[command(name = "keel-debug")]
struct Cli {
    /// Keel home directory (its `keel.db` is used).
    #[arg(long, env = "KEEL_HOME")]
    home: PathBuf,
    #[command(subcommand)]
    command: DebugCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(&cli.home, cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error.message);
            ExitCode::from(3)
        }
    }
}

/// Open (creating if needed) `home/keel.db` and the kernel over it.
async fn open_kernel(home: &Path) -> Result<Kernel, CliError> {
    keel_app::kernel::open_kernel(home)
        .await
        .map_err(|e| CliError::internal(e.message))
}

/// Scope `churn` works in unless told otherwise.
const CHURN_SCOPE: &str = "churn";
/// Name of the total-window budget `churn` reserves against.
const TOTAL_BUDGET: &str = "churn total";
/// Name of the per-request budget `churn` reserves against (denies the largest requests).
const REQUEST_BUDGET: &str = "churn per request";
/// Hold lifetime used by `churn`: short, so `recover --advance-secs 60` releases every hold.
const HOLD_TTL_SECS: i64 = 20;
/// Short action lifetime (expired by `recover --advance-secs 60`) and long one (survives it).
const SHORT_ACTION_TTL_SECS: i64 = 30;
const LONG_ACTION_TTL_SECS: i64 = 3600;
/// Deadline of the jobs `churn` gives one (timed out by `recover --advance-secs 60`).
const JOB_DEADLINE_SECS: i64 = 30;

/// `keel-debug ...`.
#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// Loop random job / ledger / action operations against the kernel.
    Churn {
        /// Scope (tenant).
        #[arg(long, default_value = CHURN_SCOPE)]
        scope: String,
        /// Random seed (also makes idempotency keys unique per seed).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Operations per worker.
        #[arg(long, default_value_t = 1000)]
        ops: u64,
        /// Concurrent workers.
        #[arg(long, default_value_t = 2)]
        workers: u32,
    },
    /// Run the recovery sweep, as at start-up, optionally as if `--advance-secs` had passed.
    Recover {
        /// Pretend the clock is this many seconds ahead (releases holds, expires actions early).
        #[arg(long, default_value_t = 0)]
        advance_secs: i64,
        /// Print the sweep report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the kernel's invariants on the stored state; exit 1 on any violation.
    Check {
        /// Scope (tenant).
        #[arg(long, default_value = CHURN_SCOPE)]
        scope: String,
        /// A recovery sweep (with enough advance) has run: no hold may still be held, no
        /// pending action or unfinished job may be past its expiry or deadline.
        #[arg(long)]
        recovered: bool,
        /// Read `ACTION_ID TOKEN` lines (tokens `churn` printed) from stdin and check that each
        /// token still names its action.
        #[arg(long)]
        tokens: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run a `keel-debug` command.
async fn run(home: &Path, cmd: DebugCommand) -> CliResult {
    let kernel = open_kernel(home).await?;
    match cmd {
        DebugCommand::Churn {
            scope,
            seed,
            ops,
            workers,
        } => churn(&kernel, &scope, seed, ops, workers).await,
        DebugCommand::Recover { advance_secs, json } => {
            let now = kernel.clock().now() + Duration::seconds(advance_secs);
            let report = kernel.recover_and_sweep(now).await?;
            if json {
                print_json(&json!({ "now": now, "report": report }));
            } else {
                println!(
                    "recovered: {} jobs timed out, {} actions expired, {} holds released",
                    report.jobs_timed_out, report.actions_expired, report.reservations_released
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DebugCommand::Check {
            scope,
            recovered,
            tokens,
            json,
        } => {
            let tokens = if tokens {
                read_tokens(std::io::stdin().lock())?
            } else {
                Vec::new()
            };
            let report = check(&kernel, &scope, recovered, &tokens).await?;
            if json {
                print_json(&report);
            } else {
                println!(
                    "{} jobs, {} actions, {} reservations, {} tokens: {} violations",
                    report.jobs,
                    report.actions,
                    report.reservations.values().sum::<usize>(),
                    report.tokens.values().sum::<usize>(),
                    report.violations.len()
                );
                for v in &report.violations {
                    println!("violation: {v}");
                }
            }
            Ok(if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

// ---- churn ----

/// splitmix64: tiny, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn take<T>(&mut self, v: &mut Vec<T>) -> Option<T> {
        if v.is_empty() {
            return None;
        }
        let i = self.below(v.len() as u64) as usize;
        Some(v.swap_remove(i))
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            return None;
        }
        Some(v[self.below(v.len() as u64) as usize].clone())
    }
}

/// Where `churn` reports committed state: stdout, one flushed line per fact.
struct Reporter {
    stdout: Mutex<std::io::Stdout>,
}

impl Reporter {
    fn line(&self, line: String) -> Result<(), CliError> {
        let mut out = self.stdout.lock().unwrap_or_else(|e| e.into_inner());
        // One write call per line: a kill leaves at most a torn last line, which readers drop.
        out.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| CliError::internal(format!("cannot write to stdout: {e}")))
    }

    fn job(&self, key: &str, id: Uuid) -> Result<(), CliError> {
        self.line(format!("created {key} {id}"))
    }

    fn token(&self, action: Uuid, token: &str) -> Result<(), CliError> {
        self.line(format!("token {action} {token}"))
    }
}

async fn ensure_budgets(kernel: &Kernel, scope: &str) -> Result<(), CliError> {
    let existing = kernel.ledger().budgets(scope).await?;
    if !existing.iter().any(|b| b.name == TOTAL_BUDGET) {
        let mut total = Budget::new(scope, TOTAL_BUDGET, BudgetWindow::Total);
        total.limits = BudgetLimits {
            max_tokens: Some(3_000_000),
            ..BudgetLimits::default()
        };
        total.strategy = ExceedStrategy::Deny;
        kernel.ledger().put_budget(total).await?;
    }
    if !existing.iter().any(|b| b.name == REQUEST_BUDGET) {
        let mut per_request = Budget::new(scope, REQUEST_BUDGET, BudgetWindow::PerRequest);
        per_request.limits = BudgetLimits {
            max_tokens: Some(900),
            ..BudgetLimits::default()
        };
        per_request.strategy = ExceedStrategy::Deny;
        kernel.ledger().put_budget(per_request).await?;
    }
    Ok(())
}

async fn churn(kernel: &Kernel, scope: &str, seed: u64, ops: u64, workers: u32) -> CliResult {
    ensure_budgets(kernel, scope).await?;
    let reporter = Arc::new(Reporter {
        stdout: Mutex::new(std::io::stdout()),
    });
    let mut tasks = Vec::new();
    for w in 0..workers.max(1) {
        let worker = Worker {
            kernel: kernel.clone(),
            scope: scope.to_string(),
            prefix: format!("s{seed}w{w}"),
            rng: Rng(seed.wrapping_mul(1_000_003).wrapping_add(u64::from(w))),
            reporter: reporter.clone(),
            keys: Vec::new(),
            queued: Vec::new(),
            running: Vec::new(),
            waiting: Vec::new(),
            holds: Vec::new(),
            next: 0,
        };
        tasks.push(tokio::spawn(worker.run(ops)));
    }
    let mut stats = Stats::default();
    for task in tasks {
        let s = task
            .await
            .map_err(|e| CliError::internal(format!("a churn worker panicked: {e}")))??;
        stats.add(&s);
    }
    print_json(&stats);
    Ok(ExitCode::SUCCESS)
}

/// What a churn run did.
#[derive(Debug, Default, Serialize)]
struct Stats {
    jobs_created: u64,
    keys_reused: u64,
    actions_created: u64,
    actions_resolved: u64,
    holds: u64,
    holds_denied: u64,
    settled: u64,
    released: u64,
    finished: u64,
    skipped: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.jobs_created += o.jobs_created;
        self.keys_reused += o.keys_reused;
        self.actions_created += o.actions_created;
        self.actions_resolved += o.actions_resolved;
        self.holds += o.holds;
        self.holds_denied += o.holds_denied;
        self.settled += o.settled;
        self.released += o.released;
        self.finished += o.finished;
        self.skipped += o.skipped;
    }
}

struct Worker {
    kernel: Kernel,
    scope: String,
    prefix: String,
    rng: Rng,
    reporter: Arc<Reporter>,
    /// Keys this worker created, with their jobs (for idempotent re-creation).
    keys: Vec<(String, Uuid)>,
    queued: Vec<Uuid>,
    running: Vec<Uuid>,
    /// (job, action, token, is an approval)
    waiting: Vec<(Uuid, Uuid, String, bool)>,
    holds: Vec<(Uuid, Usage)>,
    next: u64,
}

/// Errors the churn expects when another operation (a cascade cancel, an expiry) got there
/// first: the job or action just leaves this worker's pools.
fn expected(e: &KernelError) -> bool {
    matches!(
        e,
        KernelError::IllegalTransition { .. }
            | KernelError::ActionNotPending { .. }
            | KernelError::ActionExpired(_)
            | KernelError::BudgetExceeded(_)
    )
}

impl Worker {
    async fn run(mut self, ops: u64) -> Result<Stats, CliError> {
        let mut stats = Stats::default();
        for _ in 0..ops {
            match self.step(&mut stats).await {
                Ok(()) => {}
                Err(e) if expected(&e) => stats.skipped += 1,
                Err(e) => return Err(CliError::internal(format!("churn {}: {e}", self.prefix))),
            }
        }
        Ok(stats)
    }

    async fn step(&mut self, stats: &mut Stats) -> Result<(), KernelError> {
        let k = self.kernel.clone();
        let roll = self.rng.below(100);
        match roll {
            0..20 => self.create(stats).await?,
            20..32 => {
                if let Some(id) = self.rng.take(&mut self.queued) {
                    k.jobs().start(id).await?;
                    self.running.push(id);
                }
            }
            32..40 => {
                if let Some(id) = self.rng.pick(&self.running) {
                    let fraction = self.rng.below(100) as f64 / 100.0;
                    if let Err(e) = k
                        .jobs()
                        .progress(id, fraction, Some(format!("step {}", self.next)))
                        .await
                    {
                        self.running.retain(|j| *j != id);
                        return Err(e);
                    }
                }
            }
            40..55 => {
                let amount = Usage {
                    tokens: 1 + self.rng.below(1000),
                    cost: Decimal::new(self.rng.below(100_000) as i64, 6),
                    requests: 1,
                    tool_calls: self.rng.below(3),
                };
                let request = HoldRequest {
                    tenant: self.scope.clone(),
                    principal: Some(self.prefix.clone()),
                    session: None,
                    job_id: self.rng.pick(&self.running),
                    amount: amount.clone(),
                    ttl: Some(Duration::seconds(HOLD_TTL_SECS)),
                };
                match k.ledger().reserve(request).await {
                    Ok(held) => {
                        stats.holds += 1;
                        self.holds.push((held.reservation.id, amount));
                    }
                    Err(KernelError::BudgetExceeded(_)) => stats.holds_denied += 1,
                    Err(e) => return Err(e),
                }
            }
            55..70 => {
                if let Some((id, held)) = self.rng.take(&mut self.holds) {
                    if self.rng.chance(75) {
                        // Actual usage never exceeds the hold, so a deny budget is never overspent.
                        let pct = self.rng.below(101);
                        let actual = Usage {
                            tokens: held.tokens * pct / 100,
                            cost: (held.cost * Decimal::from(pct) / Decimal::from(100))
                                .round_dp_with_strategy(9, rust_decimal::RoundingStrategy::ToZero),
                            requests: held.requests,
                            tool_calls: held.tool_calls,
                        };
                        let kind = if self.rng.chance(50) {
                            LedgerKind::ModelUsage
                        } else {
                            LedgerKind::ToolUsage
                        };
                        let details = SettleDetails {
                            duration_ms: Some(self.rng.below(500)),
                            model: Some("churn-model".into()),
                            ..SettleDetails::default()
                        };
                        k.ledger().settle(id, kind, actual, details).await?;
                        stats.settled += 1;
                    } else {
                        k.ledger().release(id, "call not made").await?;
                        stats.released += 1;
                    }
                }
            }
            70..78 => {
                if let Some(job) = self.rng.take(&mut self.running) {
                    let approval = self.rng.chance(60);
                    let n = self.next;
                    self.next += 1;
                    let ttl = if self.rng.chance(20) {
                        SHORT_ACTION_TTL_SECS
                    } else {
                        LONG_ACTION_TTL_SECS
                    };
                    let new = NewAction {
                        job_id: job,
                        action_type: if approval {
                            ActionType::Approval
                        } else {
                            ActionType::Input
                        },
                        title: format!("churn action {n}"),
                        request: json!({ "n": n }),
                        call: approval.then(|| ToolCallRef {
                            tool: "fs/write".into(),
                            arguments: json!({ "n": n }),
                        }),
                        ttl: Duration::seconds(ttl),
                    };
                    let created = k.actions().create(new).await?;
                    self.reporter
                        .token(created.action.id, &created.token)
                        .map_err(|e| KernelError::Invalid(e.message))?;
                    stats.actions_created += 1;
                    self.waiting.push((job, created.action.id, created.token, approval));
                }
            }
            78..86 => {
                if let Some((job, _action, token, approval)) = self.rng.take(&mut self.waiting) {
                    let resolution = if approval {
                        Resolution::approve(self.rng.chance(80))
                    } else {
                        Resolution::value(json!({ "text": "churn" }))
                    };
                    k.actions().resolve_by_token(&token, resolution).await?;
                    stats.actions_resolved += 1;
                    self.running.push(job);
                }
            }
            86..92 => {
                if let Some(id) = self.rng.take(&mut self.running) {
                    k.jobs().complete(id, Some(format!("result-{id}"))).await?;
                    stats.finished += 1;
                }
            }
            92..96 => {
                if let Some(id) = self.rng.take(&mut self.running) {
                    let error = JobError {
                        code: "churn_failure".into(),
                        message: "simulated failure".into(),
                    };
                    k.jobs().fail(id, error).await?;
                    stats.finished += 1;
                }
            }
            _ => {
                let pool = self.rng.below(3);
                let id = match pool {
                    0 => self.rng.take(&mut self.queued),
                    1 => self.rng.take(&mut self.running),
                    _ => self.rng.take(&mut self.waiting).map(|w| w.0),
                };
                if let Some(id) = id {
                    k.jobs().cancel(id, "churn cancel").await?;
                    stats.finished += 1;
                }
            }
        }
        Ok(())
    }

    async fn create(&mut self, stats: &mut Stats) -> Result<(), KernelError> {
        let k = &self.kernel;
        if self.rng.chance(10)
            && let Some((key, id)) = self.rng.pick(&self.keys)
        {
            // Same key again: must return the original job, never a second one.
            let again = k
                .jobs()
                .create(NewJob {
                    idempotency_key: Some(key.clone()),
                    // The same request as the first time (a different one with this key is refused).
                    principal: Some(self.prefix.clone()),
                    input: json!({ "key": key }).into(),
                    ..NewJob::new(&self.scope, "churn")
                })
                .await?;
            if again.created || again.job.id != id {
                return Err(KernelError::Invalid(format!(
                    "idempotency violated: key {key} created {} (first {id}, now {})",
                    again.created, again.job.id
                )));
            }
            stats.keys_reused += 1;
            return Ok(());
        }
        let key = format!("{}-{}", self.prefix, self.next);
        self.next += 1;
        let mut new = NewJob::new(&self.scope, "churn");
        new.idempotency_key = Some(key.clone());
        new.principal = Some(self.prefix.clone());
        new.input = json!({ "key": key }).into();
        if self.rng.chance(10) {
            new.deadline = Some(k.clock().now() + Duration::seconds(JOB_DEADLINE_SECS));
        }
        if self.rng.chance(15)
            && let Some(parent) = self.rng.pick(&self.running)
        {
            // Workaround: `JobManager::create` accepts a parent that already ended (e.g. cancelled
            // by a cascade from its own parent) and the child then runs on under it. Only this
            // worker touches its jobs, so checking first is race-free here.
            if k.store().get_job(parent).await?.is_none_or(|p| p.state.is_terminal()) {
                self.running.retain(|j| *j != parent);
                return Ok(());
            }
            new.parent_id = Some(parent);
        }
        let created = k.jobs().create(new).await?;
        if created.created {
            self.reporter
                .job(&key, created.job.id)
                .map_err(|e| KernelError::Invalid(e.message))?;
            stats.jobs_created += 1;
            self.keys.push((key, created.job.id));
            self.queued.push(created.job.id);
        }
        Ok(())
    }
}

// ---- check ----

/// What `keel-debug check` found.
#[derive(Debug, Default, Serialize)]
struct CheckReport {
    /// Jobs in the scope.
    pub jobs: usize,
    /// Jobs by state.
    pub job_states: BTreeMap<String, usize>,
    /// Actions in the scope.
    pub actions: usize,
    /// Reservations by state.
    pub reservations: BTreeMap<String, usize>,
    /// Tokens given on stdin, by the state of their action (`unknown`: no action has that token).
    pub tokens: BTreeMap<String, usize>,
    /// Summed usage entries of the ledger, as read row by row.
    pub ledger_usage: Usage,
    /// The same sum computed by the store.
    pub store_usage: Usage,
    /// Summed actual usage of settled reservations.
    pub settled_usage: Usage,
    /// Every broken invariant, one sentence each.
    pub violations: Vec<String>,
}

/// One token `churn` reported: the action it was issued for and the token.
#[derive(Debug, Clone)]
struct RecordedToken {
    action: Uuid,
    token: String,
}

/// Read `ACTION_ID TOKEN` lines; anything else is an error (the caller passes whole lines only).
fn read_tokens(input: impl BufRead) -> Result<Vec<RecordedToken>, CliError> {
    let mut tokens = Vec::new();
    for line in input.lines() {
        let line = line.map_err(|e| CliError::internal(format!("cannot read stdin: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line.split_once(' ').and_then(|(a, t)| {
            let action = Uuid::parse_str(a).ok()?;
            (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| RecordedToken {
                action,
                token: t.to_string(),
            })
        });
        tokens.push(parsed.ok_or_else(|| CliError::internal("stdin: expected `ACTION_ID TOKEN` lines"))?);
    }
    Ok(tokens)
}

async fn check(
    kernel: &Kernel,
    scope: &str,
    recovered: bool,
    recorded: &[RecordedToken],
) -> Result<CheckReport, CliError> {
    let mut r = CheckReport::default();
    let now = kernel.clock().now();
    let store = kernel.store();

    // Jobs: legal, self-consistent, and their event streams agree with their state.
    let jobs = kernel.jobs().list(&JobFilter::tenant(scope)).await?;
    let actions = kernel
        .actions()
        .list(&ActionFilter {
            tenant: scope.into(),
            ..ActionFilter::default()
        })
        .await?;
    r.jobs = jobs.len();
    r.actions = actions.len();
    let by_id: HashMap<Uuid, &keel_kernel::job::Job> = jobs.iter().map(|j| (j.id, j)).collect();
    let mut pending_by_job: HashMap<Uuid, usize> = HashMap::new();
    for a in actions.iter().filter(|a| a.state == ActionState::Pending) {
        *pending_by_job.entry(a.job_id).or_default() += 1;
    }
    let mut keys: HashMap<&str, Uuid> = HashMap::new();
    for job in &jobs {
        *r.job_states.entry(job.state.to_string()).or_default() += 1;
        if let Some(key) = &job.idempotency_key
            && let Some(other) = keys.insert(key, job.id)
        {
            r.violations
                .push(format!("idempotency key {key} is held by jobs {other} and {}", job.id));
        }
        if job.state.is_terminal() != job.finished_at.is_some() {
            r.violations.push(format!(
                "job {} is {} but finished_at is {:?}",
                job.id, job.state, job.finished_at
            ));
        }
        let pending = pending_by_job.get(&job.id).copied().unwrap_or(0);
        if (job.state == JobState::WaitingAction) != (pending > 0) {
            r.violations.push(format!(
                "job {} is {} with {pending} pending actions",
                job.id, job.state
            ));
        }
        if recovered && !job.state.is_terminal() && job.deadline.is_some_and(|d| d <= now) {
            r.violations.push(format!(
                "job {} is {} past its deadline after recovery",
                job.id, job.state
            ));
        }
        if let Some(parent) = job.parent_id.and_then(|p| by_id.get(&p))
            && matches!(parent.state, JobState::Cancelled | JobState::TimedOut)
            && !job.state.is_terminal()
        {
            r.violations.push(format!(
                "job {} is {} but its parent {} is {}",
                job.id, job.state, parent.id, parent.state
            ));
        }
        let events = kernel
            .read_events(&EventQuery {
                filter: EventFilter::job(job.id),
                ..EventQuery::default()
            })
            .await?;
        for (i, e) in events.iter().enumerate() {
            if e.seq != i as u64 + 1 {
                r.violations
                    .push(format!("job {} event #{} has seq {}", job.id, i + 1, e.seq));
                break;
            }
        }
        let first_ok = events.first().is_some_and(|e| {
            e.event_type == EventType::JobStatusChanged && e.data.field("to").is_some_and(|v| v == "QUEUED")
        });
        if !first_ok {
            r.violations
                .push(format!("job {} does not start with its QUEUED event", job.id));
        }
        let last_to = events.iter().rev().find_map(|e| match e.event_type {
            EventType::JobStarted
            | EventType::JobStatusChanged
            | EventType::JobCompleted
            | EventType::JobFailed
            | EventType::JobCancelled => e.data.field("to").and_then(|v| v.as_str().map(str::to_string)),
            _ => None,
        });
        if last_to.as_deref() != Some(job.state.as_str()) {
            r.violations.push(format!(
                "job {} is {} but its last status event says {last_to:?}",
                job.id, job.state
            ));
        }
    }

    // Actions: pending ones belong to waiting jobs; expired ones ended their job.
    for a in &actions {
        let job = by_id.get(&a.job_id);
        match a.state {
            ActionState::Pending => {
                if recovered && a.expires_at <= now {
                    r.violations.push(format!(
                        "action {} is still PENDING past its expiry after recovery",
                        a.id
                    ));
                }
            }
            ActionState::Expired => {
                if !job.is_some_and(|j| j.state.is_terminal()) {
                    r.violations
                        .push(format!("action {} expired but its job is not finished", a.id));
                }
            }
            ActionState::Resolved => {
                if a.resolution.is_none() || a.resolved_at.is_none() {
                    r.violations
                        .push(format!("action {} is RESOLVED without a resolution", a.id));
                }
            }
            ActionState::Cancelled => {}
        }
    }

    // Tokens: every token handed out (and reported) still names its action.
    for t in recorded {
        match store
            .get_action_by_token_hash(&hash_token(&t.token))
            .await
            .map_err(KernelError::from)?
        {
            Some(a) if a.id == t.action => *r.tokens.entry(a.state.to_string()).or_default() += 1,
            Some(a) => r
                .violations
                .push(format!("token of action {} finds action {}", t.action, a.id)),
            None => {
                *r.tokens.entry("unknown".into()).or_default() += 1;
                r.violations
                    .push(format!("the token of action {} finds no action (lost)", t.action));
            }
        }
    }

    // Ledger: row sums, SQL sums and settled reservations agree; every hold is accounted for.
    let entries = kernel
        .ledger()
        .entries(&LedgerQuery {
            tenant: scope.into(),
            ..LedgerQuery::default()
        })
        .await?;
    let mut per_reservation: HashMap<Uuid, Vec<&keel_kernel::ledger::LedgerEvent>> = HashMap::new();
    for e in &entries {
        if e.entry.kind.counts_as_usage() {
            r.ledger_usage += e.entry.usage.clone();
        }
        if let Some(id) = e.entry.reservation_id {
            per_reservation.entry(id).or_default().push(e);
        }
    }
    r.store_usage = kernel
        .ledger()
        .usage(&UsageQuery {
            tenant: scope.into(),
            ..UsageQuery::default()
        })
        .await?;
    if r.store_usage != r.ledger_usage {
        r.violations.push(format!(
            "store usage {:?} != summed ledger rows {:?}",
            r.store_usage, r.ledger_usage
        ));
    }
    let mut ids: Vec<&Uuid> = per_reservation.keys().collect();
    ids.sort();
    for id in ids {
        let rows = &per_reservation[id];
        let count = |k: LedgerKind| rows.iter().filter(|e| e.entry.kind == k).count();
        let usage_rows: Vec<_> = rows.iter().filter(|e| e.entry.kind.counts_as_usage()).collect();
        let Some(res) = store.get_reservation(*id).await.map_err(KernelError::from)? else {
            r.violations
                .push(format!("ledger entries name reservation {id}, which does not exist"));
            continue;
        };
        *r.reservations.entry(res.state.to_string()).or_default() += 1;
        if count(LedgerKind::Hold) != 1 {
            r.violations
                .push(format!("reservation {id} has {} hold entries", count(LedgerKind::Hold)));
        }
        match res.state {
            ReservationState::Held => {
                if recovered {
                    r.violations.push(format!(
                        "reservation {id} is still HELD after recovery (expires {})",
                        res.expires_at
                    ));
                }
                if !usage_rows.is_empty() {
                    r.violations
                        .push(format!("reservation {id} is HELD but has usage entries"));
                }
            }
            ReservationState::Settled => {
                let actual = res.actual.clone().unwrap_or_default();
                r.settled_usage += actual.clone();
                if count(LedgerKind::Settle) != 1 || usage_rows.len() != 1 || usage_rows[0].entry.usage != actual {
                    r.violations.push(format!(
                        "reservation {id} is SETTLED with {} settle and {} usage entries",
                        count(LedgerKind::Settle),
                        usage_rows.len()
                    ));
                }
            }
            ReservationState::Released => {
                if count(LedgerKind::Release) < 1 || !usage_rows.is_empty() {
                    r.violations
                        .push(format!("reservation {id} is RELEASED without exactly a release entry"));
                }
            }
        }
    }
    if r.settled_usage != r.ledger_usage {
        r.violations.push(format!(
            "settled reservations {:?} != ledger usage {:?}",
            r.settled_usage, r.ledger_usage
        ));
    }
    for b in kernel.ledger().budgets(scope).await? {
        if b.strategy == ExceedStrategy::Deny
            && b.window == BudgetWindow::Total
            && b.principal.is_none()
            && b.session.is_none()
            && b.limits.max_tokens.is_some_and(|max| r.ledger_usage.tokens > max)
        {
            r.violations.push(format!(
                "deny budget {} overspent: {} tokens",
                b.name, r.ledger_usage.tokens
            ));
        }
    }
    Ok(r)
}
