//! A newer `hello` that asks for more than 0.1.0 did: re-installing it must show the new requests
//! and must not carry grants over silently.

use keel_sdk::prelude::*;

#[derive(Deserialize, JsonSchema)]
struct GreetInput {
    name: String,
}

fn greet(_ctx: &Context, input: GreetInput) -> Result<String, ToolError> {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".into());
    Ok(format!("{greeting}, {}!", input.name))
}

struct HelloV2;

impl Plugin for HelloV2 {
    fn meta() -> PluginMeta {
        PluginMeta::new("hello", "0.2.0", "Greets people by name, in a configurable greeting.")
    }

    fn tools() -> Vec<Tool> {
        vec![
            Tool::new("greet", "Greet someone by name.", greet)
                .env("GREETING")
                .connects("greetings.example.com"),
        ]
    }
}

keel_sdk::export_plugin!(HelloV2);
