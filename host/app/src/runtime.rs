//! An agent runtime over one Keel home: the durable kernel on SQLite, the model router, the
//! registry's sandboxed tools and the policy — what `run`, `call`, `jobs watch`, `worker`, `demo`
//! (and the server and MCP front ends) open to run jobs and governed tool calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_kernel::agent::new_job;
use keel_kernel::clock::SystemClock;
use keel_kernel::context::PolicyRef;
use keel_kernel::model::ModelProvider;
use keel_kernel::policy::{Policy, SessionApprovals, text_digest};
use keel_kernel::{AgentRuntime, ExecutionRequest, Kernel, KernelConfig};
use keel_models::ModelRouter;
use uuid::Uuid;

use crate::error::AppError;
use crate::home::App;
use crate::tools::RegistryToolHost;

/// The home's policy file, used when no `--policy` is given.
pub const DEFAULT_POLICY_FILE: &str = "policy.toml";

/// `PolicyRef::name` of a job run without a policy file.
pub const ALLOW_ALL: &str = "allow-all";

/// Test hook: when set (milliseconds), every model call of this process waits that long first, so
/// tests can stop a host deterministically in the middle of a turn. Only in builds with the
/// `testing` feature (the `keel` package's tests); a release `keel` ignores the variable.
#[cfg(feature = "testing")]
pub const MODEL_DELAY_ENV: &str = "KEEL_DEBUG_MODEL_DELAY_MS";

/// The policy a job runs under and how to find it again on resume.
pub struct PolicyChoice {
    /// The compiled policy.
    pub policy: Policy,
    /// Recorded with the job: the absolute file path (or [`ALLOW_ALL`]) and the file's sha256.
    pub reference: PolicyRef,
    /// Said to the user once (e.g. "no policy: allowing everything").
    pub note: Option<String>,
}

impl PolicyChoice {
    /// `--policy FILE`, else `$KEEL_HOME/policy.toml` if present, else allow-all (with a note).
    pub fn resolve(home: &Path, flag: Option<&Path>) -> Result<Self, AppError> {
        if let Some(path) = flag {
            return Self::file(path);
        }
        let default = home.join(DEFAULT_POLICY_FILE);
        // Anything there is the policy, readable or not (a dangling symlink, no permission): a
        // policy that cannot be read fails closed; only no entry at all means "no policy".
        match std::fs::symlink_metadata(&default) {
            Ok(_) => return Self::file(&default),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AppError::user(format!(
                    "cannot read the policy file {}: {e}",
                    default.display()
                )));
            }
        }
        Ok(Self {
            policy: Policy::allow_all(),
            reference: allow_all_reference(),
            note: Some(format!(
                "no policy file ({} missing, no --policy): every tool and model call is allowed",
                default.display()
            )),
        })
    }

    /// The policy a job recorded (`--policy` overrides it).
    pub fn of_job(home: &Path, recorded: &PolicyRef, flag: Option<&Path>) -> Result<Self, AppError> {
        if flag.is_some() || recorded.name.is_empty() {
            return Self::resolve(home, flag);
        }
        if recorded.name == ALLOW_ALL || recorded.source.is_some() {
            // The kernel applies the recorded text itself; this is only this host's default.
            return Ok(Self {
                policy: Policy::allow_all(),
                reference: recorded.clone(),
                note: None,
            });
        }
        let path = PathBuf::from(&recorded.name);
        if !path.exists() {
            return Err(AppError::user(format!(
                "the job's policy file {} no longer exists; pass --policy FILE to resume it under another policy",
                path.display()
            )));
        }
        let mut choice = Self::file(&path)?;
        if recorded.version.is_some() && choice.reference.version != recorded.version {
            choice.note = Some(format!(
                "{} changed since the job started; resuming under its current rules",
                path.display()
            ));
        }
        Ok(choice)
    }

    fn file(path: &Path) -> Result<Self, AppError> {
        let text = crate::files::read_regular_text(path, crate::files::MAX_POLICY_BYTES)
            .map_err(|e| AppError::user(format!("cannot read policy file {}: {e}", path.display())))?;
        let policy = Policy::from_toml_str(&text, &path.display().to_string())
            .map_err(|e| AppError::user(format!("invalid policy: {e}")))?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self {
            policy,
            // The text itself is recorded with the job: every host that runs it (a worker, a
            // `jobs watch`) applies exactly these rules, even if the file changes or is gone.
            reference: PolicyRef {
                name: absolute.display().to_string(),
                version: Some(text_digest(&text)),
                source: Some(text),
                ..PolicyRef::default()
            },
            note: None,
        })
    }
}

/// The policy of "allow everything", recorded as text like any other.
const ALLOW_ALL_TOML: &str = "default = \"allow\"\n";

/// The recorded reference of the allow-all policy (its text and sha256).
pub fn allow_all_reference() -> PolicyRef {
    PolicyRef {
        name: ALLOW_ALL.into(),
        version: Some(text_digest(ALLOW_ALL_TOML)),
        source: Some(ALLOW_ALL_TOML.into()),
        ..PolicyRef::default()
    }
}

/// Load a job's policy recorded by reference only (by a Keel before the text was recorded):
/// re-read the file and refuse it if it is gone or its sha256 changed.
pub fn load_recorded_policy(recorded: &PolicyRef) -> Result<Policy, String> {
    if recorded.name == ALLOW_ALL {
        return Ok(Policy::allow_all());
    }
    let override_hint = "`keel worker --override-policy` runs it under the worker's policy instead";
    let text =
        crate::files::read_regular_text(Path::new(&recorded.name), crate::files::MAX_POLICY_BYTES).map_err(|e| {
            format!(
                "the job's policy file {} cannot be read ({e}); {override_hint}",
                recorded.name
            )
        })?;
    let now = text_digest(&text);
    if recorded.version.as_deref() != Some(now.as_str()) {
        return Err(format!(
            "the job's policy file {} changed since the job was submitted; {override_hint}",
            recorded.name
        ));
    }
    Policy::from_toml_str(&text, &recorded.name).map_err(|e| e.to_string())
}

/// Expand `--tools` entries into the loop's patterns: a bare plugin name means all its tools.
pub fn tool_patterns(specs: &[String]) -> Vec<String> {
    specs
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.contains('/') || s.contains(['*', '?', '[', '{']) {
                s.to_string()
            } else {
                format!("{s}/*")
            }
        })
        .collect()
}

/// The [`MODEL_DELAY_ENV`] test hook, compiled only into test builds.
#[cfg(feature = "testing")]
mod model_delay {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::future::BoxFuture;
    use keel_kernel::model::{ModelDelta, ModelError, ModelPrice, ModelProvider, ModelRequest, ModelResponse};

    /// `models`, waiting [`super::MODEL_DELAY_ENV`] milliseconds before every call when it is set.
    pub fn wrap(models: Arc<dyn ModelProvider>) -> Arc<dyn ModelProvider> {
        match std::env::var(super::MODEL_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(ms) => Arc::new(Delayed {
                inner: models,
                delay: Duration::from_millis(ms),
            }),
            None => models,
        }
    }

    /// A [`ModelProvider`] that waits before every call.
    struct Delayed {
        inner: Arc<dyn ModelProvider>,
        delay: Duration,
    }

    impl ModelProvider for Delayed {
        fn complete<'a>(
            &'a self,
            request: &'a ModelRequest,
            on_delta: &'a (dyn Fn(ModelDelta) + Send + Sync),
        ) -> BoxFuture<'a, Result<ModelResponse, ModelError>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                self.inner.complete(request, on_delta).await
            })
        }

        fn check(&self, model: &str) -> Result<(), ModelError> {
            self.inner.check(model)
        }

        fn price(&self, model: &str) -> Option<ModelPrice> {
            self.inner.price(model)
        }
    }
}

/// One Keel home opened for agent work: kernel over SQLite, model router, sandboxed tools, policy.
pub struct AgentHost {
    /// The agent runtime (owner id unique to this process).
    pub rt: AgentRuntime,
    /// The kernel underneath.
    pub kernel: Kernel,
    /// How often to re-read the store (from `[agent] poll_ms`).
    pub poll: Duration,
    /// The policy choice (recorded with new jobs).
    pub policy: PolicyRef,
    /// Model providers configured (`provider` of `provider:model`).
    pub providers: Vec<String>,
    /// The model router (for up-front checks).
    pub models: Arc<dyn ModelProvider>,
    /// The Keel home it was opened from.
    pub app: Arc<App>,
    /// Held (shared) by every call [`start_call`](Self::start_call) is running, each on a task of
    /// its own; [`finish_calls`](Self::finish_calls) takes it exclusively.
    pub(crate) in_flight: Arc<tokio::sync::RwLock<()>>,
}

/// Changes a plugin's effective limits for every call of one host (e.g. `keel call --timeout`).
pub type LimitOverride = Arc<dyn Fn(&keel_sandbox::Limits) -> Result<keel_sandbox::Limits, String> + Send + Sync>;

impl AgentHost {
    /// Open `home` with the plugins the tool `patterns` can reach (all installed plugins when `None`).
    pub async fn open(home: &Path, patterns: Option<&[String]>, policy: PolicyChoice) -> Result<Self, AppError> {
        Self::open_with(home, patterns, policy, None, true).await
    }

    /// [`AgentHost::open`], with every plugin's limits passed through `limits` first; with
    /// `warm`, the plugins `patterns` name are loaded now (a broken one is reported at once).
    pub async fn open_with(
        home: &Path,
        patterns: Option<&[String]>,
        policy: PolicyChoice,
        limits: Option<LimitOverride>,
        warm: bool,
    ) -> Result<Self, AppError> {
        let app = Arc::new(App::open(home).await?);
        Self::open_on(app, patterns, policy, limits, warm, None, false).await
    }

    /// [`AgentHost::open_with`] on a home already opened as `app` (a one-shot command that
    /// looked something up first opens the database and engine once, not twice), with the tool
    /// calls' guest output streamed where `stdio` says.
    pub async fn open_app_with_stdio(
        app: Arc<App>,
        patterns: Option<&[String]>,
        policy: PolicyChoice,
        limits: Option<LimitOverride>,
        warm: bool,
        stdio: Option<crate::tools::StdioSinks>,
    ) -> Result<Self, AppError> {
        Self::open_on(app, patterns, policy, limits, warm, stdio, false).await
    }

    /// An `AgentHost` over the home's plugins, config and policy whose jobs, events, ledger and
    /// journal live in the kernel's in-memory store: nothing is written durably and nothing
    /// survives the process. For measuring the governed call path alone (policy, budget check,
    /// events, receipt, sandboxed call) without the database's commits; never for real work.
    /// Several may share one `app` (its sandbox, plugins and registry), each with its own store.
    pub async fn open_in_memory(app: Arc<App>, policy: PolicyChoice) -> Result<Self, AppError> {
        Self::open_on(app, None, policy, None, false, None, true).await
    }

    async fn open_on(
        app: Arc<App>,
        patterns: Option<&[String]>,
        policy: PolicyChoice,
        limits: Option<LimitOverride>,
        warm: bool,
        stdio: Option<crate::tools::StdioSinks>,
        in_memory: bool,
    ) -> Result<Self, AppError> {
        let agent = app.config.agent.clone();
        let poll = Duration::from_millis(agent.poll_ms.max(1));
        let config = KernelConfig {
            // Actions are resolved from other `keel` processes on the same database.
            action_recheck_ms: Some(agent.poll_ms.max(1)),
            ..KernelConfig::default()
        };
        let store: Arc<dyn keel_kernel::store::KernelStore> = if in_memory {
            Arc::new(keel_kernel::memory::MemoryStore::new())
        } else {
            Arc::new(app.db.kernel_store())
        };
        let kernel = Kernel::with_clock(store, Arc::new(SystemClock), config);
        let router = ModelRouter::from_config(&app.config.models)
            .map_err(|e| AppError::user(format!("[models] in config.toml: {e}")))?;
        let providers = router.provider_names().into_iter().map(str::to_string).collect();
        let models: Arc<dyn ModelProvider> = Arc::new(router);
        #[cfg(feature = "testing")]
        let models = model_delay::wrap(models);
        let mut tools = load_tools(app.clone(), patterns, limits, warm).await?;
        tools.stdio = stdio;
        let rt = AgentRuntime::new(
            kernel.clone(),
            models.clone(),
            Arc::new(tools),
            Arc::new(policy.policy),
            Arc::new(SessionApprovals::new()),
            agent,
        );
        rt.set_policy_loader(Arc::new(load_recorded_policy));
        Ok(Self {
            rt,
            kernel,
            poll,
            policy: policy.reference,
            providers,
            models,
            app,
            in_flight: Arc::default(),
        })
    }

    /// Wait until every call started on this host ([`start_call`](Self::start_call)) has ended
    /// and been recorded: a server whose client went away (or that is told to stop) finishes the
    /// calls in flight before it exits, as each runs on a task of its own that the runtime's
    /// shutdown would drop midway. Each is bounded by its tool's deadline.
    pub async fn finish_calls(&self) {
        let _all_done = self.in_flight.write().await;
    }
}

/// The tool host for the installed plugins that `patterns` (`plugin/tool` globs) can match (all
/// when `None`). Plugins are keyed by their registry name and loaded when first called; one that
/// cannot be loaded is reported and skipped, never fatal. Named patterns are loaded up front, so
/// `keel run` reports a broken plugin before the job starts.
async fn load_tools(
    app: Arc<App>,
    patterns: Option<&[String]>,
    limits: Option<LimitOverride>,
    warm: bool,
) -> Result<RegistryToolHost, AppError> {
    let host = RegistryToolHost::new(app, patterns).await?.with_limits(limits);
    if warm && patterns.is_some() {
        host.warm().await?;
    }
    Ok(host)
}

/// Create `request` as a QUEUED agent job without running it here (`--detach`): the next worker
/// claims it at once, since no lease is held.
pub async fn enqueue(kernel: &Kernel, request: &ExecutionRequest) -> Result<(Uuid, bool), AppError> {
    // The same job `AgentRuntime::execute` creates, minus claiming it.
    let new = new_job(request, kernel.clock().now()).map_err(agent_error)?;
    let created = kernel.jobs().create(new).await?;
    Ok((created.job.id, created.created))
}

/// Map an agent API error to the use cases'.
pub fn agent_error(e: keel_kernel::agent::AgentError) -> AppError {
    match e {
        keel_kernel::agent::AgentError::Invalid(m) => AppError::user(m),
        keel_kernel::agent::AgentError::Kernel(k) => k.into(),
    }
}
