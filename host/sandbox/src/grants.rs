//! Capability grants: what a plugin may touch. Deny by default: an empty [`Grants`] gives a plugin
//! no filesystem, no network and no environment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::info::{FsMode, ToolInfo};

/// Everything a plugin was granted. Stored per plugin; narrowed per tool at call time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grants {
    /// Directories preopened for the guest.
    pub fs: Vec<FsGrant>,
    /// Outbound HTTP allowlist patterns: `host`, `*.host`, each optionally `:port`.
    pub net: Vec<String>,
    /// Environment variables passed through by name (values come from the host's environment).
    pub env: Vec<String>,
    /// Allow HTTP to loopback, private, link-local and cloud-metadata addresses. Off by default:
    /// an allowlisted name that resolves to such an address is refused unless this is set.
    pub allow_private_network: bool,
}

/// One granted directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsGrant {
    /// Directory on the host (absolute).
    pub host: PathBuf,
    /// Where the guest sees it (absolute, `/`-separated).
    pub guest: String,
    /// Read-only or read-write.
    pub mode: FsMode,
    /// Device and inode of `host` when it was granted. Every call opens `host` without following
    /// any symbolic link and refuses it when this no longer matches. Records made before
    /// identities were kept have none; they still get the no-symlink open, and re-granting the
    /// directory records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<FileIdentity>,
}

/// Which directory a grant named: device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// A grant specification the user typed was malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The directory does not exist or is not a directory.
    #[error("cannot grant `{path}`: {reason}")]
    BadDirectory {
        /// The path as given.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// The guest path of a `HOST::GUEST` mapping is not absolute.
    #[error("guest path `{0}` must be absolute (start with `/`)")]
    RelativeGuestPath(String),
    /// A network pattern is malformed.
    #[error("invalid network host pattern `{pattern}`: {reason}")]
    BadHostPattern {
        /// The pattern as given.
        pattern: String,
        /// Why.
        reason: String,
    },
    /// An environment variable name is malformed.
    #[error("invalid environment variable name `{0}`")]
    BadEnvName(String),
    /// A granted directory cannot be opened as granted at call time (it vanished, a component
    /// became a symbolic link, or it was replaced by another directory).
    #[error("cannot open the directory granted as `{guest}` ({host}): {reason}")]
    Unavailable {
        /// Where the guest sees it.
        guest: String,
        /// The host path as granted.
        host: String,
        /// What is wrong, one clause.
        reason: String,
    },
}

impl FsGrant {
    /// Parse `HOST` or `HOST::GUEST`. The host directory must exist; it is canonicalised, and by
    /// default the guest sees it at the same absolute path (like `wasmtime run --dir`).
    pub fn parse(spec: &str, mode: FsMode) -> Result<Self, GrantError> {
        let (host, guest) = match spec.split_once("::") {
            Some((host, guest)) => (host, Some(guest)),
            None => (spec, None),
        };
        let bad = |reason: String| GrantError::BadDirectory {
            path: host.to_string(),
            reason,
        };
        let canonical = std::fs::canonicalize(host).map_err(|e| bad(e.to_string()))?;
        if !canonical.is_dir() {
            return Err(bad("not a directory".into()));
        }
        // Record what was granted, opened the same way every call will open it.
        let root = crate::preopen::open_root(&canonical).map_err(|e| bad(e.to_string()))?;
        if let Some(filesystem) = crate::preopen::kernel_filesystem(&root) {
            return Err(bad(format!(
                "it is on the kernel's {filesystem} filesystem (the host's processes and system: /proc/self is Keel itself); no plugin may be granted it"
            )));
        }
        let identity = crate::preopen::identity(&root).map_err(|e| bad(e.to_string()))?;
        let guest = match guest {
            Some(guest) if !guest.starts_with('/') => return Err(GrantError::RelativeGuestPath(guest.into())),
            Some(guest) => normalize_guest(guest),
            None => canonical.to_string_lossy().into_owned(),
        };
        Ok(Self {
            host: canonical,
            guest,
            mode,
            identity: Some(identity),
        })
    }
}

fn normalize_guest(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() { "/".into() } else { trimmed.into() }
}

/// Whether guest path `inner` is `outer` or below it.
fn guest_within(inner: &str, outer: &str) -> bool {
    outer == "/" || inner == outer || inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
}

/// Validate a network allowlist pattern.
pub fn validate_host_pattern(pattern: &str) -> Result<(), GrantError> {
    let bad = |reason: &str| GrantError::BadHostPattern {
        pattern: pattern.into(),
        reason: reason.into(),
    };
    if pattern.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("it contains spaces or control characters"));
    }
    let parsed = HostPattern::parse(pattern).ok_or_else(|| bad("expected `host`, `*.host`, optionally `:port`"))?;
    if !parsed.host.is_ascii() {
        return Err(bad("not ASCII: write an internationalised name in its `xn--` form"));
    }
    // An IPv6 literal, or dot-separated labels of letters, digits, `-` and `_`.
    let ipv6 = parsed.host.contains(':') && parsed.host.parse::<std::net::Ipv6Addr>().is_ok();
    let label = |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ipv6 && !parsed.host.split('.').all(label) {
        return Err(bad(
            "not a host name (letters, digits, `-` and `.` only; a wildcard only as a leading `*.`)",
        ));
    }
    Ok(())
}

/// Validate an environment variable name.
pub fn validate_env_name(name: &str) -> Result<(), GrantError> {
    let ok = !name.is_empty() && !name.contains(['=', '\0']) && name.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(GrantError::BadEnvName(name.into()))
    }
}

/// A parsed allowlist pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostPattern {
    /// Lower-case host; IPv6 literals without brackets.
    host: String,
    /// `*.host`: any strict subdomain of `host`.
    wildcard: bool,
    /// Required port; `None` means the scheme's default port only.
    port: Option<u16>,
}

impl HostPattern {
    fn parse(pattern: &str) -> Option<Self> {
        let pattern = pattern.trim().to_ascii_lowercase();
        let (wildcard, rest) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, pattern),
        };
        let (host, port) = split_host_port(&rest)?;
        Some(Self { host, wildcard, port })
    }

    fn matches(&self, host: &str, port: u16, default_port: u16) -> bool {
        let port_ok = match self.port {
            Some(p) => p == port,
            None => port == default_port,
        };
        let host_ok = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|prefix| prefix.ends_with('.') && prefix.len() > 1)
        } else {
            host == self.host
        };
        port_ok && host_ok
    }
}

/// Split `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_string(), Some(port.parse().ok()?))),
        Some(_) => Some((text.to_string(), None)), // bare IPv6 literal
        None => Some((text.to_string(), None)),
    }
}

/// The network allowlist of one call, pre-parsed.
#[derive(Debug, Clone, Default)]
pub struct NetPolicy {
    patterns: Vec<HostPattern>,
    /// See [`Grants::allow_private_network`].
    pub allow_private_network: bool,
}

impl NetPolicy {
    /// Build from grants (invalid patterns are dropped: they were validated when granted).
    pub fn new(grants: &Grants) -> Self {
        Self {
            patterns: grants.net.iter().filter_map(|p| HostPattern::parse(p)).collect(),
            allow_private_network: grants.allow_private_network,
        }
    }

    /// Whether `host:port` is on the allowlist (`host` as written in the URI, brackets stripped).
    pub fn allows(&self, host: &str, port: u16, default_port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        self.patterns.iter().any(|p| p.matches(&host, port, default_port))
    }
}

/// Whether `ip` is loopback, private, link-local (incl. cloud metadata), shared, unspecified,
/// multicast, broadcast or documentation space — anything that is not the public internet.
/// IPv4-mapped, IPv4-compatible and NAT64 IPv6 addresses are judged by their embedded IPv4 address.
pub fn is_non_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_non_public_v4(v4),
        IpAddr::V6(v6) => is_non_public_v6(v6),
    }
}

fn is_non_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_non_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_non_public_v4(v4);
    }
    let segments = ip.segments();
    // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let embedded = Ipv4Addr::new(
            (segments[6] >> 8) as u8,
            segments[6] as u8,
            (segments[7] >> 8) as u8,
            segments[7] as u8,
        );
        return is_non_public_v4(embedded);
    }
    // Deprecated IPv4-compatible ::a.b.c.d.
    if segments[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return true;
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local
        || (segments[0] & 0xffc0) == 0xfe80 // link local
        || (segments[0] == 0x2001 && segments[1] == 0xdb8) // documentation
}

impl Grants {
    /// Whether a call under these grants can change nothing outside its sandbox: no directory
    /// granted read-write and no network host. (Environment variables are read-only, and a
    /// tool's fresh scratch directory is not a grant: it is removed after the call.)
    pub fn effect_free(&self) -> bool {
        self.net.is_empty() && self.fs.iter().all(|g| g.mode == FsMode::Read)
    }

    /// Whether calls of `tool`, one of `all_tools`, are effect-free
    /// ([`ToolDescriptor::effect_free`](keel_kernel::tool::ToolDescriptor::effect_free)): the
    /// grants it gets ([`narrow_for`](Self::narrow_for)) are [`effect_free`](Self::effect_free),
    /// and it keeps no session state that later calls see.
    pub fn effect_free_for(&self, tool: &ToolInfo, all_tools: &[ToolInfo]) -> bool {
        !tool.takes_session() && self.narrow_for(tool, all_tools).effect_free()
    }

    /// The grants one tool actually gets. Where a plugin's descriptor declares capabilities of a kind
    /// for any of its tools, each tool gets only the part of the plugin's grants that it declared for
    /// that kind; where no tool declares that kind, the plugin-wide grant applies (generic tools such
    /// as a filesystem plugin cannot know their paths in advance).
    ///
    /// A directory narrowed to a sub-directory of a grant is shown here as `host` joined with the
    /// sub-path; calls never open that path by name: see [`Grants::preopens_for`].
    pub fn narrow_for(&self, tool: &ToolInfo, all_tools: &[ToolInfo]) -> Grants {
        let declares = |kind: fn(&ToolInfo) -> bool| all_tools.iter().any(kind);
        let requested = &tool.capabilities;
        let fs = self
            .preopens_for(tool, all_tools)
            .into_iter()
            .map(|p| FsGrant {
                host: p.grant.host.join(&p.beneath),
                guest: p.guest,
                mode: p.mode,
                identity: if p.beneath.is_empty() { p.grant.identity } else { None },
            })
            .collect();
        let net = if declares(|t| !t.capabilities.network.is_empty()) {
            self.net
                .iter()
                .filter(|g| requested.network.iter().any(|r| r.eq_ignore_ascii_case(g)))
                .cloned()
                .collect()
        } else {
            self.net.clone()
        };
        let env = if declares(|t| !t.capabilities.environment.is_empty()) {
            self.env
                .iter()
                .filter(|g| requested.environment.contains(g))
                .cloned()
                .collect()
        } else {
            self.env.clone()
        };
        Grants {
            fs,
            net,
            env,
            allow_private_network: self.allow_private_network,
        }
    }

    /// The directories one call of `tool` gets (see [`Grants::narrow_for`]): each is a granted root
    /// and, for a tool narrowed to part of it, the relative sub-path opened beneath that root at
    /// call time, never by name.
    pub fn preopens_for(&self, tool: &ToolInfo, all_tools: &[ToolInfo]) -> Vec<Preopen> {
        if !all_tools.iter().any(|t| !t.capabilities.filesystem.is_empty()) {
            return self.fs.iter().cloned().map(Preopen::whole).collect();
        }
        let mut preopens: Vec<Preopen> = Vec::new();
        for request in &tool.capabilities.filesystem {
            let wanted = normalize_guest(&request.path);
            for grant in &self.fs {
                let mode = grant.mode.min(request.mode);
                let preopen = if guest_within(&grant.guest, &wanted) {
                    Preopen {
                        mode,
                        ..Preopen::whole(grant.clone())
                    }
                } else if let Some(rest) = guest_below(&wanted, &grant.guest) {
                    // The tool needs only a sub-directory of the grant: preopen just that.
                    Preopen {
                        grant: grant.clone(),
                        beneath: rest.to_string(),
                        guest: wanted.clone(),
                        mode,
                    }
                } else {
                    continue;
                };
                // A path declared twice is preopened once.
                if !preopens.contains(&preopen) {
                    preopens.push(preopen);
                }
            }
        }
        preopens
    }

    /// What `requested` asks for beyond these grants, as human-readable lines (for re-install diffs
    /// and the grant prompt).
    pub fn missing_for(&self, requested: &crate::info::Capabilities) -> Vec<String> {
        let mut missing = Vec::new();
        for fs in &requested.filesystem {
            let covered = self
                .fs
                .iter()
                .any(|g| guest_within(&normalize_guest(&fs.path), &g.guest) && g.mode >= fs.mode);
            if !covered {
                missing.push(format!("filesystem {} ({})", fs.path, fs.mode));
            }
        }
        for host in &requested.network {
            if !self.net.iter().any(|g| g.eq_ignore_ascii_case(host)) {
                missing.push(format!("network {host}"));
            }
        }
        for var in &requested.environment {
            if !self.env.contains(var) {
                missing.push(format!("env {var}"));
            }
        }
        missing
    }
}

/// The part of guest path `inner` below `outer` (no leading `/`), when `inner` is strictly below.
fn guest_below<'a>(inner: &'a str, outer: &str) -> Option<&'a str> {
    let rest = if outer == "/" {
        inner.strip_prefix('/')?
    } else {
        inner.strip_prefix(outer)?.strip_prefix('/')?
    };
    let rest = rest.trim_matches('/');
    (!rest.is_empty()).then_some(rest)
}

/// One directory preopened for a call: a granted root, and for a tool narrowed to part of it, the
/// sub-directory beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// The grant, as stored (host path and identity of its root).
    pub grant: FsGrant,
    /// `/`-separated path below `grant.host`; empty for the root itself.
    pub beneath: String,
    /// Where the guest sees it.
    pub guest: String,
    /// Read-only or read-write.
    pub mode: FsMode,
}

impl Preopen {
    /// The whole of `grant`.
    pub fn whole(grant: FsGrant) -> Self {
        Self {
            beneath: String::new(),
            guest: grant.guest.clone(),
            mode: grant.mode,
            grant,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::info::{Capabilities, FsRequest};

    #[test]
    fn host_patterns() {
        let policy = NetPolicy::new(&Grants {
            net: vec![
                "api.example.com".into(),
                "*.example.org".into(),
                "localhost:8080".into(),
                "[::1]:9".into(),
            ],
            ..Default::default()
        });
        assert!(policy.allows("api.example.com", 443, 443));
        assert!(policy.allows("API.Example.com", 80, 80));
        assert!(
            !policy.allows("api.example.com", 8443, 443),
            "no port in the pattern means the default port only"
        );
        assert!(!policy.allows("evil-api.example.com", 443, 443));
        assert!(!policy.allows("api.example.com.evil.net", 443, 443));
        assert!(policy.allows("a.example.org", 443, 443));
        assert!(policy.allows("a.b.example.org", 443, 443));
        assert!(!policy.allows("example.org", 443, 443), "`*.host` is subdomains only");
        assert!(!policy.allows("badexample.org", 443, 443));
        assert!(policy.allows("localhost", 8080, 80));
        assert!(!policy.allows("localhost", 8081, 80));
        assert!(!policy.allows("127.0.0.1", 8080, 80), "names are compared as written");
        assert!(policy.allows("[::1]", 9, 80));
        assert!(validate_host_pattern("http://x").is_err());
        assert!(validate_host_pattern("x:notaport").is_err());
        assert!(validate_host_pattern("*.ok.dev:443").is_ok());
        for good in [
            "api.example.com",
            "localhost:8080",
            "127.0.0.1",
            "[::1]:443",
            "::1",
            "xn--bcher-kva.de",
            "a-b.c_d.dev",
        ] {
            assert!(validate_host_pattern(good).is_ok(), "{good}");
        }
        // Host names only: a pattern is printed on the operator's terminal and matched against
        // what a plugin asks for, so no controls, no wildcard but a leading `*.`, no empty label.
        for bad in [
            "\x1b[31mevil.com",
            "ok.dev\t",
            "*",
            "*.*",
            ".",
            "a..b",
            ".a.b",
            "a.b.",
            "*.com*",
            "bücher.de",
            "a\u{202e}b.com",
        ] {
            assert!(validate_host_pattern(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn non_public_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
        ] {
            assert!(is_non_public(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(!is_non_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn fs_grant_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let grant = FsGrant::parse(dir.path().to_str().unwrap(), FsMode::Read).unwrap();
        assert_eq!(
            grant.guest,
            std::fs::canonicalize(dir.path()).unwrap().to_string_lossy()
        );
        let mapped = FsGrant::parse(&format!("{}::/data/", dir.path().display()), FsMode::ReadWrite).unwrap();
        assert_eq!(mapped.guest, "/data");
        assert!(matches!(
            FsGrant::parse(&format!("{}::data", dir.path().display()), FsMode::Read),
            Err(GrantError::RelativeGuestPath(_))
        ));
        assert!(matches!(
            FsGrant::parse("/definitely/not/here", FsMode::Read),
            Err(GrantError::BadDirectory { .. })
        ));
    }

    fn tool(name: &str, capabilities: Capabilities) -> ToolInfo {
        ToolInfo {
            name: name.into(),
            description: String::new(),
            input_schema: serde_json::json!({}),
            output_schema: None,
            capabilities,
            idempotent: false,
        }
    }

    #[test]
    fn narrowing_per_tool() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let grants = Grants {
            fs: vec![FsGrant {
                host: dir.path().into(),
                guest: "/data".into(),
                mode: FsMode::ReadWrite,
                identity: None,
            }],
            net: vec!["a.com".into(), "b.com".into()],
            env: vec!["A".into(), "B".into()],
            allow_private_network: false,
        };
        let reader = tool(
            "reader",
            Capabilities {
                filesystem: vec![FsRequest {
                    path: "/data/sub".into(),
                    mode: FsMode::Read,
                }],
                network: vec!["a.com".into()],
                environment: vec![],
            },
        );
        let env_user = tool(
            "env",
            Capabilities {
                environment: vec!["B".into()],
                ..Default::default()
            },
        );
        let all = [reader.clone(), env_user.clone()];

        let narrowed = grants.narrow_for(&reader, &all);
        assert_eq!(narrowed.fs.len(), 1);
        assert_eq!(narrowed.fs[0].guest, "/data/sub");
        assert_eq!(narrowed.fs[0].mode, FsMode::Read);
        assert_eq!(narrowed.net, ["a.com"]);
        assert!(narrowed.env.is_empty());

        let narrowed = grants.narrow_for(&env_user, &all);
        assert!(narrowed.fs.is_empty() && narrowed.net.is_empty());
        assert_eq!(narrowed.env, ["B"]);

        // A plugin that declares nothing keeps its plugin-wide grants.
        let generic = tool("generic", Capabilities::default());
        assert_eq!(grants.narrow_for(&generic, std::slice::from_ref(&generic)), grants);

        // Effect-free: judged on the grants each tool gets.
        assert!(grants.effect_free_for(&env_user, &all), "environment only");
        assert!(!grants.effect_free_for(&reader, &all), "a network host");
        let no_net = Grants {
            net: vec![],
            ..grants.clone()
        };
        assert!(
            no_net.effect_free_for(&reader, &all),
            "its directory narrowed to read-only"
        );
        assert!(
            !no_net.effect_free_for(&generic, std::slice::from_ref(&generic)),
            "a writable directory"
        );
        let read_only = Grants {
            fs: vec![FsGrant {
                mode: FsMode::Read,
                ..grants.fs[0].clone()
            }],
            ..no_net.clone()
        };
        assert!(read_only.effect_free_for(&generic, std::slice::from_ref(&generic)));
        let session = ToolInfo {
            input_schema: serde_json::json!({"properties": {"session_id": {"type": "string"}}}),
            ..generic.clone()
        };
        assert!(
            !Grants::default().effect_free_for(&session, std::slice::from_ref(&session)),
            "a session's state is seen by its later calls"
        );
    }
}
