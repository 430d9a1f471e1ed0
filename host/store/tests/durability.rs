//! `[store] durability = "normal"`: a governed call's ledger receipt, once its commit returned,
//! survives the process being killed with SIGKILL (the WAL is in the OS's page cache and is
//! replayed at the next open). The test re-runs its own binary as the child that commits and is
//! then killed mid-sleep, before any orderly close or checkpoint.

use std::process::{Command, Stdio};
use std::sync::Arc;

use keel_kernel::agent::testing::{FakeTools, scripted_runtime};
use keel_kernel::context::ExecutionContext;
use keel_kernel::job::JobState;
use keel_kernel::ledger::{LedgerKind, LedgerQuery};
use keel_kernel::{AgentConfig, Kernel};
use keel_store::{Database, Durability};
use serde_json::json;

const CHILD_DB: &str = "KEEL_TEST_DURABILITY_CHILD_DB";

/// The child: one governed call under NORMAL, report its job, then wait to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_child() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return; // Only meaningful as the child of the test below.
    };
    let db = Database::open_with(std::path::Path::new(&path), Durability::Normal)
        .await
        .expect("open");
    let tools = FakeTools::new();
    tools.add_echo("p/charge", false);
    let kernel = Kernel::new(Arc::new(db.kernel_store()));
    let rt = scripted_runtime(kernel, vec![], &tools, AgentConfig::default());
    let h = rt
        .call_tool(&ExecutionContext::new("t"), "p/charge", json!({ "n": 7 }), None)
        .await
        .expect("call");
    let r = h.result().await.expect("result");
    assert_eq!(r.status, JobState::Succeeded);
    // Reported through a file: the test harness may capture the child's stdout.
    let report = std::path::PathBuf::from(format!("{}.job", path.to_string_lossy()));
    std::fs::write(&report, r.job_id.to_string()).expect("report");
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

#[test]
fn a_receipt_committed_under_normal_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.db");
    let report = dir.path().join("keel.db.job");
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "durability_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, &path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let job = loop {
        if let Ok(text) = std::fs::read_to_string(&report)
            && let Ok(id) = uuid::Uuid::parse_str(text.trim())
        {
            break id;
        }
        if std::time::Instant::now() > deadline || child.try_wait().expect("child").is_some() {
            let _ = child.kill();
            panic!("the child never reported a committed call");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SIGKILL: no destructor, no checkpoint, no close.
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    let wal = std::fs::metadata(dir.path().join("keel.db-wal")).expect("wal").len();
    assert!(wal > 0, "the commit is still in the WAL, not checkpointed");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let db = Database::open(&path).await.expect("reopen");
        let kernel = Kernel::new(Arc::new(db.kernel_store()));
        let stored = kernel.jobs().get("t", job).await.expect("the job survived");
        assert_eq!(stored.state, JobState::Succeeded);
        let usage = kernel
            .ledger()
            .entries(&LedgerQuery {
                tenant: "t".into(),
                job_id: Some(job),
                kinds: vec![LedgerKind::ToolUsage],
                ..Default::default()
            })
            .await
            .expect("ledger");
        assert_eq!(usage.len(), 1, "the call's usage entry survived");
        let receipt = &usage[0].entry.data.value()["receipt"];
        assert!(receipt["wall_us"].is_u64(), "with its receipt: {receipt}");
        assert!(receipt["output_bytes"].as_u64().is_some_and(|b| b > 0), "{receipt}");
    });
}
