//! MCP tool names for Keel tools.
//!
//! A Keel tool is `plugin/tool`; MCP names must match `^[A-Za-z0-9_-]{1,64}$`. The MCP name is
//! `plugin__tool`: plugin and tool names are `[a-z0-9_-]{1,64}` without `__` (keel-sandbox's
//! `valid_name`), so the first `__` always separates them and the mapping is reversible. A pair
//! whose `plugin__tool` would be longer than 64 characters is named by its first 47 characters,
//! `-`, and 16 hex digits of a stable hash of the full `plugin/tool`; such a name is reversed by
//! looking it up in the current tool list (the server always does that, so a name that is not
//! listed, e.g. from a filtered-out tool, is unknown).

/// The longest MCP tool name clients accept.
pub const MAX_NAME: usize = 64;

/// The MCP name of Keel tool `plugin/tool`.
pub fn mcp_name(plugin: &str, tool: &str) -> String {
    let name = format!("{plugin}__{tool}");
    if name.len() <= MAX_NAME && valid_mcp_name(&name) {
        return name;
    }
    // Keep a readable prefix (ASCII by construction of valid names; `valid_mcp_name` guards the rest).
    let prefix: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(MAX_NAME - 17)
        .collect();
    format!("{prefix}-{:016x}", fnv1a(format!("{plugin}/{tool}").as_bytes()))
}

/// `plugin/tool` of an MCP name of the `plugin__tool` form (not of a hashed long name).
pub fn keel_name(mcp: &str) -> Option<String> {
    let (plugin, tool) = mcp.split_once("__")?;
    (!plugin.is_empty() && !tool.is_empty() && !tool.contains("__")).then(|| format!("{plugin}/{tool}"))
}

/// Whether `name` is a valid MCP tool name.
pub fn valid_mcp_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `std`'s hasher), so a long
/// tool's MCP name does not change when Keel is rebuilt.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_round_trip() {
        assert_eq!(mcp_name("hello", "greet"), "hello__greet");
        assert_eq!(keel_name("hello__greet").as_deref(), Some("hello/greet"));
        assert_eq!(mcp_name("http-fetch", "get_url"), "http-fetch__get_url");
        assert_eq!(keel_name("http-fetch__get_url").as_deref(), Some("http-fetch/get_url"));
        assert_eq!(keel_name("nodelimiter"), None);
        assert_eq!(keel_name("__x"), None);
    }

    #[test]
    fn long_names_stay_valid_and_distinct() {
        let plugin = "p".repeat(40);
        let a = mcp_name(&plugin, &"a".repeat(40));
        let b = mcp_name(&plugin, &format!("{}b", "a".repeat(39)));
        assert!(valid_mcp_name(&a) && valid_mcp_name(&b), "{a} {b}");
        assert_eq!(a.len(), MAX_NAME);
        assert_ne!(a, b);
        assert_eq!(a, mcp_name(&plugin, &"a".repeat(40)), "stable");
    }
}
