//! Any component's exports as tools (issue 11, item 3): the `keel-test-plain-exports` guest knows
//! nothing about Keel; each exported function becomes a tool whose schema comes from its WIT types,
//! called with JSON converted to component values and back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_kernel::tool::{ToolCallContext, ToolError};
use keel_sandbox::{
    CacheOutcome, ComponentStore, Grants, Limits, PreparedPlugin, Sandbox, SandboxConfig, SandboxError,
};
use serde_json::{Value, json};

const GUEST: &str = "keel-test-plain-exports";

fn sandbox(dir: &tempfile::TempDir) -> Sandbox {
    Sandbox::new(SandboxConfig::new(dir.path().join("cache"))).unwrap()
}

async fn plain(sandbox: &Sandbox) -> Arc<PreparedPlugin> {
    sandbox
        .prepare_as(&keel_testutil::guest_bytes(GUEST), "keel_test_plain_exports")
        .await
        .expect("the plain component prepares")
}

async fn call_with(
    sandbox: &Sandbox,
    plugin: &PreparedPlugin,
    limits: &Limits,
    tool: &str,
    args: Value,
) -> Result<Value, ToolError> {
    let ctx = ToolCallContext::ad_hoc("exports-test");
    let report = sandbox
        .call(plugin, &Grants::default(), limits, &ctx, tool, &args)
        .await;
    report.result.map(|out| out.output)
}

async fn call(sandbox: &Sandbox, plugin: &PreparedPlugin, tool: &str, args: Value) -> Result<Value, ToolError> {
    call_with(sandbox, plugin, &Limits::default(), tool, args).await
}

fn integer(min: Value, max: Value) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

#[tokio::test]
async fn every_exported_function_is_a_tool_with_a_schema_from_its_types() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let plugin = plain(&sandbox).await;
    let info = &plugin.info;
    assert_eq!(info.name, "keel_test_plain_exports", "named after the file");
    assert_eq!(info.version, "0.0.0");
    let names: Vec<&str> = info.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "greet",
            "negate",
            "ints",
            "floats",
            "divide",
            "next-char",
            "sum",
            "maybe",
            "checked-div",
            "noop",
            "crash",
            "spin",
            "hog",
            "shapes-echo-point",
            "shapes-echo-shape",
            "shapes-area",
            "shapes-next-color",
            "shapes-toggle",
            "shapes-wrap",
        ]
    );
    // The resource's constructor and method and the function returning one are skipped, with why.
    assert!(info.description.contains("make-counter"), "{}", info.description);
    assert!(info.description.contains("resource"), "{}", info.description);
    assert!(
        info.requested().is_empty(),
        "a plain component requests no capabilities"
    );
    let tool = |name: &str| info.tool(name).unwrap();
    let input = |name: &str, param: &str| tool(name).input_schema["properties"][param].clone();
    let output = |name: &str| tool(name).output_schema.clone().unwrap();

    assert_eq!(
        tool("greet").input_schema,
        json!({
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": false,
        })
    );
    assert_eq!(output("greet"), json!({"type": "string"}));
    assert_eq!(input("negate", "b"), json!({"type": "boolean"}));
    // Integers carry their exact range (u64::MAX is exact, not an f64).
    assert_eq!(input("ints", "a"), integer(json!(-128), json!(127)));
    assert_eq!(input("ints", "b"), integer(json!(0), json!(255)));
    assert_eq!(input("ints", "c"), integer(json!(-32768), json!(32767)));
    assert_eq!(input("ints", "d"), integer(json!(0), json!(65535)));
    assert_eq!(input("ints", "e"), integer(json!(i32::MIN), json!(i32::MAX)));
    assert_eq!(input("ints", "f"), integer(json!(0), json!(u32::MAX)));
    assert_eq!(input("ints", "g"), integer(json!(i64::MIN), json!(i64::MAX)));
    assert_eq!(input("ints", "h"), integer(json!(0), json!(u64::MAX)));
    assert_eq!(output("ints")["prefixItems"][7], integer(json!(0), json!(u64::MAX)));
    let float = json!({"anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]});
    assert_eq!(input("floats", "a"), float);
    assert_eq!(output("divide"), float);
    assert_eq!(
        input("next-char", "c"),
        json!({"type": "string", "minLength": 1, "maxLength": 1})
    );
    assert_eq!(
        input("sum", "xs"),
        json!({"type": "array", "items": integer(json!(i64::MIN), json!(i64::MAX))})
    );
    // An `option` parameter is not required and may be null.
    assert_eq!(tool("maybe").input_schema["required"], json!(["y"]));
    assert_eq!(
        input("maybe", "x"),
        json!({"anyOf": [{"type": "null"}, integer(json!(0), json!(u32::MAX))]})
    );
    // A top-level `result`: the output is its `ok` value.
    assert_eq!(output("checked-div"), integer(json!(i32::MIN), json!(i32::MAX)));
    assert_eq!(tool("noop").input_schema["properties"], json!({}));
    assert_eq!(output("noop"), json!({"type": "null"}));
    assert_eq!(
        input("shapes-echo-point", "p"),
        json!({
            "type": "object",
            "properties": {
                "x": integer(json!(i32::MIN), json!(i32::MAX)),
                "y": integer(json!(i32::MIN), json!(i32::MAX)),
                "label": {"anyOf": [{"type": "null"}, {"type": "string"}]},
            },
            "required": ["x", "y"],
            "additionalProperties": false,
        })
    );
    let one = |key: &str, value: Value| json!({"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": false});
    assert_eq!(
        input("shapes-echo-shape", "s"),
        json!({"oneOf": [
            one("circle", float.clone()),
            one("rect", json!({
                "type": "array",
                "prefixItems": [integer(json!(0), json!(u32::MAX)), integer(json!(0), json!(u32::MAX))],
                "minItems": 2,
                "maxItems": 2,
            })),
            one("empty", json!({"type": "null"})),
        ]})
    );
    assert_eq!(
        input("shapes-next-color", "c"),
        json!({"type": "string", "enum": ["red", "green", "blue"]})
    );
    assert_eq!(
        input("shapes-toggle", "p"),
        json!({"type": "array", "items": {"type": "string", "enum": ["read", "write", "exec"]}, "uniqueItems": true})
    );
    let result = json!({"oneOf": [one("ok", integer(json!(0), json!(255))), one("err", json!({"type": "string"}))]});
    assert_eq!(input("shapes-wrap", "r"), result);
    assert_eq!(output("shapes-wrap"), json!({"type": "array", "items": result}));
}

#[tokio::test]
async fn json_round_trips_through_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let p = plain(&sandbox).await;
    let ok = |v: Value| Ok::<Value, ToolError>(v);
    assert_eq!(
        call(&sandbox, &p, "greet", json!({"name": "Ada"})).await,
        ok(json!("Hello, Ada!"))
    );
    // A hostile string is data: returned as-is inside JSON, escaped wherever it is printed.
    assert_eq!(
        call(&sandbox, &p, "greet", json!({"name": "\u{1b}[2J"})).await,
        ok(json!("Hello, \u{1b}[2J!"))
    );
    assert_eq!(call(&sandbox, &p, "negate", json!({"b": true})).await, ok(json!(false)));
    let extremes = json!({
        "a": -128, "b": 255, "c": -32768, "d": 65535,
        "e": i32::MIN, "f": u32::MAX, "g": i64::MIN, "h": u64::MAX,
    });
    assert_eq!(
        call(&sandbox, &p, "ints", extremes).await,
        ok(json!([
            -128,
            255,
            -32768,
            65535,
            i32::MIN,
            u32::MAX,
            i64::MIN,
            u64::MAX
        ]))
    );
    // `3.0` is an integer in JSON.
    let small = json!({"a": 3.0, "b": 0, "c": 0, "d": 0, "e": 0, "f": 0, "g": 0, "h": 0});
    assert_eq!(
        call(&sandbox, &p, "ints", small).await,
        ok(json!([3, 0, 0, 0, 0, 0, 0, 0]))
    );
    assert_eq!(
        call(&sandbox, &p, "floats", json!({"a": 0.1, "b": -2.5})).await,
        ok(json!([0.1, -2.5]))
    );
    assert_eq!(
        call(&sandbox, &p, "floats", json!({"a": "-Infinity", "b": "NaN"})).await,
        ok(json!(["-Infinity", "NaN"]))
    );
    assert_eq!(
        call(&sandbox, &p, "divide", json!({"a": 0, "b": 0})).await,
        ok(json!("NaN"))
    );
    assert_eq!(
        call(&sandbox, &p, "divide", json!({"a": 1, "b": 0})).await,
        ok(json!("Infinity"))
    );
    assert_eq!(
        call(&sandbox, &p, "divide", json!({"a": 1, "b": 4})).await,
        ok(json!(0.25))
    );
    assert_eq!(call(&sandbox, &p, "next-char", json!({"c": "a"})).await, ok(json!("b")));
    assert_eq!(call(&sandbox, &p, "next-char", json!({"c": "é"})).await, ok(json!("ê")));
    assert_eq!(call(&sandbox, &p, "sum", json!({"xs": [1, 2, 3]})).await, ok(json!(6)));
    assert_eq!(call(&sandbox, &p, "sum", json!({"xs": []})).await, ok(json!(0)));
    assert_eq!(call(&sandbox, &p, "maybe", json!({"y": 1})).await, ok(json!(null)));
    assert_eq!(
        call(&sandbox, &p, "maybe", json!({"x": null, "y": 1})).await,
        ok(json!(null))
    );
    assert_eq!(call(&sandbox, &p, "maybe", json!({"x": 2, "y": 3})).await, ok(json!(5)));
    assert_eq!(
        call(&sandbox, &p, "checked-div", json!({"a": 7, "b": 2})).await,
        ok(json!(3))
    );
    assert_eq!(call(&sandbox, &p, "noop", json!({})).await, ok(json!(null)));
    for point in [
        json!({"x": 1, "y": -2, "label": null}),
        json!({"x": 0, "y": 0, "label": "origin"}),
    ] {
        assert_eq!(
            call(&sandbox, &p, "shapes-echo-point", json!({"p": point})).await,
            ok(point)
        );
    }
    assert_eq!(
        call(&sandbox, &p, "shapes-echo-point", json!({"p": {"x": 1, "y": 2}})).await,
        ok(json!({"x": 1, "y": 2, "label": null})),
        "a missing option field is none"
    );
    for shape in [json!({"circle": 1.5}), json!({"rect": [2, 3]}), json!({"empty": null})] {
        assert_eq!(
            call(&sandbox, &p, "shapes-echo-shape", json!({"s": shape})).await,
            ok(shape)
        );
    }
    assert_eq!(
        call(&sandbox, &p, "shapes-area", json!({"s": {"rect": [2, 3]}})).await,
        ok(json!(6.0))
    );
    assert_eq!(
        call(&sandbox, &p, "shapes-next-color", json!({"c": "blue"})).await,
        ok(json!("red"))
    );
    assert_eq!(
        call(&sandbox, &p, "shapes-toggle", json!({"p": ["read"]})).await,
        ok(json!(["write", "exec"]))
    );
    assert_eq!(
        call(&sandbox, &p, "shapes-toggle", json!({"p": []})).await,
        ok(json!(["read", "write", "exec"]))
    );
    assert_eq!(
        call(&sandbox, &p, "shapes-wrap", json!({"r": {"ok": 5}})).await,
        ok(json!([{"ok": 5}]))
    );
    assert_eq!(
        call(&sandbox, &p, "shapes-wrap", json!({"r": {"err": "no"}})).await,
        ok(json!([{"err": "no"}]))
    );
}

#[tokio::test]
async fn bad_arguments_are_invalid_input_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let p = plain(&sandbox).await;
    let ints = |key: &str, value: Value| {
        let mut args = json!({"a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "f": 0, "g": 0, "h": 0});
        args[key] = value;
        args
    };
    let cases = [
        ("greet", json!({"name": 5}), "`name`: expected a string, got 5"),
        ("greet", json!({}), "missing argument `name`"),
        ("greet", json!({"name": "a", "extra": 1}), "unknown argument `extra`"),
        ("greet", json!(["Ada"]), "must be a JSON object"),
        (
            "ints",
            ints("a", json!(128)),
            "`a`: expected an integer from -128 to 127, got 128",
        ),
        ("ints", ints("b", json!(-1)), "`b`: expected an integer from 0 to 255"),
        (
            "ints",
            ints("h", json!(18446744073709551616.0)),
            "`h`: expected an integer from 0 to",
        ),
        ("ints", ints("e", json!(1.5)), "`e`: expected an integer"),
        ("floats", json!({"a": 1e300, "b": 0}), "out of range for a 32-bit float"),
        ("floats", json!({"a": "many", "b": 0}), "`a`: expected a number"),
        ("next-char", json!({"c": "ab"}), "`c`: expected a one-character string"),
        ("sum", json!({"xs": [1, "2"]}), "`xs[1]`: expected an integer"),
        ("shapes-next-color", json!({"c": "purple"}), "unknown case \"purple\""),
        ("shapes-echo-point", json!({"p": {"x": 1}}), "`p`: missing field `y`"),
        (
            "shapes-echo-point",
            json!({"p": {"x": 1, "y": 2, "z": 3}}),
            "unknown field `z`",
        ),
        (
            "shapes-echo-point",
            json!({"p": {"x": 1, "y": "2"}}),
            "`p.y`: expected an integer",
        ),
        (
            "shapes-echo-shape",
            json!({"s": {"square": 1}}),
            "unknown case `square`",
        ),
        ("shapes-echo-shape", json!({"s": {"rect": [1]}}), "exactly 2 items"),
        ("shapes-echo-shape", json!({"s": {"empty": 1}}), "has no value"),
        ("shapes-echo-shape", json!({"s": "empty"}), "exactly one key"),
        ("shapes-toggle", json!({"p": ["read", "fly"]}), "unknown flag \"fly\""),
        ("shapes-wrap", json!({"r": {"maybe": 1}}), "expected `ok` or `err`"),
    ];
    for (tool, args, expected) in cases {
        match call(&sandbox, &p, tool, args.clone()).await {
            Err(ToolError::InvalidInput { message }) => {
                assert!(
                    message.contains(expected),
                    "{tool} {args}: `{message}` lacks `{expected}`"
                )
            }
            other => panic!("{tool} {args}: expected invalid-input, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_err_result_is_a_failed_call_with_the_error_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let p = plain(&sandbox).await;
    assert_eq!(
        call(&sandbox, &p, "checked-div", json!({"a": 1, "b": 0})).await,
        Err(ToolError::Failed {
            message: "\"cannot divide 1 by 0\"".into()
        })
    );
}

#[tokio::test]
async fn a_trap_is_a_clear_error_and_the_host_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let p = plain(&sandbox).await;
    match call(&sandbox, &p, "crash", json!({"message": "boom went the component"})).await {
        Err(ToolError::Trapped { message }) => {
            assert!(message.contains("boom went the component"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_eq!(
        call(&sandbox, &p, "greet", json!({"name": "again"})).await,
        Ok(json!("Hello, again!"))
    );
}

#[tokio::test]
async fn deadlines_and_limits_hold_for_plain_components() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let p = plain(&sandbox).await;
    let limits = Limits {
        timeout_ms: 300,
        memory_bytes: 16 << 20,
        max_output_bytes: 64,
        ..Limits::default()
    };
    let started = Instant::now();
    let spun = call_with(&sandbox, &p, &limits, "spin", json!({})).await;
    assert!(matches!(spun, Err(ToolError::TimedOut { .. })), "{spun:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    let hogged = call_with(&sandbox, &p, &limits, "hog", json!({"mib": 64})).await;
    assert!(
        matches!(&hogged, Err(ToolError::LimitExceeded { limit, .. }) if limit == "memory"),
        "{hogged:?}"
    );
    assert_eq!(
        call_with(&sandbox, &p, &limits, "hog", json!({"mib": 2})).await,
        Ok(json!(2))
    );

    let long = call_with(&sandbox, &p, &limits, "greet", json!({"name": "x".repeat(100)})).await;
    assert!(
        matches!(&long, Err(ToolError::LimitExceeded { limit, .. }) if limit == "output"),
        "{long:?}"
    );
    // Unknown tools are refused before anything runs, as for keel:plugin tools.
    assert!(matches!(
        call(&sandbox, &p, "shapes-make-counter", json!({})).await,
        Err(ToolError::UnknownTool { .. })
    ));
}

/// A component-name, version and description section (as `wasm-tools metadata add` writes them)
/// appended to `wasm`.
fn with_metadata(wasm: &[u8], name: &str, version: &str, description: &str) -> Vec<u8> {
    fn section(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        let mut payload = Vec::new();
        leb(&mut payload, name.len());
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(data);
        out.push(0);
        leb(out, payload.len());
        out.extend_from_slice(&payload);
    }
    fn leb(out: &mut Vec<u8>, mut n: usize) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut out = wasm.to_vec();
    // component-name: subsection 0 (the component's own name), its size, the name.
    let mut names = Vec::new();
    leb(&mut names, name.len());
    names.extend_from_slice(name.as_bytes());
    let mut sub = vec![0u8];
    leb(&mut sub, names.len());
    sub.extend_from_slice(&names);
    section(&mut out, "component-name", &sub);
    section(&mut out, "version", version.as_bytes());
    section(&mut out, "description", description.as_bytes());
    out
}

#[tokio::test]
async fn name_and_version_come_from_the_components_own_sections() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let wasm = keel_testutil::guest_bytes(GUEST);

    // Without a name section or a label there is no name: one clear line.
    let error = sandbox.prepare(&wasm).await.unwrap_err();
    assert!(matches!(error, SandboxError::WrongWorld(_)), "{error}");
    assert!(error.to_string().contains("no usable name"), "{error}");
    assert!(!error.to_string().contains('\n'));

    let named = with_metadata(&wasm, "Text Tools", "1.2.3", "Greets people.");
    let plugin = sandbox.prepare_as(&named, "ignored-file-name").await.unwrap();
    assert_eq!(plugin.info.name, "text-tools");
    assert_eq!(plugin.info.version, "1.2.3");
    assert!(
        plugin.info.description.starts_with("Greets people."),
        "{}",
        plugin.info.description
    );

    // A version that is not semver is not shown as one.
    let odd = with_metadata(&wasm, "odd", "latest\u{1b}[2J", "");
    assert_eq!(sandbox.prepare(&odd).await.unwrap().info.version, "0.0.0");
}

#[tokio::test]
async fn an_installed_plain_component_starts_from_its_artifact_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = ComponentStore::new(dir.path().join("components"));
    let sha = store.put(&keel_testutil::guest_bytes(GUEST)).unwrap();
    let first = sandbox(&dir).prepare_stored(&store, &sha, "plain").await.unwrap();
    assert_eq!(first.cache, CacheOutcome::Compiled);
    assert_eq!(first.info.name, "plain");

    let fresh = sandbox(&dir);
    let second = fresh.prepare_stored(&store, &sha, "plain").await.unwrap();
    assert_eq!(second.cache, CacheOutcome::Hit);
    assert_eq!(
        second.info, first.info,
        "the same tools, name and version from the cache"
    );
    assert_eq!(
        call(&fresh, &second, "shapes-next-color", json!({"c": "red"})).await,
        Ok(json!("green"))
    );
}

#[tokio::test]
async fn hostile_types_are_skipped_quickly_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let started = Instant::now();
    let plugin = plain(&sandbox).await;
    let description = &plugin.info.description;
    // 40 nested lists: beyond the depth Keel offers (and the host's recursion stays bounded).
    assert!(
        description.contains("hostile@0.1.0#deep (its types nest deeper than 32 levels)"),
        "{description}"
    );
    // 12 definitions that share their parts describe 4,096 leaves: the schema budget stops it.
    assert!(
        description.contains("hostile@0.1.0#wide (its types have more than"),
        "{description}"
    );
    assert!(plugin.info.tool("hostile-deep").is_none() && plugin.info.tool("hostile-wide").is_none());
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}
