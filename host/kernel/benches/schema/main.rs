//! Tool-argument validation, old vs new, on Keel's own tool schemas (`hello`, `fs`, `http-fetch`,
//! as their `describe()` returns them: `benches/schema/*.json`).
//!
//! `cargo bench -p keel-kernel --bench schema -- --quick`. Three ways per case:
//! - `old`: the hand-written subset validator the kernel had before (`old.rs`);
//! - `new`: `keel_kernel::agent::schema::validate`, the `jsonschema` crate with the compiled schema
//!   cached (what every call after a tool's first pays);
//! - `new_uncached`: compiling the schema and validating, every time (what caching saves).
//!
//! The `schema/p50` lines printed at the end are medians of single validations.

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use keel_kernel::agent::schema;
use serde_json::{Value, json};

mod old;

/// One tool's input schema, and arguments for it.
struct Case {
    name: String,
    schema: Value,
    args: Value,
    valid: bool,
}

fn cases() -> Vec<Case> {
    let plugins = [
        ("hello", include_str!("hello.json")),
        ("fs", include_str!("fs.json")),
        ("http-fetch", include_str!("http-fetch.json")),
    ];
    let schemas: Vec<(String, Value)> = plugins
        .iter()
        .flat_map(|(plugin, text)| {
            let tools: serde_json::Map<String, Value> = serde_json::from_str(text).expect("schema file");
            tools
                .into_iter()
                .map(move |(tool, schema)| (format!("{plugin}/{tool}"), schema))
        })
        .collect();
    let args: [(&str, Value, Value); 9] = [
        ("hello/greet", json!({"name": "Ada"}), json!({"name": 5})),
        (
            "fs/read",
            json!({"path": "/data/notes.txt", "offset": 0, "length": 4096}),
            json!({"path": "/data/notes.txt", "offset": -1}),
        ),
        (
            "fs/write",
            json!({"path": "/out/summary.txt", "content": "One line.", "mode": "append", "create_parents": true}),
            json!({"path": "/out/summary.txt", "content": 1}),
        ),
        ("fs/list", json!({"path": "/data"}), json!({})),
        (
            "fs/stat",
            json!({"path": "/data/notes.txt", "follow_symlinks": false}),
            json!({"path": []}),
        ),
        (
            "http-fetch/get",
            json!({"url": "https://example.org/", "headers": {"accept": "text/html"}, "max_bytes": 65536, "follow_redirects": true}),
            json!({"url": 1, "max_bytes": "lots"}),
        ),
        (
            "http-fetch/post",
            json!({"url": "https://example.org/api", "body": "{\"q\": 1}", "content_type": "application/json", "headers": {}}),
            json!({"body": "x"}),
        ),
        // What only the new validator sees: `mode` is a `$ref` to a `oneOf` of constants.
        (
            "fs/write",
            json!({"path": "/out/a", "content": "x", "mode": "overwrite"}),
            json!({"path": "/out/a", "content": "x", "mode": "bogus"}),
        ),
        ("hello/greet", json!({"name": "a".repeat(1000)}), json!("Ada")),
    ];
    let mut cases = Vec::new();
    for (i, (tool, good, bad)) in args.into_iter().enumerate() {
        let schema = schemas.iter().find(|(t, _)| t == tool).expect("tool").1.clone();
        for (args, valid) in [(good, true), (bad, false)] {
            cases.push(Case {
                name: format!("{tool}#{i}/{}", if valid { "valid" } else { "invalid" }),
                schema: schema.clone(),
                args,
                valid,
            });
        }
    }
    cases
}

fn new_uncached(schema: &Value, args: &Value) -> bool {
    jsonschema::validator_for(schema).expect("compiles").is_valid(args)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("schema");
    for case in cases() {
        assert_eq!(
            schema::validate(&case.schema, &case.args).is_ok(),
            case.valid,
            "{}",
            case.name
        );
        assert_eq!(new_uncached(&case.schema, &case.args), case.valid, "{}", case.name);
        group.bench_function(format!("old/{}", case.name), |b| {
            b.iter(|| black_box(old::validate(&case.schema, &case.args).is_ok()))
        });
        group.bench_function(format!("new/{}", case.name), |b| {
            b.iter(|| black_box(schema::validate(&case.schema, &case.args).is_ok()))
        });
        group.bench_function(format!("new_uncached/{}", case.name), |b| {
            b.iter(|| black_box(new_uncached(&case.schema, &case.args)))
        });
    }
    group.finish();
}

/// Median (and p99) single-validation wall time of `f` over every case, in nanoseconds.
fn p50(label: &str, f: impl Fn(&Case) -> bool) {
    const N: usize = 5_000;
    let mut all = Vec::new();
    for case in cases() {
        for _ in 0..200 {
            black_box(f(&case));
        }
        all.extend((0..N).map(|_| {
            let t = Instant::now();
            black_box(f(&case));
            t.elapsed().as_nanos()
        }));
    }
    all.sort_unstable();
    println!(
        "schema/p50 {label:<14} {:>8} ns   (p99 {} ns, over {} validations)",
        all[all.len() / 2],
        all[all.len() * 99 / 100],
        all.len()
    );
}

fn main() {
    // By hand rather than `criterion_group!`, whose generated fn has no doc comment.
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    p50("old", |c| old::validate(&c.schema, &c.args).is_ok());
    p50("new", |c| schema::validate(&c.schema, &c.args).is_ok());
    p50("new_uncached", |c| new_uncached(&c.schema, &c.args));
    // What the old subset missed on these cases: invalid arguments it let through.
    let missed: Vec<String> = cases()
        .into_iter()
        .filter(|c| !c.valid && old::validate(&c.schema, &c.args).is_ok())
        .map(|c| c.name)
        .collect();
    println!("schema/old accepted invalid arguments in: {missed:?}");
}
