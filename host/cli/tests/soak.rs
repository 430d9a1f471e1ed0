//! Soak of the durable agent kernel through the real `keel` binary (issue 8, "Done when"): two
//! `keel worker`s plus `keel run`s on one SQLite Keel home, under random SIGKILL and SIGSTOP, with
//! a slow CPU-bound non-idempotent tool (`hostile/spin_ms`, some calls longer than the lease),
//! non-idempotent writes (`fs/write`) that need an approval (two at once per job), approvals
//! answered concurrently by several `keel actions approve|deny` processes (and `--auto-approve`),
//! some jobs under a stricter `--policy`, and deny budgets sized so that some jobs hit them. Then a
//! quiet period in which one healthy worker drains everything.
//!
//! What must hold at the end:
//! - every job is terminal (none QUEUED, RUNNING or WAITING_ACTION);
//! - no call ran more often than allowed: once, plus once per approved re-run; never when its
//!   job's policy or a human denied it; never after it was journaled done; and a call re-ran only if
//!   the host that ran it before was killed or stopped in between (a live host keeps its calls);
//! - no deny budget is overspent;
//! - per job, the ledger equals the sum of the job's receipts (`model.done` usage, tool call
//!   attempts started), the scope's total equals the sum over jobs, and `keel-debug check` (after a sweep
//!   as if 700 s had passed) finds no broken invariant: ledger rows = their SQL sum = settled
//!   reservations, no hold left, WAITING_ACTION <=> a pending action, event streams well formed.
//!
//! Every execution of `spin_ms` leaves a marker file (job, call id, start time, the host's tag),
//! every `fs/write` appends a line to a file of its own call, so executions are counted exactly.
//!
//! `KEEL_SOAK_SEED` replays a run's schedule (the seed is printed first); `KEEL_SOAK_SECS`
//! (default 15) is the length of the chaos phase, and the number of jobs grows with it;
//! `KEEL_SOAK_QUIET_SECS` (default 30) bounds the drain; `KEEL_SOAK_KEEP=1` keeps the Keel home
//! (with every host's output in `logs/`) for a post-mortem.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rust_decimal::Decimal;
use serde_json::{Value, json};

mod common;

/// Job lease; the long spin is longer, so a host computing in it must renew independently.
const LEASE_MS: u64 = 2000;
const LONG_SPIN_MS: u64 = 2600;
const SHORT_SPIN_MS: u64 = 150;
/// The host tag each `keel` process carries (granted to the hostile plugin, written in markers).
const TAG_ENV: &str = "KEEL_SOAK_HOST";
/// Output tokens per model turn, at 0.001 each (input tokens are free).
const TURN_TOKENS: u64 = 5;
/// The calls of every job, in turn order: spin, two writes (one turn), spin.
const CALLS: [&str; 4] = ["s1", "wa", "wb", "s3"];

const POLICY: &str = r#"
version = 1
default = "allow"

[[tool]]
name = "ask-before-writing"
tools = ["fs/write"]
decision = "require_approval"
reason = "writes need a human"
"#;

/// The home policy plus a deny of the slow tool: a worker must apply it to the jobs that chose it.
const STRICT: &str = r#"
version = 1
default = "allow"

[[tool]]
name = "no-spinning"
tools = ["hostile/spin_ms"]
decision = "deny"
reason = "strict jobs may not burn CPU"

[[tool]]
name = "ask-before-writing"
tools = ["fs/write"]
decision = "require_approval"
reason = "writes need a human"
"#;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// xorshift64*: the whole schedule, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// One planned job.
#[derive(Debug, Clone)]
struct Plan {
    k: usize,
    /// Runs under `--policy strict.toml` (its spins are denied).
    strict: bool,
    /// Run attached by `keel run --auto-approve` (a host itself) instead of `--detach`.
    attached: bool,
    /// Its first spin is longer than the lease.
    long: bool,
    /// Submitted at this offset into the chaos phase.
    at_ms: u64,
}

impl Plan {
    fn key(&self) -> String {
        format!("soak-j{}", self.k)
    }

    fn write_file(&self, call: &str) -> String {
        format!("j{}-{call}.txt", self.k)
    }

    fn script(&self) -> Value {
        let spin = |id: &str, ms: u64| {
            json!({ "id": id, "name": "hostile__spin_ms",
                    "arguments": { "dir": "/marks", "ms": ms, "tag_env": TAG_ENV } })
        };
        let write = |id: &str| {
            json!({ "id": id, "name": "fs__write",
                    "arguments": { "path": format!("/out/{}", self.write_file(id)), "content": "x\n", "mode": "append" } })
        };
        let usage = json!({ "input_tokens": 10, "output_tokens": TURN_TOKENS });
        json!({ "turns": [
            { "tool_calls": [spin("s1", if self.long { LONG_SPIN_MS } else { SHORT_SPIN_MS })], "usage": usage },
            { "tool_calls": [write("wa"), write("wb")], "usage": usage },
            { "tool_calls": [spin("s3", SHORT_SPIN_MS)], "usage": usage },
            { "text": format!("job {} done", self.k), "usage": usage },
        ]})
    }

    /// Tool calls that run if nothing is refused.
    fn tool_calls(&self) -> u64 {
        if self.strict { 2 } else { 4 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Worker,
    Run,
}

/// A `keel` host process the chaos can hit.
struct Proc {
    tag: String,
    role: Role,
    child: Child,
    stopped_at: Option<u64>,
    alive: bool,
}

/// A host process was killed (`to` = MAX) or stopped (`from`..`to`), wall-clock ms.
#[derive(Debug, Clone)]
struct Disruption {
    tag: String,
    what: &'static str,
    from: u64,
    to: u64,
}

struct Shared {
    home: PathBuf,
    t0: u64,
    stop: AtomicBool,
    procs: Mutex<Vec<Proc>>,
    disruptions: Mutex<Vec<Disruption>>,
    log: Mutex<Vec<String>>,
    approved: AtomicU64,
    denied: AtomicU64,
    next_tag: AtomicU64,
    /// Plan number -> tag of the `keel run` that submitted it attached.
    run_tags: Mutex<HashMap<usize, String>>,
}

impl Shared {
    fn note(&self, what: String) {
        let t = now_ms().saturating_sub(self.t0) as f64 / 1000.0;
        lock(&self.log).push(format!("{t:7.2}s {what}"));
    }

    fn keel(&self, args: &[&str], tag: &str) -> Command {
        let mut c = common::keel(&self.home, args);
        c.env(TAG_ENV, tag)
            .env_remove("KEEL_DEBUG_MODEL_DELAY_MS")
            .stdin(Stdio::null());
        c
    }

    /// Start a host process with its output in `logs/TAG.{out,err}`.
    fn spawn_host(&self, role: Role, args: &[&str]) -> String {
        let n = self.next_tag.fetch_add(1, Ordering::SeqCst);
        let tag = match role {
            Role::Worker => format!("W{n}"),
            Role::Run => format!("R{n}"),
        };
        let logs = self.home.join("logs");
        let out = std::fs::File::create(logs.join(format!("{tag}.out"))).unwrap();
        let err = std::fs::File::create(logs.join(format!("{tag}.err"))).unwrap();
        let child = self
            .keel(args, &tag)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn keel");
        self.note(format!("start {tag} (pid {}): keel {}", child.id(), args.join(" ")));
        lock(&self.procs).push(Proc {
            tag: tag.clone(),
            role,
            child,
            stopped_at: None,
            alive: true,
        });
        tag
    }

    fn spawn_worker(&self) -> String {
        self.spawn_host(Role::Worker, &["worker"])
    }

    /// Notice hosts that exited on their own (an attached run whose job ended).
    fn reap(&self) {
        let mut procs = lock(&self.procs);
        for p in procs.iter_mut().filter(|p| p.alive) {
            if let Ok(Some(status)) = p.child.try_wait() {
                p.alive = false;
                self.note(format!("{} exited on its own: {status}", p.tag));
            }
        }
    }

    /// Tags of live hosts of `role` (stopped ones too unless `running_only`).
    fn live(&self, role: Role, running_only: bool) -> Vec<String> {
        lock(&self.procs)
            .iter()
            .filter(|p| p.alive && p.role == role && !(running_only && p.stopped_at.is_some()))
            .map(|p| p.tag.clone())
            .collect()
    }

    fn kill(&self, tag: &str) {
        let mut procs = lock(&self.procs);
        let Some(p) = procs.iter_mut().find(|p| p.tag == tag && p.alive) else {
            return;
        };
        let at = now_ms();
        let _ = p.child.kill();
        let _ = p.child.wait();
        p.alive = false;
        let mut d = lock(&self.disruptions);
        if let Some(from) = p.stopped_at.take() {
            d.push(Disruption {
                tag: tag.into(),
                what: "stopped",
                from,
                to: u64::MAX,
            });
        }
        d.push(Disruption {
            tag: tag.into(),
            what: "killed",
            from: at,
            to: u64::MAX,
        });
        drop(d);
        drop(procs);
        self.note(format!("SIGKILL {tag}"));
    }

    fn stop_host(&self, tag: &str) {
        let mut procs = lock(&self.procs);
        let Some(p) = procs
            .iter_mut()
            .find(|p| p.tag == tag && p.alive && p.stopped_at.is_none())
        else {
            return;
        };
        if common::signal(p.child.id(), "STOP") {
            p.stopped_at = Some(now_ms());
            drop(procs);
            self.note(format!("SIGSTOP {tag}"));
        }
    }

    fn cont(&self, tag: &str) {
        let mut procs = lock(&self.procs);
        let Some(p) = procs.iter_mut().find(|p| p.tag == tag && p.alive) else {
            return;
        };
        let Some(from) = p.stopped_at.take() else {
            return;
        };
        common::signal(p.child.id(), "CONT");
        lock(&self.disruptions).push(Disruption {
            tag: tag.into(),
            what: "stopped",
            from,
            to: now_ms(),
        });
        drop(procs);
        self.note(format!("SIGCONT {tag}"));
    }

    /// Whether host `tag` was killed or stopped at some time in `from..=to`.
    fn disrupted(&self, tag: &str, from: u64, to: u64) -> bool {
        lock(&self.disruptions)
            .iter()
            .any(|d| d.tag == tag && d.from <= to && d.to >= from)
    }

    /// Milliseconds any host spent stopped within `from..=to`: a stopped host may hold the
    /// database's write lock, so every other host's lease renewal waits for it.
    fn stopped_ms(&self, from: u64, to: u64) -> u64 {
        let now = now_ms();
        lock(&self.disruptions)
            .iter()
            .filter(|d| d.what == "stopped")
            .map(|d| d.to.min(now).min(to).saturating_sub(d.from.max(from)))
            .sum()
    }
}

/// Kills every host on drop (also when the test panics), continuing stopped ones first.
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
        let mut procs = lock(&self.0.procs);
        for p in procs.iter_mut().filter(|p| p.alive) {
            if p.stopped_at.is_some() {
                common::signal(p.child.id(), "CONT");
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            p.alive = false;
        }
    }
}

/// Run `keel ARGS` in the test's home, bounded; stdout when it exits 0.
fn keel_out(shared: &Shared, args: &[&str]) -> Result<String, String> {
    let mut child = shared
        .keel(args, "test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Read on threads so a large output cannot block the child.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ro = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut so, &mut s).ok();
        s
    });
    let re = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut se, &mut s).ok();
        s
    });
    let status = common::wait_or_kill(&mut child, Duration::from_secs(30));
    let (out, err) = (ro.join().unwrap(), re.join().unwrap());
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("keel {args:?}: {s}: {}", err.trim())),
        None => Err(format!("keel {args:?} did not finish within 30 s")),
    }
}

fn keel_json(shared: &Shared, args: &[&str]) -> Value {
    let out = keel_out(shared, args).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keel {args:?}: not JSON ({e}): {out}"))
}

/// Answer pending approvals from separate `keel actions approve|deny` processes, several at once.
fn approver(shared: Arc<Shared>, name: String, seed: u64) {
    let mut rng = Rng(seed);
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.between(120, 450)));
        let Ok(out) = keel_out(&shared, &["actions", "list", "--json"]) else {
            continue;
        };
        let Ok(Value::Array(pending)) = serde_json::from_str::<Value>(&out) else {
            continue;
        };
        let mut answering = Vec::new();
        for a in pending {
            if !rng.chance(70) {
                continue;
            }
            let id = a["id"].as_str().unwrap_or_default().to_string();
            let rerun = is_rerun(&a);
            let approve = rng.chance(if rerun { 85 } else { 90 });
            let verb = if approve { "approve" } else { "deny" };
            let child = shared
                .keel(&["actions", verb, &id, "--by", &name], &name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(child) = child {
                answering.push((child, id, verb, a["request"]["call_id"].clone(), rerun));
            }
        }
        for (mut child, id, verb, call, rerun) in answering {
            let status = common::wait_or_kill(&mut child, Duration::from_secs(20));
            let ok = status.is_some_and(|s| s.success());
            if ok {
                let counter = if verb == "approve" {
                    &shared.approved
                } else {
                    &shared.denied
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
            shared.note(format!(
                "{name}: {verb} {id} (call {call}{}) -> {}",
                if rerun { ", re-run" } else { "" },
                match status {
                    Some(s) if s.success() => "ok".to_string(),
                    Some(s) => format!("refused ({s})"),
                    None => "hung, killed".to_string(),
                }
            ));
        }
    }
}

/// Whether an approval action asks to re-run an interrupted call (rather than to run it at all).
fn is_rerun(action: &Value) -> bool {
    action["title"].as_str().is_some_and(|t| t.contains("re-run"))
        || action["request"]["step"].as_str().is_some_and(|s| s.contains("rerun"))
}

fn decimal(v: &Value) -> Decimal {
    match v {
        Value::String(s) => Decimal::from_str(s).unwrap_or_else(|e| panic!("not a decimal {s:?}: {e}")),
        Value::Number(n) => Decimal::from_str(&n.to_string()).unwrap_or_else(|e| panic!("not a decimal {n}: {e}")),
        Value::Null => Decimal::ZERO,
        other => panic!("not a decimal: {other}"),
    }
}

/// One execution of `spin_ms`, from its marker file.
#[derive(Debug, Clone)]
struct Exec {
    start_ms: u64,
    host: String,
}

/// Markers by (job id, call id), sorted by start.
fn read_markers(dir: &Path) -> HashMap<(String, String), Vec<Exec>> {
    let mut out: HashMap<(String, String), Vec<Exec>> = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '.');
        let (Some(job), Some(call)) = (parts.next(), parts.next()) else {
            panic!("unexpected marker {name}");
        };
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut fields = text.split_whitespace();
        // A marker cut by a kill (created, not yet written) still counts as an execution.
        let start_ms = fields.next().and_then(|t| t.parse().ok()).unwrap_or(0);
        let host = fields.next().unwrap_or("?").to_string();
        out.entry((job.to_string(), call.to_string()))
            .or_default()
            .push(Exec { start_ms, host });
    }
    for v in out.values_mut() {
        v.sort_by_key(|e| e.start_ms);
    }
    out
}

fn event_ms(e: &Value) -> u64 {
    e["at"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(0, |t| t.timestamp_millis() as u64)
}

/// A job's events, one line each, for failure reports.
fn listing(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| {
            let mut data = e["data"].to_string();
            if data.len() > 160 {
                data.truncate(160);
                data.push('…');
            }
            format!(
                "    #{:<3} {} {:<22} {data}",
                e["seq"],
                e["at"].as_str().unwrap_or(""),
                e["event_type"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn two_workers_and_runs_under_sigkill_and_sigstop_keep_every_promise() {
    let seed = env_u64("KEEL_SOAK_SEED", 0);
    let seed = if seed == 0 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    } else {
        seed
    };
    let chaos_secs = env_u64("KEEL_SOAK_SECS", 15).max(4);
    let quiet_secs = env_u64("KEEL_SOAK_QUIET_SECS", 30);
    eprintln!("KEEL_SOAK_SEED={seed} KEEL_SOAK_SECS={chaos_secs}");
    let mut rng = Rng(seed);

    // ---- the home: config, scripts, policies, plugins, budgets ----
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    if std::env::var_os("KEEL_SOAK_KEEP").is_some() {
        // Keep the home (logs/, marks/, keel.db) for a post-mortem.
        eprintln!("keeping {}", home.display());
        std::mem::forget(dir);
    }
    for d in ["out", "marks", "logs"] {
        std::fs::create_dir_all(home.join(d)).unwrap();
    }
    let jobs = (chaos_secs * 4 / 5).max(6) as usize;
    let submit_window = chaos_secs * 1000 * 6 / 10;
    let plans: Vec<Plan> = (0..jobs)
        .map(|k| Plan {
            k,
            strict: k % 4 == 3,
            attached: k % 5 == 1,
            long: k % 3 == 0,
            at_ms: submit_window * k as u64 / jobs as u64 + rng.below(200),
        })
        .collect();
    let mut config = format!("[agent]\nlease_ttl_ms = {LEASE_MS}\npoll_ms = 100\ndefault_max_tokens = 20\n\n");
    for p in &plans {
        std::fs::write(home.join(format!("script-j{}.json", p.k)), p.script().to_string()).unwrap();
        config.push_str(&format!(
            "[models.providers.j{k}]\nkind = \"scripted\"\nscript = \"script-j{k}.json\"\n\n\
             [models.providers.j{k}.prices.m]\ninput_per_mtok = \"0\"\noutput_per_mtok = \"1000\"\n\n",
            k = p.k
        ));
    }
    std::fs::write(home.join("config.toml"), config).unwrap();
    std::fs::write(home.join("policy.toml"), POLICY).unwrap();
    std::fs::write(home.join("strict.toml"), STRICT).unwrap();
    let fs = keel_testutil::guest("keel-plugin-fs");
    let hostile = keel_testutil::guest("keel-test-hostile");
    let out_grant = format!("{}::/out", home.join("out").display());
    let marks_grant = format!("{}::/marks", home.join("marks").display());
    common::expect(
        &home,
        &["install", &fs.to_string_lossy(), "--allow-write", &out_grant],
        0,
    );
    common::expect(
        &home,
        &[
            "install",
            &hostile.to_string_lossy(),
            "--allow-write",
            &marks_grant,
            "--allow-env",
            TAG_ENV,
        ],
        0,
    );
    // Deny budgets below what the jobs would use, so some of them hit one.
    let planned_calls: u64 = plans.iter().map(Plan::tool_calls).sum();
    let call_limit = planned_calls * 9 / 10;
    let cost_limit = Decimal::from(plans.len() as u64 * 4 * TURN_TOKENS) / Decimal::from(1000) * Decimal::new(95, 2);
    let cost_limit = cost_limit.round_dp(3).to_string();
    common::expect(
        &home,
        &[
            "budgets",
            "set",
            "--scope",
            "default",
            "--window",
            "total",
            "--max-tool-calls",
            &call_limit.to_string(),
            "--on-exceed",
            "deny",
        ],
        0,
    );
    common::expect(
        &home,
        &[
            "budgets",
            "set",
            "--scope",
            "default",
            "--window",
            "daily",
            "--max-cost",
            &cost_limit,
            "--on-exceed",
            "deny",
        ],
        0,
    );

    let started = Instant::now();
    let shared = Arc::new(Shared {
        home: home.clone(),
        t0: now_ms(),
        stop: AtomicBool::new(false),
        procs: Mutex::new(Vec::new()),
        disruptions: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
        approved: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        next_tag: AtomicU64::new(1),
        run_tags: Mutex::new(HashMap::new()),
    });
    let guard = Guard(shared.clone());
    shared.note(format!(
        "{} jobs, tool-call budget {call_limit} of {planned_calls} planned, cost budget {cost_limit}",
        plans.len()
    ));

    // ---- hosts, submitter, approvers ----
    shared.spawn_worker();
    shared.spawn_worker();
    let approvers: Vec<_> = (0..2)
        .map(|i| {
            let s = shared.clone();
            let seed = seed.wrapping_add(1000 + i);
            std::thread::spawn(move || approver(s, format!("approver{i}"), seed))
        })
        .collect();
    let strict = home.join("strict.toml").to_string_lossy().into_owned();
    let submitter = {
        let s = shared.clone();
        let plans = plans.clone();
        std::thread::spawn(move || {
            for p in plans {
                while now_ms() < s.t0 + p.at_ms {
                    if s.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let key = p.key();
                let model = format!("j{}:m", p.k);
                let mut args = vec![
                    "run",
                    "soak",
                    "--tools",
                    "fs/write,hostile/spin_ms",
                    "--model",
                    &model,
                    "--idempotency-key",
                    &key,
                    "--json",
                ];
                if p.strict {
                    args.extend(["--policy", strict.as_str()]);
                }
                if p.attached {
                    args.push("--auto-approve");
                    let tag = s.spawn_host(Role::Run, &args);
                    lock(&s.run_tags).insert(p.k, tag);
                } else {
                    args.push("--detach");
                    match keel_out(&s, &args) {
                        Ok(out) => s.note(format!("queued j{}: {}", p.k, out.trim())),
                        Err(e) => s.note(format!("SUBMIT FAILED j{}: {e}", p.k)),
                    }
                }
            }
        })
    };

    // ---- chaos ----
    let chaos_end = Instant::now() + Duration::from_secs(chaos_secs);
    let kills_only_until = Instant::now() + Duration::from_millis(chaos_secs * 1000 / 3);
    let mut restarts: Vec<Instant> = Vec::new();
    let mut conts: Vec<(Instant, String)> = Vec::new();
    let mut next_hit = Instant::now() + Duration::from_millis(rng.between(600, 1200));
    let (mut kills, mut stops, mut run_kills) = (0u32, 0u32, 0u32);
    while Instant::now() < chaos_end {
        std::thread::sleep(Duration::from_millis(25));
        shared.reap();
        let now = Instant::now();
        for (_, tag) in conts.iter().filter(|(at, _)| *at <= now) {
            shared.cont(tag);
        }
        conts.retain(|(at, _)| *at > now);
        let due = restarts.iter().filter(|at| **at <= now).count();
        restarts.retain(|at| *at > now);
        for _ in 0..due {
            shared.spawn_worker();
        }
        if now < next_hit {
            continue;
        }
        next_hit = now + Duration::from_millis(rng.between(500, 1400));
        // The first third only kills: no host is stopped, so no lease can lapse under a live host.
        // Then the first hit is a stop, so every run has both.
        let roll = if now < kills_only_until {
            [0, 0, 0, 80, 95][rng.below(5) as usize]
        } else if stops == 0 {
            40
        } else {
            rng.below(100)
        };
        if roll < 35 {
            let workers = shared.live(Role::Worker, false);
            if let Some(tag) = workers.get(rng.below(workers.len() as u64) as usize) {
                shared.kill(tag);
                conts.retain(|(_, t)| t != tag);
                restarts.push(now + Duration::from_millis(rng.between(50, 700)));
                kills += 1;
            }
        } else if roll < 75 {
            let workers = shared.live(Role::Worker, true);
            if let Some(tag) = workers.get(rng.below(workers.len() as u64) as usize) {
                shared.stop_host(tag);
                conts.push((now + Duration::from_millis(rng.between(300, 3500)), tag.clone()));
                stops += 1;
            }
        } else if roll < 90 {
            let runs = shared.live(Role::Run, false);
            if let Some(tag) = runs.get(rng.below(runs.len() as u64) as usize) {
                shared.kill(tag);
                run_kills += 1;
            }
        }
    }
    submitter.join().unwrap();

    // ---- quiet: continue the stopped, replace the workers by one healthy worker, drain ----
    shared.note("quiet period".into());
    for tag in shared.live(Role::Worker, false) {
        shared.cont(&tag);
        shared.kill(&tag);
    }
    for tag in shared.live(Role::Run, false) {
        shared.cont(&tag);
    }
    shared.spawn_worker();
    let quiet_start = Instant::now();
    let mut list: Vec<Value>;
    loop {
        shared.reap();
        list = keel_json(&shared, &["jobs", "list", "--limit", "0", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default();
        let open = list
            .iter()
            .filter(|j| !["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&j["state"].as_str().unwrap_or("")))
            .count();
        if open == 0 || quiet_start.elapsed() > Duration::from_secs(quiet_secs) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let drain = quiet_start.elapsed();
    shared.stop.store(true, Ordering::SeqCst);
    for a in approvers {
        a.join().unwrap();
    }
    // Attached runs end with their jobs; the last worker is no longer needed.
    {
        let mut procs = lock(&shared.procs);
        for p in procs.iter_mut().filter(|p| p.alive && p.role == Role::Run) {
            common::wait_or_kill(&mut p.child, Duration::from_secs(5));
            p.alive = false;
        }
    }
    for tag in shared.live(Role::Worker, false) {
        shared.kill(&tag);
    }
    drop(guard);
    let chaos_and_drain = started.elapsed();

    // ---- what happened ----
    let mut violations: Vec<String> = Vec::new();
    let mut suspects: BTreeSet<String> = BTreeSet::new();
    let by_key: HashMap<String, &Value> = list
        .iter()
        .filter_map(|j| Some((j["idempotency_key"].as_str()?.to_string(), j)))
        .collect();
    let actions = keel_json(&shared, &["actions", "list", "--all", "--json"]);
    let actions = actions.as_array().cloned().unwrap_or_default();
    let markers = read_markers(&home.join("marks"));
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut events_of: HashMap<String, Vec<Value>> = HashMap::new();
    let (mut executions, mut reruns_approved) = (0usize, 0usize);
    let mut ledger_sum = (0u64, Decimal::ZERO, 0u64, 0u64);

    for p in &plans {
        let Some(job) = by_key.get(&p.key()) else {
            // An attached run killed before it created its job leaves none; that is fine.
            let killed_early = lock(&shared.run_tags)
                .get(&p.k)
                .is_some_and(|tag| shared.disrupted(tag, 0, u64::MAX));
            if killed_early {
                shared.note(format!("j{}: its `keel run` was killed before it created the job", p.k));
            } else {
                violations.push(format!("j{}: no job with key {} was created", p.k, p.key()));
            }
            continue;
        };
        let id = job["id"].as_str().unwrap().to_string();
        let state = job["state"].as_str().unwrap_or("?").to_string();
        let code = job["error"]["code"]
            .as_str()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default();
        *states.entry(format!("{state}{code}")).or_default() += 1;
        let shown = keel_json(&shared, &["jobs", "show", &id, "--json"]);
        let events = shown["events"].as_array().cloned().unwrap_or_default();
        events_of.insert(id.clone(), events.clone());
        let job_actions: Vec<&Value> = actions.iter().filter(|a| a["job_id"] == id.as_str()).collect();

        // No job stuck.
        if !["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&state.as_str()) {
            let pending: Vec<String> = job_actions
                .iter()
                .filter(|a| a["state"] == "PENDING")
                .map(|a| format!("{} ({})", a["id"], a["title"]))
                .collect();
            violations.push(format!(
                "j{} job {id} is stuck {state} after {:?} of quiet; pending actions: {pending:?}",
                p.k, drain
            ));
            suspects.insert(id.clone());
        }

        // Calls: executions against what was allowed.
        for call in CALLS {
            let of_call = |t: &str| -> Vec<&Value> {
                events
                    .iter()
                    .filter(|e| e["event_type"] == t && e["data"]["call_id"] == call)
                    .collect()
            };
            let ran_events: Vec<&Value> = of_call("tool.end")
                .into_iter()
                .chain(
                    of_call("tool.error")
                        .into_iter()
                        .filter(|e| e["data"].get("duration_ms").is_some()),
                )
                .collect();
            let spin = call.starts_with('s');
            let execs: Vec<Exec> = if spin {
                markers
                    .get(&(id.clone(), call.to_string()))
                    .cloned()
                    .unwrap_or_default()
            } else {
                let text = std::fs::read_to_string(home.join("out").join(p.write_file(call))).unwrap_or_default();
                vec![
                    Exec {
                        start_ms: 0,
                        host: "?".into()
                    };
                    text.lines().count()
                ]
            };
            executions += execs.len();
            let approvals: Vec<&Value> = job_actions
                .iter()
                .copied()
                .filter(|a| a["request"]["call_id"] == call)
                .collect();
            let approved = |a: &Value| a["state"] == "RESOLVED" && a["resolution"]["approved"] == true;
            let reruns = approvals.iter().filter(|a| is_rerun(a) && approved(a)).count();
            reruns_approved += reruns;
            let firsts: Vec<&Value> = approvals.iter().copied().filter(|a| !is_rerun(a)).collect();
            let human_denied = !firsts.is_empty() && !firsts.iter().any(|a| approved(a));
            let policy_denied = p.strict && spin;
            let allowed = if policy_denied || human_denied { 0 } else { 1 + reruns };
            let what = format!("j{} job {id} call {call}", p.k);
            if execs.len() > allowed {
                let why = if policy_denied {
                    "its job's policy denies it".to_string()
                } else if human_denied {
                    "a human denied it".to_string()
                } else {
                    format!("{reruns} re-runs were approved")
                };
                violations.push(format!(
                    "{what} executed {} times, allowed {allowed} ({why}); executions {:?}",
                    execs.len(),
                    execs
                ));
                suspects.insert(id.clone());
            }
            if ran_events.len() > 1 {
                violations.push(format!("{what} was journaled done {} times", ran_events.len()));
                suspects.insert(id.clone());
            }
            if let Some(done) = ran_events.first() {
                let done_ms = event_ms(done);
                for e in execs.iter().filter(|e| spin && e.start_ms > done_ms) {
                    violations.push(format!(
                        "{what} was journaled done at {done_ms} and executed again at {} on {}",
                        e.start_ms, e.host
                    ));
                    suspects.insert(id.clone());
                }
            }
            // A call moves to another execution only if the host of the previous one went away
            // (killed or stopped), or may have been unable to renew its lease because another
            // stopped host held the database's write lock for a good part of the lease.
            for pair in execs.windows(2).filter(|_| spin) {
                let (a, b) = (&pair[0], &pair[1]);
                let gone = shared.disrupted(&a.host, a.start_ms.saturating_sub(50), b.start_ms);
                let stalled = shared.stopped_ms(a.start_ms.saturating_sub(LEASE_MS), b.start_ms) >= LEASE_MS / 2;
                if a.host != "?" && !gone && !stalled {
                    violations.push(format!(
                        "{what} ran on {} at {} and again on {} at {} although {} was neither killed nor stopped \
                         in between (the lease of a live host lapsed)",
                        a.host, a.start_ms, b.host, b.start_ms, a.host
                    ));
                    suspects.insert(id.clone());
                }
            }
        }

        // Receipts of the job = its ledger.
        let mut receipt = (0u64, Decimal::ZERO, 0u64, 0u64);
        for e in &events {
            match e["event_type"].as_str() {
                Some("model.done") => {
                    let u = &e["data"]["usage"];
                    receipt.0 += u["input_tokens"].as_u64().unwrap_or(0) + u["output_tokens"].as_u64().unwrap_or(0);
                    receipt.1 += decimal(&u["cost"]);
                    receipt.2 += 1;
                }
                // Every attempt that started is charged once, whether it ended or was interrupted
                // (an interrupted attempt may have run: issue 8 item 5 charges it on resume).
                Some("tool.start") => receipt.3 += 1,
                _ => {}
            }
        }
        let usage = keel_json(&shared, &["ledger", "usage", "--job", &id, "--json"])["usage"].clone();
        let ledger = (
            usage["tokens"].as_u64().unwrap_or(0),
            decimal(&usage["cost"]),
            usage["requests"].as_u64().unwrap_or(0),
            usage["tool_calls"].as_u64().unwrap_or(0),
        );
        ledger_sum = (
            ledger_sum.0 + ledger.0,
            ledger_sum.1 + ledger.1,
            ledger_sum.2 + ledger.2,
            ledger_sum.3 + ledger.3,
        );
        if ledger != receipt {
            violations.push(format!(
                "j{} job {id}: ledger (tokens, cost, requests, tool calls) {ledger:?} != its receipts {receipt:?}",
                p.k
            ));
            suspects.insert(id.clone());
        }
    }
    if list.len() > plans.len() {
        violations.push(format!("{} jobs exist, {} were planned", list.len(), plans.len()));
    }

    // The scope's ledger is the sum of the jobs'.
    let total = keel_json(&shared, &["ledger", "usage", "--json"])["usage"].clone();
    let total = (
        total["tokens"].as_u64().unwrap_or(0),
        decimal(&total["cost"]),
        total["requests"].as_u64().unwrap_or(0),
        total["tool_calls"].as_u64().unwrap_or(0),
    );
    if total != ledger_sum {
        violations.push(format!("scope ledger {total:?} != sum over its jobs {ledger_sum:?}"));
    }

    // No deny budget overspent.
    let budgets = keel_json(&shared, &["budgets", "show", "--json"]);
    let mut budget_lines = Vec::new();
    for b in budgets.as_array().cloned().unwrap_or_default() {
        let (budget, used) = (&b["budget"], &b["used"]);
        let limits = &budget["limits"];
        budget_lines.push(format!("{}: used {used} of {limits}", budget["name"]));
        if budget["strategy"] != "deny" {
            continue;
        }
        for metric in ["tokens", "requests", "tool_calls"] {
            if let Some(max) = limits[format!("max_{metric}")].as_u64()
                && used[metric].as_u64().unwrap_or(0) > max
            {
                violations.push(format!(
                    "deny budget {} overspent: {metric} {} of {max}",
                    budget["name"], used[metric]
                ));
            }
        }
        if !limits["max_cost"].is_null() && decimal(&used["cost"]) > decimal(&limits["max_cost"]) {
            violations.push(format!(
                "deny budget {} overspent: cost {} of {}",
                budget["name"], used["cost"], limits["max_cost"]
            ));
        }
    }

    // The store's own invariants, after a sweep as if the holds' lifetime had passed.
    common::debug_expect(&shared.home, &["recover", "--advance-secs", "700", "--json"], 0);
    let out = common::keel_debug(&shared.home, &["check", "--scope", "default", "--recovered", "--json"])
        .output()
        .unwrap();
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(report) => {
            for v in report["violations"].as_array().cloned().unwrap_or_default() {
                violations.push(format!("keel-debug check: {}", v.as_str().unwrap_or_default()));
            }
        }
        Err(e) => violations.push(format!(
            "keel-debug check printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }

    let log = lock(&shared.log).clone();
    let summary = format!(
        "seed {seed}: {} jobs {states:?}; {executions} tool executions, {reruns_approved} re-runs approved, \
         {} approvals and {} denials answered; {kills} worker kills, {stops} stops, {run_kills} run kills; \
         drained in {drain:.1?}; chaos + drain {chaos_and_drain:.1?}; budgets: {}",
        plans.len(),
        shared.approved.load(Ordering::SeqCst),
        shared.denied.load(Ordering::SeqCst),
        budget_lines.join("; ")
    );
    eprintln!("{summary}");
    if !violations.is_empty() {
        let mut report = format!(
            "soak broke {} promises (replay with KEEL_SOAK_SEED={seed} KEEL_SOAK_SECS={chaos_secs}):\n",
            violations.len()
        );
        for v in &violations {
            report.push_str(&format!("  - {v}\n"));
        }
        for id in suspects.iter().take(6) {
            report.push_str(&format!("\nevents of job {id}:\n{}\n", listing(&events_of[id])));
            for a in actions.iter().filter(|a| a["job_id"] == id.as_str()) {
                report.push_str(&format!(
                    "    action {} {} {:?} call {} resolution {}\n",
                    a["id"], a["state"], a["title"], a["request"]["call_id"], a["resolution"]
                ));
            }
        }
        report.push_str("\nhosts killed or stopped (wall-clock ms):\n");
        for d in lock(&shared.disruptions).iter() {
            let to = if d.to == u64::MAX {
                "-".to_string()
            } else {
                d.to.to_string()
            };
            report.push_str(&format!("    {} {} {}..{to}\n", d.tag, d.what, d.from));
        }
        report.push_str(&format!("\nschedule and answers:\n{}\n\n{summary}", log.join("\n")));
        panic!("{report}");
    }
    assert!(kills > 0 && stops > 0, "the chaos never hit: {summary}");
    assert!(executions > 0, "no tool ran: {summary}");
    assert!(
        shared.approved.load(Ordering::SeqCst) > 0,
        "no approval was answered: {summary}"
    );
    assert!(
        chaos_and_drain < Duration::from_secs(chaos_secs + quiet_secs + 10),
        "took {chaos_and_drain:?}"
    );
}
