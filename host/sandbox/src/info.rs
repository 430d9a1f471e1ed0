//! What a plugin says about itself (`describe`) and what its component imports, as host-side types.

use serde::{Deserialize, Serialize};

/// Filesystem access mode. Ordered: `Read < ReadWrite`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsMode {
    /// Read files and list directories only.
    Read,
    /// Read, create, write, rename, delete.
    ReadWrite,
}

impl std::fmt::Display for FsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            FsMode::Read => "read",
            FsMode::ReadWrite => "read-write",
        })
    }
}

/// A requested filesystem capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRequest {
    /// Guest path.
    pub path: String,
    /// Access needed.
    pub mode: FsMode,
}

/// Capabilities a tool requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Directories.
    pub filesystem: Vec<FsRequest>,
    /// HTTP hosts.
    pub network: Vec<String>,
    /// Environment variables.
    pub environment: Vec<String>,
}

impl Capabilities {
    /// Union of several tools' requests, without duplicates.
    pub fn union<'a>(all: impl IntoIterator<Item = &'a Capabilities>) -> Capabilities {
        let mut union = Capabilities::default();
        for caps in all {
            for fs in &caps.filesystem {
                if !union.filesystem.contains(fs) {
                    union.filesystem.push(fs.clone());
                }
            }
            for host in &caps.network {
                if !union.network.contains(host) {
                    union.network.push(host.clone());
                }
            }
            for var in &caps.environment {
                if !union.environment.contains(var) {
                    union.environment.push(var.clone());
                }
            }
        }
        union
    }

    /// True when nothing is requested.
    pub fn is_empty(&self) -> bool {
        self.filesystem.is_empty() && self.network.is_empty() && self.environment.is_empty()
    }
}

/// One tool of a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// Tool name.
    pub name: String,
    /// Description.
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: serde_json::Value,
    /// JSON Schema of the output.
    pub output_schema: Option<serde_json::Value>,
    /// Requested capabilities.
    pub capabilities: Capabilities,
    /// Safe to re-run.
    pub idempotent: bool,
}

/// A plugin's `describe` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    /// Plugin name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Description.
    pub description: String,
    /// Tools.
    pub tools: Vec<ToolInfo>,
}

impl ToolInfo {
    /// Whether calls can run in an instance kept for a session (its input schema has a
    /// [`crate::SESSION_FIELD`] property): such a call changes state that the session's later
    /// calls see.
    pub fn takes_session(&self) -> bool {
        self.input_schema["properties"].get(crate::SESSION_FIELD).is_some()
    }
}

impl PluginInfo {
    /// The tool named `name`.
    pub fn tool(&self, name: &str) -> Option<&ToolInfo> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// Everything any tool requests.
    pub fn requested(&self) -> Capabilities {
        Capabilities::union(self.tools.iter().map(|t| &t.capabilities))
    }
}

/// What the component *can* reach, read from its imports: a plugin that does not import
/// `wasi:http` can never make an HTTP request, whatever it is granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSummary {
    /// Every imported interface, e.g. `wasi:filesystem/types@0.2.6`.
    pub interfaces: Vec<String>,
    /// Imports `wasi:filesystem`.
    pub filesystem: bool,
    /// Imports `wasi:http/outgoing-handler`.
    pub http: bool,
    /// Imports `wasi:sockets` (raw TCP/UDP/DNS; never granted by Keel today).
    pub sockets: bool,
    /// Imports `wasi:cli/environment`.
    pub environment: bool,
}

impl ImportSummary {
    /// Classify a list of imported interface names.
    pub fn from_interfaces(mut interfaces: Vec<String>) -> Self {
        interfaces.sort();
        let any = |prefix: &str| interfaces.iter().any(|i| i.starts_with(prefix));
        Self {
            filesystem: any("wasi:filesystem/"),
            http: any("wasi:http/outgoing-handler"),
            sockets: any("wasi:sockets/"),
            environment: any("wasi:cli/environment"),
            interfaces,
        }
    }
}

/// The rule [`valid_name`] checks, for error messages.
pub const NAME_RULE: &str = "[a-z0-9_-]{1,64} without `__`";

/// Validate a plugin or tool name: `[a-z0-9_-]{1,64}` without `__`, which separates plugin and
/// tool in model-facing names (`fs__read`): allowing it would let `a__b/c` and `a/b__c` collide.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.contains("__")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Check a filesystem path a tool requests in `describe()`: absolute, normalised (no empty, `.`
/// or `..` components, no trailing `/` except the root itself), at most `max_bytes` bytes, and
/// free of control characters. The reason is one phrase, e.g. "is not absolute".
pub fn check_guest_path(path: &str, max_bytes: usize) -> Result<(), String> {
    if path.len() > max_bytes {
        return Err(format!("is longer than {max_bytes} bytes"));
    }
    if path.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("is not absolute (it must start with `/`)".into());
    };
    if rest.is_empty() {
        return Ok(());
    }
    for component in rest.split('/') {
        match component {
            "" => return Err("is not normalised (empty component or trailing `/`)".into()),
            "." | ".." => return Err(format!("is not normalised (contains `{component}`)")),
            _ => {}
        }
    }
    Ok(())
}

/// Check a plugin's version: semantic versioning (`1.2.3`, `0.1.0-beta.1+build.5`), at most
/// `max_bytes` bytes.
pub fn check_version(version: &str, max_bytes: usize) -> Result<(), String> {
    if version.len() > max_bytes {
        return Err(format!("is longer than {max_bytes} bytes"));
    }
    semver::Version::parse(version)
        .map(|_| ())
        .map_err(|e| format!("is not a semantic version such as 1.2.3 ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["fs", "http-fetch", "get_json", "a", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        // `__` separates plugin and tool in model-facing names (`fs__read`), so no name may hold it.
        for bad in ["", "Fs", "a b", "a/b", "a__b", "__", "a___b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn guest_paths_must_be_absolute_and_normalised() {
        for ok in ["/", "/data", "/data/sub", "/é/ü", "/a.b/..c"] {
            assert_eq!(check_guest_path(ok, 64), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "é",
            "relative",
            "data/sub",
            "/a/../b",
            "/a/./b",
            "/..",
            "//a",
            "/a/",
            "/a//b",
            "/a\x1b[2J",
            "/a\nrequests: nothing",
        ] {
            assert!(check_guest_path(bad, 64).is_err(), "{bad:?}");
        }
        assert!(check_guest_path(&format!("/{}", "a".repeat(64)), 64).is_err());
    }

    #[test]
    fn versions_are_semver() {
        for ok in ["0.1.0", "1.2.3-beta.1+build.5"] {
            assert_eq!(check_version(ok, 64), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "1",
            "1.2",
            "v1.2.3",
            "1.2.3\x1b[2J",
            "1.2.3\nrequests: nothing",
            "01.2.3",
        ] {
            assert!(check_version(bad, 64).is_err(), "{bad:?}");
        }
        assert!(check_version(&format!("1.2.3-{}", "a".repeat(64)), 64).is_err());
    }
}
