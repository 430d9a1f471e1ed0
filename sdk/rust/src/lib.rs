//! # keel-sdk — write Keel tool plugins in Rust
//!
//! A Keel plugin is a WebAssembly component implementing the `keel:plugin/tool` world. With this
//! crate a tool is an ordinary typed function: its input is any `serde` + `schemars` type, its output
//! any serializable type, and the JSON Schemas, `describe`, argument parsing and error mapping are
//! generated. No WIT glue is written by hand.
//!
//! ```ignore
//! use keel_sdk::prelude::*;
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Greet { /// Who to greet.
//!     name: String }
//!
//! fn greet(_ctx: &Context, input: Greet) -> Result<String, ToolError> {
//!     Ok(format!("Hello, {}!", input.name))
//! }
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     fn meta() -> PluginMeta { PluginMeta::new("hello", env!("CARGO_PKG_VERSION"), "Greets people.") }
//!     fn tools() -> Vec<Tool> { vec![Tool::new("greet", "Greet someone by name.", greet).idempotent()] }
//! }
//! keel_sdk::export_plugin!(Hello);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` is the component.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[doc(hidden)]
#[allow(missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "tool",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_keel_tool",
        default_bindings_module: "keel_sdk::bindings",
    });
}

use bindings::exports::keel::plugin::tools::Guest;
use bindings::keel::plugin::host;
use bindings::keel::plugin::types as wit;

pub use bindings::keel::plugin::host::LogLevel;
pub use schemars::JsonSchema;
pub use serde;
pub use serde_json;

/// Everything a tool crate usually needs.
pub mod prelude {
    pub use crate::{Context, LogLevel, Plugin, PluginMeta, Tool, ToolError};
    pub use schemars::JsonSchema;
    pub use serde::{Deserialize, Serialize};
    pub use serde_json::{Value, json};
}

/// Why a tool failed; becomes the WIT `tool-error` variant seen by the host.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolError {
    /// The arguments were unusable.
    InvalidInput(String),
    /// A capability was missing: `capability` is `filesystem`, `network` or `environment`.
    Denied {
        /// Kind of capability.
        capability: String,
        /// The path, host or variable that was refused.
        target: String,
        /// One sentence for a human.
        message: String,
    },
    /// The tool failed.
    Failed(String),
    /// The tool gave up because time ran out.
    TimedOut(String),
}

impl ToolError {
    /// A generic failure with a message.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }

    /// Invalid arguments.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    /// A missing capability.
    pub fn denied(capability: &str, target: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Denied {
            capability: capability.into(),
            target: target.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolError::InvalidInput(m) => write!(f, "invalid input: {m}"),
            ToolError::Denied { message, .. } => write!(f, "denied: {message}"),
            ToolError::Failed(m) => write!(f, "{m}"),
            ToolError::TimedOut(m) => write!(f, "timed out: {m}"),
        }
    }
}

impl std::error::Error for ToolError {}

impl From<ToolError> for wit::ToolError {
    fn from(error: ToolError) -> Self {
        match error {
            ToolError::InvalidInput(m) => wit::ToolError::InvalidInput(m),
            ToolError::Denied {
                capability,
                target,
                message,
            } => wit::ToolError::Denied(wit::DeniedAccess {
                capability,
                target,
                message,
            }),
            ToolError::Failed(m) => wit::ToolError::Failed(m),
            ToolError::TimedOut(m) => wit::ToolError::TimedOut(m),
        }
    }
}

/// The call's context: identity, deadline, and the host's logging and progress functions.
#[derive(Debug, Clone)]
pub struct Context {
    /// Unique id of this call.
    pub call_id: String,
    /// The kernel job, if any.
    pub job_id: Option<String>,
    /// Tenant scope.
    pub scope: String,
    /// Principal on whose behalf the call runs.
    pub principal: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// Milliseconds left when the call started.
    pub deadline_ms: u64,
}

impl Context {
    /// Write a line to the host log.
    pub fn log(&self, level: LogLevel, message: &str) {
        host::log(level, message);
    }

    /// Report progress (`fraction` in 0.0..=1.0 when known).
    pub fn progress(&self, fraction: Option<f32>, message: &str) {
        host::progress(fraction, message);
    }
}

impl From<wit::CallContext> for Context {
    fn from(ctx: wit::CallContext) -> Self {
        Self {
            call_id: ctx.call_id,
            job_id: ctx.job_id,
            scope: ctx.scope,
            principal: ctx.principal,
            trace_id: ctx.trace_id,
            deadline_ms: ctx.deadline_ms,
        }
    }
}

/// Name, version and description of a plugin.
#[derive(Debug, Clone)]
pub struct PluginMeta {
    name: String,
    version: String,
    description: String,
}

impl PluginMeta {
    /// Describe a plugin. `name` must be `[a-z0-9_-]+`.
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            description: description.into(),
        }
    }
}

type Handler = Box<dyn Fn(&Context, &str) -> Result<String, ToolError>>;
type SchemaFn = fn() -> String;

/// One tool: a typed handler plus what it needs.
pub struct Tool {
    name: String,
    description: String,
    handler: Handler,
    input_schema: SchemaFn,
    output_schema: SchemaFn,
    capabilities: wit::Capabilities,
    idempotent: bool,
}

fn schema_of<T: JsonSchema>() -> String {
    serde_json::to_string(&schemars::schema_for!(T)).expect("a JSON Schema always serializes")
}

impl Tool {
    /// A tool named `name` running `handler`. Schemas come from the handler's input and output types
    /// and are only generated when the host asks for them (`describe`), not on every call.
    pub fn new<I, O, F>(name: &str, description: &str, handler: F) -> Self
    where
        I: DeserializeOwned + JsonSchema,
        O: Serialize + JsonSchema,
        F: Fn(&Context, I) -> Result<O, ToolError> + 'static,
    {
        let _types = PhantomData::<(I, O)>;
        Self {
            name: name.into(),
            description: description.into(),
            handler: Box::new(move |ctx, arguments| {
                let input: I = serde_json::from_str(arguments)
                    .map_err(|e| ToolError::InvalidInput(format!("arguments do not match the input schema: {e}")))?;
                let output = handler(ctx, input)?;
                serde_json::to_string(&output).map_err(|e| ToolError::Failed(format!("output is not JSON: {e}")))
            }),
            input_schema: schema_of::<I>,
            output_schema: schema_of::<O>,
            capabilities: wit::Capabilities {
                filesystem: vec![],
                network: vec![],
                environment: vec![],
            },
            idempotent: false,
        }
    }

    /// Mark the tool idempotent: re-running an interrupted call is safe.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Request read access to `path`.
    pub fn reads(mut self, path: &str) -> Self {
        self.capabilities.filesystem.push(wit::FsRequest {
            path: path.into(),
            mode: wit::FsMode::Read,
        });
        self
    }

    /// Request read-write access to `path`.
    pub fn writes(mut self, path: &str) -> Self {
        self.capabilities.filesystem.push(wit::FsRequest {
            path: path.into(),
            mode: wit::FsMode::ReadWrite,
        });
        self
    }

    /// Request outbound HTTP to `host` (`host`, `*.host`, optional `:port`).
    pub fn connects(mut self, host: &str) -> Self {
        self.capabilities.network.push(host.into());
        self
    }

    /// Request the environment variable `name`.
    pub fn env(mut self, name: &str) -> Self {
        self.capabilities.environment.push(name.into());
        self
    }

    fn info(&self) -> wit::ToolInfo {
        wit::ToolInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            input_schema: (self.input_schema)(),
            output_schema: Some((self.output_schema)()),
            capabilities: self.capabilities.clone(),
            idempotent: self.idempotent,
        }
    }
}

/// A plugin: its metadata and its tools. Implement it on a unit struct and call [`export_plugin!`].
pub trait Plugin {
    /// Name, version and description.
    fn meta() -> PluginMeta;
    /// The tools offered.
    fn tools() -> Vec<Tool>;
}

/// Adapter from a [`Plugin`] to the generated WIT export trait. Used by [`export_plugin!`].
#[doc(hidden)]
pub struct Exported<P>(PhantomData<P>);

impl<P: Plugin> Guest for Exported<P> {
    fn describe() -> wit::PluginInfo {
        let meta = P::meta();
        wit::PluginInfo {
            name: meta.name,
            version: meta.version,
            description: meta.description,
            tools: P::tools().iter().map(Tool::info).collect(),
        }
    }

    fn call(ctx: wit::CallContext, tool: String, arguments: String) -> Result<wit::ToolOutput, wit::ToolError> {
        let tools = P::tools();
        let Some(found) = tools.iter().find(|t| t.name == tool) else {
            return Err(wit::ToolError::UnknownTool(tool));
        };
        let ctx = Context::from(ctx);
        (found.handler)(&ctx, &arguments)
            .map(|json| wit::ToolOutput { json })
            .map_err(Into::into)
    }
}

/// Export a [`Plugin`] as the component's `keel:plugin/tools` implementation.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        type __KeelExportedPlugin = $crate::Exported<$plugin>;
        $crate::bindings::__export_keel_tool!(__KeelExportedPlugin with_types_in $crate::bindings);
    };
}
