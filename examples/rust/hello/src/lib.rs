//! The smallest useful Keel plugin: one typed tool, no capabilities.

use keel_sdk::prelude::*;

/// Arguments of `greet`.
#[derive(Deserialize, JsonSchema)]
struct GreetInput {
    /// Who to greet.
    name: String,
}

/// Result of `greet`.
#[derive(Serialize, JsonSchema)]
struct GreetOutput {
    /// The greeting.
    greeting: String,
}

fn greet(_ctx: &Context, input: GreetInput) -> Result<GreetOutput, ToolError> {
    if input.name.trim().is_empty() {
        return Err(ToolError::invalid_input("`name` must not be empty"));
    }
    Ok(GreetOutput {
        greeting: format!("Hello, {}!", input.name),
    })
}

struct Hello;

impl Plugin for Hello {
    fn meta() -> PluginMeta {
        PluginMeta::new("hello", env!("CARGO_PKG_VERSION"), "Greets people by name.")
    }

    fn tools() -> Vec<Tool> {
        vec![Tool::new("greet", "Greet someone by name.", greet).idempotent()]
    }
}

keel_sdk::export_plugin!(Hello);
