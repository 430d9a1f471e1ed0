//! The tools MCP clients see: the installed tools that the `[mcp]` filter lets through, each
//! with its MCP name, JSON Schemas and annotations.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use keel_app::keel_kernel::tool::{ToolDescriptor, ToolHost as _};
use keel_app::tools::RegistryToolHost;
use keel_app::{AppError, home::McpSettings};
use rmcp::model::{JsonObject, MetaObject, Tool, ToolAnnotations};

use crate::names::mcp_name;

/// Which `plugin/tool` names the server offers (`[mcp] tools` / `exclude`).
#[derive(Debug, Clone)]
pub struct ToolFilter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl ToolFilter {
    /// The filter of `settings`; a bad glob is a user error naming it.
    pub fn new(settings: &McpSettings) -> Result<Self, AppError> {
        let build = |patterns: &[String], key: &str| -> Result<GlobSet, AppError> {
            let mut set = GlobSetBuilder::new();
            // A pattern without `/` names plugins: all their tools (`*` alone: every tool).
            let expanded = patterns.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).map(|p| {
                if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/*")
                }
            });
            for p in expanded {
                // `*` stays within one path segment: `hello/*` never reaches another plugin.
                let glob = globset::GlobBuilder::new(&p)
                    .literal_separator(true)
                    .build()
                    .or_else(|_| Glob::new(&p))
                    .map_err(|e| AppError::user(format!("[mcp] {key}: bad pattern {p:?}: {e}")))?;
                set.add(glob);
            }
            set.build().map_err(|e| AppError::user(format!("[mcp] {key}: {e}")))
        };
        Ok(Self {
            include: (!settings.tools.is_empty())
                .then(|| build(&settings.tools, "tools"))
                .transpose()?,
            exclude: build(&settings.exclude, "exclude")?,
        })
    }

    /// Whether `plugin/tool` is offered.
    pub fn allows(&self, tool: &str) -> bool {
        self.include.as_ref().is_none_or(|set| set.is_match(tool)) && !self.exclude.is_match(tool)
    }
}

/// One offered tool.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `plugin/tool`, as the kernel names it.
    pub keel: String,
    /// What `tools/list` says about it.
    pub tool: Tool,
}

/// The offered tools, by MCP name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// In registry order (plugins by name, tools as described).
    pub entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl Catalog {
    /// Read the registry now.
    pub async fn load(tools: &RegistryToolHost, filter: &ToolFilter) -> Result<Self, AppError> {
        let described = tools
            .list_tools()
            .await
            .map_err(|e| AppError::internal(e.to_string()))?;
        let mut catalog = Catalog::default();
        for d in described {
            let keel = format!("{}/{}", d.plugin, d.name);
            if !filter.allows(&keel) {
                continue;
            }
            let tool = mcp_tool(&d);
            catalog.by_name.insert(tool.name.to_string(), catalog.entries.len());
            catalog.entries.push(Entry { keel, tool });
        }
        Ok(catalog)
    }

    /// The tool with MCP name `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// A fingerprint of what `tools/list` would answer: changes when a plugin is installed,
    /// upgraded (its tools or schemas change) or removed.
    pub fn fingerprint(&self) -> String {
        let tools: Vec<&Tool> = self.entries.iter().map(|e| &e.tool).collect();
        serde_json::to_string(&tools).unwrap_or_default()
    }
}

/// The MCP description of a Keel tool.
fn mcp_tool(d: &ToolDescriptor) -> Tool {
    let input = match &d.input_schema {
        serde_json::Value::Object(map) if map.get("type").is_none_or(|t| t == "object") => {
            let mut map = map.clone();
            map.entry("type").or_insert_with(|| "object".into());
            map
        }
        // MCP requires an object schema: a tool that published none (or another kind) takes
        // any arguments object, and the kernel's schema check still applies its own.
        _ => JsonObject::from_iter([("type".to_string(), serde_json::Value::from("object"))]),
    };
    let mut tool = Tool::new(mcp_name(&d.plugin, &d.name), d.description.clone(), Arc::new(input))
        .with_title(format!("{}/{}", d.plugin, d.name));
    // The output schema is published under `_meta` (`keel/outputSchema`), not as `outputSchema`:
    // every failed call answers structured content `{error, job_id}`, which clients (the
    // TypeScript SDK) validate against `outputSchema` even in `isError` results.
    if let Some(schema) = &d.output_schema {
        tool = tool.with_meta(MetaObject(JsonObject::from_iter([(
            "keel/outputSchema".to_string(),
            schema.clone(),
        )])));
    }
    let mut annotations = ToolAnnotations::with_title(format!("{}/{}", d.plugin, d.name));
    if d.idempotent {
        annotations = annotations.idempotent(true);
    }
    if d.effect_free {
        // Its grants let it write nothing and reach no network (MCP's "read-only", "closed world").
        annotations = annotations.read_only(true).open_world(false);
    }
    tool.with_annotations(annotations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tools: &[&str], exclude: &[&str]) -> McpSettings {
        McpSettings {
            tools: tools.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            ..McpSettings::default()
        }
    }

    #[test]
    fn filters_by_plugin_and_tool() {
        let all = ToolFilter::new(&settings(&[], &[])).unwrap();
        assert!(all.allows("hello/greet") && all.allows("fs/write"));
        let some = ToolFilter::new(&settings(&["hello", "fs/read"], &[])).unwrap();
        assert!(some.allows("hello/greet"));
        assert!(some.allows("fs/read"));
        assert!(!some.allows("fs/write"));
        let except = ToolFilter::new(&settings(&["*"], &["fs/w*"])).unwrap();
        assert!(except.allows("fs/read") && !except.allows("fs/write"));
        assert!(ToolFilter::new(&settings(&["a/[b"], &[])).is_err());
    }

    #[test]
    fn describes_a_tool_for_mcp() {
        let d = ToolDescriptor {
            plugin: "hello".into(),
            name: "greet".into(),
            description: "Greet someone.".into(),
            input_schema: serde_json::json!({"type": "object", "properties": {"name": {"type": "string"}}}),
            output_schema: Some(serde_json::json!({"type": "string"})),
            idempotent: true,
            effect_free: true,
            timeout: None,
            stands_for: None,
        };
        let tool = serde_json::to_value(mcp_tool(&d)).unwrap();
        assert_eq!(tool["name"], "hello__greet");
        assert_eq!(tool["inputSchema"]["properties"]["name"]["type"], "string");
        assert_eq!(tool["annotations"]["idempotentHint"], true);
        assert_eq!(tool["annotations"]["readOnlyHint"], true);
        assert_eq!(tool["annotations"]["openWorldHint"], false);
        let effectful = serde_json::to_value(mcp_tool(&ToolDescriptor {
            effect_free: false,
            ..d.clone()
        }))
        .unwrap();
        assert!(effectful["annotations"].get("readOnlyHint").is_none());
        assert!(
            tool.get("outputSchema").is_none(),
            "non-object output schemas are not offered"
        );
    }
}
