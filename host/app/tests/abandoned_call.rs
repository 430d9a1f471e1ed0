//! A front end that stops waiting for a governed call (an HTTP client that hangs up drops its
//! handler's future; a caller's own timeout) does not stop the call midway: it runs to its end and
//! is recorded and charged like any other. A real SQLite home and the `hostile` guest built from
//! source.

use std::sync::Arc;
use std::time::Duration;

use keel_app::App;
use keel_app::call::CallRequest;
use keel_app::runtime::{AgentHost, LimitOverride, PolicyChoice};
use keel_kernel::job::{JobFilter, JobState};
use serde_json::json;

/// Calls of a tool that spins until its 300 ms deadline, one abandoned while it starts and one
/// after 50 ms of waiting for its result (its one commit comes after the call: dropping it midway
/// used to leave no job, no ledger entry, no trace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_caller_stops_waiting_for_still_ends_and_is_charged() {
    let home = tempfile::tempdir().unwrap();
    let app = Arc::new(App::open(home.path()).await.unwrap());
    let bytes = keel_testutil::guest_bytes("keel-test-hostile");
    app.install_unattended(&bytes, "hostile").await.unwrap();
    let short: LimitOverride = Arc::new(|l: &keel_sandbox::Limits| {
        Ok(keel_sandbox::Limits {
            timeout_ms: 300,
            ..l.clone()
        })
    });
    let policy = PolicyChoice::resolve(home.path(), None).unwrap();
    let host = AgentHost::open_with(home.path(), None, policy, Some(short), false)
        .await
        .unwrap();
    let request = CallRequest::new("default", "hostile/infinite_loop", json!({}));

    // Abandoned while it starts, and abandoned after it started (its handle dropped).
    let abandoned = tokio::time::timeout(Duration::from_millis(1), host.start_call(&request)).await;
    drop(abandoned);
    let handle = host.start_call(&request).await.unwrap();
    assert!(handle.is_direct(), "allowed at once: runs on the direct path");
    let abandoned = tokio::time::timeout(Duration::from_millis(50), handle.result()).await;
    assert!(abandoned.is_err(), "the call outlives its caller's patience");
    drop(handle);

    let until = std::time::Instant::now() + Duration::from_secs(20);
    let job = loop {
        let jobs = host
            .kernel
            .jobs()
            .list(&JobFilter {
                tenant: "default".into(),
                ..JobFilter::default()
            })
            .await
            .unwrap();
        let ended: Vec<_> = jobs.into_iter().filter(|j| j.state.is_terminal()).collect();
        if ended.len() == 2 {
            break ended;
        }
        assert!(
            std::time::Instant::now() < until,
            "the abandoned calls left no finished jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for job in &job {
        assert_eq!(job.state, JobState::Failed, "{job:?}");
        assert_eq!(
            job.error.as_ref().map(|e| e.code.as_str()),
            Some("timed_out"),
            "{job:?}"
        );
    }
    let usage = host
        .kernel
        .ledger()
        .usage(&keel_kernel::ledger::UsageQuery {
            tenant: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(usage.tool_calls, 2, "charged: {usage:?}");
}
