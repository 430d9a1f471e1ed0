//! The dependency direction in DESIGN.md, checked: `cli -> {sandbox, store} -> kernel`, and the
//! kernel never reaches wasmtime, a database or an HTTP stack, even transitively.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

/// Resolved (normal, non-dev) dependency names of every workspace package, transitively.
fn transitive_deps() -> HashMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(keel_testutil::workspace_root())
        .output()
        .expect("cargo metadata");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut direct: HashMap<&str, Vec<&str>> = HashMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
            .map(|d| d["pkg"].as_str().unwrap())
            .collect();
        direct.insert(node["id"].as_str().unwrap(), deps);
    }
    let mut result = HashMap::new();
    for member in metadata["workspace_members"].as_array().unwrap() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![member.as_str().unwrap()];
        while let Some(id) = stack.pop() {
            for dep in direct.get(id).into_iter().flatten() {
                if seen.insert(names[dep].to_string()) {
                    stack.push(dep);
                }
            }
        }
        result.insert(names[member.as_str().unwrap()].to_string(), seen);
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
}
