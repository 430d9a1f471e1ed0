//! The response bodies of `/v1/openapi.json`: one named schema per shape a route answers, and the
//! one error body. Documentation only (handlers build their JSON from keel-app's `Serialize`
//! results); entities whose types live in the kernel (jobs, actions, events, budgets, ...) are
//! documented as objects with their fields named in the description.

use utoipa::ToSchema;

/// Every error: `{"error": {"code", "message"}}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// A stable machine code and one sentence.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Stable code: `invalid_request`, `unauthorized`, `forbidden`, `not_found`, `no_route`,
    /// `rate_limited`, `host_not_allowed`, `origin_not_allowed`, `job_finished`, `action_not_pending`, `action_expired`,
    /// `illegal_transition`, `idempotency_key_reused`, `budget_exceeded`, `plugin_failed`,
    /// `method_not_allowed`, `payload_too_large`, `unsupported_media_type`, `internal`.
    #[schema(example = "not_found")]
    code: String,
    /// One sentence for humans.
    message: String,
}

/// A job: `id`, `tenant`, `principal`, `session`, `kind`, `state` (`QUEUED`, `RUNNING`,
/// `WAITING_ACTION`, `SUCCEEDED`, `FAILED`, `CANCELLED`, `TIMED_OUT`), `input`, `progress`,
/// `error`, `created_at`, `updated_at`, `finished_at`, ...
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct Job(serde_json::Value);

/// What a job came to: `job_id`, `status`, `output`, `tool_result`, `usage`, `error`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct JobResult(serde_json::Value);

/// `POST /v1/jobs`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobCreated {
    job: Job,
    /// False when a job with this idempotency key already existed (that job is returned).
    created: bool,
}

/// A page of jobs, newest first.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobPage {
    jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// A job and, once it ended, its result.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobWithResult {
    job: Job,
    /// Null while the job runs.
    result: Option<JobResult>,
}

/// One event (an SSE `data:` line): `id` (store id), `seq` (per job), `job_id`, `type`,
/// `data`, `at`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct RuntimeEvent(serde_json::Value);

/// A human-in-the-loop action: `id`, `job_id`, `kind`, `state`, `request` (tool and arguments),
/// `resolution`, `expires_at`, ... (never its resume token).
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct Action(serde_json::Value);

/// The scope's actions.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ActionList {
    actions: Vec<Action>,
}

/// A plugin: `name`, `version`, `sha256`, `tools` (with their schemas), `grants`, `limits`,
/// `owner`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct Plugin(serde_json::Value);

/// The plugins this scope can see.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PluginList {
    plugins: Vec<Plugin>,
}

/// `POST /v1/plugins`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PluginInstalled {
    plugin: Plugin,
    /// What the installer should know (e.g. requested capabilities not granted).
    notes: Vec<String>,
}

/// `DELETE /v1/plugins/{name}`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PluginRemoved {
    /// The plugin's name.
    removed: String,
}

/// Usage from the ledger: `tokens`, `cost` (decimal string), `requests`, `tool_calls`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct Usage(serde_json::Value);

/// A budget: `id`, `name`, `window`, `principal`, `session`, `limits`, `warn_ratio`, `strategy`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct Budget(serde_json::Value);

/// A budget with its usage in the current window.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct BudgetStatus(serde_json::Value);

/// The scope's budgets.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BudgetList {
    budgets: Vec<BudgetStatus>,
}

/// A policy decision: `outcome` (`allow`, `deny`, `require_approval`, `warn`), `reason`,
/// `applied_rules`, `violated_rules`.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct PolicyDecision(serde_json::Value);

/// A governed call's outcome: `job_id`, `status`, `tool_result` (output or error, receipt),
/// `error` (`{code, message}` when refused or failed).
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct CallOutcome(serde_json::Value);

/// A call still running (e.g. waiting for an approval).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CallPending {
    #[schema(value_type = String, format = Uuid)]
    job_id: uuid::Uuid,
    /// The job's state.
    status: String,
}

/// The OpenAPI document itself.
#[derive(ToSchema)]
#[schema(value_type = Object)]
#[allow(dead_code)]
pub struct OpenApiDocument(serde_json::Value);

/// Give every error response (4xx, 5xx) of every operation the [`ErrorBody`] schema, and add the
/// errors any `/v1` request can meet (400 bad input, 401 no key, 403 role or Host/Origin, 429 rate
/// limit, 500) where a route does not document them itself.
pub(crate) fn add_error_responses(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = || {
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build()
    };
    let common = [
        ("400", "Invalid request (`invalid_request`)"),
        ("401", "No or unknown API key (`unauthorized`)"),
        (
            "403",
            "The key's role is too low, or Host/Origin refused (`forbidden`, `host_not_allowed`, `origin_not_allowed`)",
        ),
        ("429", "Rate limit of this key (`rate_limited`; `Retry-After`)"),
        ("500", "Internal error (`internal`)"),
    ];
    for item in spec.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            for (status, description) in common {
                op.responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| ResponseBuilder::new().description(description).build().into());
            }
            for (status, response) in op.responses.responses.iter_mut() {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                if let utoipa::openapi::RefOr::T(response) = response {
                    response.content.insert("application/json".to_string(), error());
                }
            }
        }
    }
    let components = spec.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert("ErrorBody".into(), <ErrorBody as utoipa::PartialSchema>::schema());
    components
        .schemas
        .insert("ErrorDetail".into(), <ErrorDetail as utoipa::PartialSchema>::schema());
}
