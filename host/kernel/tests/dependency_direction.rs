//! keel-kernel must stay free of databases, wasm engines and HTTP (DESIGN: dependencies point
//! one way, into the kernel).

#[test]
fn kernel_depends_on_no_backend() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).expect("manifest");
    let forbidden = [
        "sqlx",
        "rusqlite",
        "tokio-postgres",
        "wasmtime",
        "wasmparser",
        "hyper",
        "reqwest",
        "axum",
        "http",
        "keel-store",
        "keel-sandbox",
        "keel-server",
        "keel-models",
    ];
    let mut section = String::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if !(section == "[dependencies]" || section.starts_with("[dependencies.")) {
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or("");
        assert!(!forbidden.contains(&name), "keel-kernel must not depend on {name}");
    }
}
