//! The typed journal of a job: every non-deterministic input that entered it (the tools it saw, a
//! model response, a tool call started and its result, an approval asked and answered, the final
//! outcome), one [`Entry`] per step [`key`].
//!
//! The store keeps an entry as `(key, kind, payload)` (see [`crate::store::NewJournalEntry`]); this
//! module is the only place that writes or reads those columns, so recovery and replay see typed
//! values, never `v["content"]` look-ups. Each payload carries the journal schema version `v`;
//! entries written before the version existed read as version 1 (the same shapes).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::job::{JobError, JobState};
use crate::json::JsonText;
use crate::model::ModelResponse;
use crate::tool::{Diagnostics, Receipt, ToolDescriptor, ToolError};

/// The schema version this kernel writes; it reads every version up to it.
pub const SCHEMA_VERSION: u32 = 1;

/// One journal entry.
// A few hundred bytes each, a handful per job step: boxing the tool result would cost an
// allocation per entry for no measurable gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// The tools the job may call, fixed at its first step (a resumed job sees the same set).
    Tools(ToolsChosen),
    /// A model call was made (its hold is reserved; the request goes out next): a host that
    /// stops before its answer is journaled leaves this, so the next one charges the request.
    ModelStarted(ModelStarted),
    /// A model's answer for one turn.
    ModelResponse(ModelResponse),
    /// A tool call attempt started (its hold is reserved; its outcome is not known yet).
    ToolStarted(ToolStarted),
    /// A tool call's outcome as the model sees it (it ran, or it was refused before running).
    ToolResult(ToolResult),
    /// An approval was asked for (the action exists).
    ApprovalRequested(ApprovalRequested),
    /// An approval was answered.
    Approval(ApprovalAnswered),
    /// The job's outcome.
    Final(Final),
}

/// Payload of [`Entry::Tools`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolsChosen {
    /// The tools, as the tool host described them.
    pub tools: Vec<ToolDescriptor>,
}

/// Payload of [`Entry::ModelStarted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStarted {
    /// The budget hold of this attempt.
    pub reservation_id: Uuid,
    /// The model asked.
    pub model: String,
    /// The prompt's estimate, in tokens (what an interrupted attempt is charged).
    pub input_tokens: u64,
}

/// Payload of [`Entry::ToolStarted`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolStarted {
    /// The budget hold of this attempt.
    pub reservation_id: Uuid,
    /// `plugin/tool`.
    pub tool: String,
    /// The model's id of the call.
    pub call_id: String,
    /// Attempt number, from 0.
    pub attempt: u32,
}

/// Payload of [`Entry::ToolResult`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    /// The text the model sees (the output, or `error (...)` / a refusal sentence).
    pub content: String,
    /// True when the call failed or was refused.
    pub is_error: bool,
    /// Machine-readable error code (`policy_denied`, `invalid_input`, a tool error kind, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// True when the tool actually ran (and was charged).
    pub ran: bool,
    /// `plugin/tool`.
    pub tool: String,
    /// The tool's JSON output, when it succeeded (`Some(null)` when that output is `null`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub output: Option<Value>,
    /// The tool's error, when it ran and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ToolError>,
    /// What the call cost, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    /// What the tool said besides its result.
    #[serde(default, skip_serializing_if = "Diagnostics::is_empty")]
    pub diagnostics: Diagnostics,
}

/// A field that is there is `Some`, even when it is `null` (serde reads a `null` `Option` as
/// `None`, which would turn a tool's `null` output into no output at all).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// How the model's text of a refused call begins (`content` of a refusal).
pub(crate) const REFUSAL_PREFIX: &str = "error: ";

impl ToolResult {
    /// Why the call failed or was refused, for people and programs (a job's error, `keel call`,
    /// MCP, the API), without the framing `content` gives it for the model (`error (kind): ` for
    /// a tool's error, `error: ` for a refusal): the kind is [`code`](Self::code) already.
    pub fn reason(&self) -> String {
        match &self.error {
            Some(e) => e.to_string(),
            None => self
                .content
                .strip_prefix(REFUSAL_PREFIX)
                .unwrap_or(&self.content)
                .to_string(),
        }
    }
}

/// Payload of [`Entry::ApprovalRequested`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    /// The action asking for it.
    pub action_id: Uuid,
}

/// Payload of [`Entry::Approval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalAnswered {
    /// The action that was answered.
    pub action_id: Uuid,
    /// Whether the call may run.
    pub approved: bool,
    /// Approved for the whole session.
    #[serde(default)]
    pub session: bool,
    /// Who answered, when known.
    #[serde(default)]
    pub resolved_by: Option<String>,
}

/// Payload of [`Entry::Final`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Final {
    /// The job's terminal state.
    pub status: JobState,
    /// The final answer (SUCCEEDED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Why it failed (FAILED / TIMED_OUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

/// A journal entry that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Written by a newer Keel.
    #[error("journal entry `{key}` has schema version {found}; this Keel reads up to {SCHEMA_VERSION}")]
    Version {
        /// The entry's key.
        key: String,
        /// Its version.
        found: u64,
    },
    /// An unknown kind.
    #[error("journal entry `{key}` has unknown kind `{kind}`")]
    Kind {
        /// The entry's key.
        key: String,
        /// Its kind.
        kind: String,
    },
    /// A payload that does not match its kind.
    #[error("journal entry `{key}` ({kind}) is malformed: {message}")]
    Payload {
        /// The entry's key.
        key: String,
        /// Its kind.
        kind: String,
        /// Why.
        message: String,
    },
}

impl Entry {
    /// The stored `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Tools(_) => "tools",
            Entry::ModelStarted(_) => "model_started",
            Entry::ModelResponse(_) => "model_response",
            Entry::ToolStarted(_) => "tool_started",
            Entry::ToolResult(_) => "tool_result",
            Entry::ApprovalRequested(_) => "approval_requested",
            Entry::Approval(_) => "approval",
            Entry::Final(_) => "final",
        }
    }

    /// The stored payload: the variant's fields plus `v`, the schema version, serialised once.
    pub fn payload(&self) -> JsonText {
        fn versioned<T: Serialize>(fields: &T) -> Result<JsonText, serde_json::Error> {
            #[derive(Serialize)]
            struct Versioned<'a, T> {
                #[serde(flatten)]
                fields: &'a T,
                v: u32,
            }
            JsonText::of(&Versioned {
                fields,
                v: SCHEMA_VERSION,
            })
        }
        let text = match self {
            Entry::Tools(p) => versioned(p),
            Entry::ModelStarted(p) => versioned(p),
            Entry::ModelResponse(p) => versioned(p),
            Entry::ToolStarted(p) => versioned(p),
            Entry::ToolResult(p) => versioned(p),
            Entry::ApprovalRequested(p) => versioned(p),
            Entry::Approval(p) => versioned(p),
            Entry::Final(p) => versioned(p),
        };
        // Plain data structs (a unit test encodes each): serialising them cannot fail.
        text.expect("a journal entry serialises")
    }

    /// Read a stored entry back.
    pub fn decode(key: &str, kind: &str, payload: &JsonText) -> Result<Entry, DecodeError> {
        #[derive(Deserialize)]
        struct Version {
            v: Option<u64>,
        }
        let malformed = |e: serde_json::Error| DecodeError::Payload {
            key: key.to_string(),
            kind: kind.to_string(),
            message: e.to_string(),
        };
        let version = payload.decode::<Version>().map_err(malformed)?.v.unwrap_or(1);
        if version > u64::from(SCHEMA_VERSION) {
            return Err(DecodeError::Version {
                key: key.to_string(),
                found: version,
            });
        }
        Ok(match kind {
            "tools" => Entry::Tools(payload.decode().map_err(malformed)?),
            "model_started" => Entry::ModelStarted(payload.decode().map_err(malformed)?),
            "model_response" => Entry::ModelResponse(payload.decode().map_err(malformed)?),
            "tool_started" => Entry::ToolStarted(payload.decode().map_err(malformed)?),
            "tool_result" => Entry::ToolResult(payload.decode().map_err(malformed)?),
            "approval_requested" => Entry::ApprovalRequested(payload.decode().map_err(malformed)?),
            "approval" => Entry::Approval(payload.decode().map_err(malformed)?),
            "final" => Entry::Final(payload.decode().map_err(malformed)?),
            other => {
                return Err(DecodeError::Kind {
                    key: key.to_string(),
                    kind: other.to_string(),
                });
            }
        })
    }
}

/// Decode a job's stored journal (as [`crate::store::KernelStore::read_journal`] returns it), in order.
pub fn decode_all(entries: &[crate::store::JournalEntry]) -> Result<Vec<(String, Entry)>, DecodeError> {
    entries
        .iter()
        .map(|e| Entry::decode(&e.entry.key, &e.entry.kind, &e.entry.payload).map(|d| (e.entry.key.clone(), d)))
        .collect()
}

/// The stored form of `entry` at `key` of job `job_id`.
pub fn encode(
    job_id: Uuid,
    key: String,
    entry: &Entry,
    at: chrono::DateTime<chrono::Utc>,
) -> crate::store::NewJournalEntry {
    crate::store::NewJournalEntry {
        job_id,
        key,
        kind: entry.kind().to_string(),
        payload: entry.payload(),
        at,
    }
}

/// Step keys: unique per job, the same on every (re-)run of the same step, so a re-run finds what
/// an earlier run journaled. Keys are part of the stored format: never change one.
pub mod key {
    /// The tool set, chosen once.
    pub const TOOLS: &str = "tools";
    /// The job's outcome.
    pub const FINAL: &str = "final";

    /// The model response of `turn` (from 1).
    pub fn model(turn: u32) -> String {
        format!("t{turn}/model")
    }

    /// Attempt `attempt` (from 0) of the model call of `turn` started.
    pub fn model_started(turn: u32, attempt: u32) -> String {
        format!("t{turn}/model/started{attempt}")
    }

    /// The approval of the model call of `turn`.
    pub fn model_approval(turn: u32) -> String {
        format!("t{turn}/model/approval")
    }

    /// The base key of tool call `idx` of `turn`; the call's own entries hang below it.
    pub fn call(turn: u32, idx: usize) -> String {
        format!("t{turn}/c{idx}")
    }

    /// The turn a turn's key (`t{turn}/...`, see [`model`], [`call`]) belongs to.
    pub fn turn_of(key: &str) -> Option<u32> {
        key.strip_prefix('t')?.split('/').next()?.parse().ok()
    }

    /// The outcome of the call at `base`.
    pub fn result(base: &str) -> String {
        format!("{base}/result")
    }

    /// Attempt `attempt` of the call at `base` started.
    pub fn started(base: &str, attempt: u32) -> String {
        if attempt == 0 {
            format!("{base}/started")
        } else {
            format!("{base}/retry{attempt}/started")
        }
    }

    /// The policy approval of the call at `base`.
    pub fn approval(base: &str) -> String {
        format!("{base}/approval")
    }

    /// The approval to re-run the call at `base` after attempt `attempt` was interrupted.
    pub fn rerun(base: &str, attempt: u32) -> String {
        format!("{base}/rerun{attempt}")
    }

    /// The answer to the approval asked at `key`.
    pub fn resolved(key: &str) -> String {
        format!("{key}/resolved")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_round_trip_with_their_version() {
        let entry = Entry::ToolResult(ToolResult {
            content: "{}".into(),
            is_error: false,
            code: None,
            ran: true,
            tool: "hello/greet".into(),
            output: Some(json!({})),
            error: None,
            receipt: Some(Receipt {
                wall_us: 12,
                ..Receipt::default()
            }),
            diagnostics: Diagnostics::default(),
        });
        let payload = entry.payload();
        assert_eq!(payload.field("v"), Some(json!(1)));
        assert_eq!(Entry::decode("t1/c0/result", entry.kind(), &payload).unwrap(), entry);
    }

    /// A tool's `null` output stays an output: it was read back as none, and `keel call` of a
    /// tool returning `null` failed with "the call ended SUCCEEDED".
    #[test]
    fn a_null_output_is_an_output() {
        let mut result: ToolResult = serde_json::from_value(json!({
            "content": "null", "is_error": false, "ran": true, "tool": "t/n", "output": null
        }))
        .unwrap();
        assert_eq!(result.output, Some(Value::Null));
        result.output = None;
        let absent = serde_json::to_value(&result).unwrap();
        assert_eq!(serde_json::from_value::<ToolResult>(absent).unwrap().output, None);
    }

    /// Every kind's payload is an object its version is added to (`payload` relies on it).
    #[test]
    fn every_kind_encodes_and_decodes() {
        let action_id = Uuid::now_v7();
        let response: crate::model::ModelResponse = serde_json::from_value(json!({
            "message": crate::model::Message::assistant("hi", vec![]),
            "finish_reason": "stop",
            "usage": {"input_tokens": 1, "output_tokens": 2, "cost": "0.25"},
            "model": "m",
        }))
        .unwrap();
        let entries = [
            Entry::Tools(ToolsChosen { tools: vec![] }),
            Entry::ModelStarted(ModelStarted {
                reservation_id: action_id,
                model: "m".into(),
                input_tokens: 12,
            }),
            Entry::ModelResponse(response),
            Entry::ToolStarted(ToolStarted {
                reservation_id: action_id,
                tool: "p/t".into(),
                call_id: "c0".into(),
                attempt: 1,
            }),
            Entry::ApprovalRequested(ApprovalRequested { action_id }),
            Entry::Approval(ApprovalAnswered {
                action_id,
                approved: true,
                session: false,
                resolved_by: None,
            }),
            Entry::Final(Final {
                status: JobState::Succeeded,
                content: Some("done".into()),
                error: None,
            }),
        ];
        for entry in entries {
            let payload = entry.payload();
            assert_eq!(payload.field("v"), Some(json!(SCHEMA_VERSION)), "{payload}");
            assert_eq!(Entry::decode("k", entry.kind(), &payload).unwrap(), entry);
        }
    }

    #[test]
    fn entries_written_before_versions_read_as_version_one() {
        let old = json!({ "content": "hi", "is_error": false, "ran": true, "tool": "hello/greet" });
        match Entry::decode("t1/c0/result", "tool_result", &old.into()).unwrap() {
            Entry::ToolResult(r) => assert_eq!((r.content.as_str(), r.output, r.receipt), ("hi", None, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn newer_versions_and_unknown_kinds_are_refused_by_name() {
        let newer = json!({ "v": 2, "action_id": Uuid::nil() });
        let err = Entry::decode("k", "approval_requested", &newer.into()).unwrap_err();
        assert!(err.to_string().contains("schema version 2"), "{err}");
        let err = Entry::decode("k", "telepathy", &json!({}).into()).unwrap_err();
        assert!(err.to_string().contains("unknown kind `telepathy`"), "{err}");
        let err = Entry::decode("k", "tool_started", &json!({ "tool": 5 }).into()).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}
