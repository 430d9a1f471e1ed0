//! A big plugin for the startup benchmark (issue 11, item 8): one tool over a 16 MiB static data
//! section, so the component and its precompiled artifact are multi-megabyte.

use keel_sdk::prelude::*;

static DATA: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/data.bin"));

/// Arguments of `byte`.
#[derive(Deserialize, JsonSchema)]
struct ByteInput {
    /// Offset into the data.
    index: usize,
}

fn byte(_ctx: &Context, input: ByteInput) -> Result<u8, ToolError> {
    DATA.get(input.index)
        .copied()
        .ok_or_else(|| ToolError::invalid_input(format!("index must be below {}", DATA.len())))
}

struct Big;

impl Plugin for Big {
    fn meta() -> PluginMeta {
        PluginMeta::new(
            "big",
            env!("CARGO_PKG_VERSION"),
            "A multi-megabyte plugin for benchmarks.",
        )
    }

    fn tools() -> Vec<Tool> {
        vec![Tool::new("byte", "One byte of the data section.", byte).idempotent()]
    }
}

keel_sdk::export_plugin!(Big);
