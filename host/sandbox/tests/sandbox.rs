//! The sandbox end to end with the `hello` example: prepare, describe, call, cache, errors.

use std::sync::Arc;

use keel_kernel::tool::{ToolCallContext, ToolError, ToolHost};
use keel_sandbox::{
    CacheOutcome, Grants, InstalledTool, Limits, PreparedPlugin, Sandbox, SandboxConfig, SandboxError, SandboxToolHost,
};
use serde_json::json;

async fn hello(sandbox: &Sandbox) -> Arc<PreparedPlugin> {
    sandbox
        .prepare(&keel_testutil::guest_bytes("hello"))
        .await
        .expect("hello prepares")
}

fn sandbox(dir: &tempfile::TempDir) -> Sandbox {
    Sandbox::new(SandboxConfig::new(dir.path().join("cache"))).unwrap()
}

#[tokio::test]
async fn describe_and_call_hello() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let plugin = hello(&sandbox).await;
    assert_eq!(plugin.info.name, "hello");
    let greet = plugin.info.tool("greet").expect("greet tool");
    assert!(greet.idempotent);
    assert_eq!(greet.input_schema["properties"]["name"]["type"], "string");
    assert!(!plugin.imports.interfaces.is_empty());
    assert!(
        plugin
            .imports
            .interfaces
            .iter()
            .all(|i| i.starts_with("wasi:") || i.starts_with("keel:plugin/"))
    );
    assert!(!plugin.imports.http, "hello cannot reach the network");

    let ctx = ToolCallContext::ad_hoc("test");
    let report = sandbox
        .call(
            &plugin,
            &Grants::default(),
            &Limits::default(),
            &ctx,
            "greet",
            &json!({"name": "Ada"}),
        )
        .await;
    assert_eq!(report.result.unwrap().output, json!({"greeting": "Hello, Ada!"}));

    let report = sandbox
        .call(
            &plugin,
            &Grants::default(),
            &Limits::default(),
            &ctx,
            "greet",
            &json!({"nom": "Ada"}),
        )
        .await;
    assert!(
        matches!(report.result, Err(ToolError::InvalidInput { .. })),
        "{:?}",
        report.result
    );
    let report = sandbox
        .call(
            &plugin,
            &Grants::default(),
            &Limits::default(),
            &ctx,
            "greet",
            &json!({"name": " "}),
        )
        .await;
    assert!(matches!(report.result, Err(ToolError::InvalidInput { ref message }) if message.contains("empty")));
    let report = sandbox
        .call(
            &plugin,
            &Grants::default(),
            &Limits::default(),
            &ctx,
            "nope",
            &json!({}),
        )
        .await;
    assert_eq!(
        report.result,
        Err(ToolError::UnknownTool {
            tool: "hello/nope".into()
        })
    );
}

#[tokio::test]
async fn second_engine_loads_from_cache_and_tampering_forces_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let first = hello(&sandbox(&dir)).await;
    assert_eq!(first.cache, CacheOutcome::Compiled);
    let second = hello(&sandbox(&dir)).await;
    assert_eq!(
        second.cache,
        CacheOutcome::Hit,
        "an unchanged plugin is never recompiled"
    );

    // Flip a byte in every cached artifact: it must be rejected, not executed.
    for entry in std::fs::read_dir(dir.path().join("cache")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cwasm") {
            let mut bytes = std::fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let third_sandbox = sandbox(&dir);
    let third = hello(&third_sandbox).await;
    assert_eq!(third.cache, CacheOutcome::Compiled, "a tampered artifact is recompiled");
    let report = third_sandbox
        .call(
            &third,
            &Grants::default(),
            &Limits::default(),
            &ToolCallContext::ad_hoc("t"),
            "greet",
            &json!({"name": "B"}),
        )
        .await;
    assert!(report.result.is_ok());
}

/// A start from a verified artifact takes the component's `describe()` answer from its sealed
/// note instead of instantiating it again; a note that does not verify is ignored and the
/// component is asked again.
#[tokio::test]
async fn a_cached_plugin_is_described_from_its_sealed_note() {
    let dir = tempfile::tempdir().unwrap();
    let first_sandbox = sandbox(&dir);
    let first = hello(&first_sandbox).await;
    assert_eq!(first.cache, CacheOutcome::Compiled);
    assert_eq!(first_sandbox.describe_calls(), 1, "install asks the component");

    let second_sandbox = sandbox(&dir);
    let second = hello(&second_sandbox).await;
    assert_eq!(second.cache, CacheOutcome::Hit);
    assert_eq!(second_sandbox.describe_calls(), 0, "the kept answer is used");
    assert_eq!(second.info, first.info);

    // Rewrite the kept answer (another description) without the key: refused, asked again.
    let mut notes = 0;
    for entry in std::fs::read_dir(dir.path().join("cache")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "describe-v1") {
            let text = std::fs::read(&path).unwrap();
            let forged = String::from_utf8_lossy(&text).replace(&first.info.description, "forged");
            assert_ne!(forged.as_bytes(), &text[..], "the note holds the description");
            std::fs::write(&path, forged.as_bytes()).unwrap();
            notes += 1;
        }
    }
    assert_eq!(notes, 1);
    let third_sandbox = sandbox(&dir);
    let third = hello(&third_sandbox).await;
    assert_eq!(third.cache, CacheOutcome::Hit);
    assert_eq!(third_sandbox.describe_calls(), 1, "a forged note is not trusted");
    assert_eq!(third.info, first.info);
}

#[tokio::test]
async fn bad_files_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let hello = keel_testutil::guest_bytes("hello");

    let error = sandbox.prepare(b"").await.unwrap_err();
    assert!(matches!(error, SandboxError::NotWasm(_)), "{error}");
    let error = sandbox.prepare(&[7u8; 4096]).await.unwrap_err();
    assert!(matches!(error, SandboxError::NotWasm(_)), "{error}");
    let error = sandbox.prepare(b"\0asm\x01\0\0\0").await.unwrap_err();
    assert!(matches!(error, SandboxError::CoreModule), "{error}");
    let error = sandbox.prepare(&hello[..hello.len() / 2]).await.unwrap_err();
    assert!(matches!(error, SandboxError::Invalid(_)), "{error}");
    assert!(!error.to_string().contains('\n'), "one line: {error}");
}

#[tokio::test]
async fn tool_host_lists_and_calls() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let plugin = hello(&sandbox).await;
    let host = SandboxToolHost::new(
        sandbox.clone(),
        [InstalledTool {
            plugin,
            grants: Grants::default(),
            limits: Limits::default(),
        }],
    );
    let tools = host.list_tools().await.unwrap();
    assert_eq!(
        tools.iter().map(|t| t.qualified_name()).collect::<Vec<_>>(),
        ["hello/greet"]
    );
    let ctx = ToolCallContext::ad_hoc("t");
    let out = host.call_tool(&ctx, "hello/greet", &json!({"name": "Lin"})).await;
    assert_eq!(out.result.unwrap()["greeting"], "Hello, Lin!");
    assert!(
        out.receipt.wall_us > 0 && out.receipt.output_bytes > 0,
        "{:?}",
        out.receipt
    );
    assert!(out.receipt.peak_memory_bytes > 0, "{:?}", out.receipt);
    assert!(matches!(
        host.call_tool(&ctx, "nope/greet", &json!({})).await.result,
        Err(ToolError::UnknownTool { .. })
    ));
    assert!(matches!(
        host.call_tool(&ctx, "greet", &json!({})).await.result,
        Err(ToolError::UnknownTool { .. })
    ));
}

fn spew(bytes: usize, stream: &str) -> Vec<String> {
    ["cmd", "spew", &bytes.to_string(), stream].map(String::from).to_vec()
}

#[tokio::test]
async fn exec_captures_up_to_the_cap_and_says_when_it_is_hit() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let cmd = keel_testutil::guest_bytes("keel-test-cmd");
    let limits = Limits {
        max_stdio_bytes: 100_000,
        ..Limits::default()
    };
    let exactly = sandbox
        .exec(&cmd, &Grants::default(), &limits, &spew(100_000, "out"))
        .await
        .unwrap();
    assert_eq!(exactly.status.unwrap(), 0);
    assert_eq!(exactly.stdout.len(), 100_000);
    for stream in ["out", "err"] {
        let over = sandbox
            .exec(&cmd, &Grants::default(), &limits, &spew(100_001, stream))
            .await
            .unwrap();
        let captured = if stream == "out" { &over.stdout } else { &over.stderr };
        assert_eq!(captured.len(), 100_000, "the cap is kept");
        match over.status {
            Err(ToolError::LimitExceeded { limit, message }) => {
                assert_eq!(limit, format!("std{stream}"));
                assert!(message.contains("more than 100000 bytes"), "{message}");
            }
            other => panic!("a cut capture must not pass as success: {other:?}"),
        }
    }
}

#[tokio::test]
async fn exec_streaming_delivers_everything_and_waits_for_a_slow_reader() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(&dir);
    let cmd = keel_testutil::guest_bytes("keel-test-cmd");
    let total = 8 << 20;
    let (writer, mut reader) = tokio::io::duplex(4096);
    let run = tokio::spawn(async move {
        sandbox
            .exec_streaming(
                &cmd,
                &Grants::default(),
                &Limits::default(),
                &spew(total, "out"),
                Box::new(writer),
                Box::new(tokio::io::sink()),
            )
            .await
    });
    // Nobody reads yet: the program cannot run ahead of its reader by more than a bounded buffer.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        !run.is_finished(),
        "8 MiB went nowhere: the output was buffered without bound"
    );
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        received += n;
    }
    assert_eq!(received, total);
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.status.unwrap(), 0);
    assert!(report.stdout.is_empty() && report.stderr.is_empty(), "nothing is kept");
}
