//! {{name}}: a Keel tool plugin. Each tool is a typed function; `keel-sdk` generates the JSON
//! Schemas, `describe`, argument parsing and the error mapping.

use keel_sdk::prelude::*;

/// Arguments of `greet`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GreetInput {
    /// Who to greet.
    name: String,
}

/// What `greet` returns.
#[derive(Serialize, JsonSchema)]
struct Greeting {
    greeting: String,
}

/// The tool's logic, a plain function so it can be unit tested on the host.
fn greeting(name: &str) -> Result<String, ToolError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ToolError::InvalidInput("`name` must not be empty".into()));
    }
    Ok(format!("Hello, {name}!"))
}

fn greet(_ctx: &Context, input: GreetInput) -> Result<Greeting, ToolError> {
    Ok(Greeting {
        greeting: greeting(&input.name)?,
    })
}

struct Tools;

impl Plugin for Tools {
    fn meta() -> PluginMeta {
        PluginMeta::new("{{name}}", env!("CARGO_PKG_VERSION"), "{{name}}: greets people.")
    }

    fn tools() -> Vec<Tool> {
        vec![Tool::new("greet", "Greet someone by name.", greet).idempotent()]
    }
}

keel_sdk::export_plugin!(Tools);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_by_name() {
        assert_eq!(greeting(" Ada ").unwrap(), "Hello, Ada!");
    }

    #[test]
    fn an_empty_name_is_invalid_input() {
        assert!(matches!(greeting("  "), Err(ToolError::InvalidInput(_))));
    }
}
