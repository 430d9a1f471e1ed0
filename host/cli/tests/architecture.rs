//! The dependency direction in DESIGN.md, checked: `cli -> app -> {sandbox, store, models} ->
//! kernel`, and the kernel never reaches wasmtime, a database or an HTTP stack, even transitively.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// Workspace packages whose dependencies the test checks.
const CHECKED: [&str; 9] = [
    "keel-kernel",
    "keel-sandbox",
    "keel-store",
    "keel-models",
    "keel-app",
    "keel-mcp",
    "keel",
    "keel-sdk",
    "keel-server",
];

/// Resolved (normal, non-dev) dependency names of each checked package, transitively, for the host
/// platform only. `cargo tree` needs just the crates a host build downloads (`cargo metadata` would
/// want every platform's crates, which a fresh machine never fetched).
fn transitive_deps() -> HashMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut result = HashMap::new();
    for package in CHECKED {
        let output = Command::new(&cargo)
            .args([
                "tree", "-p", package, "-e", "normal", "--prefix", "none", "--format", "{p}",
            ])
            .current_dir(keel_testutil::workspace_root())
            .output()
            .expect("run cargo tree");
        assert!(
            output.status.success(),
            "cargo tree -p {package}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let deps = String::from_utf8_lossy(&output.stdout)
            .lines()
            .skip(1) // the package itself
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_string)
            .collect();
        result.insert(package.to_string(), deps);
    }
    result
}

#[test]
fn dependencies_point_one_way() {
    let deps = transitive_deps();
    let keel_crates =
        |name: &str| -> BTreeSet<String> { deps[name].iter().filter(|d| d.starts_with("keel-")).cloned().collect() };
    assert!(
        keel_crates("keel-kernel").is_empty(),
        "the kernel depends on no other Keel crate"
    );
    for forbidden in ["wasmtime", "sqlx", "hyper", "reqwest", "axum", "cap-std"] {
        assert!(
            !deps["keel-kernel"].contains(forbidden),
            "keel-kernel must not depend on {forbidden}"
        );
    }
    assert_eq!(keel_crates("keel-sandbox"), BTreeSet::from(["keel-kernel".to_string()]));
    assert_eq!(keel_crates("keel-store"), BTreeSet::from(["keel-kernel".to_string()]));
    assert!(!deps["keel-sandbox"].contains("sqlx"), "the sandbox has no database");
    assert!(
        !deps["keel-store"].contains("wasmtime"),
        "the store runs no WebAssembly"
    );
    assert!(!deps["keel-sdk"].contains("wasmtime"), "the guest SDK is guest-only");
    assert_eq!(keel_crates("keel-models"), BTreeSet::from(["keel-kernel".to_string()]));
    // The application layer sits on the backends; front ends sit on it.
    let app: BTreeSet<String> = ["keel-kernel", "keel-sandbox", "keel-store", "keel-models"]
        .map(String::from)
        .into();
    assert_eq!(keel_crates("keel-app"), app);
    let direct = |package: &str| -> BTreeSet<String> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(&cargo)
            .args([
                "tree", "-p", package, "-e", "normal", "--depth", "1", "--prefix", "none", "--format", "{p}",
            ])
            .current_dir(keel_testutil::workspace_root())
            .output()
            .expect("run cargo tree");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().next())
            .filter(|d| d.starts_with("keel"))
            .map(str::to_string)
            .collect()
    };
    // The CLI is a front end over keel-app: it parses and renders, the use cases (and the
    // database) are keel-app's. Nothing below it depends on a front end.
    let cli = direct("keel");
    assert!(cli.contains("keel-app"), "{cli:?}");
    assert!(
        !cli.contains("keel-store"),
        "the CLI reaches the store only through keel-app: {cli:?}"
    );
    assert!(
        !cli.contains("keel-sandbox"),
        "the CLI reaches the sandbox only through keel-app: {cli:?}"
    );
    for lower in ["keel-kernel", "keel-sandbox", "keel-store", "keel-models", "keel-app"] {
        assert!(!deps[lower].contains("keel"), "{lower} depends on the CLI");
        assert!(
            !deps[lower].contains("keel-mcp"),
            "{lower} depends on the MCP front end"
        );
        assert!(
            !deps[lower].contains("keel-server"),
            "{lower} depends on the HTTP server"
        );
    }
    // The HTTP server is a front end over keel-app too: kernel types yes, never the store or
    // the sandbox directly.
    let server = direct("keel-server");
    assert!(server.contains("keel-app"), "{server:?}");
    for backend in ["keel-store", "keel-sandbox", "keel-models", "keel"] {
        assert!(
            !server.contains(backend),
            "keel-server depends on {backend} directly: {server:?}"
        );
    }
    // The MCP server is a front end over keel-app alone: it reaches the store, the sandbox and
    // the models only through the use cases.
    assert_eq!(direct("keel-mcp"), BTreeSet::from(["keel-app".to_string()]));
    assert!(
        !deps["keel-mcp"].contains("keel"),
        "the MCP server does not depend on the CLI"
    );
}

/// The `.rs` files under `dir`, recursively.
fn sources(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The HTTP and MCP front ends call keel-app's use cases (which check the caller's role and
/// scope), never the kernel's services: no job, action, ledger, event or store call of their
/// own, no job created or claimed behind the use cases' back. (`AgentHost::start_call` and the
/// handle it returns, and the server's in-process worker, are the use-case layer's.)
#[test]
fn front_ends_call_use_cases_not_kernel_services() {
    let forbidden = [
        ".jobs()",
        ".actions()",
        ".ledger()",
        ".store()",
        "kernel.subscribe(",
        "kernel.read_events(",
        "rt.attach(",
        "rt.resume_job(",
        "rt.execute(",
        "rt.call_tool(",
        "new_job(",
    ];
    let root = keel_testutil::workspace_root();
    let mut found = Vec::new();
    for dir in ["host/server/src", "host/mcp/src"] {
        let files = sources(&root.join(dir));
        assert!(!files.is_empty(), "no sources under {dir}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read a source");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for call in forbidden.iter().filter(|c| code.contains(*c)) {
                    found.push(format!(
                        "{}:{}: {call}",
                        file.strip_prefix(&root).unwrap_or(&file).display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "front ends reaching kernel services directly:\n{}",
        found.join("\n")
    );
}
