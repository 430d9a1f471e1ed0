//! A plugin built against `keel:plugin@0.2.0` (wit/ here is the 0.1.0 contract with the version
//! bumped): a 0.1 host must refuse it at install, naming both versions.

wit_bindgen::generate!({ world: "tool", path: "wit" });

use exports::keel::plugin::tools::Guest;
use keel::plugin::types::{CallContext, PluginInfo, ToolError, ToolOutput};

struct Future;

impl Guest for Future {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "future".into(),
            version: "9.0.0".into(),
            description: "From the future.".into(),
            tools: vec![],
        }
    }

    fn call(_ctx: CallContext, tool: String, _arguments: String) -> Result<ToolOutput, ToolError> {
        Err(ToolError::UnknownTool(tool))
    }
}

export!(Future);
